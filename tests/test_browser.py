"""The web consumer in a real browser: Playwright driving Debian's chromium against real processes.

The broker (``python -m teomq.examples.users_servers.broker``, its web port on ``:0``) and both
producers run through the real CLI; the browser opens the page the broker serves. The flows:

- ``/examples/users_servers/`` with ``/teomq.js``: connection state, live values, hello,
  the browser as a consumer in ``/stats``, and the consumer gone once the page is closed.
- the stock teoproxy client: an inline ES module speaking raw packets over a WebSocket of its
  own (no teomq.js), in the order of the original ``client.js``.
- a page that consumes with ``teomq.js``'s ``consume()``: it answers a queue command, and the
  message it holds when it is closed goes to a TCP consumer (REDELIVERED).
- the users_servers page and its CLI producers across a broker SIGKILL and restart: the page
  shows connected again and its values change again, nobody touching the producers.
- a page of another origin (a tiny HTTP server on another port): its WebSocket to the broker is
  refused (403) and it cannot read ``/info``, while the broker's own page works; a broker started
  with ``-web-origin`` for that origin lets it in, teomq.js imported from the broker included.

Neither Playwright nor chromium is optional here: if one is missing the tests FAIL (CI installs
both). The screenshot goes to ``test-output/`` at the repository root (``TEOMQ_TEST_OUTPUT``
moves it). Deadlines are hang guards for a loaded 2-core machine, not timing assertions.
"""

from __future__ import annotations

import http.client
import http.server
import json
import os
import re
import signal
import threading
import urllib.request
from collections.abc import Iterator
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
    broker = ex.broker(python_args=["-m", "teomq.examples.users_servers.broker"])
    for i, cmd in ((1, "num_servers"), (2, "num_players")):
        ex.start(f"-broker={broker.address}", f"-name=producer-{i}", f"-command={cmd}", "-delay=200000",
                 "-nomsg", label=f"producer-{i}", python_args=["-m", "teomq.examples.users_servers.producer"])
    return broker


def _stats(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=10) as response:
        return json.load(response)


def _closed_sessions(broker: BrokerProc, n: int = 1) -> dict[str, Any]:
    """Wait until the broker logged ``n`` WebSocket sessions as gone; then /stats.

    The gateway logs a session's end after its consumer left the broker (its held messages
    requeued), so the counters read after the line are those of after the close."""
    broker.proc.wait_until(lambda out, err: sum(1 for line in err if _SESSION_GONE.search(line)) >= n,
                           f"{n} web session(s) to end")
    return _stats(broker.web_port)


_SESSION_GONE = re.compile(r"INFO teomq\.web: web-\d+ \(web \S+\) disconnected")


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
        stats = _closed_sessions(broker)
        assert (stats["broker"]["consumers"], stats["gateway"]["sessions"], stats["gateway"]["consumers"]) == \
            (base, 0, 0), stats
    assert broker.proc.alive, broker.proc.describe()


#: The original client's flow in raw packets, written here independently of teomq.js. It runs
#: as an ES module in the page and leaves what it saw in ``window.teoproxy``.
PACKETS = """
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
"""

STOCK_CLIENT = PACKETS + """
const { url, broker } = window.teoproxyConfig;
const seen = (window.teoproxy = { answers: [], pushes: [], bad: [], done: false });
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
    assert _closed_sessions(broker)["gateway"]["sessions"] == 0


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
    stats = _closed_sessions(broker)["broker"]  # the closed page's message is back in the queue
    assert (stats["consumers"], stats["queue"]) == (0, 1), stats
    ex.start("consumer", f"-broker={broker.endpoint}", "-subscribe", "jobs", "-name", "c1", label="c1")
    held.wait_for_line(r"^p2 got answer: Answer to jobs/hold$")
    assert held.wait() == 0, held.describe()
    stats = _stats(port)["broker"]
    assert (stats["redelivered"], stats["inflight"], stats["queue"]) == (1, 0, 0), stats


# -- other origins -------------------------------------------------------------------------------

#: What a page of another site tries: read /info, open the broker's /ws, Connect and hello on it.
#: It leaves what happened in ``window.probe``.
PROBE = PACKETS + """
const { url, info, broker } = window.probeConfig;
const probe = (window.probe = { info: null, opened: false, closeCode: null, answers: [], done: false });
try {
  probe.info = (await (await fetch(info)).json()).address;
} catch (error) {
  probe.info = `error: ${error.name}`;  // TypeError: the browser would not let this page read it
}
const ws = new WebSocket(url);
const waiting = new Map();
ws.onmessage = (event) => {
  const p = unpack(event.data);
  probe.answers.push([p.id, p.cmd, p.data]);
  waiting.get(p.id)?.(p);
};
probe.opened = await new Promise((resolve) => {
  ws.onopen = () => resolve(true);
  ws.onclose = (event) => { probe.closeCode = event.code; resolve(false); };
});
const ask = (id, cmd, data) => new Promise((resolve) => { waiting.set(id, resolve); ws.send(pack(id, cmd, data)); });
if (probe.opened) {
  await ask(1, 1, "");
  await ask(2, 5, `${broker},hello,${location.origin}`);
  ws.close(1000);
}
probe.done = true;
"""

#: The same page with teomq.js imported from the broker (needs CORS) and the broker's address from its /info.
#: teomq.js says it is teomq.js at Connect, so a packet the gateway cannot read gets an error packet
#: (cmd 0) that reaches its onerror (it is sent on the client's own socket here, to have one).
TEOMQ_JS_PROBE = """
const { module, url } = window.probeConfig;
const { TeomqClient } = await import(module);
const mq = new TeomqClient({ url, reconnectDelay: 60000 });
await mq.connect();
window.teomqErrors = [];
mq.onerror = (error) => window.teomqErrors.push(error.message);
window.teomqAnswer = await mq.call("hello", "teomq.js elsewhere");
mq._ws.send("not base64!");
await mq.call("hello", "after");  // answered after the error packet: the socket keeps order
mq.close();
window.teomqDone = true;
"""

OTHER_PAGE = b"<!doctype html><meta charset=utf-8><title>another site</title><p>another site</p>"


@contextmanager
def _other_site() -> Iterator[int]:
    """A tiny HTTP server on another port (so another origin) serving one page; yields its port."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(OTHER_PAGE)))
            self.end_headers()
            self.wfile.write(OTHER_PAGE)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def _probe(browser: Any, page_url: str, web_port: int, address: str) -> dict[str, Any]:
    """Open ``page_url`` and run PROBE in it against the broker's web port."""
    page = browser.new_page()
    try:
        page.goto(page_url)
        page.evaluate("config => { window.probeConfig = config; }",
                      {"url": f"ws://127.0.0.1:{web_port}/ws", "info": f"http://127.0.0.1:{web_port}/info",
                       "broker": address})
        page.add_script_tag(type="module", content=PROBE)
        page.wait_for_function("() => window.probe && window.probe.done", timeout=PAGE_DEADLINE)
        return page.evaluate("() => window.probe")
    finally:
        page.close()


def _get_info(port: int, host: str) -> tuple[int, bytes]:
    """GET /info with ``Host: host`` (what a DNS-rebinding page's request carries)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest("GET", "/info", skip_host=True)
        conn.putheader("Host", host)
        conn.endheaders()
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_a_page_of_another_origin_is_refused_and_the_brokers_own_page_works(procs: ProcGroup) -> None:
    broker = procs.broker()
    port = broker.web_port
    with _other_site() as other, _chromium() as browser:
        foreign = _probe(browser, f"http://127.0.0.1:{other}/", port, broker.address)
        assert foreign["opened"] is False and foreign["closeCode"] == 1006, foreign  # the handshake failed
        assert foreign["answers"] == [] and foreign["info"] == "error: TypeError", foreign
        broker.proc.wait_for_line(rf"WARNING teomq\.web: refused /ws from origin 'http://127\.0\.0\.1:{other}' "
                                  r"\(peer 127\.0\.0\.1:\d+\)", stderr=True)
        own = _probe(browser, f"http://127.0.0.1:{port}/info", port, broker.address)
        assert own["opened"] is True and own["info"] == broker.address, own
        assert own["answers"] == [[1, 1, "Connected to Teonet"], [2, 5, f"Hello http://127.0.0.1:{port}"]], own
    # a DNS-rebinding page's requests name its own host: refused
    for host in (f"rebound.example:{port}", f"127.0.0.1:{other}"):
        status, body = _get_info(port, host)
        assert (status, body) == (403, b"forbidden: this host name is not one this port answers to\n"), host
    assert _get_info(port, f"localhost:{port}")[0] == 200
    gateway = _stats(port)["gateway"]
    assert (gateway["forbidden"], gateway["sessions_total"]) == (3, 1), gateway


def test_web_origin_admits_a_page_of_that_origin(procs: ProcGroup) -> None:
    with _other_site() as other, _chromium() as browser:
        origin = f"http://127.0.0.1:{other}"
        broker = procs.broker("-web-origin", origin)
        port = broker.web_port
        probe = _probe(browser, f"{origin}/", port, broker.address)
        assert probe["opened"] is True and probe["info"] == broker.address, probe
        assert probe["answers"] == [[1, 1, "Connected to Teonet"], [2, 5, f"Hello {origin}"]], probe
        # teomq.js imported from the broker by that page: the module, /info and /ws all let it in
        page = browser.new_page()
        problems = _watch(page)
        page.goto(f"{origin}/")
        page.evaluate("config => { window.probeConfig = config; }",
                      {"module": f"http://127.0.0.1:{port}/teomq.js", "url": f"ws://127.0.0.1:{port}/ws"})
        page.add_script_tag(type="module", content=TEOMQ_JS_PROBE)
        page.wait_for_function("() => window.teomqDone === true", timeout=PAGE_DEADLINE)
        assert page.evaluate("() => window.teomqAnswer") == "Hello teomq.js elsewhere"
        errors = page.evaluate("() => window.teomqErrors")
        assert len(errors) == 1 and errors[0].startswith("bad base64"), errors
        assert not problems, problems
        page.close()
    assert not [line for line in broker.proc.err_lines if "refused" in line], broker.proc.describe()
    assert _stats(port)["gateway"]["forbidden"] == 0


def test_the_page_and_its_producers_come_back_after_a_broker_restart(ex: ProcGroup, tmp_path: Path) -> None:
    """The users_servers page open in chromium and both example producers running as CLI
    processes: the broker is killed (SIGKILL) and started again on its data directory and ports.
    Nobody touches the producers or the page: it shows connected again and its values change
    again (the producers reconnected by themselves, and so did the page)."""
    data = tmp_path / "broker"
    broker = ex.broker(python_args=["-m", "teomq.examples.users_servers.broker"], data_dir=data)
    producers = [ex.start(f"-broker={broker.address}", f"-name=producer-{i}", f"-command={cmd}", "-delay=200000",
                          "-nomsg", label=f"producer-{i}", python_args=["-m", "teomq.examples.users_servers.producer"])
                 for i, cmd in ((1, "num_servers"), (2, "num_players"))]
    port = broker.web_port
    with _chromium() as browser:
        from playwright.sync_api import expect

        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{port}/examples/users_servers/")
        connection = page.locator("#connection")
        expect(connection).to_have_text("connected", timeout=PAGE_DEADLINE)
        for name in ("num_players", "num_servers"):
            expect(page.locator(f"#{name}")).to_have_text(VALUE_RE, timeout=PAGE_DEADLINE)
        assert broker.proc.kill9() == -signal.SIGKILL
        expect(connection).not_to_have_text("connected", timeout=PAGE_DEADLINE)
        # what the page shows when the broker came back is a value of after the restart
        before = {name: page.locator(f"#{name}").inner_text() for name in ("num_players", "num_servers")}
        again = ex.broker("-listen", f":{broker.port}", "-web", f":{port}",
                          python_args=["-m", "teomq.examples.users_servers.broker"], data_dir=data)
        assert again.address == broker.address
        expect(connection).to_have_text("connected", timeout=PAGE_DEADLINE)
        for name, first in before.items():
            # a few changes: one could be in flight at the kill; these come from the new broker
            for _ in range(3):
                page.wait_for_function(
                    "([id, first]) => { const t = document.getElementById(id).textContent;"
                    " return /^\\d+$/.test(t) && t !== first; }",
                    arg=[name, first], timeout=PAGE_DEADLINE)
                first = page.locator(f"#{name}").inner_text()
        page.close()
    for p in producers:
        assert p.alive, p.describe()
        assert any("again" in line for line in p.err_lines), p.describe()
