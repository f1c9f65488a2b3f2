"""Alarms: the watchdog's checks, and how an alert reaches SysOps whatever has failed.

``bioc-webstats watchdog`` (a timer, every few minutes) checks what must hold for a service
nobody watches daily: the data is not older than ``alerts/max_data_age`` hours, the daily
ETL and the packages sync succeeded lately, the web answers on the public port, the site
published is the database's data version, the disks have room. Each failed check is an
alarm: one journal line ``ALARM <name>: <why>`` and an SNS message (again every
``RESEND`` while it lasts, and once more when it clears).

An alert must not depend on what failed: the SNS topic is kept on the instance
(``<state_dir>/alerts/topic``, written whenever the configuration was read successfully, or
``WEBSTATS_ALERTS_SNS_TOPIC`` in the env file), never re-read from SSM at that moment; the
configuration itself failing to load is an alarm; an alert that SNS does not take is kept in
``<state_dir>/alerts/spool/`` and logged at priority ``crit``, and the next watchdog run sends
it again.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .config import BY_NAME, DEFAULT_ENV_FILE, Settings, read_env_file, state_dir
from .errors import ConfigError, WebstatsError, first_line, printable
from .files import write_atomic
from .httpbody import BodyError, FetchFailed, is_http, mask, read_local, status, url_problem

RUNBOOK = "/usr/local/share/doc/bioc-webstats/RUNBOOK.md"
RESEND = 6 * 3600  # seconds between two alerts for the same lasting alarm
# The web service retries a failed start by itself (Restart=, no start limit): while the
# database is down it fails again and again (each request on its socket one more try). One
# failure alert an hour for it, and for the web's configuration, written again every 5
# minutes; a unit that does not retry (the ETL, the watchdog: each failure is another run)
# alerts every time.
HOOK_REPEAT = 3600
# A data version left unpublished this long is an alarm: every writer publishes right after
# its commit (seconds; minutes for a whole history), and a check in between is not one.
PUBLISH_GRACE = 15 * 60
# Unsent alerts kept (the newest): without a topic, or with SNS refusing for months, the spool
# would grow by every alert, and a topic set at last would send them all.
SPOOL_KEEP = 100
STATE_MAX = 1 << 20  # bytes of a file of the alerts directory: a few hundred are ours
RETRYING_UNITS = frozenset({"bioc-webstats.service", "bioc-webstats-web-config.service"})
META_ETL_OK = "last_etl_ok"  # ISO timestamps written by the daily job (`bioc-webstats daily`)
META_SYNC_OK = "last_sync_ok"
WATCHDOG_AGENT = f"bioc-webstats-watchdog/{__version__}"


@dataclass(frozen=True)
class Alarm:
    name: str  # data-stale, etl-not-run, sync-not-run, web-down, publish-behind, disk-low, config
    why: str

    def __post_init__(self) -> None:  # a value it quotes (a URL) cannot forge an ALARM line
        object.__setattr__(self, "why", printable(self.why))


def _crit(line: str) -> None:
    """A journal record at priority crit (systemd reads the ``<2>`` prefix on stderr)."""
    sys.stderr.write(f"<2>{line}\n")
    sys.stderr.flush()


# --- where alerts go ---------------------------------------------------------------------


def alerts_dir(sdir: Path) -> Path:
    return sdir / "alerts"


def _read_state(path: Path) -> str | None:
    """A file of this directory as text, or None when it cannot be one of ours (missing, a
    FIFO, not UTF-8, larger than STATE_MAX): its callers then act as if it were missing.
    A damaged file here made the commands that alert end in a traceback, alerting nobody."""
    try:
        return read_local(path, STATE_MAX).decode()
    except (OSError, BodyError, UnicodeDecodeError):
        return None


def _read_json(path: Path) -> object:
    text = _read_state(path)
    try:
        return None if text is None else json.loads(text)
    except (ValueError, RecursionError):  # half written, edited; [[[[… 200,000 deep
        return None


def remember_topic(settings: Settings) -> None:
    """Keep ``alerts/sns_topic`` on the instance for the moments SSM cannot be read."""
    topic = settings.get("alerts/sns_topic") or ""
    path = alerts_dir(settings.state_dir) / "topic"
    try:
        kept = _read_state(path)
        if kept is not None and kept.strip() == topic:
            return
        if not topic and not path.exists():
            return  # nothing to keep, nothing to clear (and no directory made for it)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, topic + "\n")
    except OSError:
        pass  # a read-only state directory (a SysOps shell): the last kept topic stays


def kept_topic(sdir: Path, environ: dict[str, str] | None = None) -> str | None:
    """The topic without SSM: the environment, the env file, else the one kept on disk."""
    env = dict(os.environ if environ is None else environ)
    if env.get("WEBSTATS_ALERTS_SNS_TOPIC"):
        return env["WEBSTATS_ALERTS_SNS_TOPIC"]
    env_file = Path(env.get("WEBSTATS_ENV_FILE") or DEFAULT_ENV_FILE)
    try:
        topic = (
            read_env_file(env_file).get("WEBSTATS_ALERTS_SNS_TOPIC") if env_file.is_file() else None
        )
    except WebstatsError:
        topic = None
    if topic:
        return topic
    return (_read_state(alerts_dir(sdir) / "topic") or "").strip() or None


def send(sdir: Path, subject: str, message: str, environ: dict[str, str] | None = None) -> str:
    """Deliver one alert: SNS when a topic is known and takes it, else the spool (sent again
    by the next watchdog run) and a crit journal record. Returns what happened, one line."""
    from .aws import publish_to_topic

    topic = kept_topic(sdir, environ)
    if topic:
        try:
            publish_to_topic(topic, subject, message)
            return f"alert sent to {topic}"
        except WebstatsError as exc:
            why = str(exc)
    else:
        why = "no SNS topic configured (alerts/sns_topic)"
    spooled = _spool(sdir, subject, message)
    _crit(f"bioc-webstats: ALERT NOT SENT ({why}): {subject}")
    return f"alert not sent ({why}); " + (f"kept in {spooled}" if spooled else "not kept either")


def _read_stamps(path: Path) -> dict[str, float]:
    """A state file of {name: epoch seconds}; what cannot be read as that (missing, a half
    write, a hand edit) is no record, which makes the caller alert: the safe side."""
    known = _read_json(path)
    if not isinstance(known, dict):
        return {}
    return {
        str(k): float(v)
        for k, v in known.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }


def _hook_state(sdir: Path) -> Path:
    return alerts_dir(sdir) / "hook-state.json"


def last_alert(sdir: Path, unit: str, now: float) -> float | None:
    """When the failure hook last alerted (sent or kept) for ``unit``, if within HOOK_REPEAT
    seconds of ``now``; else None."""
    last = _read_stamps(_hook_state(sdir)).get(unit)
    return last if last is not None and 0 <= now - last < HOOK_REPEAT else None


def record_alert(sdir: Path, unit: str, now: float) -> None:
    """Record ``now`` as the failure hook's last alert for ``unit`` (older records dropped)."""
    path = _hook_state(sdir)
    known = {u: t for u, t in _read_stamps(path).items() if now - t < HOOK_REPEAT}
    known[unit] = now
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(known))
    except OSError:
        pass  # no record: the next failure alerts again, which is the safe side


def _spool(sdir: Path, subject: str, message: str) -> Path | None:
    spool = alerts_dir(sdir) / "spool"
    try:
        spool.mkdir(parents=True, exist_ok=True)
        path = spool / f"{time.time_ns()}.json"
        write_atomic(path, json.dumps({"subject": subject, "message": message}))
    except OSError:
        return None
    _prune_spool(spool)
    return path


def _prune_spool(spool: Path) -> None:
    """Keep the newest SPOOL_KEEP (each alert is in the journal too)."""
    with contextlib.suppress(OSError):
        for stale in sorted(spool.glob("*.json"))[:-SPOOL_KEEP]:
            stale.unlink(missing_ok=True)


def resend_spooled(sdir: Path, environ: dict[str, str] | None = None) -> int:
    """Send what the spool holds (oldest first); returns how many went out."""
    from .aws import publish_to_topic

    topic = kept_topic(sdir, environ)
    spool = alerts_dir(sdir) / "spool"
    if not topic or not spool.is_dir():
        return 0
    _prune_spool(spool)  # a spool an earlier release let grow is not sent whole
    sent = 0
    for path in sorted(spool.glob("*.json")):
        item = _read_json(path)
        try:
            publish_to_topic(topic, item["subject"], item["message"])
        except (ValueError, KeyError, TypeError):
            path.unlink(missing_ok=True)  # unreadable: nothing to send
            continue
        except WebstatsError:
            break  # SNS still refuses: keep the rest for the next run
        path.unlink(missing_ok=True)
        sent += 1
    return sent


# --- the checks --------------------------------------------------------------------------


def _limit(settings: Settings, name: str, alarms: list[Alarm]) -> float:
    """The limit ``name`` (:meth:`Settings.get_float`), or its default with a ``config``
    alarm: a bad limit must not stop the checks it bounds."""
    try:
        return settings.get_float(name)
    except ConfigError as exc:
        default = float(BY_NAME[name].default)  # type: ignore[arg-type]
        alarms.append(Alarm("config", f"{exc}; {default:g} is used meanwhile"))
        return default


def data_checks(settings: Settings, now: dt.datetime) -> list[Alarm]:
    """Data age, the daily job's last successes, the published version (needs the database)."""
    from sqlalchemy.exc import SQLAlchemyError

    from .store import db

    alarms: list[Alarm] = []
    max_age = _limit(settings, "alerts/max_data_age", alarms)
    max_run = _limit(settings, "alerts/max_run_age", alarms)
    try:
        with db.session_factory(settings.database_url)() as session:
            state = db.data_state(session)
            etl_ok = db.get_meta(session, META_ETL_OK)
            sync_ok = db.get_meta(session, META_SYNC_OK)
    except SQLAlchemyError as exc:  # (the limits' own alarms stand: they were checked)
        return [*alarms, Alarm("database", f"cannot read the database: {first_line(exc)}")]
    except db.DamagedMetaError as exc:
        return [*alarms, Alarm("database", str(exc))]
    vt = state.valid_thru
    if vt is not None:
        age = db.data_age_hours(vt, now)
        if age > max_age:
            alarms.append(
                Alarm("data-stale", f"ValidThru {vt} is {age:.0f} h old (limit {max_age:g} h)")
            )
    for name, value, what in (
        ("etl-not-run", etl_ok, "daily ETL run"),
        ("sync-not-run", sync_ok, "packages sync"),
    ):
        if value is None:
            continue  # never ran yet (a fresh instance): the data age speaks for it
        try:
            when = dt.datetime.fromisoformat(value)
        except ValueError:
            continue
        hours = (now - when).total_seconds() / 3600
        if hours > max_run:
            alarms.append(Alarm(name, f"last successful {what} {hours:.0f} h ago ({value})"))
    from .web.site import PublishedSite

    cur = PublishedSite(settings.publish_dir).current()
    behind = bool(state.version) and (cur is None or cur.key != state.key)
    since = _behind_since(settings.state_dir, state.key if behind else None, now)
    if since is not None and (now - since).total_seconds() >= PUBLISH_GRACE:
        shown = cur.key if cur else "nothing"
        alarms.append(
            Alarm(
                "publish-behind",
                f"the site shows {shown}, the database is at {state.key} (since "
                f"{since:%Y-%m-%d %H:%M} UTC): run 'bioc-webstats publish'",
            )
        )
    return alarms


def _behind_since(sdir: Path, key: str | None, now: dt.datetime) -> dt.datetime | None:
    """Since when the database's data version ``key`` has been seen unpublished (None: it is
    published), kept in the alerts directory from one check to the next. A newer version
    starts its own wait: a long command (an import, a file at a time) commits versions for
    hours and publishes at its end, and a publish of its that fails fails the command."""
    path = alerts_dir(sdir) / "publish-behind.json"
    kept = _read_json(path)
    try:
        since = dt.datetime.fromisoformat(kept["since"]) if kept["key"] == key else None
    except (ValueError, TypeError, KeyError):
        since = None  # none kept, or damaged: seen from now on
    if since is not None and (since.tzinfo is None or since > now):
        since = None  # damaged, or the clock went back
    try:
        if key is None:
            path.unlink(missing_ok=True)
        elif since is None:
            since = now
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, json.dumps({"key": key, "since": now.isoformat()}))
    except OSError:
        return now - dt.timedelta(seconds=PUBLISH_GRACE) if key is not None else None
    return since


def web_check(url: str) -> list[Alarm]:
    # The alarm's text goes to the journal, the spool and SNS: never a URL's user:password
    # (urllib takes none: its "host not found" named the wrong cause).
    problem = url_problem(url) if is_http(url) else "not an http(s) URL"
    if problem:
        return [Alarm("web-down", f"{mask(url)}: alerts/health_url: {problem}")]
    try:
        # Bounded as every fetch of ours: a deadline, no redirect's body read, and an answer
        # that is not HTTP (a port typo reaching sshd) is this alarm, not a traceback.
        code = status(url, WATCHDOG_AGENT, timeout=10, deadline=30)
    except FetchFailed as exc:
        return [Alarm("web-down", f"{url}: {exc}")]
    return [] if code == 200 else [Alarm("web-down", f"{url} answered {code}")]


def disk_checks(paths: list[Path], min_free: float) -> list[Alarm]:
    alarms = []
    seen = set()
    for path in paths:
        try:
            st = os.stat(path)
            usage = shutil.disk_usage(path)
        except OSError:
            continue
        if st.st_dev in seen:
            continue
        seen.add(st.st_dev)
        free = 100.0 * usage.free / usage.total if usage.total else 100.0
        if free < min_free:
            alarms.append(Alarm("disk-low", f"{path}: {free:.1f}% free (limit {min_free:g}%)"))
    return alarms


# --- the watchdog ------------------------------------------------------------------------


# The alarms the checks that need the database raise, and those that need the configuration:
# when a check cannot run, its alarm is neither raised nor cleared (unknown is not fixed).
DATA_ALARMS = frozenset({"data-stale", "etl-not-run", "sync-not-run", "publish-behind"})
HOST_ALARMS = frozenset({"database", "web-down", "disk-low"}) | DATA_ALARMS


def watchdog(now: dt.datetime | None = None) -> tuple[list[Alarm], list[str]]:
    """Run every check, alert on new, lasting and cleared alarms; returns (alarms, lines)."""
    from .config import load_settings

    now = now or dt.datetime.now(dt.UTC)
    env = dict(os.environ)
    sdir = state_dir(env)
    alarms: list[Alarm] = []
    settings: Settings | None = None
    try:
        settings = load_settings()
    except WebstatsError as exc:
        alarms.append(Alarm("config", str(exc)))
    data_checked = False
    if settings is not None:
        sdir = settings.state_dir
        remember_topic(settings)
        try:
            found = data_checks(settings, now)
            alarms += found
            data_checked = not any(a.name == "database" for a in found)
        except WebstatsError as exc:  # (the database login's secret unreadable, say)
            alarms.append(Alarm("config", str(exc)))
        url = settings.get("alerts/health_url") or "http://127.0.0.1:8000/healthz"
        alarms += web_check(url)
        log_dir = Path(settings.get("gunicorn/error_log") or "/var/log/x").parent
        min_free = _limit(settings, "alerts/min_free_disk", alarms)
        alarms += disk_checks([sdir, settings.publish_dir, log_dir], min_free)
    lines = [f"ALARM {a.name}: {a.why}" for a in alarms]
    if settings is None:
        unchecked = HOST_ALARMS
    elif not data_checked:
        unchecked = DATA_ALARMS
    else:
        unchecked = frozenset()
    lines += _notify(sdir, alarms, now, unchecked)
    namespace = settings.get("alerts/cloudwatch_namespace") if settings is not None else None
    if settings is not None and namespace:
        lines.append(heartbeat(settings, namespace, alarms, now))
    sent = resend_spooled(sdir)
    if sent:
        lines.append(f"{sent} kept alerts sent")
    return alarms, lines


def heartbeat(settings: Settings, namespace: str, alarms: list[Alarm], now: dt.datetime) -> str:
    """The watchdog's heartbeat to CloudWatch ``namespace`` (``alerts/cloudwatch_namespace``):
    ``Heartbeat`` 1 and ``Alarms`` (how many hold), by ``Environment`` (the SSM path's last
    part). An alarm in CloudWatch on a missing heartbeat (playbooks/alarms.yml) is what tells
    of a host that is down, stopped or cut off: nothing on the host can."""
    from .aws import _aws_errors, client, describe_error

    env = settings.ssm_path.rsplit("/", 1)[-1] if settings.ssm_path else "local"
    dims = [{"Name": "Environment", "Value": env}]
    data = [
        {"MetricName": "Heartbeat", "Dimensions": dims, "Timestamp": now, "Value": 1.0},
        {"MetricName": "Alarms", "Dimensions": dims, "Timestamp": now, "Value": len(alarms)},
    ]
    try:
        client("cloudwatch", settings.aws_region).put_metric_data(
            Namespace=namespace, MetricData=data
        )
    except _aws_errors() as exc:  # the alarm on the missing heartbeat tells of it
        return f"heartbeat not sent to CloudWatch {namespace}: {describe_error(exc)}"
    except ConfigError as exc:  # an endpoint override that is no URL
        return f"heartbeat not sent to CloudWatch {namespace}: {exc}"
    return f"heartbeat sent to CloudWatch {namespace} (Environment={env})"


def _notify(
    sdir: Path, alarms: list[Alarm], now: dt.datetime, unchecked: frozenset[str] = frozenset()
) -> list[str]:
    """Alert on alarms that are new or due again, and on those that cleared (not on those
    whose check could not run: ``unchecked``)."""
    import socket

    path = alerts_dir(sdir) / "state.json"
    known = _read_stamps(path)
    host = socket.gethostname()
    lines: list[str] = []
    stamp = now.timestamp()
    # One alert per name, holding every reason (two bad limits are two lines of one alert).
    current: dict[str, list[str]] = {}
    for alarm in alarms:
        current.setdefault(alarm.name, []).append(alarm.why)
    for name, whys in current.items():
        if stamp - known.get(name, 0.0) >= RESEND:
            subject = f"bioc-webstats ALARM {name} on {host}"
            body = "\n".join(whys) + (
                "\n\nRunbook: /usr/local/share/doc/bioc-webstats/RUNBOOK.md, Alarms.\n"
            )
            lines.append(f"{name}: {send(sdir, subject, body)}")
            known[name] = stamp
    for name in [n for n in known if n not in current and n not in unchecked]:
        subject = f"bioc-webstats cleared: {name} on {host}"
        outcome = send(sdir, subject, name + " no longer holds.\n")
        lines.append(f"{name} cleared: {outcome}")
        del known[name]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(known))
    except OSError as exc:
        lines.append(f"cannot keep the alarm state in {path}: {exc.strerror}")
    return lines
