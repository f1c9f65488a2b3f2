"""Bioconductor's own manifest: ``config.yaml`` (release/devel versions) and devel ``PACKAGES``.

Read from a base URL (``https://bioconductor.org``) or a local directory holding the same
relative paths. Every failure — HTTP error, timeout, unreachable host, missing file, a file
that does not look like what it should — is one WebstatsError line naming the file.
"""

from __future__ import annotations

import http.client
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from ..categories import CATEGORIES
from ..errors import WebstatsError
from ..httpbody import BodyError, http_error, no_credentials, not_http, read_body

FETCH_TIMEOUT = 30.0  # seconds, per read
FETCH_DEADLINE = 300.0  # seconds, per file
MAX_BYTES = 64 * 1024 * 1024  # the largest PACKAGES today is a few MB

# A release X.Y, as config.yaml and the packages CSV give it (its column holds 16 characters).
RELEASE = re.compile(r"^\d{1,3}\.\d{1,3}$")
_TOP_KEY = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\s*:\s*(.*?)\s*$")
# A valid R package name (etl.md): letters, digits and dots, starts with a letter.
_PKG_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9.]*[A-Za-z0-9]$")


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


def is_url(source: str) -> bool:
    """Whether the source is fetched over HTTP(S) rather than read from a directory."""
    return source.startswith(("http://", "https://"))


def read_text(source: str, relpath: str, timeout: float = FETCH_TIMEOUT) -> str:
    """The text of ``relpath`` under ``source`` (a base URL or a directory)."""
    if is_url(source):
        no_credentials(source, "packages source")
        url = source.rstrip("/") + "/" + relpath
        agent = {"User-Agent": f"bioc-webstats/{__version__}"}
        try:
            req = urllib.request.Request(url, headers=agent)  # noqa: S310 - is_url(): http(s)
            with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310
                data = read_body(resp, MAX_BYTES, FETCH_DEADLINE)
        except BodyError as exc:
            raise WebstatsError(f"cannot fetch {url}: {exc}") from None
        except urllib.error.HTTPError as exc:
            raise WebstatsError(f"cannot fetch {url}: {http_error(exc)}") from None
        except urllib.error.URLError as exc:
            raise WebstatsError(f"cannot fetch {url}: {_reason(exc.reason)}") from None
        except (TimeoutError, OSError) as exc:  # a read that stalls after the headers
            raise WebstatsError(f"cannot fetch {url}: {_reason(exc)}") from None
        except http.client.HTTPException as exc:
            raise WebstatsError(f"cannot fetch {url}: {not_http(exc)}") from None
        except ValueError as exc:  # not a URL urllib can use ("http://[::1")
            raise WebstatsError(f"packages source {source}: {exc}") from None
        where = url
    else:
        base = Path(source.removeprefix("file://"))
        if not base.is_dir():
            raise WebstatsError(f"packages source {source}: not a directory nor an http(s):// URL")
        where = str(base / relpath)
        try:
            with open(where, "rb") as fh:
                data = fh.read(MAX_BYTES + 1)
        except OSError as exc:
            raise WebstatsError(f"cannot read {where}: {exc.strerror}") from None
    if len(data) > MAX_BYTES:
        raise WebstatsError(f"{where}: larger than {MAX_BYTES} bytes, not a PACKAGES file")
    # Only ASCII names are taken from the text; odd bytes elsewhere (Maintainer:) don't matter.
    return data.decode("utf-8", errors="replace")


def _reason(reason: object) -> str:
    if isinstance(reason, TimeoutError) or "timed out" in str(reason):
        return "timed out"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason) or type(reason).__name__


def parse_config_yaml(text: str) -> dict[str, str]:
    """Top-level ``key: value`` pairs of a YAML file (quotes removed; nested keys skipped).

    Enough for ``release_version``/``devel_version`` without a YAML dependency.
    """
    out: dict[str, str] = {}
    for line in text.splitlines():
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


def parse_packages(text: str, where: str) -> frozenset[str]:
    """The ``Package:`` names of a Debian-control-like PACKAGES file.

    A file without any Package: field, or with an invalid name, is an error: a sync from a
    truncated or wrong file must not close every package of the category.
    """
    names = set()
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.startswith("Package:"):  # continuation lines start with white space
            continue
        name = line[len("Package:") :].strip()
        if not _PKG_NAME.match(name):
            raise WebstatsError(f"{where}:{lineno}: invalid package name {name[:80]!r}")
        names.add(name)
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
    conf = parse_config_yaml(read_text(source, "config.yaml", timeout))
    versions = {}
    for key in ("release_version", "devel_version"):
        value = conf.get(key, "")
        if not RELEASE.match(value):
            got = f"{value!r}" if value else "missing"
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
        devel[cat.prefix] = parse_packages(read_text(source, rel, timeout), file_where)
    return Manifest(source, versions["release_version"], versions["devel_version"], devel)
