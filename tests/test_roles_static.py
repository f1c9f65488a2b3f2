"""Static checks of the Ansible roles: public variables live in defaults/, carry the role's
name, and are all documented, with the same default, in meta/argument_specs.yml; the shared
facts are declared once and wired by the playbooks; no role reads another's internals; the
nginx configuration rendered from the role's templates passes `nginx -t`."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

import ansible_render
from webserver import NGINX_TEMPLATES, nginx_binary, nginx_test, render_nginx

REPO = Path(__file__).resolve().parent.parent
ROLES = REPO / "roles"
WIRING = REPO / "playbooks" / "vars" / "wiring.yml"
ROLE_NAMES = sorted(p.name for p in ROLES.iterdir() if (p / "tasks" / "main.yml").is_file())


def _load(path: Path):
    return yaml.safe_load(path.read_text()) or {}


def test_the_roles_are_there():
    assert set(ROLE_NAMES) >= {
        "webstats_base",
        "webstats_config",
        "webstats_release",
        "webstats_services",
        "webstats_postgresql_local",
        "webstats_nginx",
        "webstats_db",
    }


@pytest.mark.parametrize("role", ROLE_NAMES)
def test_defaults_are_prefixed_and_documented(role):
    defaults = _load(ROLES / role / "defaults" / "main.yml")
    specs = _load(ROLES / role / "meta" / "argument_specs.yml")["argument_specs"]
    options = specs["main"]["options"]
    assert defaults, f"{role}: no defaults"
    for name in defaults:
        assert name.startswith(f"{role}_"), f"{role}: {name} lacks the role prefix"
    missing = sorted(set(defaults) - set(options))
    assert not missing, f"{role}: not in argument_specs: {missing}"
    # Options without a default are the wired facts: required, never in defaults/.
    required = {name for name, spec in options.items() if spec.get("required")}
    unknown = sorted(set(options) - set(defaults) - required)
    assert not unknown, f"{role}: in argument_specs but not in defaults: {unknown}"
    for name, spec in options.items():
        assert spec.get("description"), f"{role}: {name} has no description"
        assert spec.get("type"), f"{role}: {name} has no type"
        if name not in defaults:
            continue
        value = defaults[name]
        if isinstance(value, str) and "{{" in value:
            continue  # computed defaults are described, not repeated
        # a literal default is repeated in the spec (ansible-doc and the spec check show it)
        assert "default" in spec, f"{role}: {name} has a default ({value!r}) its spec lacks"
        assert spec["default"] == value, f"{role}: {name} default differs: {spec['default']!r}"


@pytest.mark.parametrize("role", ROLE_NAMES)
def test_entry_points_have_specs(role):
    specs = _load(ROLES / role / "meta" / "argument_specs.yml")["argument_specs"]
    for tasks in (ROLES / role / "tasks").glob("*.yml"):
        assert tasks.stem in specs, f"{role}: tasks/{tasks.name} has no argument spec"
    for entry, spec in specs.items():
        for name in spec.get("options", {}):
            assert name in specs["main"]["options"], f"{role}:{entry}: {name} unknown to main"


@pytest.mark.parametrize(
    "role", [r for r in ROLE_NAMES if (ROLES / r / "vars" / "main.yml").is_file()]
)
def test_private_vars_are_marked(role):
    """vars/ holds internals only: double-underscore names, never public ones."""
    path = ROLES / role / "vars" / "main.yml"
    for name in _load(path):
        assert name.startswith(f"__{role}_"), f"{role}: vars/{name} must be __{role}_…"


def _options() -> dict[str, dict]:
    """Every option of every role's main entry point: {name: spec}."""
    out = {}
    for role in ROLE_NAMES:
        specs = _load(ROLES / role / "meta" / "argument_specs.yml")["argument_specs"]
        out.update(specs["main"]["options"])
    return out


READERS = ("tasks", "handlers", "vars")  # where a role reads its options (and playbooks/)


def _boolean_options(role: str) -> list[str]:
    defaults = _load(ROLES / role / "defaults" / "main.yml")
    return [name for name, value in defaults.items() if isinstance(value, bool)]


@pytest.mark.parametrize("role", [r for r in ROLE_NAMES if _boolean_options(r)])
def test_boolean_options_are_read_with_the_bool_filter(role):
    """A boolean given on the command line (``-e name=false``) is the string "false", which
    Jinja takes as true: every test of a boolean option goes through ``| bool`` (the ETL timer
    was started by a deploy told to keep it stopped)."""
    flags = _boolean_options(role)
    bare = []
    uses = 0
    read_by = [p for p in sorted((ROLES / role).glob("*/*.yml")) if p.parent.name in READERS]
    for path in read_by + sorted((REPO / "playbooks").glob("*.yml")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split(" #")[0]
            if code.lstrip().startswith(("#", "- name:", "name:", "msg:")):
                continue
            for flag in flags:
                uses += len(re.findall(rf"\b{flag}\b", code))
                # read without | bool (| default(…) | bool is fine; "flag: true" sets it)
                if re.search(rf"\b{flag}\b(?!\s*(\|\s*default\([^)]*\)\s*)?\|\s*bool)(?!:)", code):
                    bare.append(f"{path.relative_to(REPO)}:{n}: {code.strip()}")
    assert uses, f"{role}: its boolean options {flags} are never read"
    assert not bare, "\n".join(bare)


def test_every_wired_variable_is_an_option_and_every_required_one_is_wired():
    """The playbooks pass each shared fact to the roles' own variables (wiring.yml): each is a
    documented input of its role, and every required input without a default is wired."""
    wiring = _load(WIRING)
    options = _options()
    defaults = {k for r in ROLE_NAMES for k in _load(ROLES / r / "defaults" / "main.yml")}
    assert set(wiring) <= set(options), sorted(set(wiring) - set(options))
    unwired = {n for n, spec in options.items() if spec.get("required") and n not in defaults}
    unwired -= INVENTORY_INPUTS  # site facts (logins and their passwords), not host facts
    assert unwired <= set(wiring), sorted(unwired - set(wiring))
    assert len(wiring) >= 20
    for name, value in wiring.items():  # from a host fact, or from the site's logins
        fact = re.search(r"webstats_(base|nginx)_\w+", str(value))
        assert fact or set(re.findall(r"webstats_db_\w+", str(value))) & INVENTORY_INPUTS, (
            f"{name} is not wired from a fact"
        )


# Required inputs that each inventory gives (webstats_db: the database logins, run by
# playbooks/db-bootstrap.yml), not the wiring.
INVENTORY_INPUTS = {
    f"webstats_db_{login}_{what}"
    for login in ("owner", "etl", "web")
    for what in ("user", "password")
}


@pytest.mark.parametrize("inventory", ["local", "production", "staging"])
def test_every_inventory_gives_the_database_logins(inventory):
    """db-bootstrap.yml runs with every inventory: each names the three logins (all different)
    and says where their passwords come from (never a literal password in the repository)."""
    values: dict = {}
    for path in sorted((REPO / "inventory" / inventory / "group_vars").glob("*.yml")):
        values.update(_load(path))
    assert INVENTORY_INPUTS <= set(values), sorted(INVENTORY_INPUTS - set(values))
    names = [values[f"webstats_db_{login}_user"] for login in ("owner", "etl", "web")]
    assert len(set(names)) == 3, names
    for login in ("owner", "etl", "web"):
        password = str(values[f"webstats_db_{login}_password"])
        looked_up = r"lookup\('(ansible\.builtin\.password|amazon\.aws\.secretsmanager_secret)'"
        assert re.search(looked_up, password), f"{inventory}: the {login} password is a literal"
    if inventory != "local":
        assert "secretsmanager_secret" in str(values["webstats_db_admin_password"])


def test_each_fact_is_declared_once():
    """The shared literals (the service account, the paths, the socket) are set in one role's
    defaults only; the others take them through the wiring, in their defaults and their
    private vars alike."""
    facts = re.compile(
        r"(/opt/bioc-webstats|/etc/bioc-webstats|/var/lib/bioc-webstats|/var/log/bioc-webstats"
        r"|/run/bioc-webstats|/usr/local/libexec/bioc-webstats)(/|$)|webstats\.env"
    )
    for role in ROLE_NAMES:
        if role == "webstats_base":
            continue
        for kind in ("defaults", "vars"):
            path = ROLES / role / kind / "main.yml"
            for name, value in (_load(path) if path.exists() else {}).items():
                literal = str(value) if "{{" not in str(value) else ""
                assert not facts.search(literal), f"{role}/{kind}: {name}: {value}"
                assert not (name.endswith(("_user", "_group")) and value == "webstats"), name


@pytest.mark.parametrize(
    "bundle", ["", "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----"]
)
def test_env_file_holds_the_hosts_layout_and_the_database_tls(bundle):
    """The env file names the host settings it was given (SSM cannot override them), and the
    database's TLS settings exactly when its CA bundle is set."""
    values = ansible_render.deploy_vars(webstats_base_db_ca_bundle=bundle)
    values.update(ansible_managed="managed", __webstats_config_secrets={})
    text = ansible_render.render(ROLES / "webstats_config/templates/webstats.env.j2", values)
    settings = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    listed = settings.pop("WEBSTATS_HOST_SETTINGS").split(",")
    assert {"WEBSTATS_WEB_PUBLISH_DIR", "WEBSTATS_GUNICORN_BIND_PORT"} <= set(listed)
    assert all(settings[name] for name in listed), listed
    tls = {k: settings.get(k) for k in ("WEBSTATS_DB_SSLMODE", "WEBSTATS_DB_SSLROOTCERT")}
    if bundle:
        assert tls == {
            "WEBSTATS_DB_SSLMODE": "verify-full",
            "WEBSTATS_DB_SSLROOTCERT": values["webstats_base_db_ca_file"],
        }
        assert set(tls) <= set(listed)
        assert values["webstats_db_admin_ca_cert"] == values["webstats_base_db_ca_file"]
    else:  # libpq's default, and SSM may still set it
        assert tls == {"WEBSTATS_DB_SSLMODE": None, "WEBSTATS_DB_SSLROOTCERT": None}
        assert values["webstats_db_admin_ca_cert"] == ""


def test_no_role_or_playbook_reads_another_roles_internals():
    """__webstats_<role>_* names belong to that role; playbooks read published results."""
    paths = [
        *REPO.glob("roles/*/*/*.yml"),
        *REPO.glob("roles/*/templates/*.j2"),
        *REPO.glob("playbooks/**/*.yml"),
        *REPO.glob("systemd/*.j2"),
    ]
    assert len(paths) > 30
    for path in paths:
        parts = path.relative_to(REPO).parts
        owner = {"roles": parts[1], "systemd": "webstats_services"}.get(parts[0])
        for name in set(re.findall(r"__(webstats_[a-z]+(?:_local)?)_\w+", path.read_text())):
            playbooks_own = (
                "webstats_deploy",
                "webstats_backup",
                "webstats_restore",
                "webstats_alarms",
                "webstats_dbboot",
            )
            if owner is None and name in playbooks_own:
                continue  # a playbook's own
            assert name == owner, f"{path.relative_to(REPO)} reads __{name}_*"


# --- nginx ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nginx_conf(tmp_path_factory) -> tuple[Path, dict]:
    """nginx.conf + site from the role's templates, with the production facts except the
    directories nginx -t touches (its configuration and log files go to a temporary directory)."""
    tmp = tmp_path_factory.mktemp("nginx-static")
    values = ansible_render.deploy_vars()
    return render_nginx(
        tmp,
        Path(values["webstats_base_web_socket"]),
        Path(values["webstats_base_publish_dir"]),
        webstats_nginx_listen_address=values["webstats_nginx_listen_address"],
        webstats_nginx_port=values["webstats_nginx_port"],
    )


def test_nginx_configuration_renders_and_passes_nginx_t(nginx_conf):
    conf, _ = nginx_conf
    site = (conf.parent / "sites-enabled" / "bioc-webstats").read_text()
    assert "{{" not in site and "{%" not in site
    assert "Managed by Ansible" in site and "Managed by Ansible" in conf.read_text()
    assert "listen 0.0.0.0:8000 default_server;" in site
    assert "server unix:/run/bioc-webstats/web.sock;" in site
    assert "root /var/lib/bioc-webstats-site/current;" in site
    assert "add_header Cache-Control $webstats_cache_control;" in site
    assert '"" "public, max-age=3600";' in site
    result = nginx_test(conf)
    assert result.returncode == 0, result.stderr
    # no warning either: SysOps run nginx -t (the runbook), and every reload logs them (but
    # the one of a check not run as root: nginx's master runs as root)
    warnings = [w for w in result.stderr.splitlines() if "[warn]" in w and '"user"' not in w]
    assert warnings == [], result.stderr


def test_nginx_add_header_only_at_server_level(nginx_conf):
    """An add_header in a location would drop the server's security headers there."""
    conf, _ = nginx_conf
    site = (conf.parent / "sites-enabled" / "bioc-webstats").read_text()
    server = site[site.index("server {") :]
    depth = 0
    for line in server.splitlines():
        if line.strip().startswith("add_header"):
            assert depth == 1, line
        depth += line.count("{") - line.count("}")


def test_nginx_t_catches_a_broken_site(nginx_conf, tmp_path):
    """The gate can fail: the role's validate wrapper rejects a broken candidate site and
    accepts the real one, testing each with the rest of the configuration."""
    conf, _ = nginx_conf
    checker = REPO / "roles" / "webstats_nginx" / "files" / "nginx-test-site"
    good = conf.parent / "sites-enabled" / "bioc-webstats"
    ok = subprocess.run(
        [checker, conf, good],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": os.environ["PATH"] + ":/usr/sbin"},
    )
    assert ok.returncode == 0, ok.stderr
    bad = tmp_path / "site"
    bad.write_text(good.read_text().replace("merge_slashes off;", "merge_slashes sideways;"))
    failed = subprocess.run(
        [checker, conf, bad],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": os.environ["PATH"] + ":/usr/sbin"},
    )
    assert failed.returncode != 0
    assert "merge_slashes" in failed.stderr


def _render_with_origin_check(tmp_path: Path) -> Path:
    """nginx.conf of the deploy's values with the origin header check on."""
    values = ansible_render.deploy_vars()
    conf, _ = render_nginx(
        tmp_path,
        Path(values["webstats_base_web_socket"]),
        Path(values["webstats_base_publish_dir"]),
        webstats_nginx_origin_header_name="X-Origin-Verify",
        webstats_nginx_origin_header_value="a-secret-of-sixteen+",
    )
    return conf


def test_nginx_origin_check_keeps_the_secret_in_its_own_file(tmp_path):
    conf = _render_with_origin_check(tmp_path)
    site = (conf.parent / "sites-enabled" / "bioc-webstats").read_text()
    origin = (conf.parent / "bioc-webstats-origin.conf").read_text()
    assert "a-secret-of-sixteen+" not in site + conf.read_text()
    assert '"a-secret-of-sixteen+" 1;' in origin and "$http_x_origin_verify" in origin
    assert nginx_test(conf).returncode == 0


def test_nginx_origin_check_is_removed_after_the_site_that_includes_it(tmp_path):
    """Turning the origin check off: the enabled site still includes the secret's file until
    the new site is written, so every `nginx -t` before that (nginx.conf's, the site's) fails
    on a file removed too early. Shown with nginx itself, then the role's order checked."""
    conf = _render_with_origin_check(tmp_path)
    (conf.parent / "bioc-webstats-origin.conf").unlink()
    assert nginx_test(conf).returncode != 0  # the old site, its include gone
    tasks = [t["name"] for t in _load(ROLES / "webstats_nginx" / "tasks" / "main.yml")]
    removed = tasks.index("Remove the origin header check when not configured")
    for before in (
        "Install nginx.conf (checked with nginx -t)",
        "Install the site (checked with nginx -t, in place of the enabled sites)",
        "Enable the site",
    ):
        assert tasks.index(before) < removed, before


def test_nginx_has_room_for_its_limits_within_its_memory():
    """The 503 limit comes before the connection slots run out (a proxied request holds two;
    a thousand idle keep-alive connections beside them): past the slots nginx drops new
    connections instead ("worker_connections are not enough"). Every slot holding the largest
    head nginx keeps (~44 KiB) fits the unit's memory ceiling with room for the rest."""
    d = _load(ROLES / "webstats_nginx" / "defaults" / "main.yml")
    slots = d["webstats_nginx_worker_processes"] * d["webstats_nginx_worker_connections"]
    assert slots >= 2 * d["webstats_nginx_max_connections"] + 1000
    assert d["webstats_nginx_max_connections_per_client"] <= d["webstats_nginx_max_connections"]
    number, unit = re.fullmatch(r"(\d+)([MG])", d["webstats_nginx_memory_max"]).groups()
    ceiling_kib = int(number) * (1024 if unit == "M" else 1024 * 1024)
    assert slots * 44 + 48 * 1024 <= ceiling_kib  # + the master, the pools, the sockets


def test_nginx_is_installed():
    """Tests that need nginx fail without it (make deps installs nginx-light)."""
    assert Path(nginx_binary()).is_file()
    assert NGINX_TEMPLATES.is_dir()


def test_every_runbook_section_named_elsewhere_exists():
    """A message or comment that sends SysOps to `RUNBOOK.md, "Section"` names a real heading
    (the deploy's failure message named a section that did not exist)."""
    runbook = (REPO / "docs" / "RUNBOOK.md").read_text()
    headings = {m.group(1).strip() for m in re.finditer(r"^#+ (.+)$", runbook, re.M)}
    refs = []
    for top in ("src", "roles", "playbooks", "systemd", "iam", "docs"):
        for path in (REPO / top).rglob("*"):
            if path.suffix not in (".py", ".yml", ".j2", ".md") or not path.is_file():
                continue
            for m in re.finditer(r'RUNBOOK(?:\.md)?,? "([^"\n]+)"', path.read_text()):
                refs.append((path.relative_to(REPO), m.group(1)))
    assert len(refs) >= 8, refs
    missing = [(str(p), name) for p, name in refs if not any(h.startswith(name) for h in headings)]
    assert missing == []


@pytest.mark.parametrize(
    ("target", "answers"), [("0.3.13", "0.3.13"), ("0.3.13+0a1b2c3d4e5f", "0.3.13")]
)
def test_a_rollback_waits_for_the_version_its_release_answers(target, answers):
    """A rebuild of a live version is installed as releases/<version>+<key>, and answers
    /healthz with <version>: a rollback to it waited 90 s for "<version>+<key>" and reported a
    failed rollback while it served."""
    tasks = _load(ROLES / "webstats_release" / "tasks" / "rollback.yml")
    wait = next(t for t in tasks if t.get("ansible.builtin.include_tasks") == "health.yml")
    expr = wait["vars"]["__webstats_release_health_version"]
    env = ansible_render.environment()
    assert env.from_string(expr).render(__webstats_release_target=target) == answers


def test_the_web_reads_role_is_the_one_the_release_grants():
    """db-bootstrap.yml makes <database>_web_reads and puts the web's login in it; the release's
    `db upgrade` grants that role what the web reads: one name on both sides, and the web's
    login gets no table of its own from the bootstrap (nor by default privileges)."""
    from bioc_webstats.store import grants

    role_vars = yaml.safe_load((REPO / "roles/webstats_db/vars/main.yml").read_text())
    expected = "{{ webstats_db_name }}" + grants.WEB_READS_SUFFIX
    assert role_vars["__webstats_db_web_reads"] == expected
    for grant in role_vars["__webstats_db_grants"] + role_vars["__webstats_db_default_grants"]:
        if grant["role"] == "{{ webstats_db_web_user }}":
            assert grant.get("type") in ("database", "schema"), grant
    reads = [g for g in role_vars["__webstats_db_default_grants"]
             if g["role"] == "{{ __webstats_db_web_reads }}"]  # fmt: skip
    assert reads == [{"role": "{{ __webstats_db_web_reads }}", "objs": "TABLES", "privs": "SELECT"}]


def test_the_revision_the_bootstrap_leaves_read_only_is_the_one_the_release_guards():
    """db-bootstrap.yml grants the ETL only SELECT on the schema's revision, and every `db
    upgrade` takes back more: one table name on both sides (another would be written by the ETL
    after each bootstrap and taken back at each deploy), and none written into the role's SQL."""
    from bioc_webstats.store import grants

    role_vars = yaml.safe_load((REPO / "roles/webstats_db/vars/main.yml").read_text())
    assert role_vars["__webstats_db_revision_table"] == grants.REVISION_TABLE
    assert "'objs': __webstats_db_revision_table, 'privs': 'SELECT'" in role_vars[
        "__webstats_db_table_grants"]  # fmt: skip
    tasks = yaml.safe_load((REPO / "roles/webstats_db/tasks/main.yml").read_text())
    (read,) = [t for t in _tasks(tasks) if t.get("name", "").startswith("Read the tables that")]
    query = read["community.postgresql.postgresql_query"]
    assert query["named_args"] == {"revision": "{{ __webstats_db_revision_table }}"}
    assert grants.REVISION_TABLE not in query["query"]
    role = REPO / "roles/webstats_db"
    named = {str(p.relative_to(role)): p.read_text().count(grants.REVISION_TABLE)
             for p in role.rglob("*.yml")}  # fmt: skip
    assert {path: n for path, n in named.items() if n} == {"vars/main.yml": 1}


def _tasks(items):
    """Every task of a task list, the tasks of its blocks included."""
    for task in items or []:
        yield task
        for key in ("block", "rescue", "always"):
            yield from _tasks(task.get(key))


def test_root_follows_no_link_the_service_user_may_put():
    """The state directory is the service user's: a link it put there would lead a root task
    anywhere on the host (the file and acl modules follow links by default; an audit gave the
    service user /etc/systemd/system through alerts/). A task on a path there follows none (a
    link fails the deploy) or runs as the service user; the restore's work files are root's,
    beside the backups. The publish directory, whose owner and ACL root sets, is not in it
    (its parent is root's: a link swapped in between the module's check and its chown would
    still be followed), and root's tasks on it follow no link either."""
    inside = re.compile(r"\{\{ (webstats_base_state_dir|webstats_base_publish_dir|"
                        r"webstats_nginx_publish_dir) \}\}")  # fmt: skip
    files = [*REPO.glob("roles/*/tasks/*.yml"), *REPO.glob("playbooks/*.yml")]
    checked = []
    for path in files:
        doc = yaml.safe_load(path.read_text()) or []
        plays = [p for p in doc if "hosts" in p] if path.parent.name == "playbooks" else []
        lists = [p.get(k) for p in plays for k in ("pre_tasks", "tasks")] if plays else [doc]
        for task in (t for items in lists for t in _tasks(items)):
            for module in ("ansible.builtin.file", "ansible.posix.acl", "ansible.builtin.copy",
                           "ansible.builtin.template"):  # fmt: skip
                args = task.get(module)
                target = str((args or {}).get("path") or (args or {}).get("dest") or "")
                if not inside.search(target) or target == "{{ webstats_base_state_dir }}":
                    continue
                checked.append((path.name, task["name"]))
                follows = args.get(
                    "follow", module in ("ansible.builtin.file", "ansible.posix.acl")
                )
                assert not follows or task.get("become_user"), (path.name, task["name"])
    assert ("main.yml", "Create the alarms' state directory") in checked
    assert ("publish_dir.yml", "Create the publish directory (readable by nginx)") in checked
    base = yaml.safe_load((REPO / "roles/webstats_base/defaults/main.yml").read_text())
    state, publish = base["webstats_base_state_dir"], base["webstats_base_publish_dir"]
    assert publish.startswith("/var/lib/") and publish.count("/") == 3  # /var/lib is root's
    assert not (publish + "/").startswith(state + "/")
    restore = yaml.safe_load((REPO / "playbooks/restore.yml").read_text())[0]["vars"]
    for name in ("__webstats_restore_work", "__webstats_restore_stopped_file"):
        assert "state_dir" not in restore[name] and "backup_dir" in restore[name], name


def test_the_owners_login_reaches_its_commands_on_stdin_only():
    """The commands that need the schema owner (db upgrade, backup, restore) get its login from
    the controller on standard input, with no_log (the task's arguments hold it): never on a
    command line, in an environment or a file on the host; the instance role may not read it."""
    files = [REPO / "roles/webstats_release/tasks/main.yml", REPO / "playbooks/backup.yml",
             REPO / "playbooks/restore.yml"]  # fmt: skip
    found = 0
    for path in files:
        doc = yaml.safe_load(path.read_text())
        plays = doc if path.parent.name == "tasks" else [t for p in doc for t in p["tasks"]]
        for task in _tasks(plays):
            cmd = task.get("ansible.builtin.command") or {}
            argv = str(cmd.get("argv", ""))
            if not re.search(r"'db', '(upgrade|backup)'|db, upgrade|db restore", argv):
                continue
            found += 1
            assert "--owner-secret-stdin" in argv, (path.name, task["name"])
            assert cmd.get("stdin") == "{{ webstats_release_owner_secret or omit }}", task["name"]
            assert task.get("no_log") is True, task["name"]  # templated, it reads the secret
            assert "owner_secret" not in str(task.get("environment", "")), task["name"]
    assert found == 4, found
    wiring = _load(WIRING)["webstats_release_owner_secret"]
    assert "webstats_db_owner_user" in wiring and "webstats_db_owner_password" in wiring
