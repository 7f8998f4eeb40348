"""One browser on the WebSocket gateway: teoproxy packets in and out, the broker's endpoints between.

A :class:`WebSession` owns one or two :class:`~teomq.broker.InprocClient` objects, in-process
endpoints of the broker's own dispatcher (a producer, and a consumer once the page says it
consumes): no wire frames are encoded or decoded. A packet from the browser becomes a method
call (``send``, ``answer``, ``ack``); what the core has for an endpoint comes to
:meth:`WebSession.on_output` once per loop pass as ``(type, flags, id, payload)`` tuples and
becomes packets to the browser; Stream pushes come already encoded, a run of them per pass (the
consumer's ``set_pushes``: taken in C, their acknowledgements held there). So a browser consumer
is a consumer like any other: credit, subscriptions, runs of deliveries, redelivery of what it
held when it goes, the broker's stats, and the control plane's log lines, back-pressure and
broker commands (``InprocClient``).

teoproxy commands (``docs/gateway.md`` is the full description):

=============  =================================  =============================================
cmd            data                               answer (same id and cmd)
=============  =================================  =============================================
1 Connect      - (``teomq.js``: see below)        ``Connected to Teonet``
2 Disconnect   -                                  empty
3 ConnectTo    broker address                     ``connected to peer <address>``
4 NewApiClient broker address                     ``connected to peer <address> api``
5 SendTo       ``address,api,payload``            the broker's answer(s)
6 Stream       ``address,name``                   empty; then pushes of ``name/...`` (id 0, cmd 0)
=============  =================================  =============================================

The original's client.js takes every packet with cmd 0 for a Stream push, so a stock session
never gets an error packet with cmd 0: a packet that is no valid request (nothing to answer
with its id and cmd) is logged and counted, and nothing is sent back, as the original proxy
does; an error of the broker that answers no SendTo is logged. A session whose Connect
carries the data ``teomq.js`` (what teomq.js sends; Connect has no data in the original protocol)
gets those as error packets with id 0 / cmd 0 (or the id and cmd read), for its ``onerror``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

import msgpack
from websockets.frames import Frame, Opcode
from websockets.protocol import State

from teomq._core import teoproxy as tp
from teomq._core.inproc import PUSHES
from teomq.broker import InprocClient
from teomq.errors import BadPacket
from teomq.protocol import ApiCommand, ErrorCode, FrameType

if TYPE_CHECKING:
    from teomq.web.gateway import WebGateway


log = logging.getLogger("teomq.web")

#: How long a SendTo waits for its answer (the original's 5 s); fanout answers are collected that long.
ANSWER_TIMEOUT = 5.0
#: Acknowledgements of pushed messages are held while this much is unsent to the browser.
WRITE_HIGH = 1 << 20
_DELIVER, _REPLY, _ERROR = int(FrameType.DELIVER), int(FrameType.REPLY), int(FrameType.ERROR)
_API_HELLO = (b"hello", str(int(ApiCommand.HELLO)).encode())
_API_MSG = (b"msg", str(int(ApiCommand.MSG)).encode())
#: Connect's data from teomq.js (optionally followed by "/" and anything): the session may get cmd-0 errors.
TEOMQ_JS = b"teomq.js"


class _Pending:
    __slots__ = ("pid", "multi", "deadline")

    def __init__(self, pid: int, multi: bool, deadline: float) -> None:
        self.pid = pid
        self.multi = multi
        self.deadline = deadline


class WebSession:
    """One WebSocket connection on ``/ws``."""

    def __init__(self, gateway: WebGateway, ws: Any, number: int) -> None:
        self.gw = gateway
        self.ws = ws
        addr = ws.remote_address
        where = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr)
        self.peer = f"web {where}"
        self.name = f"web-{number}"
        self.streams: set[bytes] = set()
        self.producer: InprocClient | None = None
        self.consumer: InprocClient | None = None
        self.answering = False  # pushes carry a token the page answers with (teomq.js consume())
        self.teomq_js = False  # said it is teomq.js (Connect data): gets error packets with cmd 0 too
        self.tokens: dict[int, int] = {}  # token -> delivery id
        self._next_token = 0
        self.pending: dict[int, _Pending] = {}  # our SEND id -> the SendTo it answers
        self._next_id = 0
        self._ack_timer: asyncio.TimerHandle | None = None  # acks held while the socket is backed up
        self._unseen_warned: set[bytes] = set()
        self.reading = asyncio.Event()
        self.reading.set()
        self.closed = False

    # -- browser -> broker -------------------------------------------------------------------

    def on_message(self, message: str | bytes) -> None:
        """One WebSocket message from the browser."""
        if isinstance(message, bytes):
            self._undecodable(BadPacket("binary frames are not accepted: send each packet base64-encoded "
                                        "in a text frame"))
            return
        try:
            p = tp.decode(message)
        except BadPacket as e:
            self._undecodable(e)
            return
        if p.error:
            self._undecodable(BadPacket("error packets are sent by the gateway, not to it", p.id, p.cmd))
            return
        try:
            self._command(p)
        except BadPacket as e:
            self._bad(e)

    def _command(self, p: Any) -> None:
        cmd = p.cmd
        if cmd == tp.CONNECT:
            if p.data == TEOMQ_JS or p.data.startswith(TEOMQ_JS + b"/"):
                self.teomq_js = True
            self._answer(p, b"Connected to Teonet")
        elif cmd == tp.DISCONNECT:
            self._answer(p, b"")
        elif cmd == tp.CONNECT_TO:
            self._answer(p, b"connected to peer " + self._peer(p, p.data))
        elif cmd == tp.NEW_API_CLIENT:
            address = self._peer(p, p.data)
            self._producer()
            self._answer(p, b"connected to peer " + address + b" api")
        elif cmd == tp.STREAM:
            parts = p.data.split(b",")
            if len(parts) < 2:
                raise BadPacket(f"wrong command data: {_text(p.data)} (Stream takes 'address,name')", p.id, cmd)
            self._peer(p, parts[0])
            self.streams.add(parts[1])
            self._answer(p, b"")
        else:
            self._send_to(p)

    def _send_to(self, p: Any) -> None:
        parts = p.data.split(b",", 2)
        if len(parts) < 3:
            raise BadPacket(f"wrong command data: {_text(p.data)} (SendTo takes 'address,api,payload')",
                            p.id, p.cmd)
        self._peer(p, parts[0])
        api, payload = parts[1], parts[2]
        if api in _API_HELLO:
            self._send(p, self._producer(), bytes((ApiCommand.HELLO,)) + payload, api=True)
        elif api in _API_MSG:
            if payload == b"Consumer":  # the stock teoproxy client's way of saying it consumes
                self._consume(p, answering=self.answering)
            elif payload.startswith((b"subscribe/", b"unsubscribe/")):
                self._subscription(p, payload)
            else:
                self._send(p, self._producer(), bytes((ApiCommand.MSG,)) + payload, api=True)
        elif api == b"consume":
            self._consume(p, answering=True)
        elif api in (b"answer", b"ack"):
            self._reply_to_push(p, api == b"answer", payload)
        elif api == b"send":
            self._send(p, self._producer(), payload)
        elif self.gw.routing is None:
            raise BadPacket(f"unknown API command '{_text(api)}': the broker runs the basic scheme "
                            "(hello, msg, send, consume, answer, ack)", p.id, p.cmd)
        else:
            self._send(p, self._producer(), api + b"/" + payload if payload else api)

    def _peer(self, p: Any, address: bytes) -> bytes:
        if address != self.gw.address_bytes:  # the reason must not tell the address to a page that did not know it
            raise BadPacket(f"unknown peer '{_text(address)}': not the broker this gateway serves", p.id, p.cmd)
        return address

    def _consume(self, p: Any, *, answering: bool) -> None:
        self.answering = answering
        self._consumer_conn()
        self._sync_pushes()
        self._answer(p, b"OK")

    def _subscription(self, p: Any, payload: bytes) -> None:
        if self.gw.routing is None:
            raise BadPacket("the broker runs the basic scheme: there are no commands to subscribe to",
                            p.id, p.cmd)
        self._send(p, self._consumer_conn(), payload)

    def _reply_to_push(self, p: Any, with_answer: bool, payload: bytes) -> None:
        token_text, _, answer = payload.partition(b",")
        token = int(token_text) if token_text.isdigit() else -1
        if token not in self.tokens:
            raise BadPacket(f"no message with token '{_text(token_text)}' is waiting for an answer", p.id, p.cmd)
        self._check_size(p, answer)
        did = self.tokens.pop(token)
        consumer = self.consumer
        assert consumer is not None
        if not consumer.detached:  # else the broker closed it (shutdown): the answer goes nowhere
            try:
                if with_answer:
                    consumer.answer(did, answer)
                else:
                    consumer.answer(did, no_answer=True)
            except Exception as exc:
                consumer.on_internal_error(exc)
        self.gw.n_answers += 1
        self._answer(p, b"OK")

    def _check_size(self, p: Any, payload: bytes) -> None:
        # over the broker's limit: the core would refuse it (send() raises; an answer must not pass it either)
        if len(payload) > self.gw.broker.max_payload:
            raise BadPacket(f"message of {len(payload)} bytes is over the broker's limit of "
                            f"{self.gw.broker.max_payload}", p.id, p.cmd)

    def _send(self, p: Any, client: InprocClient, payload: bytes, *, api: bool = False) -> None:
        self._check_size(p, payload)
        self._next_id += 1
        multi = not api and self.gw.routing is not None and \
            self.gw.routing.get(payload.split(b"/", 1)[0]) == "fanout"
        self.pending[self._next_id] = _Pending(p.id, multi, time.monotonic() + ANSWER_TIMEOUT)
        self.gw.watch(self)
        if client.detached:  # the broker closed it (shutdown): no answer, the SendTo times out
            return
        try:
            client.send(self._next_id, payload, api=api)
        except Exception as exc:  # a hook of the broker's failed (a bug): as for a connection's frame
            client.on_internal_error(exc)

    # -- the session's endpoints in the broker -----------------------------------------------

    def _producer(self) -> InprocClient:
        if self.producer is None:
            self.producer = self._connect("producer")
        return self.producer

    def _consumer_conn(self) -> InprocClient:
        if self.consumer is None:
            self.consumer = self._connect("consumer")
            self._sync_pushes()
            self.reading.set()
        return self.consumer

    def _sync_pushes(self) -> None:
        # Our Stream pushes are taken in C (inproc.pyx: set_pushes) unless pushes carry a token
        # to answer, or the gateway encodes them per socket: then each is a delivery here.
        cache = self.gw.push_cache
        if self.consumer is not None:
            self.consumer.set_pushes(cache if cache is not None and not self.answering else None, self.streams)

    def _connect(self, role: str) -> InprocClient:
        return InprocClient.open(self.gw.broker, self, self.on_output, role=role, name=self.name,
                                 peer=self.peer, prefetch=self.gw.prefetch)

    def pause_reading(self) -> None:
        """The broker is at its high mark: it parks our producer's sends and stops our reads. A
        page that also consumes keeps being read (its answers free the room; what it sends
        meanwhile waits, parked, as a TCP client's with role "both" does)."""
        if self.consumer is None:
            self.reading.clear()

    def resume_reading(self) -> None:
        self.reading.set()

    # -- broker -> browser -------------------------------------------------------------------

    def on_output(self, items: list[tuple[int, int, int, bytes]]) -> None:
        """What the core has for one of our endpoints (one call per endpoint per loop pass)."""
        out: list[bytes] = []
        acks: list[int] = []
        held = False
        for ftype, flags, fid, payload in items:
            if ftype == PUSHES:
                # a run of Stream pushes taken in C, encoded once per message for every session;
                # their ids are held in the core: a push is done once handed to the browser
                out.append(payload)
                self.gw.n_pushes += flags
                held = True
            elif ftype == _DELIVER:
                self._deliver(fid, payload, out, acks)
            elif ftype == _REPLY:
                entry = self.pending.get(fid)
                if entry is not None:  # else: its time ran out, it was answered "timeout"
                    if not entry.multi:
                        del self.pending[fid]
                    out.append(text_frame(tp.encode(entry.pid, tp.SEND_TO, payload)))
            elif ftype == _ERROR:
                self._broker_error(fid, payload, out)
        if out:
            self.write(out)
        if acks or held:
            self._ack(acks)

    def _deliver(self, did: int, payload: bytes, out: list[bytes], acks: list[int]) -> None:
        gw = self.gw
        if self.answering:
            self._next_token = self._next_token % 0xFFFFFFFF + 1
            self.tokens[self._next_token] = did
            out.append(text_frame(tp.encode(self._next_token, tp.PUSH, payload)))
            gw.n_pushes += 1
            gw.n_encodes += 1
            return
        acks.append(did)  # a stream push is not answered: it is done once handed to the browser
        entry = gw.push_of(payload)
        name = entry[0]
        if name in self.streams:
            out.append(gw.push_packet(payload, entry))
        elif name not in self._unseen_warned:
            self._unseen_warned.add(name)
            log.info("%s (%s) gets '%s' but has no Stream for it: acknowledged unseen, as teoproxy does",
                     self.name, self.peer, _text(name))

    def _broker_error(self, fid: int, payload: bytes, out: list[bytes]) -> None:
        try:
            err = msgpack.unpackb(payload, raw=False)
            reason, code = str(err["reason"]), int(err["code"])
        except Exception:
            reason, code = f"undecodable ERROR frame {payload[:100]!r}", 0
        entry = self.pending.pop(fid, None)
        if entry is not None:
            out.append(text_frame(tp.encode_error(entry.pid, tp.SEND_TO, reason)))
        else:  # answers no SendTo: only a teomq.js session can take an error packet with cmd 0
            if code != ErrorCode.SHUTDOWN:
                log.warning("%s (%s): broker error %d: %s%s", self.name, self.peer, code, reason,
                            "" if self.teomq_js else " (not sent: a stock teoproxy client takes cmd 0 for a push)")
            if self.teomq_js:
                out.append(text_frame(tp.encode_error(0, 0, reason)))

    def _ack(self, dids: list[int]) -> None:
        # Acknowledgements return credit, and credit brings the next deliveries: they are held in
        # the core (with those of the pushes taken there) and fed back through the gateway's
        # budget per loop pass (WebGateway.queue_acks), not at once. Nothing is fed while more
        # than WRITE_HIGH waits unsent on the socket (a timer looks again): the browser does not
        # read, so its credit runs out and the broker keeps (queue) or bounds (fanout backlog)
        # the rest.
        consumer = self.consumer
        if consumer is None or consumer.detached:
            return
        if dids:
            consumer.hold_acks(dids)
        if self._ack_timer is None:
            self._queue_acks_unless_backed_up()

    def _queue_acks_unless_backed_up(self) -> None:
        transport = getattr(self.ws, "transport", None)
        if transport is not None and transport.get_write_buffer_size() > WRITE_HIGH:
            self._ack_timer = self.gw.loop.call_later(0.05, self._retry_acks)
        else:
            self.gw.queue_acks(self)

    def _retry_acks(self) -> None:
        self._ack_timer = None
        if not self.closed:
            self._queue_acks_unless_backed_up()

    def expire(self, now: float) -> None:
        """Answer ``timeout`` to SendTo requests whose time ran out (the original's 5 s)."""
        out = []
        for fid in [f for f, e in self.pending.items() if e.deadline <= now]:
            entry = self.pending.pop(fid)
            if not entry.multi:
                out.append(text_frame(tp.encode_error(entry.pid, tp.SEND_TO, "timeout")))
        if out:
            self.write(out)

    def write(self, frames: list[bytes]) -> None:
        """Send WebSocket frames (``text_frame``) to the browser: one socket write for all of them.

        The frames go to the transport directly, not through ``protocol.send_text`` +
        ``send_data()``, which writes each frame on its own (a send() each: 67 % of the broker's
        CPU in a py-spy profile of bench/web_push.py with 200 sockets), and so that a push
        serialized once serves every socket.
        """
        ws = self.ws
        if self.closed or ws.protocol.state is not State.OPEN or not frames:
            return
        ws.transport.write(frames[0] if len(frames) == 1 else b"".join(frames))

    def _answer(self, p: Any, data: bytes) -> None:
        self.write([text_frame(tp.encode(p.id, p.cmd, data))])

    def _bad(self, e: BadPacket) -> None:
        """A request that was read (its id and cmd) but cannot be served: answered by an error packet."""
        self.gw.n_bad += 1
        log.warning("%s (%s): bad packet: %s", self.name, self.peer, e.reason)
        self.write([text_frame(tp.encode_error(e.id, e.cmd, e.reason))])

    def _undecodable(self, e: BadPacket) -> None:
        """A packet that is no request (no id and cmd to answer): logged and counted; an error packet
        (cmd 0 or the cmd read) goes only to teomq.js, as the original proxy sends nothing."""
        self.gw.n_bad += 1
        log.warning("%s (%s): bad packet: %s%s", self.name, self.peer, e.reason,
                    "" if self.teomq_js else " (nothing sent back, as teoproxy does)")
        if self.teomq_js:
            self.write([text_frame(tp.encode_error(e.id, e.cmd, e.reason))])

    # -- ending ------------------------------------------------------------------------------

    def on_broker_close(self, client: InprocClient) -> None:
        """The broker closed one of our endpoints (shutdown, or a failure of its own): end the WebSocket too."""
        if not self.closed:
            self.gw.loop.create_task(self.ws.close(1001, "broker closed the connection"))

    def close(self) -> None:
        """The WebSocket is gone: its endpoints go (what the consumer held is redelivered)."""
        if self.closed:
            return
        self.closed = True
        self.pending.clear()
        if self._ack_timer is not None:
            self._ack_timer.cancel()
        for client in (self.consumer, self.producer):
            if client is not None:
                client.close()


def text_frame(packet: bytes) -> bytes:
    """A packet (base64 text) as one WebSocket text frame, serialized by the library (unmasked:
    a server's frame is the same bytes for every socket)."""
    return Frame(Opcode.TEXT, packet).serialize(mask=False)


def _text(data: bytes, limit: int = 200) -> str:
    return data[:limit].decode("utf-8", "replace") + ("..." if len(data) > limit else "")

