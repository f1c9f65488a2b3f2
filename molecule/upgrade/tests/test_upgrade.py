"""Upgrade N-1 → N under continuous requests; rollback on demand; a broken release rolls back.

Converge installed release N-1 with N-1's own playbooks. These tests run in file order and
drive N's real playbooks from the controller against the scenario's container, as a SysAdmin
would (docs/RUNBOOK.md).
"""

from __future__ import annotations

import json

import pytest
from testlib import Load, ephemeral_dir, run_ok, run_playbook, wait_for

ROOT = "/opt/bioc-webstats"
LOAD_PATHS = ["/healthz", "/packages/stats/", "/packages/stats/bioc/bioc_stats.tab"]
DEPLOY = "ansible-playbook playbooks/deploy.yml -i inventory/production"
ROLLBACK = "ansible-playbook playbooks/rollback.yml -i inventory/production"


@pytest.fixture(scope="module")
def versions() -> dict[str, str]:
    return json.loads((ephemeral_dir() / "releases" / "versions.json").read_text())


def current_release(host) -> str:
    return run_ok(host, f"readlink {ROOT}/current").strip()


# The CLI of release N-1 as the service user: N-1's deploy may predate the bioc-webstats
# wrapper of webstats_services.
PREVIOUS_CLI = (
    "runuser -u webstats -- env WEBSTATS_ENV_FILE=/etc/bioc-webstats/webstats.env "
    "/opt/bioc-webstats/current/bin/bioc-webstats"
)


def wait_version(service, version: str) -> dict:
    return wait_for(
        lambda: (h := service.healthz()) and h["version"] == version and h,
        60,
        f"/healthz to report {version}",
    )


ENV_FILE = "/etc/bioc-webstats/webstats.env"


def env_file_state(host) -> tuple[str, str]:
    """The env file's bytes, and its owner, group, mode and time to the nanosecond."""
    return (
        run_ok(host, f"cat {ENV_FILE}"),
        run_ok(host, f"stat -c '%U:%G %a %.9Y' {ENV_FILE}").strip(),
    )


def deploy_cmd(runbook, source: str, *extra: str) -> str:
    cmd = runbook(DEPLOY)
    return " ".join([cmd, "-e", f"webstats_release_source_dir={source}", *extra])


def test_previous_release_serves(host, service, versions, runbook):
    assert wait_version(service, versions["previous"])
    assert current_release(host) == f"releases/{versions['previous']}"
    # data for the pages the load asks for
    run_ok(host, f"{PREVIOUS_CLI} packages load /srv/bioc-webstats/packages.csv")
    run_ok(host, runbook("systemctl start bioc-webstats-etl.service"), timeout=600)
    for path in LOAD_PATHS:
        assert service.get(path).status_code == 200, path


# What release N changes beside the code, as a real release does: the web service's unit
# (daemon-reload, then a restart behind the socket) and nginx's site (checked, then reloaded).
N_CHANGES = {"webstats_services_web_restart_sec": "9", "webstats_nginx_keepalive_timeout": "64"}
UNIT = "/etc/systemd/system/bioc-webstats.service"
SITE = "/etc/nginx/sites-available/bioc-webstats"


def test_check_diff_of_the_upgrade_runs_through_and_changes_nothing(
    host, service, versions, runbook
):
    """What a deploy of N would change, shown before it (docs/RUNBOOK.md): `--check --diff`
    runs through on the host N-1 serves, and changes nothing there (0.3.26's acl module
    failed on the publish directory it moved, which check mode does not make)."""
    layout = ("stat -c '%n %F %U:%G %a' /var/lib/bioc-webstats* /etc/bioc-webstats/* "
              "/opt/bioc-webstats/*")  # fmt: skip

    def state():
        return current_release(host), env_file_state(host), host.run(layout).stdout

    before = state()
    source = str(ephemeral_dir() / "releases" / "current")
    res = run_playbook(deploy_cmd(runbook, source, "--check", "--diff"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert state() == before
    assert wait_version(service, versions["previous"])


def test_upgrade_under_load_drops_no_request(host, service, versions, runbook):
    assert "RestartSec=10" in host.file(UNIT).content_string
    nginx_pid = run_ok(host, "systemctl show -P MainPID nginx.service").strip()
    extra = [f"-e {name}={value}" for name, value in N_CHANGES.items()]
    with Load(service.base, LOAD_PATHS) as load:
        wait_for(lambda: load.ok >= 20, 60, "the load to get going")
        res = run_playbook(
            deploy_cmd(runbook, str(ephemeral_dir() / "releases" / "current"), *extra)
        )
        # keep asking until the new version answers, then a little more
        wait_for(lambda: versions["current"] in load.versions, 60, "the load to see N")
        seen = load.ok
        wait_for(lambda: load.ok >= seen + 20, 60, "more requests on N")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert load.failed == 0, f"{load.failed} failed of {load.ok + load.failed}: {load.errors}"
    assert load.ok >= 100, f"only {load.ok} requests during the upgrade"
    assert load.versions == [versions["previous"], versions["current"]], load.versions
    assert wait_version(service, versions["current"])
    assert current_release(host) == f"releases/{versions['current']}"
    assert run_ok(host, f"readlink {ROOT}/previous").strip() == f"releases/{versions['previous']}"
    # the changed unit and site are in force: the unit loaded, nginx reloaded (same master)
    assert "RestartSec=9" in host.file(UNIT).content_string
    assert run_ok(host, "systemctl show -P RestartUSec bioc-webstats.service").strip() == "9s"
    assert "keepalive_timeout 64s;" in host.file(SITE).content_string
    assert run_ok(host, "systemctl show -P MainPID nginx.service").strip() == nginx_pid
    # a resource drop-in that changed (0.3.23: the metadata service denied) is applied to that
    # same master, not left to its next start
    applied = "/run/systemd/system.control/nginx.service.d/50-IPAddressDeny.conf"
    assert "IPAddressDeny=169.254.169.254/32" in host.file(applied).content_string
    # the site is out of the service user's state directory (0.3.26): N published into its
    # new place, and removed the one of releases before
    assert host.file("/var/lib/bioc-webstats-site/current").is_symlink
    assert not host.file("/var/lib/bioc-webstats/site").exists


def test_rollback_on_demand_and_forward_again(host, service, versions, runbook):
    res = run_playbook(runbook(ROLLBACK))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert wait_version(service, versions["previous"])
    assert current_release(host) == f"releases/{versions['previous']}"
    # "run again to go forward"
    res = run_playbook(runbook(ROLLBACK))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert wait_version(service, versions["current"])
    assert current_release(host) == f"releases/{versions['current']}"


def test_rollback_by_hand_on_the_instance(host, service, versions, runbook):
    switch = (
        "ln -sfn releases/<version> /opt/bioc-webstats/current.new"
        " && mv -T /opt/bioc-webstats/current.new /opt/bioc-webstats/current"
    )
    restart = (
        "systemctl reset-failed bioc-webstats.service; systemctl restart bioc-webstats.service"
    )
    for version in (versions["previous"], versions["current"]):  # back, then forward again
        run_ok(host, runbook(switch, {"<version>": version}))
        run_ok(host, runbook(restart))
        health = json.loads(run_ok(host, runbook("curl -fsS http://127.0.0.1:8000/healthz; echo")))
        assert health["version"] == version
        assert wait_version(service, version)
        assert current_release(host) == f"releases/{version}"


def test_broken_release_is_rolled_back_and_n_keeps_serving(host, service, versions, runbook):
    broken = str(ephemeral_dir() / "releases" / "broken")
    # a shorter health wait than production's 90 s: the outcome is the same (the broken release
    # answers 503 at once, it never becomes healthy)
    cmd = deploy_cmd(
        runbook,
        broken,
        "-e",
        "webstats_release_health_retries=3",
        "-e",
        "webstats_release_health_delay=2",
    )
    with Load(service.base, LOAD_PATHS[1:]) as load:  # pages only: /healthz fails by design
        res = run_playbook(cmd)
    assert res.returncode != 0, "the deploy of a broken release succeeded"
    out = res.stdout + res.stderr
    assert f"Deploy of bioc-webstats {versions['broken']} failed" in out, out[-3000:]
    assert f"Rolled back: release {versions['current']} is serving again." in out, out[-3000:]
    assert current_release(host) == f"releases/{versions['current']}"
    health = wait_version(service, versions["current"])
    assert health["status"] == "ok"
    assert run_ok(host, "systemctl is-active bioc-webstats.service").strip() == "active"
    assert load.failed == 0, f"{load.failed} failed of {load.ok + load.failed}: {load.errors}"
    assert load.ok > 0


def test_a_value_the_release_refuses_never_goes_live(host, service, versions, runbook):
    """The env file is staged and checked by the new release before it goes live: a deploy
    whose value the release refuses (a day that does not exist) fails before the switch and
    leaves the live file (its bytes, owner, mode and time), which the timers, the CLI and the
    web's configuration read, and the web untouched. Before, the refused value stayed live."""
    pid = run_ok(host, "systemctl show -P MainPID bioc-webstats.service").strip()
    before = env_file_state(host)
    current = str(ephemeral_dir() / "releases" / "current")
    res = run_playbook(deploy_cmd(runbook, current, "-e webstats_config_logs_since=2020-02-30"))
    out = res.stdout + res.stderr
    assert res.returncode != 0, out[-3000:]
    assert "2020-02-30" in out and "Nothing was switched" in out, out[-3000:]
    assert "and so does the env file it reads" in out, out[-3000:]
    assert env_file_state(host) == before
    assert "WEBSTATS_ETL_LOGS_SINCE=2020-02-30" in run_ok(host, f"cat {ENV_FILE}.staged")
    assert run_ok(host, "systemctl show -P MainPID bioc-webstats.service").strip() == pid
    run_ok(host, runbook("bioc-webstats check"))  # the CLI reads the live file: still good
    # the value fixed: it goes live, and the web restarts on it
    res = run_playbook(deploy_cmd(runbook, current, "-e webstats_config_logs_since=2020-01-01"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "WEBSTATS_ETL_LOGS_SINCE=2020-01-01" in env_file_state(host)[0]
    assert wait_version(service, versions["current"])
    pid_fixed = run_ok(host, "systemctl show -P MainPID bioc-webstats.service").strip()
    assert pid_fixed != pid
    # a configuration-only deploy that fails after its file went live (nginx refuses a value):
    # nothing to roll back, and the message says the new file stays live
    res = run_playbook(
        deploy_cmd(
            runbook,
            current,
            "-e webstats_config_logs_since=2020-01-02",
            "-e webstats_nginx_listen_address=999.0.0.1",
        )
    )
    out = res.stdout + res.stderr
    assert res.returncode != 0, out[-3000:]
    assert "but the env file this run put live stays too" in out, out[-3000:]
    assert "WEBSTATS_ETL_LOGS_SINCE=2020-01-02" in env_file_state(host)[0]
    assert wait_version(service, versions["current"])  # nginx kept its configuration
    assert run_ok(host, "systemctl show -P MainPID bioc-webstats.service").strip() != pid_fixed


def test_an_env_file_newer_than_the_web_restarts_it(host, service, versions, runbook):
    """A deploy interrupted after it put the env file live (^C, a lost connection) left it
    newer than the web's start: the next deploy restarts the web although nothing changes in
    the file (the notification died with the first)."""
    pid = run_ok(host, "systemctl show -P MainPID bioc-webstats.service").strip()
    run_ok(host, f"touch {ENV_FILE}")
    current = str(ephemeral_dir() / "releases" / "current")
    setting = "-e webstats_config_logs_since=2020-01-01"
    res = run_playbook(deploy_cmd(runbook, current, setting))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "changed after bioc-webstats.service started" in res.stdout, res.stdout[-3000:]
    assert wait_version(service, versions["current"])
    assert run_ok(host, "systemctl show -P MainPID bioc-webstats.service").strip() != pid
    res = run_playbook(deploy_cmd(runbook, current, setting))  # and then it is done
    assert res.returncode == 0 and "changed after" not in res.stdout, res.stdout[-3000:]
