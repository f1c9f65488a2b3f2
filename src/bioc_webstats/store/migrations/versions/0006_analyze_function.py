"""webstats_analyze(): ANALYZE of the counting's tables for a login that does not own them

Revision ID: 0006
Revises: 0005

Before PostgreSQL 17 (no MAINTAIN privilege) only a table's owner may ANALYZE it; for anyone
else PostgreSQL prints a warning and does nothing. The ETL's login has DML rights only, so a
rebuild, a history import or a recount planned joins over records without statistics (a nested
loop over a year of records). This function runs the ANALYZE as its owner, the schema owner who
runs the migrations: fixed tables, no arguments, a fixed search_path. Who may call it: the
owner, and whom the database's default privileges grant EXECUTE on the owner's functions (the
ETL's login: roles/webstats_db); not PUBLIC.

On SQLite: nothing (it has no logins). Compatible with the release before it (which never calls
it): no schema floor.
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(
        """
        CREATE FUNCTION webstats_analyze() RETURNS void
        LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public
        AS $$ BEGIN ANALYZE public.download_records, public.packages, public.stats_seen; END $$
        """
    )
    op.execute("REVOKE ALL ON FUNCTION webstats_analyze() FROM PUBLIC")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS webstats_analyze()")
