"""The C per-line loop (bioc_webstats._scan) against the Python one: the same counts, line
counts, reasons, records and errors on generated logs and on randomly damaged ones."""

from __future__ import annotations

import datetime as dt
import gzip
import random
import struct

import pytest

import loggen
from bioc_webstats.etl import parse, rule, sources

HOUR = dt.datetime(2024, 1, 30, 12)


def both(data: bytes, hour: dt.datetime = HOUR, monkeypatch=None, floor=None):
    """(native, python) results of count_object on DATA, or the LogFormatError texts."""
    out = []
    for force in (False, True):
        monkeypatch.setattr(parse, "_FORCE_PYTHON", force)
        try:
            out.append(parse.count_object([data], hour, floor))
        except sources.LogFormatError as exc:
            out.append(f"LogFormatError: {exc}")
    return out


def same(a, b) -> None:
    if isinstance(a, str) or isinstance(b, str):
        assert a == b
        return
    assert (a.lines_read, a.accepted, a.rejected) == (b.lines_read, b.accepted, b.rejected)
    assert a.reject_reasons == b.reject_reasons
    assert a.counts == b.counts
    assert a.max_day == b.max_day


def copy_rows(copy_data: bytes, copy_format: str, object_id: int = 7) -> list[tuple]:
    """The rows PostgreSQL's COPY reads from an ObjectRecords' data (decoded here, from the
    format's definition: a tests' own reading of both formats)."""
    data = parse.with_object_id(copy_data, copy_format, object_id)
    if copy_format == "text":
        return sorted(
            (c, p, dt.date.fromisoformat(d), int(h), int(n), int(o))
            for c, p, d, h, n, o in (ln.decode().split("\t") for ln in data.splitlines())
        )
    assert data[:11] == b"PGCOPY\n\xff\r\n\x00" and data[11:19] == bytes(8)
    rows, at = [], 19
    while True:
        (nf,) = struct.unpack_from(">h", data, at)
        at += 2
        if nf == -1:
            break
        values = []
        for _ in range(nf):
            (n,) = struct.unpack_from(">i", data, at)
            values.append(data[at + 4 : at + 4 + n])
            at += 4 + n
        c, p, d, h, n, o = values
        day = dt.date(2000, 1, 1) + dt.timedelta(days=struct.unpack(">i", d)[0])
        rows.append((c.decode(), p.decode(), day, *struct.unpack(">q", h),
                     *struct.unpack(">i", n), *struct.unpack(">q", o)))  # fmt: skip
    assert at == len(data)
    return sorted(rows)


def records_both(data: bytes, hour: dt.datetime, monkeypatch, floor=None):
    hasher = rule.ip_hasher(b"test key")
    out = []
    for force in (False, True):
        monkeypatch.setattr(parse, "_FORCE_PYTHON", force)
        rec = parse.count_records([data], hour, hasher, floor)
        out.append(rec)
    a, b = out
    assert (a.copy_format, b.copy_format) == ("binary", "text")
    assert copy_rows(a.copy_data, "binary") == copy_rows(b.copy_data, "text")
    assert (a.max_day, a.reject_reasons) == (b.max_day, b.reject_reasons)
    assert (a.lines_read, a.accepted, a.rejected) == (b.lines_read, b.accepted, b.rejected)
    return a


def test_the_c_scanner_is_built():
    assert parse._scan is not None and parse.parser_name() == "native"


def test_generated_logs_every_variant(tmp_path, monkeypatch):
    """Old 15-field files, reordered columns, CRLF, other-hour lines, malformed lines."""
    truth = loggen.generate(tmp_path, days=1, files_per_day=12, lines_per_file=400, seed=11)
    accepted = 0
    for key in truth.files:
        data = (tmp_path / key).read_bytes()
        hour = sources.parse_name(key)
        a, b = both(data, hour, monkeypatch)
        same(a, b)
        accepted += a.accepted
        rec = records_both(data, hour, monkeypatch)
        assert rec.accepted == a.accepted
        rows = copy_rows(rec.copy_data, rec.copy_format)
        assert sum(r[4] for r in rows) == a.accepted
        assert len(rows) == len(a.counts)
    assert accepted == truth.counted


def _summed(rows) -> dict:
    out: dict = {}
    for c, p, d, h, n, _ in rows:
        out[c, p, d, h] = out.get((c, p, d, h), 0) + n
    return out


@pytest.mark.parametrize("parser", ["native", "python"])
def test_records_past_the_bound_are_spilled_and_sum_to_the_same(tmp_path, monkeypatch, parser):
    """Past SPILL_BYTES of counts (or HITS_MAX packages) the records so far go to ``spill``
    and are forgotten: the parts together hold the same downloads per (package, day, client)."""
    truth = loggen.generate(tmp_path, days=1, files_per_day=2, lines_per_file=3000, seed=5)
    hasher = rule.ip_hasher(b"test key")
    monkeypatch.setattr(parse, "_FORCE_PYTHON", parser == "python")
    monkeypatch.setattr(sources, "OUT_MAX", 8192)  # many pieces: a bound is checked per piece
    for key in truth.files:
        data, hour = (tmp_path / key).read_bytes(), sources.parse_name(key)
        whole = parse.count_records([data], hour, hasher, spill=lambda _: pytest.fail("spilled"))
        with monkeypatch.context() as m:
            m.setattr(parse, "SPILL_BYTES", 4096)
            m.setattr(parse, "HITS_MAX", 3)
            parts: list[bytes] = []
            rec = parse.count_records([data], hour, hasher, spill=parts.append)
        assert len(parts) > 5
        rows = [r for part in (*parts, rec.copy_data) for r in copy_rows(part, rec.copy_format)]
        assert len(rows) > len(copy_rows(whole.copy_data, whole.copy_format))
        assert _summed(rows) == _summed(copy_rows(whole.copy_data, whole.copy_format))
        assert (rec.lines_read, rec.accepted, rec.rejected, rec.max_day, rec.reject_reasons) == (
            whole.lines_read, whole.accepted, whole.rejected, whole.max_day, whole.reject_reasons
        )  # fmt: skip
        assert rec.accepted == sum(r[4] for r in rows) > 0


def _damaged(rng: random.Random, n: int) -> bytes:
    """A log object whose lines are randomly damaged in the ways that matter to a parser."""
    fields = list(loggen.FIELDS)
    eol = rng.choice(["\n", "\r\n"])
    out = [f"#Version: 1.0{eol}#Fields: {' '.join(fields)}{eol}"]
    for _ in range(n):
        kw = {}
        r = rng.random()
        if r < 0.1:
            kw["time"] = rng.choice(
                ["24:00:00", "23:60:00", "23:59:60", "1:02:03", "12:0:02", "ab:cd:ef", "12-00-00",
                 "12:00:00 ", "", "-", "99:99:99", "00:00:00", "23:59:59", "12:00:0\x00"]
            )  # fmt: skip
        elif r < 0.2:
            kw["date"] = rng.choice(
                ["2024-13-01", "2024-02-30", "2024-1-30", "20240130xx", "", "-", "2024-01-27",
                 "2024-02-01", "2024-02-02", "2024-01-28", "0000-00-00", "2024/01/30",
                 "2024-01-30" * 50]
            )  # fmt: skip
        elif r < 0.3:
            kw["status"] = rng.choice(
                ["-", "", "abc", "2OO", "0200", "200 ", "304", "99999", "2" * 300, "9" * 257]
            )
        elif r < 0.35:
            kw["ip"] = rng.choice(
                ["-", "", " ", "192.0.2.1", "2001:db8::" + "f" * 40, "1" * 64, "1" * 65,
                 "x" * 5000]
            )  # fmt: skip
        elif r < 0.4:
            kw["method"] = rng.choice(["HEAD", "get", "GET ", "POST", ""])
        elif r < 0.5:
            kw["uri"] = rng.choice(
                ["/packages/3.18/bioc/src/contrib/Archive/x/x_1.tar.gz", "//packages//3.18/bioc/"
                 "src//contrib/limma_3.58.1.tar.gz", "/packages/3.18/bioc/src/contrib/a_1.tar.gz",
                 "/index.html", "", "/packages/3.18/bioc/bin/windows/contrib/4.3/cn.mops_1.zip",
                 "/packages/3.18/bioc/src/contrib/limma_" + "9" * 300 + ".tar.gz",
                 "/packages/3.18/bioc/src/contrib/limma_" + "9" * 8200 + ".tar.gz",
                 "/packages/" + "d/" * 4080 + "bioc/src/contrib/limma_1.tar.gz"]
            )  # fmt: skip
        else:
            kw["ip"] = f"10.0.{rng.randrange(4)}.{rng.randrange(30)}"
            kw["uri"] = (
                f"/packages/{rng.choice(['3.18', 'release', 'devel'])}/"
                f"{rng.choice(['bioc', 'data/annotation', 'workflows'])}/src/contrib/"
                f"{rng.choice(['limma', 'ALL', 'affy', 'unknownpkg'])}_1.{rng.randrange(3)}.tar.gz"
            )
            kw["time"] = f"{rng.randrange(24):02d}:{rng.randrange(60):02d}:00"
        text = loggen.log_line(**kw)
        d = rng.random()
        if d < 0.03:
            text = text[: rng.randrange(len(text) + 1)]  # cut anywhere
        elif d < 0.05:
            text = text.replace("\t", "", 1)
        elif d < 0.07:
            text += "\t"
        elif d < 0.08:
            text = "#" + text  # a comment with the right column count is a data line
        elif d < 0.09:
            text = rng.choice(["", " ", "\t \t", "#comment", "\r", "\x0b\x0c"])
        elif d < 0.095:  # a new layout half-way (columns reversed)
            fields.reverse()
            text = f"#Fields: {' '.join(fields)}"
        elif d < 0.10:
            text = "".join(rng.choice("ab\t:-/0123456789") for _ in range(rng.randrange(80)))
        if not text.startswith("#Fields") and fields[0] != loggen.FIELDS[0]:
            values = text.split("\t")
            if len(values) == len(fields):
                text = "\t".join(reversed(values))
        out.append(text + eol)
    if rng.random() < 0.5:
        out[-1] = out[-1].rstrip("\n")  # a last line without its line end
    return "".join(out).encode("utf-8", "surrogateescape")


@pytest.mark.parametrize("seed", range(25))
def test_damaged_logs(seed, monkeypatch):
    rng = random.Random(seed)
    data = gzip.compress(_damaged(rng, 400))
    # small decompressed pieces: lines cross piece boundaries everywhere
    monkeypatch.setattr(sources, "OUT_MAX", rng.choice([1, 7, 64, 333, 4096]))
    # every third seed with a cut-over day (etl/logs_since) among the damaged lines' dates
    floor = dt.date(2024, 1, 29) if seed % 3 == 0 else None
    a, b = both(data, HOUR, monkeypatch, floor)
    same(a, b)
    assert a.rejected > 0 and a.accepted > 0  # the test exercises both outcomes
    if floor is not None:
        assert all(day >= floor for (_, day, _) in a.counts)
    records_both(data, HOUR, monkeypatch, floor)


@pytest.mark.parametrize(
    "text",
    [
        b"",
        b"#Version: 1.0\n",
        b"data first\n#Fields: date time c-ip cs-method cs-uri-stem sc-status\n",
        b"#Fields: date time\n",
        b"\n\n  \n#Fields: date time c-ip cs-method cs-uri-stem sc-status\n",
        b"#Fields: date time c-ip cs-method cs-uri-stem sc-status",
    ],
)
def test_same_answer_for_objects_without_data(text, monkeypatch):
    a, b = both(gzip.compress(text), HOUR, monkeypatch)
    same(a, b)


def test_every_time_of_day(monkeypatch):
    """The C loop parses HH:MM:SS itself: the edges of the valid range count, their
    out-of-range neighbours are rejected, as in the Python loop's table."""
    edges = (0, 59, 60)
    times = [f"{h:02d}:{m:02d}:{s:02d}" for h in range(25) for m in edges for s in edges]
    lines = [loggen.log_line(time=t, ip=f"10.0.0.{i % 200}") for i, t in enumerate(times)]
    a, b = both(loggen.log_bytes(*lines), HOUR, monkeypatch)
    same(a, b)
    assert a.accepted == 24 * 2 * 2 and a.reject_reasons == {"date/time": len(times) - 96}


def test_a_scanner_needs_an_object():
    scanner = parse._scanner()
    with pytest.raises(RuntimeError, match="no object begun"):
        scanner.feed(b"x\n")
    with pytest.raises(RuntimeError, match="no object begun"):
        scanner.finish()


def test_records_follow_the_hash_key(monkeypatch):
    """The C side caches client hashes per hash function: another key gives other hashes."""
    data = loggen.log_bytes(loggen.log_line())
    one = parse.count_records([data], HOUR, rule.ip_hasher(b"one"))
    two = parse.count_records([data], HOUR, rule.ip_hasher(b"two"))
    assert one.copy_data != two.copy_data
    expected = rule.ip_hasher(b"two")(b"192.0.2.1")
    rows = copy_rows(two.copy_data, two.copy_format, object_id=123)
    assert rows == [("bioc", "limma", dt.date(2024, 1, 30), expected, 1, 123)]


def test_with_object_id_refuses_what_it_did_not_make():
    good = parse.count_records([loggen.log_bytes(loggen.log_line())], HOUR, hash)
    assert good.copy_format == "binary"
    for bad in (b"", b"bioc\tlimma\n", good.copy_data[:-1], good.copy_data + b"x",
                good.copy_data[:19] + b"\x00\x05" + good.copy_data[21:]):  # fmt: skip
        with pytest.raises(ValueError, match="COPY data"):
            parse.with_object_id(bad, "binary", 1)


@pytest.mark.parametrize("eol", ["\n", "\r\n"])
@pytest.mark.parametrize("out_max", [1, 97, 4096])
def test_overlong_lines_are_malformed_and_not_kept(eol, out_max, monkeypatch):
    """A line longer than MAX_LINE (line end excluded) is one malformed line, whatever its
    columns, and only MAX_LINE + 2 bytes of it are ever held (both loops)."""
    monkeypatch.setattr(sources, "MAX_LINE", 600)  # the #Fields line is 400-odd bytes
    monkeypatch.setattr(parse, "_SCANNER", [])  # a scanner made with this limit
    monkeypatch.setattr(sources, "OUT_MAX", out_max)
    base = loggen.log_line()

    def of_length(n: int) -> str:  # a valid download line of exactly n bytes
        pad = n - len(base)
        return base.replace("\t-\t", "\t" + "u" * (pad + 1) + "\t", 1)

    lines = [of_length(n) for n in (599, 600, 601, 602, 5000)]
    assert [len(x) for x in lines] == [599, 600, 601, 602, 5000]
    a, b = both(loggen.log_bytes(*lines, eol=eol), HOUR, monkeypatch)
    same(a, b)
    assert (a.lines_read, a.accepted, a.reject_reasons) == (5, 2, {"column count": 3})
    # an object that is one long line without a line end (after the headers)
    tail = gzip.compress(f"#Fields: {' '.join(loggen.FIELDS)}\n".encode() + b"x\t" * 50_000)
    a, b = both(tail, HOUR, monkeypatch)
    same(a, b)
    assert (a.lines_read, a.rejected) == (1, 1)
    got = [x for batch in sources.line_batches([tail]) for x in batch]
    assert got[-1] == sources._OVERLONG and all(len(x) <= sources.MAX_LINE for x in got)


def test_overlong_line_before_the_header_is_a_data_line(monkeypatch):
    monkeypatch.setattr(sources, "MAX_LINE", 100)
    monkeypatch.setattr(parse, "_SCANNER", [])
    text = b"#" + b"c" * 200 + b"\n#Fields: date time c-ip cs-method cs-uri-stem sc-status\n"
    a, b = both(gzip.compress(text), HOUR, monkeypatch)
    same(a, b)
    assert a == "LogFormatError: no #Fields line before the first data line"


def test_byte_bounds_are_the_same_in_c_and_python():
    scan = parse._scan
    assert (scan.MAX_URI, scan.MAX_IP, scan.KEY_CACHE_MAX) == (
        rule.MAX_URI, rule.MAX_IP, rule.KEY_CACHE_MAX,
    )  # fmt: skip
    assert scan.N_REASONS == len(rule.REASONS)


def test_long_values_are_malformed_before_any_cache(monkeypatch):
    """A URI or client longer than a download's can be is a malformed line (both loops), and
    nothing longer than KEY_CACHE_MAX is kept in a process-wide cache."""
    ok = "/packages/3.18/bioc/src/contrib/limma_1.0.tar.gz"
    long_ok = "/packages/3.18/bioc/src/contrib/limma_" + "1" * 400 + ".tar.gz"  # cached: no
    lines = [
        loggen.log_line(uri=ok),
        loggen.log_line(uri=long_ok),
        loggen.log_line(uri=ok + "x" * rule.MAX_URI),
        loggen.log_line(uri=ok, ip="1" * (rule.MAX_IP + 1)),
        loggen.log_line(uri=ok, status="2" * 300),
    ]
    monkeypatch.setattr(parse, "_URIS", {})
    monkeypatch.setattr(parse, "_DIRS", {})
    monkeypatch.setattr(parse, "_FILES", {})
    monkeypatch.setattr(parse, "_SCANNER", [])
    a, b = both(loggen.log_bytes(*lines), HOUR, monkeypatch)
    same(a, b)
    assert a.accepted == 2
    # (a status of 300 digits is no status: malformed, as a non-numeric one)
    assert a.reject_reasons == {"cs-uri-stem too long": 1, "c-ip": 1, "status": 1}
    assert max(map(len, parse._URIS)) <= rule.KEY_CACHE_MAX
    assert max(map(len, parse._FILES)) <= rule.KEY_CACHE_MAX


SPILL_PROBE = """
import re, sys
from bioc_webstats.etl import ingest, sources
(obj,), _ = sources.open_source(sys.argv[1]).list()
ingest._init_worker(sys.argv[1], b"k", False)  # as the ETL's parse workers do
res = ingest._parse(obj)
hwm = re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read())[1]
print(res.accepted, int(getattr(res, "spool", None) is not None), int(hwm) // 1024)
"""


def _gz_lines(lines) -> bytes:
    import zlib

    c = zlib.compressobj(1, zlib.DEFLATED, 31)
    head = f"#Version: 1.0\n#Fields: {' '.join(loggen.FIELDS)}\n".encode()
    return b"".join([c.compress(head), *(c.compress(ln.encode() + b"\n") for ln in lines),
                     c.flush()])  # fmt: skip


MILLION = 1_000_000


@pytest.fixture(scope="module")
def hostile_objects(tmp_path_factory) -> dict:
    """A small object, and two of a million downloads: by distinct IPv6 clients, and of
    distinct 190-character package names (about 3 MB of gzip each)."""
    ok = "/packages/3.18/bioc/src/contrib/limma_3.58.1.tar.gz"
    objects = {
        "small": _gz_lines(loggen.log_line(ip=f"2001:db8::{i:x}") for i in range(100)),
        "clients": _gz_lines(
            loggen.log_line(uri=ok, ip=f"2001:db8:{i >> 16:x}:{i & 0xFFFF:x}:abcd:ef01:2345:6789")
            for i in range(MILLION)
        ),
        "packages": _gz_lines(
            loggen.log_line(uri=f"/packages/3.18/bioc/src/contrib/P{i:08d}{'x' * 180}_1.0.tar.gz")
            for i in range(MILLION)
        ),
        # short client values, 190-character names: records far larger than the counts
        "longnames": _gz_lines(
            loggen.log_line(
                uri=f"/packages/3.18/bioc/src/contrib/P{i % 100:02d}{'x' * 188}_1.0.tar.gz",
                ip=f"{i:x}",
            )
            for i in range(MILLION)
        ),
        # a distinct date on every line (valid ones from 1000-01-01 on: four in the window)
        "dates": _gz_lines(
            loggen.log_line(uri=ok, date=(dt.date(1000, 1, 1) + dt.timedelta(i)).isoformat())
            for i in range(MILLION)
        ),
    }
    assert len(objects["packages"]) < 8 << 20  # a few MB on the wire
    out = tmp_path_factory.mktemp("hostile")
    for name, data in objects.items():  # one log source (a directory) each
        (out / name).mkdir()
        (out / name / f"E1.2024-01-30-12.{name}.gz").write_bytes(data)
    return {name: out / name for name in objects}


@pytest.mark.parametrize("parser", ["native", "python"])
def test_an_object_of_a_million_distinct_clients_or_packages_keeps_memory_bounded(
    hostile_objects, parser, tmp_path
):
    """A parse worker hands the counts on as records past the bound, through a spool file,
    and stays within 100 MB of a small object's peak (before: 280-450 MB for the clients,
    2 GB for the packages, 200 MB for the long names: parts of 74 MB; 160-350 MB for the
    dates, every one of them kept)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "WEBSTATS_ETL_PARSER": "python" if parser == "python" else ""}
    env["TMPDIR"] = str(tmp_path)  # where the spool files go
    peaks, spooled = {}, {}
    for name, path in hostile_objects.items():
        out = subprocess.run(
            [sys.executable, "-c", SPILL_PROBE, str(path)],
            env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        accepted, spooled[name], peaks[name] = map(int, out.stdout.split())
        downloads = {"small": 100, "dates": 4}.get(name, MILLION)  # (2024-01-28 … 31)
        assert accepted == downloads  # every download counted
    for name in ("clients", "packages", "longnames", "dates"):
        assert peaks[name] - peaks["small"] < 100, peaks  # MB
    assert spooled == {"small": 0, "clients": 1, "packages": 1, "longnames": 1, "dates": 0}


MEMORY_PROBE = """
import datetime as dt, re, sys
from bioc_webstats.etl import parse
data = open(sys.argv[1], "rb").read()
res = parse.count_object([data[i : i + (1 << 20)] for i in range(0, len(data), 1 << 20)],
                         dt.datetime(2024, 1, 30, 12))
# VmHWM: the peak of this program (ru_maxrss would include the forking test process's)
hwm = re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read())[1]
print(res.lines_read, int(hwm) // 1024)
"""


@pytest.mark.parametrize("parser", ["native", "python"])
def test_hostile_long_values_keep_memory_flat(tmp_path, parser):
    """2,000 distinct 128 KiB URIs and 2,000 distinct 4 KiB client values (a 256 MB log that
    gzips to a few MB): the parse process stays within 80 MB of a small log's peak."""
    import os
    import subprocess
    import sys
    import zlib

    def gz(lines) -> bytes:
        c = zlib.compressobj(1, zlib.DEFLATED, 31)
        head = f"#Version: 1.0\n#Fields: {' '.join(loggen.FIELDS)}\n".encode()
        out = [c.compress(head)]
        out += [c.compress(line.encode() + b"\n") for line in lines]
        out.append(c.flush())
        return b"".join(out)

    ok = "/packages/3.18/bioc/src/contrib/limma_%d.tar.gz"
    small = gz(loggen.log_line(uri=ok % i) for i in range(100))
    hostile = gz(
        [loggen.log_line(uri=ok % i + "x" * (128 << 10)) for i in range(2000)]
        + [loggen.log_line(uri=ok % 1, ip=f"{i:08d}" + "1" * 4096) for i in range(2000)]
    )
    peaks = []
    env = {**os.environ, "WEBSTATS_ETL_PARSER": "python" if parser == "python" else ""}
    for name, data in (("small", small), ("hostile", hostile)):
        path = tmp_path / f"{name}.gz"
        path.write_bytes(data)
        out = subprocess.run(
            [sys.executable, "-c", MEMORY_PROBE, str(path)],
            env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        lines, peak = map(int, out.stdout.split())
        assert lines == (100 if name == "small" else 4000)  # every line was read
        peaks.append(peak)
    assert len(hostile) < 8 << 20  # a few MB on the wire
    assert peaks[1] - peaks[0] < 80, peaks  # MB
    assert peaks[0] < 100, peaks
