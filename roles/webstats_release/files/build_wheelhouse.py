#!/usr/bin/env python3
"""Build (or adopt) the release wheelhouse on the Ansible controller, once per content.

A wheelhouse is the project's wheel plus every runtime dependency pinned by
requirements/runtime.txt, as binary wheels for the target's Python version and platform, so
the host installs it with ``pip install --no-index``.

The project's wheel carries the ETL's C scanner (``bioc_webstats.etl._scan``, stable ABI: one
build for every Python >= 3.11) when the target has the controller's architecture: it is
compiled here (a C compiler and the Python headers are needed) and tagged manylinux2014 after
checking it needs nothing newer from glibc than 2.17. For another architecture, or with
``--pure``, the wheel is pure Python (``py3-none-any``): the ETL then runs its Python loop,
with the same results, about twice as slow. The result directory is named by the
version and a key (sha256 of everything that goes into it), and is complete only once it holds
``.complete``: a second run with the same inputs finds it and changes nothing.

Next to it, ``<dir>.tar`` holds the same files: the host gets one file to copy, not dozens.

Prints one JSON object: {"changed": bool, "dir": str, "tar": str, "version": str, "key": str,
"parser": "native" | "python"}.
Exit status 1 with a one-line message on stderr when the build fails.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

RECIPE = "wheelhouse-v2"  # bump when this script changes what it produces
# a pip platform tag without its architecture: manylinux_2_35_x86_64 → x86_64
PLATFORM_ARCH = re.compile(r"^(manylinux_\d+_\d+|manylinux\d+|musllinux_\d+_\d+|linux)_")
GLIBC_MAX = (2, 17)  # manylinux2014: what the C scanner may need of the target's glibc
SOURCE_FILES = ("pyproject.toml", "README.md", "LICENSE", "MANIFEST.in", "setup.cfg", "setup.py")
SKIP_PARTS = {"__pycache__", ".pytest_cache", ".ruff_cache"}
KEEP_BUILDS = 10


def fail(message: str) -> None:
    print(f"build_wheelhouse: {message}", file=sys.stderr)
    sys.exit(1)


def source_inputs(source: Path) -> list[Path]:
    """The files a wheel is built from (the src/ tree and the packaging files)."""
    files = [source / name for name in SOURCE_FILES if (source / name).is_file()]
    for path in sorted((source / "src").rglob("*")):
        rel = path.relative_to(source)
        if path.is_file() and not SKIP_PARTS & set(rel.parts) and ".egg-info" not in str(rel):
            if path.suffix not in (".pyc", ".pyo", ".so"):  # not a development build
                files.append(path)
    return files


def digest(paths: list[Path], base: Path, extra: list[str]) -> str:
    h = hashlib.sha256()
    for item in extra:
        h.update(item.encode() + b"\0")
    for path in paths:
        h.update(str(path.relative_to(base)).encode() + b"\0")
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def wheel_version(directory: Path) -> str:
    wheels = sorted(directory.glob("bioc_webstats-*.whl"))
    if len(wheels) != 1:
        fail(f"{directory}: expected one bioc_webstats-*.whl, found {len(wheels)}")
    return wheels[0].name.split("-")[1]


def wheel_parser(directory: Path) -> str:
    """ "native" if the project's wheel carries the C scanner, else "python"."""
    wheel = next(directory.glob("bioc_webstats-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        native = any(n.startswith("bioc_webstats/etl/_scan") for n in zf.namelist())
    return "native" if native else "python"


def check_glibc(wheel: Path) -> None:
    """Fail unless every shared object in WHEEL needs at most GLIBC_MAX of glibc."""
    with zipfile.ZipFile(wheel) as zf:
        for name in zf.namelist():
            if not name.endswith(".so"):
                continue
            found = re.findall(rb"GLIBC_(\d+)\.(\d+)", zf.read(name))
            needed = {(int(a), int(b)) for a, b in found}
            newest = max(needed, default=(0, 0))
            if newest > GLIBC_MAX:
                fail(
                    f"{name} needs glibc {newest[0]}.{newest[1]}, newer than manylinux2014's "
                    f"{GLIBC_MAX[0]}.{GLIBC_MAX[1]}: build on an older system or use --pure"
                )


def native_platform(
    platforms: list[str], pure: bool, here: tuple[str, str] | None = None
) -> str | None:
    """The wheel's platform tag when the C scanner can be built here for the target, else
    None: a pure-Python wheel (asked for, or the target has another architecture). ``here``:
    (sys.platform, machine) of the build host, this one by default."""
    system, machine = here or (sys.platform, platform.machine())
    machine = machine.replace("arm64", "aarch64").replace("amd64", "x86_64")
    targets = {PLATFORM_ARCH.sub("", p) for p in platforms}
    if pure or system != "linux" or targets != {machine}:
        return None
    return f"manylinux2014_{machine}"


def write_sums(directory: Path) -> None:
    lines = [
        f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}"
        for p in sorted(directory.glob("*.whl"))
    ]
    (directory / "SHA256SUMS").write_text("\n".join(lines) + "\n")


def make_tar(directory: Path, tar: Path) -> bool:
    """Write TAR with the wheelhouse's files (flat), unless it is there already."""
    if tar.is_file():
        return False
    partial = tar.with_name(tar.name + ".partial")
    with tarfile.open(partial, "w") as archive:
        for path in sorted(directory.iterdir()):
            if path.is_file():
                archive.add(path, arcname=path.name)
    partial.rename(tar)
    return True


def run(cmd: list[str], what: str, env: dict[str, str] | None = None) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if result.returncode != 0:
        last = (result.stderr.strip() or result.stdout.strip() or "no output").splitlines()[-1]
        fail(f"{what} failed: {last}")


def build(args: argparse.Namespace) -> dict:
    source = Path(args.source).resolve()
    init = source / "src" / "bioc_webstats" / "__init__.py"
    match = re.search(r'^__version__\s*=\s*["\']([^"\']+)["\']', init.read_text(), re.M)
    if not match:
        fail(f"no __version__ in {init}")
    version = match.group(1)
    constraints = Path(args.constraints).resolve()
    plat = native_platform(args.platform, args.pure)
    key = digest(
        [*source_inputs(source), constraints],
        source if constraints.is_relative_to(source) else Path("/"),
        [RECIPE, args.python_version, *args.platform, plat or "pure"],
    )
    cache = Path(args.cache).resolve()
    arch = args.platform[0].rsplit("_", 2)[-2:] if args.platform else ["any"]
    name = f"{version}-py{args.python_version}-{'_'.join(arch)}-{key[:12]}"
    out = cache / name
    tar = cache / f"{name}.tar"
    if (out / ".complete").is_file():
        changed = make_tar(out, tar)
        return {
            "changed": changed,
            "dir": str(out),
            "tar": str(tar),
            "version": version,
            "key": key,
            "parser": wheel_parser(out),
        }

    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".build-") as tmp:
        work = Path(tmp)
        tree = work / "source"
        tree.mkdir()
        for path in source_inputs(source):  # build from a clean copy: nothing written to the repo
            dest = tree / path.relative_to(source)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest)
        wheels = work / "wheels"
        pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("BIOC_WEBSTATS_")}
        env.update({"BIOC_WEBSTATS_PLAT_NAME": plat} if plat else {"BIOC_WEBSTATS_PURE": "1"})
        run(
            [*pip, "wheel", "--no-deps", "--wheel-dir", str(wheels), str(tree)],
            "pip wheel"
            + (" (the C scanner needs a C compiler and Python headers, e.g. "
               "'apt install gcc python3-dev'; or build a pure-Python wheel: "
               "webstats_release_pure_python)" if plat else ""),
            env,
        )  # fmt: skip
        if wheel_version(wheels) != version:
            fail(f"the built wheel is not version {version}")
        if plat:
            check_glibc(next(wheels.glob("bioc_webstats-*.whl")))
        py = args.python_version.replace(".", "")
        platform_args = [a for p in args.platform for a in ("--platform", p)]
        app_wheel = next(wheels.glob("bioc_webstats-*.whl"))
        run(
            [
                *pip,
                "download",
                "--only-binary=:all:",
                "--dest",
                str(wheels),
                "--python-version",
                args.python_version,
                "--implementation",
                "cp",
                "--abi",
                f"cp{py}",
                "--abi",
                "abi3",
                "--abi",
                "none",
                *platform_args,
                "--constraint",
                str(constraints),
                str(app_wheel),
            ],
            "pip download of the dependencies",
        )
        write_sums(wheels)
        (wheels / ".complete").write_text(key + "\n")
        if out.exists():  # an incomplete earlier attempt
            shutil.rmtree(out)
        wheels.rename(out)
    builds = sorted(
        (p for p in cache.iterdir() if (p / ".complete").is_file()),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    for old in builds[KEEP_BUILDS:]:
        shutil.rmtree(old, ignore_errors=True)
        Path(f"{old}.tar").unlink(missing_ok=True)
    make_tar(out, tar)
    return {
        "changed": True,
        "dir": str(out),
        "tar": str(tar),
        "version": version,
        "key": key,
        "parser": wheel_parser(out),
    }


def adopt(args: argparse.Namespace) -> dict:
    """A wheelhouse built elsewhere (a test's older or broken release): check and key it."""
    directory = Path(args.wheelhouse).resolve()
    if not directory.is_dir():
        fail(f"wheelhouse {directory} is not a directory")
    version = wheel_version(directory)
    marker = directory / ".complete"
    if marker.is_file():  # one of ours: keep its key, so adopting it reinstalls nothing
        key = marker.read_text().strip()
    else:
        key = digest(sorted(directory.glob("*.whl")), directory, [RECIPE, "prebuilt"])
    cache = Path(args.cache).resolve()
    tar = cache / f"{version}-prebuilt-{key[:12]}.tar"
    changed = make_tar(directory, tar)
    return {
        "changed": changed,
        "dir": str(directory),
        "tar": str(tar),
        "version": version,
        "key": key,
        "parser": wheel_parser(directory),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", help="the repository (pyproject.toml, src/)")
    parser.add_argument("--constraints", help="requirements/runtime.txt")
    parser.add_argument("--cache", help="where wheelhouses are kept on the controller")
    parser.add_argument("--python-version", help="the target's Python, X.Y")
    parser.add_argument("--platform", action="append", default=[], help="pip platform tag")
    parser.add_argument("--wheelhouse", help="adopt this prebuilt wheelhouse instead")
    parser.add_argument(
        "--pure", action="store_true", help="a pure-Python wheel (no C scanner) for any target"
    )
    args = parser.parse_args()
    if not args.cache:
        parser.error("--cache is required")
    if not args.wheelhouse and not (args.source and args.constraints and args.python_version):
        parser.error("--source, --constraints and --python-version are required (or --wheelhouse)")
    cache = Path(args.cache).resolve()
    cache.mkdir(parents=True, exist_ok=True)
    # One build at a time per cache (two deploys from one controller, or molecule scenarios run
    # side by side): the second finds the first's build complete instead of replacing it, or
    # pruning it, while the first's play still copies it. The lock file is opened read-only: a
    # cache another user filled (root's make test) still serves a deploy.
    lock = os.open(cache / ".lock", os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        result = adopt(args) if args.wheelhouse else build(args)
    finally:
        os.close(lock)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
