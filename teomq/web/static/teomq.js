/**
 * teomq.js: the browser client of the teomq web gateway (docs/gateway.md), an ES module.
 * Each WebSocket message is a text frame holding the standard base64 of one packet:
 *
 *     offset  size  field
 *     0       4     id        u32 little-endian, echoed in the answer; 0 in Stream pushes
 *     4       1     cmd       bits 0..6 the command; bit 7 set: an error, data is its reason
 *     5       n     data      bytes (UTF-8 text here)
 *     5+n     1     checksum  sum of bytes 0 .. 4+n, mod 256
 *
 * @example
 * const mq = new TeomqClient();  // ws(s)://<this host>/ws and the broker of GET /info
 * mq.stream("num_players", (data) => console.log(data));  // "num_players/42"
 * mq.subscribe("num_players");
 * await mq.connect();
 * await mq.call("hello", "web");  // "Hello web"
 */

/** The teoproxy commands: the cmd byte without the error bit. */
export const Command = Object.freeze({
  Push: 0, Connect: 1, Disconnect: 2, ConnectTo: 3, NewApiClient: 4, SendTo: 5, Stream: 6,
});

/** Bit 7 of the cmd byte: the packet is an error and its data is the reason. */
export const ERROR_BIT = 0x80;

/**
 * The data of our Connect packet. The gateway then sends this session error packets that answer
 * no request (id 0, cmd 0: a bad packet, a broker error) too; a stock teoproxy client, which
 * takes every cmd 0 packet for a Stream push, never gets those. (Connect has no data in teoproxy.)
 */
export const TEOMQ_JS = "teomq.js";

const utf8 = new TextEncoder();
const fromUtf8 = new TextDecoder();
const toBytes = (data) => (typeof data === "string" ? utf8.encode(data) : data);
const sum = (raw, end) => raw.subarray(0, end).reduce((s, b) => s + b, 0) & 0xff;

/**
 * Encode one packet as the text of a WebSocket message.
 * @param {number} id u32
 * @param {number} cmd 0..255, the error bit included
 * @param {string|Uint8Array} [data] text (sent as UTF-8) or bytes
 * @returns {string} standard base64, padded
 */
export function encodePacket(id, cmd, data = "") {
  const body = toBytes(data);
  const raw = new Uint8Array(body.length + 6);
  new DataView(raw.buffer).setUint32(0, id >>> 0, true);
  raw[4] = cmd;
  raw.set(body, 5);
  raw[raw.length - 1] = sum(raw, -1);
  let binary = "";
  for (let i = 0; i < raw.length; i += 0x8000) binary += String.fromCharCode(...raw.subarray(i, i + 0x8000));
  return btoa(binary);
}

/**
 * Decode and check the text of one WebSocket message.
 * @param {string} message base64 text
 * @returns {{id: number, cmd: number, error: boolean, data: string}} cmd without the error bit;
 *   error: bit 7 was set and data is the reason
 * @throws {Error} on bad base64, fewer than 6 bytes or a wrong checksum
 */
export function decodePacket(message) {
  const raw = Uint8Array.from(atob(message), (c) => c.charCodeAt(0));
  if (raw.length < 6) throw new Error(`not enough data: ${raw.length} bytes, a packet has at least 6`);
  if (sum(raw, -1) !== raw[raw.length - 1]) throw new Error("wrong checksum");
  const id = new DataView(raw.buffer).getUint32(0, true);
  return { id, cmd: raw[4] & 0x7f, error: (raw[4] & ERROR_BIT) !== 0, data: fromUtf8.decode(raw.subarray(5, -1)) };
}

/** A client of one broker through the gateway; it reconnects by itself and restores its streams. */
export class TeomqClient {
  /**
   * @param {object} [options]
   * @param {string} [options.url] the WebSocket URL; default ws(s)://<location.host>/ws
   * @param {string} [options.broker] the broker's address; default the `address` of GET /info
   * @param {number} [options.timeout] default call() timeout, ms (6000: the gateway's own 5 s comes first)
   * @param {number} [options.reconnectDelay] ms from a lost connection to the next try (1000)
   */
  constructor({ url, broker, timeout = 6000, reconnectDelay = 1000 } = {}) {
    this.url = url ?? `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`;
    this.broker = broker ?? null;
    this.timeout = timeout;
    this.reconnectDelay = reconnectDelay;
    /** @type {"connecting"|"connected"|"disconnected"} */
    this.state = "disconnected";
    /** @type {(state: string) => void} called on each change of `state` */
    this.onstate = () => {};
    /** @type {(error: Error) => void} error packets with id 0 (or an id no call waits for), failed connects */
    this.onerror = (error) => console.warn("teomq:", error.message);
    this._brokerFromInfo = broker == null;
    this._streams = new Map(); // name -> Set of callbacks
    this._subscriptions = new Set();
    this._consumer = false; // sent `msg Consumer` on this connection
    this._handler = null; // consume(): the answering mode
    this._pending = new Map(); // id -> {resolve, reject, timer}
    this._nextId = 0;
    this._ws = null;
    this._retry = null;
    this._closed = true;
  }

  /**
   * Connect (Connect with data TEOMQ_JS, ConnectTo, NewApiClient), then send the consumer mode, the streams and the
   * subscriptions again. A lost connection is tried again every `reconnectDelay` ms until close().
   * @returns {Promise<void>} resolves once connected; rejects only if close() comes first
   */
  connect() {
    if (this._closed) {
      this._closed = false;
      this._connected = new Promise((resolve, reject) => { this._settle = { resolve, reject }; });
      this._open();
    }
    return this._connected;
  }

  /**
   * Call an API of the broker (SendTo with a fresh id): `hello`, `msg`, `send`, a schema command...
   * @param {string} api
   * @param {string|Uint8Array} [data]
   * @param {{timeout?: number}} [options] in ms; default `this.timeout`
   * @returns {Promise<string>} the answer; rejects with Error(reason) on an error packet or timeout
   */
  call(api, data = "", { timeout = this.timeout } = {}) {
    const head = utf8.encode(`${this.broker},${api},`), body = toBytes(data);
    const payload = new Uint8Array(head.length + body.length);
    payload.set(head);
    payload.set(body, head.length);
    return this._request(Command.SendTo, payload, timeout, api);
  }

  /**
   * Stream the messages whose text before the first "/" is `name` to `callback(data, name)`;
   * `data` is the whole message text, e.g. "num_players/42". Sent again on each reconnect.
   * @param {string} name
   * @param {(data: string, name: string) => void} callback
   * @returns {Promise<string>} the gateway's (empty) answer, or "" while not connected
   */
  stream(name, callback) {
    const known = this._streams.has(name);
    this._streams.set(name, (this._streams.get(name) ?? new Set()).add(callback));
    return known || this.state !== "connected" ? Promise.resolve("") : this._stream(name);
  }

  /**
   * Subscribe to command `cmd` (SendTo msg subscribe/<cmd>, after msg Consumer the first time).
   * Sent again on each reconnect.
   * @param {string} cmd
   * @returns {Promise<string>} "OK" (also while not connected); rejects with the broker's error
   */
  async subscribe(cmd) {
    this._subscriptions.add(cmd);
    if (this.state !== "connected") return "OK";
    await this._declareConsumer();
    return this.call("msg", `subscribe/${cmd}`);
  }

  /** Unsubscribe from command `cmd` (SendTo msg unsubscribe/<cmd>). @param {string} cmd @returns {Promise<string>} */
  async unsubscribe(cmd) {
    this._subscriptions.delete(cmd);
    return this.state === "connected" ? this.call("msg", `unsubscribe/${cmd}`) : "OK";
  }

  /**
   * Consume and answer (SendTo consume): each message this page is subscribed to goes to
   * `handler(data, name)`; a string it returns (or resolves to) is sent back as the answer
   * (`answer <token>,<answer>`), anything else only acknowledges it (`ack <token>`).
   * Stream callbacks get nothing in this mode.
   * @param {(data: string, name: string) => (string|void|Promise<string|void>)} handler
   * @returns {Promise<string>} "OK" (also while not connected)
   */
  async consume(handler) {
    this._handler = handler;
    return this.state === "connected" ? this.call("consume") : "OK";
  }

  /** Close for good: no reconnect, waiting calls reject with Error("closed"). */
  close() {
    this._closed = true;
    clearTimeout(this._retry);
    this._retry = null;
    this._settle?.reject(new Error("closed")); // a no-op once connect() has resolved
    this._ws?.close(1000);
    this._ws = null;
    this._lost(new Error("closed"));
  }

  async _open() {
    this._setState("connecting");
    try {
      if (this._brokerFromInfo) {
        this.broker = (await (await fetch(new URL("/info", this.url.replace(/^ws/, "http")))).json()).address;
      }
      if (this._closed) return;
      const ws = (this._ws = new WebSocket(this.url));
      ws.onmessage = (e) => ws === this._ws && this._onMessage(e.data);
      ws.onclose = () => ws === this._ws && this._reconnect(new Error("disconnected"));
      await new Promise((resolve, reject) => {
        ws.onopen = resolve;
        ws.onerror = () => reject(new Error(`cannot connect to ${this.url}`));
      });
      await this._request(Command.Connect, TEOMQ_JS); // says it is teomq.js: error packets with cmd 0 are welcome
      await this._request(Command.ConnectTo, this.broker);
      await this._request(Command.NewApiClient, this.broker);
      this._consumer = false;
      if (this._handler) await this.call("consume");
      else if (this._subscriptions.size) await this._declareConsumer();
      for (const name of this._streams.keys()) await this._stream(name);
      for (const cmd of this._subscriptions) await this.call("msg", `subscribe/${cmd}`);
      this._setState("connected");
      this._settle.resolve();
    } catch (error) {
      if (this._closed || this._retry !== null) return; // closed, or the socket's close came first
      this.onerror(error);
      this._reconnect(error);
    }
  }

  _reconnect(error) {
    this._ws?.close();
    this._ws = null;
    this._lost(error);
    if (this._closed || this._retry !== null) return;
    this._retry = setTimeout(() => { this._retry = null; this._open(); }, this.reconnectDelay);
  }

  _lost(error) {
    for (const { reject, timer } of this._pending.values()) {
      clearTimeout(timer);
      reject(error);
    }
    this._pending.clear();
    this._setState("disconnected");
  }

  _setState(state) {
    if (state !== this.state) this.onstate((this.state = state));
  }

  async _declareConsumer() {
    if (!this._consumer && !this._handler) {
      this._consumer = true;
      await this.call("msg", "Consumer");
    }
  }

  _stream(name) {
    return this._request(Command.Stream, `${this.broker},${name}`);
  }

  _request(cmd, data = "", timeout = this.timeout, what = `command ${cmd}`) {
    const ws = this._ws;
    if (ws?.readyState !== WebSocket.OPEN) return Promise.reject(new Error("not connected"));
    const id = (this._nextId = (this._nextId % 0xffffffff) + 1);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this._pending.delete(id);
        reject(new Error(`timeout: no answer to ${what} in ${timeout} ms`));
      }, timeout);
      this._pending.set(id, { resolve, reject, timer });
      ws.send(encodePacket(id, cmd, data));
    });
  }

  _onMessage(message) {
    let p;
    try {
      p = decodePacket(message);
    } catch (error) {
      return this.onerror(new Error(`bad packet from the gateway: ${error.message}`));
    }
    if (p.cmd === Command.Push && !p.error) {
      const name = p.data.split("/", 1)[0];
      if (p.id === 0) this._streams.get(name)?.forEach((callback) => callback(p.data, name));
      else this._answerPush(p.id, p.data, name);
      return;
    }
    const waiting = this._pending.get(p.id); // none: id 0, a further answer of a fanout, or too late
    if (!waiting) return p.error && this.onerror(new Error(p.data));
    this._pending.delete(p.id);
    clearTimeout(waiting.timer);
    if (p.error) waiting.reject(new Error(p.data));
    else waiting.resolve(p.data);
  }

  async _answerPush(token, data, name) {
    const report = (error) => this.onerror(error);
    const answer = await Promise.resolve().then(() => this._handler?.(data, name)).catch(report);
    const reply = typeof answer === "string" ? this.call("answer", `${token},${answer}`) : this.call("ack", `${token}`);
    reply.catch(report);
  }
}
