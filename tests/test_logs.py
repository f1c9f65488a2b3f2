"""parse.py: object names, the download rule, malformed lines, gzip failures, #Fields mapping."""

from __future__ import annotations

import datetime as dt
import gzip
import re

import pytest

import loggen
from bioc_webstats.etl import parse, rule, sources

HOUR = dt.datetime(2024, 1, 30, 12)
F33 = loggen.FIELDS  # the tests' own copy of the format (independent of the code)


@pytest.fixture(autouse=True, params=["native", "python"])
def parser(request, monkeypatch):
    """Every test here runs on both per-line loops: the C one (_scan) and the Python one."""
    monkeypatch.setattr(parse, "_FORCE_PYTHON", request.param == "python")
    assert parse.parser_name() == request.param  # the C scanner is built in the test venv
    return request.param


def line(fields=F33, **kw):
    return loggen.log_line(fields=fields, **kw)


def gz(*lines: str, fields=F33, eol="\n", header=True) -> bytes:
    return loggen.log_bytes(*lines, fields=fields, eol=eol, header=header)


def count(data: bytes, hour=HOUR) -> parse.ObjectCounts:
    return parse.count_object([data], hour)


def downloads(res: parse.ObjectCounts) -> dict:
    return {(c, p, d.isoformat(), ip.decode()): n for ((c, p), d, ip), n in res.counts.items()}


def test_parse_name():
    assert sources.parse_name("E1TVLJONPTUXV3.2023-09-17-00.0129f869.gz") == dt.datetime(
        2023, 9, 17, 0
    )
    assert sources.parse_name("E1/2023-09-17/E1.2023-09-17-23.ab.gz") == dt.datetime(
        2023, 9, 17, 23
    )
    for bad in (
        "E1.2023-09-17-24.ab.gz",
        "E1.2023-02-30-01.ab.gz",
        "E1.2023-09-17.ab.gz",
        "E1.2023-09-17-01.ab",
        "notes.txt",
        "E1.2023-09-17-01.gz",
        "E1.2023-09-17-01.ab.gz\n",  # ($ matched before a final newline)
        "E1.1989-12-31-23.ab.gz",  # outside the days a setting may name: ValidThru 0001-01-01
        "E1.0001-01-01-00.ab.gz",
        "E1.3000-01-01-00.ab.gz",
    ):
        assert sources.parse_name(bad) is None, bad


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("/packages/3.18/bioc/src/contrib/limma_3.58.1.tar.gz", ("bioc", "limma")),
        (
            "/packages/release/data/annotation/src/contrib/ag.db_3.2.3.tar.gz",
            ("annotation", "ag.db"),
        ),
        ("/packages/devel/data/experiment/src/contrib/ALL_1.44.0.tar.gz", ("experiment", "ALL")),
        (
            "/packages/3.20/workflows/src/contrib/rnaseqGene_1.30.0.tar.gz",
            ("workflows", "rnaseqGene"),
        ),
        ("/packages/3.18/bioc/bin/windows/contrib/4.3/cn.mops_1.48.0.zip", ("bioc", "cn.mops")),
        (
            "/packages/3.19/bioc/bin/macosx/big-sur-arm64/contrib/4.4/TReNA_1.0.tgz",
            ("bioc", "TReNA"),
        ),
        ("/packages/3.19/bioc/bin/macosx/contrib/4.4/trena_1.0.tar.gz", ("bioc", "trena")),
        ("//packages//3.18/bioc/src//contrib/limma_3.58.1.tar.gz", ("bioc", "limma")),
        ("/packages/3.18/bioc/src/contrib/Archive/limma/limma_3.0.tar.gz", None),
        ("/packages/3.18/bioc/src/contrib/limma_3.58.1.zip", None),
        ("/packages/3.18/bioc/src/contrib/PACKAGES", None),
        ("/packages/3.18/bioc/src/contrib/limma_.tar.gz", None),
        ("/packages/3.18/bioc/src/contrib/1abc_1.0.tar.gz", None),
        ("/packages/3.18/bioc/src/contrib/a_1.0.tar.gz", None),
        ("/packages/3.18/bioc/src/contrib/abc._1.0.tar.gz", None),
        ("/packages/3.18/bioc/src/contrib/a-b_1.0.tar.gz", None),
        ("/packages/3.18/data/src/contrib/x1_1.0.tar.gz", None),
        ("/packages/3.18/BIOC/src/contrib/limma_1.0.tar.gz", None),
        ("/packages/3.18/bioc/bin/contrib/4.3/limma_1.0.zip", None),
        ("/packages/3.18/bioc/bin/windows/contrib/4.3/x/limma_1.0.zip", None),
        ("/packages/bioc/src/contrib/limma_1.0.tar.gz", None),
        ("/packages/3.18/bioc/src/contrib/limma_1.0.tar.gz/x", None),
        ("/packages/3.18/bioc/src/contrib/limma%5F1.0.tar.gz", None),
        (f"/packages/3.18/bioc/src/contrib/A{'a' * 199}_1.0.tar.gz", ("bioc", "A" + "a" * 199)),
        # longer than download_records.package: PostgreSQL refused the COPY, every run
        (f"/packages/3.18/bioc/src/contrib/A{'a' * 200}_1.0.tar.gz", None),
    ],
)
def test_download_rule_paths(uri, expected):
    assert rule.classify_uri(uri.encode()) == expected
    # the parser's two cached halves and the one pattern Athena runs say the same
    m = re.fullmatch(rule.DOWNLOAD_PATTERN, re.sub("/+", "/", uri))
    assert (m is not None) == (expected is not None)
    if m:
        assert (m[2] or m[3]) == expected[1]


def test_method_status_and_counts():
    res = count(
        gz(
            line(),
            line(ip="2001:db8::1"),
            line(ip="192.0.2.1"),
            line(method="HEAD"),
            line(method="POST"),
            *(line(status=s) for s in ("206", "304", "403", "404", "500", "503")),
            *(line(status=s) for s in ("301", "302", "307", "308")),
            line(uri="/packages/3.18/bioc/html/limma.html"),
        )
    )
    assert res.rejected == 0
    assert res.lines_read == 16
    assert res.accepted == 7
    assert downloads(res) == {
        ("bioc", "limma", "2024-01-30", "192.0.2.1"): 6,
        ("bioc", "limma", "2024-01-30", "2001:db8::1"): 1,
    }


def test_malformed_lines_counted_not_fatal():
    res = count(
        gz(
            line(),
            line()[: line().rindex("\t")],  # one column short
            line() + "\textra",
            line(date="2024-13-01"),
            line(date="30/01/2024"),
            line(time="25:00:00"),
            line(time="12:0:02"),
            line(date="2024-01-27"),  # more than 48 h before the hour
            line(date="2024-02-02"),  # more than 48 h after
            line(status="-"),
            line(status="abc"),
            line(status="2" * 5000),  # int() refuses it: once, it stopped every run
            line(ip="-"),
            line(ip=""),
            "",
            "   ",
            line(date="2024-01-28", time="13:00:00"),  # 47 h before: fine, counts that day
        )
    )
    assert res.lines_read == 15
    assert res.rejected == 13
    assert res.accepted == 2
    assert res.reject_reasons == {
        "column count": 2,
        "date/time": 4,
        "timestamp more than 48 h from the object's hour": 2,
        "status": 3,
        "c-ip": 2,
    }
    assert set(downloads(res)) == {
        ("bioc", "limma", "2024-01-30", "192.0.2.1"),
        ("bioc", "limma", "2024-01-28", "192.0.2.1"),
    }


def test_fields_mapped_by_header_not_position():
    old = F33[:15]
    reordered = [*reversed(F33), "x-new-field"]
    res_old = count(gz(line(fields=old), fields=old))
    res_new = count(gz(line(fields=reordered), fields=reordered))
    assert (
        downloads(res_old)
        == downloads(res_new)
        == {("bioc", "limma", "2024-01-30", "192.0.2.1"): 1}
    )
    # a 33-field line in a 15-field file is malformed
    assert count(gz(line(), fields=old)).rejected == 1


def test_crlf_and_chunk_boundaries():
    data = gz(*(line(ip=f"192.0.2.{i}") for i in range(50)), eol="\r\n")
    whole = count(data)
    chunks = [data[i : i + 7] for i in range(0, len(data), 7)]
    split = parse.count_object(chunks, HOUR)
    assert whole.accepted == split.accepted == 50 and whole.rejected == split.rejected == 0
    assert downloads(whole) == downloads(split)


def test_multi_member_gzip_and_last_line_without_newline():
    a = gz(line())
    b = gzip.compress((line(ip="192.0.2.9")).encode())  # no final newline
    assert count(a + b).accepted == 2


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty file"),
        (b"this is not gzip at all\n", "not a valid gzip"),
        (gz(line(), line())[:-12], "truncated"),
        (gz(line()) + gz(line())[:-12], "truncated"),  # a second member cut short
        # after the last member: "truncated" and "Invalid gzip/zlib wrapper" before
        (gz(line()) + b"JUNKJUNK", "bytes after the end of the gzip data that are not gzip"),
        (gz(line()) + bytes(512), "bytes after the end of the gzip data that are not gzip"),
        (gz(line(), header=False), "no #Fields line before the first data line"),
        (gzip.compress(b"#Version: 1.0\n#Fields: date time\n", mtime=0), "lacks"),
    ],
)
def test_unreadable_objects(data, message):
    with pytest.raises(sources.LogFormatError, match=message):
        count(data)


@pytest.mark.parametrize("body", [b"", b"\n\n", b"#Version: 1.0\n"])
def test_an_object_without_a_data_line_is_empty_not_bad(body):
    """etl.md rejects a file with no #Fields line before its first data line: one with no
    data line is not such a file (it failed every run, and now would until it was gone)."""
    res = count(gzip.compress(body))
    assert (res.lines_read, res.accepted, res.rejected) == (0, 0, 0)


def test_garbage_lines_are_rejected_lines():
    res = count(gz("garbage", "\x00\x01", "more garbage\twith\ttabs"))
    assert (res.lines_read, res.rejected, res.accepted) == (3, 3, 0)


def test_ip_hash_is_keyed_and_64_bit():
    h1, h2 = rule.ip_hasher(b"k1"), rule.ip_hasher(b"k2")
    assert h1(b"192.0.2.1") == h1(b"192.0.2.1") != h2(b"192.0.2.1")
    assert h1(b"192.0.2.1") != h1(b"192.0.2.2")
    assert -(2**63) <= h1(b"2001:db8::1") < 2**63


def test_dir_source_lists_recursively_and_skips_other_names(tmp_path):
    (tmp_path / "E1" / "2024-01-30").mkdir(parents=True)
    (tmp_path / "E1" / "2024-01-30" / "E1.2024-01-30-05.aa.gz").write_bytes(gz(line()))
    (tmp_path / "E1.2024-01-31-00.bb.gz").write_bytes(gz(line()))
    (tmp_path / "README").write_text("x")
    src = sources.DirSource(tmp_path)
    objects, skipped = src.list()
    by_key = {o.key: o for o in objects}
    assert set(by_key) == {"E1.2024-01-31-00.bb.gz", "E1/2024-01-30/E1.2024-01-30-05.aa.gz"}
    assert skipped == ["README"]
    assert by_key["E1/2024-01-30/E1.2024-01-30-05.aa.gz"].name_hour == dt.datetime(2024, 1, 30, 5)
    assert (
        count(
            b"".join(src.chunks(by_key["E1.2024-01-31-00.bb.gz"])), dt.datetime(2024, 1, 30, 12)
        ).accepted
        == 1
    )


def test_decompress_output_is_bounded_whatever_the_ratio():
    """Memory stays flat: a highly compressible member comes out in pieces of at most OUT_MAX
    bytes, also when fed in tiny chunks, and nothing held by the decompressor is lost."""
    head = f"#Version: 1.0\n#Fields: {' '.join(F33)}\n".encode()
    text = head + b"x" * (3 * sources.OUT_MAX + 17) + b"\n" + line().encode() + b"\n"
    data = gzip.compress(text) + gz(line(ip="192.0.2.7"))
    for size in (1, 100, len(data)):
        pieces = list(sources.decompress([data[i : i + size] for i in range(0, len(data), size)]))
        assert max(map(len, pieces)) <= sources.OUT_MAX
        assert b"".join(pieces).startswith(text)
    res = count(data)
    assert (res.accepted, res.rejected) == (2, 1)  # the run of x is one malformed line


def test_process_wide_uri_cache_bounded_and_results_unchanged(monkeypatch):
    """The download-rule caches outlive an object (URIs repeat from file to file) and are
    emptied between objects once they outgrow URI_CACHE_MAX; counts never depend on them."""
    data = gz(
        line(),
        line(uri="/packages/3.19/bioc/bin/windows/contrib/4.4/cn.mops_1.0.zip"),
        line(uri="/packages/3.18/bioc/src/contrib/Archive/limma/limma_3.0.tar.gz"),
        line(uri="/index.html"),
    )
    first = downloads(count(data))
    assert first == {
        ("bioc", "limma", "2024-01-30", "192.0.2.1"): 1,
        ("bioc", "cn.mops", "2024-01-30", "192.0.2.1"): 1,
    }
    assert downloads(count(data)) == first  # served from the caches
    assert len(parse._URIS) >= 3  # the object's URIs stay for the next one
    monkeypatch.setattr(parse, "URI_CACHE_MAX", 1)
    assert downloads(count(data)) == first  # caches emptied at the start of the object
    assert len(parse._URIS) <= 1  # and no more kept than the bound
    assert downloads(count(data)) == first
    assert len(parse._URIS) <= 1
