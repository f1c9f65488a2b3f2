"""The shipped gunicorn worker: uvicorn (uvloop + httptools) in front of the Flask app.

gunicorn still runs the show (the systemd socket, ``READY=1``, graceful restarts, worker
recycling, log files and SIGUSR1); only the worker's HTTP server is asyncio. The ASGI front
answers what is already in the disk cache (200 with the file, or 304) without leaving the
event loop — the common case, and most of the traffic of a CDN revalidating — and hands
everything else to the Flask app in a small thread pool (``a2wsgi``), so a slow build or a
database query never blocks the other connections of the worker.

``gunicorn 'bioc_webstats:create_app()'`` still returns the Flask (WSGI) app: this worker
wraps it; any other gunicorn worker serves it as it is.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import socket
import sys
import time
from typing import Any, BinaryIO

from a2wsgi import WSGIMiddleware
from flask import Flask
from gunicorn.arbiter import Arbiter
from sqlalchemy.exc import SQLAlchemyError
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import Server
from uvicorn_worker import UvicornWorker

from .web import CachedFile, StatsSite, Target, fast_target, not_modified

CHUNK = 256 * 1024  # bytes per body message of a cached file (read from the page cache)
FIRST_REQUEST_WAIT = 3.0  # seconds a just-accepted connection gets to send its request on a stop
ACCEPT_PAUSE = 0.0002  # seconds a worker waits per open connection (+1) before it accepts again
MEMO_MAX = 4096  # cached files remembered per worker (their headers), per data version
SENDFILE = "bioc_webstats.sendfile"  # scope extension: zero-copy body of an open file
_UNSEEN = object()
_UNSAFE = re.compile(r'[\x00-\x1f\x7f-\x9f"\\]')


def _escape(text: str) -> str:
    """A request value as one safe log field (nginx-style ``\\xHH`` for controls, quotes)."""
    return _UNSAFE.sub(lambda m: f"\\x{ord(m.group()):02X}", text)


class AccessLog:
    """Access log lines in gunicorn's default (combined) format, buffered and written through
    gunicorn's own access-log handlers — so the configured file and the reopen on SIGUSR1
    apply — at most 64 KiB or one second after the request (like nginx's ``buffer=``/
    ``flush=``): one write per batch, not one per request."""

    def __init__(self, logger: logging.Logger | None) -> None:
        self.handlers = [
            h for h in (logger.handlers if logger else []) if isinstance(h, logging.StreamHandler)
        ]
        self.lines: list[str] = []
        self.size = 0
        self._second = -1
        self._time = ""
        self._timer: asyncio.TimerHandle | None = None

    def add(self, scope: dict[str, Any], status: int, sent: int, referer: str, agent: str) -> None:
        """Queue one line (no-op when gunicorn logs no access)."""
        if not self.handlers:
            return
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._time = time.strftime("[%d/%b/%Y:%H:%M:%S %z]", time.localtime(now))
        client = scope.get("client")
        target = scope.get("raw_path") or scope["path"].encode()
        if scope.get("query_string"):
            target += b"?" + scope["query_string"]
        request = f"{scope['method']} {target.decode('latin-1')} HTTP/{scope['http_version']}"
        line = (
            f'{client[0] if client else "-"} - - {self._time} "{_escape(request)}" {status} '
            f'{sent} "{_escape(referer)}" "{_escape(agent)}"\n'
        )
        self.lines.append(line)
        self.size += len(line)
        if self.size >= 65536:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(1.0, self.flush)

    def flush(self) -> None:
        """Write what is queued."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.lines:
            return
        data = "".join(self.lines)
        self.lines.clear()
        self.size = 0
        for handler in self.handlers:
            handler.acquire()
            try:
                handler.stream.write(data)
                handler.stream.flush()
            except (OSError, ValueError):  # a full disk or a closed file must not stop serving
                pass
            finally:
                handler.release()


class StatsFront:
    """ASGI app: cached pages and files natively, the rest through the Flask app."""

    def __init__(self, app: Flask, threads: int = 4, access: AccessLog | None = None) -> None:
        self.site: StatsSite = app.extensions["webstats"]
        self.flask = WSGIMiddleware(app, workers=threads)  # type: ignore[arg-type]
        self.access = access or AccessLog(None)
        self._refresh: asyncio.Future | None = None
        # relpath -> (cached file, its headers as bytes) for the meta in _memo_meta
        self._memo: dict[str, tuple[CachedFile, list, list]] = {}
        self._memo_meta: object = None
        self._targets: dict[str, Target | None] = {}  # request path -> fast_target()

    async def __call__(self, scope: dict[str, Any], receive, send) -> None:
        if scope["type"] != "http":
            await self.flask(scope, receive, send)
            return
        inm = ims = None
        referer = agent = "-"
        for name, value in scope["headers"]:
            if name == b"if-none-match":
                text = value.decode("latin-1")
                inm = text if inm is None else f"{inm}, {text}"
            elif name == b"if-modified-since":
                ims = value.decode("latin-1")
            elif name == b"user-agent":
                agent = value.decode("latin-1")
            elif name == b"referer":
                referer = value.decode("latin-1")
        if scope["method"] in ("GET", "HEAD"):
            sent = await self._cached(scope, send, inm, ims)
            if sent is not None:
                self.access.add(scope, sent[0], sent[1], referer, agent)
                return
        status, size = 500, 0

        async def send_counted(message: dict[str, Any]) -> None:
            nonlocal status, size
            if message["type"] == "http.response.start":
                status = message["status"]
            elif scope["method"] != "HEAD":
                size += len(message.get("body", b""))
            await send(message)

        try:
            await self.flask(scope, receive, send_counted)
        finally:
            self.access.add(scope, status, size, referer, agent)

    def preload(self) -> None:
        """Read the data version and load the snapshot in the background now (a worker
        starting), so its first requests do not wait for them. A failure (the database is
        not reachable yet) is left to the first request."""
        self._refresh_task()

    def _refresh_task(self) -> asyncio.Future:
        """The data version and snapshot, read again from the database in a thread (once a
        second, or after a change). One read at a time per worker: the requests that need it
        meanwhile wait for the same one instead of each sending a query. A failed read is
        retried by the next request that needs one. (Awaited through ``asyncio.shield`` only
        by the requests that must wait: a shield per request would be cyclic garbage.)"""
        if self._refresh is None or self._refresh.done():
            self._refresh = asyncio.ensure_future(self._read())
            self._refresh.add_done_callback(_retrieved)
        return self._refresh

    async def _read(self):
        loop = asyncio.get_running_loop()
        meta = await loop.run_in_executor(None, self.site.fresh_meta)
        snap = await loop.run_in_executor(None, self.site.snapshot, *meta)
        return meta, snap

    async def _cached(
        self, scope: dict[str, Any], send, inm: str | None, ims: str | None
    ) -> tuple[int, int] | None:
        """Send the cached answer and return (status, bytes sent), or None (Flask answers)."""
        path = scope["path"]
        target = self._targets.get(path, _UNSEEN)
        if target is _UNSEEN:  # resolve() is pure: remember its answer (bounded)
            if len(self._targets) >= MEMO_MAX:
                self._targets.clear()
            target = self._targets[path] = fast_target(path)
        if target is None:
            return None
        site = self.site
        state = site.meta_state()
        meta = snap = None
        if state is not None:
            meta, expired = state
            snap = site.known_snapshot(*meta)
            if expired:  # nothing announced a change: answer now, check in the background
                self._refresh_task()
        if meta is None or snap is None:
            try:
                meta, snap = await asyncio.shield(self._refresh_task())
            except SQLAlchemyError:
                return None  # Flask answers 503
        if meta != self._memo_meta or len(self._memo) > MEMO_MAX:
            self._memo = {}
            self._memo_meta = meta
        memo = self._memo.get(target.relpath)
        if memo is None:
            cf = site.cached_file(target, meta, snap)
            if cf is None:
                return None
            memo = (cf, _as_bytes(cf.headers_304), _as_bytes(cf.headers_200))
            self._memo[target.relpath] = memo
        cf, headers_304, headers_200 = memo
        if inm == cf.etag or (
            (inm is not None or ims is not None)
            and not_modified(inm, ims, cf.etag, cf.last_modified)
        ):
            await send({"type": "http.response.start", "status": 304, "headers": headers_304})
            await send({"type": "http.response.body", "body": b""})
            return 304, 0
        try:
            f = open(cf.path, "rb")
        except OSError:
            self._memo.pop(target.relpath, None)
            return None  # removed meanwhile: Flask rebuilds it
        with f:
            await send({"type": "http.response.start", "status": 200, "headers": headers_200})
            if scope["method"] == "HEAD":
                await send({"type": "http.response.body", "body": b""})
                return 200, 0
            sendfile = scope.get("extensions", {}).get(SENDFILE)
            if sendfile is not None:  # our Protocol: zero copy
                sent = await sendfile(f, cf.size)
            else:  # any other ASGI server: plain body messages
                sent = 0
                while chunk := f.read(CHUNK):
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    sent += len(chunk)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return 200, sent


def _retrieved(future: asyncio.Future) -> None:
    """Mark a background read's failure as seen (the requests that awaited it got it too)."""
    if not future.cancelled():
        future.exception()


def _as_bytes(headers: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]


class Protocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, except on a graceful stop: a connection accepted but
    whose first request has not arrived yet (its client just connected) gets that request
    answered, then closed, instead of being closed unanswered — or closed after
    ``FIRST_REQUEST_WAIT`` seconds if nothing comes. Idle keep-alive connections are closed at
    once as before (their clients retry)."""

    _draining = False

    def shutdown(self) -> None:
        """Begin a graceful stop of this connection."""
        if self.cycle is None and not self.transport.is_closing():
            self._draining = True
            asyncio.get_running_loop().call_later(FIRST_REQUEST_WAIT, self._no_request)
            return
        super().shutdown()

    def _no_request(self) -> None:
        if self.cycle is None:
            self.transport.close()

    def on_headers_complete(self) -> None:
        """A request has arrived: while stopping, it is the connection's last. Its scope
        offers the zero-copy body of :meth:`_sendfile` (``extensions[SENDFILE]``)."""
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None:
            if self._draining:
                cycle.keep_alive = False
            extensions = self.scope.setdefault("extensions", {})
            extensions[SENDFILE] = functools.partial(self._sendfile, cycle)

    async def _sendfile(self, cycle, f: BinaryIO, count: int) -> int:
        """Send the first ``count`` bytes of the open file ``f`` as the body of ``cycle``'s
        response (its ``http.response.start`` already sent): with ``os.sendfile`` (no copy
        through Python) while the socket takes them, through the transport — one chunk, then
        wait until it is out — while it is full. Returns the bytes sent; the caller ends the
        body with an empty ``http.response.body``. Stops early if the client went away."""
        transport = self.transport
        fd, infd = transport.get_extra_info("socket").fileno(), f.fileno()
        transport.set_write_buffer_limits(high=CHUNK // 2, low=0)  # resume only when empty
        offset = 0
        try:
            while offset < count and not cycle.disconnected:
                if transport.get_write_buffer_size() == 0:
                    try:
                        sent = os.sendfile(fd, infd, offset, count - offset)
                    except BlockingIOError:
                        sent = 0
                    except OSError:  # reset by the peer: connection_lost follows
                        cycle.disconnected = True
                        break
                    if sent:
                        offset += sent
                        continue
                chunk = os.pread(infd, min(CHUNK, count - offset), offset)
                if not chunk:
                    break  # the file is shorter than announced: uvicorn closes the connection
                transport.write(chunk)
                offset += len(chunk)
                if offset < count:  # the last piece needs no wait: uvicorn finishes it
                    await self.flow.drain()
        finally:
            transport.set_write_buffer_limits()
        cycle.expected_content_length -= offset  # what uvicorn checks against Content-Length
        return offset


class BalancedAcceptor:
    """Accepts the connections of one listening socket shared by all workers, one at a time,
    then waits ``ACCEPT_PAUSE`` x (1 + its open connections) before accepting again, so the next
    ones go to less busy workers (a worker that accepted a whole burst would serve it alone
    while the others idle). Stands in for the ``asyncio.Server`` uvicorn makes (``close``,
    ``wait_closed``)."""

    def __init__(self, sock: socket.socket, factory, connections: set) -> None:
        self.loop = asyncio.get_running_loop()
        self.sock = sock
        self.factory = factory
        self.connections = connections
        self._resume: asyncio.TimerHandle | None = None
        self._closed = False
        sock.setblocking(False)
        self.loop.add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return  # another worker was faster
        except OSError as exc:  # out of descriptors, aborted: try again shortly
            logging.getLogger("uvicorn.error").warning("accept failed: %s", exc)
            self._pause(0.1)
            return
        if conn.family in (socket.AF_INET, socket.AF_INET6):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.loop.create_task(self._connect(conn))
        self._pause(ACCEPT_PAUSE * (1 + len(self.connections)))

    async def _connect(self, conn: socket.socket) -> None:
        try:
            await self.loop.connect_accepted_socket(self.factory, conn)
        except OSError:
            conn.close()  # the client went away already

    def _pause(self, seconds: float) -> None:
        self.loop.remove_reader(self.sock.fileno())
        self._resume = self.loop.call_later(seconds, self._listen)

    def _listen(self) -> None:
        self._resume = None
        if not self._closed:
            self.loop.add_reader(self.sock.fileno(), self._accept)

    def close(self) -> None:
        """Stop accepting (the socket stays open: it belongs to gunicorn / systemd)."""
        self._closed = True
        if self._resume is not None:
            self._resume.cancel()
        self.loop.remove_reader(self.sock.fileno())

    async def wait_closed(self) -> None:
        """Nothing to wait for: the connections are tracked by the server."""


class BalancedServer(Server):
    """uvicorn's server, accepting through :class:`BalancedAcceptor` on gunicorn's sockets."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """Start as uvicorn does, but with balanced accepting on the given sockets."""
        await super().startup(sockets=[])  # lifespan, state; no listener of uvicorn's own
        config = self.config

        def factory() -> asyncio.Protocol:
            return config.http_protocol_class(  # type: ignore[call-arg]
                config=config, server_state=self.server_state, app_state=self.lifespan.state
            )

        self.servers = [  # type: ignore[list-item]
            BalancedAcceptor(sock, factory, self.server_state.connections) for sock in sockets or []
        ]


class Worker(UvicornWorker):
    """gunicorn worker class (``bioc_webstats.asgi.Worker``): uvicorn serving
    :class:`StatsFront` around the app gunicorn loaded."""

    CONFIG_KWARGS: dict[str, Any] = {  # noqa: RUF012 - the base class's interface
        "loop": "uvloop",
        "http": Protocol,
        "lifespan": "off",
        "server_header": False,
        "proxy_headers": False,  # the address in the access log is the peer's
        "access_log": False,  # StatsFront writes it (AccessLog)
    }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Running requests get gunicorn's graceful timeout on a stop or restart.
        self.config.timeout_graceful_shutdown = self.cfg.graceful_timeout
        self.front: StatsFront | None = None

    def load_wsgi(self) -> None:
        """Wrap the loaded Flask app in the ASGI front."""
        super().load_wsgi()
        access = AccessLog(self.log.access_log if self.cfg.accesslog else None)
        self.front = StatsFront(self.wsgi, threads=self.cfg.threads, access=access)
        self.wsgi = self.front

    async def _serve(self) -> None:
        """uvicorn's worker loop, with :class:`BalancedServer`."""
        self.config.app = self.wsgi
        server = BalancedServer(config=self.config)
        self._install_sigquit_handler()
        if self.front is not None:
            self.front.preload()
        await server.serve(sockets=self.sockets)
        if not server.started:
            sys.exit(Arbiter.WORKER_BOOT_ERROR)

    def run(self) -> None:
        """Serve until told to stop, then write the access lines still queued."""
        try:
            super().run()
        finally:
            if self.front is not None:
                self.front.access.flush()
