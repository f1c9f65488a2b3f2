"""Alarms against moto's SNS (delivered to an SQS queue the test reads): the failure hook
without SSM, its fallback when SNS refuses, and the watchdog's checks — stale data, a daily
job that stopped succeeding, the web not answering, the site behind the database, a full
disk — each reaching the topic once, again while it lasts, and once when it clears."""

from __future__ import annotations

import datetime as dt
import json
import os

import boto3
import pytest

import webref
from bioc_webstats import alerts
from bioc_webstats.config import load_settings
from bioc_webstats.publish import publish
from bioc_webstats.store import db
from conftest import free_port
from test_aws import received, run_cli, topic_with_queue

NOW = dt.datetime(2024, 4, 2, 12, 0, tzinfo=dt.UTC)


def test_notify_failure_publishes_without_ssm(clean_env, aws_env):
    """The hook reads no SSM: with an unreachable SSM path configured it still alerts,
    through the topic kept on the instance."""
    topic, queue = topic_with_queue()
    (clean_env / "state" / "alerts").mkdir(parents=True)
    (clean_env / "state" / "alerts" / "topic").write_text(topic + "\n")
    res = run_cli(
        "notify-failure",
        "bioc-webstats-etl.service",
        WEBSTATS_SSM_PATH="/bioc/webstats/unreachable",
        AWS_ENDPOINT_URL_SSM=f"http://127.0.0.1:{free_port()}",
        MONITOR_SERVICE_RESULT="exit-code",
        MONITOR_EXIT_STATUS="1",
    )
    assert res.returncode == 0, res.stderr
    [line] = res.stderr.splitlines()
    assert line.startswith("bioc-webstats: bioc-webstats-etl.service failed on ")
    assert res.stdout == f"alert sent to {topic}\n"
    [note] = received(queue)
    assert note["Subject"].startswith("bioc-webstats: bioc-webstats-etl.service failed on ")
    body = note["Message"]
    assert "service_result: exit-code" in body and "exit_status: 1" in body
    assert "journalctl -u bioc-webstats-etl.service" in body


def test_an_env_file_that_is_not_utf8_is_one_line_and_the_hook_still_alerts(clean_env, aws_env):
    """A damaged env file (a stray Latin-1 byte): every command says so in one line, naming
    the line; the failure hook alerts anyway (through the topic kept on the instance)."""
    topic, queue = topic_with_queue()
    (clean_env / "state" / "alerts").mkdir(parents=True)
    (clean_env / "state" / "alerts" / "topic").write_text(topic + "\n")
    env_file = clean_env / "damaged.env"
    env_file.write_bytes(b"WEBSTATS_FLASK_LOG_LEVEL=INFO\nWEBSTATS_X=caf\xe9\n")
    res = run_cli("check", WEBSTATS_ENV_FILE=str(env_file))
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.splitlines() == [
        f"bioc-webstats: error: cannot read env file {env_file}: line 2 is not UTF-8"
    ]
    hook = run_cli("notify-failure", "bioc-webstats-etl.service", WEBSTATS_ENV_FILE=str(env_file))
    assert hook.returncode == 0 and hook.stdout == f"alert sent to {topic}\n", hook
    assert len(received(queue)) == 1


def test_notify_failure_with_a_mangled_unit_name_is_one_line(clean_env, aws_env):
    """A unit name with a line break, or thousands of characters (a hand, a bad template):
    still an alert; every line printed stays one line, cut to 200 characters."""
    topic, queue = topic_with_queue()
    down = f"http://127.0.0.1:{free_port()}"
    res = run_cli("notify-failure", "x\ny.service" + "z" * 5000,
                  WEBSTATS_ALERTS_SNS_TOPIC=topic, AWS_ENDPOINT_URL=down)  # fmt: skip
    assert res.returncode == 1
    record, crit, error = res.stderr.splitlines()
    assert crit.startswith("<2>bioc-webstats: ALERT NOT SENT") and len(crit) < 700
    assert record.startswith("bioc-webstats: xy.servicezzz") and len(record) < 400
    assert error.startswith("bioc-webstats: error: xy.servicezzz") and len(error) < 700
    ok = run_cli("notify-failure", "", WEBSTATS_ALERTS_SNS_TOPIC=topic)
    assert ok.returncode == 0 and ok.stdout == f"alert sent to {topic}\n"
    [note] = received(queue)
    assert note["Subject"].startswith("bioc-webstats: (no unit name) failed on ")


@pytest.mark.parametrize(
    "endpoint",
    [
        "http://127.0.0.1:99999",
        "http://[::1",
        "http://h:abc",
        "://x",
        "http://ünï.x",
        "http://a_b:1",
    ],
)
def test_an_endpoint_that_is_no_url_keeps_the_alert(clean_env, aws_env, endpoint):
    """AWS_ENDPOINT_URL in the env file (where the hook reads its AWS settings) that botocore
    cannot use: the hook died on a bare ValueError, the alert neither sent nor kept; check
    and the watchdog too. Now one line naming the variable (not its value); the alert kept."""
    topic, _queue = topic_with_queue()
    env_file = clean_env / "webstats.env"
    env_file.write_text(f"AWS_ENDPOINT_URL={endpoint}\nWEBSTATS_ALERTS_SNS_TOPIC={topic}\n")
    env = {"WEBSTATS_ENV_FILE": str(env_file), "AWS_ENDPOINT_URL": ""}
    res = run_cli("notify-failure", "bioc-webstats-etl.service", **env)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res
    why = "AWS_ENDPOINT_URL: not an http(s) URL with a host (and a valid port)"
    assert f"ALERT NOT SENT ({why})" in res.stderr and endpoint not in res.stderr
    assert len(list((clean_env / "state" / "alerts" / "spool").glob("*.json"))) == 1
    ssm = {**env, "WEBSTATS_SSM_PATH": "/bioc/webstats/t"}
    check = run_cli("check", **ssm)
    assert check.returncode == 1 and check.stderr == f"bioc-webstats: error: {why}\n", check
    watchdog = run_cli("watchdog", **ssm)  # an alarm, kept as the hook's
    assert watchdog.stdout.startswith(f"ALARM config: {why}") and "Traceback" not in watchdog.stderr


def test_notify_failure_alerts_once_an_hour_for_the_web_retrying(clean_env, aws_env):
    """The web service retrying a start while the database is down fails again and again
    (each try, each request on its socket): one alert, not one per try; the ETL alerts every
    time; an hour later the web alerts again."""
    topic, queue = topic_with_queue()
    env = {"WEBSTATS_ALERTS_SNS_TOPIC": topic}
    first = run_cli("notify-failure", "bioc-webstats.service", **env)
    assert first.returncode == 0 and first.stdout == f"alert sent to {topic}\n", first
    again = run_cli("notify-failure", "bioc-webstats.service", **env)
    assert again.returncode == 0, again
    assert again.stdout.startswith("bioc-webstats.service failed again: alerted at ")
    assert again.stdout.endswith(" UTC, not repeated within an hour\n")
    for _ in range(2):  # the ETL does not retry by itself: each failure is a run, each alerts
        other = run_cli("notify-failure", "bioc-webstats-etl.service", **env)
        assert other.stdout == f"alert sent to {topic}\n"
    subjects = [n["Subject"].split(" failed")[0] for n in received(queue)]
    assert sorted(subjects) == ["bioc-webstats: bioc-webstats-etl.service"] * 2 + [
        "bioc-webstats: bioc-webstats.service"
    ]
    state = clean_env / "state" / "alerts" / "hook-state.json"
    known = json.loads(state.read_text())
    known["bioc-webstats.service"] -= alerts.HOOK_REPEAT + 1  # an hour and a second ago
    state.write_text(json.dumps(known))
    later = run_cli("notify-failure", "bioc-webstats.service", **env)
    assert later.stdout == f"alert sent to {topic}\n"
    assert len(received(queue)) == 1


# (nested too deep for json: a RecursionError; not UTF-8: a UnicodeDecodeError, both tracebacks)
DAMAGED = ["[" * 200_000, b"\xe9\xe9"]


@pytest.mark.parametrize("junk", ["[]", '{"bioc-webstats.service": "noon"}', "{", "", *DAMAGED])
def test_notify_failure_alerts_over_a_damaged_hook_state(clean_env, aws_env, junk):
    """A hook state nobody can read (a full disk's half write, a hand edit) is no record: the
    web's failure alerts, once, and the state is written anew."""
    topic, queue = topic_with_queue()
    state = clean_env / "state" / "alerts" / "hook-state.json"
    state.parent.mkdir(parents=True, exist_ok=True)
    state.write_bytes(junk if isinstance(junk, bytes) else junk.encode())
    env = {"WEBSTATS_ALERTS_SNS_TOPIC": topic}
    first = run_cli("notify-failure", "bioc-webstats.service", **env)
    assert first.returncode == 0 and first.stdout == f"alert sent to {topic}\n", first
    again = run_cli("notify-failure", "bioc-webstats.service", **env)
    assert again.stdout.startswith("bioc-webstats.service failed again: alerted at "), again
    assert len(received(queue)) == 1
    assert list(json.loads(state.read_text())) == ["bioc-webstats.service"]


def test_notify_failure_falls_back_and_the_watchdog_sends_it_later(
    clean_env, aws_env, monkeypatch, db_url
):
    topic, queue = topic_with_queue()
    down = f"http://127.0.0.1:{free_port()}"
    res = run_cli(
        "notify-failure", "bioc-webstats.service",
        WEBSTATS_ALERTS_SNS_TOPIC=topic, AWS_ENDPOINT_URL=down,
    )  # fmt: skip
    assert res.returncode == 1
    assert "Traceback" not in res.stderr
    record, crit, error = res.stderr.splitlines()
    assert record.startswith("bioc-webstats: bioc-webstats.service failed on ")
    assert crit.startswith("<2>bioc-webstats: ALERT NOT SENT (cannot publish to SNS topic")
    assert error.startswith("bioc-webstats: error: bioc-webstats.service failure: alert not sent")
    spool = list((clean_env / "state" / "alerts" / "spool").glob("*.json"))
    assert len(spool) == 1
    # SNS is back: the next watchdog run sends what was kept
    monkeypatch.setenv("WEBSTATS_ALERTS_SNS_TOPIC", topic)
    monkeypatch.setenv("WEBSTATS_DATABASE_URL", db_url)
    alerts.watchdog(NOW)
    subjects = [n["Subject"] for n in received(queue)]
    assert any(s.startswith("bioc-webstats: bioc-webstats.service failed") for s in subjects)
    assert not list((clean_env / "state" / "alerts" / "spool").glob("*.json"))


def test_the_spool_keeps_the_newest_alerts_only(tmp_path):
    """Without a topic (or with SNS refusing for months) every alert was kept: a lasting alarm
    left about 1,500 files a year, all sent at once when a topic was set at last."""
    env = {"WEBSTATS_ENV_FILE": str(tmp_path / "none.env")}
    for i in range(alerts.SPOOL_KEEP + 30):
        line = alerts.send(tmp_path, f"bioc-webstats ALARM data-stale #{i}", "x" * 200, env)
        assert line.startswith("alert not sent (no SNS topic configured"), line
    spool = sorted((tmp_path / "alerts" / "spool").glob("*.json"))
    assert len(spool) == alerts.SPOOL_KEEP
    subjects = [json.loads(p.read_text())["subject"] for p in spool]
    assert subjects[0].endswith("#30") and subjects[-1].endswith(f"#{alerts.SPOOL_KEEP + 29}")


def test_a_grown_spool_is_not_sent_whole(tmp_path, aws_env):
    """A spool an earlier release let grow (no cap): a topic set at last sends the newest
    SPOOL_KEEP, not every alert of the months before."""
    topic, _ = topic_with_queue()
    spool = tmp_path / "alerts" / "spool"
    spool.mkdir(parents=True)
    for i in range(alerts.SPOOL_KEEP + 30):
        body = {"subject": f"bioc-webstats ALARM data-stale #{i}", "message": "x"}
        (spool / f"{1_700_000_000_000_000_000 + i}.json").write_text(json.dumps(body))
    assert alerts.resend_spooled(tmp_path, {"WEBSTATS_ALERTS_SNS_TOPIC": topic}) == (
        alerts.SPOOL_KEEP
    )
    assert list(spool.iterdir()) == []


def _loaded(db_url, valid_thru):
    with db.session_factory(db_url)() as s:
        webref.load_direct(s, valid_thru=valid_thru)


@pytest.fixture
def watched(clean_env, aws_env, monkeypatch, db_url):
    """Data through 2024-04-01 published, the web 'answering' on a URL the test serves."""
    import http.server
    import threading

    topic, queue = topic_with_queue()
    _loaded(db_url, dt.date(2024, 4, 1))
    for k, v in {
        "WEBSTATS_DATABASE_URL": db_url,
        "WEBSTATS_ALERTS_SNS_TOPIC": topic,
        "WEBSTATS_ALERTS_MIN_FREE_DISK": "0",
    }.items():
        monkeypatch.setenv(k, v)
    publish(load_settings())

    class Health(http.server.BaseHTTPRequestHandler):
        status = 200

        def do_GET(self):
            self.send_response(Health.status)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv(
        "WEBSTATS_ALERTS_HEALTH_URL", f"http://127.0.0.1:{server.server_port}/healthz"
    )
    yield topic, queue, Health, db_url
    server.shutdown()


def state_key(url: str) -> str:
    with db.session_factory(url)() as s:
        return db.data_state(s).key


def names(alarms) -> set[str]:
    return {a.name for a in alarms}


def test_watchdog_quiet_when_all_is_well(watched):
    _topic, _queue, _health, _url = watched
    alarms, lines = alerts.watchdog(NOW)
    assert alarms == [] and lines == []


def test_watchdog_heartbeat_to_cloudwatch(watched, monkeypatch):
    """With a namespace, each run puts Heartbeat 1 and the number of alarms into CloudWatch
    (what an alarm on a missing heartbeat watches); without one, nothing is sent."""
    cw = boto3.client("cloudwatch")
    assert "heartbeat" not in " ".join(alerts.watchdog(NOW)[1])
    monkeypatch.setenv("WEBSTATS_ALERTS_CLOUDWATCH_NAMESPACE", "bioc-webstats")
    later = NOW + dt.timedelta(hours=30)  # data-stale holds then
    alarms, lines = alerts.watchdog(later)
    assert names(alarms) == {"data-stale"}
    assert lines[-1] == "heartbeat sent to CloudWatch bioc-webstats (Environment=local)"
    dims = [{"Name": "Environment", "Value": "local"}]
    for metric, value in (("Heartbeat", 1.0), ("Alarms", 1.0)):
        got = cw.get_metric_statistics(
            Namespace="bioc-webstats", MetricName=metric, Dimensions=dims,
            StartTime=later - dt.timedelta(minutes=5), EndTime=later + dt.timedelta(minutes=5),
            Period=600, Statistics=["Maximum", "SampleCount"],
        )["Datapoints"]  # fmt: skip
        assert [(d["Maximum"], d["SampleCount"]) for d in got] == [(value, 1.0)], metric
    # CloudWatch unreachable: one line, the run goes on (the missing heartbeat is the alarm)
    monkeypatch.setenv("AWS_ENDPOINT_URL_CLOUDWATCH", f"http://127.0.0.1:{free_port()}")
    alarms, lines = alerts.watchdog(later)
    assert names(alarms) == {"data-stale"}
    assert lines[-1].startswith("heartbeat not sent to CloudWatch bioc-webstats: ")
    assert "\n" not in lines[-1]


def test_watchdog_stale_data_alerts_once_then_again_then_cleared(watched, monkeypatch):
    _topic, queue, _health, url = watched
    # ValidThru 2024-04-01 is 36 h behind 36 h after its end: not yet, then stale
    assert alerts.watchdog(dt.datetime(2024, 4, 3, 12, 0, tzinfo=dt.UTC))[0] == []
    later = NOW + dt.timedelta(hours=30)  # 42 h after the end of 2024-04-01
    alarms, lines = alerts.watchdog(later)
    assert names(alarms) == {"data-stale"}
    assert lines[0] == "ALARM data-stale: ValidThru 2024-04-01 is 42 h old (limit 36 h)"
    [note] = received(queue)
    assert note["Subject"].startswith("bioc-webstats ALARM data-stale on ")
    assert "RUNBOOK.md" in note["Message"]
    alerts.watchdog(later + dt.timedelta(minutes=15))  # still stale: not sent again yet
    alerts.watchdog(later + dt.timedelta(hours=6, minutes=1))  # due again
    assert [n["Subject"].split(" on ")[0] for n in received(queue)] == [
        "bioc-webstats ALARM data-stale"
    ]
    with db.session_factory(url)() as s:  # new data arrives
        db.advance_valid_thru(s, dt.date(2024, 4, 4))
        db.bump_data_version(s)
        s.commit()
    publish(load_settings())
    alarms, _ = alerts.watchdog(later + dt.timedelta(hours=7))
    assert alarms == []
    [cleared] = received(queue)
    assert cleared["Subject"].startswith("bioc-webstats cleared: data-stale on ")


def test_an_alarm_whose_check_cannot_run_is_not_cleared(watched, monkeypatch):
    """Stale data, then the database unreachable, then the configuration unreadable: the
    data-stale and web-down alarms were sent as "cleared" (SysOps told it was fixed) and
    raised anew once the database was back. Unknown is not fixed: only a check that ran
    clears its alarm."""
    _topic, queue, health, url = watched
    later = NOW + dt.timedelta(hours=30)
    health.status = 503
    assert names(alerts.watchdog(later)[0]) == {"data-stale", "web-down"}
    received(queue)
    down = f"postgresql+psycopg2://x@127.0.0.1:{free_port()}/x"
    monkeypatch.setenv("WEBSTATS_DATABASE_URL", down)
    alarms, _ = alerts.watchdog(later + dt.timedelta(minutes=10))
    assert names(alarms) == {"database", "web-down"}
    subjects = [n["Subject"].split(" on ")[0] for n in received(queue)]
    assert subjects == ["bioc-webstats ALARM database"]
    monkeypatch.setenv("WEBSTATS_SSM_PATH", "/bioc/webstats/missing")  # unreadable
    alarms, _ = alerts.watchdog(later + dt.timedelta(minutes=20))
    assert names(alarms) == {"config"}
    subjects = [n["Subject"].split(" on ")[0] for n in received(queue)]
    assert subjects == ["bioc-webstats ALARM config"]
    # everything back: what still holds is not sent again, the rest clears
    monkeypatch.delenv("WEBSTATS_SSM_PATH")
    monkeypatch.setenv("WEBSTATS_DATABASE_URL", url)
    health.status = 200
    alarms, _ = alerts.watchdog(later + dt.timedelta(minutes=30))
    assert names(alarms) == {"data-stale"}
    assert sorted(n["Subject"].split(" on ")[0] for n in received(queue)) == [
        "bioc-webstats cleared: config", "bioc-webstats cleared: database",
        "bioc-webstats cleared: web-down",
    ]  # fmt: skip


@pytest.mark.parametrize("junk", ['["data-stale"]', '{"data-stale": "yesterday"}', "{", *DAMAGED])
def test_watchdog_over_a_damaged_alarm_state_alerts(watched, junk):
    """An alarm state nobody can read is no record: the alarm is sent, not a traceback, and
    the state is written anew (so it is not sent again on the next run)."""
    _topic, queue, _health, _url = watched
    state = alerts.alerts_dir(load_settings().state_dir) / "state.json"
    state.parent.mkdir(parents=True, exist_ok=True)
    state.write_bytes(junk if isinstance(junk, bytes) else junk.encode())
    later = NOW + dt.timedelta(hours=30)
    alarms, _ = alerts.watchdog(later)
    assert names(alarms) == {"data-stale"}
    alerts.watchdog(later + dt.timedelta(minutes=15))
    assert [n["Subject"].split(" on ")[0] for n in received(queue)] == [
        "bioc-webstats ALARM data-stale"
    ]
    assert list(json.loads(state.read_text())) == ["data-stale"]


def test_a_damaged_meta_value_is_an_alarm_and_one_line(watched):
    """ValidThru set to garbage by hand: the watchdog alarms (it crashed, sending nothing),
    `status` says it in one line."""
    _topic, queue, _health, url = watched
    with db.session_factory(url)() as s:
        db.set_meta(s, db.VALID_THRU, "garbage")
        s.commit()
    alarms, _ = alerts.watchdog(NOW)
    assert names(alarms) == {"database"}
    [alarm] = alarms
    assert alarm.why.startswith("the database's meta valid_thru holds 'garbage', not a day")
    [note] = received(queue)
    assert note["Subject"].startswith("bioc-webstats ALARM database on ")
    res = run_cli("status", WEBSTATS_DATABASE_URL=url)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    [line] = res.stderr.splitlines()
    assert "meta valid_thru holds 'garbage'" in line


def test_a_bad_limit_is_a_config_alarm_and_the_checks_still_run(watched, monkeypatch):
    """A limit that is no number (alerts/min_free_disk 'abc': the watchdog exited before any
    alarm) is a config alarm; its default is used, so the check it bounds still runs."""
    _topic, queue, _health, _url = watched
    monkeypatch.setenv("WEBSTATS_ALERTS_MIN_FREE_DISK", "abc")
    monkeypatch.setenv("WEBSTATS_ALERTS_MAX_DATA_AGE", "nan")
    alarms, _ = alerts.watchdog(NOW + dt.timedelta(hours=30))
    assert names(alarms) == {"config", "data-stale"}
    whys = sorted(a.why for a in alarms if a.name == "config")
    assert whys == [
        "parameter alerts/max_data_age must be a number of hours, got 'nan'; 36 is used meanwhile",
        "parameter alerts/min_free_disk must be a number of percent from 0 to 100, got 'abc'; "
        "10 is used meanwhile",
    ]
    notes = {n["Subject"].split()[2]: n["Message"] for n in received(queue)}
    assert sorted(notes) == ["config", "data-stale"]
    # both reasons reach SysOps in the one config alert (the second was lost)
    assert all(why in notes["config"] for why in whys)
    # the database down: the bad limit is still a config alarm (it was dropped with the data
    # checks, and its alert sent as cleared), and data-stale is not known to be cleared
    down = f"postgresql+psycopg2://x@127.0.0.1:{free_port()}/x"
    monkeypatch.setenv("WEBSTATS_DATABASE_URL", down)
    alarms, _ = alerts.watchdog(NOW + dt.timedelta(hours=31))
    assert names(alarms) == {"config", "database"}
    assert [n["Subject"].split()[1:3] for n in received(queue)] == [["ALARM", "database"]]


def test_watchdog_daily_job_web_publish_and_disk(watched, monkeypatch):
    _topic, queue, health, url = watched
    with db.session_factory(url)() as s:
        db.set_meta(s, alerts.META_ETL_OK, (NOW - dt.timedelta(hours=50)).isoformat())
        db.set_meta(s, alerts.META_SYNC_OK, (NOW - dt.timedelta(hours=2)).isoformat())
        db.bump_data_version(s)  # a change nobody published
        s.commit()
    health.status = 503
    monkeypatch.setenv("WEBSTATS_ALERTS_MIN_FREE_DISK", "100")  # no disk is that empty
    alarms, lines = alerts.watchdog(NOW)
    assert names(alarms) == {"etl-not-run", "web-down", "disk-low"}  # its publish may be near
    assert "ALARM etl-not-run: last successful daily ETL run 50 h ago" in "\n".join(lines)
    got = {n["Subject"].split(" on ")[0] for n in received(queue)}
    assert got == {f"bioc-webstats ALARM {n}" for n in names(alarms)}
    later = NOW + dt.timedelta(seconds=alerts.PUBLISH_GRACE)
    alarms, lines = alerts.watchdog(later)
    assert names(alarms) == {"etl-not-run", "web-down", "publish-behind", "disk-low"}
    assert f"the database is at {state_key(url)} (since {NOW:%Y-%m-%d %H:%M} UTC)" in "\n".join(
        lines
    )
    got = [n["Subject"].split(" on ")[0] for n in received(queue)]
    assert got == ["bioc-webstats ALARM publish-behind"]


def test_a_data_version_on_its_way_to_the_site_is_no_alarm(watched):
    """The daily job commits, then publishes seconds later: a check in between does not
    alarm (it did, then cleared at the next check: two mails a few nights a year). A version
    left unpublished for PUBLISH_GRACE is one, and a new version starts its own wait."""
    _topic, queue, _health, url = watched
    grace = dt.timedelta(seconds=alerts.PUBLISH_GRACE)
    with db.session_factory(url)() as s:
        db.bump_data_version(s)  # committed, its publish on the way
        s.commit()
    assert alerts.watchdog(NOW)[0] == []
    publish(load_settings())  # it came
    assert alerts.watchdog(NOW + grace)[0] == []
    with db.session_factory(url)() as s:
        db.bump_data_version(s)
        s.commit()
    assert alerts.watchdog(NOW + grace)[0] == []  # seen from here, not from NOW
    assert alerts.watchdog(NOW + 2 * grace - dt.timedelta(seconds=1))[0] == []
    assert names(alerts.watchdog(NOW + 2 * grace)[0]) == {"publish-behind"}
    assert len(received(queue)) == 1


def test_watchdog_config_failure_is_an_alarm_through_the_kept_topic(clean_env, aws_env):
    topic, queue = topic_with_queue()
    (clean_env / "state" / "alerts").mkdir(parents=True)
    (clean_env / "state" / "alerts" / "topic").write_text(topic + "\n")
    res = run_cli("watchdog", WEBSTATS_SSM_PATH="/bioc/webstats/missing")
    assert res.returncode == 0, res.stderr
    assert "ALARM config: missing SSM parameters /bioc/webstats/missing/db/server" in res.stdout
    assert res.stdout.strip().endswith("watchdog: 1 alarms: config")
    [note] = received(queue)
    assert note["Subject"].startswith("bioc-webstats ALARM config on ")
    # the reason reaches SysOps in the body, with where to look
    assert "missing SSM parameters /bioc/webstats/missing/db/server" in note["Message"]
    assert "RUNBOOK.md, Alarms" in note["Message"]


def test_healthz_says_stale(db_url, clean_env, monkeypatch):
    from bioc_webstats import create_app

    _loaded(db_url, dt.date(2024, 4, 1))  # long ago
    monkeypatch.setenv("WEBSTATS_DATABASE_URL", db_url)
    r = create_app(load_settings()).test_client().get("/healthz")
    assert r.status_code == 200 and (r.json["status"], r.json["stale"]) == ("ok", True)
    monkeypatch.setenv("WEBSTATS_ALERTS_MAX_DATA_AGE", str(24 * 365 * 100))
    r = create_app(load_settings()).test_client().get("/healthz")
    assert r.status_code == 200 and (r.json["status"], r.json["stale"]) == ("ok", False)


def test_healthz_counts_the_age_from_the_end_of_valid_thru(clean_env, monkeypatch):
    """/healthz's "stale" as the watchdog counts it: yesterday's data is less than 24 h old
    until midnight (the ETL takes whole days), the day before's is more."""
    from bioc_webstats.web.app import _stale

    monkeypatch.setenv("WEBSTATS_ALERTS_MAX_DATA_AGE", "24")
    settings = load_settings()
    today = dt.datetime.now(dt.UTC).date()
    assert _stale(today - dt.timedelta(days=1), settings) is False
    assert _stale(today - dt.timedelta(days=2), settings) is True


def test_check_and_daily_keep_the_topic_for_the_hook(clean_env, aws_env, monkeypatch, db_url):
    """The web unit's check and the daily job keep alerts/sns_topic on the instance whenever
    they load the configuration, so the hook of a run that fails later (reading no SSM) knows
    where to alert, even before the watchdog's first run."""
    topic, _queue = topic_with_queue()
    kept = clean_env / "state" / "alerts" / "topic"
    env = {"WEBSTATS_DATABASE_URL": db_url, "WEBSTATS_ALERTS_SNS_TOPIC": topic}
    assert run_cli("db", "upgrade", **env).returncode == 0
    res = run_cli("check", "--login", "web", **env)
    assert res.returncode == 0, res.stderr
    assert kept.read_text().strip() == topic
    kept.unlink()
    run_cli("daily", "--source", str(clean_env / "no-such-logs"), **env)  # fails: no matter
    assert kept.read_text().strip() == topic


def test_notify_failure_takes_the_env_files_aws_settings(clean_env, aws_env, monkeypatch):
    """The hook's unit has only WEBSTATS_ENV_FILE: the AWS_* lines of that file (an endpoint,
    the credentials of a test) apply to its SNS call as to every other command."""
    topic, queue = topic_with_queue()
    (clean_env / "state" / "alerts").mkdir(parents=True)
    (clean_env / "state" / "alerts" / "topic").write_text(topic + "\n")
    env_file = clean_env / "hook.env"
    env_file.write_text(
        f"AWS_ENDPOINT_URL={aws_env}\nAWS_ACCESS_KEY_ID=testing\nAWS_SECRET_ACCESS_KEY=testing\n"
    )
    kept = {
        n: os.environ[n] for n in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    }
    for name in kept:
        monkeypatch.delenv(name)
    res = run_cli("notify-failure", "bioc-webstats-etl.service", WEBSTATS_ENV_FILE=str(env_file))
    for name, value in kept.items():  # this process reads the queue through moto again
        monkeypatch.setenv(name, value)
    assert res.returncode == 0, res.stderr
    assert res.stdout == f"alert sent to {topic}\n"
    [note] = received(queue)
    assert note["Subject"].startswith("bioc-webstats: bioc-webstats-etl.service failed on ")


def test_a_health_url_with_a_password_is_not_in_the_alarm():
    """The alarm's text reaches the journal, the spool and SNS: a health URL's user:password
    was in it, with urllib's "Name or service not known" for a cause."""
    [alarm] = alerts.web_check("https://admin:S3cr3t-PW@127.0.0.1:1/healthz")
    assert alarm.name == "web-down"
    assert alarm.why == (
        "https://***@127.0.0.1:1/healthz: alerts/health_url: credentials in the URL are not "
        "supported: the site must be public"
    )
    # an "@" in the query is no user:password (it was taken for one)
    [alarm] = alerts.web_check("http://127.0.0.1:1/healthz?from=ops@example.org")
    assert alarm.why.startswith("http://127.0.0.1:1/healthz?from=ops@example.org: "), alarm.why


@pytest.mark.parametrize(
    "parts,why",
    [
        ([(b"SSH-2.0-OpenSSH_9.6\r\n", 0)], "not a valid HTTP answer (BadStatusLine)"),
        ([(b"HTTP/1.1 200 OK\r\nX: " + b"y" * 70000 + b"\r\n\r\n", 0)], "not a valid HTTP answer"),
    ],
)
def test_a_health_url_answering_no_http_is_the_alarm_not_a_traceback(parts, why):
    """A port typo reaching sshd: http.client's exceptions are no OSError, and the watchdog
    ended in a traceback without sending the alarms it had found."""
    from test_packages import scripted_server

    with scripted_server(parts) as url:
        [alarm] = alerts.web_check(url + "/healthz")
    assert alarm.name == "web-down"
    assert alarm.why.startswith(f"{url}/healthz: {why}"), alarm.why


def test_a_health_url_that_is_not_http_is_named():
    [alarm] = alerts.web_check("ftp://127.0.0.1:1/healthz")
    assert alarm.why == "ftp://127.0.0.1:1/healthz: alerts/health_url: not an http(s) URL"
    # a line break or a bell in it cannot forge an ALARM line (journal, spool, SNS)
    [alarm] = alerts.web_check("x\nALARM forged: fake\a")
    assert alarm.why == "x\\nALARM forged: fake\\x07: alerts/health_url: not an http(s) URL"


def test_the_health_check_follows_a_redirect_without_reading_its_body():
    """urllib read a redirect's whole body before following it: a 2 GB one held 2 GB of the
    watchdog's memory; here one that stalls past the 10 s a read may take."""
    from test_packages import scripted_server

    with scripted_server([(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", 0)]) as target:
        head = (
            f"HTTP/1.1 302 Found\r\nLocation: {target}/healthz\r\nContent-Length: 9999999\r\n\r\n"
        )
        with scripted_server([(head.encode() + b"x" * 4096, 12.0)]) as url:
            assert alerts.web_check(url + "/healthz") == []


@pytest.mark.parametrize("junk", [b"\xe9\xe9", b"x" * (alerts.STATE_MAX + 1)])
def test_a_damaged_kept_topic_is_none(clean_env, junk):
    """The topic kept on disk, not UTF-8: `check`, `notify-failure` and the watchdog ended in
    a traceback (the hook sent nothing, kept nothing)."""
    kept = clean_env / "state" / "alerts" / "topic"
    kept.parent.mkdir(parents=True)
    kept.write_bytes(junk if isinstance(junk, bytes) else junk.encode())
    res = run_cli("notify-failure", "bioc-webstats-etl.service")
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert "alert not sent (no SNS topic configured" in res.stderr
    assert len(list((clean_env / "state" / "alerts" / "spool").glob("*.json"))) == 1


def test_a_health_url_redirected_where_it_may_not_go_says_why():
    from test_packages import scripted_server

    head = b"HTTP/1.1 302 Found\r\nLocation: ftp://127.0.0.1/healthz\r\nContent-Length: 0\r\n\r\n"
    with scripted_server([(head, 0)]) as url:
        [alarm] = alerts.web_check(url + "/healthz")
    assert alarm.why.startswith(
        f"{url}/healthz: HTTP 302 redirect to ftp://127.0.0.1/healthz refused"
    )
