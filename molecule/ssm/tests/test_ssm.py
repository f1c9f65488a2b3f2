"""Units configured through SSM Parameter Store (moto on the controller's loopback).

The env file holds the SSM path and the test-only endpoint; the database (a PostgreSQL standing
in for RDS), the secrets and the ETL's settings come from ``/bioc/webstats/test/`` and the DB
login secret. A missing parameter fails a unit at start with one clear line naming it, and no
secret value ever shows in the journal, the log files, the env file or ``systemctl show``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from testlib import Service, run_ok, run_playbook, wait_for

WEB = "bioc-webstats.service"
WEB_CONFIG = "bioc-webstats-web-config.service"  # writes the web's file from SSM
WEB_FILE = "/run/bioc-webstats-web-config/web.env"
ETL = "bioc-webstats-etl.service"
UNITS = [
    "bioc-webstats.socket",
    WEB,
    WEB_CONFIG,
    ETL,
    "bioc-webstats-etl.timer",
    "bioc-webstats-web-config.timer",
    "bioc-webstats.target",
]
ENV_FILE = "/etc/bioc-webstats/webstats.env"
BW = "bioc-webstats"  # the CLI the deploy installs for root (RUNBOOK)


def moto_client(state: dict, service: str):
    """A boto3 client of the scenario's moto server (what the instance reaches as AWS)."""
    return boto3.client(
        service,
        region_name=state["region"],
        endpoint_url=f"http://127.0.0.1:{state['moto_port']}",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


@pytest.fixture(scope="module")
def state() -> dict:
    return json.loads((Path(os.environ["WEBSTATS_SSM_FIXTURE_DIR"]) / "state.json").read_text())


@pytest.fixture(scope="module")
def ssm_service(state) -> Service:
    return Service(f"http://127.0.0.1:{state['web_port']}")


@pytest.fixture(scope="module")
def ssm(state):
    return moto_client(state, "ssm")


def show(host, unit: str, *props: str) -> dict[str, str]:
    out = run_ok(host, f"systemctl show {unit} " + " ".join(f"-p {p}" for p in props))
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def healthy(service: Service) -> bool:
    health = service.healthz()
    return bool(health and health["status"] == "ok" and health["database"] and not health["stale"])


def test_env_file_names_only_the_path(host, state):
    env = host.file(ENV_FILE).content_string
    assert f"WEBSTATS_SSM_PATH={state['ssm_path']}" in env
    assert "WEBSTATS_DATABASE_URL" not in env
    for value in state["secrets"].values():
        assert value not in env


def test_service_runs_on_the_ssm_configuration(host, ssm_service, state):
    health = wait_for(lambda: healthy(ssm_service) and ssm_service.healthz(), 60, "/healthz")
    assert health["database"] is True  # reached with db/* from SSM and the secret's password
    shown = run_ok(host, f"{BW} config show")
    for name in ("db/server", "db/port", "flask/secret_key", "etl/ip_hash_key"):
        line = next(ln for ln in shown.splitlines() if name in ln)
        assert f"ssm {state['ssm_path']}/{name}" in line, line
    for value in state["secrets"].values():
        assert value not in shown


def test_every_database_connection_verifies_the_server(host, ssm_service, state):
    """As production: the deploy installed the database's CA bundle, and every login connects
    verify-full against it (the fixture's server also refuses a TCP login without TLS, as RDS
    with rds.force_ssl, so the running service is itself the proof of TLS). Against other CAs
    (the system's), the same host's check fails on the certificate."""
    ca_file = "/usr/local/share/bioc-webstats/db-ca.pem"
    env = host.file(ENV_FILE).content_string
    assert "WEBSTATS_DB_SSLMODE=verify-full" in env.splitlines()
    assert f"WEBSTATS_DB_SSLROOTCERT={ca_file}" in env.splitlines()
    ca = host.file(ca_file)
    assert (ca.user, ca.group, ca.mode) == ("root", "root", 0o644)
    fixture_ca = Path(os.environ["WEBSTATS_SSM_FIXTURE_DIR"]) / "ca.pem"
    assert ca.content_string.strip() == fixture_ca.read_text().strip()
    assert wait_for(lambda: healthy(ssm_service), 60, "/healthz")
    shown = run_ok(host, f"{BW} config show").splitlines()
    assert f"db/sslmode = verify-full  (env file {ENV_FILE})" in shown
    other = host.run(f"WEBSTATS_DB_SSLROOTCERT=/etc/ssl/certs/ca-certificates.crt {BW} check")
    assert other.rc == 1 and "certificate verify failed" in other.stderr, other


def test_ssm_does_not_move_the_hosts_layout(host, state):
    """A publish directory set in SSM (shared by the environment's instances) would have the
    ETL publish where nginx does not look: the deploy's own value stays, and config show says
    why the parameter is not applied."""
    ssm = moto_client(state, "ssm")
    name = f"{state['ssm_path']}/web/publish_dir"
    ssm.put_parameter(Name=name, Type="String", Value="/srv/elsewhere", Overwrite=True)
    try:
        shown = run_ok(host, f"{BW} config show").splitlines()
    finally:
        ssm.delete_parameter(Name=name)
    assert (
        "web/publish_dir = /var/lib/bioc-webstats-site  (env file /etc/bioc-webstats/webstats.env)"
        in shown
    )
    assert (
        f"# ignored: SSM parameter {name}: this host's value is the deploy's "
        "(WEBSTATS_WEB_PUBLISH_DIR in the env file)"
    ) in shown


def test_etl_through_systemd_with_ssm_settings(host, state):
    run_ok(host, f"{BW} packages load /srv/bioc-webstats/packages.csv")
    run_ok(host, f"systemctl start {ETL}", timeout=600)
    assert run_ok(host, f"systemctl show -p Result --value {ETL}").strip() == "success"
    journal = run_ok(host, f"journalctl -u {ETL} -o cat")
    assert "etl run:" in journal and "objects ingested" in journal


# --- the heartbeat, and the alarm on its absence (CloudWatch, moto) -----------------------------


def test_heartbeat_and_the_alarm_on_its_absence(host, state, runbook):
    """RUNBOOK "Alarms": with alerts/cloudwatch_namespace set, the watchdog puts a heartbeat
    into CloudWatch; playbooks/alarms.yml, as written, creates the alarm on it going missing,
    and the alarm on the database's free storage, which notify the alert topic."""
    cw = moto_client(state, "cloudwatch")
    with no_timer_run(host):  # the run started here, not one of the timer's begun before
        mark = cursor(host)
        run_ok(host, "systemctl start bioc-webstats-watchdog.service", timeout=300)
    journal = run_ok(
        host, f"journalctl -u bioc-webstats-watchdog.service -o cat --after-cursor='{mark}'"
    )
    assert "heartbeat sent to CloudWatch bioc-webstats (Environment=test)" in journal, journal
    metrics = cw.list_metrics(Namespace="bioc-webstats", MetricName="Heartbeat")["Metrics"]
    assert [m["Dimensions"] for m in metrics] == [[{"Name": "Environment", "Value": "test"}]]
    # the database (RDS in production: here an instance in moto, 100 GiB, named by the
    # scenario's webstats_alarms_db_instance)
    rds = moto_client(state, "rds")
    try:  # (made once: a second `molecule verify` finds it)
        rds.create_db_instance(
            DBInstanceIdentifier="bioc-webstats-test", DBInstanceClass="db.t4g.small",
            Engine="postgres", AllocatedStorage=100, MasterUsername="postgres",
            MasterUserPassword="not-used-here",
        )  # fmt: skip
    except rds.exceptions.DBInstanceAlreadyExistsFault:
        pass
    res = run_playbook(runbook("ansible-playbook playbooks/alarms.yml -i inventory/production"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    [alarm] = cw.describe_alarms(AlarmNames=["bioc-webstats-test-heartbeat"])["MetricAlarms"]
    assert (alarm["Namespace"], alarm["MetricName"], alarm["Dimensions"]) == (
        "bioc-webstats",
        "Heartbeat",
        [{"Name": "Environment", "Value": "test"}],
    )
    assert (alarm["TreatMissingData"], alarm["ComparisonOperator"]) == (
        "breaching",
        "LessThanThreshold",
    )
    assert alarm["AlarmActions"] == alarm["OKActions"] == [state["topic_arn"]]
    # the database's disk, which nothing on the instance sees: under 10 % (alerts/min_free_disk)
    # of its 100 GiB free
    [db] = cw.describe_alarms(AlarmNames=["bioc-webstats-test-db-storage"])["MetricAlarms"]
    assert (db["Namespace"], db["MetricName"], db["Dimensions"]) == (
        "AWS/RDS",
        "FreeStorageSpace",
        [{"Name": "DBInstanceIdentifier", "Value": "bioc-webstats-test"}],
    )
    assert (db["Statistic"], db["ComparisonOperator"], db["Threshold"]) == (
        "Minimum",
        "LessThanThreshold",
        10 * 2**30,
    )
    assert db["AlarmActions"] == db["OKActions"] == [state["topic_arn"]]
    again = run_playbook(runbook("ansible-playbook playbooks/alarms.yml -i inventory/production"))
    assert again.returncode == 0 and "changed=0" in again.stdout, again.stdout[-2000:]


# --- backups off the host ------------------------------------------------------------------------


def backups_in_s3(state) -> dict[str, str]:
    """key -> server-side encryption of the objects under the scenario's backup prefix."""
    s3 = moto_client(state, "s3")
    listed = s3.list_objects_v2(Bucket="bioc-webstats-backups", Prefix="test/")
    return {
        o["Key"]: s3.head_object(Bucket="bioc-webstats-backups", Key=o["Key"]).get(
            "ServerSideEncryption", ""
        )
        for o in listed.get("Contents", [])
    }


def test_the_backup_before_the_migration_is_also_in_s3(host, state):
    """The first deploy migrated (a fresh database): its backup went to the host and to S3,
    where the inventory's webstats_base_backup_s3_url says (a copy that outlives the instance)."""
    local = run_ok(host, "ls -1 /var/backups/bioc-webstats/").split()
    pre = [d for d in local if re.fullmatch(r"pre-[0-9.]+-\d{8}T\d{6}Z\.dump", d)]
    assert len(pre) == 1, local
    stored = backups_in_s3(state)
    assert stored.get(f"test/{pre[0]}") == "AES256", stored


def test_special_backup_on_the_instance(host, state, runbook):
    """RUNBOOK "Backups", on demand on the instance (Session Manager): the command as written,
    with this scenario's S3 prefix."""
    cmd = runbook(
        "sudo env WEBSTATS_ENV_FILE=/etc/bioc-webstats/webstats.env "
        "/opt/bioc-webstats/current/bin/bioc-webstats db backup "
        "/var/backups/bioc-webstats/webstats-$(date -u +%Y%m%dT%H%M%SZ).dump "
        "--s3 s3://bioc-webstats-backups/prod/",
        {"s3://bioc-webstats-backups/prod/": "s3://bioc-webstats-backups/test/"},
    )
    out = run_ok(host, cmd)
    found = re.fullmatch(
        r"backup: /var/backups/bioc-webstats/(webstats-\d{8}T\d{6}Z\.dump) \(\d+ bytes\), "
        r"uploaded to s3://bioc-webstats-backups/test/(webstats-\d{8}T\d{6}Z\.dump)\n",
        out,
    )
    assert found and found[1] == found[2], out
    dump = host.file(f"/var/backups/bioc-webstats/{found[1]}")
    assert (dump.user, dump.mode) == ("root", 0o600)
    assert backups_in_s3(state).get(f"test/{found[1]}") == "AES256"
    assert "TABLE DATA public download_records" in run_ok(host, f"pg_restore --list {dump.path}")


@pytest.mark.parametrize(
    # required by default (config.DEFAULT_REQUIRED); flask/secret_key no longer is. The web
    # reads no SSM: the unit that writes its file does.
    ("unit", "name"),
    [(WEB_CONFIG, "etl/ip_hash_key"), (ETL, "etl/ip_hash_key"), (WEB_CONFIG, "db/server")],
)
def test_missing_parameter_fails_the_unit_with_one_clear_line(
    host, ssm, ssm_service, state, unit, name
):
    full = f"{state['ssm_path']}/{name}"
    kept = ssm.get_parameter(Name=full, WithDecryption=True)["Parameter"]
    cursor = run_ok(host, "journalctl --show-cursor -n 0 -o cat").strip().split("cursor: ")[-1]
    # the writer's 5-minute timer would start it again right after the failure (a flake)
    timer = f"{unit.removesuffix('.service')}.timer"
    pause = unit == WEB_CONFIG
    if pause:
        run_ok(host, f"systemctl stop {timer}")
    ssm.delete_parameter(Name=full)
    try:
        res = host.run(f"timeout 300 systemctl restart {unit}")
        assert res.rc != 0, f"{unit} started without {full}"
        # failed, or waiting for its next automatic restart (Restart=on-failure): not running
        state = show(host, unit, "ActiveState", "SubState", "Result")
        assert state["Result"] != "success" or state["ActiveState"] == "failed", state
        assert state["ActiveState"] != "active", state
        journal = run_ok(host, f"journalctl -u {unit} -o cat --after-cursor='{cursor}'")
        errors = [ln for ln in journal.splitlines() if "bioc-webstats: error:" in ln]
        assert errors, journal[-2000:]
        assert set(errors) == {f"bioc-webstats: error: missing SSM parameter {full}"}, errors
        assert "Traceback" not in journal
    finally:
        ssm.put_parameter(Name=full, Type=kept["Type"], Value=kept["Value"], Overwrite=True)
        if pause:
            run_ok(host, f"systemctl start {timer}")
    run_ok(host, f"systemctl reset-failed {unit}")
    if unit == WEB_CONFIG:
        run_ok(host, f"systemctl start {WEB_CONFIG}")
        assert wait_for(lambda: healthy(ssm_service), 60, "/healthz")
    else:
        run_ok(host, f"systemctl start {ETL}", timeout=600)
        assert run_ok(host, f"systemctl show -p Result --value {ETL}").strip() == "success"


def test_the_web_has_no_way_to_the_instance_role_and_reads_its_own_file(host, ssm_service, state):
    """The web unit cannot reach the instance metadata service (where the role's credentials
    are) and its process has neither AWS settings nor an SSM path: what it knows is the file
    the configuration unit wrote, which holds its own login and no other secret."""
    assert wait_for(lambda: healthy(ssm_service), 60, "/healthz")
    deny = show(host, WEB, "IPAddressDeny")["IPAddressDeny"].split()
    assert set(deny) == {"169.254.169.254/32", "fd00:ec2::254/128"}, deny
    pid = run_ok(host, f"systemctl show -p MainPID --value {WEB}").strip()
    # as the web's user: root in the container may not read another process's environ
    environ = run_ok(host, f"runuser -u webstats-web -- cat /proc/{pid}/environ").split("\0")
    assert f"WEBSTATS_ENV_FILE={WEB_FILE}" in environ, environ
    assert not [v for v in environ if v.startswith(("AWS_", "WEBSTATS_SSM"))], environ
    web_file = host.file(WEB_FILE)
    # written by the service user in the web's group, which reads it; nobody else does
    assert (web_file.user, web_file.group, web_file.mode) == ("webstats", "webstats-web", 0o640)
    folder = host.file(str(Path(WEB_FILE).parent))
    assert (folder.user, folder.group, folder.mode) == ("webstats", "webstats-web", 0o750)
    text = web_file.content_string
    assert "WEBSTATS_DATABASE_URL_WEB=postgresql+psycopg2://webstats_web:" in text
    assert "WEBSTATS_SSM_PATH" not in text and "AWS_" not in text
    for name, value in state["secrets"].items():
        if name != "db_web_password":
            assert value not in text, f"{name} is in the web's file"
    # the gunicorn workers read nothing else (no SSM, no secret) either
    workers = run_ok(host, f"pgrep -P {pid}").split()
    assert workers
    for worker in workers:
        env = run_ok(host, f"runuser -u webstats-web -- cat /proc/{worker}/environ")
        env = env.split("\0")
        assert not [v for v in env if v.startswith(("AWS_", "WEBSTATS_SSM"))], env


def test_the_web_keeps_its_last_configuration_and_recovers_by_itself(host, ssm, ssm_service, state):
    """SSM unreadable at a restart: the web starts with the file it had (the writer's failure
    alarms). After a reboot there is no file (it is in /run): the web cannot start, and once
    the parameter is back it comes up by itself (Restart= starts the writer first)."""
    full = f"{state['ssm_path']}/db/server"
    kept = ssm.get_parameter(Name=full)["Parameter"]
    since = cursor(host)
    ssm.delete_parameter(Name=full)
    try:
        run_ok(host, f"systemctl restart {WEB}", timeout=300)
        assert wait_for(lambda: healthy(ssm_service), 60, "/healthz with the last file")
        assert show(host, WEB_CONFIG, "Result")["Result"] != "success"
        assert f"missing SSM parameter {full}" in run_ok(
            host, f"journalctl -u {WEB_CONFIG} -o cat --after-cursor='{since}'"
        )
        run_ok(host, f"rm {WEB_FILE}")  # as after a reboot: /run is empty
        res = host.run(f"timeout 300 systemctl restart {WEB}")
        assert res.rc != 0, "the web started without a configuration"
        assert show(host, WEB, "ActiveState")["ActiveState"] != "active"
        journal = run_ok(host, f"journalctl -u {WEB} -o cat --after-cursor='{since}'")
        assert f"bioc-webstats: error: cannot read env file {WEB_FILE}: No such file" in journal
        assert "Traceback" not in journal
    finally:
        ssm.put_parameter(Name=full, Type=kept["Type"], Value=kept["Value"], Overwrite=True)
    # no hand step: the web's next automatic restart runs the writer, which now succeeds
    assert wait_for(lambda: healthy(ssm_service), 120, "/healthz once SSM answers again")
    assert host.file(WEB_FILE).exists
    run_ok(host, f"systemctl reset-failed {WEB_CONFIG}")


# --- alarms: through SNS (moto) to the SQS queue subscribed to alerts/sns_topic ---------------


@pytest.fixture(scope="module")
def sqs(state):
    return moto_client(state, "sqs")


def alerts_until(sqs, state, pred, timeout: float = 60) -> dict:
    """SNS notifications delivered to the queue (long polls, bounded), until one matches."""
    seen: list[str] = []

    def poll():
        res = sqs.receive_message(
            QueueUrl=state["queue_url"], MaxNumberOfMessages=10, WaitTimeSeconds=2
        )
        for msg in res.get("Messages", []):
            sqs.delete_message(QueueUrl=state["queue_url"], ReceiptHandle=msg["ReceiptHandle"])
            note = json.loads(msg["Body"])
            seen.append(note.get("Subject", ""))
            if pred(note):
                return note
        return None

    return wait_for(poll, timeout, f"the alert in SQS (seen: {seen})", interval=0)


def drain(sqs, state) -> None:
    """Delete what the queue holds now (PurgeQueue is allowed once a minute only)."""
    while True:
        res = sqs.receive_message(QueueUrl=state["queue_url"], MaxNumberOfMessages=10)
        if not res.get("Messages"):
            return
        for msg in res["Messages"]:
            sqs.delete_message(QueueUrl=state["queue_url"], ReceiptHandle=msg["ReceiptHandle"])


def cursor(host) -> str:
    return run_ok(host, "journalctl --show-cursor -n 0 -o cat").strip().split("cursor: ")[-1]


def test_a_failed_etl_run_alerts_through_the_failure_hook(host, ssm, sqs, state):
    """A log source that cannot be read: the daily job fails, OnFailure= runs the hook, its
    alert arrives through SNS; the journal says it was sent."""
    name = f"{state['ssm_path']}/etl/s3_download_logs"
    kept = ssm.get_parameter(Name=name)["Parameter"]["Value"]
    drain(sqs, state)  # the alerts of the tests above
    since = cursor(host)
    ssm.put_parameter(
        Name=name, Type="String", Value="/srv/bioc-webstats/no-such-logs", Overwrite=True
    )
    try:
        res = host.run(f"timeout 600 systemctl start {ETL}")
        assert res.rc != 0, "the run with an unreadable log source succeeded"
        hook = f"bioc-webstats-failure@{ETL}.service"
        note = alerts_until(sqs, state, lambda n: ETL in n.get("Subject", ""))
        assert note["Subject"] == f"bioc-webstats: {ETL} failed on webstats-ssm"
        assert note["TopicArn"] == state["topic_arn"]
        assert f"journalctl -u {ETL}" in note["Message"]
        journal = run_ok(host, f"journalctl -u {hook} -o cat --after-cursor='{since}'")
        assert f"alert sent to {state['topic_arn']}" in journal, journal
        assert "no-such-logs" in run_ok(
            host, f"journalctl -u {ETL} -o cat --after-cursor='{since}'"
        )
    finally:
        ssm.put_parameter(Name=name, Type="String", Value=kept, Overwrite=True)
    run_ok(host, f"systemctl reset-failed {ETL}")
    run_ok(host, f"systemctl start {ETL}", timeout=600)
    assert run_ok(host, f"systemctl show -p Result --value {ETL}").strip() == "success"


def test_stale_data_raises_the_data_stale_alarm_then_clears(host, ssm, sqs, state, ssm_service):
    """The sample's data is from 2024: with alerts/max_data_age at 1 hour the watchdog raises
    data-stale (journal + SNS); /healthz says "stale": true (200, status ok) once the web
    reads the new limit; back at the old limit, the alarm clears."""
    name = f"{state['ssm_path']}/alerts/max_data_age"
    with no_timer_run(host):
        _stale_then_cleared(host, ssm, sqs, state, ssm_service, name)


@contextlib.contextmanager
def no_timer_run(host) -> Iterator[None]:
    """The watchdog timer stopped (and a run of its own ended) meanwhile: a run it began is
    the run a `systemctl start` of the oneshot joins, with what it read before (every 10
    minutes, within a randomized minute: it met the stale-data test in a CI run, and no
    "cleared" came)."""
    run_ok(host, "systemctl stop bioc-webstats-watchdog.timer")
    try:
        wait_for(
            lambda: (
                host.run("systemctl is-active bioc-webstats-watchdog.service").stdout.strip()
                != "activating"
            ),
            300,
            "the timer's watchdog run to end",
        )
        yield
    finally:
        run_ok(host, "systemctl start bioc-webstats-watchdog.timer")


def _stale_then_cleared(host, ssm, sqs, state, ssm_service, name: str) -> None:
    drain(sqs, state)
    since = cursor(host)
    ssm.put_parameter(Name=name, Type="String", Value="1", Overwrite=True)
    try:
        run_ok(host, "systemctl start bioc-webstats-watchdog.service", timeout=120)
        note = alerts_until(sqs, state, lambda n: "data-stale" in n.get("Subject", ""))
        assert note["Subject"] == "bioc-webstats ALARM data-stale on webstats-ssm"
        assert "ValidThru 2024-" in note["Message"] and "limit 1 h" in note["Message"]
        journal = run_ok(
            host, f"journalctl -u bioc-webstats-watchdog.service -o cat --after-cursor='{since}'"
        )
        assert "ALARM data-stale: ValidThru 2024-" in journal, journal
        assert "watchdog: 1 alarms: data-stale" in journal, journal
        run_ok(host, f"systemctl restart {WEB}")  # the web reads its limits at start
        res = wait_for(lambda: (r := ssm_service.get("/healthz")).ok and r, 60, "/healthz")
        assert res.status_code == 200, res.text
        assert (res.json()["status"], res.json()["stale"]) == ("ok", True), res.text
    finally:
        ssm.delete_parameter(Name=name)  # back to the env file's limit
    run_ok(host, "systemctl start bioc-webstats-watchdog.service", timeout=120)
    note = alerts_until(sqs, state, lambda n: "cleared" in n.get("Subject", ""))
    assert note["Subject"] == "bioc-webstats cleared: data-stale on webstats-ssm"
    run_ok(host, f"systemctl restart {WEB}")
    wait_for(lambda: healthy(ssm_service), 60, "/healthz ok again")


# --- the three logins from their secrets; a rotated password without a restart ------------------


def test_each_process_logs_in_with_its_own_secret(host, ssm_service, state):
    shown = run_ok(host, f"{BW} config show")
    assert "secret /bioc/rdb/0/login/webstats_runner" in shown
    assert "webstats_owner" not in shown  # the deploy gave the owner's login on stdin
    assert ssm_service.get("/packages/stats/bioc/bioc_stats.tab").status_code == 200
    sessions = run_ok(host, psql_admin(state, "SELECT DISTINCT usename FROM pg_stat_activity "
                                              "WHERE datname = 'webstats'"))  # fmt: skip
    assert "webstats_web" in sessions.split(), sessions
    owners = run_ok(host, psql_admin(state, "SELECT DISTINCT tableowner FROM pg_tables "
                                            "WHERE schemaname = 'public'"))  # fmt: skip
    assert owners.split() == ["webstats_owner"], owners


def psql_admin(state, sql: str) -> str:
    """``sql`` as the master login (from its secret's value in the fixture's state)."""
    import shlex

    pw = state["secrets"]["db_master_password"]
    return (f"PGPASSWORD={shlex.quote(pw)} psql -X -At -h 127.0.0.1 -p {state['pg_port']} "
            f"-U postgres -d webstats -c {shlex.quote(sql)}")  # fmt: skip


def test_rotate_the_web_password_through_its_secret_without_a_restart(
    host, ssm_service, state, runbook
):
    """RUNBOOK "Rotate a password", production: the new password into the secret (the
    runbook's `aws secretsmanager put-secret-value`, here through boto3: there is no AWS CLI on
    the controller), then db-bootstrap.yml as written sets it in PostgreSQL from the secret.
    The web service is not restarted: once its old sessions are gone it logs in again with the
    secret's new value."""
    import secrets as pysecrets

    secret_id = "/bioc/rdb/0/login/webstats_web"
    sm = boto3.client(
        "secretsmanager",
        region_name=state["region"],
        endpoint_url=f"http://127.0.0.1:{state['moto_port']}",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    put = f"aws secretsmanager put-secret-value --secret-id {secret_id} "
    assert [c for c in runbook.commands if c.startswith(put)], "not in docs/RUNBOOK.md"
    pid = run_ok(host, f"systemctl show -p MainPID --value {WEB}").strip()
    new = pysecrets.token_urlsafe(24)
    sm.put_secret_value(
        SecretId=secret_id, SecretString=json.dumps({"username": "webstats_web", "password": new})
    )
    res = run_playbook(
        runbook("ansible-playbook playbooks/db-bootstrap.yml -i inventory/production")
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert re.search(r"webstats-ssm\s*:\s*ok=\d+\s+changed=[1-9]", res.stdout), res.stdout[-1500:]
    # the old sessions end (as after a failover or an idle timeout): new ones must log in
    run_ok(host, psql_admin(state, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                   "WHERE usename = 'webstats_web'"))  # fmt: skip
    for _ in range(3):
        health = wait_for(ssm_service.healthz, 60, "/healthz after the rotation")
        assert health["database"] is True and health["status"] == "ok", health
    assert ssm_service.get("/packages/stats/bioc/bioc_stats.tab").status_code == 200
    assert run_ok(host, f"systemctl show -p MainPID --value {WEB}").strip() == pid, "restarted"
    sessions = run_ok(host, psql_admin(state, "SELECT count(*) FROM pg_stat_activity "
                                              "WHERE usename = 'webstats_web'"))  # fmt: skip
    assert int(sessions) >= 1
    state["secrets"]["db_web_password_rotated"] = new  # never in a log either (test below)


# --- last: after every test above (the rotation included) ------------------------------------


def test_secrets_never_in_journal_logs_or_systemctl_show(host, state):
    places = {
        "journal": run_ok(host, "journalctl -o cat --no-pager"),
        "journal (verbose)": run_ok(host, "journalctl -o verbose --no-pager -u 'bioc-webstats*'"),
        "log files": run_ok(host, "cat /var/log/bioc-webstats/*"),
        "systemctl show": run_ok(host, "systemctl show " + " ".join(UNITS)),
        "env file": host.file(ENV_FILE).content_string,
        "unit files": run_ok(
            host, "find /etc/systemd/system -path '*bioc-webstats*' -type f -exec cat {} +"
        ),
    }
    assert len(places["log files"]) > 0 and "etl run:" in places["log files"]
    for secret_name, value in state["secrets"].items():
        for where, text in places.items():
            assert value not in text, f"{secret_name} appears in the {where}"
