#!/usr/bin/env bash
# Install the Ansible collections pinned in requirements.yml into the venv's site-packages, with
# no Galaxy: download the pinned `ansible` wheel (sha256-checked), extract only the listed
# collections, then check every extracted version against requirements.yml.
# Idempotent; a no-op (well under a second) when the right versions are already there.
# Usage: scripts/install-collections.sh [VENV]   (default .venv)
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${1:-.venv}
py="$venv/bin/python"
[ -x "$py" ] || { echo "install-collections: no venv at $venv (run make venv)" >&2; exit 1; }

exec "$py" - "$venv" <<'PY'
"""Extract pinned collections from the ansible wheel; verify versions."""
import hashlib
import json
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path

import yaml

req_file = Path("requirements.yml")
text = req_file.read_text()
wheel_pin = re.search(r"^# ansible-wheel: (ansible==\S+)$", text, re.M).group(1)
wheel_sha = re.search(r"^# ansible-wheel-sha256: ([0-9a-f]{64})$", text, re.M).group(1)
wanted = {c["name"]: str(c["version"]) for c in yaml.safe_load(text)["collections"]}
site = Path(sysconfig.get_paths()["purelib"])
root = site / "ansible_collections"


def installed(name: str) -> str | None:
    """Version of an installed collection, from its MANIFEST.json, or None."""
    manifest = root.joinpath(*name.split("."), "MANIFEST.json")
    if not manifest.is_file():
        return None
    return json.loads(manifest.read_text())["collection_info"]["version"]


todo = [n for n, v in wanted.items() if installed(n) != v]
if not todo:
    print(f"install-collections: ok ({', '.join(f'{n} {v}' for n, v in wanted.items())})")
    sys.exit(0)

cache = Path(".cache/wheels")
cache.mkdir(parents=True, exist_ok=True)
version = wheel_pin.split("==")[1]
wheel = cache / f"ansible-{version}-py3-none-any.whl"
if not wheel.is_file() or hashlib.sha256(wheel.read_bytes()).hexdigest() != wheel_sha:
    print(f"install-collections: downloading {wheel_pin} (about 55 MB)")
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
             "--no-deps", "--only-binary=:all:", "-d", tmp, wheel_pin],
            check=True,
        )
        shutil.move(str(Path(tmp) / wheel.name), wheel)
digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
if digest != wheel_sha:
    sys.exit(f"install-collections: {wheel.name} sha256 {digest} != pinned {wheel_sha}")

with zipfile.ZipFile(wheel) as zf:
    names = zf.namelist()
    for name in todo:
        prefix = "ansible_collections/" + name.replace(".", "/") + "/"
        members = [m for m in names if m.startswith(prefix)]
        if not members:
            sys.exit(f"install-collections: {name} is not in {wheel.name}")
        dest = root.joinpath(*name.split("."))
        if dest.exists():
            shutil.rmtree(dest)
        zf.extractall(site, members)
        got = installed(name)
        if got != wanted[name]:
            sys.exit(
                f"install-collections: {name} in {wheel.name} is {got}, requirements.yml pins "
                f"{wanted[name]}: update requirements.yml or the wheel pin"
            )
        print(f"install-collections: {name} {got}")
root.joinpath("__init__.py").unlink(missing_ok=True)  # a namespace package, as in the wheel
print("install-collections: ok")
PY
