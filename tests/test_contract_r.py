"""Contract tests the way consumers read the files: R (r-base-core) on every text file fetched
from a real gunicorn, with read.table(header=TRUE, sep="\\t"), read.delim, readLines and scan."""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
from pathlib import Path

import pytest

import webref
from webserver import reference_server

RSCRIPT = shutil.which("Rscript")
pytestmark = pytest.mark.r


@pytest.fixture(scope="module", autouse=True)
def _rscript() -> None:
    # a missing R is a failure, never a skip
    assert RSCRIPT, "Rscript not found: 'make deps' installs r-base-core"


SCRIPT = Path(__file__).parent / "contract" / "check_tabs.R"
VT = dt.date(2024, 3, 31)


@pytest.fixture(scope="module")
def server(pg_server, tmp_path_factory):
    with reference_server(pg_server, tmp_path_factory.mktemp("gunicorn-r"), VT) as srv:
        yield srv


def run_r(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [RSCRIPT, "--vanilla", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
    )


def test_r_reads_every_text_file(server, tmp_path):
    files = webref.Reference(VT).all_files()
    for rel in files:
        status, _headers, body = server.get("/packages/stats/" + rel)
        assert status == 200, rel
        out = tmp_path / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(body)
    direct = [
        f"{server.base}/packages/stats/bioc/bioc_pkg_stats.tab",
        f"{server.base}/packages/stats/bioc/affy/affy_stats.tab",
        f"{server.base}/packages/stats/bioc/bioc_pkg_scores.tab",
    ]
    r = run_r(str(tmp_path), *direct)
    assert r.returncode == 0, r.stderr + r.stdout
    assert f"checked {len(files) + len(direct)} files" in r.stdout


def test_r_check_catches_a_broken_file(tmp_path):
    """The R checker is not a rubber stamp: a file without the final newline or with a
    month out of place fails."""
    good = webref.Reference(VT).pkg_year("bioc", "affy", 2024)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x_stats.tab").write_bytes(good[:-1])  # no final \n
    assert run_r(str(tmp_path / "a")).returncode != 0
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x_stats.tab").write_bytes(good.replace(b"\tFeb\t", b"\tMar\t"))
    assert run_r(str(tmp_path / "b")).returncode != 0
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "x_stats.tab").write_bytes(good)
    r = run_r(str(tmp_path / "c"))
    assert r.returncode == 0 and "checked 1 files" in r.stdout, r.stderr
