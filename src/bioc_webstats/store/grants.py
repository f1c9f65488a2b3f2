"""Who may do what in the schema, beyond the grants playbooks/db-bootstrap.yml gives: set by the
schema's owner at every ``db upgrade`` (a restore runs one), checked by ``check``.

- The web reads what its pages and files show, through ``<database>_web_reads`` (a role of no
  login that the web's login is in): WEB_TABLES and no other relation; its members hold no
  grant of their own.
- The schema's revision (``alembic_version``) is written by the owner's migrations only: the
  ETL's login, which may write every table the owner creates (default privileges), may read it.

PostgreSQL only: SQLite has one file and no logins.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Connection, Engine, text

from ..errors import WebstatsError

# The schema's revision (Alembic's table); roles/webstats_db names it too.
REVISION_TABLE = "alembic_version"
_REVISION = {"revision": f"public.{REVISION_TABLE}"}
# What the web reads: the tables its pages and files show, the data version, the schema's
# revision. Not the download records (the clients' hashes), the ledger, the counting's tables.
WEB_TABLES = ("packages", "package_stats", "category_stats", "meta", REVISION_TABLE)
# The role of no login that holds the web's reads, one a database: <database>_web_reads.
# playbooks/db-bootstrap.yml (webstats_db) makes it, puts the web's login in it, and gives it
# SELECT on every table the owner creates (default privileges: a table made by a release that
# knows nothing of this, a restore by one, stays readable to the web). The owner, who alone
# may grant and revoke on its tables, then grants it WEB_TABLES and takes back every other
# relation of the schema it holds.
WEB_READS_SUFFIX = "_web_reads"
# The relations a grant can be on: tables, partitioned tables, views, materialized views,
# foreign tables.
_RELKINDS = ["r", "p", "v", "m", "f"]
_WEB_READS = "SELECT rolname FROM pg_roles WHERE rolname = current_database() || :suffix"
# The members' own grants on the schema's relations, now or by default: those of the schema's
# owner (the owner of alembic_version), which the owner may take back; the owner excepted.
_OWN_GRANTS = (
    "WITH o AS (SELECT relowner AS oid FROM pg_class "
    "  WHERE oid = CAST(:revision AS regclass)) "
    "SELECT DISTINCT u.rolname FROM pg_auth_members m JOIN pg_roles u ON u.oid = m.member, o "
    "WHERE m.roleid = (SELECT oid FROM pg_roles WHERE rolname = :role) AND u.oid <> o.oid "
    "AND (EXISTS ("
    "  SELECT 1 FROM pg_class c, aclexplode(c.relacl) a WHERE a.grantee = u.oid"
    "  AND a.grantor = o.oid AND c.relnamespace = 'public'::regnamespace"
    "  AND c.relkind::text = ANY(:kinds)"
    ") OR EXISTS ("
    "  SELECT 1 FROM pg_default_acl d, aclexplode(d.defaclacl) a WHERE a.grantee = u.oid"
    "  AND d.defaclrole = o.oid AND d.defaclobjtype = 'r'"
    "  AND d.defaclnamespace IN (0, 'public'::regnamespace))) ORDER BY 1"
)
# The relations of the schema other than WEB_TABLES that a role holds a grant on from their
# owner: what its default privilege gave it, whatever release made them (a newer one's table,
# restored by an older release, is not the web's unless this release says so).
_NOT_THE_WEBS = (
    "SELECT DISTINCT c.relname FROM pg_class c, aclexplode(c.relacl) a "
    "WHERE c.relnamespace = 'public'::regnamespace "
    "AND c.relkind::text = ANY(:kinds) AND a.grantor = c.relowner "
    "AND a.grantee = (SELECT oid FROM pg_roles WHERE rolname = :role) "
    "AND NOT c.relname = ANY(:web) ORDER BY 1"
)
# The roles other than its owner that hold more than SELECT on the schema's revision from the
# owner (who may take it back): the ETL's login, through the default privileges every table gets.
_REVISION_WRITERS = (
    "SELECT DISTINCT r.rolname FROM pg_class c CROSS JOIN LATERAL aclexplode(c.relacl) a "
    "JOIN pg_roles r ON r.oid = a.grantee "
    "WHERE c.oid = CAST(:revision AS regclass) AND a.grantee <> c.relowner "
    "AND a.grantor = c.relowner AND a.privilege_type <> 'SELECT' ORDER BY 1"
)
# Whether this login may act as the tables' owner (it is, or is in, that role), and its name.
_OWNER = (
    "SELECT pg_has_role(current_user, c.relowner, 'USAGE') AS may, "
    "pg_get_userbyid(c.relowner) AS owner, current_user AS login "
    "FROM pg_class c WHERE c.oid = CAST(:revision AS regclass)"
)
# A login that reads the download records and may not write them: a web login set up before
# 0.3.24 (SELECT on every table), on a database without <database>_web_reads.
_READ_ONLY_LOGINS = (
    "SELECT 1 FROM pg_roles r WHERE r.rolcanlogin AND NOT r.rolsuper "
    "AND to_regclass('public.download_records') IS NOT NULL "
    "AND has_table_privilege(r.oid, 'public.download_records', 'SELECT') "
    "AND NOT has_table_privilege(r.oid, 'public.download_records', 'INSERT')"
)


@dataclass(frozen=True)
class _State:
    """What is not as this release sets it."""

    web_reads: str | None  # the role, None when the database has none
    missing: list[str]  # WEB_TABLES it may not read
    extra: list[str]  # other relations it holds a grant on
    own: list[str]  # its members that hold grants of their own
    revision_writers: list[str]  # roles but the owner that may write alembic_version

    @property
    def settled(self) -> bool:
        """Nothing for ``apply`` to change."""
        reads_ok = not (self.missing or self.extra or self.own)
        return not self.revision_writers and reads_ok


def _state(conn: Connection) -> _State:
    role = conn.execute(text(_WEB_READS), {"suffix": WEB_READS_SUFFIX}).scalar()
    writers = list(conn.execute(text(_REVISION_WRITERS), _REVISION).scalars())
    if role is None:
        return _State(None, [], [], [], writers)
    missing = [
        t
        for t in WEB_TABLES
        if not conn.execute(
            text("SELECT has_table_privilege(:role, :table, 'SELECT')"),
            {"role": role, "table": f"public.{t}"},
        ).scalar()
    ]
    args = {"role": role, "kinds": _RELKINDS, "web": list(WEB_TABLES), **_REVISION}
    own = list(conn.execute(text(_OWN_GRANTS), args).scalars())
    extra = list(conn.execute(text(_NOT_THE_WEBS), args).scalars())
    return _State(role, missing, extra, own, writers)


def pending(engine: Engine) -> tuple[str, bool] | None:
    """What is not as ``db upgrade`` sets it, as a line and whether ``db upgrade`` fixes it;
    None when nothing is. A database without <database>_web_reads (bootstrapped before 0.3.24)
    needs playbooks/db-bootstrap.yml first."""
    if engine.dialect.name != "postgresql":
        return None
    with engine.connect() as conn:
        state = _state(conn)
        one_login = conn.execute(text(_READ_ONLY_LOGINS)).first() is None
    what = []
    if state.revision_writers:
        who = ", ".join(state.revision_writers)
        what.append(f"{who} may write {REVISION_TABLE}, which only the owner's migrations write")
    role = state.web_reads
    if role is not None:
        what += [f"{role} may not read {', '.join(state.missing)}"] if state.missing else []
        what += [f"{role} may read {', '.join(state.extra)}"] if state.extra else []
        if state.own:
            what.append(f"{', '.join(state.own)} holds grants of its own on the tables")
    if what:
        return "; ".join(what) + " (bioc-webstats db upgrade sets the logins' rights)", True
    if role is None and not one_login:  # one login for everything (a laptop): nothing to narrow
        return (
            "the database has no role <database>_web_reads: the web's login may read every "
            "table (run playbooks/db-bootstrap.yml; the next deploy narrows it)",
            False,
        )
    return None


def apply(engine: Engine) -> None:
    """As the schema's owner: ``<database>_web_reads`` may read WEB_TABLES and no other
    relation of the schema, and its members (the web's login) hold no grant of their own on
    the schema's tables, now or by the owner's default privileges (a database set up before
    0.3.24 gave the web's login SELECT on every table); no role but the owner may do more than
    read alembic_version. Nothing on SQLite."""
    if engine.dialect.name != "postgresql":
        return
    with engine.begin() as conn:
        state = _state(conn)
        if state.settled:
            return
        owner = conn.execute(text(_OWNER), _REVISION).one()
        if not owner.may:  # PostgreSQL would only warn, and change nothing
            raise WebstatsError(
                f"db upgrade: the login {owner.login} is not the tables' owner {owner.owner}: "
                "it cannot set the logins' rights (give the owner's login: the deploy does)"
            )
        quote = conn.dialect.identifier_preparer.quote_identifier
        for writer in state.revision_writers:  # SELECT stays: `check` reads the revision
            conn.execute(text(f"REVOKE ALL ON {REVISION_TABLE} FROM {quote(writer)}"))
            conn.execute(text(f"GRANT SELECT ON {REVISION_TABLE} TO {quote(writer)}"))
        if state.web_reads is None:
            return
        role = quote(state.web_reads)
        conn.execute(text(f"GRANT SELECT ON {', '.join(WEB_TABLES)} TO {role}"))
        if state.extra:
            tables = ", ".join(f"public.{quote(name)}" for name in state.extra)
            conn.execute(text(f"REVOKE ALL ON {tables} FROM {role}"))
        for member in state.own:
            conn.execute(text(f"REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {quote(member)}"))
            for where in ("IN SCHEMA public ", ""):  # the schema's default, and the global one
                revoke = f"REVOKE ALL ON TABLES FROM {quote(member)}"
                conn.execute(text(f"ALTER DEFAULT PRIVILEGES {where}{revoke}"))
