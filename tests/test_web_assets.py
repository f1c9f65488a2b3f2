"""Shipped web assets: the vendored chart library is the pinned npm release, with its license,
and the pages reference only assets the service itself serves."""

from __future__ import annotations

import subprocess
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_vendored_uplot_matches_pinned_release():
    r = subprocess.run(
        [str(ROOT / "scripts" / "vendor-chart.sh"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert "uplot 1.6.32 ok" in r.stdout


def test_assets_ship_inside_the_package():
    static = resources.files("bioc_webstats.web") / "static"
    for rel in ("main.css", "charts.js", "vendor/uplot/uPlot.iife.min.js", "vendor/uplot/LICENSE"):
        assert (static / rel).is_file(), rel
    js = (static / "charts.js").read_text()
    assert "http:" not in js and "https:" not in js and "fetch(" not in js
