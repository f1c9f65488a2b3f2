"""Every runbook command that is safe in a test runs as written and does what docs/RUNBOOK.md says.

Runs after test_deploy.py (the ETL has ingested the sample). Each command comes from the runbook
verbatim (the ``runbook`` fixture fails a test whose command is not written there), runs in the
container as root, and its effect is checked from outside the command.
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest
from testlib import ephemeral_dir, run_ok, run_playbook, wait_for

WEB = "bioc-webstats.service"
SOCKET = "bioc-webstats.socket"
TIMER = "bioc-webstats-etl.timer"
ETL = "bioc-webstats-etl.service"
TARGET = "bioc-webstats.target"
NGINX = "nginx.service"
WATCHDOG = "bioc-webstats-watchdog.service"
WATCHDOG_TIMER = "bioc-webstats-watchdog.timer"


def active(host, unit: str) -> str:
    return host.run(f"systemctl is-active {unit}").stdout.strip()


def show(host, unit: str, prop: str) -> str:
    return run_ok(host, f"systemctl show -p {prop} --value {unit}").strip()


def main_pid(host, unit: str) -> int:
    return int(run_ok(host, f"systemctl show -p MainPID --value {unit}").strip())


def healthy(service) -> bool:
    health = service.healthz()
    return bool(health and health["status"] == "ok")


def port_refuses(service) -> bool:
    try:
        service.get("/healthz", timeout=2)
    except Exception:
        return True
    return False


def category_year_file(service) -> str:
    r = service.get("/packages/stats/bioc/bioc_2024_stats.tab")
    assert r.status_code == 200
    return r.text


# --- status ------------------------------------------------------------------------------------


def test_status_commands(host, runbook):
    run_ok(host, runbook(f"systemctl status {TARGET} {NGINX} {SOCKET} {WEB} {TIMER}"))
    assert TIMER in run_ok(host, runbook(f"systemctl list-timers {TIMER}"))
    out = host.run(runbook(f"systemctl status {ETL}"))  # inactive oneshot: rc 3, still a report
    assert "Loaded: loaded" in out.stdout
    failed = run_ok(host, runbook("systemctl --failed"))
    assert "bioc-webstats" not in failed
    assert WATCHDOG_TIMER in run_ok(host, runbook(f"systemctl list-timers {WATCHDOG_TIMER}"))
    # (the container enforces no memory accounting: the property is there, not its value)
    assert "MemoryCurrent=" in run_ok(host, runbook(f"systemctl show -p MemoryCurrent {WEB}"))


def test_the_watchdog_checks_now(host, runbook):
    """Nothing is wrong on this host: the watchdog finds no alarm (the limits of the scenario
    allow the sample's old data), and says so in its journal."""
    run_ok(host, runbook(f"systemctl start {WATCHDOG}"), timeout=120)
    assert run_ok(host, f"systemctl show -p Result --value {WATCHDOG}").strip() == "success"
    # this run's lines, not an earlier run's (the timer's): its invocation's
    run_id = run_ok(host, f"systemctl show -p InvocationID --value {WATCHDOG}").strip()
    this_run = wait_for(
        lambda: (
            (out := run_ok(host, f"journalctl _SYSTEMD_INVOCATION_ID={run_id} -o cat"))
            and "watchdog:" in out
            and out
        ),
        30,
        "the watchdog run's summary in the journal",
    )
    [summary] = [ln for ln in this_run.splitlines() if ln.startswith("watchdog: ")]
    assert summary.startswith("watchdog: 0 alarms"), this_run[-2000:]
    assert summary in run_ok(host, runbook(f"journalctl -u {WATCHDOG} -e"))  # where SysOps look
    assert "watchdog:" in run_ok(host, runbook(f"journalctl -u {WATCHDOG} -n 20"))


def test_healthz_by_curl(host, runbook):
    out = run_ok(host, runbook("curl -fsS http://127.0.0.1:8000/healthz; echo"))
    health = json.loads(out)
    assert health["status"] == "ok"
    assert health["valid_thru"]  # the ETL ran in test_deploy.py


def test_cli_check_and_config_show(host, runbook):
    out = run_ok(host, runbook("bioc-webstats check"))
    assert out.startswith("ok")
    shown = run_ok(host, runbook("bioc-webstats config show"))
    env = host.file("/etc/bioc-webstats/webstats.env").content_string
    secrets = [
        line.split("=", 1)[1]
        for line in env.splitlines()
        if line.split("=", 1)[0] in ("WEBSTATS_IP_HASH_KEY", "WEBSTATS_FLASK_SECRET_KEY")
    ]
    password = re.search(r"WEBSTATS_DATABASE_URL=[^:]+://[^:]+:([^@]+)@", env).group(1)
    assert secrets
    for secret in [*secrets, password]:
        assert secret not in shown, "config show prints a secret"


def test_cli_runs_as_the_service_user_under_the_etls_ceiling(host, runbook):
    """`bioc-webstats` (the runbook's CLI, for root) runs the command as the service user, in a
    scope of the ETL's slice, which holds the ETL's memory ceiling; the caller's WEBSTATS_*
    reach the command, and its exit status is the command's."""
    assert show(host, "bioc-webstats-etl.slice", "MemoryMax") == str(512 * 1024 * 1024)
    assert show(host, ETL, "Slice") == "bioc-webstats-etl.slice"
    # The command reads its env file, here a FIFO the caller names: it waits there, running,
    # until the test writes the file into it.
    run_ok(host, "rm -f /run/cli-test.* && mkfifo -m 0644 /run/cli-test.fifo")
    run_ok(
        host,
        "setsid -f sh -c 'WEBSTATS_ENV_FILE=/run/cli-test.fifo bioc-webstats config show "
        ">/run/cli-test.out 2>&1; echo $? >/run/cli-test.rc'",
    )
    pid = wait_for(
        lambda: int(run_ok(host, "pgrep -u webstats -f 'bin/bioc-webstats config show'")),
        60,
        "the command to start",
    )
    cgroup = run_ok(host, f"cat /proc/{pid}/cgroup")
    # the scope's name: run-r<id>.scope (systemd 252), run-p<pid>-i<n>.scope (257)
    assert re.search(r"/bioc-webstats-etl\.slice/run-[\w-]+\.scope$", cgroup, re.M), cgroup
    # The caller's values are in no process's arguments (ps shows them to every local user):
    # not the command's, not runuser's, which waits for it.
    parent = int(run_ok(host, f"ps -o ppid= -p {pid}"))
    assert run_ok(host, f"cat /proc/{parent}/comm").strip() == "runuser"
    for proc in (pid, parent):
        argv = run_ok(host, f"tr '\\0' ' ' </proc/{proc}/cmdline")
        assert argv and "cli-test" not in argv, argv
    run_ok(host, "cat /etc/bioc-webstats/webstats.env >/run/cli-test.fifo")
    wait_for(lambda: host.file("/run/cli-test.rc").exists, 60, "the command to end")
    assert host.file("/run/cli-test.rc").content_string.strip() == "0"
    shown = host.file("/run/cli-test.out").content_string
    assert "web/publish_dir = /var/lib/bioc-webstats-site  (env file /run/cli-test.fifo)" in shown
    run_ok(host, runbook("bioc-webstats --help"))
    usage = host.run("bioc-webstats import legacy-db")
    assert usage.rc == 2 and "Missing argument" in usage.stderr, usage  # click's usage error
    as_user = host.run("runuser -u nobody -- /usr/local/sbin/bioc-webstats status")
    assert as_user.rc == 1 and "run it as root" in as_user.stderr, as_user
    run_ok(host, "rm -f /run/cli-test.*")


# --- start, stop, restart ----------------------------------------------------------------------


def test_stop_everything(host, service, runbook):
    run_ok(host, runbook(f"systemctl stop {TARGET}"))
    # systemctl waits for the target's own job; the units PartOf= it follow within seconds
    for unit in (NGINX, SOCKET, WEB, TIMER):
        wait_for(lambda u=unit: active(host, u) == "inactive", 60, f"{unit} to stop")
    wait_for(lambda: port_refuses(service), 30, "the port to close")


def test_start_everything(host, service, runbook):
    run_ok(host, runbook(f"systemctl start {TARGET}"))
    for unit in (NGINX, SOCKET, TIMER):
        wait_for(lambda u=unit: active(host, u) == "active", 60, f"{unit} to start")
    wait_for(lambda: healthy(service), 60, "/healthz after start")
    assert active(host, WEB) == "active"


def test_restart_everything(host, service, runbook):
    before = main_pid(host, WEB)
    run_ok(host, runbook(f"systemctl restart {TARGET}"))
    wait_for(lambda: main_pid(host, WEB) not in (0, before), 60, "a new web service process")
    wait_for(lambda: healthy(service), 60, "/healthz after restart")
    wait_for(lambda: active(host, TIMER) == "active", 60, "the timer after restart")


def test_restart_everything_answers_no_502(host, service, runbook):
    """nginx stops before gunicorn's socket closes, and starts after it listens: while the
    target restarts, a request is refused (nginx down) or answered, never 502 (they stopped
    together: what nginx passed on met a closed socket)."""
    import collections
    import threading

    import requests

    paths = ["/healthz", "/packages/stats/bioc/", "/packages/stats/bioc/bioc_packages.txt"]
    statuses: list[int] = []
    done = threading.Event()

    def client(path: str) -> None:
        session = requests.Session()
        while not done.is_set():
            try:
                r = session.get(service.base + path, timeout=10, allow_redirects=False)
                statuses.append(r.status_code)
            except requests.RequestException:
                session = requests.Session()  # refused or reset while nginx is down

    threads = [threading.Thread(target=client, args=(p,), daemon=True) for p in paths]
    for t in threads:
        t.start()
    try:
        for _ in range(2):
            before = main_pid(host, WEB)
            run_ok(host, runbook(f"systemctl restart {TARGET}"))
            wait_for(
                lambda b=before: main_pid(host, WEB) not in (0, b) and healthy(service),
                60,
                "the web back after the restart",
            )
    finally:
        done.set()
        for t in threads:
            t.join(30)
    seen = collections.Counter(statuses)
    assert seen[200] > 0 and not {502, 504} & set(seen), seen


def test_restart_web_service_keeps_socket(host, service, runbook):
    socket_since = run_ok(host, f"systemctl show -p ActiveEnterTimestampMonotonic {SOCKET}")
    before = main_pid(host, WEB)
    run_ok(host, runbook(f"systemctl restart {WEB}"))
    # the socket queued while gunicorn restarted: the next request is answered
    assert healthy(service)
    assert main_pid(host, WEB) not in (0, before)
    assert run_ok(host, f"systemctl show -p ActiveEnterTimestampMonotonic {SOCKET}") == socket_since


def test_reload_web_service(host, service, runbook):
    before = main_pid(host, WEB)
    workers = run_ok(host, f"pgrep -P {before}").split()
    assert workers
    run_ok(host, runbook(f"systemctl reload {WEB}"))
    # gunicorn re-forks its workers under the same arbiter
    wait_for(
        lambda: set(run_ok(host, f"pgrep -P {before}").split()).isdisjoint(workers),
        60,
        "new workers after HUP",
    )
    assert main_pid(host, WEB) == before
    assert healthy(service)


def test_stop_serving_then_clear_and_start(host, service, runbook):
    run_ok(host, runbook(f"systemctl stop {NGINX} {SOCKET} {WEB}"))
    assert active(host, SOCKET) == "inactive" and active(host, NGINX) == "inactive"
    wait_for(lambda: port_refuses(service), 30, "the port to close")
    run_ok(host, runbook(f"systemctl reset-failed {WEB} && systemctl start {WEB}"))
    wait_for(lambda: active(host, WEB) == "active", 60, "the web service")
    assert active(host, SOCKET) == "active"  # the service pulls its socket in
    run_ok(host, runbook(f"systemctl start {TARGET}"))
    wait_for(lambda: healthy(service), 60, "/healthz through nginx after start")
    assert active(host, NGINX) == "active"


def test_a_database_down_at_start_is_no_hang(host, service):
    """The web service starts while the database is down (its check says so in one line) and
    answers 503 at once: failing its start, it left every request nginx passed on in the
    socket's queue until nginx's 504, 150 s later. It follows the database back by itself."""
    since = run_ok(host, "journalctl --show-cursor -n 0 -o cat").strip().split("cursor: ")[-1]
    run_ok(host, "systemctl stop postgresql.service")
    try:
        run_ok(host, f"timeout 120 systemctl restart {WEB}")
        assert active(host, WEB) == "active"
        assert service.get("/healthz", timeout=30).status_code == 503  # at once, not a hang
        # from disk, by nginx
        assert service.get("/packages/stats/bioc/bioc_packages.txt").status_code == 200
    finally:
        run_ok(host, "systemctl start postgresql.service")
    wait_for(lambda: healthy(service), 90, "/healthz once the database is back")
    said = run_ok(host, f"journalctl -u {WEB} -o cat --after-cursor='{since}'")
    assert "warning: database: " in said and "the web starts and answers 503" in said, said
    assert "Traceback" not in said


# --- the front -----------------------------------------------------------------------------------


def test_nginx_commands(host, service, runbook):
    out = host.run(runbook("nginx -t"))
    assert out.rc == 0 and "test is successful" in out.stderr
    assert "active (running)" in run_ok(host, runbook(f"systemctl status {NGINX}"))
    master = main_pid(host, NGINX)
    workers = run_ok(host, f"pgrep -P {master}").split()
    assert workers
    run_ok(host, runbook(f"systemctl reload {NGINX}"))
    # new workers under the same master; the service answers throughout
    wait_for(
        lambda: set(run_ok(host, f"pgrep -P {master}").split()).isdisjoint(workers),
        60,
        "new nginx workers after the reload",
    )
    assert main_pid(host, NGINX) == master
    assert healthy(service)
    assert "nginx" in run_ok(host, runbook(f"journalctl -u {NGINX} -e"))


# --- the ETL -----------------------------------------------------------------------------------


def test_pause_and_resume_the_etl(host, runbook):
    run_ok(host, runbook(f"systemctl stop {TIMER}"))
    assert active(host, TIMER) == "inactive"
    assert run_ok(host, f"systemctl show -p NextElapseUSecRealtime --value {TIMER}").strip() == ""
    run_ok(host, runbook(f"systemctl start {TIMER}"))
    assert active(host, TIMER) == "active"
    next_run = run_ok(host, f"systemctl show -p NextElapseUSecRealtime --value {TIMER}")
    assert next_run.strip() not in ("", "n/a", "0")


def test_stopping_a_running_etl_is_no_failure(host, deploy_vars):
    """A stop ends a run with SIGTERM (here the unit's; the target's and restore.yml's are
    the same signal): success, no alert. It was a failure ('signal') that ran the failure
    hook. The run is held by a runtime drop-in: the unit's own wrapper around a sleep."""
    hook = f"bioc-webstats-failure@{ETL}.service"
    hooked = show(host, hook, "InvocationID")
    dropin = f"/run/systemd/system/{ETL}.d/zz-molecule-hold.conf"
    wrapper = deploy_vars["webstats_services_run_logged"]
    run_ok(
        host,
        f"mkdir -p /run/systemd/system/{ETL}.d && printf '[Service]\\nExecStart=\\n"
        f"ExecStart={wrapper} /tmp/molecule-hold.log /bin/sleep 300\\n' > {dropin} "
        "&& systemctl daemon-reload",
    )
    try:
        run_ok(host, f"systemctl start --no-block {ETL}")
        wait_for(
            lambda: show(host, ETL, "ActiveState") == "activating" and main_pid(host, ETL) > 0,
            60,
            "the held run",
        )
        run_ok(host, f"systemctl stop {ETL}")
        assert show(host, ETL, "Result") == "success"
        assert host.run(f"systemctl is-failed --quiet {ETL}").rc != 0
    finally:
        run_ok(host, f"rm -f {dropin} && systemctl daemon-reload")
    assert show(host, hook, "InvocationID") == hooked, "the failure hook ran"
    # The stop took the wrapper with the run: ExecStopPost= says so in etl.log, in the sandbox
    etl_log = f"{deploy_vars['webstats_services_log_dir']}/etl.log"
    last = run_ok(host, f"tail -n 1 {etl_log}").strip()
    assert re.search(r"Z the run was stopped \(.*systemd: success, killed TERM$", last), last


def test_run_the_etl_now_changes_nothing_when_nothing_is_new(host, service, runbook):
    before = category_year_file(service)
    invocations = run_ok(host, f"systemctl show -p InvocationID --value {ETL}")
    run_ok(host, runbook(f"systemctl start {ETL}"), timeout=600)
    assert run_ok(host, f"systemctl show -p InvocationID --value {ETL}") != invocations
    assert run_ok(host, f"systemctl show -p Result --value {ETL}").strip() == "success"
    journal = run_ok(host, runbook(f"journalctl -u {ETL} --since today"))
    assert "0 objects ingested" in journal.rsplit("etl run:", 1)[-1]
    assert category_year_file(service) == before


def test_etl_by_hand(host, service, runbook):
    before = category_year_file(service)
    assert "0 changes" in run_ok(host, runbook("bioc-webstats packages sync --dry-run"))
    run_ok(host, runbook("bioc-webstats etl run --dry-run"))
    run_ok(host, runbook("bioc-webstats etl run --since 2026-11-01"))
    key = sorted(p.name for p in (ephemeral_dir() / "sample" / "logs").iterdir())[0]
    run_ok(host, runbook("bioc-webstats etl reingest <object-key> …", {"<object-key> …": key}))
    run_ok(host, runbook("bioc-webstats stats rebuild"), timeout=600)
    assert category_year_file(service) == before, "reingest/rebuild changed the statistics"


# --- logs --------------------------------------------------------------------------------------


def test_journals(host, runbook):
    assert "Started" in run_ok(host, runbook(f"journalctl -u {WEB} -e"))
    assert "etl run:" in run_ok(host, runbook(f"journalctl -u {ETL} -e"))


def test_failed_etl_run_is_reported_and_retried(host, service, runbook):
    """A corrupt log object: the run fails (systemd marks it), the failure hook records it,
    the next run retries the object; once it is gone, a run succeeds again."""
    bad = "/srv/bioc-webstats/logs/E1TVLJONPTUXV3.2024-02-02-00.0badf00d.gz"
    before = category_year_file(service)
    run_ok(host, f"printf 'not gzip at all' > {bad}")
    try:
        res = host.run(f"timeout 600 {runbook(f'systemctl start {ETL}')}")
        assert res.rc != 0, "a run with a corrupt object succeeded"
        assert run_ok(host, f"systemctl show -p Result --value {ETL}").strip() != "success"
        hook = f"bioc-webstats-failure@{ETL}.service"
        # No SNS topic here: the hook records the failure, keeps the alert in its spool for
        # the watchdog, and ends failed itself (an alert not sent is a failure too).
        wait_for(
            lambda: (
                host.run(f"systemctl is-active {hook}").stdout.strip() in ("inactive", "failed")
                and "bioc-webstats-etl" in run_ok(host, f"journalctl -u {hook} -o cat")
            ),
            60,
            "the failure hook to record the failed run",
        )
        journal = run_ok(host, runbook("journalctl -u 'bioc-webstats-failure@*' -e"))
        assert ETL in journal
        assert "ALERT NOT SENT" in journal and "kept in /var/lib/bioc-webstats/" in journal
        # the runbook's way to find alerts that could not be sent: priority crit
        crit = run_ok(host, runbook("journalctl -p crit -u 'bioc-webstats*' -e"))
        assert "ALERT NOT SENT" in crit and ETL in crit, crit[-1500:]
        assert "0badf00d" in run_ok(host, f"journalctl -u {ETL} -o cat -n 50")
    finally:
        run_ok(host, f"rm -f {bad}")
    run_ok(host, runbook(f"systemctl start {ETL}"), timeout=600)
    assert run_ok(host, f"systemctl show -p Result --value {ETL}").strip() == "success"
    assert category_year_file(service) == before
    run_ok(host, f"systemctl reset-failed {hook}")  # the unsent alert, above
    assert "bioc-webstats" not in run_ok(host, runbook("systemctl --failed"))


@pytest.mark.parametrize("name", ["access.log", "error.log", "etl.log", "nginx-access.log"])
def test_log_files_exist(host, name):
    # `tail -f` of the runbook never returns; the files it follows must exist
    f = host.file(f"/var/log/bioc-webstats/{name}")
    assert f.exists and f.size > 0, name


def test_forced_log_rotation_reopens_the_access_log(host, service, deploy_vars):
    run_ok(host, "logrotate -f /etc/logrotate.d/bioc-webstats")
    assert service.get("/healthz?probe=after-rotation").status_code == 200
    wait_for(
        lambda: host.file("/var/log/bioc-webstats/access.log").contains("probe=after-rotation"),
        30,
        "the request in the new access.log",
    )
    # each new file keeps its owner: the web's two, the ETL's own (which the web cannot write)
    owners = {
        "access.log": deploy_vars["webstats_services_web_user"],
        "error.log": deploy_vars["webstats_services_web_user"],
        "etl.log": deploy_vars["webstats_services_user"],
    }
    for name, owner in owners.items():
        f = host.file(f"/var/log/bioc-webstats/{name}")
        assert (f.user, f.mode) == (owner, 0o640), (name, f.user, oct(f.mode))


# --- backups, restore ---------------------------------------------------------------------------


def test_the_deploy_backed_up_before_it_migrated(host):
    """The first deploy migrated an empty database: it took a backup first (root only)."""
    dumps = run_ok(host, "ls -1 /var/backups/bioc-webstats/").split()
    pre = [d for d in dumps if re.fullmatch(r"pre-[0-9.]+-\d{8}T\d{6}Z\.dump", d)]
    assert len(pre) == 1, dumps  # the idempotence run did not migrate: no second one
    dump = host.file(f"/var/backups/bioc-webstats/{pre[0]}")
    assert (dump.user, dump.mode) == ("root", 0o600)
    assert "alembic_version" not in run_ok(host, f"pg_restore --list {dump.path}")  # empty then


def test_special_backup(host, runbook):
    cmd = runbook("ansible-playbook playbooks/backup.yml -i inventory/production")
    res = run_playbook(cmd)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    listed = run_ok(host, runbook("ls -l /var/backups/bioc-webstats/"))
    dumps = re.findall(r"\b(webstats-\d{8}T\d{6}Z\.dump)$", listed, re.M)
    assert len(dumps) == 1, listed
    dump = host.file(f"/var/backups/bioc-webstats/{dumps[0]}")
    assert (dump.user, dump.mode) == ("root", 0o600)
    listing = run_ok(host, f"pg_restore --list {dump.path}")
    assert "TABLE DATA public download_records" in listing
    assert "backup: /var/backups/bioc-webstats/webstats-" in res.stdout


def published_files(host) -> list[str]:
    """Every file of the published version (category files and the package pages and files
    built so far), as URLs."""
    root = "/var/lib/bioc-webstats-site/current/"
    out = run_ok(host, f"cd {root} && find -L . -type f -printf '%P\\n'")
    return sorted("/" + rel for rel in out.split() if not rel.startswith("."))


def fetch_all(service, urls: list[str]) -> dict[str, str]:
    """sha256 of each URL's body through nginx (404s and errors fail)."""
    import hashlib

    hashes = {}
    for url in urls:
        r = service.get(url, timeout=60)
        assert r.status_code == 200, (url, r.status_code)
        hashes[url] = hashlib.sha256(r.content).hexdigest()
    return hashes


def documented_healthz() -> dict[str, list[str]]:
    """The /healthz table of the runbook: field → its documented values."""
    from testlib import RUNBOOK

    text = RUNBOOK.read_text().split("`/healthz` answers one JSON object", 1)[1].split("\n\n", 2)[1]
    fields: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        current = cells[0].strip("`") or current
        fields.setdefault(current, []).append(cells[1])
    return fields


def check_healthz_shape(res) -> dict:
    """A /healthz answer matches the runbook's table: the fields, the values, the HTTP code."""
    doc = documented_healthz()
    body = res.json()
    assert set(body) == set(doc), (sorted(body), sorted(doc))
    status_rows = {re.match(r"`(\w+)` \(HTTP (\d+)\)", v).groups() for v in doc["status"]}
    assert (body["status"], str(res.status_code)) in status_rows, (body, res.status_code)
    assert body["database"] in (True, False) and doc["database"] == ["`true` / `false`"]
    assert body["schema"] is None or re.fullmatch(r"\d{4}", body["schema"]), body
    assert body["valid_thru"] is None or re.fullmatch(r"\d{4}-\d\d-\d\d", body["valid_thru"])
    return body


def test_healthz_shapes_are_the_documented_ones(service):
    body = check_healthz_shape(service.get("/healthz"))
    assert body["status"] == "ok" and body["database"] is True and body["valid_thru"]


@pytest.mark.replay
def test_restore_after_losing_the_database_serves_the_same_bytes(host, service, runbook):
    """backup (test above) → the database dropped → db-bootstrap (and a deploy whose backup
    before the migration fails: stopped, nothing switched) → restore as the runbook says →
    every published file is served with the same bytes, /healthz ok."""
    urls = published_files(host)
    assert len(urls) > 50, urls
    before = fetch_all(service, urls)
    etag_before = service.get("/packages/stats/bioc/bioc_stats.tab").headers["ETag"]
    dump = run_ok(host, "ls -1t /var/backups/bioc-webstats/webstats-*.dump").split()[0]

    run_ok(host, "runuser -u postgres -- psql -X -q -c 'DROP DATABASE webstats WITH (FORCE)'")
    [lost] = wait_for(lambda: [r for r in [service.get("/healthz")] if r.status_code == 503],
                      60, "/healthz to report the lost database")  # fmt: skip
    body = check_healthz_shape(lost)
    assert body["status"] == "error" and body["database"] is False and body["schema"] is None

    res = run_playbook(
        runbook("ansible-playbook playbooks/db-bootstrap.yml -i inventory/production")
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]

    # The empty database needs a migration: a deploy now backs up first, and a backup that
    # fails (no pg_dump here for a moment) stops it before anything is switched.
    pg_dump = run_ok(host, "ls /usr/lib/postgresql/*/bin/pg_dump").split()[0]
    live = run_ok(host, "readlink /opt/bioc-webstats/current")
    run_ok(host, f"mv {pg_dump} {pg_dump}.away")
    try:
        res = run_playbook(runbook("ansible-playbook playbooks/deploy.yml -i inventory/production"))
    finally:
        run_ok(host, f"mv {pg_dump}.away {pg_dump}")
    out = res.stdout + res.stderr
    assert res.returncode != 0, out[-3000:]
    assert 'failed at "Back up the database before migrating it"' in out, out[-3000:]
    assert "pg_dump" in out and "Nothing was switched" in out, out[-3000:]
    assert run_ok(host, "readlink /opt/bioc-webstats/current") == live
    tables = run_ok(
        host,
        "runuser -u postgres -- psql -X -At -d webstats -c "
        "'SELECT count(*) FROM pg_tables WHERE schemaname = $$public$$'",
    )
    assert tables.strip() == "0", "the deploy migrated without its backup"

    # As a restore interrupted before its end (^C) leaves the host: both timers stopped, and
    # the note of what it stopped. Its re-run found them stopped and left them so.
    timers = (TIMER, "bioc-webstats-watchdog.timer")
    run_ok(host, f"systemctl stop {' '.join(timers)}")
    note = "/var/backups/bioc-webstats/restore-playbook.timers"
    run_ok(host, f"printf '%s\\n' '{json.dumps(list(timers))}' > {note} && chmod 0600 {note}")
    cmd = runbook(
        "ansible-playbook playbooks/restore.yml -i inventory/production "
        "-e webstats_restore_file=/var/backups/bioc-webstats/<file>.dump",
        {"/var/backups/bioc-webstats/<file>.dump": dump},
    )
    res = run_playbook(cmd)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "publish: data version" in res.stdout
    for timer in timers:
        assert active(host, timer) == "active", timer  # started again
    assert not host.file("/var/backups/bioc-webstats-restore").exists
    assert not host.file(note).exists

    health = json.loads(run_ok(host, runbook("curl -fsS http://127.0.0.1:8000/healthz; echo")))
    assert health["status"] == "ok" and health["valid_thru"]
    assert "ValidThru: " + health["valid_thru"] in run_ok(host, runbook("bioc-webstats status"))
    after = fetch_all(service, urls)
    differ = [u for u in urls if before[u] != after[u]]
    assert not differ, f"{len(differ)} of {len(urls)} files differ after the restore: {differ[:5]}"
    etag_after = service.get("/packages/stats/bioc/bioc_stats.tab").headers["ETag"]
    assert etag_after != etag_before  # a new data version: caches cannot mix the two


@pytest.mark.replay
def test_rotate_the_web_login_password_on_an_env_file_host(host, service, runbook):
    """The env-file path of "Rotate a password": a new password in PostgreSQL and the env file;
    the web service had to restart (the deploy does it), and serves; the old password no
    longer logs in."""
    import os
    import shlex

    secrets = os.environ.get("WEBSTATS_SECRETS_DIR") or str(ephemeral_dir() / "secrets")
    env = {**os.environ, "WEBSTATS_SECRETS_DIR": secrets}
    name = host.backend.name
    pw_file = f"{secrets}/{name}/db-web-password"
    old = open(pw_file).read().split(" salt=")[0].strip()
    pid = main_pid(host, WEB)
    rm = runbook(
        'rm "${WEBSTATS_SECRETS_DIR:-$HOME/.cache/bioc-webstats/secrets}/<host>/db-web-password"',
        {"<host>": name},
    )
    assert subprocess.run(["bash", "-c", rm], env=env).returncode == 0
    for cmd in (
        "ansible-playbook playbooks/db-bootstrap.yml -i inventory/local",
        "ansible-playbook playbooks/deploy.yml -i inventory/local",
    ):
        res = run_playbook(runbook(cmd))
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    new = open(pw_file).read().split(" salt=")[0].strip()
    assert new != old
    assert new in host.file("/etc/bioc-webstats/webstats.env").content_string
    assert old not in host.file("/etc/bioc-webstats/webstats.env").content_string

    def login(pw: str):
        sql = shlex.quote("SELECT current_user")
        return host.run(f"PGPASSWORD={shlex.quote(pw)} psql -X -At -h 127.0.0.1 -U webstats_web "
                        f"-d webstats -c {sql}")  # fmt: skip

    assert login(new).stdout.strip() == "webstats_web"
    refused = login(old)
    assert refused.rc != 0 and "password authentication failed" in refused.stderr
    assert main_pid(host, WEB) not in (0, pid), "the env-file path needs the restart"
    health = wait_for(service.healthz, 60, "/healthz after the rotation")
    assert health["status"] == "ok" and health["database"] is True
    assert service.get("/packages/stats/bioc/bioc_stats.tab").status_code == 200


# --- deploy: what would change -----------------------------------------------------------------


@pytest.mark.replay
def test_deploy_check_diff_reports_no_change(runbook):
    cmd = runbook("ansible-playbook playbooks/deploy.yml -i inventory/production --check --diff")
    res = run_playbook(cmd)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    recap = re.search(r"webstats-default\s*:\s*ok=\d+\s+changed=(\d+)", res.stdout)
    assert recap, res.stdout[-2000:]
    assert recap.group(1) == "0", res.stdout[-4000:]
