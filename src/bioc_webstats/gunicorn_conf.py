"""gunicorn settings, used as
``gunicorn -c python:bioc_webstats.gunicorn_conf 'bioc_webstats:create_app()'``.

- Listens where ``gunicorn/bind_port`` says, unless systemd passes the socket (``LISTEN_FDS``
  from the ``.socket`` unit): gunicorn then uses the inherited descriptors natively.
- ``Type=notify``: gunicorn's arbiter sends ``READY=1`` to ``$NOTIFY_SOCKET`` itself once it
  listens (gunicorn.systemd.sd_notify), so no hook is needed here.
- Logs to ``gunicorn/access_log`` and ``gunicorn/error_log`` (``-`` = stdout/stderr); the
  environment overrides them like every parameter (``WEBSTATS_GUNICORN_ACCESS_LOG`` …).
  SIGUSR1 makes gunicorn reopen both files (logrotate's postrotate sends it).
- Workers: ``WEBSTATS_GUNICORN_WORKERS`` or 2 * CPUs + 1, of the class ``bioc_webstats.asgi.Worker``
  (uvicorn with uvloop and httptools: cached pages, files and 304s are answered on the event
  loop); ``WEBSTATS_GUNICORN_THREADS`` (default 4) is the size of each worker's thread pool for
  the Flask app (cache misses, redirects, 404s, /healthz).
"""

from __future__ import annotations

import gc
import os
import sys

from bioc_webstats.config import load_settings
from bioc_webstats.errors import ConfigError
from bioc_webstats.web import log_level


def _int_env(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        sys.stderr.write(f"bioc-webstats: {name} must be an integer, got {raw!r}\n")
        raise SystemExit(1) from None
    if value < 1:
        sys.stderr.write(f"bioc-webstats: {name} must be at least 1, got {value}\n")
        raise SystemExit(1)
    return value


try:
    _settings = load_settings()
    loglevel = log_level(_settings).lower()
except ConfigError as exc:  # one clear line, no traceback, non-zero exit (the unit fails)
    sys.stderr.write(f"bioc-webstats: {exc}\n")
    raise SystemExit(1) from None

bind = [_settings.get("gunicorn/bind_port") or "0.0.0.0:8000"]
accesslog = _settings.get("gunicorn/access_log") or "-"
errorlog = _settings.get("gunicorn/error_log") or "-"

workers = _int_env("WEBSTATS_GUNICORN_WORKERS", 2 * (os.cpu_count() or 1) + 1)
threads = _int_env("WEBSTATS_GUNICORN_THREADS", 4)
worker_class = "bioc_webstats.asgi.Worker"
keepalive = 5
timeout = 120  # the first request of a new data version may build the half-million-line file
graceful_timeout = 30  # a restart lets running requests finish (the socket unit queues new ones)
# Recycle workers now and then (days at real traffic; a worker answers ~10k cached requests/s,
# so a small limit would restart them every few seconds under load); the jitter keeps them from
# all going at once.
max_requests = 1_000_000
max_requests_jitter = 100000
preload_app = True  # configuration (SSM, secrets) is read once, in the arbiter
proc_name = "bioc-webstats"
if os.path.isdir("/dev/shm"):  # noqa: S108 - gunicorn's heartbeat files, kept off the disk
    worker_tmp_dir = "/dev/shm"  # noqa: S108
# Size limits of gunicorn's own parser (a stock worker class). The shipped worker parses with
# httptools: a URL up to its 80 KiB head cap gets a 404, a longer head a 400.
limit_request_line = 4094
limit_request_fields = 100


def pre_fork(_server, _worker) -> None:
    """Move everything loaded so far (the app, its modules) out of the garbage collector's
    reach: a full collection in a busy worker then scans only what the worker created, so it
    does not pause every connection of that worker (and forked pages stay shared)."""
    gc.freeze()
