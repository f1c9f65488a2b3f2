"""A package page rendered by headless Chromium (Debian's package) through the real front
(nginx from the role's templates, with its Content-Security-Policy) and gunicorn: the chart
canvas is drawn by the vendored library, the table carries the data, the policy blocks
nothing, nothing is requested from another host."""

from __future__ import annotations

import datetime as dt
import re
import shutil
import struct
import subprocess
import tempfile
import zlib
from html.parser import HTMLParser
from pathlib import Path

import pytest

import webref
from webserver import reference_front

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.browser


@pytest.fixture(scope="module", autouse=True)
def _chromium() -> None:
    # a missing browser is a failure, never a skip
    assert CHROMIUM, "chromium not found: 'make deps' installs it"


VT = dt.date(2024, 3, 31)
# The downloads bars: rgba(26,95,140,0.35) over white.
BAR_RGB = (175, 199, 215)


@pytest.fixture(scope="module")
def server(pg_server, tmp_path_factory):
    with reference_front(pg_server, tmp_path_factory.mktemp("front-browser"), VT) as front:
        yield front


def chromium(tmp: Path, url: str, *extra: str) -> subprocess.CompletedProcess:
    """One headless run, bounded in time, no network beyond loopback, its own profile."""
    profile = Path(tempfile.mkdtemp(prefix="profile-", dir=tmp))
    return subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--disable-extensions",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            "--window-size=1000,1400",
            "--virtual-time-budget=5000",
            "--enable-logging=stderr",  # console messages, CSP violations among them
            "--v=0",
            *extra,
            url,
        ],
        capture_output=True,
        timeout=120,
        cwd=tmp,
    )


def read_png(path: Path) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of RGBA/RGB bytes) of an 8-bit non-interlaced PNG."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width = 8, b"", 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        chunk = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", chunk)
            assert depth == 8 and interlace == 0 and color in (2, 6)
            bpp = 4 if color == 6 else 3
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = width * bpp
    rows, prev = [], bytearray(stride)
    for y in range(height):
        f = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                line[i] = (line[i] + pred) & 255
        rows.append(bytes(line))
        prev = line
    return width, bpp, rows


def count_color(path: Path, rgb: tuple[int, int, int], tol: int = 8) -> int:
    width, bpp, rows = read_png(path)
    n = 0
    for row in rows:
        for x in range(width):
            px = row[x * bpp : x * bpp + 3]
            if all(abs(px[i] - rgb[i]) <= tol for i in range(3)):
                n += 1
    return n


class Tables(HTMLParser):
    """Rows of every <table class="stats"> as lists of cell texts."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self._cell: list[str] | None = None
        self._in = False

    def handle_starttag(self, tag, attrs):
        if tag == "table" and ("class", "stats") in attrs:
            self.tables.append([])
            self._in = True
        elif self._in and tag == "tr":
            self.tables[-1].append([])
        elif self._in and tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag == "table":
            self._in = False
        elif tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def test_package_page_chart_and_table(server, tmp_path):
    url = server.base + "/packages/stats/bioc/affy/"
    with_js = tmp_path / "js.png"
    r = chromium(tmp_path, url, f"--screenshot={with_js}")
    assert with_js.exists(), r.stderr.decode(errors="replace")[-2000:]
    # control: the same page with its scripts removed (as a reader without JavaScript sees it)
    html = server.get("/packages/stats/bioc/affy/")[2].decode()
    html = re.sub(r"<script.*?</script>", "", html, flags=re.S)
    html = html.replace("<head>", f'<head><base href="{url}">', 1)
    (tmp_path / "nojs.html").write_text(html)
    no_js = tmp_path / "nojs.png"
    chromium(tmp_path, (tmp_path / "nojs.html").as_uri(), f"--screenshot={no_js}")
    assert no_js.exists()
    log = r.stderr.decode(errors="replace")
    assert "Content Security Policy" not in log, log[-3000:]  # nothing the policy refused
    assert "Content-Security-Policy" in server.get("/packages/stats/bioc/affy/")[1]
    drawn = count_color(with_js, BAR_RGB)
    assert drawn > 500, f"chart bars not drawn ({drawn} bar pixels)"
    control = count_color(no_js, BAR_RGB)
    print("bar pixels", drawn, control)
    assert drawn > 5 * control + 2000  # without JavaScript: no chart (only text antialiasing)

    dom = chromium(tmp_path, url, "--dump-dom").stdout.decode()
    assert dom.count("<canvas") >= 1, "uPlot did not create its canvas"
    parser = Tables()
    parser.feed(dom)
    ref = webref.Reference(VT)
    years = ref.package_years("bioc", "affy")
    assert len(parser.tables) == len(years)
    for table, year in zip(parser.tables, years, strict=True):
        expected = ref.pkg_year("bioc", "affy", year).decode().splitlines()[1:]
        body = table[1:]  # after the header row
        assert len(body) == 13
        for row, line in zip(body, expected, strict=True):
            y, month, ips, downloads = line.split("\t")
            label = f"{month}/{y}" if month != "all" else y
            assert row == [label, ips, downloads], (year, row, line)


def test_pages_request_nothing_from_other_hosts(server):
    for path in ("", "bioc/", "bioc/affy/", "workflows.html"):
        _, _, body = server.get("/packages/stats/" + path)
        html = body.decode()
        for ref in re.findall(r'(?:src|href)="([^"]+)"', html):
            assert "//" not in ref, (path, ref)  # relative or same-host absolute only
        assert "@import" not in html and "url(" not in html
    _, _, css = server.get("/packages/stats/main.css")
    assert b"url(" not in css and b"@import" not in css
