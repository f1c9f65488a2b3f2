"""After any change of the statistics: publish the new data version, then tell the CDN.

One door for every kind of change (``etl run``, ``etl reingest``, ``import legacy-db``,
``stats rebuild``, ``packages load``/``sync``): the CLI runs each of them inside
:func:`after_change`, which compares the database's data version before and after and, when
it moved, lays out the new version's pages and files (:func:`publish`), switches the site to
it and invalidates CloudFront's cached ``/packages/stats/*`` when a distribution is
configured. The ETL and the web never call each other; this module sits on top of both.

What is published eagerly: every page and file that names no package (the index and
repository pages, the category files — the half-million-line ``bioc_pkg_stats.tab`` among
them —, the year files) and the static assets. Package pages and files are built on their
first request by the app, into the same version directory (``publish --all`` builds them all
now; docs/ARCHITECTURE.md has the figures of both).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass

from .config import Settings
from .errors import WebstatsError
from .store import db
from .web import report
from .web.app import StatsSite
from .web.site import CURRENT, PublishedSite, Version
from .web.targets import category_targets, package_bodies

log = logging.getLogger(__name__)


@dataclass
class PublishResult:
    """What :func:`publish` did."""

    key: str  # the data version published, <version>-<token>
    directory: str = ""
    built: int = 0
    present: int = 0  # already there (built by a request first, or an earlier publish)
    switched: bool = False
    moved_on: bool = False  # the data changed meanwhile: the rest is left to the next publish
    seconds: float = 0.0

    def line(self) -> str:
        text = (
            f"publish: data version {self.key} in {self.directory}, {self.built} files built, "
            f"{self.present} already there, {self.seconds:.1f}s"
        )
        if self.moved_on:
            text += " (stopped: the data version moved on meanwhile)"
        return text


def publish(settings: Settings, all_files: bool = False, force: bool = False) -> PublishResult:
    """Lay out the current data version's pages and files (every package's too with
    ``all_files``) in a version directory and switch the site to it; ``force`` makes a new
    directory even when the current one is of this data version (after a restore).
    Raises WebstatsError when the directory cannot be written."""
    t0 = time.monotonic()
    site = StatsSite(settings)
    state = site.state()
    snap = site.snapshot(state)
    try:
        version = site.site.open_version(state.key, force=force, valid_thru=state.valid_thru)
        result = PublishResult(state.key, version.path.name)
        site.write_assets(version)
        for target in category_targets(snap):
            if site.site.lookup(version, target.relpath) is not None:
                result.present += 1
                continue
            got = site.site.get_or_build(
                version,
                target.relpath,
                lambda t=target: site.build(t, snap, state.key),
                strict=True,
            )
            if isinstance(got, bytes):  # built from a newer data version: not stored
                result.moved_on = True
                break
            result.built += 1
        if all_files and not result.moved_on:
            _publish_packages(site, version, snap, state.key, result)
        result.switched = site.site.switch(version)
    except OSError as exc:
        where = exc.filename or settings.publish_dir
        raise WebstatsError(
            f"publish: cannot write {where}: {exc.strerror or exc}; the site keeps showing "
            "the version published before (run 'bioc-webstats publish' once it is fixed)"
        ) from None
    result.seconds = time.monotonic() - t0
    _remove_earlier_site(settings)
    return result


def _remove_earlier_site(settings: Settings) -> None:
    """Releases before 0.3.26 published into ``<state_dir>/site``, in the service user's own
    directory, where it could put a link in the publish directory's place while root's deploy
    set its owner and ACL. The deploy now puts it elsewhere (``web/publish_dir``); the first
    publish there removes the old one, as the service user (whose files they are)."""
    old = settings.state_dir / "site"
    if old.is_symlink() or not old.is_dir():
        return
    if settings.publish_dir.resolve().is_relative_to(old.resolve()):  # (the default, no deploy)
        return
    # Only what a publish makes (current, v… directories, .lock and .tmp-… files): a site left
    # in part by an earlier try is removed (and warned about) again, anything else is kept.
    names = [child.name for child in old.iterdir()]
    if not names or not all(n == CURRENT or n.startswith(("v", ".")) for n in names):
        return
    shutil.rmtree(old, ignore_errors=True)
    if old.exists():
        log.warning("publish: could not remove all of %s, the site of releases before 0.3.26 "
                    "(the site is %s): remove it by hand", old, settings.publish_dir)  # fmt: skip
    else:
        log.info("publish: removed %s, the site of releases before 0.3.26 (the site is %s)",
                 old, settings.publish_dir)  # fmt: skip


def _publish_packages(
    site: StatsSite, version: Version, snap: report.Snapshot, key: str, result: PublishResult
) -> None:
    """Every package page and file, from one consistent view read in a few streamed queries."""
    with site.session() as session:
        if session.get_bind().dialect.name == "postgresql":
            session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
        if db.data_state(session).key != key:
            result.moved_on = True
            return
        for target, body in package_bodies(session, snap):
            if site.site.lookup(version, target.relpath) is not None:
                result.present += 1
            else:
                site.site.write(version, target.relpath, body.encode())
                result.built += 1


def _key(settings: Settings) -> str | None:
    """The database's data version key, or None when it cannot be read (no schema yet)."""
    try:
        with db.session_factory(settings.database_url)() as session:
            return db.data_state(session).key
    except Exception:  # noqa: BLE001 - the command itself reports an unusable database
        return None


@contextlib.contextmanager
def after_change(settings: Settings) -> Iterator[None]:
    """Run a command that may change the statistics; when it did (also when it then failed
    part-way: what it committed is live), publish and invalidate the CDN. A failed publish
    or invalidation fails the command (the data is committed either way)."""
    before = _key(settings)
    try:
        yield
    except BaseException:
        if _changed(settings, before):
            try:
                _publish_and_invalidate(settings)
            except WebstatsError as exc:  # the command's own error is the one to report
                log.error("%s", exc)
        raise
    if _changed(settings, before):
        _publish_and_invalidate(settings)


def _changed(settings: Settings, before: str | None) -> bool:
    """The command changed the data, or the site is behind it: an earlier command was killed
    between its commit and its publish (the watchdog's publish-behind), and this one is the
    next chance to catch up."""
    after = _key(settings)
    if after is None:
        return False
    if after != before:
        return True
    if after.startswith("0-"):  # data version 0: nothing stored yet, nothing to catch up
        return False
    cur = PublishedSite(settings.publish_dir).current()
    return cur is None or cur.key != after


def _publish_and_invalidate(settings: Settings) -> None:
    from .aws import invalidate_stats_cache

    log.info("%s", publish(settings).line())
    try:
        inv = invalidate_stats_cache(settings)
    except WebstatsError as exc:
        raise WebstatsError(
            f"{exc} (the statistics are published; the CDN serves old pages until they expire)"
        ) from None
    if inv:
        log.info("CloudFront invalidation %s of /packages/stats/*", inv)
