"""The WebSocket gateway (teomq.web) in process: a real Broker and WebGateway, real sockets.

Browsers are played by ``websockets`` clients speaking raw teoproxy packets (and raw HTTP
requests, for the Origin and Host checks); producers and consumers on the TCP side are teomq
clients. Every in-process test runs on the stdlib loop and on uvloop; the flags and warnings
of the web port are tested through the real CLI.
Packets the original's client.js sends are built from the spec (docs/gateway.md) and the
answers are checked byte for byte. Waits are hang guards, never timing assertions.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import websockets

import teomq
from teomq._py import teoproxy as tp
from teomq.broker import InprocClient
from teomq.commands import Command
from teomq.protocol import FrameType
from procs import ProcGroup
from teomq.web import WebGateway
from test_broker_api import LONG, make_broker, spec, until

pytestmark = pytest.mark.usefixtures("teomq_home")

SCHEMA = [Command("num_players"), Command("num_servers"), Command("version", pattern="{data}/{description}"),
          Command("q", routing="queue")]


class Page:
    """A browser tab speaking raw packets; pushes and answers are kept apart as they come."""

    def __init__(self, ws: Any, address: str) -> None:
        self.ws = ws
        self.addr = address
        self.inbox: list[tp.Packet] = []
        self.raw: list[str] = []

    async def send(self, pid: int, cmd: int, data: bytes | str = b"") -> None:
        await self.ws.send(tp.encode(pid, cmd, data.encode() if isinstance(data, str) else data).decode())

    async def next(self, pred: Any, what: str, timeout: float = LONG) -> tp.Packet:
        """The first packet (already received or coming) for which ``pred`` is true; it is taken out."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            for i, p in enumerate(self.inbox):
                if pred(p):
                    return self.inbox.pop(i)
            left = deadline - loop.time()
            if left <= 0:
                raise AssertionError(f"no {what}; got {self.inbox}")
            try:
                text = await asyncio.wait_for(self.ws.recv(), left)
            except asyncio.TimeoutError:
                continue
            self.raw.append(text)
            self.inbox.append(tp.decode(text, gateway=False))

    async def call(self, pid: int, cmd: int, data: bytes | str = b"") -> tp.Packet:
        await self.send(pid, cmd, data)
        return await self.next(lambda p: p.id == pid and p.cmd == cmd, f"answer to packet {pid}/{cmd}")

    async def send_to(self, pid: int, api: str, payload: bytes | str = b"") -> tp.Packet:
        payload = payload.encode() if isinstance(payload, str) else payload
        return await self.call(pid, tp.SEND_TO, f"{self.addr},{api},".encode() + payload)

    async def pushes(self, n: int, what: str = "pushes") -> list[tp.Packet]:
        return [await self.next(lambda p: p.cmd == tp.PUSH and not p.error, f"{what} ({i + 1} of {n})")
                for i in range(n)]

    async def error(self) -> tp.Packet:
        return await self.next(lambda p: p.error, "error packet")

    async def identify(self) -> None:
        """Say this page is teomq.js (Connect with data ``teomq.js``), as teomq.js does."""
        assert (await self.call(0, tp.CONNECT, "teomq.js")).data == b"Connected to Teonet"


async def started(tmp_path: Path, commands: list[Command] | None = SCHEMA, **kw: Any) -> tuple[teomq.Broker, WebGateway]:
    broker = make_broker(tmp_path, commands=commands, **kw)
    await broker.start()
    gw = WebGateway(broker, port=0)
    await gw.start()
    return broker, gw


async def page(gw: WebGateway) -> Page:
    return Page(await websockets.connect(f"ws://127.0.0.1:{gw.port}/ws", compression=None), gw.broker.address)


async def stop(broker: teomq.Broker, gw: WebGateway, *pages: Page) -> None:
    for p in pages:
        await p.ws.close()
    await gw.close()
    await broker.close()


def test_the_stock_teoproxy_client_sequence(arun: Any, tmp_path: Path) -> None:
    """client.js's packets, in its order: every answer and push byte for byte as teoproxy's."""
    async def main() -> None:
        broker, gw = await started(tmp_path)
        addr = broker.address
        tab = await page(gw)
        expected = [
            (0, tp.CONNECT, b"", b"Connected to Teonet"),
            (0, tp.CONNECT_TO, addr.encode(), f"connected to peer {addr}".encode()),
            (0, tp.NEW_API_CLIENT, addr.encode(), f"connected to peer {addr} api".encode()),
            (1, tp.SEND_TO, f"{addr},msg,Consumer".encode(), b"OK"),
            (0, tp.STREAM, f"{addr},num_players".encode(), b""),
            (0, tp.STREAM, f"{addr},num_servers".encode(), b""),
            (2, tp.SEND_TO, f"{addr},msg,subscribe/version".encode(), b"OK"),
            (3, tp.SEND_TO, f"{addr},msg,subscribe/num_players".encode(), b"OK"),
            (4, tp.SEND_TO, f"{addr},msg,subscribe/num_servers".encode(), b"OK"),
        ]
        for pid, cmd, data, answer in expected:
            await tab.send(pid, cmd, data)
            got = await tab.next(lambda p, pid=pid, cmd=cmd: (p.id, p.cmd) == (pid, cmd), f"answer {pid}/{cmd}")
            assert tab.raw[-1] == tp.encode(pid, cmd, answer).decode()  # byte-compatible answer text
            assert got == tp.Packet(pid, cmd, answer, False)
        assert broker.stats()["consumers"] == 1
        async with teomq.Producer(spec(broker)) as producer:
            # nobody answers a stream push: the producer's fanout collects nothing, the page gets it
            for text in ("num_players/42", "num_servers/7", "version/1/2"):
                assert await producer.collect(text, timeout=0.3) == []
        pushes = await tab.pushes(2)
        assert [tab.raw[i] for i in (-2, -1)] == [tp.encode(0, 0, b"num_players/42").decode(),
                                                   tp.encode(0, 0, b"num_servers/7").decode()]
        assert [p.data for p in pushes] == [b"num_players/42", b"num_servers/7"]  # no Stream for version
        hello = await tab.send_to(5, "hello", "Consumer 0!")
        assert hello == tp.Packet(5, tp.SEND_TO, b"Hello Consumer 0!", False)
        await until(lambda: broker.stats()["inflight"] == 0, "pushes acknowledged")
        await tab.ws.close()
        await until(lambda: broker.stats()["consumers"] == 0 and not gw.sessions, "the tab's consumer to go")
        await stop(broker, gw)

    arun(main())


def _bad_checksum() -> str:
    """A Connect packet (id 7) with its checksum off by one."""
    raw = bytearray(tp.pack(7, tp.CONNECT))
    raw[-1] = (raw[-1] + 1) & 0xFF
    return base64.b64encode(bytes(raw)).decode()


#: Packets that are no request: no (id, cmd) of a valid request can be read from them.
UNDECODABLE = [
    ("binary", b"\x00\x01binary", 0, 0, "binary frames are not accepted"),
    ("bad-base64", "not base64!", 0, 0, "bad base64"),
    ("not-ascii", "AAAA\u00e9", 0, 0, "bad base64: the text is not ASCII"),
    ("bad-padding", "AAAAAQ", 0, 0, "bad base64"),
    ("empty", "", 0, 0, "not enough data: 0 bytes"),
    ("short", tp.encode(0, 1)[:4].decode(), 0, 0, "not enough data: 3 bytes"),
    ("checksum", _bad_checksum(), 7, tp.CONNECT, "wrong checksum"),
    ("cmd-0", tp.encode(9, 0, b"x").decode(), 9, 0, "unknown command 0"),
    ("cmd-7", tp.encode(9, 7, b"x").decode(), 9, 7, "unknown command 7"),
    ("cmd-127", tp.encode(9, 127).decode(), 9, 127, "unknown command 127"),
    ("error-bit", tp.encode_error(9, tp.CONNECT, "hi").decode(), 9, tp.CONNECT, "error packets are sent by the gateway"),
    ("error-push", tp.encode_error(0, 0, "hi").decode(), 0, 0, "unknown command 0"),
]
#: Requests that were read (id, cmd) but cannot be served: answered with their own id and cmd.
BAD_REQUESTS = [
    ("sendto-data", tp.encode(3, tp.SEND_TO, b"no commas").decode(), 3, tp.SEND_TO, "wrong command data: no commas"),
    ("stream-data", tp.encode(4, tp.STREAM, b"nocomma").decode(), 4, tp.STREAM, "wrong command data: nocomma"),
    ("peer", tp.encode(5, tp.CONNECT_TO, b"someone-else").decode(), 5, tp.CONNECT_TO, "unknown peer 'someone-else'"),
]
BAD = UNDECODABLE + BAD_REQUESTS


@pytest.mark.parametrize("name,message,pid,cmd,reason", BAD, ids=[b[0] for b in BAD])
def test_a_teomq_js_page_gets_an_error_packet_for_each_bad_packet_and_the_socket_stays(
        arun: Any, tmp_path: Path, name: str, message: Any, pid: int, cmd: int, reason: str) -> None:
    """A session that said it is teomq.js gets every error, with the id and cmd read (else 0)."""
    async def main() -> None:
        broker, gw = await started(tmp_path)
        tab = await page(gw)
        await tab.identify()
        await tab.ws.send(message)
        err = await tab.error()
        assert (err.id, err.cmd) == (pid, cmd & 0x7F), err
        assert err.data.decode().startswith(reason), err
        assert gw.stats()["bad_packets"] == 1
        # the same socket still works
        assert (await tab.call(11, tp.CONNECT)).data == b"Connected to Teonet"
        await stop(broker, gw, tab)

    arun(main())


def test_a_stock_page_never_gets_an_error_packet_with_cmd_0(arun: Any, tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """client.js takes every cmd-0 packet for a push: packets that are no request are logged and
    counted, nothing is sent back (as teoproxy); bad requests get errors with their own id and cmd."""
    async def main() -> None:
        broker, gw = await started(tmp_path)
        tab = await page(gw)
        for _, message, *_ in BAD:
            await tab.ws.send(message)
        # the gateway handles a socket's messages in order: an answer to any of them comes before this one
        assert (await tab.call(11, tp.CONNECT)).data == b"Connected to Teonet"
        assert [(p.id, p.cmd, p.error) for p in tab.inbox] == [(pid, cmd, True) for _, _, pid, cmd, _ in BAD_REQUESTS]
        assert all(p.data.decode().startswith(b[4]) for p, b in zip(tab.inbox, BAD_REQUESTS)), tab.inbox
        assert not [p for p in map(lambda t: tp.decode(t, gateway=False), tab.raw) if p.cmd == 0]
        assert gw.stats()["bad_packets"] == len(BAD)
        lines = [r.getMessage() for r in caplog.records if r.name == "teomq.web" and r.levelname == "WARNING"]
        assert sum("bad packet" in m and "nothing sent back" in m for m in lines) == len(UNDECODABLE), lines
        # the socket still serves requests
        assert (await tab.send_to(12, "hello", "still here")).data == b"Hello still here"
        await stop(broker, gw, tab)

    arun(main())


def test_broker_errors_that_answer_no_request_reach_only_a_teomq_js_page(arun: Any, tmp_path: Path) -> None:
    """The broker's SHUTDOWN ERROR answers no SendTo: a stock page gets nothing but the close, teomq.js the error."""
    async def main() -> None:
        broker, gw = await started(tmp_path)
        stock, js = await page(gw), await page(gw)
        await js.identify()
        for tab in (stock, js):
            await tab.call(1, tp.NEW_API_CLIENT, broker.address)  # a producer connection in the broker
            assert (await tab.send_to(2, "msg", "Consumer")).data == b"OK"  # and a consumer one
        await broker.close()
        for tab in (stock, js):
            with pytest.raises(websockets.ConnectionClosed):
                while True:
                    await tab.next(lambda p: False, "the socket to close")
            assert tab.ws.close_code == 1001
        assert stock.inbox == []
        assert js.inbox == [tp.Packet(0, 0, b"broker is shutting down", True)] * 2  # one per connection
        await gw.close()

    arun(main())


def test_no_error_text_tells_the_broker_address_to_a_page_that_did_not_name_it(arun: Any, tmp_path: Path) -> None:
    async def main() -> None:
        broker, gw = await started(tmp_path)
        addr = broker.address
        tabs = [await page(gw), await page(gw)]
        await tabs[1].identify()
        for tab in tabs:
            for pid, cmd, data in ((1, tp.CONNECT_TO, "x"), (2, tp.NEW_API_CLIENT, "x"),
                                   (3, tp.STREAM, "x,num_players"), (4, tp.SEND_TO, "x,hello,me"),
                                   (5, tp.SEND_TO, "x,msg,Consumer"), (6, tp.SEND_TO, "x,send,q/1"),
                                   (7, tp.SEND_TO, "x,nope,1"), (8, tp.CONNECT_TO, ""), (9, tp.SEND_TO, "x"),
                                   (10, tp.STREAM, "x")):
                err = await tab.call(pid, cmd, data)
                assert err.error, err
            for _, message, *_ in BAD:
                await tab.ws.send(message)
            await tab.call(11, tp.CONNECT)
            assert tab.raw and not [t for t in tab.raw if addr.encode() in base64.b64decode(t)], tab.raw
        assert len(tabs[1].raw) > len(tabs[0].raw)  # teomq.js got the errors of the undecodable packets too
        await stop(broker, gw, *tabs)

    arun(main())


def test_bad_requests_are_refused_with_the_reason(arun: Any, tmp_path: Path) -> None:
    """Unknown commands, oversize messages, unknown tokens, a basic-scheme subscribe: error packets."""
    async def main() -> None:
        broker, gw = await started(tmp_path, max_payload=1000)
        tab = await page(gw)
        err = await tab.send_to(1, "nope", "x")
        assert err.error and err.data == b"command 'nope' not found"
        err = await tab.send_to(2, "msg", "subscribe/nope")
        assert err.error and err.data == b"command 'nope' not found"
        err = await tab.send_to(3, "num_players", b"9" * 1100)
        assert err.error and err.data == b"message of 1112 bytes is over the broker's limit of 1000"
        err = await tab.send_to(4, "answer", "77,late")
        assert err.error and err.data == b"no message with token '77' is waiting for an answer"
        assert (await tab.send_to(5, "hello", "still here")).data == b"Hello still here"
        # a message over the WebSocket limit cannot be read: the library closes with 1009
        await tab.ws.send("A" * (gw.max_message + 4))
        with pytest.raises(websockets.ConnectionClosed):
            await tab.ws.recv()
        assert tab.ws.close_code == 1009
        other = await page(gw)
        assert (await other.send_to(6, "hello", "next")).data == b"Hello next"
        await stop(broker, gw, other)

        broker, gw = await started(tmp_path, commands=None)
        tab = await page(gw)
        err = await tab.send_to(1, "msg", "subscribe/a")
        assert err.error and b"basic scheme" in err.data
        err = await tab.send_to(2, "num_players", "1")
        assert err.error and err.data.startswith(b"unknown API command 'num_players'")
        await stop(broker, gw, tab)

    arun(main())


def test_an_answering_page_is_a_consumer_and_its_held_messages_are_redelivered(arun: Any, tmp_path: Path) -> None:
    """consume: pushes carry tokens, answers reach the producer; a closed tab's messages go to another."""
    async def main() -> None:
        broker, gw = await started(tmp_path, max_payload=1000)
        first, second = await page(gw), await page(gw)
        for tab in (first, second):
            assert (await tab.send_to(1, "consume")).data == b"OK"
        assert (await first.send_to(2, "msg", "subscribe/q")).data == b"OK"
        assert broker.stats()["consumers"] == 2
        async with teomq.Producer(spec(broker), timeout=LONG) as producer:
            one = asyncio.ensure_future(producer.request("q/1"))
            push = (await first.pushes(1))[0]
            assert push.id != 0 and push.data == b"q/1"
            assert (await first.send_to(3, "answer", f"{push.id},first saw q/1")).data == b"OK"
            assert await one == b"first saw q/1"
            # the first tab takes q/2 and closes without answering: the second gets it
            two = asyncio.ensure_future(producer.request("q/2"))
            assert (await first.pushes(1))[0].data == b"q/2"
            assert broker.stats()["inflight"] == 1
            assert (await second.send_to(2, "msg", "subscribe/q")).data == b"OK"
            await first.ws.close()
            push = (await second.pushes(1, "the redelivered message"))[0]
            assert push.data == b"q/2"
            assert (await second.send_to(3, "answer", f"{push.id},second saw q/2")).data == b"OK"
            assert await two == b"second saw q/2"
            s = broker.stats()
            assert (s["redelivered"], s["consumers"], s["inflight"]) == (1, 1, 0), s
            # an answer over the broker's limit is refused, the message stays with the page
            producer.send("q/big", lambda *a: None)
            push = (await second.pushes(1))[0]
            err = await second.send_to(5, "answer", f"{push.id},".encode() + b"a" * 1100)
            assert err.error and err.data == b"message of 1100 bytes is over the broker's limit of 1000"
            assert broker.stats()["inflight"] == 1 and second.ws.close_code is None
            assert (await second.send_to(6, "answer", f"{push.id},small")).data == b"OK"
            # ack: done without an answer (the producer's request then times out; send() has no reply)
            producer.send("q/3", lambda *a: None)
            push = (await second.pushes(1))[0]
            assert (await second.send_to(4, "ack", str(push.id))).data == b"OK"
            await until(lambda: broker.stats()["inflight"] == 0, "the ack")
        await stop(broker, gw, second)

    arun(main())


def test_a_stream_page_gets_more_than_its_credit_and_a_producer_page_gets_answers(arun: Any, tmp_path: Path) -> None:
    """Acknowledged pushes return credit (300 > prefetch 64); a page as producer gets the consumers' answers."""
    async def main() -> None:
        broker, gw = await started(tmp_path)
        tab = await page(gw)
        await tab.send_to(1, "msg", "subscribe/num_players")
        await tab.call(0, tp.STREAM, f"{broker.address},num_players")
        async with teomq.Producer(spec(broker)) as producer:
            for i in range(300):
                producer.send(f"num_players/{i}".encode(), lambda *a: None)
            got = await tab.pushes(300)
        assert [p.data for p in got] == [f"num_players/{i}".encode() for i in range(300)]
        consumer = teomq.Consumer(spec(broker))

        @consumer.command("q")
        def q(call: Any) -> str:
            return f"tcp got {call.data.decode()}"

        async with consumer:
            await until(lambda: broker.command_stats()[3]["subscribers"] == 1, "the TCP consumer")
            answer = await tab.send_to(2, "q", "hi")
            assert answer == tp.Packet(2, tp.SEND_TO, b"tcp got hi", False)
            answer = await tab.send_to(3, "send", "q/raw")
            assert answer.data == b"tcp got raw"
            assert (await tab.send_to(4, "msg", "q/fed")).data == b"OK"  # API 130: fed in, answered OK
        await stop(broker, gw, tab)

    arun(main())


def test_a_send_nobody_answers_times_out_after_5_s(arun: Any, tmp_path: Path) -> None:
    async def main() -> None:
        broker, gw = await started(tmp_path)
        tab = await page(gw)
        err = await tab.send_to(1, "q", "waits")  # a queue command nobody subscribes to
        assert err == tp.Packet(1, tp.SEND_TO, b"timeout", True)
        assert broker.stats()["queue"] == 1  # the message still waits for a consumer
        await stop(broker, gw, tab)

    arun(main())


def test_pushes_to_many_sockets_are_encoded_once(arun: Any, tmp_path: Path) -> None:
    async def main() -> None:
        broker, gw = await started(tmp_path)
        tabs = [await page(gw) for _ in range(20)]
        for tab in tabs:
            await tab.send_to(1, "msg", "subscribe/num_servers")
            await tab.call(0, tp.STREAM, f"{broker.address},num_servers")
        async with teomq.Producer(spec(broker)) as producer:
            for i in range(10):
                producer.send(f"num_servers/{i}".encode(), lambda *a: None)
            for tab in tabs:
                assert [p.data for p in await tab.pushes(10)] == [f"num_servers/{i}".encode() for i in range(10)]
        s = gw.stats()
        assert (s["pushes"], s["encodes"]) == (200, 10), s
        await stop(broker, gw, *tabs)

    arun(main())


def test_an_ack_budget_smaller_than_a_pass_loses_and_reorders_nothing(arun: Any, tmp_path: Path,
                                                                       monkeypatch: Any) -> None:
    """Acks past the pass's budget wait for the next passes, their sessions first in line."""
    import teomq.web.gateway as gateway_module

    monkeypatch.setattr(gateway_module, "ACK_BUDGET", 3)

    async def main() -> None:
        broker = make_broker(tmp_path, commands=SCHEMA)
        await broker.start()
        gw = WebGateway(broker, port=0, prefetch=2)  # credit runs out at once: only fed acks bring more
        await gw.start()
        tabs = [await page(gw) for _ in range(6)]
        for tab in tabs:
            await tab.send_to(1, "msg", "subscribe/num_servers")
            await tab.call(0, tp.STREAM, f"{broker.address},num_servers")
        async with teomq.Producer(spec(broker)) as producer:
            for i in range(200):  # a session is fed 2 or 3 acks a pass: the others wait their turn
                producer.send(f"num_servers/{i}".encode(), lambda *a: None)
            for tab in tabs:
                assert [p.data for p in await tab.pushes(200)] == [f"num_servers/{i}".encode() for i in range(200)]
        assert gw.stats()["pushes"] == 1200
        await stop(broker, gw, *tabs)

    arun(main())


def test_a_page_that_does_not_read_runs_out_of_credit_and_loses_nothing(arun: Any, tmp_path: Path) -> None:
    """Acks are held while the socket is backed up: the broker keeps the rest for that page alone."""
    async def main() -> None:
        broker, gw = await started(tmp_path, max_payload=100_000)
        # max_queue=1: this client stops reading its socket as soon as one message waits
        slow = Page(await websockets.connect(f"ws://127.0.0.1:{gw.port}/ws", compression=None, max_queue=1,
                                             max_size=None), broker.address)
        fast = await page(gw)
        for tab in (slow, fast):
            await tab.send_to(1, "msg", "subscribe/num_players")
            await tab.call(0, tp.STREAM, f"{broker.address},num_players")
        sent = [f"num_players/{i}/".encode() + b"x" * 65536 for i in range(400)]
        async with teomq.Producer(spec(broker)) as producer:
            for i, data in enumerate(sent):
                producer.publish(data)
                if i % 20 == 19:
                    await producer.drain()
            assert [p.data for p in await fast.pushes(400)] == sent
        # the slow page holds its 64 credits, the broker holds what it has not taken
        await until(lambda: broker.stats()["inflight"] == gw.prefetch, "the slow page's credit to run out")
        assert broker.stats()["backlog"] > 0
        session = next(s for s in gw.sessions if s.ws.remote_address == slow.ws.local_address)
        assert session.ws.transport.get_write_buffer_size() < 2 * 1024 * 1024 + gw.prefetch * 90_000
        # once it reads again it gets every message, in order
        assert [p.data for p in await slow.pushes(400)] == sent
        await until(lambda: broker.stats()["inflight"] == 0 and broker.stats()["backlog"] == 0, "all acknowledged")
        await stop(broker, gw, slow, fast)

    arun(main())


def test_a_peer_that_vanishes_mid_frame_or_speaks_no_http_leaves_the_others_served(arun: Any, tmp_path: Path) -> None:
    async def main() -> None:
        broker, gw = await started(tmp_path)
        tab = await page(gw)
        await tab.send_to(1, "msg", "subscribe/num_players")
        await tab.call(0, tp.STREAM, f"{broker.address},num_players")
        # a WebSocket that sends half of a masked text frame and is gone
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
        await until(lambda: len(gw.sessions) == 2, "the raw session")
        writer.write(bytes([0x81, 0x80 | 100]) + b"mask" + b"x" * 10)  # 100 bytes announced, 10 sent
        await writer.drain()
        writer.transport.abort()
        await until(lambda: len(gw.sessions) == 1, "the vanished session to end")
        # garbage instead of HTTP: the library closes that connection (nothing to answer a non-HTTP peer
        # in), an oversize request line gets 414; nothing else is disturbed
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(b"\x00\x01garbage\r\n\r\n")
        assert await reader.read(100) == b""
        writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n")
        assert (await reader.read(100)).startswith(b"HTTP/1.1 414")
        writer.close()
        async with teomq.Producer(spec(broker)) as producer:
            producer.publish(b"num_players/5")
            assert [p.data for p in await tab.pushes(1)] == [b"num_players/5"]
        assert (await tab.send_to(2, "hello", "ok")).data == b"Hello ok"
        await stop(broker, gw, tab)

    arun(main())


def test_http_pages_info_and_stats(arun: Any, tmp_path: Path) -> None:
    async def main() -> None:
        broker, gw = await started(tmp_path)
        base = f"http://127.0.0.1:{gw.port}"

        def get(path: str) -> tuple[int, str, bytes]:
            try:
                with urllib.request.urlopen(base + path, timeout=LONG) as r:
                    return r.status, r.headers["Content-Type"], r.read()
            except urllib.error.HTTPError as e:
                return e.code, e.headers["Content-Type"], e.read()

        loop = asyncio.get_running_loop()
        info = json.loads((await loop.run_in_executor(None, get, "/info"))[2])
        assert info["address"] == broker.address and info["scheme"] == "command" and info["ws"] == "/ws"
        assert [c["name"] for c in info["commands"]] == [c.name for c in SCHEMA]
        stats = json.loads((await loop.run_in_executor(None, get, "/stats"))[2])
        assert stats["gateway"]["sessions"] == 0 and "consumers" in stats["broker"]
        status, ctype, body = await loop.run_in_executor(None, get, "/teomq.js")
        assert status == 200 and ctype.startswith("text/javascript") and b"export" in body
        status, ctype, body = await loop.run_in_executor(None, get, "/")  # redirected to the page
        assert status == 200 and ctype.startswith("text/html") and b"num_players" in body
        for path in ("/nothing", "/../gateway.py", "/%2e%2e/gateway.py", "/examples/../../session.py"):
            assert (await loop.run_in_executor(None, get, path))[0] == 404, path
        await stop(broker, gw)

    arun(main())


# -- origins and hosts ---------------------------------------------------------------------------

_UPGRADE = [("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("Sec-WebSocket-Version", "13")]


async def raw_get(port: int, path: str, headers: list[tuple[str, str]], host: str = "127.0.0.1"
                  ) -> tuple[int, dict[str, str], bytes]:
    """GET ``path`` with exactly ``headers`` (no Host unless given): status, headers, body."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\n".encode()
                     + b"".join(f"{k}: {v}\r\n".encode() for k, v in headers) + b"\r\n")
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        fields = dict(line.split(": ", 1) for line in head[1:] if line)
        body = await reader.readexactly(int(fields.get("Content-Length", 0)))
        return int(head[0].split()[1]), fields, body
    finally:
        writer.close()


def _refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "teomq.web" and r.levelname == "WARNING"
            and r.getMessage().startswith("refused ")]


def test_a_websocket_is_accepted_only_from_the_ports_own_origins(arun: Any, tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """No Origin (no browser), the port's own origins and those given: 101; any other: 403 and a log line."""
    async def main() -> None:
        broker, gw = await started(tmp_path)
        await gw.close()
        gw = WebGateway(broker, port=0, origins=["http://app.example:3000", "https://secure.example/"])
        await gw.start()
        port = gw.port
        admitted = [[], [("Origin", f"http://127.0.0.1:{port}")], [("Origin", f"http://localhost:{port}")],
                    [("Origin", f"http://[::1]:{port}")], [("Origin", f"http://LocalHost:{port}")],
                    [("Origin", "http://app.example:3000")], [("Origin", "https://secure.example")],
                    [("Origin", "https://secure.example:443")]]
        for origin in admitted:
            status, _, _ = await raw_get(port, "/ws", [("Host", f"127.0.0.1:{port}"), *_UPGRADE, *origin])
            assert status == 101, origin
        foreign = [f"http://evil.example:{port}", f"http://127.0.0.1:{port + 1}", f"https://127.0.0.1:{port}",
                   "null", "http://app.example:3001", "http://app.example", "https://app.example:3000",
                   f"http://127.0.0.1.evil.example:{port}", f"http://127.0.0.1:{port}@evil.example", "garbage"]
        for origin in foreign:
            status, fields, body = await raw_get(port, "/ws", [("Host", f"127.0.0.1:{port}"), *_UPGRADE,
                                                               ("Origin", origin)])
            assert (status, fields["Content-Type"]) == (403, "text/plain; charset=utf-8"), origin
            assert body == b"forbidden: this origin may not open a WebSocket on this port\n"
            assert broker.address.encode() not in body
            line = _refusals(caplog)[-1]
            assert line.startswith(f"refused /ws from origin {origin!r} (peer 127.0.0.1:"), line
        # two Origin headers, one of them our own: refused too
        status, _, _ = await raw_get(port, "/ws", [("Host", f"127.0.0.1:{port}"), *_UPGRADE,
                                                   ("Origin", f"http://127.0.0.1:{port}"), ("Origin", "http://evil")])
        assert status == 403
        assert gw.stats()["forbidden"] == len(foreign) + 1 == len(_refusals(caplog))
        assert gw.stats()["sessions_total"] == len(admitted)
        # what the websockets client sees; an admitted page works
        with pytest.raises(websockets.InvalidStatus) as refused:
            await websockets.connect(f"ws://127.0.0.1:{port}/ws", origin=f"http://evil.example:{port}")
        assert refused.value.response.status_code == 403
        tab = Page(await websockets.connect(f"ws://localhost:{port}/ws", origin=f"http://localhost:{port}"),
                   broker.address)
        assert (await tab.send_to(1, "hello", "own origin")).data == b"Hello own origin"
        await stop(broker, gw, tab)

    arun(main())


def test_the_http_endpoints_answer_only_the_ports_own_hosts(arun: Any, tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """A DNS-rebinding page names its own host: every path but /ws checks Host; given origins' hosts
    count, and their pages may read the answers (CORS)."""
    async def main() -> None:
        broker, gw = await started(tmp_path)
        await gw.close()
        gw = WebGateway(broker, port=0, origins=["http://app.example:3000", "https://secure.example"])
        await gw.start()
        port = gw.port
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", f"LOCALHOST:{port}",
                     "app.example:3000", "secure.example", "secure.example:443"):
            status, _, body = await raw_get(port, "/info", [("Host", host)])
            assert status == 200 and json.loads(body)["address"] == broker.address, host
        refused = [[("Host", f"evil.example:{port}")], [("Host", "127.0.0.1")], [("Host", f"127.0.0.1:{port + 1}")],
                   [("Host", "app.example")], [("Host", f"127.0.0.1:{port}/x")], [],
                   [("Host", f"127.0.0.1:{port}"), ("Host", "evil.example")]]
        for headers in refused:
            for path in ("/info", "/stats", "/teomq.js", "/", "/examples/users_servers/", "/nothing"):
                status, _, body = await raw_get(port, path, headers)
                assert (status, body) == (403, b"forbidden: this host name is not one this port answers to\n"), \
                    (headers, path)
            line = _refusals(caplog)[-1]
            assert line.startswith("refused /nothing from Host ") and "(peer 127.0.0.1:" in line, line
        assert "Host 'evil.example:" in _refusals(caplog)[0] and "Host (none)" in "".join(_refusals(caplog))
        assert gw.stats()["forbidden"] == 6 * len(refused)
        # CORS: a page of a given origin may read; the port's own pages need nothing; others get nothing
        own = [("Host", f"127.0.0.1:{port}")]
        for origin, allowed in (("http://app.example:3000", "http://app.example:3000"),
                                (f"http://127.0.0.1:{port}", None), (f"http://evil.example:{port}", None)):
            for path in ("/info", "/teomq.js"):
                status, fields, _ = await raw_get(port, path, [*own, ("Origin", origin)])
                assert (status, fields.get("Access-Control-Allow-Origin")) == (200, allowed), (origin, path)
        await stop(broker, gw)

    arun(main())


def test_the_web_host_is_one_of_the_own_origins_and_star_allows_all(arun: Any, tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        broker = make_broker(tmp_path, commands=SCHEMA)
        await broker.start()
        gw = WebGateway(broker, host="127.0.0.2", port=0)
        await gw.start()
        own = f"127.0.0.2:{gw.port}"
        assert (await raw_get(gw.port, "/ws", [("Host", own), *_UPGRADE, ("Origin", f"http://{own}")],
                              host="127.0.0.2"))[0] == 101
        assert (await raw_get(gw.port, "/info", [("Host", own)], host="127.0.0.2"))[0] == 200
        assert (await raw_get(gw.port, "/info", [("Host", f"127.0.0.3:{gw.port}")], host="127.0.0.2"))[0] == 403
        assert not [r for r in caplog.records if "every origin" in r.getMessage()]
        await gw.close()

        gw = WebGateway(broker, port=0, origins=["*"])
        await gw.start()
        warnings = [r.getMessage() for r in caplog.records
                    if r.levelname == "WARNING" and "every origin" in r.getMessage()]
        assert warnings == [f"web port open to every origin (-web-origin *): any web page, from any site, opened in "
                            f"a browser that reaches port {gw.port} can read and send this broker's messages"]
        status, fields, _ = await raw_get(gw.port, "/info", [("Host", "rebound.example"),
                                                              ("Origin", "http://x.example")])
        assert status == 200 and fields["Access-Control-Allow-Origin"] == "http://x.example"
        tab = Page(await websockets.connect(f"ws://127.0.0.1:{gw.port}/ws", origin="http://x.example"), broker.address)
        assert (await tab.send_to(1, "hello", "anyone")).data == b"Hello anyone"
        assert gw.stats()["forbidden"] == 0
        await stop(broker, gw, tab)

    arun(main())


def test_bad_origins_are_refused_by_the_gateway() -> None:
    for bad in ("", "127.0.0.1:8094", "ftp://x", "http://", "http://x/path", "http://x?q", "http://u@x",
                "http://x:99999"):
        with pytest.raises(ValueError, match="bad web origin"):
            WebGateway(None, origins=[bad])  # type: ignore[arg-type]


def test_cli_web_origin_and_the_warnings_at_start(procs: ProcGroup) -> None:
    """Through the real CLI: -web-origin (repeatable, '*'), a bad one, and the no-authentication warnings."""
    quiet = procs.broker("-web-origin", "http://app.example:3000", "-web-origin", "https://secure.example")
    port = quiet.web_port
    with_origin = asyncio.run(_ws_status(port, "http://app.example:3000"))
    foreign = asyncio.run(_ws_status(port, "http://evil.example:3000"))
    assert (with_origin, foreign) == (101, 403)
    quiet.proc.wait_for_line(r"WARNING teomq\.web: refused /ws from origin 'http://evil\.example:3000' "
                             r"\(peer 127\.0\.0\.1:\d+\): ", stderr=True)
    assert not [line for line in quiet.proc.err_lines if "no authentication" in line or "every origin" in line]

    star = procs.broker("-web-origin", "*")
    star.proc.wait_for_line(r"WARNING teomq\.web: web port open to every origin \(-web-origin \*\)", stderr=True)
    assert asyncio.run(_ws_status(star.web_port, "http://evil.example:3000")) == 101

    bad = procs.start("broker", "-listen", ":0", "-web", ":0", "-web-origin", "ftp://x", label="bad")
    assert bad.wait() == 2
    assert any("bad web origin 'ftp://x'" in line for line in bad.err_lines), bad.describe()

    wide = procs.broker("-listen", "0.0.0.0:0", "-web", "0.0.0.0:0")
    for flag_name, port_of in (("-listen", wide.port), ("-web", wide.web_port)):
        wide.proc.wait_for_line(rf"WARNING teomq\.cli: {flag_name} 0\.0\.0\.0:{port_of} is reachable from other "
                                r"machines and there is no authentication yet", stderr=True)


async def _ws_status(port: int, origin: str) -> int:
    status, _, _ = await raw_get(port, "/ws", [("Host", f"127.0.0.1:{port}"), *_UPGRADE, ("Origin", origin)])
    return status


# -- the broker's control plane for a page's endpoints --------------------------------------------


def _broker_lines(caplog: pytest.LogCaptureFixture, level: str = "INFO") -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "teomq.broker" and r.levelname == level]


def test_a_pages_endpoints_are_logged_counted_and_served_broker_commands_as_a_clients(
        arun: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Connected, subscribed and disconnected lines with role and name; broker commands (hello,
    subscribe, unsubscribe, unknown names) answered or refused as for a TCP client."""
    caplog.set_level(logging.INFO, logger="teomq.broker")

    async def main() -> None:
        broker, gw = await started(tmp_path)
        base = broker.stats()["connections"]
        tab = await page(gw)
        await tab.call(0, tp.NEW_API_CLIENT, broker.address)
        assert (await tab.send_to(1, "msg", "Consumer")).data == b"OK"
        peer = next(iter(gw.sessions)).peer
        assert (broker.stats()["connections"], broker.stats()["consumers"]) == (base + 2, 1)
        assert f"producer web-1 connected from {peer}" in _broker_lines(caplog)
        assert f"consumer web-1 connected from {peer}" in _broker_lines(caplog)
        for _ in range(2):  # the second time: already subscribed, answered OK, not logged again
            assert (await tab.send_to(2, "msg", "subscribe/q")).data == b"OK"
        assert _broker_lines(caplog).count("consumer web-1 subscribed to q") == 1
        errors = broker.stats()["errors"]
        refused = [(3, "msg", "subscribe/hello", "'hello' is a broker command: nothing to subscribe"),
                   (4, "send", "subscribe/q", "only a consumer can subscribe: connect with role consumer or both"),
                   (5, "send", "nope/x", "command 'nope' not found"),
                   (6, "msg", "unsubscribe/nope", "command 'nope' not found")]
        for pid, api, payload, reason in refused:
            err = await tab.send_to(pid, api, payload)
            assert (err.id, err.error, err.data) == (pid, True, reason.encode()), err
        assert broker.stats()["errors"] == errors + len(refused)
        warnings = _broker_lines(caplog, "WARNING")
        for role, reason in (("consumer", refused[0][3]), ("producer", refused[1][3]), ("producer", refused[2][3]),
                             ("consumer", refused[3][3])):
            assert any(w.startswith(f"{role} web-1 ({peer}): message #") and w.endswith(f" refused: {reason}")
                       for w in warnings), (role, reason, warnings)
        assert (await tab.send_to(7, "send", "hello/you")).data == b"Hello you"
        assert (await tab.send_to(8, "hello", "me")).data == b"Hello me"
        # only msg's own subscribe/ and unsubscribe/ are the consumer's: nested, they are the producer's
        err = await tab.send_to(9, "msg", "msg/unsubscribe/q")
        assert err.data == b"only a consumer can unsubscribe: connect with role consumer or both"
        assert (await tab.send_to(10, "msg", "unsubscribe/q")).data == b"OK"
        assert "consumer web-1 unsubscribed from q" in _broker_lines(caplog)
        await tab.ws.close()
        await until(lambda: not gw.sessions, "the session to end")
        lines = _broker_lines(caplog)
        assert f"consumer web-1 ({peer}) disconnected" in lines and f"producer web-1 ({peer}) disconnected" in lines
        assert (broker.stats()["connections"], broker.stats()["consumers"]) == (base, 0)
        await stop(broker, gw)

    arun(main())


def _gated_consumer(broker: teomq.Broker, gate: asyncio.Event) -> teomq.Consumer:
    """A TCP consumer of ``q`` that holds what it gets until ``gate`` is set."""
    consumer = teomq.Consumer(spec(broker))

    @consumer.command("q")
    async def q(call: Any) -> str:
        await gate.wait()
        return f"got {call.data.decode()}"

    return consumer


@pytest.mark.parametrize("consuming", [False, True], ids=["producer-page", "consuming-page"])
def test_a_page_is_held_back_at_the_high_mark_and_served_after_it(
        arun: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture, consuming: bool) -> None:
    """At 3/4 of queue_max the page's producer side is held back like a TCP producer's: a page that
    only produces is no longer read, a consuming page's sends wait unaccepted in the broker; at the
    low mark they go on. Nothing is refused, every SendTo is answered."""
    caplog.set_level(logging.INFO, logger="teomq.broker")

    async def main() -> None:
        broker, gw = await started(tmp_path, queue_max=4)  # high mark 3
        gate = asyncio.Event()
        async with _gated_consumer(broker, gate):
            await until(lambda: broker.command_stats()[3]["subscribers"] == 1, "the TCP consumer")
            tab = await page(gw)
            if consuming:
                assert (await tab.send_to(1, "consume")).data == b"OK"  # subscribed to nothing
            for i in range(6):
                await tab.send(10 + i, tp.SEND_TO, f"{broker.address},q,{i}")
            await until(lambda: broker.stats()["backpressure"] == 1, "the high mark")
            if consuming:  # read on: the sends after the mark were handled, and wait in the broker
                assert (await tab.call(2, tp.CONNECT)).data == b"Connected to Teonet"
            s = broker.stats()
            assert (s["in"], s["inflight"], s["refused"]) == (3, 3, 0), s
            assert "messages held, queued or in flight (high mark): holding back 1 producers" in \
                " ".join(_broker_lines(caplog))
            gate.set()
            answers = [await tab.next(lambda p, pid=10 + i: p.id == pid, f"answer {i}") for i in range(6)]
        assert [(p.error, p.data) for p in answers] == [(False, f"got {i}".encode()) for i in range(6)]
        s = broker.stats()
        assert (s["in"], s["refused"], s["backpressure"]) == (6, 0, 0), s
        assert any("resuming 1 producers" in line for line in _broker_lines(caplog))
        await stop(broker, gw, tab)

    arun(main())


class Owner:
    """The owner of an InprocClient (what a web session is to it): what it was told, and its output."""

    def __init__(self) -> None:
        self.told: list[str] = []
        self.items: list[tuple[int, int, int, bytes]] = []

    def pause_reading(self) -> None:
        self.told.append("pause")

    def resume_reading(self) -> None:
        self.told.append("resume")

    def on_broker_close(self, client: Any) -> None:
        self.told.append("closed")

    def on_output(self, items: list[tuple[int, int, int, bytes]]) -> None:
        self.items.extend(items)


def test_an_inproc_client_is_held_back_and_let_go_with_the_producers(
        arun: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """InprocClient (teomq.broker): opened at the high mark it is held back at once; a producer's
    owner stops reading, a consumer's does not; its sends wait parked and are accepted after."""
    caplog.set_level(logging.INFO, logger="teomq.broker")

    async def main() -> None:
        broker, gw = await started(tmp_path, queue_max=4)
        await gw.close()
        gate = asyncio.Event()
        async with _gated_consumer(broker, gate):
            await until(lambda: broker.command_stats()[3]["subscribers"] == 1, "the TCP consumer")
            first = Owner()
            p1 = InprocClient.open(broker, first, first.on_output, role="producer", name="p1", peer="here")
            for i in range(3):
                p1.send(i + 1, f"q/{i}".encode())
            await until(lambda: broker.stats()["backpressure"] == 1, "the high mark")
            assert first.told == ["pause"] and p1.hold_sends
            second, third = Owner(), Owner()
            p2 = InprocClient.open(broker, second, second.on_output, role="producer", name="p2", peer="here")
            c = InprocClient.open(broker, third, third.on_output, role="consumer", name="c", peer="here",
                                  prefetch=70000)
            assert (p2.hold_sends, second.told, c.consumer, c.prefetch) == (True, ["pause"], True, 65535)
            assert third.told == []  # a consumer's owner reads on
            p2.send(7, b"q/parked")
            assert p2.parked_sends == 1 and broker.stats()["in"] == 3
            gate.set()
            await until(lambda: len(first.items) == 3 and len(second.items) == 1, "every answer")
            assert sorted(p for *_, p in first.items) == [b"got 0", b"got 1", b"got 2"]
            assert second.items == [(FrameType.REPLY, 0, 7, b"got parked")]
            assert (first.told, second.told, p1.hold_sends, p2.hold_sends) == (
                ["pause", "resume"], ["pause", "resume"], False, False)
        lines = _broker_lines(caplog)
        assert "producer p1 connected from here" in lines
        assert "consumer c connected from here (prefetch 70000 asked, 65535 granted: the broker's limit)" in lines
        for client in (p1, p2, c):
            client.close()
            client.close()  # idempotent
        assert [line for line in _broker_lines(caplog) if "(here) disconnected" in line] == [
            "producer p1 (here) disconnected", "producer p2 (here) disconnected", "consumer c (here) disconnected"]
        assert broker.stats()["connections"] == 0 and not broker._conns
        with pytest.raises(ValueError, match="unknown role"):
            InprocClient.open(broker, first, first.on_output, role="boss", name="x", peer="here")
        await broker.close()

    arun(main())


def test_a_broker_hook_that_fails_on_a_pages_message_closes_that_page_only(
        arun: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A bug of the broker's while it handles a page's message: as for a connection's frame, an
    INTERNAL error to the endpoint (a teomq.js page sees it), logged, counted, the page closed."""
    async def main() -> None:
        broker, gw = await started(tmp_path)
        tab, other = await page(gw), await page(gw)
        await tab.identify()
        assert (await tab.send_to(1, "hello", "first")).data == b"Hello first"

        def boom(conn: Any, msg_id: int, payload: bytes) -> None:
            if payload == b"q/boom":
                raise RuntimeError("a bug")

        assert broker._disp is not None
        broker._disp.on_message = boom
        await tab.send(2, tp.SEND_TO, f"{broker.address},q,boom")
        with pytest.raises(websockets.ConnectionClosed):
            while True:
                await tab.next(lambda p: False, "the socket to close")
        assert tab.ws.close_code == 1001
        assert tab.inbox == [tp.Packet(0, 0, b"the broker failed to handle a frame of this connection (logged at the "
                                             b"broker); closing", True)]
        assert broker.stats()["errors"] == 1
        assert any(r.levelname == "ERROR" and "internal error" in r.getMessage() and r.exc_info
                   for r in caplog.records if r.name == "teomq.broker")
        assert (await other.send_to(3, "hello", "still")).data == b"Hello still"
        await stop(broker, gw, other)

    arun(main())
