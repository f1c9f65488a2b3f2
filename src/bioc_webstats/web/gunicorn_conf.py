"""gunicorn settings, used as
``gunicorn -c python:bioc_webstats.web.gunicorn_conf 'bioc_webstats:create_app()'``.

- nginx is the front (slow clients, limits, published files); gunicorn answers what nginx
  passes on, with a stock worker class (``gthread``).
- Listens where ``gunicorn/bind_port`` says (``host:port`` or ``unix:/path``), unless systemd
  passes the socket (``LISTEN_FDS`` from the ``.socket`` unit): gunicorn then uses the
  inherited descriptors natively.
- ``Type=notify``: gunicorn's arbiter sends ``READY=1`` to ``$NOTIFY_SOCKET`` itself once it
  listens (gunicorn.systemd.sd_notify), so no hook is needed here.
- Logs to ``gunicorn/access_log`` and ``gunicorn/error_log`` (``-`` = stdout/stderr);
  SIGUSR1 makes gunicorn reopen both files (logrotate's postrotate sends it). The app's own
  warnings (the ``bioc_webstats`` loggers) go to the same error log.
- Workers: ``gunicorn/workers`` (default 2 x CPUs + 1) with ``gunicorn/threads`` threads
  each; like every parameter they come from the env file, SSM or the environment
  (``WEBSTATS_GUNICORN_WORKERS`` …) and ``bioc-webstats config show`` lists them.
"""

from __future__ import annotations

import logging
import os
import sys

from bioc_webstats.config import load_settings
from bioc_webstats.errors import ConfigError

try:
    _settings = load_settings(login="web")
    loglevel = _settings.get_level("flask/log_level").lower()
    workers = (
        _settings.get_int("gunicorn/workers")
        if _settings.get("gunicorn/workers")
        else 2 * (os.cpu_count() or 1) + 1
    )
    threads = _settings.get_int("gunicorn/threads")
except ConfigError as exc:  # one clear line, no traceback, non-zero exit (the unit fails)
    sys.stderr.write(f"bioc-webstats: {exc}\n")
    raise SystemExit(1) from None

bind = [_settings.get("gunicorn/bind_port") or "0.0.0.0:8000"]
accesslog = _settings.get("gunicorn/access_log") or "-"
errorlog = _settings.get("gunicorn/error_log") or "-"


class _ToGunicornErrorLog(logging.Handler):
    """Hands the app's records to gunicorn's error log, to whatever handlers it holds at the
    time: the file it reopens on SIGUSR1, the ones a reload replaces."""

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger("gunicorn.error").handle(record)


# Every warning of the app (its request handlers, web/site.py, the store) goes to error.log,
# in gunicorn's format, once: Flask adds its own handler (to the request's wsgi.errors, or
# stderr outside a request: the journal) only when the logger has none, and this is one.
_app_log = logging.getLogger("bioc_webstats")
_app_log.addHandler(_ToGunicornErrorLog())
_app_log.setLevel(loglevel.upper())
_app_log.propagate = False

worker_class = "gthread"
keepalive = 5  # behind nginx: its upstream connections
timeout = 120  # the first request of a new data version may build the half-million-line file
graceful_timeout = 30  # a restart lets running requests finish (the socket unit queues new ones)
max_requests = 100_000  # recycle workers now and then; the jitter keeps them from going at once
max_requests_jitter = 10_000
preload_app = True  # configuration (the web's env file) is read once, in the arbiter
proc_name = "bioc-webstats"
if os.path.isdir("/dev/shm"):  # noqa: S108 - gunicorn's heartbeat files, kept off the disk
    worker_tmp_dir = "/dev/shm"  # noqa: S108
# No request header moves the app's paths: gunicorn would map SCRIPT_NAME and PATH_INFO headers
# from a loopback peer into the WSGI environ (its default forwarder_headers), so a client of a
# TCP bind could mount the site under any prefix or get a 500. nginx sets neither.
forwarder_headers = ""
# gunicorn's own parser limits, for a TCP bind without nginx (nginx passes the app only the
# few headers it reads, within nginx's own limits). The request line takes what nginx takes
# (large_client_header_buffers 8k): at 4094 a long query was 414 while a page was not built
# yet, and 200 once nginx sent it from disk.
limit_request_line = 8190
# gunicorn's control socket (25.1+) wanted $HOME/.gunicorn/ (the web user has no home, the
# unit a read-only system): an ERROR in error.log on every start. Nothing here uses it.
control_socket_disable = True
limit_request_fields = 100
limit_request_field_size = 8190
