"""The daily job (the ETL timer's one command) and the facts a watchdog reads.

``bioc-webstats daily`` = ``packages sync`` then ``etl run``, each published when it changed
the statistics. A sync that fails (or stops at its change limit) is reported in one line and
does not stop the ETL; the job exits non-zero when either step failed, so systemd's
``OnFailure=`` hook (and its alarm) fires. Each step that succeeds records when, in ``meta``
(``last_sync_ok``, ``last_etl_ok``, ISO 8601 UTC): a watchdog that finds them too old knows
the job failed or did not run, without depending on the job itself.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from . import __version__
from .config import Settings
from .errors import WebstatsError, first_line, printable
from .store import db

log = logging.getLogger(__name__)

LAST_SYNC_OK = "last_sync_ok"
LAST_ETL_OK = "last_etl_ok"


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def record_success(settings: Settings, key: str) -> str:
    """Store the time a step succeeded (its own small transaction; no data version bump)."""
    when = _now()
    with db.session_factory(settings.database_url).begin() as session:
        db.set_meta(session, key, when)
    return when


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, WebstatsError):  # ours: one line already, unless a value it quotes
        return printable(str(exc))
    if isinstance(exc, SQLAlchemyError):
        return "database: " + first_line(db.what_happened(exc))
    return first_line(exc)


@dataclass
class DailyResult:
    """What the daily job did: the failed steps and their one-line reasons."""

    failures: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failures

    def line(self) -> str:
        def state(step: str) -> str:
            return f"{step} failed" if step in self.failures else f"{step} ok"

        return f"daily: {state('packages sync')}, {state('etl run')}"


def _step(
    settings: Settings, result: DailyResult, name: str, work: Callable[[], bool], key: str
) -> None:
    """Run one step; a failure becomes one line in ``result``, a success a ``meta`` time."""
    try:
        ok = work()
    except (WebstatsError, SQLAlchemyError, OSError) as exc:  # (named once: RUNBOOK's row)
        result.failures[name] = _one_line(exc).removeprefix(f"{name}: ")
        log.error("%s failed: %s", name, result.failures[name])
        return
    except Exception as exc:  # a defect: the next step (the ETL after the sync) still runs
        result.failures[name] = f"unexpected {type(exc).__name__}: {_one_line(exc)}"
        log.error("%s failed: %s", name, result.failures[name])
        log.debug("%s: the traceback", name, exc_info=True)
        return
    if not ok:
        result.failures[name] = "some objects failed (see above); retried on the next run"
        log.error("%s failed: %s", name, result.failures[name])
        return
    try:
        record_success(settings, key)
    except (WebstatsError, SQLAlchemyError) as exc:  # the step's work is done and kept
        result.failures[name] = f"done, but its success not recorded: {_one_line(exc)}"
        log.error("%s: %s", name, result.failures[name])


def run_daily(
    settings: Settings,
    source: str | None = None,
    packages_from: str | None = None,
) -> DailyResult:
    """packages sync (failure reported, not fatal), then etl run; each published when it
    changed the statistics (:func:`bioc_webstats.publish.after_change`)."""
    from .etl import ingest, packages
    from .publish import after_change

    result = DailyResult()

    def sync() -> bool:
        with after_change(settings):
            report = packages.sync(settings, source=packages_from, dry_run=False, force=False)
        for text in report.splitlines():
            log.info("%s", text)
        return True

    def etl() -> bool:
        with after_change(settings):
            return ingest.run(settings, source=source)

    _step(settings, result, "packages sync", sync, LAST_SYNC_OK)
    _step(settings, result, "etl run", etl, LAST_ETL_OK)
    return result


# --- status -----------------------------------------------------------------------------------


def _age(when: dt.datetime | None, now: dt.datetime) -> str:
    if when is None:
        return ""
    hours = (now - when).total_seconds() / 3600
    return f" ({hours:.0f} h ago)" if hours < 72 else f" ({hours / 24:.0f} days ago)"


def _parse(value: str | None) -> dt.datetime | None:
    if not value:
        return None
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def status(settings: Settings) -> dict[str, object]:
    """The facts SysOps and a watchdog look at, from the database and the published site."""
    from .etl.ingest import logs_since
    from .web.site import PublishedSite

    # First, and whatever it finds: a schema behind this release fails the queries below
    # (a release installed, not migrated), and the line saying so is the fact that matters.
    try:
        schema = db.schema_status(settings.database_url)
        revision, problem = schema.revision, None if schema.ok else schema.reason
    except WebstatsError as exc:  # alembic_version edited by hand
        revision, problem = None, str(exc)
    try:
        facts = _database_facts(settings)
    except SQLAlchemyError:
        if problem is None:
            raise
        raise WebstatsError(f"database: {problem}") from None  # (its error names a column)
    facts["schema"], facts["schema_problem"] = revision, problem  # (schema: as /healthz's)
    try:
        cutover = logs_since(settings)
    except WebstatsError as exc:  # the other facts still stand (the CLI fails after them)
        cutover, facts["config_error"] = None, str(exc)
    facts["logs_since"] = cutover.isoformat() if cutover else None
    current = PublishedSite(settings.publish_dir).current()
    facts["published"] = current.key if current else None
    facts["published_at"] = (
        dt.datetime.fromtimestamp(current.published, dt.UTC).isoformat(timespec="seconds")
        if current
        else None
    )
    return facts


def _database_facts(settings: Settings) -> dict[str, object]:
    from .etl.ingest import log_objects
    from .etl.packages import SEEDED
    from .store.models import IngestedObject, Package

    with db.session_factory(settings.database_url)() as session:
        state = db.data_state(session)
        newest = session.scalar(select(func.max(IngestedObject.name_hour)).where(log_objects()))
        retry = db.get_retry_from(session)
        return {
            "version": __version__,
            "valid_thru": state.valid_thru.isoformat() if state.valid_thru else None,
            "data_version": state.key,
            LAST_SYNC_OK: db.get_meta(session, LAST_SYNC_OK),
            LAST_ETL_OK: db.get_meta(session, LAST_ETL_OK),
            "packages": session.scalar(select(func.count()).select_from(Package)) or 0,
            "packages_seeded_not_synced": db.get_meta(session, SEEDED),
            # log objects only: the legacy import's units share the ledger
            "objects_ingested": session.scalar(
                select(func.count()).select_from(IngestedObject).where(log_objects())
            )
            or 0,
            "retry_from": retry.isoformat() if retry else None,
            "newest_object_hour": newest.isoformat(timespec="hours") if newest else None,
        }


def status_lines(facts: dict[str, object], now: dt.datetime | None = None) -> list[str]:
    """``status`` for a person: one fact a line, with ages."""
    now = now or dt.datetime.now(dt.UTC)
    vt = facts["valid_thru"]
    vt_age = ""
    if isinstance(vt, str):
        end = db.valid_thru_end(dt.date.fromisoformat(vt))  # as /healthz, the watchdog
        vt_age = _age(end, now).replace(" (", " (ended ", 1)
    published = facts["published"]
    same = published == facts["data_version"]
    pub = "nothing published yet" if published is None else str(published)
    if published is not None and not same:
        pub += f" (the database is at {facts['data_version']}: run 'bioc-webstats publish')"
    seeded = facts["packages_seeded_not_synced"]
    return [
        f"bioc-webstats {facts['version']}"
        + (f"; database {facts['schema_problem']}" if facts.get("schema_problem") else ""),
        f"ValidThru: {vt or 'no data yet'}{vt_age}",
        f"data version: {facts['data_version']}",
        f"published: {pub}",
        f"last packages sync ok: {facts[LAST_SYNC_OK] or 'never'}"
        + _age(_parse(str(facts[LAST_SYNC_OK] or "")), now),
        f"last ETL run ok: {facts[LAST_ETL_OK] or 'never'}"
        + _age(_parse(str(facts[LAST_ETL_OK] or "")), now),
        f"packages: {facts['packages']} rows"
        + (f" (seeded {seeded}, not synced since)" if seeded else ""),
        f"log objects ingested: {facts['objects_ingested']}, newest named "
        f"{facts['newest_object_hour'] or '-'}"
        + (
            f"; failed ones named from {facts['retry_from']} are retried by every run"
            if facts.get("retry_from")
            else ""
        ),
        f"cut-over day (etl/logs_since): {facts['logs_since'] or 'not set'}",
    ]
