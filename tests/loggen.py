"""A deterministic generator of realistic CloudFront standard logs, with the ground truth.

Used by the tests (``import loggen``), the ETL benchmark and the demo::

    python tests/loggen.py --out DIR --days 2 --lines-per-file 500 --seed 1 \
        [--start 2024-01-31] [--files-per-day 24] [--truth truth.json]

Every line is built from a known kind (a counted download, HEAD, a 404, a page, an Archive
path, a malformed line, …), so the generator knows exactly which lines the download rule of
etl.md counts. The truth holds, for packages known in the bundled packages sample only and
from each category's first year on: distinct IPs and downloads per (category, package,
year, month) — month 0 is the year — and the same per (category, year, month).
"""

from __future__ import annotations

import argparse
import base64
import csv
import datetime as dt
import gzip
import itertools
import json
import random
import zlib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
PACKAGES_SAMPLE = HERE / "fixtures" / "packages_sample.csv"
DIST = "E1TVLJONPTUXV3"
FIRST_YEAR = {"bioc": 2009, "annotation": 2009, "experiment": 2009, "workflows": 2015}
REPO = {
    "bioc": "bioc",
    "annotation": "data/annotation",
    "experiment": "data/experiment",
    "workflows": "workflows",
}
FIELDS = (
    "date time x-edge-location sc-bytes c-ip cs-method cs(Host) cs-uri-stem sc-status "
    "cs(Referer) cs(User-Agent) cs-uri-query cs(Cookie) x-edge-result-type x-edge-request-id "
    "x-host-header cs-protocol cs-bytes time-taken x-forwarded-for ssl-protocol ssl-cipher "
    "x-edge-response-result-type cs-protocol-version fle-status fle-encrypted-fields c-port "
    "time-to-first-byte x-edge-detailed-result-type sc-content-type sc-content-len "
    "sc-range-start sc-range-end"
).split()
VERSIONS = [f"3.{n}" for n in range(10, 21)] + ["release", "devel"]
# Most traffic is for the current release and devel, then recent releases.
VERSION_WEIGHTS = [1] * 7 + [2, 3, 4, 6] + [40, 15]
# Each Bioconductor release is built for one R version.
R_FOR = {f"3.{n}": f"4.{(n - 10) // 2}" for n in range(10, 21)} | {
    "release": "4.4",
    "devel": "4.5",
}
BIN_DIRS = ["windows", "macosx/big-sur-arm64", "macosx/big-sur-x86_64", "macosx"]
EDGES = ["IAD89-P1", "FRA56-P3", "NRT57-C2", "SEA19-C1", "GRU3-P2"]
AGENTS = [
    "R%20(4.3.1%20x86_64-pc-linux-gnu%20x86_64%20linux-gnu)",
    "R%20(4.4.0%20aarch64-apple-darwin20%20aarch64%20darwin20)",
    "Mozilla/5.0%20(X11;%20Linux%20x86_64)%20AppleWebKit/537.36",
    "curl/8.5.0",
    "Wget/1.21.3",
]
PAGES = [
    "/",
    "/packages/release/bioc/html/limma.html",
    "/packages/stats/index.html",
    "/images/logo_bioconductor.gif",
    "/packages/3.18/bioc/src/contrib/PACKAGES",
    "/packages/release/bioc/src/contrib/PACKAGES.gz",
    "/packages/devel/bioc/VIEWS",
    "/packages/release/bioc/vignettes/limma/inst/doc/usersguide.pdf",
    "/style/main.css",
    "/help/search/index.html",
]
INVALID_NAMES = ["1abc", "a", "abc.", "ab-c", "ab c", "x_y"]
# Line kinds and their weights; only "download" is counted.
KINDS = [
    ("download", 45),
    ("page", 25),
    ("head", 4),
    ("bad_status", 8),
    ("archive", 2),
    ("unknown_pkg", 3),
    ("wrong_category", 2),
    ("invalid_name", 2),
    ("post", 1),
    ("malformed", 3),
    ("blank", 1),
]


@dataclass
class Truth:
    """Ground truth: (cat, pkg, year, month) and (cat, year, month) → (distinct IPs, downloads);
    month 0 is the whole year. Also the number of lines and counted downloads written."""

    package: dict[tuple[str, str, int, int], tuple[int, int]] = field(default_factory=dict)
    category: dict[tuple[str, int, int], tuple[int, int]] = field(default_factory=dict)
    lines: int = 0
    counted: int = 0  # downloads by the rule, known package or not
    files: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "package": [[*k, *v] for k, v in sorted(self.package.items())],
            "category": [[*k, *v] for k, v in sorted(self.category.items())],
            "lines": self.lines,
            "counted": self.counted,
        }


def read_packages(path: Path = PACKAGES_SAMPLE) -> list[tuple[str, str]]:
    """(package, category) rows of a packages CSV."""
    with path.open(newline="", encoding="utf-8") as fh:
        return [(r["package"], r["category"]) for r in csv.DictReader(fh)]


class _Acc:
    """Collects counted downloads of known packages into the truth (sets of IPs)."""

    def __init__(self, known: set[tuple[str, str]]) -> None:
        self.known = known
        self.pkg_ips: dict[tuple, set[str]] = defaultdict(set)
        self.pkg_dl: dict[tuple, int] = defaultdict(int)
        self.cat_ips: dict[tuple, set[str]] = defaultdict(set)
        self.cat_dl: dict[tuple, int] = defaultdict(int)

    def add(self, cat: str, pkg: str, when: dt.datetime, ip: str) -> None:
        if (pkg, cat) not in self.known or when.year < FIRST_YEAR[cat]:
            return
        for month in (when.month, 0):
            k = (cat, pkg, when.year, month)
            self.pkg_ips[k].add(ip)
            self.pkg_dl[k] += 1
            c = (cat, when.year, month)
            self.cat_ips[c].add(ip)
            self.cat_dl[c] += 1

    def fill(self, truth: Truth) -> None:
        truth.package = {k: (len(v), self.pkg_dl[k]) for k, v in self.pkg_ips.items()}
        truth.category = {k: (len(v), self.cat_dl[k]) for k, v in self.cat_ips.items()}


class Generator:
    """Seeded source of log lines; one instance writes a whole data set."""

    def __init__(self, seed: int, packages: list[tuple[str, str]], clients: int = 400) -> None:
        self.rng = random.Random(seed)
        self.packages = packages
        rng = self.rng
        v4 = [
            ".".join(str(rng.randint(1, 223 if i == 0 else 254)) for i in range(4))
            for _ in range(clients * 3 // 4)
        ]
        v6 = [
            f"2001:db8:{rng.randint(0, 0xFFFF):x}::{rng.randint(1, 0xFFFF):x}"
            for _ in range(clients - len(v4))
        ]
        self.ips = v4 + v6
        # A few heavy clients (mirrors, CI farms) repeat a lot. Cumulative weights once: the
        # same choices as weights= (which sums them on every call), fast with many clients.
        self.ip_weights = [50 if i < 5 else 1 for i in range(len(self.ips))]
        self.ip_cum_weights = list(itertools.accumulate(self.ip_weights))
        self.kinds = [k for k, _ in KINDS]
        self.kind_weights = [w for _, w in KINDS]
        self.unknown = [f"Unknownpkg{i}" for i in range(5)] + ["zz.notreal"]

    # -- pieces ---------------------------------------------------------------------------

    def _ip(self) -> str:
        return self.rng.choices(self.ips, cum_weights=self.ip_cum_weights)[0]

    def _path(self, cat: str, pkg: str) -> str:
        rng = self.rng
        ver = rng.choices(VERSIONS, VERSION_WEIGHTS)[0]
        rv = R_FOR[ver]
        # like the real repositories, a package has one current version per release
        h = zlib.crc32(f"{pkg} {ver}".encode())
        pv = f"{h % 4}.{h // 4 % 40}.{h // 160 % 10}"
        base = f"/packages/{ver}/{REPO[cat]}"
        r = rng.random()
        if r < 0.6:
            path = f"{base}/src/contrib/{pkg}_{pv}.tar.gz"
        elif r < 0.8:
            path = f"{base}/bin/windows/contrib/{rv}/{pkg}_{pv}.zip"
        else:
            d = rng.choice(BIN_DIRS[1:])
            ext = "tar.gz" if rng.random() < 0.05 else "tgz"
            path = f"{base}/bin/{d}/contrib/{rv}/{pkg}_{pv}.{ext}"
        if rng.random() < 0.05:  # runs of "/" still count
            path = path.replace("/contrib/", "//contrib/").replace("/packages/", "//packages/", 1)
        return path

    def _line(
        self, when: dt.datetime, ip: str, method: str, uri: str, status: int | str
    ) -> list[str]:
        rng = self.rng
        size = rng.randint(300, 9_000_000)
        return [
            when.strftime("%Y-%m-%d"),
            when.strftime("%H:%M:%S"),
            rng.choice(EDGES),
            str(size),
            ip,
            method,
            "d2ndw1v3dxg1p5.cloudfront.net",
            uri,
            str(status),
            "-",
            rng.choice(AGENTS),
            "-",
            "-",
            "Hit" if rng.random() < 0.8 else "Miss",
            base64.b64encode(rng.randbytes(42)).decode(),
            "bioconductor.org",
            "https",
            str(rng.randint(150, 400)),
            f"{rng.random():.3f}",
            "-",
            "TLSv1.3",
            "TLS_AES_128_GCM_SHA256",
            "Hit",
            "HTTP/1.1",
            "-",
            "-",
            str(rng.randint(1024, 65535)),
            f"{rng.random():.3f}",
            "Hit",
            "application/x-gzip",
            str(size),
            "-",
            "-",
        ]

    def make(self, hour: dt.datetime, acc: _Acc | None) -> tuple[str, list[str] | None, bool]:
        """One line for a file of ``hour``: (kind, 33 fields or None for blank, counted)."""
        rng = self.rng
        kind = rng.choices(self.kinds, self.kind_weights)[0]
        # Most lines fall in the file's hour; some belong to earlier hours (late delivery).
        r = rng.random()
        if r < 0.9:
            when = hour + dt.timedelta(seconds=rng.randrange(3600))
        elif r < 0.98:
            when = hour - dt.timedelta(seconds=rng.randrange(1, 6 * 3600))
        else:
            when = hour + dt.timedelta(seconds=rng.randrange(3600, 40 * 3600))
        ip = self._ip()
        cat_pkg = rng.choice(self.packages)
        pkg, cat = cat_pkg
        if kind == "blank":
            return kind, None, False
        if kind == "download":
            status = rng.choice([200] * 20 + [301, 302, 307, 308])
            if acc is not None:
                acc.add(cat, pkg, when, ip)
            return kind, self._line(when, ip, "GET", self._path(cat, pkg), status), True
        if kind == "unknown_pkg":
            uri = self._path(cat, rng.choice(self.unknown))
            return kind, self._line(when, ip, "GET", uri, 200), True
        if kind == "wrong_category":
            other = rng.choice([c for c in REPO if c != cat])
            # a known name requested under another repository: stored, not reported there
            # (unless the sample happens to list it in that category too)
            if acc is not None:
                acc.add(other, pkg, when, ip)
            return kind, self._line(when, ip, "GET", self._path(other, pkg), 200), True
        if kind == "head":
            return kind, self._line(when, ip, "HEAD", self._path(cat, pkg), 200), False
        if kind == "post":
            return kind, self._line(when, ip, "POST", self._path(cat, pkg), 200), False
        if kind == "bad_status":
            status = rng.choice([206, 304, 403, 404, 500, 502, 503])
            return kind, self._line(when, ip, "GET", self._path(cat, pkg), status), False
        if kind == "archive":
            base = f"/packages/{rng.choice(VERSIONS)}/{REPO[cat]}"
            uri = f"{base}/src/contrib/Archive/{pkg}/{pkg}_1.0.tar.gz"
            return kind, self._line(when, ip, "GET", uri, 200), False
        if kind == "invalid_name":
            uri = self._path(cat, rng.choice(INVALID_NAMES))
            return kind, self._line(when, ip, "GET", uri, 200), False
        if kind == "page":
            return kind, self._line(when, ip, "GET", rng.choice(PAGES), 200), False
        # malformed: each makes the line rejected, whatever else it holds
        fields = self._line(when, ip, "GET", self._path(cat, pkg), 200)
        how = rng.randrange(6)
        if how == 0:
            return "drop_column", fields, False  # the writer drops a column after layout
        if how == 1:
            fields[0] = "2024-13-45"
        elif how == 2:
            fields[1] = "25:61:00"
        elif how == 3:
            fields[8] = "-"
        elif how == 4:
            fields[4] = "-"
        else:
            fields[0] = (hour - dt.timedelta(days=5)).strftime("%Y-%m-%d")
        return kind, fields, False


def file_name(hour: dt.datetime, rng: random.Random) -> str:
    """``<dist>.<YYYY-MM-DD-HH>.<unique>.gz``."""
    return f"{DIST}.{hour:%Y-%m-%d-%H}.{rng.getrandbits(32):08x}.gz"


def generate(
    out: Path,
    days: int = 2,
    lines_per_file: int = 200,
    seed: int = 1,
    start: dt.date = dt.date(2024, 1, 30),
    files_per_day: int = 24,
    packages: list[tuple[str, str]] | None = None,
    truth: bool = True,
    subdirs: bool = False,
    clients: int = 400,
) -> Truth:
    """Write ``days * files_per_day`` gzip log files under ``out`` and return the truth.

    File variants (by position, so every data set of a few files has them): every 5th file
    uses the old 15-field format, every 7th reorders its columns, every 4th has CRLF line
    ends. ``subdirs`` places files under ``<dist>/<YYYY-MM-DD>/`` like some buckets do.
    ``clients``: distinct client addresses (``Generator(seed, packages, clients).ips``).
    """
    packages = packages if packages is not None else read_packages()
    gen = Generator(seed, packages, clients)
    acc = _Acc(set(packages)) if truth else None
    result = Truth()
    out.mkdir(parents=True, exist_ok=True)
    step = 24 // max(1, min(24, files_per_day))
    n = 0
    for d in range(days):
        day = start + dt.timedelta(days=d)
        for h in range(0, 24, step)[:files_per_day]:
            hour = dt.datetime(day.year, day.month, day.day, h)
            name = file_name(hour, gen.rng)
            target = out / DIST / f"{day:%Y-%m-%d}" / name if subdirs else out / name
            target.parent.mkdir(parents=True, exist_ok=True)
            write_file(target, gen, hour, lines_per_file, n, acc, result)
            result.files.append(target.relative_to(out).as_posix())
            n += 1
    if acc is not None:
        acc.fill(result)
    return result


def write_file(
    target: Path,
    gen: Generator,
    hour: dt.datetime,
    lines: int,
    n: int,
    acc: _Acc | None,
    result: Truth,
) -> None:
    """One log object: headers, then ``lines`` lines in this file's variant."""
    names = list(FIELDS)
    order = list(range(len(FIELDS)))
    if n % 5 == 4:
        names, order = names[:15], order[:15]
    elif n % 7 == 6:
        gen.rng.shuffle(order)
        names = [FIELDS[i] for i in order]
    eol = "\r\n" if n % 4 == 3 else "\n"
    with gzip.open(target, "wt", encoding="utf-8", newline="", compresslevel=6) as fh:
        fh.write(f"#Version: 1.0{eol}#Fields: {' '.join(names)}{eol}")
        buf = []
        for _ in range(lines):
            kind, fields, counted = gen.make(hour, acc)
            result.lines += 1
            result.counted += counted
            if fields is None:
                buf.append("")
            elif kind == "drop_column":  # a missing column, in whatever layout
                buf.append("\t".join([fields[i] for i in order[:-1]]))
            else:
                buf.append("\t".join([fields[i] for i in order]))
            if len(buf) >= 5000:
                fh.write(eol.join(buf) + eol)
                buf.clear()
        if buf:
            fh.write(eol.join(buf) + eol)


def log_line(
    uri: str = "/packages/3.18/bioc/src/contrib/limma_3.58.1.tar.gz",
    status: str = "200",
    method: str = "GET",
    ip: str = "192.0.2.1",
    date: str = "2024-01-30",
    time: str = "12:01:02",
    fields: list[str] | tuple[str, ...] = tuple(FIELDS),
) -> str:
    """One hand-made log line (other columns ``-``) in the layout ``fields``."""
    values = {
        "date": date,
        "time": time,
        "c-ip": ip,
        "cs-method": method,
        "cs-uri-stem": uri,
        "sc-status": status,
    }
    return "\t".join(values.get(f, "-") for f in fields)


def log_bytes(
    *lines: str,
    fields: list[str] | tuple[str, ...] = tuple(FIELDS),
    eol: str = "\n",
    header: bool = True,
) -> bytes:
    """A gzip log object holding ``lines`` (with the #Version/#Fields headers unless not)."""
    head = f"#Version: 1.0{eol}#Fields: {' '.join(fields)}{eol}" if header else ""
    return gzip.compress((head + eol.join(lines) + (eol if lines else "")).encode())


def main(argv: list[str] | None = None) -> None:
    """Command line: write a data set (and optionally its truth as JSON)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--days", type=int, default=2)
    ap.add_argument("--lines-per-file", type=int, default=200)
    ap.add_argument("--files-per-day", type=int, default=24)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--start", type=dt.date.fromisoformat, default=dt.date(2024, 1, 30))
    ap.add_argument("--subdirs", action="store_true", help="<dist>/<YYYY-MM-DD>/ layout")
    ap.add_argument("--clients", type=int, default=400, help="distinct client addresses")
    ap.add_argument("--truth", type=Path, help="write the ground truth here (JSON)")
    args = ap.parse_args(argv)
    truth = generate(
        args.out,
        days=args.days,
        lines_per_file=args.lines_per_file,
        seed=args.seed,
        start=args.start,
        files_per_day=args.files_per_day,
        truth=args.truth is not None,
        subdirs=args.subdirs,
        clients=args.clients,
    )
    if args.truth:
        args.truth.write_text(json.dumps(truth.to_json()) + "\n")
    print(f"{len(truth.files)} files, {truth.lines} lines, {truth.counted} counted downloads")


if __name__ == "__main__":
    main()
