"""What playbooks/deploy.yml leaves on a fresh systemd host (molecule/default).

Runs after converge + idempotence. The tests run in file order: the state checks first, then
the ETL through systemd on the sample logs (compared to the generator's truth), then the
runbook's commands, each taken verbatim from docs/RUNBOOK.md.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import shlex

import pytest
from testlib import REPO, ephemeral_dir, repo_version, run_ok, wait_for

UNITS_DIR = "/etc/systemd/system"
WEB = "bioc-webstats.service"
SOCKET = "bioc-webstats.socket"
TARGET = "bioc-webstats.target"
ETL = "bioc-webstats-etl.service"
TIMER = "bioc-webstats-etl.timer"
MONTHS = "Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split()
STEMS = {
    "bioc": "bioc",
    "annotation": "data-annotation",
    "experiment": "data-experiment",
    "workflows": "workflows",
}


def show(host, unit: str, *props: str) -> dict[str, str]:
    """``systemctl show`` properties of a unit."""
    out = run_ok(host, f"systemctl show {unit} " + " ".join(f"-p {p}" for p in props))
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def is_active(host, unit: str) -> str:
    return host.run(f"systemctl is-active {unit}").stdout.strip()


def as_service_user(cmd: str, deploy_vars) -> str:
    """A CLI command as the service account, with the units' environment file."""
    user = deploy_vars["webstats_services_user"]
    env_file = deploy_vars["webstats_services_env_file"]
    app = deploy_vars["webstats_services_app_dir"]
    return f"runuser -u {user} -- env WEBSTATS_ENV_FILE={env_file} {app}/bin/bioc-webstats {cmd}"


# --- the state the deploy leaves ---------------------------------------------------------------


@pytest.mark.parametrize("unit", [SOCKET, TIMER, "bioc-webstats-web-config.timer", "nginx.service"])
def test_entry_units_enabled_and_active(host, unit):
    svc = host.service(unit)
    assert svc.is_enabled, f"{unit} not enabled"
    assert svc.is_running, f"{unit} not active"


def test_web_service_and_target_active(host):
    assert is_active(host, WEB) == "active"
    assert is_active(host, TARGET) == "active"
    assert host.run(f"systemctl is-enabled {TARGET}").stdout.strip() == "enabled"


def test_no_failed_units(host):
    failed = run_ok(host, "systemctl list-units --failed --no-legend --plain 'bioc-webstats*'")
    assert failed.strip() == ""


def test_socket_listening(host, deploy_vars):
    """gunicorn's socket is a unix socket that only root and nginx's group may connect to;
    the public port is nginx's."""
    path = deploy_vars["webstats_base_web_socket"]
    assert host.socket(f"unix://{path}").is_listening
    # systemd holds the socket (gunicorn inherits it): it is the socket unit's
    assert show(host, SOCKET, "Listen")["Listen"].startswith(f"{path} (Stream)")
    sock = host.file(path)
    assert (sock.user, sock.group, sock.mode) == (
        "root",
        deploy_vars["webstats_nginx_group"],
        0o660,
    )
    port = deploy_vars["webstats_nginx_port"]
    assert host.socket(f"tcp://0.0.0.0:{port}").is_listening
    listeners = run_ok(host, f"ss -Htlnp 'sport = :{port}'")
    assert '"nginx"' in listeners and "gunicorn" not in listeners, listeners


def test_timer_next_run_at_configured_calendar(host, deploy_vars):
    calendars = deploy_vars["webstats_services_etl_on_calendar"]
    props = show(host, TIMER, "TimersCalendar", "NextElapseUSecRealtime", "Persistent")
    for spec in calendars:
        assert f"OnCalendar={spec} " in props["TimersCalendar"]
    assert props["Persistent"] == "yes"
    # The next run: the earliest next elapse of the configured calendars, plus at most the
    # randomized delay.
    nexts = []
    for spec in calendars:
        out = run_ok(host, f"systemd-analyze calendar {shlex.quote(spec)}")
        # "(in UTC): …" when the host's zone is not UTC, else "Next elapse: … UTC"
        utc = re.findall(r"(?:\(in UTC\)|Next elapse): \w+ (\S+ \S+) UTC", out)[-1]
        nexts.append(dt.datetime.fromisoformat(utc))
    expected = min(nexts)
    out = run_ok(host, f"systemctl show {TIMER} -p NextElapseUSecRealtime --timestamp=utc")
    got = dt.datetime.fromisoformat(re.search(r"=\w+ (\S+ \S+) UTC", out).group(1))
    delay = parse_seconds(deploy_vars["webstats_services_etl_randomized_delay_sec"])
    assert expected <= got <= expected + dt.timedelta(seconds=delay), (got, expected)


def parse_seconds(value) -> int:
    """A systemd time span like 15min, 30s, 1h (or a number of seconds)."""
    units = {"s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600, "": 1}
    m = re.fullmatch(r"(\d+)\s*([a-z]*)", str(value).strip())
    return int(m.group(1)) * units[m.group(2)]


@pytest.mark.parametrize("var", ["webstats_services_user", "webstats_services_web_user"])
def test_service_users_have_no_login(host, deploy_vars, var):
    user = host.user(deploy_vars[var])
    assert user.exists
    assert user.shell in ("/usr/sbin/nologin", "/sbin/nologin", "/bin/false")
    assert user.uid < 1000  # a system account


def test_code_root_owned_and_not_writable_by_service(host, deploy_vars):
    root = deploy_vars["webstats_release_root"]
    user = deploy_vars["webstats_services_user"]
    current = host.file(f"{root}/current")
    assert current.is_symlink
    release = current.linked_to
    assert release.startswith(f"{root}/releases/")
    not_root = run_ok(host, f"find {root} \\! -user root -print -quit")
    assert not_root == "", f"not owned by root: {not_root}"
    for who in (user, deploy_vars["webstats_services_web_user"]):
        writable = run_ok(host, f"runuser -u {who} -- find -L {root} -writable -print -quit")
        assert writable == "", f"writable by {who}: {writable}"


def test_env_file_not_world_readable(host, deploy_vars):
    env = host.file(deploy_vars["webstats_config_env_file"])
    assert env.exists
    assert env.user == "root"
    assert env.group == deploy_vars["webstats_services_group"]
    assert env.mode & 0o007 == 0, oct(env.mode)
    assert env.mode & 0o020 == 0, "group-writable"
    assert host.file(env.path).contains("WEBSTATS_DATABASE_URL")
    loose = run_ok(host, f"find {env.path.rsplit('/', 1)[0]} -perm /o=rwx -type f")
    assert loose == "", f"world-accessible: {loose}"
    # the copy the deploy checks a release with before it goes live: the same bytes, the same
    # owner and mode (it holds the same secrets)
    staged = host.file(deploy_vars["webstats_config_staged_env_file"])
    assert (staged.user, staged.group, staged.mode) == (env.user, env.group, env.mode)
    assert staged.content_string == env.content_string


def test_the_web_cannot_read_the_env_file_nor_the_alarms(host, deploy_vars):
    """The web runs as its own user, not in the service group: the host's env file (here it
    holds every secret: no SSM) and the watchdog's state are not its to read, and not even
    there in its own mount namespace (/proc/<pid>/root, as that user)."""
    etl_user = deploy_vars["webstats_services_user"]
    user = deploy_vars["webstats_services_web_user"]
    env = deploy_vars["webstats_config_env_file"]
    staged = deploy_vars["webstats_config_staged_env_file"]
    alerts = f"{deploy_vars['webstats_services_state_dir']}/alerts"
    pid = run_ok(host, f"systemctl show -p MainPID --value {WEB}").strip()
    assert pid not in ("", "0")
    assert run_ok(host, f"ps -o user= -p {pid}").strip() == user
    # the unit's own mount namespace: without CAP_SYS_ADMIN in the container (create.yml),
    # systemd ignores every mount setting of the sandbox silently
    web_ns = run_ok(host, f"runuser -u {user} -- readlink /proc/{pid}/ns/mnt")
    assert web_ns != run_ok(host, "readlink /proc/1/ns/mnt")
    # the control: the service user reads both
    assert "WEBSTATS_DATABASE_URL" in run_ok(host, f"runuser -u {etl_user} -- cat {env}")
    run_ok(host, f"runuser -u {etl_user} -- ls {alerts}")
    for cmd in (
        f"cat {env}",
        f"cat {staged}",
        f"ls {alerts}",
        f"cat /proc/{pid}/root{env}",
        f"cat /proc/{pid}/root{staged}",
        f"ls /proc/{pid}/root{alerts}",
    ):
        res = host.run(f"runuser -u {user} -- {cmd}")
        assert res.rc != 0, (cmd, res.stdout[:200])
        assert "Permission denied" in res.stderr, (cmd, res.stderr)
    # what it does need is there: the published site, and its own configuration (0640, the
    # service user's file in the web's group)
    site = f"{deploy_vars['webstats_services_publish_dir']}/current/"
    run_ok(host, f"runuser -u {user} -- ls /proc/{pid}/root{site}")
    web_env = host.file(deploy_vars["__webstats_services_web_env_file"])
    assert (web_env.user, web_env.group, web_env.mode) == (
        etl_user,
        deploy_vars["webstats_services_web_group"],
        0o640,
    )
    assert "WEBSTATS_DATABASE_URL_WEB" in run_ok(host, f"runuser -u {user} -- cat {web_env.path}")


def test_the_web_can_neither_write_the_etl_log_nor_signal_the_etl(host, deploy_vars):
    """Apart from the ETL's account: etl.log (where an alarm's context is read) takes no line
    from the web, and no process of the service user takes a signal from it."""
    etl_user = deploy_vars["webstats_services_user"]
    user = deploy_vars["webstats_services_web_user"]
    etl_log = f"{deploy_vars['webstats_services_log_dir']}/etl.log"
    run_ok(host, f"runuser -u {etl_user} -- sh -c 'printf \"\" >> {etl_log}'")
    res = host.run(f"runuser -u {user} -- sh -c 'printf forged >> {etl_log}'")
    assert res.rc != 0 and "Permission denied" in res.stderr, res.stderr
    # nor create a file beside it
    res = host.run(f"runuser -u {user} -- touch {deploy_vars['webstats_services_log_dir']}/x.log")
    assert res.rc != 0 and "Permission denied" in res.stderr, res.stderr
    victim = host.run(f"runuser -u {etl_user} -- sh -c 'sleep 300 >/dev/null 2>&1 & echo $!'")
    pid = victim.stdout.strip()
    assert victim.rc == 0 and pid.isdigit(), victim.stderr
    try:
        res = host.run(f"runuser -u {user} -- kill -TERM {pid}")
        assert res.rc != 0 and "not permitted" in res.stderr, res.stderr
        assert host.run(f"kill -0 {pid}").rc == 0  # still alive
    finally:
        host.run(f"kill {pid}")


def test_units_installed_root_owned(host):
    for unit in (WEB, SOCKET, TARGET, ETL, TIMER, "bioc-webstats-failure@.service"):
        f = host.file(f"{UNITS_DIR}/{unit}")
        assert f.exists, unit
        assert (f.user, f.group) == ("root", "root")
        assert f.mode & 0o022 == 0, f"{unit}: {oct(f.mode)}"


def test_a_site_dropin_is_in_force(host):
    """The scenario's webstats_services_dropins (host_vars), installed once verified with its
    unit (verify-unit --dropin), and applied."""
    dropin = host.file(f"{UNITS_DIR}/bioc-webstats-watchdog.service.d/50-site.conf")
    assert (dropin.user, dropin.mode) == ("root", 0o644)
    assert "Nice=5" in dropin.content_string.splitlines()
    nice = host.check_output("systemctl show -P Nice bioc-webstats-watchdog.service")
    assert nice.strip() == "5"


def test_the_running_nginx_has_no_new_privileges_and_five_capabilities(host):
    """The running master, not only its unit file: the package started nginx before the
    sandbox existed, and a reload keeps that master; the deploy restarted it once."""
    pid = run_ok(host, "systemctl show -p MainPID --value nginx.service").strip()
    status = run_ok(host, f"cat /proc/{pid}/status")
    assert re.search(r"^NoNewPrivs:\s+1$", status, re.M), status
    # no capability beyond the five it needs (the port is above 1024 here)
    bounding = int(re.search(r"^CapBnd:\s+([0-9a-f]+)$", status, re.M).group(1), 16)
    wanted = {0, 1, 5, 6, 7}  # CHOWN, DAC_OVERRIDE, KILL, SETGID, SETUID
    assert {b for b in range(64) if bounding >> b & 1} == wanted, hex(bounding)
    # (the mount options, ProtectSystem= and the like, are not checked at run time here: systemd
    # in an unprivileged container skips mount namespaces, for every unit)


def test_the_running_nginx_may_not_reach_the_instance_role(host):
    """nginx parses the public's requests first: as the web unit, it is denied the instance
    metadata service. The deploy set it on the running master (`set-property --runtime`: a
    daemon-reload leaves a running unit's IP filter as it was), the drop-in for later starts."""
    deny = run_ok(host, "systemctl show -P IPAddressDeny nginx.service").split()
    assert set(deny) == {"169.254.169.254/32", "fd00:ec2::254/128"}, deny
    dropin = host.file(f"{UNITS_DIR}/nginx.service.d/bioc-webstats.conf").content_string
    assert "IPAddressDeny=169.254.169.254 fd00:ec2::254" in dropin.splitlines()
    applied = "/run/systemd/system.control/nginx.service.d/50-IPAddressDeny.conf"
    assert "IPAddressDeny=169.254.169.254/32" in host.file(applied).content_string


def installed_services(host) -> list[str]:
    names = run_ok(host, f"ls {UNITS_DIR}").split()
    services = [n for n in names if n.startswith("bioc-webstats") and n.endswith(".service")]
    # a template is analysed through an instance, as systemd runs it
    return [n.replace("@.service", f"@{WEB}.service") for n in services]


def test_security_exposure_of_every_unit(host):
    services = installed_services(host)
    assert len(services) >= 3, services
    for unit in [*services, "nginx.service"]:  # the front too: the distribution's unit
        out = host.run(f"systemd-analyze security --no-pager {unit}")
        m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out.stdout)
        assert m, f"{unit}: {out.stdout[-500:]}{out.stderr[-500:]}"
        assert float(m.group(1)) <= 2.5, f"{unit}: exposure {m.group(1)}"


def test_healthz_reports_the_deployed_version(service):
    health = wait_for(service.healthz, 60, "/healthz 200")
    assert health["status"] == "ok"
    deployed = json.loads((ephemeral_dir() / "releases" / "versions.json").read_text())
    assert health["version"] == deployed["current"] == repo_version()
    assert health["database"] is True
    assert health["schema"]


def test_web_logs_written(host, service, deploy_vars):
    log_dir = deploy_vars["webstats_base_log_dir"]
    marker = "/healthz?probe=molecule-access-log"
    assert service.get(marker).status_code == 200
    access = host.file(f"{log_dir}/access.log")
    wait_for(
        lambda: access.exists and access.contains("probe=molecule-access-log"),
        30,
        "the request in access.log",
    )
    assert host.file(f"{log_dir}/error.log").exists
    for name in ("access.log", "error.log"):
        f = host.file(f"{log_dir}/{name}")
        assert f.user == deploy_vars["webstats_services_web_user"]
        assert f.mode & 0o007 == 0, f"{name} world-readable"


# --- the ETL through systemd on the sample logs ------------------------------------------------


def truth() -> dict:
    return json.loads((ephemeral_dir() / "sample" / "truth.json").read_text())


def scenario_vars() -> dict:
    """The scenario's own host_vars (on top of the local inventory)."""
    import yaml

    return yaml.safe_load((REPO / "molecule/default/host_vars/webstats-default.yml").read_text())


def status(host, deploy_vars) -> dict:
    return json.loads(run_ok(host, as_service_user("status --json", deploy_vars)))


def test_packages_seeded_by_the_deploy(host, deploy_vars):
    """A fresh instance needs no hand step: the deploy loaded the history shipped with the
    release into the empty packages table (and a second deploy, the idempotence run, did
    nothing)."""
    facts = status(host, deploy_vars)
    shipped = (REPO / "src" / "bioc_webstats" / "data" / "packages.csv").read_text()
    rows = len(shipped.strip().splitlines()) - 1
    assert rows > 3000
    assert facts["packages"] == rows, facts
    assert facts["packages_seeded_not_synced"], facts
    assert facts["objects_ingested"] == 0 and facts["valid_thru"] is None, facts
    out = run_ok(host, as_service_user("packages seed", deploy_vars))
    assert f"the table has {rows} rows; nothing done" in out


def test_what_the_first_deploy_published_is_sent_by_nginx(host, service, deploy_vars):
    """The deploy's own publish of a fresh instance (before any data) is readable by nginx:
    every directory of the publish tree has nginx's group and is setgid, and nginx sends the
    assets from disk (a version directory of the service's group was a 403 for every file
    until the first ETL run)."""
    publish = deploy_vars["webstats_base_publish_dir"]
    group = deploy_vars["webstats_nginx_group"]
    assert run_ok(host, f"stat -c %G {publish}").strip() == group
    wrong = run_ok(host, f"find {publish} -type d \\( ! -group {group} -o ! -perm -2050 \\)")
    assert wrong.strip() == "", wrong
    assert run_ok(host, f"test -f {publish}/current/packages/stats/main.css && echo yes") == "yes\n"
    for asset in ("main.css", "charts.js"):
        r = service.get(f"/packages/stats/{asset}")
        assert r.status_code == 200, (asset, r.status_code)


def test_the_legacy_history_is_imported_up_to_the_cut_over_day(host, deploy_vars):
    """docs/CUTOVER.md step 3: the legacy server's databases up to the cut-over day
    (``--until`` defaults to etl/logs_since), exactly once: a second import adds nothing."""
    sample = ephemeral_dir() / "sample"
    assert (sample / "legacy").is_dir(), "the sample has no legacy databases (--history)"
    cutover = (sample / "cutover").read_text().strip()
    assert scenario_vars()["webstats_config_logs_since"] == cutover
    files = "/srv/bioc-webstats/legacy/download_db_*.sqlite"
    cmd = as_service_user(f"import legacy-db --until {cutover} {files}", deploy_vars)
    # (its lines go to stderr, the journal's stream: read both)
    first = run_ok(host, f"sh -c {shlex.quote(cmd)} 2>&1", timeout=900)
    again = run_ok(host, f"sh -c {shlex.quote(cmd)} 2>&1", timeout=900)
    n_files = len(list((sample / "legacy").glob("download_db_*.sqlite")))
    assert n_files >= 2
    summary = [
        ln for ln in first.splitlines() if "import legacy-db:" in ln and "units imported" in ln
    ]
    assert summary, first[-1500:]
    imported = re.search(r"(\d+) units imported", summary[-1])
    assert imported and int(imported.group(1)) >= n_files, summary[-1]
    assert again.count("imported before and unchanged since") == n_files, again[-1500:]
    assert re.search(r"\b0 units imported", again), again[-1500:]
    facts = status(host, deploy_vars)
    assert facts["valid_thru"] and facts["valid_thru"] < cutover, facts
    assert facts["objects_ingested"] == 0, "the import is not in the logs' ledger"
    publish = [ln for ln in again.splitlines() if "publish:" in ln]
    assert not publish or "0 files built" in publish[-1], again[-1500:]


# A log object named long before the cut-over day (etl/logs_since): an empty ledger starts at
# the cut-over day, so the first run must not read it.
OLD_OBJECT = "E1TVLJONPTUXV3.2023-06-01-00.0ld0bject.gz"


def test_etl_through_systemd_ingests_the_logs(host, deploy_vars):
    logs = ephemeral_dir() / "sample" / "logs"
    sample_objects = sorted(p.name for p in logs.iterdir())
    run_ok(
        host, f"cp /srv/bioc-webstats/logs/{sample_objects[0]} /srv/bioc-webstats/logs/{OLD_OBJECT}"
    )
    try:
        run_ok(host, f"systemctl start {ETL}", timeout=600)  # a oneshot: returns when done
    finally:
        run_ok(host, f"rm -f /srv/bioc-webstats/logs/{OLD_OBJECT}")
    props = show(host, ETL, "Result", "ExecMainStatus")
    assert props["Result"] == "success", props
    facts = status(host, deploy_vars)
    assert facts["logs_since"] == scenario_vars()["webstats_config_logs_since"], facts
    assert facts["objects_ingested"] == len(sample_objects), facts  # not the old one
    assert facts["newest_object_hour"] and facts["last_etl_ok"] and facts["last_sync_ok"]
    assert facts["packages_seeded_not_synced"] is None, "the daily sync did not run"
    etl_log = host.file(f"{deploy_vars['webstats_base_log_dir']}/etl.log")
    assert etl_log.exists
    summary = [ln for ln in etl_log.content_string.splitlines() if "etl run:" in ln]
    assert summary, "no run summary in etl.log"
    t = truth()
    assert f"{t['counted']} downloads accepted" in summary[-1], summary[-1]
    # the release built on this (same-architecture) controller carries the C scanner
    assert "parsing with the native parser" in etl_log.content_string
    journal = run_ok(host, f"journalctl -u {ETL} --no-pager -o cat")
    assert "etl run:" in journal and "daily:" in journal


def tab_rows(text: str) -> list[list[str]]:
    lines = text.split("\n")
    assert lines[-1] == "", "no newline at the end"
    return [ln.split("\t") for ln in lines[1:-1]]


def test_no_service_user_can_put_a_link_in_the_log_directory(host, deploy_vars):
    """The log directory is root's, and stays so after the ETL's run (a LogsDirectory= would
    hand it to the ETL's user at every start): nginx's master and logrotate, both root, open,
    create and chown files there by name, so a service user that could write the directory
    could point a log at any file of the host (nginx chowns its log to www-data on a reopen)."""
    log_dir = deploy_vars["webstats_base_log_dir"]
    d = host.file(log_dir)
    assert (d.user, d.group, d.mode) == ("root", "root", 0o751), (d.user, d.group, oct(d.mode))
    users = (
        deploy_vars["webstats_services_user"],
        deploy_vars["webstats_services_web_user"],
        deploy_vars["webstats_nginx_user"],
    )
    for user in users:
        for cmd in (
            f"ln -s /etc/shadow {log_dir}/nginx-error.log.x",
            f"mv {log_dir}/etl.log {log_dir}/etl.log.x",
            f"mv {log_dir}/nginx-error.log {log_dir}/nginx-error.log.x",
        ):
            res = host.run(f"runuser -u {user} -- {cmd}")
            assert res.rc != 0 and "Permission denied" in res.stderr, (user, cmd, res.stderr)
    assert host.file(f"{log_dir}/etl.log").user == deploy_vars["webstats_services_user"]
    assert not host.file(f"{log_dir}/nginx-error.log.x").exists


def test_category_files_match_truth(service):
    t = truth()
    by_year: dict[tuple[str, int], dict[int, tuple[int, int]]] = {}
    for cat, year, month, ips, dls in t["category"]:
        by_year.setdefault((cat, year), {})[month] = (ips, dls)
    assert by_year
    for (cat, year), months in by_year.items():
        r = service.get(f"/packages/stats/{STEMS[cat]}/{cat}_{year}_stats.tab")
        assert r.status_code == 200, r.url
        rows = tab_rows(r.text)
        assert len(rows) == 13
        for i, row in enumerate(rows):
            month = 0 if i == 12 else i + 1
            ips, dls = months.get(month, (0, 0))
            assert row == [str(year), "all" if month == 0 else MONTHS[i], str(ips), str(dls)], (
                cat,
                year,
                row,
            )


def test_package_files_match_truth(service):
    t = truth()
    expected: dict[tuple[str, str, int], dict[int, tuple[int, int]]] = {}
    for cat, pkg, year, month, ips, dls in t["package"]:
        expected.setdefault((cat, pkg, year), {})[month] = (ips, dls)
    assert len(expected) > 20
    for (cat, pkg, year), months in expected.items():
        r = service.get(f"/packages/stats/{STEMS[cat]}/{pkg}/{pkg}_{year}_stats.tab")
        assert r.status_code == 200, r.url
        got = {
            (0 if row[1] == "all" else MONTHS.index(row[1]) + 1): (int(row[2]), int(row[3]))
            for row in tab_rows(r.text)
        }
        want = {m: months.get(m, (0, 0)) for m in range(13)}
        assert got == want, (cat, pkg, year)


def test_the_web_builds_package_files_into_the_live_version(host, service, deploy_vars):
    """Package files are built on their first request (above), by the web's own user, into
    the version directory the ETL's user published: the publish directory's default ACL lets
    each write where the other created. Not served from memory for want of a permission."""
    t = truth()
    cat, pkg, year = t["package"][0][:3]
    url = f"/packages/stats/{STEMS[cat]}/{pkg}/{pkg}_{year}_stats.tab"
    assert service.get(url).status_code == 200
    publish = deploy_vars["webstats_base_publish_dir"]
    built = host.file(f"{publish}/current{url}")
    assert built.is_file, url
    assert built.user == deploy_vars["webstats_services_web_user"]
    parent = host.file(f"{publish}/current/packages/stats")
    assert parent.user == deploy_vars["webstats_services_user"]  # the ETL published it
    # A page nobody asked for yet, built now: its warning, had the disk refused it, would be
    # in error.log after this offset (the web's first start on a fresh host rightly logs one,
    # before the nginx role made site/).
    error_log = f"{deploy_vars['webstats_services_log_dir']}/error.log"
    offset = host.file(error_log).size
    page = next(
        f"/packages/stats/{STEMS[c]}/{p}/"
        for c, p, *_ in t["package"]
        if not host.file(f"{publish}/current/packages/stats/{STEMS[c]}/{p}/index.html").exists
    )
    assert service.get(page).status_code == 200
    assert host.file(f"{publish}/current{page}index.html").user == built.user
    since = host.check_output(f"tail -c +{offset + 1} {error_log}")
    assert "serving from memory" not in since


def test_pages_answer(service):
    r = service.get("/packages/stats/")
    assert r.status_code == 200
    assert "Download stats for Bioconductor software packages" in r.text
    assert "Data as of" in r.text


# --- the take-over: compare with the site the legacy server would publish ----------------------


@pytest.fixture(scope="module")
def expected_site(host, deploy_vars) -> str:
    """The generator's truth rendered as the expected site (molecule/shared/expected_site.py),
    copied to the host: the directory `compare --against` reads."""
    import subprocess
    import sys

    vt = status(host, deploy_vars)["valid_thru"]
    out = ephemeral_dir() / "expected-site"
    subprocess.run(
        [sys.executable, str(REPO / "molecule/shared/expected_site.py"), "--truth",
         str(ephemeral_dir() / "sample" / "truth.json"), "--valid-thru", vt, "--out", str(out)],
        check=True, capture_output=True,
    )  # fmt: skip
    subprocess.run(["podman", "cp", f"{out}/.", f"{host.backend.name}:/srv/expected-site"],
                   check=True)  # fmt: skip
    return "/srv/expected-site/"


def test_compare_with_the_expected_site_finds_no_difference(host, deploy_vars, expected_site):
    res = host.run(as_service_user(f"compare --against {expected_site}", deploy_vars))
    assert res.rc == 0, res.stdout[-3000:] + res.stderr[-1000:]
    summary = res.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"(\d+) files compared, 0 differ", summary)
    assert m and int(m.group(1)) > 100, summary


def test_compare_reports_a_file_changed_on_purpose(host, deploy_vars, expected_site):
    t = truth()
    cat, pkg, year = t["package"][0][:3]
    rel = f"{STEMS[cat]}/{pkg}/{pkg}_{year}_stats.tab"
    path = f"{expected_site}{rel}"
    run_ok(host, f"cp {path} {path}.orig && sed -i '2s/\\t[0-9]*$/\\t999999/' {path}")
    try:
        res = host.run(as_service_user(f"compare --against {expected_site}", deploy_vars))
    finally:
        run_ok(host, f"mv {path}.orig {path}")
    assert res.rc == 1, res.stdout[-2000:]
    lines = res.stdout.strip().splitlines()
    assert [ln for ln in lines if ln.startswith(rel + ":")] and "999999" in res.stdout, lines[-5:]
    assert re.fullmatch(r"\d+ files compared, 1 differ", lines[-1]), lines[-1]
    assert "compare: 1 of" in res.stderr
