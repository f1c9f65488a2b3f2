"""Static gates for the systemd units: render every template under systemd/ with the role's
default values (the way Ansible's template module does), then run systemd's own checks.

- ``systemd-analyze verify`` of every unit: exit 0 and no output at all (a warning fails);
- ``systemd-analyze calendar`` of every ``OnCalendar=``;
- ``systemd-analyze security --offline=true --threshold=25`` of every service (exposure ≤ 2.5),
  and the exposure is below ``MAX_EXPOSURE`` (we aim lower than the gate).

``verify`` checks that every ``Exec*=`` binary exists and loads the units a unit refers to, so
the units are rendered into a throw-away root (``--root=``) that also holds a copy of the host's
own system units and executable stubs at the rendered paths (the venv does not exist here).
"""

from __future__ import annotations

import datetime as dt
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import jinja2
import pytest
import yaml

import ansible_render
from bioc_webstats import alerts

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = ROOT / "systemd"
UNIT_SUFFIXES = (".service", ".socket", ".timer", ".target", ".slice")
SERVICES = (
    "bioc-webstats.service",
    "bioc-webstats-etl.service",
    "bioc-webstats-watchdog.service",
    "bioc-webstats-web-config.service",
    "bioc-webstats-failure@.service",
)
ALL_UNITS = (
    "bioc-webstats.socket",
    *SERVICES,
    "bioc-webstats-etl.timer",
    "bioc-webstats-watchdog.timer",
    "bioc-webstats-web-config.timer",
    "bioc-webstats.target",
    "bioc-webstats-etl.slice",
)
# What the services may use together on the smallest production instance (2 GiB: t3.small),
# leaving the kernel, journald, sshd and the SSM agent about 300 MiB.
INSTANCE_BUDGET_MIB = 2048 - 300
MAX_EXPOSURE = 2.0  # the gate is 2.5 ("OK"); fail well before it

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


@pytest.fixture(scope="module", autouse=True)
def _systemd_analyze() -> None:
    # a missing systemd-analyze is a failure, never a skip
    assert SYSTEMD_ANALYZE, "systemd-analyze is not installed: 'make deps' installs systemd"


def _defaults() -> dict:
    """The roles' defaults with the playbooks' wiring, resolved (as Ansible would, lazily)."""
    return ansible_render.deploy_vars()


def _render_all() -> dict[str, str]:
    """Every template under systemd/ rendered with the defaults: {file name: text}."""
    env = ansible_render.environment(jinja2.FileSystemLoader(str(TEMPLATES)))
    values = _defaults()
    out = {}
    for template in sorted(TEMPLATES.glob("*.j2")):
        if template.name.endswith(".conf.j2"):  # included fragments
            continue
        out[template.name.removesuffix(".j2")] = env.get_template(template.name).render(**values)
    return out


@pytest.fixture(scope="module")
def rendered() -> dict[str, str]:
    return _render_all()


@pytest.fixture(scope="module")
def unit_root(tmp_path_factory, rendered) -> Path:
    """A root with the rendered units, the host's system units and stub executables."""
    root = tmp_path_factory.mktemp("unit-root")
    unit_dir = root / "etc/systemd/system"
    unit_dir.mkdir(parents=True)
    for name, text in rendered.items():
        if name.endswith(UNIT_SUFFIXES):
            (unit_dir / name).write_text(text)
    for system_dir in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")):
        if system_dir.is_dir():
            shutil.copytree(system_dir, root / "usr/lib/systemd/system", symlinks=True)
            break
    for text in rendered.values():
        for match in re.finditer(r"^Exec\w+=[-@:+!]*(/\S+)(?:\s+(/\S+))?", text, re.M):
            for path in match.groups():
                if path is None:
                    continue
                stub = root / path.lstrip("/")
                stub.parent.mkdir(parents=True, exist_ok=True)
                stub.write_text("#!/bin/sh\nexit 0\n")
                stub.chmod(0o755)
    return root


def _analyze(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SYSTEMD_ANALYZE, *args], capture_output=True, text=True, timeout=120, cwd=cwd
    )


def test_every_unit_is_rendered(rendered):
    assert set(ALL_UNITS) <= set(rendered), sorted(rendered)
    for name, text in rendered.items():
        assert "{{" not in text and "{%" not in text, name
        assert "Managed by Ansible" in text, name


@pytest.mark.parametrize("unit", ALL_UNITS)
def test_verify_without_warnings(unit_root, unit):
    path = unit_root / "etc/systemd/system" / unit
    result = _analyze("verify", f"--root={unit_root}", str(path))
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0 and output == "", f"systemd-analyze verify {unit}:\n{output}"


def test_verify_catches_a_bad_unit(unit_root):
    """The gate itself can fail: an unknown key is reported."""
    bad = unit_root / "etc/systemd/system" / "bioc-webstats-bad.service"
    bad.write_text("[Service]\nType=oneshot\nExecStart=/bin/kill\nNoSuchKey=1\n")
    try:
        result = _analyze("verify", f"--root={unit_root}", str(bad))
        assert "NoSuchKey" in result.stdout + result.stderr
    finally:
        bad.unlink()


VERIFY_UNIT = Path(__file__).parent.parent / "roles/webstats_base/files/verify-unit"


def verify_dropin(unit: Path | str, text: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """``verify-unit --dropin UNIT FILE`` of a candidate drop-in, as the role's validate."""
    conf = tmp_path / "candidate"
    conf.write_text(text)
    return subprocess.run(
        ["sh", str(VERIFY_UNIT), "--dropin", str(unit), str(conf)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("dropin", "fails"),
    [
        ("[Service]\nMemoryMax=1G\nEnvironment=A=1\n", None),
        ("[Service]\nMemoryMaxx=1G\n", "Unknown key 'MemoryMaxx'"),
        ("[Srvice]\nMemoryMax=1G\n", "Unknown section 'Srvice'"),
    ],
)
def test_a_site_dropin_is_verified_with_its_unit(tmp_path, dropin, fails):
    """webstats_services_dropins were installed unchecked: systemd ignores a misspelt key or
    section with a journal warning, and the deploy said ok with the setting dropped."""
    assert SYSTEMD_ANALYZE, "systemd-analyze is not installed: 'make deps' installs systemd"
    unit = tmp_path / "webstats-test.service"
    unit.write_text("[Unit]\nDescription=t\n[Service]\nExecStart=/bin/true\n")
    result = verify_dropin(unit, dropin, tmp_path)
    if fails is None:
        assert result.returncode == 0, result.stdout + result.stderr
    else:
        assert result.returncode == 1 and fails in result.stdout + result.stderr
        assert "webstats-test.service.d/50-site.conf" in result.stdout + result.stderr


def test_a_site_dropin_of_a_unit_not_installed_fails(tmp_path):
    missing = verify_dropin(
        "webstats-no-such.service", "[Service]\nMemoryMax=1G\nEnvironment=A=1\n", tmp_path
    )
    assert missing.returncode == 1
    assert "no unit file webstats-no-such.service installed" in missing.stderr


def test_calendar_expressions(rendered):
    expressions = [
        m.group(1).strip()
        for text in rendered.values()
        for m in re.finditer(r"^OnCalendar=(.+)$", text, re.M)
    ]
    assert expressions, "no OnCalendar= in any timer"
    for expression in expressions:
        result = _analyze("calendar", expression)
        assert result.returncode == 0, f"OnCalendar={expression}: {result.stderr.strip()}"
        assert "Next elapse" in result.stdout


def test_default_etl_schedule(rendered):
    timer = rendered["bioc-webstats-etl.timer"]
    assert "OnCalendar=*-*-* 01:00:00 UTC" in timer
    assert re.search(r"^Persistent=true$", timer, re.M)
    assert re.search(r"^RandomizedDelaySec=\S+", timer, re.M)


def test_etl_runs_one_command_the_daily_job(rendered):
    """One ExecStart= (sync reported, not fatal, inside `daily`), no leading '-': a failed
    sync or ETL fails the unit, so OnFailure= alarms."""
    etl = rendered["bioc-webstats-etl.service"]
    execs = re.findall(r"^ExecStart=(.*)$", etl, re.M)
    assert len(execs) == 1, execs
    assert not execs[0].startswith("-")
    daily = r"/\S+/run-logged /var/log/bioc-webstats/etl\.log /\S+/bin/bioc-webstats daily"
    assert re.fullmatch(daily, execs[0]), execs[0]
    assert re.search(r"^OnFailure=bioc-webstats-failure@%n\.service$", etl, re.M)


def _interval(spec: str) -> dt.timedelta:
    """The time between the next two elapses of an OnCalendar= expression (systemd's own)."""
    next_two = _analyze("calendar", "--iterations=2", spec).stdout
    stamps = re.findall(r"(?:Next elapse|Iter\. #2): \w+ (\S+ \S+)", next_two)
    assert len(stamps) >= 2, next_two
    first, second = (dt.datetime.fromisoformat(s) for s in stamps[:2])
    return second - first


def test_watchdog_timer_and_service(rendered):
    timer = rendered["bioc-webstats-watchdog.timer"]
    service = rendered["bioc-webstats-watchdog.service"]
    values = _defaults()
    for spec in values["webstats_services_watchdog_on_calendar"]:
        assert f"OnCalendar={spec}\n" in timer
        assert _interval(spec) == dt.timedelta(minutes=10), spec
    assert re.search(r"^Persistent=true$", timer, re.M)
    assert re.search(r"^RandomizedDelaySec=\S+", timer, re.M)
    assert re.search(r"^Unit=bioc-webstats-watchdog\.service$", timer, re.M)
    assert re.search(r"^WantedBy=bioc-webstats\.target$", timer, re.M)
    assert re.search(r"^ExecStart=/\S+/bin/bioc-webstats watchdog$", service, re.M)
    assert re.search(r"^OnFailure=bioc-webstats-failure@%n\.service$", service, re.M)
    assert re.search(r"^StateDirectory=bioc-webstats$", service, re.M)  # alerts/ state
    assert re.search(r"^PartOf=bioc-webstats\.target$", service, re.M)


def test_the_web_reads_its_own_file_and_cannot_reach_the_instance_role(rendered):
    """The web unit is denied the instance metadata service (no AWS credentials, so no SSM and
    no secret of the other logins) and reads the file the configuration oneshot writes, which
    runs before each start of the web and every 5 minutes; no other unit is cut off."""
    web = rendered["bioc-webstats.service"]
    writer = rendered["bioc-webstats-web-config.service"]
    timer = rendered["bioc-webstats-web-config.timer"]
    path = _defaults()["__webstats_services_web_env_file"]
    assert re.findall(r"^IPAddressDeny=(.*)$", web, re.M) == ["169.254.169.254 fd00:ec2::254"]
    for unit in set(SERVICES) - {"bioc-webstats.service"}:
        assert not re.search(r"^IPAddressDeny=", rendered[unit], re.M), unit
    files = re.findall(r'^Environment="?WEBSTATS_ENV_FILE=([^"\n]*)"?$', web, re.M)
    assert files[-1] == path  # the last assignment wins
    # nor the host's env file (every unit's first assignment), nor the alarms' state
    etl = rendered["bioc-webstats-etl.service"]
    state = Path("/var/lib", re.search(r"^StateDirectory=(.*)$", etl, re.M).group(1))
    assert files[0] == re.search(r'WEBSTATS_ENV_FILE=([^"\n]*)', etl).group(1)
    hidden = re.findall(r"^InaccessiblePaths=(.*)$", web, re.M)
    assert hidden == [
        f"-{files[0]} -{files[0]}.staged -{alerts.alerts_dir(state)}"
    ]  # (and its copy)
    for unit in set(SERVICES) - {"bioc-webstats.service"}:
        assert not re.search(r"^InaccessiblePaths=", rendered[unit], re.M), unit
    for dep in ("Wants", "After"):
        line = re.search(rf"^{dep}=(.*)$", web, re.M)
        assert line and "bioc-webstats-web-config.service" in line.group(1).split(), dep
    assert re.search(rf"^ExecStart=/\S+/bin/bioc-webstats config write-web {path}$", writer, re.M)
    assert re.search(rf"^RuntimeDirectory={Path(path).parent.name}$", writer, re.M)
    assert re.search(r"^RuntimeDirectoryMode=0750$", writer, re.M)
    assert re.search(r"^RuntimeDirectoryPreserve=yes$", writer, re.M)
    assert re.search(r"^OnFailure=bioc-webstats-failure@%n\.service$", writer, re.M)
    # the service user, whose configuration it reads, writing as the web's group (0640)
    assert re.search(r"^User=webstats$", writer, re.M)
    assert re.search(r"^Group=webstats-web$", writer, re.M)
    assert re.search(r"^SupplementaryGroups=webstats$", writer, re.M)
    assert not re.search(r"^(StateDirectory|LogsDirectory)=", writer, re.M)
    spec = re.search(r"^OnCalendar=(.*)$", timer, re.M).group(1)
    assert _interval(spec) == dt.timedelta(minutes=5), spec
    assert re.search(r"^Unit=bioc-webstats-web-config\.service$", timer, re.M)
    assert re.search(r"^WantedBy=bioc-webstats\.target$", timer, re.M)


def _mib(value: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMG]?)", value.strip())
    assert m, f"MemoryMax={value}: give it in K, M or G"
    return float(m.group(1)) * {"K": 1 / 1024, "M": 1, "G": 1024, "": 1 / 2**20}[m.group(2)]


def test_every_service_has_a_memory_ceiling_within_the_instance(rendered):
    """MemoryMax= on every service and on nginx (its drop-in); together they fit a 2 GiB
    instance, so one runaway unit cannot take the others down with it."""
    ceilings = {}
    for unit in SERVICES:
        found = re.findall(r"^MemoryMax=(\S+)$", rendered[unit], re.M)
        assert len(found) == 1, f"{unit}: MemoryMax= {found}"
        ceilings[unit] = _mib(found[0])
    nginx = _defaults()["webstats_nginx_memory_max"]
    assert nginx, "nginx has no memory ceiling"
    ceilings["nginx.service"] = _mib(nginx)
    assert all(v >= 64 for v in ceilings.values()), ceilings
    # the web must hold its workers (5 on 2 vCPUs x ~100 MB), the ETL its documented peak
    assert ceilings["bioc-webstats.service"] >= 5 * 100
    assert ceilings["bioc-webstats-etl.service"] >= 2 * 200
    total = sum(ceilings.values())
    assert total <= INSTANCE_BUDGET_MIB, f"{total:.0f} MiB > {INSTANCE_BUDGET_MIB}: {ceilings}"
    runbook = (ROOT / "docs" / "RUNBOOK.md").read_text()
    for unit, mib in ceilings.items():
        assert re.search(rf"`{re.escape(unit)}`[^\n]*\b{mib:.0f} MiB", runbook), (
            f"the runbook's Memory table does not give {unit} {mib:.0f} MiB"
        )


@pytest.mark.parametrize("unit", SERVICES)
def test_security_exposure(unit_root, unit):
    path = unit_root / "etc/systemd/system" / unit
    result = _analyze(
        "security", "--offline=true", "--threshold=25", f"--root={unit_root}", str(path)
    )
    assert result.returncode == 0, f"{unit} above the 2.5 gate:\n{result.stdout}{result.stderr}"
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", result.stdout)
    assert match, result.stdout[-500:]
    exposure, verdict = float(match.group(1)), match.group(2)
    assert exposure <= MAX_EXPOSURE and verdict == "OK", f"{unit}: {exposure} {verdict}"


@pytest.mark.parametrize("unit", SERVICES)
def test_no_secret_in_units(rendered, unit):
    """With the defaults, units carry only the env file's path: nothing for `systemctl show`."""
    text = rendered[unit]
    envs = re.findall(r"^Environment=\"?(\w+)=", text, re.M)
    assert set(envs) <= {"WEBSTATS_ENV_FILE", "PYTHONDONTWRITEBYTECODE"}, envs
    assert "EnvironmentFile=" not in text


def test_services_share_the_sandbox(rendered):
    for unit in SERVICES:
        text = rendered[unit]
        for setting in (
            "ProtectSystem=strict",
            "NoNewPrivileges=true",
            "CapabilityBoundingSet=\n",
            "SystemCallFilter=@system-service",
            "MemoryDenyWriteExecute=true",
            "UMask=0027",
        ):
            assert setting in text, f"{unit}: {setting!r} missing"
        user = "webstats-web" if unit == "bioc-webstats.service" else "webstats"
        assert re.search(rf"^User={user}$", text, re.M), unit


def test_the_web_has_its_own_account_and_writes_only_where_it_must(rendered):
    """The web runs as its own user and group (not the ETL's: it can neither signal the ETL's
    processes nor write etl.log), writable where its modes allow: the state directory (the
    publish directory's ACL) and the log directory (its own two files). Not through
    StateDirectory=/LogsDirectory=, which would hand both directories to its user at every
    start (and back to the service user at the ETL's)."""
    web = rendered["bioc-webstats.service"]
    values = _defaults()
    assert re.findall(r"^User=(.*)$", web, re.M) == [values["webstats_base_web_user"]]
    assert re.findall(r"^Group=(.*)$", web, re.M) == [values["webstats_base_web_group"]]
    assert values["webstats_base_web_user"] != values["webstats_base_user"]
    assert values["webstats_base_web_group"] != values["webstats_base_group"]
    assert not re.search(r"^(StateDirectory|LogsDirectory)", web, re.M)
    assert re.findall(r"^ReadWritePaths=(.*)$", web, re.M) == [
        f"{values['webstats_base_publish_dir']} {values['webstats_base_log_dir']}"
    ]
    # its log files are the ones the configuration names, owned by its user
    base = (ROOT / "roles/webstats_base/tasks/main.yml").read_text()
    task = re.search(
        r"- name: Create the web service's log files where missing\n(.*?)\n\n", base, re.S
    )
    assert task and 'owner: "{{ webstats_base_web_user }}"' in task.group(1)
    wiring = (ROOT / "playbooks/vars/wiring.yml").read_text()
    for var in ("ACCESS", "ERROR"):
        name = f"webstats_base_web_{var.lower()}_log"
        assert f'WEBSTATS_GUNICORN_{var}_LOG: "{{{{ {name} }}}}"' in wiring
        assert f"{name}" in task.group(1)
    # and logrotate keeps each file's owner (the web's, nginx's, the ETL's)
    rotate = (ROOT / "roles/webstats_base/templates/logrotate.j2").read_text()
    assert re.findall(r"^\s*create\b.*$", rotate, re.M) == ["    create 0640"]


def test_run_logged_wrapper(tmp_path, rendered):
    """The ETL's wrapper copies output to stdout and the log file and keeps the exit status."""
    wrapper = tmp_path / "run-logged"
    wrapper.write_text(rendered["run-logged"])
    wrapper.chmod(0o755)
    log = tmp_path / "etl.log"
    ok = subprocess.run(
        [str(wrapper), str(log), "sh", "-c", "echo one; echo two >&2"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert ok.returncode == 0
    assert ok.stdout.splitlines() == ["one", "two"]
    failed = subprocess.run(
        [str(wrapper), str(log), "sh", "-c", "echo three; exit 3"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert failed.returncode == 3
    assert "failed with exit status 3" in failed.stdout
    lines = log.read_text().splitlines()
    assert len(lines) == 4
    assert all(re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ ", line) for line in lines), lines
    assert lines[0].endswith(" one") and lines[2].endswith(" three")


def test_run_logged_says_how_systemd_ended_a_run(tmp_path, rendered):
    """ExecStopPost='s --ended: a run systemd ended (its wrapper gone with it) gets one line in
    etl.log; a run that exited by itself, well or not, gets none (the wrapper said it)."""
    wrapper = tmp_path / "run-logged"
    wrapper.write_text(rendered["run-logged"])
    wrapper.chmod(0o755)
    log = tmp_path / "etl.log"

    def ended(result: str, code: str, status: str) -> str:
        before = log.read_text() if log.exists() else ""
        env = {"PATH": "/usr/bin:/bin", "SERVICE_RESULT": result, "EXIT_CODE": code}
        env["EXIT_STATUS"] = status
        res = subprocess.run(
            [str(wrapper), "--ended", str(log)], env=env, capture_output=True, timeout=30
        )
        assert res.returncode == 0 and not res.stdout and not res.stderr, res
        return (log.read_text() if log.exists() else "")[len(before) :]

    assert ended("success", "exited", "0") == ""
    assert ended("exit-code", "exited", "1") == ""
    stop = ended("success", "killed", "TERM")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ the run was stopped .*\n", stop), stop
    assert stop.endswith("systemd: success, killed TERM\n")
    assert "the run timed out (TimeoutStartSec" in ended("timeout", "killed", "TERM")
    assert "memory ceiling" in ended("oom-kill", "exited", "137")
    assert "ended: signal" in ended("signal", "killed", "KILL")
    etl = rendered["bioc-webstats-etl.service"]
    post = re.findall(r"^ExecStopPost=(.*)$", etl, re.M)
    assert post == [
        r"-" + re.findall(r"^ExecStart=(\S+) ", etl, re.M)[0] + " --ended "
        "/var/log/bioc-webstats/etl.log"
    ], post


def test_socket_is_a_unix_socket_for_nginx(rendered):
    socket = rendered["bioc-webstats.socket"]
    values = _defaults()
    assert re.search(
        rf"^ListenStream={re.escape(values['webstats_base_web_socket'])}$", socket, re.M
    )
    assert re.search(r"^SocketMode=0660$", socket, re.M)
    assert re.search(rf"^SocketGroup={values['webstats_nginx_group']}$", socket, re.M)
    assert "NoDelay" not in socket  # TCP only


def test_state_and_log_directories_follow_the_facts(rendered):
    """The ETL's StateDirectory= names the base role's state directory, with the mode the base
    role gives it (systemd would otherwise reset it at every start). The log directory is
    root's: no unit names it in LogsDirectory= (systemd would give it to the unit's user at
    every start, and root's nginx master and logrotate work there by name); the ETL may write
    its etl.log there."""
    text = rendered["bioc-webstats-etl.service"]
    values = _defaults()
    base = yaml.safe_load((ROOT / "roles/webstats_base/tasks/main.yml").read_text())
    tasks = {t["name"]: t for t in base}
    state = tasks["Create the state directory (owned by the service user)"]["ansible.builtin.file"]
    assert state["mode"] == "0751" and state["owner"] == "{{ webstats_base_user }}"
    # root's once the units that named it in LogsDirectory= are replaced (the deploy's order)
    later = yaml.safe_load((ROOT / "roles/webstats_base/tasks/logs.yml").read_text())
    later = {t["name"]: t for t in later}
    logs = later["Make the log directory root's"]["ansible.builtin.file"]
    assert (logs["owner"], logs["group"], logs["mode"]) == ("root", "root", "0751")
    made = tasks["Create the log directory"]["ansible.builtin.file"]
    assert "owner" not in made and made["mode"] == "0751"
    deploy = yaml.safe_load((ROOT / "playbooks/deploy.yml").read_text())[0]["tasks"]
    steps = [t["name"] for t in next(t for t in deploy if "block" in t)["block"]]
    assert (
        steps.index("The log directory, root's")
        == steps.index("Units, then the restarts of what changed") + 1
    ), steps
    # made (nginx's publish_dir) before the units that name it in ReadWritePaths= start
    made = "The publish directory nginx sends (its owner, nginx's group, the writers' ACL)"
    assert steps.index(made) == steps.index("Units, then the restarts of what changed") - 1, steps
    files = later["Create the log files, each its writer's"]
    assert files["ansible.builtin.file"]["mode"] == "0640"
    assert {"path": "{{ webstats_base_log_dir }}/etl.log", "owner": "{{ webstats_base_user }}",
            "group": "{{ webstats_base_group }}"} in files["loop"]  # fmt: skip
    # the links of a directory the service user wrote are gone before a file is touched there
    order = list(later)
    assert order.index("Remove links left in the log directory") < order.index(
        "Create the log files, each its writer's"
    )
    state_dir = values["webstats_base_state_dir"].removeprefix("/var/lib/")
    assert re.search(rf"^StateDirectory={state_dir}$", text, re.M)
    assert re.search(rf"^StateDirectoryMode={state['mode']}$", text, re.M)
    assert re.search(rf"^ReadWritePaths={values['webstats_base_log_dir']} "
                     rf"{values['webstats_base_publish_dir']}$", text, re.M)  # fmt: skip
    for name, unit in rendered.items():
        assert not re.search(r"^LogsDirectory", unit, re.M), name


def test_directories_follow_a_changed_fact():
    """Another log or publish directory flows through the wiring into the units and the ETL's
    log."""
    values = ansible_render.deploy_vars(webstats_base_log_dir="/var/log/webstats-b",
                                        webstats_base_publish_dir="/srv/site-b")  # fmt: skip
    env = ansible_render.environment(jinja2.FileSystemLoader(str(TEMPLATES)))
    etl = env.get_template("bioc-webstats-etl.service.j2").render(**values)
    assert "ReadWritePaths=/var/log/webstats-b /srv/site-b\n" in etl
    web = env.get_template("bioc-webstats.service.j2").render(**values)
    assert "ReadWritePaths=/srv/site-b /var/log/webstats-b\n" in web
    assert " /var/log/webstats-b/etl.log " in etl


def test_cli_wrapper_runs_with_the_units_environment(tmp_path):
    """The SysOps wrapper hands the CLI exactly what every unit's Environment= holds (plus a
    PATH, a locale and the terminal): a variable added for the units reaches a run by hand."""
    values = ansible_render.deploy_vars(webstats_base_environment={"WEBSTATS_X": "a b"})
    # one fact: the units' and the deploy's own commands' (smoke test, migration, publish)
    assert values["webstats_services_environment"] == {"WEBSTATS_X": "a b"}
    assert values["webstats_release_environment"] == {"WEBSTATS_X": "a b"}
    env = ansible_render.environment(jinja2.FileSystemLoader(str(TEMPLATES)))
    units = set()
    web_file = f"WEBSTATS_ENV_FILE={values['__webstats_services_web_env_file']}"
    for unit in SERVICES:
        text = env.get_template(f"{unit}.j2").render(**values)
        found = set(re.findall(r'^Environment="?([^"\n]*)"?$', text, re.M)) - {web_file}
        assert found, unit
        units = units or found
        assert found == units, f"{unit} has another environment"
    # Run the rendered wrapper as root, with stand-ins for systemd-run and runuser; the last
    # prints its arguments and the environment the command would have.
    wrapper = tmp_path / "bioc-webstats"
    wrapper.write_text(env.get_template("bioc-webstats-cli.j2").render(**values))
    wrapper.chmod(0o755)
    stubs = tmp_path / "bin"
    stubs.mkdir()
    # (in Python: a bash would add its own PWD and SHLVL to the environment it passes on)
    for name, body in (
        ("id", "#!/bin/sh\necho 0"),
        (
            "systemd-run",
            "#!/usr/bin/python3\nimport os, sys\nprint(*sys.argv, file=sys.stderr)\n"
            "cmd = sys.argv[sys.argv.index('--') + 1:]\nos.execv(cmd[0], cmd)",
        ),
        (
            "runuser",
            "#!/usr/bin/python3\nimport os, sys\nprint(*sys.argv, file=sys.stderr)\n"
            "print(*sys.argv[4:], sep='\\n')\n"
            "print(*(f'{k}={v}' for k, v in os.environ.items()), sep='\\0', end='')",
        ),
    ):
        (stubs / name).write_text(f"{body}\n")
        (stubs / name).chmod(0o755)
    secret = "postgresql://etl:s3cr3t@db/webstats"
    res = subprocess.run(
        ["bash", str(wrapper), "status"],
        env={
            "PATH": f"{stubs}:/usr/bin:/bin",
            "WEBSTATS_DATABASE_URL": secret,
            "WEBSTATS_X": "the caller's",
            "SUDO_USER": "alice",
            "A.B": "not a shell name",
        },
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 0, res.stderr
    command = f"{values['webstats_services_app_dir']}/bin/bioc-webstats\nstatus\n"
    head, _, environ = res.stdout.partition(command)
    assert head == "" and environ, res.stdout
    got = dict(v.split("=", 1) for v in environ.split("\0") if v)
    # the units' environment, the caller's WEBSTATS_* on top of it, a PATH, a locale, a terminal
    units = dict(v.split("=", 1) for v in units)
    assert got == {
        **units,
        "WEBSTATS_X": "the caller's",
        "WEBSTATS_DATABASE_URL": secret,
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "TERM": "dumb",
    }
    # no value in an argument list: ps shows them to every local user while the command runs
    assert secret not in res.stderr and "s3cr3t" not in res.stderr, res.stderr
    assert "systemd-run --scope" in res.stderr and "runuser -u" in res.stderr, res.stderr


def test_the_site_dropins_are_installed_through_the_verifier():
    tasks = yaml.safe_load(
        (Path(__file__).parent.parent / "roles/webstats_services/tasks/main.yml").read_text()
    )
    install = next(t for t in tasks if t["name"].startswith("Install the site drop-ins"))
    validate = install["ansible.builtin.template"]["validate"]
    assert validate == "{{ webstats_services_verify_unit }} --dropin {{ item.key }} %s"


def test_every_dropin_of_a_role_is_installed_through_the_verifier():
    """nginx's drop-ins (its sandbox among them) and logrotate.timer's were installed unchecked
    on the host: a key the host's systemd does not know would weaken the sandbox silently."""
    nginx = yaml.safe_load((ROOT / "roles/webstats_nginx/tasks/main.yml").read_text())
    checked = {}
    for task in nginx:
        module = task.get("ansible.builtin.template") or {}
        if str(module.get("dest", "")).startswith("/etc/systemd/system/"):
            checked[module["dest"]] = module.get("validate")
    assert checked == {
        "/etc/systemd/system/nginx.service.d/bioc-webstats.conf":
            "{{ webstats_nginx_verify_unit }} --dropin nginx.service %s",
        "/etc/systemd/system/{{ __webstats_nginx_target }}.d/bioc-webstats.conf":
            "{{ webstats_nginx_verify_unit }} --dropin {{ __webstats_nginx_target }} %s",
        "/etc/systemd/system/nginx.service.d/bioc-webstats-sandbox.conf":
            "{{ webstats_nginx_verify_unit }} --dropin nginx.service %s",
    }  # fmt: skip
    timer = _base_task("Run logrotate hourly (size caps)")["ansible.builtin.copy"]
    assert timer["validate"] == (
        "{{ webstats_base_libexec_dir }}/verify-unit --dropin logrotate.timer %s"
    )


@pytest.mark.parametrize("template", ["nginx-service.conf.j2", "nginx-sandbox.conf.j2"])
def test_the_nginx_roles_dropins_verify_with_the_packaged_unit(tmp_path, template):
    """The nginx role's drop-ins of nginx.service (memory cap, target, sandbox) are checked
    here too, with the distribution's unit (on the host, with the host's): no message about
    them (a misspelt key would be ignored by systemd with a warning)."""
    from webserver import NGINX_TEMPLATES

    unit = Path("/lib/systemd/system/nginx.service")
    assert unit.is_file(), "nginx is not installed: 'make deps' installs it"
    text = ansible_render.render(NGINX_TEMPLATES / template, ansible_render.deploy_vars())
    result = verify_dropin(unit, text, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def _base_task(name: str) -> dict:
    tasks = yaml.safe_load((ROOT / "roles/webstats_base/tasks/main.yml").read_text())
    return next(t for t in tasks if t["name"] == name)


def test_nginx_cannot_reach_the_instance_role_either():
    """nginx parses the public's requests before the web does: its drop-in denies it the
    instance metadata service as the web unit's does (it had no such line), and the role
    applies it to the running nginx (a daemon-reload does not)."""
    from webserver import NGINX_TEMPLATES

    values = ansible_render.deploy_vars()
    dropin = ansible_render.render(NGINX_TEMPLATES / "nginx-service.conf.j2", values)
    web = ansible_render.render(TEMPLATES / "bioc-webstats.service.j2", values)
    denied = re.findall(r"^IPAddressDeny=(.*)$", dropin, re.M)
    assert denied == ["169.254.169.254 fd00:ec2::254"]
    assert denied == re.findall(r"^IPAddressDeny=(.*)$", web, re.M)
    handlers = yaml.safe_load((ROOT / "roles/webstats_nginx/handlers/main.yml").read_text())
    applied = [h for h in handlers if h.get("listen") == "webstats nginx resources changed"]
    assert len(applied) == 1
    env = ansible_render.environment()
    argv = [
        env.from_string(a).render(**values) for a in applied[0]["ansible.builtin.command"]["argv"]
    ]
    assert argv == [
        "systemctl", "set-property", "--runtime", "nginx.service", "IPAddressDeny=",
        f"IPAddressDeny={denied[0]}", f"MemoryMax={values['webstats_nginx_memory_max']}",
    ]  # fmt: skip


def test_the_logrotate_timer_dropin_verifies_with_the_packaged_unit(tmp_path):
    """The base role's drop-in of logrotate.timer (hourly runs for maxsize) verifies with the
    distribution's timer; the same check fails on a misspelt key (systemd would ignore it)."""
    unit = Path("/lib/systemd/system/logrotate.timer")
    assert unit.is_file(), "logrotate is not installed: 'make deps' installs it"
    content = _base_task("Run logrotate hourly (size caps)")["ansible.builtin.copy"]["content"]
    for text, ok in ((content, True), (content.replace("OnCalendar", "OnCalender"), False)):
        result = verify_dropin(unit, text, tmp_path)
        assert (result.returncode == 0) is ok, result.stdout + result.stderr


def test_the_logrotate_config_passes_its_validate(tmp_path):
    """The role installs the logrotate file through its ``validate:``: the file as rendered
    passes it, and one with a misspelt option does not (``logrotate --debug`` alone ignores
    the line and exits 0)."""
    task = _base_task("Rotate the log files")["ansible.builtin.template"]
    validate = task["validate"]
    text = ansible_render.render(
        ROOT / "roles/webstats_base/templates" / task["src"],
        {**ansible_render.deploy_vars(), "ansible_managed": "managed"},
    )
    for body, ok in ((text, True), (text.replace("maxsize", "maxsise"), False)):
        conf = tmp_path / "bioc-webstats"
        conf.write_text(body)
        conf.chmod(0o644)
        result = subprocess.run(  # as Ansible runs it: "validate % path", split, no shell
            shlex.split(validate % str(conf)), capture_output=True, text=True,
            timeout=60,
        )  # fmt: skip
        assert (result.returncode == 0) is ok, result.stdout + result.stderr
