#!/usr/bin/env python3
"""Source trees of the releases the scenarios deploy, snapshots of the checkout.

    python molecule/shared/make_releases.py --out DIR

Writes DIR/current (release N: the checkout as it is now, so that edits made while a scenario
runs cannot change what it deploys half-way), DIR/previous (N-1: the real previous release,
the code as it was just before the commit that set N's ``__version__``, taken from git),
DIR/previous-repo (N-1's whole tree: the upgrade scenario deploys N-1 with N-1's own
playbooks, roles and inventory, as the host was deployed before the upgrade), DIR/broken (a
release after N whose /healthz always answers 503, so the deploy's health wait fails) and
DIR/versions.json ({"previous", "current", "broken", "previous_commit"}). The
deploy builds each one's wheelhouse through webstats_release_source_dir, as it does for the
checkout.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
INIT = "src/bioc_webstats/__init__.py"
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


def next_patch(version: str) -> str:
    """The version just above ``version`` (X.Y.Z): the broken release's (N-1 comes from git)."""
    x, y, z = (int(p) for p in version.split(".")[:3])
    return f"{x}.{y}.{z + 1}"


def git(*args: str) -> bytes:
    return subprocess.run(["git", "-C", str(REPO), *args], check=True, capture_output=True).stdout


def previous_release(current: str) -> tuple[str, str]:
    """(commit, version) of the release before ``current``: the parent of the commit that set
    ``__version__`` to ``current`` (the oldest commit that added that line)."""
    try:
        bumps = git("log", "--format=%H", "-S", f'__version__ = "{current}"', "--", INIT).split()
        commit = git("rev-parse", "--verify", f"{bumps[-1].decode()}^").decode().strip()
        version = VERSION.search(git("show", f"{commit}:{INIT}").decode())[1]
    except (subprocess.CalledProcessError, IndexError, TypeError) as exc:
        sys.exit(
            f"make_releases: cannot find the release before {current} in git ({exc}); the"
            " upgrade scenario deploys the real previous release, so it needs the checkout's"
            " history (a full clone)"
        )
    return commit, version


def copy_tree(dest: Path, version: str, extra: str = "", root: Path = REPO) -> None:
    """The packaging files and src/ of ``root``, with ``__version__`` set to ``version``."""
    if dest.exists():
        shutil.rmtree(dest)
    for name in FILES:
        if (root / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / name, dest / name)
    shutil.copytree(
        root / "src",
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
    broken = next_patch(current)
    commit, previous = previous_release(current)
    copy_tree(args.out / "current", current)
    tree = args.out / "previous-repo"
    if tree.exists():
        shutil.rmtree(tree)
    tree.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(tree)], input=git("archive", commit), check=True)
    copy_tree(args.out / "previous", previous, root=tree)
    copy_tree(args.out / "broken", broken, BREAK_HEALTHZ)
    versions = {
        "previous": previous,
        "current": current,
        "broken": broken,
        "previous_commit": commit,
    }
    (args.out / "versions.json").write_text(json.dumps(versions) + "\n")
    print(json.dumps(versions))


if __name__ == "__main__":
    main()
