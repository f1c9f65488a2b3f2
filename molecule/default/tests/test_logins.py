"""The database's three logins on the deployed host (molecule/default): playbooks/db-bootstrap.yml
made them on the local PostgreSQL (as on RDS), the deploy gave each process its own.

Runs after test_deploy.py (the owner migrated, the ETL wrote). Each check connects as a login
over TCP with its password, as the app does, and asserts what PostgreSQL allows it.
"""

from __future__ import annotations

import re
import shlex

import pytest
from testlib import ephemeral_dir, run_ok

DB = "webstats"


def password(host, name: str) -> str:
    """A login's password, as the local inventory generated it on the controller."""
    path = ephemeral_dir() / "secrets" / host.backend.name / name
    return path.read_text().split(" salt=")[0].strip()


def psql(host, user: str, pw: str, sql: str):
    """``sql`` as ``user`` over TCP (one transaction, stop at the first error)."""
    cmd = (
        f"PGPASSWORD={shlex.quote(pw)} psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -U {user} "
        f"-d {DB} -At -c {shlex.quote(sql)}"
    )
    return host.run(f"timeout 60 sh -c {shlex.quote(cmd)}")


@pytest.fixture(scope="module")
def logins(host, deploy_vars) -> dict[str, tuple[str, str]]:
    return {
        "owner": (deploy_vars["webstats_db_owner_user"], password(host, "db-owner-password")),
        "etl": (deploy_vars["webstats_db_etl_user"], password(host, "db-password")),
        "web": (deploy_vars["webstats_db_web_user"], password(host, "db-web-password")),
    }


def test_the_owner_owns_every_table(host, logins):
    owner, pw = logins["owner"]
    out = psql(
        host, owner, pw, "SELECT DISTINCT tableowner FROM pg_tables WHERE schemaname = 'public'"
    )
    assert out.rc == 0, out.stderr
    assert out.stdout.split() == [owner]
    tables = psql(host, owner, pw, "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
    assert int(tables.stdout) >= 7  # the migrations ran as the owner
    assert psql(host, owner, pw, "SELECT version_num FROM alembic_version").stdout.strip()


def test_the_web_login_reads_and_cannot_write(host, logins):
    user, pw = logins["web"]
    assert int(psql(host, user, pw, "SELECT count(*) FROM packages").stdout) > 3000
    # what the site shows, through <database>_web_reads; not the clients' hashes, the ledger
    member = psql(host, user, pw, f"SELECT pg_has_role('{DB}_web_reads', 'MEMBER')")
    assert member.stdout.strip() == "t", member.stderr
    for table in ("download_records", "ingested_objects", "stats_seen", "record_months"):
        res = psql(host, user, pw, f"SELECT count(*) FROM {table}")
        assert res.rc != 0 and "permission denied" in res.stderr, (table, res.stderr)
    for sql in (
        "INSERT INTO meta (key, value) VALUES ('molecule', 'x')",
        "UPDATE packages SET last_release = NULL",
        "DELETE FROM download_records",
    ):
        res = psql(host, user, pw, sql)
        assert res.rc != 0, f"the web login could: {sql}"
        assert "permission denied" in res.stderr, res.stderr


def test_the_etl_login_writes_rows_and_cannot_change_the_schema(host, logins):
    user, pw = logins["etl"]
    wrote = psql(
        host, user, pw,
        "BEGIN; INSERT INTO meta (key, value) VALUES ('molecule', 'x'); "
        "DELETE FROM meta WHERE key = 'molecule'; CREATE TEMP TABLE t (x int); ROLLBACK",
    )  # fmt: skip
    assert wrote.rc == 0, wrote.stderr
    assert psql(host, user, pw, "SELECT version_num FROM alembic_version").stdout.strip()
    for sql in (
        "CREATE TABLE molecule_probe (x int)",
        "ALTER TABLE packages ADD COLUMN molecule_probe int",
        "DROP TABLE stats_pending",
        "CREATE INDEX molecule_probe ON packages (package)",
        # the schema's revision is the owner's migrations' to write (db upgrade leaves it SELECT)
        "UPDATE alembic_version SET version_num = 'molecule'",
        "TRUNCATE alembic_version",
    ):
        res = psql(host, user, pw, sql)
        assert res.rc != 0, f"the ETL login could: {sql}"
        assert "permission denied" in res.stderr or "must be owner" in res.stderr, res.stderr


def test_only_the_etl_login_may_analyze_through_the_owner(host, logins):
    """Before PostgreSQL 17 only a table's owner may ANALYZE it: the ETL calls the owner's
    webstats_analyze() (revision 0006), granted by the database's default privileges; the web
    login may not call it."""
    user, pw = logins["etl"]
    res = psql(host, user, pw, "SELECT webstats_analyze()")
    assert res.rc == 0 and "WARNING" not in res.stderr, res.stderr
    user, pw = logins["web"]
    res = psql(host, user, pw, "SELECT webstats_analyze()")
    assert res.rc != 0 and "permission denied for function" in res.stderr, res.stderr


def test_nobody_else_may_connect(host):
    """PUBLIC lost CONNECT: a login of the cluster that is none of the three is refused."""
    probe = "molecule_probe_login"
    create = f"CREATE ROLE {probe} LOGIN PASSWORD 'probe-pw-123'"
    run_ok(
        host,
        f"runuser -u postgres -- psql -X -q -c {shlex.quote(create)}",
    )
    try:
        res = psql(host, probe, "probe-pw-123", "SELECT 1")
        assert res.rc != 0 and "permission denied for database" in res.stderr, res.stderr
    finally:
        run_ok(host, f"runuser -u postgres -- psql -X -q -c 'DROP ROLE {probe}'")


def test_each_process_uses_its_login(host, service, logins):
    """gunicorn's connections are the web login's; the ETL's were the ETL login's (the
    statement log is not needed: pg_stat_activity shows the pooled sessions of the web)."""
    assert service.get("/packages/stats/bioc/bioc_stats.tab").status_code == 200
    assert service.healthz()["database"] is True
    out = run_ok(
        host,
        "runuser -u postgres -- psql -X -At -c "
        "\"SELECT DISTINCT usename FROM pg_stat_activity WHERE datname = 'webstats'\"",
    )
    users = set(out.split())
    assert logins["web"][0] in users, users
    assert logins["owner"][0] not in users, users  # the owner only migrates, then disconnects


@pytest.mark.replay
def test_db_bootstrap_with_an_administrator_that_is_no_superuser(host):
    """RDS's master login is no superuser (CREATEROLE, CREATEDB): it cannot read the stored
    passwords, nor name SUPERUSER in an ALTER ROLE. db-bootstrap.yml as that administrator, on a
    database of its own beside the scenario's: a second run changes nothing, a rotated password
    is set (the old one refused), and a table a login owns (a database from before the owner
    login) is given to the owner."""
    import json
    import os

    from testlib import run_playbook

    admin, admin_pw = "molecule_rds_master", "rds-master-pw-1234567"
    names = {"owner": "rds_owner", "etl": "rds_runner", "web": "rds_web"}
    pws = {
        "owner": "rds-owner-pw-12345678",
        "etl": "rds-runner-pw-1234567",
        "web": "rds-web-pw-123456789",
    }
    sql = f"CREATE ROLE {admin} LOGIN CREATEROLE CREATEDB PASSWORD '{admin_pw}'"
    run_ok(host, f"runuser -u postgres -- psql -X -q -c {shlex.quote(sql)}")
    inventory = os.path.dirname(os.environ["MOLECULE_INVENTORY_FILE"])
    extra = ephemeral_dir() / "rds-admin.json"

    def bootstrap(etl_pw: str):
        extra.write_text(json.dumps({
            "webstats_db_admin_host": "127.0.0.1", "webstats_db_admin_user": admin,
            "webstats_db_admin_password": admin_pw, "webstats_db_name": "webstats_rds",
            **{f"webstats_db_{k}_user": v for k, v in names.items()},
            **{f"webstats_db_{k}_password": v for k, v in {**pws, "etl": etl_pw}.items()},
        }))  # fmt: skip
        res = run_playbook(
            f"ansible-playbook playbooks/db-bootstrap.yml -i {inventory} -e @{extra}"
        )
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
        recap = re.search(r"webstats-default\s*:\s*ok=\d+\s+changed=(\d+)", res.stdout)
        assert recap, res.stdout[-2000:]
        return int(recap.group(1))

    def as_login(user: str, pw: str, query: str):
        cmd = (f"PGPASSWORD={shlex.quote(pw)} psql -X -q -h 127.0.0.1 -U {user} -d webstats_rds "
               f"-At -c {shlex.quote(query)}")  # fmt: skip
        return host.run(f"timeout 60 sh -c {shlex.quote(cmd)}")

    try:
        assert bootstrap(pws["etl"]) > 0
        assert bootstrap(pws["etl"]) == 0  # it failed here (NOSUPERUSER), or set every password
        for key in names:
            assert (
                as_login(names[key], pws[key], "SELECT current_user").stdout.strip() == names[key]
            )
        reads = "SELECT pg_has_role('webstats_rds_web_reads', 'MEMBER')"
        assert as_login(names["web"], pws["web"], reads).stdout.strip() == "t"
        rotated = "rds-runner-rotated-98765"
        # the password set, and the deployed web's file written again (the play's handler)
        assert bootstrap(rotated) == 2
        assert as_login(names["etl"], rotated, "SELECT 1").rc == 0
        refused = as_login(names["etl"], pws["etl"], "SELECT 1")
        assert refused.rc != 0 and "password authentication failed" in refused.stderr
        owned = "CREATE TABLE legacy_probe (x int); ALTER TABLE legacy_probe OWNER TO rds_runner"
        run_ok(host, f"runuser -u postgres -- psql -X -q -d webstats_rds -c {shlex.quote(owned)}")
        assert bootstrap(rotated) > 0
        query = "SELECT tableowner FROM pg_tables WHERE tablename = 'legacy_probe'"
        owner = as_login(names["owner"], pws["owner"], query)
        assert owner.stdout.strip() == names["owner"], owner.stderr
    finally:
        drop = ["DROP DATABASE IF EXISTS webstats_rds WITH (FORCE)"] + [
            f"DROP ROLE IF EXISTS {r}" for r in ("webstats_rds_web_reads", *names.values(), admin)
        ]
        for statement in drop:
            host.run(f"runuser -u postgres -- psql -X -q -c {shlex.quote(statement)}")
