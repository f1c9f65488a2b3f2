"""Bioconductor's own manifest: ``config.yaml`` (release/devel versions) and devel ``PACKAGES``.

Read from a base URL (``https://bioconductor.org``) or a local directory holding the same
relative paths. Every failure — HTTP error, timeout, unreachable host, missing file, a file
that does not look like what it should — is one WebstatsError line naming the file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from ..categories import CATEGORIES
from ..config import quoted
from ..errors import WebstatsError
from ..httpbody import (
    BodyError,
    FetchFailed,
    get,
    is_http,
    lines,
    mask,
    read_local,
    url_problem,
)
from .rule import MAX_PACKAGE

FETCH_TIMEOUT = 30.0  # seconds, per read
FETCH_DEADLINE = 300.0  # seconds, per file, from the connection to the body's end
MAX_BYTES = 64 * 1024 * 1024  # the largest PACKAGES today is a few MB
MAX_CONFIG_BYTES = 1024 * 1024  # config.yaml is a few KB; split into lines whole
MAX_PACKAGES = 100_000  # names in one PACKAGES (bioc's has ~2,300): more is no PACKAGES

# A release X.Y, as config.yaml and the packages CSV give it: no leading zero (03.20, 3.021
# were stored as new releases, and a correct sync after them changed nothing), two digits each.
RELEASE = re.compile(r"^[1-9][0-9]?\.(0|[1-9][0-9]?)$")
_TOP_KEY = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\s*:\s*(.*?)\s*$")
# A valid R package name (etl.md): letters, digits and dots, starts with a letter.
PKG_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9.]*[A-Za-z0-9]$")


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a package name (it becomes a URL path and a file name): what
    ``packages load`` refuses, and so ``packages sync``."""
    for char, what in (("\x00", "a NUL"), ("\n", "a newline"), ("\r", "a carriage return"),
                       ("\t", "a tab")):  # fmt: skip
        if char in name:
            return f"package name contains {what}"
    if "/" in name or "\\" in name or ".." in name:
        return f"package name {name[:80]!r} contains a path ('/', '\\' or '..')"
    if any(c in name for c in "<>&\"'"):
        return f"package name {name[:80]!r} contains HTML (<, >, &, quotes)"
    if len(name) > MAX_PACKAGE:  # (the column's size; R's names are far shorter)
        return f"package name longer than {MAX_PACKAGE} characters ({len(name)})"
    return None


@dataclass(frozen=True)
class Manifest:
    """What one sync reads: the two versions and the devel package names per category."""

    source: str
    release_version: str
    devel_version: str
    devel: dict[str, frozenset[str]]  # category prefix → package names


def packages_path(repo_path: str) -> str:
    """Relative path of a repository's devel PACKAGES file."""
    return f"packages/devel/{repo_path}/src/contrib/PACKAGES"


def read_source(
    source: str, relpath: str, timeout: float = FETCH_TIMEOUT, max_bytes: int = MAX_BYTES
) -> bytes:
    """The bytes of ``relpath`` under ``source`` (a base URL or a directory), at most
    ``max_bytes``."""
    if is_http(source):
        problem = url_problem(source)
        if problem:
            raise WebstatsError(f"packages source {mask(source)}: not a usable URL ({problem})")
        url = source.rstrip("/") + "/" + relpath
        try:
            return get(url, f"bioc-webstats/{__version__}", timeout, max_bytes, FETCH_DEADLINE)
        except FetchFailed as exc:
            raise WebstatsError(f"cannot fetch {url}: {exc}") from None
    base = Path(source.removeprefix("file://"))
    if not base.is_dir():
        raise WebstatsError(
            f"packages source {mask(source)}: not a directory nor an http(s):// URL"
        )
    where = base / relpath
    try:
        return read_local(where, max_bytes)
    except BodyError as exc:  # a FIFO, a link to /dev/zero, a file over the cap
        raise WebstatsError(f"cannot read {where}: {exc}") from None
    except OSError as exc:
        raise WebstatsError(f"cannot read {where}: {exc.strerror}") from None


def parse_config_yaml(text: str) -> dict[str, str]:
    """Top-level ``key: value`` pairs of a YAML file (quotes removed; nested keys skipped).

    Enough for ``release_version``/``devel_version`` without a YAML dependency.
    """
    out: dict[str, str] = {}
    for line in text.split("\n"):  # not splitlines: U+2028 or \x1c is no line break here
        line = line.removesuffix("\r")
        if not line or line[0] in " \t#-":
            continue
        m = _TOP_KEY.match(line)
        if not m or m.group(1) in out:
            continue
        value = m.group(2)
        if value and value[0] in "\"'":
            end = value.find(value[0], 1)
            value = value[1:end] if end > 0 else value[1:]
        else:
            value = value.split(" #", 1)[0].strip()
        out[m.group(1)] = value
    return out


def parse_packages(data: bytes, where: str) -> frozenset[str]:
    """The ``Package:`` names of a Debian-control-like PACKAGES file, read a line at a time.

    A file without any Package: field, or with an invalid name, is an error: a sync from a
    truncated or wrong file must not close every package of the category.
    """
    names = set()
    for lineno, raw in enumerate(lines(data), 1):
        if not raw.startswith(b"Package:"):  # continuation lines start with white space
            continue
        # Only ASCII names pass; odd bytes elsewhere (Maintainer:) don't matter.
        name = raw[len(b"Package:") :].decode("utf-8", "replace").strip(" \t")
        if not PKG_NAME.match(name):
            raise WebstatsError(f"{where}:{lineno}: invalid package name {name[:80]!r}")
        problem = name_problem(name)
        if problem:
            raise WebstatsError(f"{where}:{lineno}: {problem}")
        names.add(name)
        if len(names) > MAX_PACKAGES:
            raise WebstatsError(f"{where}: more than {MAX_PACKAGES} packages, not a PACKAGES file")
    if not names:
        raise WebstatsError(f"{where}: no Package: fields (not a PACKAGES file?)")
    return frozenset(names)


def version_key(version: str) -> tuple[int, int]:
    """``3.9`` < ``3.10``: compare releases as numbers."""
    major, minor = version.split(".")
    return int(major), int(minor)


def read_manifest(source: str, timeout: float = FETCH_TIMEOUT) -> Manifest:
    """Read ``config.yaml`` and the four devel PACKAGES files; all or an error."""
    where = source.rstrip("/") + "/config.yaml"
    config = read_source(source, "config.yaml", timeout, MAX_CONFIG_BYTES)
    conf = parse_config_yaml(config.decode("utf-8-sig", errors="replace"))  # -sig: a BOM
    versions = {}
    for key in ("release_version", "devel_version"):
        value = conf.get(key, "")
        if not RELEASE.match(value):
            got = quoted(value) if value else "missing"
            raise WebstatsError(f"{where}: {key} must be a version like 3.20, got {got}")
        versions[key] = value
    if version_key(versions["devel_version"]) <= version_key(versions["release_version"]):
        raise WebstatsError(
            f"{where}: devel_version {versions['devel_version']} is not after "
            f"release_version {versions['release_version']}"
        )
    devel = {}
    for cat in CATEGORIES:
        rel = packages_path(cat.repo_path)
        file_where = source.rstrip("/") + "/" + rel
        devel[cat.prefix] = parse_packages(read_source(source, rel, timeout), file_where)
    return Manifest(source, versions["release_version"], versions["devel_version"], devel)
