"""The database: tables (Alembic is the one source of the schema), sessions, the facts in
``meta``, and the statistics recomputed from the download records."""
