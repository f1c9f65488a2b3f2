"""Databases of the legacy stats server (``download_db_YYYY.sqlite``), with the ground truth.

The same simulated requests as ``tests/loggen.py`` (its :class:`loggen.Generator` decides
every request and keeps the truth), written either as CloudFront log lines or as rows of the
legacy ``access_log`` table, so that history (legacy rows before a cut-over day) plus logs
(on and after it) must give the statistics of the whole::

    python tests/legacygen.py --legacy DIR --logs DIR --start 2019-12-28 --days 20 \
        --split 2020-01-10 [--truth truth.json]

A legacy row dresses the request the way the old server logged it: ``ips`` sometimes a proxy
chain (the client first), ``url`` sometimes absolute or with a query string, the status in
``errorcode`` before 2020 and ``statuscode`` after, the day as ``17/Sep/2023`` (local time of
the old server; ``time`` and ``utc_offset`` beside it), and the old parser's opinion in
``package``/``biocrepo``/``pkgtype`` — now and then plainly wrong. Malformed lines of the log
generator become malformed rows (a bad day, no client address, a non-numeric status).

:func:`generate_history` writes big or long-running databases fast (benchmark, demo), with a
Zipf-like spread of packages and clients; it does not go through ``loggen.Generator``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import random
import sqlite3
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import loggen

MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
# The old server's columns; the status column is named errorcode before 2020.
COLUMNS = (
    "ips", "day_month_year", "month_year", "time", "utc_offset", "method", "url", "protocol",
    "statuscode", "bytes", "referer", "user_agent", "biocrepo_relurl", "biocrepo",
    "biocversion", "package", "pkgversion", "pkgtype",
)  # fmt: skip
STATUS_RENAMED = 2020
HOSTS = ("http://bioconductor.org", "https://bioconductor.org", "http://master.bioconductor.org")
QUERIES = ("?raw=true", "?download=1", "?_=1695000000", "?")
PROXIES = ("10.0.0.7", "172.16.4.2", "192.168.1.20", "10.12.0.1")


def status_column(year: int) -> str:
    return "errorcode" if year < STATUS_RENAMED else "statuscode"


def file_name(year: int) -> str:
    return f"download_db_{year}.sqlite"


def day_string(day: dt.date) -> str:
    """``17/Sep/2023``, as the old server logged the day (whatever the locale)."""
    return f"{day.day:02d}/{MONTHS[day.month - 1]}/{day.year}"


def utc_offset(day: dt.date) -> str:
    """The old server was in Seattle: roughly PDT in summer, PST in winter."""
    return "-0700" if 4 <= day.month <= 10 else "-0800"


def create(path: Path, status_col: str = "statuscode") -> sqlite3.Connection:
    """An empty legacy database (the ``access_log`` table) at ``path``."""
    con = sqlite3.connect(path)
    cols = ", ".join(
        f"{status_col if c == 'statuscode' else c} {'INTEGER' if c == 'bytes' else 'TEXT'}"
        for c in COLUMNS
    )
    con.execute(f"CREATE TABLE IF NOT EXISTS access_log ({cols})")
    return con


def write_rows(path: Path, rows: Iterable[dict | Sequence], status_col: str = "statuscode") -> Path:
    """Append rows (dicts by column name, missing ones NULL; or full tuples) to a database."""
    con = create(path, status_col)
    with con:
        for row in rows:
            if isinstance(row, dict):
                values = [row.get("status" if c == "statuscode" else c) for c in COLUMNS]
            else:
                values = list(row)
            con.execute(f"INSERT INTO access_log VALUES ({', '.join('?' * len(COLUMNS))})", values)
    con.close()
    return path


def row(
    url: str = "/packages/3.18/bioc/src/contrib/limma_3.58.1.tar.gz",
    ips: str | None = "192.0.2.1",
    day: str | None = "30/Jan/2024",
    status: str | None = "200",
    method: str | None = "GET",
    time: str = "12:01:02",
    offset: str = "-0800",
    package: str | None = None,
) -> dict:
    """One hand-made legacy row (the columns the rule reads, and the old parser's opinion)."""
    return {
        "ips": ips, "day_month_year": day, "month_year": day[3:] if day else None,
        "time": time, "utc_offset": offset, "method": method, "url": url,
        "protocol": "HTTP/1.1", "status": status, "bytes": 1234, "referer": "-",
        "user_agent": "R (4.3.1)", "package": package,
    }  # fmt: skip


class LegacyDir:
    """Rows into ``download_db_<year>.sqlite`` files of a directory, in batches."""

    def __init__(self, out: Path, batch: int = 50_000) -> None:
        self.out, self.batch = out, batch
        out.mkdir(parents=True, exist_ok=True)
        self.cons: dict[int, sqlite3.Connection] = {}
        self.buf: dict[int, list[tuple]] = defaultdict(list)
        self.rows = 0

    def add(self, year: int, values: tuple) -> None:
        buf = self.buf[year]
        buf.append(values)
        self.rows += 1
        if len(buf) >= self.batch:
            self._flush(year)

    def _flush(self, year: int) -> None:
        con = self.cons.get(year)
        if con is None:
            con = self.cons[year] = create(self.out / file_name(year), status_column(year))
            con.execute("PRAGMA journal_mode=OFF")
            con.execute("PRAGMA synchronous=OFF")
        with con:
            con.executemany(
                f"INSERT INTO access_log VALUES ({', '.join('?' * len(COLUMNS))})", self.buf[year]
            )
        self.buf[year].clear()

    def close(self) -> list[Path]:
        for year in list(self.buf):
            if self.buf[year]:
                self._flush(year)
        for con in self.cons.values():
            con.close()
        return sorted(self.out / file_name(y) for y in self.cons)


# --- the requests of loggen.Generator, as legacy rows --------------------------------------


def _old_parser_opinion(uri: str, rng: random.Random, names: list[str]) -> tuple[str, ...]:
    """(biocrepo_relurl, biocrepo, biocversion, package, pkgversion, pkgtype) as the old
    parser guessed them; wrong now and then (not trusted by the import)."""
    parts = [p for p in uri.split("/") if p]
    if len(parts) < 4 or parts[0] != "packages":
        pkg = rng.choice(names) if rng.random() < 0.1 else None  # a page taken for a package
        return (None, None, None, pkg, None, None)
    fname = parts[-1]
    pkg, _, rest = fname.partition("_")
    if rng.random() < 0.05:
        pkg = rng.choice(names)  # the wrong package
    pkgtype = "source" if "/src/" in uri else "win.binary" if fname.endswith(".zip") else "mac"
    return ("/".join(parts[2:]), parts[2], parts[1], pkg, rest.rsplit(".", 1)[0], pkgtype)


def dress(ip: str, uri: str, rng: random.Random) -> tuple[str, str]:
    """(ips, url) as the old server logged a request."""
    r = rng.random()
    if r < 0.08:
        ips = f"{ip}, {rng.choice(PROXIES)}"  # a proxy chain: the client comes first
    elif r < 0.10:
        ips = f"{ip}, {rng.choice(PROXIES)}, {rng.choice(PROXIES)}"
    else:
        ips = ip
    url = uri
    if rng.random() < 0.06:
        url = rng.choice(HOSTS) + url
    if rng.random() < 0.04:
        url += rng.choice(QUERIES)
    return ips, url


def malformed_row(day: dt.date, rng: random.Random) -> tuple[str | None, str | None, str | None]:
    """(ips, day string, status) of a row the import must count as malformed."""
    how = rng.randrange(7)
    ips, dstr, status = "192.0.2.99", day_string(day), "200"
    if how == 0:
        dstr = f"{day:%Y-%m-%d}"  # not the old format
    elif how == 1:
        dstr = f"45/{MONTHS[day.month - 1]}/{day.year}"
    elif how == 2:
        dstr = None
    elif how == 3:
        ips = ""
    elif how == 4:
        ips = None
    elif how == 5:
        ips = "-, -"  # a chain of placeholders: no address, no client
    else:
        status = "-"
    return ips, dstr, status


def legacy_values(
    kind: str, fields: list[str] | None, hour: dt.datetime, rng: random.Random, names: list[str]
) -> tuple[int, tuple]:
    """A loggen line (kind, 33 fields) → (year of its file, the legacy row's values).

    A line the log rule counts is a row the legacy rule counts, and the other way round:
    the day is the line's date, taken as the old server's local day."""
    if fields is None or kind in ("malformed", "drop_column"):
        ips, dstr, status = malformed_row(hour.date(), rng)
        url = f"/packages/release/bioc/src/contrib/{rng.choice(names)}_1.0.tar.gz"
        opinion = _old_parser_opinion(url, rng, names)
        values = (ips, dstr, dstr[3:] if dstr else None, f"{hour:%H}:00:00", "-0800", "GET",
                  url, "HTTP/1.1", status, 1000, "-", "R", *opinion)  # fmt: skip
        return hour.year, values
    when = dt.datetime.fromisoformat(f"{fields[0]}T{fields[1]}")
    ips, url = dress(fields[4], fields[7], rng)
    dstr = day_string(when.date())
    values = (
        ips, dstr, dstr[3:], fields[1], utc_offset(when.date()), fields[5], url, "HTTP/1.1",
        fields[8], int(fields[3]), fields[9], fields[10].replace("%20", " "),
        *_old_parser_opinion(fields[7].replace("//", "/"), rng, names),
    )  # fmt: skip
    return when.year, values


@dataclass
class SplitCorpus:
    """What :func:`generate_split` wrote: the truth of the whole, and its two halves."""

    truth: loggen.Truth
    legacy_files: list[Path] = field(default_factory=list)
    log_files: list[str] = field(default_factory=list)
    legacy_rows: int = 0
    log_lines: int = 0
    counted_legacy: int = 0  # downloads by the rule in the legacy rows (known or not)
    counted_logs: int = 0
    # distinct client addresses of the counted downloads on each side
    clients_legacy: set[str] = field(default_factory=set)
    clients_logs: set[str] = field(default_factory=set)


def write_log(target: Path, lines: list[tuple[str, list[str] | None]], n: int) -> None:
    """One log object of prepared lines, in the file variant of position ``n`` (as
    ``loggen.write_file``: the old 15 fields, reordered columns, CRLF)."""
    names, order = list(loggen.FIELDS), list(range(len(loggen.FIELDS)))
    if n % 5 == 4:
        names, order = names[:15], order[:15]
    elif n % 7 == 6:
        random.Random(n).shuffle(order)
        names = [loggen.FIELDS[i] for i in order]
    eol = "\r\n" if n % 4 == 3 else "\n"
    out = [f"#Version: 1.0{eol}#Fields: {' '.join(names)}{eol}"]
    for kind, fields in lines:
        if fields is None:
            out.append(eol)
        elif kind == "drop_column":
            out.append("\t".join([fields[i] for i in order[:-1]]) + eol)
        else:
            out.append("\t".join([fields[i] for i in order]) + eol)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(loggen.gzip.compress("".join(out).encode(), 6))


def generate_split(
    legacy_dir: Path | None,
    logs_dir: Path,
    start: dt.date,
    days: int,
    split: dt.date | None,
    files_per_day: int = 6,
    lines_per_file: int = 200,
    seed: int = 1,
    packages: list[tuple[str, str]] | None = None,
) -> SplitCorpus:
    """The requests of ``days`` days from ``start`` (``loggen.Generator``, hour by hour):
    those dated before ``split`` as legacy rows under ``legacy_dir`` (one file per year),
    the others as log objects under ``logs_dir``. ``split`` None: everything as logs (the
    unsplit corpus). Log objects hold only lines dated on or after ``split`` and are named
    for hours on or after it, so the log side is right whether the log ETL honours
    ``etl/logs_since`` or not. Malformed lines go where their hour is."""
    packages = packages if packages is not None else loggen.read_packages()
    gen = loggen.Generator(seed, packages)
    acc = loggen._Acc(set(packages))
    dress_rng = random.Random(seed * 7919 + 1)  # its own: the requests do not depend on it
    names = sorted({p for p, _ in packages})
    corpus = SplitCorpus(loggen.Truth())
    legacy = LegacyDir(legacy_dir) if legacy_dir is not None and split is not None else None
    first_hour = dt.datetime(split.year, split.month, split.day) if split else None
    by_file: dict[dt.datetime, list[tuple[str, list[str] | None]]] = defaultdict(list)
    step = 24 // max(1, min(24, files_per_day))
    for d in range(days):
        day = start + dt.timedelta(days=d)
        for h in range(0, 24, step)[:files_per_day]:
            hour = dt.datetime(day.year, day.month, day.day, h)
            for _ in range(lines_per_file):
                kind, fields, counted = gen.make(hour, acc)
                corpus.truth.lines += 1
                corpus.truth.counted += counted
                dated = None
                if fields is not None and kind not in ("malformed", "drop_column"):
                    dated = dt.date.fromisoformat(fields[0])
                before = split is not None and (dated or hour.date()) < split
                if before:
                    assert legacy is not None
                    year, values = legacy_values(kind, fields, hour, dress_rng, names)
                    legacy.add(year, values)
                    corpus.legacy_rows += 1
                    corpus.counted_legacy += counted
                    if counted:
                        corpus.clients_legacy.add(fields[4])  # type: ignore[index]
                else:
                    target = max(hour, first_hour) if first_hour else hour
                    by_file[target].append((kind, fields))
                    corpus.log_lines += 1
                    corpus.counted_logs += counted
                    if counted:
                        corpus.clients_logs.add(fields[4])  # type: ignore[index]
    acc.fill(corpus.truth)
    if legacy is not None:
        corpus.legacy_files = legacy.close()
    name_rng = random.Random(seed)
    for n, (hour, lines) in enumerate(sorted(by_file.items())):
        name = loggen.file_name(hour, name_rng)
        write_log(logs_dir / name, lines, n)
        corpus.log_files.append(name)
    corpus.truth.files = list(corpus.log_files)
    return corpus


# --- big and long histories, fast (benchmark, demo) ------------------------------------------


def zipf_weights(n: int, s: float) -> list[float]:
    """Cumulative weights of ranks 1..n under a Zipf law of exponent ``s``."""
    return list(itertools.accumulate(1.0 / (r**s) for r in range(1, n + 1)))


def by_popularity(packages: list[tuple[str, str]], seed: int) -> list[tuple[str, str]]:
    """The packages, most popular first: seeded, not alphabetical, software before data
    (the n-th software package about as popular as the 1.5 n-th annotation one)."""
    pk = list(packages)
    random.Random(seed).shuffle(pk)
    factor = {"bioc": 1.0, "annotation": 1.5, "experiment": 3.0, "workflows": 4.0}
    rank: dict[str, int] = {}
    keyed = []
    for p in pk:
        rank[p[1]] = rank.get(p[1], 0) + 1
        keyed.append((rank[p[1]] * factor.get(p[1], 4.0), len(keyed), p))
    return [p for *_, p in sorted(keyed)]


def weighted(packages: list[tuple[str, str]], s: float, seed: int) -> list[tuple[str, str]]:
    """The packages repeated by their Zipf weight (the least popular once): a list that
    ``random.choice`` (loggen.Generator) draws from with the spread of generate_history."""
    pk = by_popularity(packages, seed)
    n = len(pk)
    return [p for r, p in enumerate(pk, 1) for _ in range(max(1, round((n / r) ** s)))]


class _SinceAcc:
    """Passes to an accumulator of the truth (``loggen._Acc``) the requests dated on or after
    a day only (the others are not written)."""

    def __init__(self, acc: loggen._Acc, since: dt.date | None) -> None:
        self.acc, self.since = acc, since

    def add(self, cat: str, pkg: str, when: dt.datetime, ip: str) -> None:
        if self.since is None or when.date() >= self.since:
            self.acc.add(cat, pkg, when, ip)


def generate_logs(
    out: Path,
    start: dt.date,
    days: int,
    files_per_day: int,
    lines_per_file: int,
    seed: int,
    packages: list[tuple[str, str]],
    acc: loggen._Acc | None = None,
    since: dt.date | None = None,
) -> HistoryStats:
    """CloudFront logs as ``loggen.generate`` writes them (the same file variants), with the
    truth collected into ``acc``; lines dated before ``since`` are left out (the history
    holds those days), so the logs are right whether the log ETL honours
    ``etl/logs_since`` or not."""
    gen = loggen.Generator(seed, packages)
    name_rng = random.Random(seed)
    sink = _SinceAcc(acc, since) if acc is not None else None
    stats = HistoryStats()
    step = 24 // max(1, min(24, files_per_day))
    n = 0
    for d in range(days):
        day = start + dt.timedelta(days=d)
        for h in range(0, 24, step)[:files_per_day]:
            hour = dt.datetime(day.year, day.month, day.day, h)
            lines = []
            for _ in range(lines_per_file):
                kind, fields, counted = gen.make(hour, sink)  # type: ignore[arg-type]
                dated = fields is not None and kind not in ("malformed", "drop_column")
                if since is not None and dated and fields[0] < since.isoformat():  # type: ignore[index]
                    continue
                lines.append((kind, fields))
                stats.rows += 1
                stats.downloads += counted
            target = out / loggen.file_name(hour, name_rng)
            write_log(target, lines, n)
            stats.files.append(target)
            n += 1
    return stats


@dataclass
class HistoryStats:
    """What :func:`generate_history` wrote."""

    files: list[Path] = field(default_factory=list)
    rows: int = 0
    downloads: int = 0  # counted by the rule, known package or not


# Row kinds of the fast generator and their weights; only "download" counts.
FAST_KINDS = (
    ("download", 64), ("page", 14), ("head", 4), ("bad_status", 7), ("archive", 2),
    ("unknown_pkg", 2), ("invalid_name", 1), ("post", 1), ("malformed", 1),
)  # fmt: skip


def generate_history(
    out: Path,
    start: dt.date,
    end: dt.date,
    rows_per_day: int | Sequence[int] | Callable[[dt.date], int],
    seed: int = 1,
    packages: list[tuple[str, str]] | None = None,
    clients: int = 20_000,
    package_s: float = 1.1,
    client_s: float = 0.9,
    acc: loggen._Acc | None = None,
) -> HistoryStats:
    """Legacy databases for the days [start, end): ``rows_per_day`` rows a day (or a list
    of per-year values starting with ``start``'s year, or a function of the day); packages
    and clients drawn with a Zipf-like spread (a few packages take most downloads, a long
    tail has a handful); rows in time order. ``acc``: collects the truth (slower)."""
    rng = random.Random(seed)
    packages = packages if packages is not None else loggen.read_packages()
    pk = by_popularity(packages, seed)
    pk_cw = zipf_weights(len(pk), package_s)
    pool = [
        ".".join(str(rng.randint(1, 223 if i == 0 else 254)) for i in range(4))
        if n % 5
        else f"2001:db8:{rng.randint(0, 0xFFFF):x}::{rng.randint(1, 0xFFFF):x}"
        for n in range(clients)
    ]
    ip_cw = zipf_weights(clients, client_s)
    names = [p for p, _ in pk]
    urls: dict[tuple[str, str], list[str]] = {}
    for pkg, cat in pk:  # a handful of files per package: versions and platforms
        base = f"/packages/{{}}/{loggen.REPO[cat]}"
        h = zlib.crc32(pkg.encode())
        urls[(pkg, cat)] = [
            base.format(v) + f"/src/contrib/{pkg}_{h % 3}.{h % 40 + i}.0.tar.gz"
            for i, v in enumerate(("release", "devel", "3.16", "3.18"))
        ] + [
            base.format("release") + f"/bin/windows/contrib/4.3/{pkg}_{h % 3}.{h % 40}.0.zip",
            base.format("release") + f"/bin/macosx/contrib/4.3/{pkg}_{h % 3}.{h % 40}.0.tgz",
        ]
    kinds = [k for k, _ in FAST_KINDS]
    kind_cw = list(itertools.accumulate(w for _, w in FAST_KINDS))
    agents = ["R (4.3.1 x86_64-pc-linux-gnu)", "R (4.4.0 aarch64-apple-darwin20)", "curl/8.5.0"]
    stats = HistoryStats()
    writer = LegacyDir(out)
    day = start
    while day < end:
        if isinstance(rows_per_day, int):
            n = rows_per_day
        elif callable(rows_per_day):
            n = rows_per_day(day)
        else:
            n = rows_per_day[day.year - start.year]
        dstr, off = day_string(day), utc_offset(day)
        secs = sorted(rng.randrange(86400) for _ in range(n))
        ks = rng.choices(kinds, cum_weights=kind_cw, k=n)
        ps = rng.choices(pk, cum_weights=pk_cw, k=n)
        ips = rng.choices(pool, cum_weights=ip_cw, k=n)
        rs = [rng.random() for _ in range(n)]
        for i in range(n):
            kind, (pkg, cat), ip, r = ks[i], ps[i], ips[i], rs[i]
            method, status, counted = "GET", "200", False
            url = urls[(pkg, cat)][int(r * 1e6) % 6]
            if kind == "download":
                counted = True
                status = "302" if r < 0.02 else "200"
            elif kind == "page":
                url = loggen.PAGES[int(r * 1e6) % len(loggen.PAGES)]
            elif kind == "head":
                method = "HEAD"
            elif kind == "post":
                method = "POST"
            elif kind == "bad_status":
                status = ("404", "304", "206", "500")[int(r * 1e6) % 4]
            elif kind == "archive":
                repo = loggen.REPO[cat]
                url = f"/packages/release/{repo}/src/contrib/Archive/{pkg}/{pkg}_1.0.tar.gz"
            elif kind == "unknown_pkg":
                url = url.replace(f"/{pkg}_", "/Unknownpkg9_")
                counted = True  # stored, never reported
            elif kind == "invalid_name":
                url = url.replace(f"/{pkg}_", "/1abc_")
            if r < 0.08:
                ip_logged = f"{ip}, {PROXIES[int(r * 1e3) % 4]}"
            else:
                ip_logged = ip
            if 0.5 < r < 0.53:
                url = HOSTS[int(r * 1e6) % 3] + url
            elif 0.6 < r < 0.62:
                url += QUERIES[int(r * 1e6) % 4]
            row_day, row_ips, row_status = dstr, ip_logged, status
            if kind == "malformed":
                row_ips, row_day, row_status = malformed_row(day, rng)
            t = secs[i]
            when = f"{t // 3600:02d}:{t // 60 % 60:02d}:{t % 60:02d}"
            values = (
                row_ips, row_day, row_day[3:] if row_day else None, when, off, method, url,
                "HTTP/1.1", row_status, 5000 + int(r * 1e6), "-", agents[i % 3], None, cat,
                "3.18", pkg if r < 0.97 else names[int(r * 1e7) % len(names)], None, None,
            )  # fmt: skip
            writer.add(day.year, values)
            if counted:
                stats.downloads += 1
                if acc is not None and kind == "download":  # (not Unknownpkg9's)
                    acc.add(cat, pkg, dt.datetime(day.year, day.month, day.day), ip)
        stats.rows += n
        day += dt.timedelta(days=1)
    stats.files = writer.close()
    return stats


def main(argv: list[str] | None = None) -> None:
    """Command line: a split corpus (legacy rows before --split, logs after) and its truth."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--legacy", type=Path, required=True)
    ap.add_argument("--logs", type=Path, required=True)
    ap.add_argument("--start", type=dt.date.fromisoformat, default=dt.date(2019, 12, 28))
    ap.add_argument("--days", type=int, default=20)
    ap.add_argument("--split", type=dt.date.fromisoformat, default=dt.date(2020, 1, 10))
    ap.add_argument("--files-per-day", type=int, default=6)
    ap.add_argument("--lines-per-file", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--truth", type=Path)
    args = ap.parse_args(argv)
    corpus = generate_split(
        args.legacy, args.logs, args.start, args.days, args.split, args.files_per_day,
        args.lines_per_file, args.seed,
    )  # fmt: skip
    if args.truth:
        args.truth.write_text(json.dumps(corpus.truth.to_json()) + "\n")
    print(
        f"{corpus.legacy_rows} legacy rows in {len(corpus.legacy_files)} files, "
        f"{corpus.log_lines} log lines in {len(corpus.log_files)} files"
    )


if __name__ == "__main__":
    main()
