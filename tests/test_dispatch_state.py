"""The compiled Dispatcher itself, under hypothesis state machines, against a small model.

No event loop and no socket: each connection is a small ``CoreConnection`` subclass whose
transport decodes what the core writes (``FrameDecoder``); frames reach the core through its
real read path (``get_buffer``/``buffer_updated``), in one read or split in two. The model
knows only what must be true, and is checked after every step:

- a message is held by at most one consumer at a time (basic scheme, queue commands);
- nothing accepted is lost: every message is queued, in flight or answered, also after a
  consumer leaves (what it held is requeued to the head, in order, flagged REDELIVERED);
- fresh messages go out in the order they were accepted;
- at most one REPLY per producer message (fanout: one per answered copy), and only when
  neither NO_REPLY nor NO_ANSWER was set and the producer is still connected;
- a consumer never holds more deliveries than its prefetch;
- ``queued + in flight`` (fanout copies excepted) never exceeds ``queue_max``, and a SEND
  past it gets QUEUE_FULL;
- ``Dispatcher.stats()`` (and ``route_stats()``) agree with the model.

``BasicMachine`` runs the basic scheme, with the flush either inline (``scheduler=None``) or
deferred to a list this test flushes itself (a DELIVER may then still be unwritten when its
consumer goes), and producing connections held back (``hold_sends``: SENDs, and PINGs after
them, parked and accepted in order on release) either by hand or as ``Broker`` does at the
high mark. ``CommandMachine`` runs the command scheme (queue and fanout commands,
subscribe/unsubscribe, msg/ and API frames, slow fanout subscribers), flushed inline.

A failure prints the falsifying steps; replay them by calling the machine's methods in order.

``BasicMachine`` also runs the clock (``Dispatcher.tick(now)``) with or without a lease: a
delivery unanswered for the lease goes back to the head of the queue, flagged REDELIVERED, and
its consumer gets that credit back only with a later (refused) answer for it, and its free
credit is withheld (no new delivery) until it answers something.
"""

from __future__ import annotations

from collections import Counter, defaultdict, deque

import msgpack
from hypothesis import HealthCheck, Phase, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from teomq._core.command_parser import CommandTable
from teomq._core.connection import CoreConnection
from teomq._core.dispatch import CMD_UNKNOWN, CMD_UNKNOWN_API, Dispatcher
from teomq._core.frame_codec import FrameDecoder, encode_frame
from teomq._core.routes import KINDS
from teomq.errors import ProtocolError
from teomq.protocol import ApiCommand, ErrorCode, Flag, FrameType

ROLES = ("producer", "consumer", "both")
MAX_LIVE = 6
REDELIVERED = int(Flag.REDELIVERED)
SUB, UNSUB, HELLO_CMD = KINDS["subscribe"], KINDS["unsubscribe"], KINDS["hello"]
GARBAGE = b"GET / HTTP/1.0\r\n"

# no explain phase: it traces every line of a failing run again, minutes for a machine
SETTINGS = settings(max_examples=500, stateful_step_count=40, deadline=None,
                    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
                    suppress_health_check=[HealthCheck.too_slow])

picks = st.integers(0, 1 << 16)
queue_maxes = st.integers(5, 12) | st.integers(5, 50)  # small ones often: the bound is reached
first_conns = st.lists(st.tuples(st.sampled_from(ROLES), st.integers(1, 8)), min_size=1, max_size=3)
splits = st.none() | st.integers(0, 1 << 16)


class FakeTransport:
    """Stands in for the socket's transport: decodes every write into frames."""

    def __init__(self) -> None:
        self.decoder = FrameDecoder(1 << 20)
        self.frames: list[tuple[int, int, int, bytes]] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.frames.extend(self.decoder.feed(data))

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def get_extra_info(self, name: str, default=None):
        return default

    def take(self) -> list[tuple[int, int, int, bytes]]:
        frames, self.frames = self.frames, []
        return frames


def error_payload(code: int, reason: str) -> bytes:
    return msgpack.packb({"code": int(code), "reason": reason})


class FakeConn(CoreConnection):
    """A connection without a socket: the control-plane hooks as BrokerConnection has them."""

    def __init__(self, disp: Dispatcher, cid: int, auto_hold: bool = False) -> None:
        self.dispatcher = disp
        self.cid = cid
        self.auto_hold = auto_hold
        self.transport = FakeTransport()
        self.set_writer(None)  # no socket: every byte through the fake transport
        self.commands: list[tuple[int, int, bytes]] = []  # on_command calls: (kind, id, data)
        self.client_errors: list[bytes] = []
        self.protocol_errors: list[int] = []
        self.internal_errors: list[BaseException] = []

    def on_control(self, ftype, flags, fid, payload):
        if ftype == FrameType.HELLO:
            hello = msgpack.unpackb(payload)
            self.send_frame(FrameType.WELCOME, 0, fid, msgpack.packb({"v": 1}))
            self.accept_hello(hello["role"] != "producer", hello["prefetch"])
            self.producing = hello["role"] != "consumer"
            if self.auto_hold and self.producing and self.dispatcher.backpressure:
                self.hold_sends = True  # as Broker: a producer that comes meanwhile is held back too
        elif ftype == FrameType.ERROR:
            self.client_errors.append(payload)
        else:
            raise ProtocolError(ErrorCode.HANDSHAKE, "expected HELLO")

    def on_command(self, kind, fid, flags, data):
        self.commands.append((kind, fid, data))
        if kind == HELLO_CMD:
            self._reply(fid, flags, b"Hello " + data)
        elif kind in (SUB, UNSUB):
            if not self.consumer:
                self._refuse(fid, ErrorCode.NOT_ALLOWED)
                return
            disp = self.dispatcher
            status = disp.subscribe(self, data) if kind == SUB else disp.unsubscribe(self, data)
            if status == -1:
                self._refuse(fid, ErrorCode.UNKNOWN_COMMAND)
            elif status == -2:
                self._refuse(fid, ErrorCode.NOT_ALLOWED)
            else:
                self._reply(fid, flags, b"OK")
                if status == 0:
                    disp.pump_now()
        elif kind in (CMD_UNKNOWN, CMD_UNKNOWN_API):
            self._refuse(fid, ErrorCode.UNKNOWN_COMMAND)
        else:
            raise AssertionError(f"unexpected command kind {kind}")

    def _reply(self, fid, flags, answer):
        if not flags & Flag.NO_REPLY:
            self.send_frame(FrameType.REPLY, 0, fid, answer)

    def _refuse(self, fid, code):
        self.send_frame(FrameType.ERROR, 0, fid, error_payload(code, "refused"))

    def on_internal_error(self, exc):
        # a hook raised (an assertion of this test among them): the core closes the connection
        self.internal_errors.append(exc)
        self.detach()

    def on_protocol_error(self, exc):
        # as BrokerConnection._close_with_error: pending output, the ERROR, requeue, close
        self.protocol_errors.append(exc.code)
        self.flush_now()
        self.transport.write(encode_frame(FrameType.ERROR, 0, 0, error_payload(exc.code, exc.reason)))
        self.detach()
        self.transport.close()


class Msg:
    """An accepted message, as the model knows it."""

    __slots__ = ("key", "producer", "mid", "no_reply", "seq", "route", "fanout", "requeued",
                 "maybe", "done")

    def __init__(self, key, producer, mid, no_reply, seq, route=None, fanout=False):
        self.key, self.producer, self.mid, self.no_reply, self.seq = key, producer, mid, no_reply, seq
        self.route, self.fanout = route, fanout
        self.requeued = False   # an earlier delivery went back to the queue: REDELIVERED from now on
        self.maybe = False      # may have been requeued unseen (its DELIVER was never written)
        self.done = False


class Conn:
    """The model of one connection."""

    def __init__(self, cid: int, conn: FakeConn, role: str, prefetch: int) -> None:
        self.cid, self.conn, self.role = cid, conn, role
        self.consumer = role != "producer"
        self.producing = role != "consumer"
        self.prefetch = prefetch if self.consumer else 0
        self.alive = True
        self.welcomed = False
        self.held: dict[int, tuple[int, bool]] = {}  # delivery id -> (key, fanout copy), in order
        self.hold = False
        self.parked: list[tuple] = []
        self.n_refused = 0
        self.subs: set[bytes] = set()
        self.backlog: deque[int] = deque()   # fanout copies waiting for credit
        self.owed: deque[int] = deque()      # fanout copies the current step must deliver
        self.copies: set[int] = set()        # fanout messages it got a copy of (one each)
        self.slow = False
        self.client_errors = 0
        self.lapsed = 0                      # deliveries whose lease expired, credit not back yet
        self.withheld = 0                    # free credit taken at an expiry, back at its next answer
        self.when: dict[int, float] = {}     # delivery id -> the clock when it was delivered


def _key_of(payload: bytes) -> int:
    return int(payload.rsplit(b"k", 1)[1])


class DispatchMachine(RuleBasedStateMachine):
    """What both machines share: connections, feeding, frame checks, counters."""

    def _setup(self, queue_max: int, deferred: bool, auto_hold: bool = False, **kw) -> None:
        self.queue_max = queue_max
        self.deferred = deferred
        self.auto_hold = auto_hold  # hold producing connections back at the high mark, as Broker does
        self.to_release: set[int] = set()
        self.pending: list = []
        self.disp = d = Dispatcher(queue_max=queue_max,
                                   scheduler=self.pending.append if deferred else None, **kw)
        self.seen_msgs: list = []
        self.exp_msgs: list = []
        d.on_message = lambda conn, mid, payload: self.seen_msgs.append((conn.cid, mid, payload))
        self.bp = False
        self.bp_calls: list[bool] = []
        self.exp_bp: list[bool] = []
        d.on_backpressure = self._on_backpressure
        self.refused_calls = 0
        d.on_refused = self._on_refused
        self.conns: dict[int, Conn] = {}
        self.next_cid = 0
        self.next_mid = 1
        self.seq = 0
        self.msgs: dict[int, Msg] = {}
        self.exp_replies: dict[tuple[int, int], list[bytes]] = defaultdict(list)
        self.exp_errors: Counter = Counter()
        self.exp_pongs: Counter = Counter()
        self.exp_commands: dict[int, list] = defaultdict(list)
        self.reply_count: Counter = Counter()
        self.live_dids: set[int] = set()
        self.stale_dids: list[int] = []
        self.n_in = self.n_answered = self.n_orphaned = self.n_redelivered = 0
        self.n_refused = self.n_unknown_answers = self.n_dropped = self.n_unknown_commands = 0
        self.n_out_seen = 0   # DELIVERs written and decoded
        self.n_out_lost = 0   # DELIVERs made but dropped unwritten with their consumer
        self.n_parked = self.n_parked_pings = 0
        self.clock = 0.0      # the core's clock: moved only by tick()
        self.n_expired = 0

    def teardown(self) -> None:
        # what a run reached (pytest --hypothesis-show-statistics)
        if getattr(self, "disp", None) is None:
            return
        s = self.disp.stats()
        for name in ("refused", "redelivered", "orphaned", "unknown_answers", "dropped", "backlog"):
            if s[name]:
                event(f"{name} > 0")
        if self.exp_bp:
            event("back-pressure reached")
        if self.n_out_lost:
            event("DELIVERs dropped unwritten")
        if self.n_parked:
            event("SENDs parked")
        if self.n_parked_pings:
            event("PINGs parked")

    def _on_backpressure(self, on: bool) -> None:
        self.bp_calls.append(on)
        if self.auto_hold:  # as Broker.hold_back: every producing connection; let go later
            for cm in self.conns.values():
                c = cm.conn
                if cm.producing and not c.detached and c.handshaken:
                    c.hold_sends = on

    def _on_refused(self) -> None:
        self.refused_calls += 1

    # -- helpers -------------------------------------------------------------------------------

    def live(self) -> list[Conn]:
        return [c for c in self.conns.values() if c.alive]

    def _pick(self, conns: list[Conn], pick: int) -> Conn:
        return conns[pick % len(conns)]

    def _mid(self) -> int:
        mid = self.next_mid
        self.next_mid += 1
        return mid

    def quiescent(self) -> bool:
        """Everything the core produced has been written and seen."""
        return not self.pending

    def _flush_all(self) -> None:
        while self.pending:
            self.pending.pop(0)()

    def _feed(self, cm: Conn, frames: list[tuple[bytes, object]], split: int | None = None) -> None:
        """Frames into the core's read path (one read, or two); the model of each frame runs
        as its read completes it, the model of the pump after every read."""
        data = b"".join(f for f, _ in frames)
        ends = []
        total = 0
        for f, _ in frames:
            total += len(f)
            ends.append(total)
        cuts = [len(data)]
        if split is not None and len(data) > 1:
            cuts = [1 + split % (len(data) - 1), len(data)]
        start = i = 0
        for end in cuts:
            while i < len(frames) and ends[i] <= end:
                frames[i][1]()
                i += 1
            n = end - start
            cm.conn.get_buffer(n)[:n] = data[start:end]
            cm.conn.buffer_updated(n)
            self.observe()
            self._model_pump()
            start = end

    def _model_pump(self) -> None:
        """Back-pressure ends at the low mark, or when at most the low mark waits in queues and
        at most the midpoint of the marks is held (consumers sit on the rest)."""
        d = self.disp
        held = self.held()
        if self.bp and (held <= d.queue_low or (self.queued() <= d.queue_low and held <= d.queue_mid)):
            self.bp = False
            self.exp_bp.append(False)
            if self.auto_hold:
                for cm in self.live():
                    if cm.producing:
                        cm.hold = False
                        if cm.parked:
                            self.to_release.add(cm.cid)

    def _model_accepted(self) -> None:
        if not self.bp and self.held() >= self.disp.queue_high:
            self.bp = True
            self.exp_bp.append(True)
            if self.auto_hold:
                for cm in self.live():
                    if cm.producing:
                        cm.hold = True

    def _end(self) -> None:
        """The end of a step: see what was written; what the loop would run next runs."""
        self.observe()
        self._release()

    def _release(self) -> None:
        """What the control plane does after the loop pass in which back-pressure ended."""
        while self.to_release:
            cm = self.conns[min(self.to_release)]
            self.to_release.discard(cm.cid)
            if cm.alive and not cm.hold and cm.parked:
                self._model_release(cm)
                cm.conn.release_sends()
                self.observe()
                self._model_pump()

    def _model_release(self, cm: Conn) -> None:
        while cm.parked and not cm.hold:
            item = cm.parked.pop(0)
            if item[0] == "ping":
                self.exp_pongs[(cm.cid, item[1], item[2])] += 1
            else:
                self._model_accept(cm, *item)

    def _refuse(self, cm: Conn, mid: int) -> None:
        self.n_refused += 1
        cm.n_refused += 1
        self.exp_errors[(cm.cid, ErrorCode.QUEUE_FULL, mid)] += 1

    def _forget(self, cm: Conn) -> None:
        """cm is gone: what it was still owed is dropped with its output."""
        cm.alive = False
        for k in [k for k in self.exp_replies if k[0] == cm.cid]:
            del self.exp_replies[k]
        for counter in (self.exp_errors, self.exp_pongs):
            for k in [k for k in counter if k[0] == cm.cid]:
                del counter[k]
        for did in cm.held:
            self.live_dids.discard(did)
            self.stale_dids.append(did)
        cm.held = {}
        cm.parked = []

    def _expect_reply(self, cm_cid: int, mid: int, payload: bytes) -> None:
        self.exp_replies[(cm_cid, mid)].append(payload)

    def _relay(self, m: Msg, no_answer: bool, answer: bytes) -> None:
        """The model of an answer's way back to the producer."""
        if m.no_reply or no_answer:
            return
        if self.conns[m.producer].alive:
            self.n_answered += 1
            self._expect_reply(m.producer, m.mid, answer)
        else:
            self.n_orphaned += 1

    def _connect(self, role: str, prefetch: int, split: int | None) -> Conn:
        cid = self.next_cid
        self.next_cid += 1
        conn = FakeConn(self.disp, cid, self.auto_hold)
        cm = Conn(cid, conn, role, prefetch)
        cm.hold = self.auto_hold and self.bp and cm.producing
        self.conns[cid] = cm
        hello = encode_frame(FrameType.HELLO, 0, 7, msgpack.packb(
            {"v": 1, "role": role, "prefetch": cm.prefetch}))
        self._feed(cm, [(hello, lambda: None)], split)
        return cm

    def _answer_frames(self, cm: Conn, picks_: list[tuple[int, bool]]) -> list:
        frames = []
        dids = list(cm.held)
        chosen = []
        for p, no_answer in picks_:
            did = dids[p % len(dids)]
            if did not in chosen:
                chosen.append(did)
                payload = b"a%d-%d" % (cm.held[did][0], cm.cid)
                flags = Flag.NO_ANSWER if no_answer else 0
                frames.append((encode_frame(FrameType.ANSWER, flags, did, payload),
                               lambda did=did, na=no_answer, pl=payload: self._model_answer(cm, did, na, pl)))
        return frames

    def _bad_did(self, cm: Conn, how: str, x: int, hi: int) -> int:
        others = [d for c in self.live() if c is not cm for d in c.held]
        if how == "stale" and self.stale_dids:
            return self.stale_dids[x % len(self.stale_dids)]
        if how == "other" and others:
            return others[x % len(others)]
        if hi:  # an index past any in-flight table, any generation
            return (hi << 32) | ((1 << 30) + x % (1 << 30))
        return x % (1 << 32)  # generation 0: never given out

    # -- what the core wrote --------------------------------------------------------------

    def observe(self, only: Conn | None = None) -> None:
        batch: dict[int, list[tuple[int, int, int]]] = {}
        for cm in ([only] if only is not None else self.conns.values()):
            frames = cm.conn.transport.take()
            if frames:
                assert cm.alive, f"conn {cm.cid} got {frames} after it was gone"
            for ftype, flags, fid, payload in frames:
                if not cm.welcomed:
                    assert ftype == FrameType.WELCOME, f"first frame to conn {cm.cid}: type {ftype}"
                    cm.welcomed = True
                    continue
                if ftype == FrameType.DELIVER:
                    assert cm.consumer, f"DELIVER to producer-only conn {cm.cid}"
                    batch.setdefault(cm.cid, []).append((flags, fid, _key_of(payload)))
                elif ftype == FrameType.REPLY:
                    self._on_reply(cm, fid, payload)
                elif ftype == FrameType.ERROR:
                    code = msgpack.unpackb(payload)["code"]
                    key = (cm.cid, code, fid)
                    assert self.exp_errors[key] > 0, f"unexpected ERROR {ErrorCode(code).name} id {fid} to {cm.cid}"
                    self.exp_errors[key] -= 1
                elif ftype == FrameType.PONG:
                    key = (cm.cid, fid, payload)
                    assert self.exp_pongs[key] > 0, f"unexpected PONG {key}"
                    self.exp_pongs[key] -= 1
                else:
                    raise AssertionError(f"unexpected frame type {ftype} to conn {cm.cid}")
        self._deliveries(batch, partial=only is not None)

    def _on_reply(self, cm: Conn, mid: int, payload: bytes) -> None:
        key = (cm.cid, mid)
        self.reply_count[key] += 1
        m = self.msgs.get(mid)
        if m is None or not m.fanout:
            assert self.reply_count[key] <= 1, f"second REPLY to producer message {key}"
        expected = self.exp_replies.get(key)
        assert expected and payload in expected, f"unexpected REPLY {key} {payload!r} (expected {expected})"
        expected.remove(payload)

    def _deliveries(self, batch, partial: bool) -> None:
        raise NotImplementedError

    # -- rules both machines have ------------------------------------------------------

    @precondition(lambda self: len(self.live()) < MAX_LIVE)
    @rule(role=st.sampled_from(ROLES), prefetch=st.integers(1, 8), split=splits)
    def connect(self, role, prefetch, split):
        self._connect(role, prefetch, split)
        self._end()

    @precondition(lambda self: any(c.held for c in self.live()))
    @rule(pick=picks, answers=st.lists(st.tuples(picks, st.booleans()), min_size=1, max_size=3),
          split=splits)
    def answer(self, pick, answers, split):
        cm = self._pick([c for c in self.live() if c.held], pick)
        self._feed(cm, self._answer_frames(cm, answers), split)
        self._end()

    @precondition(lambda self: self.live())
    @rule(pick=picks, how=st.sampled_from(["stale", "other", "forged"]), x=picks,
          hi=st.integers(0, (1 << 32) - 1) | st.just(0))
    def answer_unknown(self, pick, how, x, hi):
        """A stale or forged delivery id: ERROR UNKNOWN_ID, the connection stays."""
        cm = self._pick(self.live(), pick)
        did = self._bad_did(cm, how, x, hi)
        assert did not in cm.held

        def model():
            self.n_unknown_answers += 1
            self.exp_errors[(cm.cid, ErrorCode.UNKNOWN_ID, did)] += 1
            cm.withheld = 0  # any answer ends the lapse
            if cm.lapsed:  # a late answer for an expired delivery: its credit comes back
                cm.lapsed -= 1

        self._feed(cm, [(encode_frame(FrameType.ANSWER, 0, did, b"late"), model)])
        self._end()

    @precondition(lambda self: self.live())
    @rule(pick=picks, ftype=st.sampled_from([FrameType.PING, FrameType.PONG, FrameType.ERROR,
                                             FrameType.WELCOME, FrameType.DELIVER, FrameType.REPLY,
                                             FrameType.FLOW]),
          fid=st.integers(0, (1 << 64) - 1), payload=st.binary(max_size=8))
    def other_frame(self, pick, ftype, fid, payload):
        """PING is answered in order; a client's ERROR goes to the control plane; frames only a
        broker sends get NOT_ALLOWED; the connection stays either way."""
        cm = self._pick(self.live(), pick)

        def model():
            if ftype == FrameType.PING and cm.parked:  # its PONG waits for the SENDs before it
                cm.parked.append(("ping", fid, payload))
                self.n_parked_pings += 1
            elif ftype == FrameType.PING:
                self.exp_pongs[(cm.cid, fid, payload)] += 1
            elif ftype == FrameType.ERROR:
                cm.client_errors += 1
            elif ftype != FrameType.PONG:
                self.exp_errors[(cm.cid, ErrorCode.NOT_ALLOWED, fid)] += 1

        self._feed(cm, [(encode_frame(ftype, 0, fid, payload), model)])
        assert len(cm.conn.client_errors) == cm.client_errors
        assert not cm.conn.detached
        self._end()

    # -- checks ---------------------------------------------------------------------------

    def _check_common(self, s: dict) -> None:
        assert s["in"] == self.n_in
        assert s["refused"] == self.n_refused
        assert s["answered"] == self.n_answered
        assert s["orphaned"] == self.n_orphaned
        assert s["redelivered"] == self.n_redelivered
        assert s["unknown_answers"] == self.n_unknown_answers
        assert s["dropped"] == self.n_dropped
        assert s["unknown_commands"] == self.n_unknown_commands
        assert s["expired"] == self.n_expired
        live = self.live()
        assert s["consumers"] == sum(c.consumer for c in live)
        assert s["connections"] == len(live)
        assert s["held"] == self.held(), (s, self.held())
        assert s["held"] <= self.queue_max, f"holds {s['held']} messages, queue_max {self.queue_max}"
        assert s["backpressure"] == int(self.bp)
        assert self.bp_calls == self.exp_bp
        assert self.seen_msgs == self.exp_msgs
        assert self.refused_calls == (1 if self.n_refused else 0)
        for cm in self.conns.values():
            assert not cm.conn.internal_errors, f"conn {cm.cid}: {cm.conn.internal_errors!r}"
        for cm in live:
            c = cm.conn
            assert c.consumer == cm.consumer and not c.detached
            assert len(cm.held) <= cm.prefetch, f"conn {cm.cid} holds {len(cm.held)} > prefetch {cm.prefetch}"
            assert c.inflight <= cm.prefetch, f"conn {cm.cid}: {c.inflight} in flight > prefetch {cm.prefetch}"
            assert c.lapsed == cm.lapsed
            assert c.withheld == cm.withheld, (cm.cid, c.withheld, cm.withheld)
            assert c.credit + c.inflight + c.lapsed + c.withheld == cm.prefetch, \
                (cm.cid, c.credit, c.inflight, c.lapsed, c.withheld, cm.prefetch)
            assert c.parked_sends == len(cm.parked)
            assert c.n_refused == cm.n_refused
            assert c.commands == self.exp_commands[cm.cid]
            if self.quiescent():
                assert c.inflight == len(cm.held)
                assert not [v for k, v in self.exp_replies.items() if k[0] == cm.cid and v], \
                    f"REPLYs never sent to conn {cm.cid}: {dict(self.exp_replies)}"
                assert not +Counter({k: v for k, v in self.exp_errors.items() if k[0] == cm.cid}), \
                    f"ERRORs never sent: {+self.exp_errors}"
                assert not +Counter({k: v for k, v in self.exp_pongs.items() if k[0] == cm.cid})
                assert cm.welcomed
        if self.quiescent():
            assert s["out"] == self.n_out_seen + self.n_out_lost
            assert s["inflight"] == sum(len(c.held) for c in live)
        else:
            assert s["out"] >= self.n_out_seen + self.n_out_lost
            assert s["inflight"] >= sum(len(c.held) for c in live)


class BasicMachine(DispatchMachine):
    """The basic scheme: one queue, round robin, flushed inline or when this test says."""

    @initialize(queue_max=queue_maxes, deferred=st.booleans(), auto_hold=st.booleans(), first=first_conns,
                lease=st.sampled_from([0.0, 1.0]))
    def start(self, queue_max, deferred, auto_hold, first, lease):
        self._setup(queue_max, deferred, auto_hold, lease=lease)
        self.lease = lease
        self.unseen: list[int] = []  # queued, or delivered and not yet seen: in order if order_known
        self.order_known = True
        self.fresh_max = -1          # seq of the last message seen delivered for the first time
        for role, prefetch in first:
            self._connect(role, prefetch, None)
        self._end()

    def held(self) -> int:
        return len(self.unseen) + sum(len(c.held) for c in self.live())

    def queued(self) -> int:
        return len(self.unseen) - self._unwritten()

    def _unwritten(self) -> int:
        """Deliveries made whose DELIVER this test has not seen yet."""
        return self.disp.stats()["inflight"] - sum(len(c.held) for c in self.live())

    # -- model ----------------------------------------------------------------------------

    def _model_send(self, cm: Conn, kind: str, mid: int, no_reply: bool, body: bytes) -> None:
        if kind == "api_hello":
            self.exp_commands[cm.cid].append((HELLO_CMD, mid, body))
            if not no_reply:
                self._expect_reply(cm.cid, mid, b"Hello " + body)
        elif kind == "api_bad":
            self.exp_commands[cm.cid].append((CMD_UNKNOWN_API, mid, bytes((7,)) + body))
            self.exp_errors[(cm.cid, ErrorCode.UNKNOWN_COMMAND, mid)] += 1
        elif cm.hold or cm.parked:
            cm.parked.append((kind, mid, no_reply, body))
            self.n_parked += 1
        else:
            self._model_accept(cm, kind, mid, no_reply, body)

    def _model_accept(self, cm: Conn, kind: str, mid: int, no_reply: bool, body: bytes) -> None:
        fed = kind == "api_msg"
        if self.held() >= self.queue_max:
            self._refuse(cm, mid)
            return
        self.msgs[mid] = Msg(mid, cm.cid, mid, no_reply or fed, self.seq)
        self.seq += 1
        self.unseen.append(mid)
        self.n_in += 1
        self.exp_msgs.append((cm.cid, mid, body))
        if fed and not no_reply:
            self._expect_reply(cm.cid, mid, b"OK")
        self._model_accepted()

    def _model_answer(self, cm: Conn, did: int, no_answer: bool, answer: bytes) -> None:
        key, _ = cm.held.pop(did)
        cm.withheld = 0
        self.live_dids.discard(did)
        self.stale_dids.append(did)
        m = self.msgs[key]
        m.done = True
        self._relay(m, no_answer, answer)

    def _model_detach(self, cm: Conn, unseen_own: int, unseen_others: int) -> None:
        """cm is gone: what it held goes back to the head of the queue, in delivery order."""
        held = [k for k, _ in cm.held.values()]
        for k in held:
            self.msgs[k].requeued = True
        self.n_redelivered += len(held) + unseen_own
        self.n_out_lost += unseen_own
        if unseen_own:
            # DELIVERs it never got were requeued too: which messages, this test cannot tell
            for k in self.unseen:
                if not self.msgs[k].requeued:
                    self.msgs[k].maybe = True
        if unseen_others or unseen_own:
            self.order_known = False
        self.unseen = held + self.unseen
        self._forget(cm)
        self.observe()
        self._model_pump()

    def _deliveries(self, batch, partial: bool) -> None:
        before = list(self.unseen)
        position = {k: i for i, k in enumerate(before)}
        unseen = set(before)
        delivered = []
        fresh_max = self.fresh_max
        for cid, items in batch.items():
            cm = self.conns[cid]
            last = last_fresh = -1
            for flags, did, key in items:
                m = self.msgs.get(key)
                assert m is not None, f"DELIVER of a message never accepted: {key}"
                assert key in unseen, (f"message {key} delivered to conn {cid} while "
                                       f"{'answered' if m.done else 'held by another consumer'}")
                unseen.discard(key)
                assert did not in self.live_dids, f"delivery id {did:#x} given out twice"
                if m.requeued:
                    assert flags == REDELIVERED, f"requeued message {key} without REDELIVERED: {flags}"
                elif m.maybe:
                    assert flags in (0, REDELIVERED)
                    m.requeued = flags == REDELIVERED
                else:
                    assert flags == 0, f"message {key} delivered the first time with flags {flags}"
                m.maybe = False
                if not flags:
                    # fresh messages leave the queue in the order they came
                    assert m.seq > last_fresh and m.seq > self.fresh_max, \
                        f"fresh message {key} out of order (seq {m.seq}, after {max(last_fresh, self.fresh_max)})"
                    last_fresh = m.seq
                    if not partial:  # others may still have older fresh ones unwritten
                        fresh_max = max(fresh_max, m.seq)
                if self.order_known:
                    assert position[key] > last, f"conn {cid} got message {key} out of queue order"
                    last = position[key]
                delivered.append(key)
                cm.held[did] = (key, False)
                cm.when[did] = self.clock
                self.live_dids.add(did)
                self.n_out_seen += 1
                assert len(cm.held) + cm.lapsed + cm.withheld <= cm.prefetch, \
                    f"conn {cid} holds {len(cm.held)} (and {cm.lapsed} lapsed) > prefetch {cm.prefetch}"
        if self.order_known and not partial:
            assert set(delivered) == set(before[:len(delivered)]), \
                f"delivered {delivered}, not the head of the queue {before}"
        self.fresh_max = fresh_max
        self.unseen = [k for k in before if k in unseen]

    # -- rules ----------------------------------------------------------------------------

    @precondition(lambda self: any(c.producing for c in self.live()))
    @rule(pick=picks,
          msgs=st.lists(st.tuples(st.sampled_from(["plain"] * 4 + ["api_msg", "api_hello", "api_bad"]),
                                  st.booleans()), min_size=1, max_size=4),
          split=splits)
    def send(self, pick, msgs, split):
        cm = self._pick([c for c in self.live() if c.producing], pick)
        frames = []
        for kind, no_reply in msgs:
            mid = self._mid()
            body = b"k%d" % mid
            flags = Flag.NO_REPLY if no_reply else 0
            if kind == "plain":
                payload = body
            else:
                flags |= Flag.API
                code = {"api_msg": ApiCommand.MSG, "api_hello": ApiCommand.HELLO, "api_bad": 7}[kind]
                payload = bytes((code,)) + body
            frames.append((encode_frame(FrameType.SEND, flags, mid, payload),
                           lambda k=kind, m=mid, n=no_reply, b=body: self._model_send(cm, k, m, n, b)))
        self._feed(cm, frames, split)
        self._end()

    @precondition(lambda self: self.deferred)
    @rule()
    def flush(self):
        self._flush_all()
        self._end()

    @precondition(lambda self: not self.auto_hold and any(c.producing for c in self.live()))
    @rule(pick=picks, on=st.booleans())
    def hold(self, pick, on):
        """A producing connection held back by hand: its SENDs (and PINGs after them) are
        parked, accepted in order when it is let go."""
        cm = self._pick([c for c in self.live() if c.producing], pick)
        cm.conn.hold_sends = on
        cm.hold = on
        if not on and cm.parked:
            self._model_release(cm)
            cm.conn.release_sends()
            self.observe()
            self._model_pump()
        self._end()

    @precondition(lambda self: len(self.live()) > 1)  # with none left only connect could run
    @rule(pick=picks, how=st.sampled_from(["lost", "flushed", "bad_frame"]))
    def disconnect(self, pick, how):
        """lost: connection_lost with output unwritten; flushed: after a flush; bad_frame:
        closed for bad input (its pending output first, then ERROR BAD_FRAME)."""
        cm = self._pick(self.live(), pick)
        if how == "flushed":
            self._flush_all()
            self.observe()
        own = cm.conn.inflight - len(cm.held)
        others = self._unwritten() - own
        assert own >= 0 and others >= 0
        if how == "bad_frame":
            self.exp_errors[(cm.cid, ErrorCode.BAD_FRAME, 0)] += 1
            cm.conn.get_buffer(len(GARBAGE))[:len(GARBAGE)] = GARBAGE
            cm.conn.buffer_updated(len(GARBAGE))
            assert cm.conn.protocol_errors == [ErrorCode.BAD_FRAME] and cm.conn.detached
            self.observe(only=cm)
            assert not +Counter({k: v for k, v in self.exp_errors.items() if k[0] == cm.cid})
            self._model_detach(cm, 0, others)
        else:
            cm.conn.detach()
            self._model_detach(cm, own, others)
        self._end()

    @precondition(lambda self: self.quiescent())  # every DELIVER seen: the model knows when each was made
    @rule(advance=st.sampled_from([0.25, 0.5, 1.0, 2.5]))
    def tick(self, advance):
        """The clock moves on: with a lease, deliveries unanswered for it go back to the head
        of the queue (each consumer's newest first, consumers in slot order), flagged
        REDELIVERED; their consumer's credit stays spent, and its free credit is withheld."""
        self.clock += advance
        for cm in sorted(self.live(), key=lambda c: c.conn.slot):
            if not self.lease:
                break
            gone = [did for did in cm.held if cm.when[did] + self.lease <= self.clock]
            assert gone == list(cm.held)[:len(gone)], "deliveries expire oldest first"
            keys = []
            for did in gone:
                key, _ = cm.held.pop(did)
                self.live_dids.discard(did)
                self.stale_dids.append(did)
                self.msgs[key].requeued = True
                keys.append(key)
            cm.lapsed += len(gone)
            if gone and cm.consumer:
                cm.withheld += cm.prefetch - len(cm.held) - cm.lapsed - cm.withheld
            self.n_expired += len(gone)
            self.n_redelivered += len(gone)
            self.unseen = keys + self.unseen
        if self.lease:
            event("tick with a lease")
        self.disp.tick(self.clock)
        self.observe()
        self._model_pump()
        self._end()

    # -- invariants -----------------------------------------------------------------------

    @invariant()
    def agrees_with_model(self):
        s = self.disp.stats()
        self._check_common(s)
        assert s["queue"] + s["inflight"] == self.held()
        assert s["backlog"] == 0 and s["subscriptions"] == 0
        if self.quiescent():
            assert s["queue"] == len(self.unseen), (s, self.unseen)
            if self.unseen:
                # nothing waits while a consumer has credit
                idle = [c.cid for c in self.live()
                        if c.consumer and len(c.held) + c.lapsed + c.withheld < c.prefetch]
                assert not idle, f"{len(self.unseen)} queued while conns {idle} have credit"
                for c in self.live():
                    assert c.conn.credit == c.prefetch - len(c.held) - c.lapsed - c.withheld
            else:
                self.order_known = True


ROUTES = {b"q0": "queue", b"q1": "queue", b"f0": "fanout", b"f1": "fanout"}


class Route:
    def __init__(self, name: bytes, routing: str) -> None:
        self.name, self.routing = name, routing
        self.fanout = routing == "fanout"
        self.waiting: list[int] = []
        self.members: set[int] = set()
        self.n_in = self.n_out = 0


class CommandMachine(DispatchMachine):
    """The command scheme: queue and fanout commands, subscriptions, broker commands."""

    @initialize(queue_max=queue_maxes, backlog_max=st.sampled_from([1, 2, 3, 10000]),
                first=st.lists(st.tuples(st.sampled_from(ROLES), st.integers(1, 8),
                                         st.sets(st.sampled_from(sorted(ROUTES)))),
                               min_size=1, max_size=3))
    def start(self, queue_max, backlog_max, first):
        self._setup(queue_max, False, backlog_max=backlog_max)
        self.backlog_max = backlog_max
        table = CommandTable()
        kinds = []
        for name, routing in ROUTES.items():
            table.add(name)
            kinds.append(KINDS[routing])
        for name in ("subscribe", "unsubscribe", "hello", "msg"):
            table.add(name)
            kinds.append(KINDS[name])
        self.disp.set_schema(table, kinds)
        self.routes = {name: Route(name, routing) for name, routing in ROUTES.items()}
        self.slow_calls: list = []
        self.exp_slow: list = []
        self.disp.on_slow_consumer = lambda conn, name: self.slow_calls.append((conn.cid, name))
        for role, prefetch, subs in first:
            cm = self._connect(role, prefetch, None)
            self.observe()
            for name in sorted(subs) if cm.consumer else ():
                self._subscribe(cm, name, True, False)

    def held(self) -> int:
        return (sum(len(r.waiting) for r in self.routes.values())
                + sum(not copy for c in self.live() for _, copy in c.held.values()))

    def queued(self) -> int:
        return sum(len(r.waiting) for r in self.routes.values())

    def credit(self, cm: Conn) -> int:
        return cm.prefetch - len(cm.held) - len(cm.owed)

    # -- model ----------------------------------------------------------------------------

    def _fanout(self, r: Route, key: int) -> None:
        """One copy per subscriber: now, into its backlog, or dropped when that is full."""
        for cid in r.members:
            c = self.conns[cid]
            if self.credit(c) > 0 and not c.backlog:
                c.owed.append(key)
            elif len(c.backlog) >= self.backlog_max:
                self.n_dropped += 1
                if not c.slow:
                    c.slow = True
                    self.exp_slow.append((cid, r.name))
            else:
                c.backlog.append(key)

    def _serve(self, cm: Conn) -> None:
        while self.credit(cm) > 0 and cm.backlog:
            cm.owed.append(cm.backlog.popleft())
        if cm.slow and len(cm.backlog) <= self.backlog_max // 2:
            cm.slow = False

    def _model_send(self, cm: Conn, name: bytes, via: str, mid: int, no_reply: bool, body: bytes) -> None:
        if name == b"hello":
            self.exp_commands[cm.cid].append((HELLO_CMD, mid, body[len(b"hello/"):]))
            if not no_reply:
                self._expect_reply(cm.cid, mid, b"Hello " + body[len(b"hello/"):])
            return
        if name not in self.routes:
            self.n_unknown_commands += 1
            self.exp_commands[cm.cid].append((CMD_UNKNOWN, mid, name))
            self.exp_errors[(cm.cid, ErrorCode.UNKNOWN_COMMAND, mid)] += 1
            return
        fed = via != "direct"
        if self.held() >= self.queue_max:
            self._refuse(cm, mid)
            return
        r = self.routes[name]
        self.msgs[mid] = Msg(mid, cm.cid, mid, no_reply or fed, self.seq, name, r.fanout)
        self.seq += 1
        self.n_in += 1
        r.n_in += 1
        self.exp_msgs.append((cm.cid, mid, body))
        if r.fanout and r.members:
            self._fanout(r, mid)
        else:
            r.waiting.append(mid)
        if fed and not no_reply:
            self._expect_reply(cm.cid, mid, b"OK")
        self._model_accepted()

    def _model_subscription(self, cm: Conn, on: bool, name: bytes, mid: int, no_reply: bool) -> None:
        self.exp_commands[cm.cid].append((SUB if on else UNSUB, mid, name))
        if not cm.consumer or name == b"hello":
            self.exp_errors[(cm.cid, ErrorCode.NOT_ALLOWED, mid)] += 1
            return
        if name not in self.routes:
            self.exp_errors[(cm.cid, ErrorCode.UNKNOWN_COMMAND, mid)] += 1
            return
        if not no_reply:
            self._expect_reply(cm.cid, mid, b"OK")
        r = self.routes[name]
        if on and name not in cm.subs:
            cm.subs.add(name)
            r.members.add(cm.cid)
            if r.fanout and r.waiting:
                assert r.members == {cm.cid}
                waiting, r.waiting = r.waiting, []
                for k in waiting:
                    self._fanout(r, k)
        elif not on and name in cm.subs:
            cm.subs.discard(name)
            r.members.discard(cm.cid)
            cm.backlog = deque(k for k in cm.backlog if self.msgs[k].route != name)

    def _model_answer(self, cm: Conn, did: int, no_answer: bool, answer: bytes) -> None:
        key, copy = cm.held.pop(did)
        self.live_dids.discard(did)
        self.stale_dids.append(did)
        m = self.msgs[key]
        if not copy:
            m.done = True
        self._relay(m, no_answer, answer)
        self._serve(cm)

    def _model_detach(self, cm: Conn) -> None:
        back: dict[bytes, list[int]] = defaultdict(list)
        for key, copy in cm.held.values():
            if copy:
                self.n_dropped += 1  # a fanout copy goes with its subscriber
            else:
                self.msgs[key].requeued = True
                self.n_redelivered += 1
                back[self.msgs[key].route].append(key)
        for name, keys in back.items():
            self.routes[name].waiting[:0] = keys
        self.n_dropped += len(cm.backlog)
        cm.backlog.clear()
        for name in cm.subs:
            self.routes[name].members.discard(cm.cid)
        cm.subs = set()
        self._forget(cm)
        self.observe()
        self._model_pump()

    def _deliveries(self, batch, partial: bool) -> None:
        per_route: dict[bytes, list[int]] = defaultdict(list)
        for cid, items in batch.items():
            cm = self.conns[cid]
            last: dict[bytes, int] = {}
            for flags, did, key in items:
                m = self.msgs.get(key)
                assert m is not None, f"DELIVER of a message never accepted: {key}"
                assert did not in self.live_dids, f"delivery id {did:#x} given out twice"
                r = self.routes[m.route]
                if m.fanout:
                    assert flags == 0
                    assert key not in cm.copies, f"second copy of fanout message {key} to conn {cid}"
                    assert cm.owed and cm.owed[0] == key, \
                        f"fanout copy {key} to conn {cid}; expected {list(cm.owed)}"
                    cm.owed.popleft()
                    cm.copies.add(key)
                    cm.held[did] = (key, True)
                else:
                    assert m.route in cm.subs, f"{m.route!r} message {key} to conn {cid}, not a subscriber"
                    assert key in r.waiting, (f"message {key} delivered to conn {cid} while "
                                              f"{'answered' if m.done else 'held by another consumer'}")
                    pos = r.waiting.index(key)
                    assert pos > last.get(m.route, -1), f"conn {cid} got {key} out of queue order"
                    last[m.route] = pos
                    assert flags == (REDELIVERED if m.requeued else 0), (key, flags, m.requeued)
                    per_route[m.route].append(key)
                    cm.held[did] = (key, False)
                self.live_dids.add(did)
                r.n_out += 1
                self.n_out_seen += 1
                assert len(cm.held) <= cm.prefetch, f"conn {cid} holds {len(cm.held)} > prefetch {cm.prefetch}"
        for name, keys in per_route.items():
            r = self.routes[name]
            assert set(keys) == set(r.waiting[:len(keys)]), \
                f"{name!r}: delivered {keys}, not the head of its queue {r.waiting}"
            del r.waiting[:len(keys)]
        for cm in self.live():
            assert not cm.owed, f"fanout copies {list(cm.owed)} never delivered to conn {cm.cid}"

    # -- rules ----------------------------------------------------------------------------

    @precondition(lambda self: any(c.producing for c in self.live()))
    @rule(pick=picks, name=st.sampled_from([b"q0", b"q1", b"f0", b"f1", b"hello", b"zz"]),
          msgs=st.lists(st.tuples(st.sampled_from(["direct", "direct", "msg", "api"]), st.booleans()),
                        min_size=1, max_size=4),
          split=splits)
    def send(self, pick, name, msgs, split):
        """One read of SENDs of one command (with queue and fanout SENDs in one read, which
        consumer took a queue message would decide who has credit for the fanout copies)."""
        cm = self._pick([c for c in self.live() if c.producing], pick)
        frames = []
        for via, no_reply in msgs:
            mid = self._mid()
            body = name + b"/k%d" % mid
            flags = Flag.NO_REPLY if no_reply else 0
            if name in (b"hello", b"zz"):
                via = "direct"
            payload = {"direct": body, "msg": b"msg/" + body, "api": bytes((ApiCommand.MSG,)) + body}[via]
            if via == "api":
                flags |= Flag.API
            frames.append((encode_frame(FrameType.SEND, flags, mid, payload),
                           lambda v=via, m=mid, n=no_reply, b=body: self._model_send(cm, name, v, m, n, b)))
        self._feed(cm, frames, split)
        self._end()

    @precondition(lambda self: self.live())
    @rule(pick=picks, name=st.sampled_from([b"q0", b"q1", b"f0", b"f1", b"zz", b"hello"]),
          on=st.booleans(), no_reply=st.booleans())
    def subscription(self, pick, name, on, no_reply):
        # from any connection: a producer's attempt is refused (NOT_ALLOWED)
        self._subscribe(self._pick(self.live(), pick), name, on, no_reply)

    def _subscribe(self, cm: Conn, name: bytes, on: bool, no_reply: bool) -> None:
        mid = self._mid()
        payload = (b"subscribe/" if on else b"unsubscribe/") + name
        self._feed(cm, [(encode_frame(FrameType.SEND, Flag.NO_REPLY if no_reply else 0, mid, payload),
                         lambda: self._model_subscription(cm, on, name, mid, no_reply))])
        self._end()

    @precondition(lambda self: len(self.live()) > 1)  # with none left only connect could run
    @rule(pick=picks, bad_frame=st.booleans())
    def disconnect(self, pick, bad_frame):
        cm = self._pick(self.live(), pick)
        if bad_frame:
            self.exp_errors[(cm.cid, ErrorCode.BAD_FRAME, 0)] += 1
            cm.conn.get_buffer(len(GARBAGE))[:len(GARBAGE)] = GARBAGE
            cm.conn.buffer_updated(len(GARBAGE))
            assert cm.conn.protocol_errors == [ErrorCode.BAD_FRAME] and cm.conn.detached
            self.observe(only=cm)
        else:
            cm.conn.detach()
        self._model_detach(cm)
        self._end()

    # -- invariants -----------------------------------------------------------------------

    @invariant()
    def agrees_with_model(self):
        s = self.disp.stats()
        self._check_common(s)
        live = self.live()
        assert s["queue"] == sum(len(r.waiting) for r in self.routes.values())
        assert s["backlog"] == sum(len(c.backlog) for c in live)
        assert s["subscriptions"] == sum(len(c.subs) for c in live)
        # one call per episode; the order among the subscribers of one message is the core's
        assert Counter(self.slow_calls) == Counter(self.exp_slow)
        stats = {r["name"]: r for r in self.disp.route_stats()}
        for name, r in self.routes.items():
            got = stats[name]
            assert got["routing"] == r.routing
            assert (got["queued"], got["subscribers"], got["in"], got["out"]) == \
                (len(r.waiting), len(r.members), r.n_in, r.n_out), (name, got)
            if r.waiting:
                if r.fanout:
                    assert not r.members, f"{name!r}: {len(r.waiting)} wait with subscribers {r.members}"
                else:
                    idle = [cid for cid in r.members if self.credit(self.conns[cid]) > 0]
                    assert not idle, f"{name!r}: {len(r.waiting)} wait while subscribers {idle} have credit"
        for cm in live:
            assert sorted(cm.conn.subscriptions) == sorted(cm.subs)
            if cm.backlog:
                assert self.credit(cm) == 0, f"conn {cm.cid} has credit and a backlog {list(cm.backlog)}"


TestBasicDispatch = BasicMachine.TestCase
TestBasicDispatch.settings = SETTINGS
TestCommandDispatch = CommandMachine.TestCase
TestCommandDispatch.settings = SETTINGS
