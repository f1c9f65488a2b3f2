#!/usr/bin/env python3
"""Source trees of the releases the scenarios deploy, snapshots of the checkout.

    python molecule/shared/make_releases.py --out DIR

Writes DIR/current (release N: the checkout as it is now, so that edits made while a scenario
runs cannot change what it deploys half-way), DIR/previous (N-1: the same code with a lower
``__version__``), DIR/broken (a release after N whose /healthz always answers 503, so the
deploy's health wait fails) and DIR/versions.json ({"previous", "current", "broken"}). The
deploy builds each one's wheelhouse through webstats_release_source_dir, as it does for the
checkout.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FILES = [
    "pyproject.toml",
    "setup.py",
    "README.md",
    "LICENSE",
    "MANIFEST.in",
    "requirements/runtime.txt",
]
VERSION = re.compile(r'^__version__ = "([^"]+)"$', re.M)

# Appended to the broken release's package: the app works, but its health check fails.
BREAK_HEALTHZ = """

_real_create_app = create_app


def create_app(*args, **kwargs):  # a deliberately broken release (molecule/upgrade)
    app = _real_create_app(*args, **kwargs)

    @app.before_request
    def _broken_healthz():
        from flask import request

        if request.path == "/healthz":
            return {"status": "error", "version": __version__, "broken": True}, 503
        return None

    return app
"""


def neighbours(version: str) -> tuple[str, str]:
    """A version just below and one just above ``version`` (X.Y.Z)."""
    x, y, z = (int(p) for p in version.split(".")[:3])
    if z > 0:
        lower = f"{x}.{y}.{z - 1}"
    elif y > 0:
        lower = f"{x}.{y - 1}.99"
    else:
        lower = f"{x - 1}.99.99"
    return lower, f"{x}.{y}.{z + 1}"


def copy_tree(dest: Path, version: str, extra: str = "") -> None:
    """The packaging files and src/ of the checkout, with ``__version__`` set to ``version``."""
    if dest.exists():
        shutil.rmtree(dest)
    for name in FILES:
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    shutil.copytree(
        REPO / "src",
        dest / "src",
        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc", "*.so"),
    )
    init = dest / "src" / "bioc_webstats" / "__init__.py"
    text = VERSION.sub(f'__version__ = "{version}"', init.read_text(), count=1)
    init.write_text(text + extra)


def main() -> None:
    """Command line (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    current = VERSION.search((REPO / "src" / "bioc_webstats" / "__init__.py").read_text())[1]
    previous, broken = neighbours(current)
    copy_tree(args.out / "current", current)
    copy_tree(args.out / "previous", previous)
    copy_tree(args.out / "broken", broken, BREAK_HEALTHZ)
    versions = {"previous": previous, "current": current, "broken": broken}
    (args.out / "versions.json").write_text(json.dumps(versions) + "\n")
    print(json.dumps(versions))


if __name__ == "__main__":
    main()
