"""The broker's web port: the teoproxy WebSocket gateway on ``/ws``, the web pages, ``/info``, ``/stats``.

One HTTP port (default 8094, the original web consumer's) served by the ``websockets``
library on the broker's own event loop::

    /ws                         WebSocket, teoproxy packets (teomq/web/session.py, docs/gateway.md)
    /teomq.js                   the ES-module browser client
    /examples/users_servers/    the users_servers web consumer
    /info                       JSON: the broker's address, scheme and commands
    /stats                      JSON: the broker's counters, the gateway's, per command

Only the web port's own pages may use it: a WebSocket handshake whose ``Origin`` is not one of
the port's origins (``http://127.0.0.1:PORT``, ``http://localhost:PORT``, ``http://[::1]:PORT``,
``http://HOST:PORT`` of its own host, and those given as ``origins``) gets 403, and so does an
HTTP request whose ``Host`` is not one of those hosts (a DNS-rebinding page names its own host).
A client that sends no ``Origin`` is no browser page and is let in. ``PORT`` is the port the
gateway listens on, never one read from the request. Pages of an origin given in ``origins`` get
``Access-Control-Allow-Origin`` on the HTTP answers (to import /teomq.js, read /info).

Pushes to many browsers cost one encode: a Stream push (id 0, cmd 0) depends only on the
message, and a server's WebSocket frame is unmasked, so the push's whole frame (base64 text
and frame header) is built once per message and the same bytes go to every socket (``PushCache``
in the core for the sessions with a Stream of its name, ``push_packet`` for the rest, once per
loop pass). Per-message deflate is off for the
same reason (it would compress once per socket).
"""

from __future__ import annotations

import asyncio
import http
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from teomq import __version__
from teomq._core.crc32c import crc32c
from teomq._core.inproc import InprocEndpoint, PushCache, release_held_many
from teomq.addressbook import DEFAULT_WEB_PORT
from teomq.web.session import WebSession, text_frame, tp

if TYPE_CHECKING:
    from teomq.broker import Broker

log = logging.getLogger("teomq.web")
#: The websockets library's own lines (a line per HTTP request and per closed socket) are debug detail.
ws_log = logging.getLogger("teomq.web.ws")
ws_log.setLevel(logging.WARNING)

STATIC = Path(__file__).with_name("static")
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".png": "image/png", ".json": "application/json"}
#: Acknowledgements of pushes fed to the core per loop pass (so pushes built per pass), all sessions together.
ACK_BUDGET = 2048
_HASHED = 4096  # messages up to this size key the push cache themselves; larger ones by CRC32C
_ROUTES = {"/": "/examples/users_servers/", "/examples/users_servers": "/examples/users_servers/"}
#: The hosts every web port answers to (with its own host and port); see ``WebGateway``.
OWN_HOSTS = ("127.0.0.1", "localhost", "::1")
ANY_ORIGIN = "*"
_DEFAULT_PORTS = {"http": 80, "https": 443}
_TEXT = "text/plain; charset=utf-8"


def _origin_key(text: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an origin ``scheme://host[:port]``, host lower case; None if it is not one."""
    try:
        u = urlsplit(text)
        port = u.port
    except ValueError:
        return None
    if (u.scheme not in _DEFAULT_PORTS or not u.hostname or u.username is not None or u.password is not None
            or u.path not in ("", "/") or u.query or u.fragment or "?" in text or "#" in text):
        return None
    return u.scheme, u.hostname, _DEFAULT_PORTS[u.scheme] if port is None else port


def _host_key(text: str) -> tuple[str, int | None] | None:
    """(host, port or None) of a ``Host`` header value, host lower case; None if it is not one."""
    try:
        u = urlsplit("http://" + text)
        port = u.port
    except ValueError:
        return None
    if not u.hostname or u.username is not None or u.path or u.query or u.fragment or "?" in text or "#" in text:
        return None
    return u.hostname, port


def parse_origin(text: str) -> str:
    """A ``-web-origin`` value: ``*``, or an origin ``http(s)://host[:port]`` (no path); ValueError if not."""
    text = text.strip()
    if text == ANY_ORIGIN or _origin_key(text) is not None:
        return text.rstrip("/")
    raise ValueError(f"bad web origin {text!r}: expected http://HOST[:PORT], https://HOST[:PORT] or *")


class WebGateway:
    """Serve the web port of a started :class:`~teomq.broker.Broker`.

    Args:
        broker: the broker (started: its dispatcher and address exist).
        host, port: where to listen; port 0 picks a free one (read ``port`` after ``start``).
        prefetch: credit of each browser consumer (messages pushed and not yet acknowledged).
        share_pushes: encode a Stream push once for every socket that gets it (default); False
            encodes it per socket (only for measuring what sharing saves).
        origins: origins (``http(s)://host[:port]``) allowed besides the port's own, whose hosts
            the HTTP endpoints then answer to too; ``"*"`` allows every origin and host (logged
            as a warning at start). ValueError if one is not an origin.
    """

    def __init__(self, broker: Broker, host: str = "127.0.0.1", port: int = DEFAULT_WEB_PORT, *,
                 prefetch: int = 64, share_pushes: bool = True, origins: Sequence[str] = ()) -> None:
        self.broker = broker
        self.host = host
        self.port = port
        self.origins = [parse_origin(o) for o in origins]
        self.any_origin = ANY_ORIGIN in self.origins
        self._extra_origins = {k for k in map(_origin_key, self.origins) if k is not None}
        self._own_origins: set[tuple[str, str, int]] = set()
        self._allowed_origins: set[tuple[str, str, int]] = set()
        self._allowed_hosts: set[tuple[str, int | None]] = set()
        self.prefetch = prefetch
        self.share_pushes = share_pushes
        #: the encoded pushes of recent messages for the sessions' consumers (inproc.pyx)
        self.push_cache = PushCache(self._encode_push) if share_pushes else None
        self.sessions: set[WebSession] = set()
        self.n_sessions_total = 0
        self.n_pushes = 0
        self.n_encodes = 0
        self.n_bad = 0
        self.n_answers = 0
        self.n_forbidden = 0
        # This loop pass's pushes, [command name, WebSocket frame or None, payload] each: by the
        # payload object (the core hands every session the same one: inproc.pyx), and by content
        self._push_ids: dict[int, list[Any]] = {}
        self._pushes: dict[bytes | int, list[Any]] = {}
        self._waiting: set[WebSession] = set()
        self._ack_waiting: dict[WebSession, None] = {}  # sessions with acks to feed, in order
        self._acks_scheduled = False
        self._sweeper: asyncio.TimerHandle | None = None
        self._server: Any = None

    async def start(self) -> None:
        b = self.broker
        if b._disp is None:
            raise RuntimeError("start the broker before its web gateway")
        self.loop = asyncio.get_running_loop()
        self.address_bytes = b.address.encode()
        self.routing = None if b.commands is None else {c.name.encode(): c.routing for c in b.commands}
        # a packet carries at most the broker's max_payload plus 'address,api,'; base64 is 4/3 of it
        self.max_message = 4 * ((b.max_payload + 1024 + 2) // 3)
        self._server = await serve(self._handler, self.host, self.port, process_request=self._http,
                                   compression=None, max_size=self.max_message, logger=ws_log)
        self.port = self._server.sockets[0].getsockname()[1]
        self._allow()
        log.info("web gateway on http://%s:%d/ (WebSocket /ws)", self.host, self.port)
        if self.any_origin:
            log.warning("web port open to every origin (-web-origin *): any web page, from any site, opened "
                        "in a browser that reaches port %d can read and send this broker's messages", self.port)

    def _allow(self) -> None:
        """The origins and hosts the port answers to, now that its port is known."""
        own = {h.lower().strip("[]") for h in (*OWN_HOSTS, self.host)}
        self._own_origins = {("http", h, self.port) for h in own}
        self._allowed_origins = self._own_origins | self._extra_origins
        hosts: set[tuple[str, int | None]] = {(h, self.port) for h in own}
        if self.port == 80:
            hosts |= {(h, None) for h in own}
        for scheme, h, port in self._extra_origins:
            hosts.add((h, port))
            if port == _DEFAULT_PORTS[scheme]:
                hosts.add((h, None))
        self._allowed_hosts = hosts

    async def close(self) -> None:
        if self._server is None:
            return
        server, self._server = self._server, None
        server.close()
        await server.wait_closed()
        if self._sweeper is not None:
            self._sweeper.cancel()

    def stats(self) -> dict[str, int]:
        """sessions (open WebSockets), consumers (of them, consuming), pushes, encodes, bad_packets, answers,
        sessions_total, forbidden (requests answered 403: a foreign Origin or Host)."""
        consumers = sum(1 for s in self.sessions if s.consumer is not None)
        return {"sessions": len(self.sessions), "consumers": consumers,
                "pushes": self.n_pushes, "encodes": self.n_encodes, "bad_packets": self.n_bad,
                "answers": self.n_answers, "sessions_total": self.n_sessions_total, "forbidden": self.n_forbidden}

    # -- pushes ------------------------------------------------------------------------------

    def push_of(self, payload: bytes) -> list[Any]:
        """``[command name, frame or None, payload]`` of a pushed message, one per loop pass.

        The core hands every session the same bytes object of a message (inproc.pyx), so the
        next session's lookup is by identity. Another object of the same message (delivered
        apart, e.g. from a backlog) is found by content: a small message by itself (hashing
        20 bytes costs ~26 ns against ~80 ns to encode), a large one by its CRC32C, checked with
        ``==`` on a hit (64 KiB: hash 15 us, CRC32C 3 us + compare 1 us, encode 35 us; measured
        with timeit on this box).
        """
        ids, cache = self._push_ids, self._pushes
        entry = ids.get(id(payload))
        if entry is not None and entry[2] is payload:  # (is: an id of a freed object may come back)
            return entry
        if not ids and not cache:
            self.loop.call_soon(self._end_pass)
        key: bytes | int = payload if len(payload) <= _HASHED else crc32c(payload)
        entry = cache.get(key)
        if entry is None or not (key is payload or entry[2] == payload):
            entry = cache[key] = [payload.split(b"/", 1)[0], None, payload]
        ids[id(payload)] = entry
        return entry

    def _encode_push(self, payload: bytes) -> tuple[bytes, bytes]:
        """``(command name, frame)`` of a message's Stream push: push_cache asks once per message."""
        self.n_encodes += 1
        return payload.split(b"/", 1)[0], text_frame(tp.encode(0, tp.PUSH, payload))

    def _end_pass(self) -> None:
        self._push_ids.clear()
        self._pushes.clear()

    def push_packet(self, payload: bytes, entry: list[Any] | None = None) -> bytes:
        """The Stream push of ``payload``: its WebSocket frame, encoded once per loop pass
        (``entry``: its push_of(), when the caller has it)."""
        self.n_pushes += 1
        if not self.share_pushes:
            self.n_encodes += 1
            return text_frame(tp.encode(0, tp.PUSH, payload))
        if entry is None:
            entry = self.push_of(payload)
        frame = entry[1]
        if frame is None:
            frame = entry[1] = text_frame(tp.encode(0, tp.PUSH, payload))
            self.n_encodes += 1
        return frame

    # -- acknowledgements --------------------------------------------------------------------

    def queue_acks(self, session: WebSession) -> None:
        """Feed ``session``'s held acknowledgements in a later loop pass, within the pass's budget."""
        self._ack_waiting[session] = None
        if not self._acks_scheduled:
            self._acks_scheduled = True
            self.loop.call_soon(self._feed_acks)

    def _feed_acks(self) -> None:
        # Each ack returns a credit that the core fills with the next delivery at once, so acks
        # fed per pass bound the pushes built per pass: with many sockets and a backlog, one
        # pass would otherwise carry sockets x prefetch pushes and delay every other client.
        # The waiting sessions are taken as a list (taking them one by one off the front of the
        # dict costs a scan of its emptied front each: quadratic in the sessions), and their
        # consumers' held acknowledgements fed in one core call (one pump for all of them).
        budget = ACK_BUDGET
        sessions = list(self._ack_waiting)
        self._ack_waiting = {}
        self._acks_scheduled = False
        consumers: list[InprocEndpoint | None] = [s.consumer for s in sessions]
        stop = 0
        while stop < len(sessions) and budget > 0:
            fed, stop, error = release_held_many(consumers, stop, budget)
            budget -= fed
            if error is None:
                break
            failed = sessions[stop].consumer
            if failed is not None:
                failed.on_internal_error(error)  # as for a connection's frame: that client goes
            stop += 1
        # (the sessions before stop are done: what the returned credit brings them now is held
        # in turn and queued by their on_output once written)
        if stop < len(sessions):  # the budget ran out: the rest stay first in line, in order
            requeued = self._ack_waiting
            self._ack_waiting = dict.fromkeys(sessions[stop:])
            self._ack_waiting.update(requeued)
        if self._ack_waiting and not self._acks_scheduled:
            self._acks_scheduled = True
            self.loop.call_soon(self._feed_acks)

    # -- answer deadlines --------------------------------------------------------------------

    def watch(self, session: WebSession) -> None:
        self._waiting.add(session)
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(1.0, self._sweep)

    def _sweep(self) -> None:
        now = time.monotonic()
        for s in list(self._waiting):
            s.expire(now)
            if not s.pending or s.closed:
                self._waiting.discard(s)
        self._sweeper = self.loop.call_later(1.0, self._sweep) if self._waiting else None

    # -- WebSocket ---------------------------------------------------------------------------

    async def _handler(self, ws: ServerConnection) -> None:
        self.n_sessions_total += 1
        session = WebSession(self, ws, self.n_sessions_total)
        self.sessions.add(session)
        log.info("%s connected (%s)", session.name, session.peer)
        try:
            async for message in ws:
                if not session.reading.is_set():  # the broker's queue is full: wait as a TCP producer would
                    await session.reading.wait()
                session.on_message(message)
        except ConnectionClosed:
            pass
        finally:
            session.close()
            self.sessions.discard(session)
            self._waiting.discard(session)
            self._ack_waiting.pop(session, None)
            code = ws.close_code
            log.info("%s (%s) disconnected%s", session.name, session.peer,
                     f" (close code {code}{': ' + ws.close_reason if ws.close_reason else ''})"
                     if code not in (None, 1000, 1001) else "")

    # -- HTTP --------------------------------------------------------------------------------

    def _http(self, connection: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        origins = request.headers.get_all("Origin")
        if path == "/ws":
            if origins == [] or self._origin_allowed(origins):
                return None  # the WebSocket handshake
            return self._refuse(connection, request, f"origin {_shown(origins)}",
                                "this origin may not open a WebSocket on this port")
        if not self._host_allowed(request.headers.get_all("Host")):
            return self._refuse(connection, request, f"Host {_shown(request.headers.get_all('Host'))}",
                                "this host name is not one this port answers to")
        cors = self._cors(origins)
        if path in _ROUTES:
            return _response(302, _TEXT, b"", ("Location", _ROUTES[path]), *cors)
        if path == "/info":
            return _json(self.info(), *cors)
        if path == "/stats":
            return _json({"broker": self.broker.stats(), "gateway": self.stats(),
                          "commands": self.broker.command_stats()}, *cors)
        file = _static_file(path)
        if file is None:
            return _response(404, _TEXT, f"not found: {path}\n".encode(), *cors)
        return _response(200, _TYPES.get(file.suffix, "application/octet-stream"), file.read_bytes(),
                         ("Cache-Control", "no-cache"), *cors)

    def _origin_allowed(self, origins: list[str]) -> bool:
        if len(origins) != 1:
            return False
        return self.any_origin or _origin_key(origins[0]) in self._allowed_origins

    def _cors(self, origins: list[str]) -> tuple[tuple[str, str], ...]:
        """The CORS headers that let a page of an origin allowed with ``origins`` read the answer
        (teomq.js imported from here, /info); none for the port's own pages and foreign ones."""
        if not self._origin_allowed(origins) or _origin_key(origins[0]) in self._own_origins:
            return ()
        return ("Access-Control-Allow-Origin", origins[0]), ("Vary", "Origin")

    def _host_allowed(self, hosts: list[str]) -> bool:
        if self.any_origin:
            return True
        return len(hosts) == 1 and _host_key(hosts[0]) in self._allowed_hosts

    def _refuse(self, connection: ServerConnection, request: Request, what: str, reason: str) -> Response:
        """403 with a short reason, and a WARNING line naming what was refused and who asked."""
        self.n_forbidden += 1
        peer = connection.remote_address
        where = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        log.warning("refused %s from %s (peer %s): %s (-web-origin adds origins)",
                    _text(request.path), what, where, reason)
        return _response(403, _TEXT, f"forbidden: {reason}\n".encode())

    def info(self) -> dict[str, Any]:
        b = self.broker
        return {"address": b.address, "server": f"teomq/{__version__}",
                "scheme": "basic" if b.commands is None else "command",
                "commands": [] if b.commands is None else [c.as_dict() for c in b.commands],
                "ws": "/ws"}


def _response(status: int, content_type: str, body: bytes, *extra: tuple[str, str]) -> Response:
    headers = Headers([("Content-Type", content_type), ("Content-Length", str(len(body))),
                       ("Connection", "close"), *extra])
    return Response(status, http.HTTPStatus(status).phrase, headers, body)


def _json(obj: Any, *extra: tuple[str, str]) -> Response:
    return _response(200, "application/json", json.dumps(obj).encode(), ("Cache-Control", "no-store"), *extra)


def _text(value: str, limit: int = 200) -> str:
    """``value`` as shown in a log line: printable, at most ``limit`` characters."""
    shown = value[:limit] + ("..." if len(value) > limit else "")
    return shown.encode("unicode_escape").decode("ascii")


def _shown(values: list[str]) -> str:
    if not values:
        return "(none)"
    return ", ".join(repr(_text(v)) for v in values[:3]) + (" ..." if len(values) > 3 else "")


def _static_file(path: str) -> Path | None:
    """The file under static/ that ``path`` names (index.html for a directory), or None."""
    rel = path.lstrip("/")
    if path.endswith("/"):
        rel += "index.html"
    try:
        file = (STATIC / rel).resolve()
    except (OSError, ValueError):
        return None
    if not file.is_relative_to(STATIC.resolve()) or not file.is_file():
        return None
    return file
