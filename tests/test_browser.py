"""The web consumer in a real browser: Playwright driving Debian's chromium against real processes.

The broker (``python -m examples.users_servers.broker``, its web port on ``:0``) and both
producers run through the real CLI; the browser opens the page the broker serves. Three flows:

- ``/examples/users_servers/`` with ``/teomq.js``: connection state, live values, hello,
  the browser as a consumer in ``/stats``, and the consumer gone once the page is closed.
- the stock teoproxy client: an inline ES module speaking raw packets over a WebSocket of its
  own (no teomq.js), in the order of the original ``client.js``.
- a page that consumes with ``teomq.js``'s ``consume()``: it answers a queue command, and the
  message it holds when it is closed goes to a TCP consumer (REDELIVERED).

Neither Playwright nor chromium is optional here: if one is missing the tests FAIL (CI installs
both). The screenshot goes to ``test-output/`` at the repository root (``TEOMQ_TEST_OUTPUT``
moves it). Deadlines are hang guards for a loaded 2-core machine, not timing assertions.
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from procs import BrokerProc, ProcGroup

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
#: Hang guard (ms) for anything the page waits for.
PAGE_DEADLINE = 30_000
VALUE_RE = re.compile(r"^\d+$")


def _users_servers(ex: ProcGroup) -> BrokerProc:
    """The users_servers broker and its two producers (a value every 0.2 s each)."""
    broker = ex.broker(python_args=["-m", "examples.users_servers.broker"])
    for i, cmd in ((1, "num_servers"), (2, "num_players")):
        ex.start(f"-broker={broker.address}", f"-name=producer-{i}", f"-command={cmd}", "-delay=200000",
                 "-nomsg", label=f"producer-{i}", python_args=["-m", "examples.users_servers.producer"])
    return broker


def _stats(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=10) as response:
        return json.load(response)


def _wait_stats(port: int, pred: Callable[[dict[str, Any]], bool], what: str, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        stats = _stats(port)
        if pred(stats):
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout:g} s waiting for {what}; /stats: {stats}")
        time.sleep(0.2)


def _output_dir() -> Path:
    out = Path(os.environ.get("TEOMQ_TEST_OUTPUT") or REPO / "test-output")
    out.mkdir(parents=True, exist_ok=True)
    return out


@contextmanager
def _chromium() -> Iterator[Any]:
    """A headless chromium browser; the test fails (not skips) if Playwright or chromium is missing."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as e:
        pytest.fail(f"the browser tests need Playwright: pip install playwright ({e})", pytrace=False)
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"the browser tests need chromium at {CHROMIUM}: apt-get install chromium", pytrace=False)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def _watch(page: Any) -> list[str]:
    """The page's uncaught errors and console errors (but the browser's own favicon request)."""
    problems: list[str] = []

    def console(m: Any) -> None:
        if m.type == "error" and not m.location.get("url", "").endswith("/favicon.ico"):
            problems.append(f"console {m.type}: {m.text} ({m.location.get('url')})")

    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("console", console)
    return problems


def test_web_consumer_page(ex: ProcGroup) -> None:
    """The users_servers page: connected, live values, hello; a consumer until the page closes."""
    broker = _users_servers(ex)
    port = broker.web_port
    base = _stats(port)["broker"]["consumers"]
    with _chromium() as browser:
        from playwright.sync_api import expect

        context = browser.new_context(viewport={"width": 720, "height": 340})
        page = context.new_page()
        problems = _watch(page)
        page.goto(f"http://127.0.0.1:{port}/examples/users_servers/")

        connection = page.locator("#connection")
        expect(connection).to_have_text("connected", timeout=PAGE_DEADLINE)
        expect(connection).to_have_class("connected")
        for name in ("num_players", "num_servers"):
            value = page.locator(f"#{name}")
            expect(value).to_have_text(VALUE_RE, timeout=PAGE_DEADLINE)
            first = value.inner_text()
            assert 1 <= int(first) <= 100, (name, first)
            page.wait_for_function(
                "([id, first]) => { const t = document.getElementById(id).textContent;"
                " return /^\\d+$/.test(t) && t !== first; }",
                arg=[name, first], timeout=PAGE_DEADLINE)
            assert 1 <= int(value.inner_text()) <= 100, (name, value.inner_text())

        page.fill("#name", "playwright")
        page.click("#hello")
        expect(page.locator("#answer")).to_have_text("Hello playwright", timeout=PAGE_DEADLINE)

        stats = _stats(port)
        assert stats["gateway"]["sessions"] == 1, stats
        assert stats["gateway"]["consumers"] == 1, stats
        assert stats["broker"]["consumers"] == base + 1, stats
        subscribers = {c["name"]: c["subscribers"] for c in stats["commands"]}
        assert subscribers["num_players"] == subscribers["num_servers"] == 1, stats

        shot = _output_dir() / "web-consumer.png"
        page.screenshot(path=str(shot))
        print(f"screenshot: {shot}")
        assert not problems, problems

        page.close()
        context.close()
        _wait_stats(port, lambda s: s["broker"]["consumers"] == base and s["gateway"]["sessions"] == 0
                    and s["gateway"]["consumers"] == 0, "the page's consumer to go")
    assert broker.proc.alive, broker.proc.describe()


#: The original client's flow in raw packets, written here independently of teomq.js. It runs
#: as an ES module in the page and leaves what it saw in ``window.teoproxy``.
STOCK_CLIENT = """
const { url, broker } = window.teoproxyConfig;
const seen = (window.teoproxy = { answers: [], pushes: [], bad: [], done: false });
const utf8 = new TextEncoder(), text = new TextDecoder();

function pack(id, cmd, data) {
  const body = utf8.encode(data), buf = new Uint8Array(body.length + 6);
  for (let i = 0; i < 4; i++) buf[i] = (id >>> (8 * i)) & 0xff;
  buf[4] = cmd;
  buf.set(body, 5);
  buf[buf.length - 1] = buf.slice(0, -1).reduce((a, b) => (a + b) % 256, 0);
  return btoa(Array.from(buf, (b) => String.fromCharCode(b)).join(""));
}

function unpack(message) {
  const buf = Uint8Array.from(atob(message), (c) => c.charCodeAt(0));
  const sum = buf.slice(0, -1).reduce((a, b) => (a + b) % 256, 0);
  const id = (buf[0] | (buf[1] << 8) | (buf[2] << 16) | (buf[3] << 24)) >>> 0;
  return { id, cmd: buf[4], data: text.decode(buf.slice(5, -1)), ok: sum === buf[buf.length - 1] };
}

const ws = new WebSocket(url);
const waiting = new Map();
let lastId = 0;
const send = (cmd, data) => { ws.send(pack(++lastId, cmd, data)); return lastId; };
const ask = (cmd, data) => new Promise((resolve) => waiting.set(send(cmd, data), resolve));
ws.onmessage = (event) => {
  const p = unpack(event.data);
  if (!p.ok) seen.bad.push(event.data);
  if (p.id === 0 && p.cmd === 0) return void seen.pushes.push(p.data);
  seen.answers.push([p.id, p.cmd, p.data]);
  waiting.get(p.id)?.(p);
};
await new Promise((resolve) => { ws.onopen = resolve; });
await ask(1, "");                          // Connect
await ask(3, broker);                      // ConnectTo
await ask(4, broker);                      // NewApiClient
send(5, `${broker},msg,Consumer`);         // then, as client.js does, without waiting:
send(6, `${broker},num_players`);          // Stream
send(5, `${broker},msg,subscribe/num_players`);
while (seen.pushes.length < 3) await new Promise((resolve) => setTimeout(resolve, 100));
await ask(5, `${broker},hello,teoproxy`);  // the button
seen.done = true;
"""


def test_stock_teoproxy_client(ex: ProcGroup) -> None:
    """Raw teoproxy packets from the page, in client.js's order: answers, pushes and hello."""
    broker = _users_servers(ex)
    port = broker.web_port
    with _chromium() as browser:
        page = browser.new_page()
        problems = _watch(page)
        page.goto(f"http://127.0.0.1:{port}/info")  # this origin, and no client of its own
        page.evaluate("config => { window.teoproxyConfig = config; }",
                      {"url": f"ws://127.0.0.1:{port}/ws", "broker": broker.address})
        page.add_script_tag(type="module", content=STOCK_CLIENT)
        try:
            page.wait_for_function("() => window.teoproxy && window.teoproxy.done", timeout=PAGE_DEADLINE)
        finally:
            seen = page.evaluate("() => window.teoproxy")
        a = broker.address
        assert seen["answers"] == [
            [1, 1, "Connected to Teonet"],
            [2, 3, f"connected to peer {a}"],
            [3, 4, f"connected to peer {a} api"],
            [4, 5, "OK"],
            [5, 6, ""],
            [6, 5, "OK"],
            [7, 5, "Hello teoproxy"],
        ], seen
        assert not seen["bad"], seen
        assert len(seen["pushes"]) >= 3, seen
        for push in seen["pushes"]:  # only what it streams and subscribed to
            m = re.fullmatch(r"num_players/(\d+)", push)
            assert m and 1 <= int(m.group(1)) <= 100, seen
        gateway = _stats(port)["gateway"]
        assert gateway["sessions"] == 1 and gateway["consumers"] == 1, gateway
        assert gateway["bad_packets"] == 0, gateway
        assert not problems, problems
        page.close()
    _wait_stats(port, lambda s: s["gateway"]["sessions"] == 0, "the socket to close")


#: A page that consumes with teomq.js and answers only what ends in "/answer"; it holds the rest.
ANSWERING_PAGE = """
import { TeomqClient } from "/teomq.js";
const mq = new TeomqClient();
window.got = [];
mq.consume((data) => {
  window.got.push(data);
  return data.endsWith("/answer") ? `browser saw ${data}` : new Promise(() => {});  // held, never answered
});
mq.subscribe("jobs");
await mq.connect();
window.ready = true;
"""


def test_an_answering_page_answers_and_its_held_message_is_redelivered_when_it_closes(ex: ProcGroup) -> None:
    """teomq.js consume(): the page answers a queue command; what it holds goes to a TCP consumer after it closes."""
    broker = ex.broker("-command", "jobs:queue")
    port = broker.web_port
    with _chromium() as browser:
        page = browser.new_page()
        problems = _watch(page)
        page.goto(f"http://127.0.0.1:{port}/info")  # this origin
        page.add_script_tag(type="module", content=ANSWERING_PAGE)
        page.wait_for_function("() => window.ready === true", timeout=PAGE_DEADLINE)
        answered = ex.start("producer", f"-broker={broker.endpoint}", "-message", "jobs/answer", "-count", "1",
                            "-name", "p1", label="p1")
        answered.wait_for_line(r"^p1 got answer: browser saw jobs/answer$")
        assert answered.wait() == 0, answered.describe()
        held = ex.start("producer", f"-broker={broker.endpoint}", "-message", "jobs/hold", "-count", "1",
                        "-timeout", "60", "-name", "p2", label="p2")
        page.wait_for_function("() => window.got.includes('jobs/hold')", timeout=PAGE_DEADLINE)
        stats = _stats(port)["broker"]
        assert (stats["inflight"], stats["consumers"]) == (1, 1), stats
        assert not problems, problems
        page.close()
    _wait_stats(port, lambda s: s["broker"]["consumers"] == 0 and s["broker"]["queue"] == 1,
                "the closed page's message back in the queue")
    ex.start("consumer", f"-broker={broker.endpoint}", "-subscribe", "jobs", "-name", "c1", label="c1")
    held.wait_for_line(r"^p2 got answer: Answer to jobs/hold$")
    assert held.wait() == 0, held.describe()
    stats = _stats(port)["broker"]
    assert (stats["redelivered"], stats["inflight"], stats["queue"]) == (1, 0, 0), stats
