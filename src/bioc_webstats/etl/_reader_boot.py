"""``python -m bioc_webstats.etl._reader_boot``: a reader process of the legacy import
(``legacy_rows.serve``). A module of its own so that what the reader sends back is pickled
under ``legacy_rows``' names, not ``__main__``'s."""

from __future__ import annotations

import signal

# ^C reaches the terminal's whole process group: the importing process says "aborted" and
# closes the pipes, which end this one (each reader printed a traceback). Before any import.
signal.signal(signal.SIGINT, signal.SIG_IGN)

from bioc_webstats.etl.legacy_rows import serve  # noqa: E402

if __name__ == "__main__":
    serve()
