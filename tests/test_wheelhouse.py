"""The release wheelhouse (roles/webstats_release/files/build_wheelhouse.py): the project's
wheel carries the C scanner for a target of the controller's architecture, tagged for any
Python >= 3.11 and checked against manylinux2014's glibc; a pure wheel otherwise."""

from __future__ import annotations

import importlib.util
import json
import platform
import re
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "roles" / "webstats_release" / "files" / "build_wheelhouse.py"
ARCH = platform.machine()


def _module():
    spec = importlib.util.spec_from_file_location("build_wheelhouse", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def argv(tmp_path: Path, *extra: str) -> list[str]:
    return [sys.executable, str(SCRIPT), "--source", str(ROOT), "--constraints",
            str(ROOT / "requirements" / "runtime.txt"), "--cache", str(tmp_path / "cache"),
            "--python-version", "3.12", "--platform", f"manylinux_2_35_{ARCH}",
            "--platform", f"manylinux2014_{ARCH}", *extra]  # fmt: skip


def build(tmp_path: Path, *extra: str) -> dict:
    out = subprocess.run(argv(tmp_path, *extra), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def app_wheel(result: dict) -> Path:
    (wheel,) = Path(result["dir"]).glob("bioc_webstats-*.whl")
    return wheel


def test_native_wheel_for_the_controllers_architecture(tmp_path):
    res = build(tmp_path)
    assert res["parser"] == "native"
    wheel = app_wheel(res)
    assert wheel.name.endswith(f"-cp311-abi3-manylinux2014_{ARCH}.whl")  # any Python >= 3.11
    with zipfile.ZipFile(wheel) as zf:
        libs = sorted(n for n in zf.namelist() if n.endswith(".so"))
        # the ETL's per-line loop and the legacy import's per-row loop (stable ABI both)
        assert [n.rsplit(".", 2)[0] for n in libs] == [
            "bioc_webstats/etl/_legacy", "bioc_webstats/etl/_scan",
        ]  # fmt: skip
        for so in libs:
            versions = re.findall(rb"GLIBC_(\d+)\.(\d+)", zf.read(so))
            assert versions and max((int(a), int(b)) for a, b in versions) <= (2, 17), so
    assert not any(Path(res["dir"]).glob("*.so"))  # a development build is never shipped
    again = build(tmp_path)  # same content: the cached wheelhouse, unchanged
    assert (again["changed"], again["key"]) == (False, res["key"])


def test_pure_wheel_on_request(tmp_path):
    res = build(tmp_path, "--pure")
    assert res["parser"] == "python"
    assert app_wheel(res).name.endswith("-py3-none-any.whl")
    with zipfile.ZipFile(app_wheel(res)) as zf:
        assert not [n for n in zf.namelist() if n.endswith(".so")]


def test_two_builds_of_one_content_at_once_make_one(tmp_path):
    """Two deploys from one controller (or molecule scenarios run side by side) build the same
    release at once: the second waits for the first and takes its wheelhouse, which it does not
    replace (nor remove) while the first's play is still to copy it."""
    cmd = argv(tmp_path, "--pure")
    runs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]  # fmt: skip
    results = []
    for run in runs:
        out, err = run.communicate(timeout=600)
        assert run.returncode == 0, err
        results.append(json.loads(out))
    assert sorted(r["changed"] for r in results) == [False, True]
    assert results[0]["dir"] == results[1]["dir"]
    assert (Path(results[0]["dir"]) / ".complete").is_file() and Path(results[0]["tar"]).is_file()


def test_the_native_platform_only_for_this_architecture():
    """A native wheel only for the build host's own architecture on Linux; any other target
    (or a mix) gets the pure-Python one."""
    mod = _module()
    here = ("linux", "x86_64")
    x86 = ["manylinux_2_35_x86_64", "manylinux2014_x86_64"]
    arm = ["manylinux_2_35_aarch64", "manylinux2014_aarch64"]
    assert mod.native_platform(x86, pure=False, here=here) == "manylinux2014_x86_64"
    assert mod.native_platform(x86, pure=True, here=here) is None
    assert mod.native_platform(arm, pure=False, here=here) is None
    assert mod.native_platform([*x86, *arm], pure=False, here=here) is None
    assert mod.native_platform(arm, pure=False, here=("linux", "arm64")) == (
        "manylinux2014_aarch64"
    )
    assert mod.native_platform(x86, pure=False, here=("darwin", "x86_64")) is None
