"""``python -m bioc_webstats.etl._reader_boot``: a reader process of the legacy import
(``legacy_rows.serve``). A module of its own so that what the reader sends back is pickled
under ``legacy_rows``' names, not ``__main__``'s."""

from __future__ import annotations

from bioc_webstats.etl.legacy_rows import serve

if __name__ == "__main__":
    serve()
