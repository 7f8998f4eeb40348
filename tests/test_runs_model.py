"""Which consumer gets each message, under random steps, against a model of the rule.

The rule (docs/protocol.md, "Which consumer gets a message"): consumers with credit stand in a
line; the one at its head takes a run of up to min(its free credit when the run begins, run)
consecutive messages, then goes to the back if it still has credit; one without credit leaves
the line until an answer gives credit back, and then joins at the back. A message whose consumer
went away goes first to a consumer in the line that has answered before, when the head has not
(docs/semantics.md: a new or hung consumer is not trusted with it). Hypothesis drives the
compiled Dispatcher (basic scheme, in-process consumers: no event loop, the flush inline)
through random sends, acknowledgements, consumers coming and going, and checks every
delivery, in order, against this model, and that nothing is lost or held twice.
"""

from __future__ import annotations

from collections import deque

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from teomq._core.dispatch import Dispatcher
from teomq._core.inproc import InprocEndpoint
from teomq.protocol import Flag, FrameType

DELIVER = int(FrameType.DELIVER)
REDELIVERED = int(Flag.REDELIVERED)


class Model:
    """The rule, step by step: the line, the run of its head, credit, the waiting queue."""

    def __init__(self, run: int) -> None:
        self.run = run
        self.line: deque[int] = deque()   # consumer ids, the head first
        self.run_left = 0
        self.credit: dict[int, int] = {}
        self.in_line: set[int] = set()
        self.waiting: deque[tuple[int, bool]] = deque()  # (message, redelivered)
        self.held: dict[int, list[tuple[int, bool]]] = {}  # consumer -> its deliveries, in order
        self.out: list[tuple[int, int, bool]] = []  # (consumer, message, redelivered), in order
        self.proven: set[int] = set()     # consumers that have answered

    def _head(self) -> int | None:
        while self.line:
            c = self.line[0]
            if c in self.credit and self.credit[c] > 0:
                if self.run_left <= 0:
                    self.run_left = min(self.credit[c], self.run)
                return c
            self.line.popleft()
            self.in_line.discard(c)
            self.run_left = 0
        return None

    def _deliver(self, c: int, m: tuple[int, bool]) -> None:
        self.credit[c] -= 1
        self.held[c].append(m)
        self.out.append((c, m[0], m[1]))
        self.run_left -= 1
        if self.run_left <= 0 or self.credit[c] <= 0:
            self.line.popleft()
            self.run_left = 0
            if self.credit[c] > 0:
                self.line.append(c)
            else:
                self.in_line.discard(c)

    def _join(self, c: int) -> None:
        if c not in self.in_line and self.credit[c] > 0:
            self.in_line.add(c)
            self.line.append(c)

    def pump(self) -> None:
        while self.waiting:
            c = self._head()
            if c is None:
                return
            m = self.waiting.popleft()
            if m[1] and c not in self.proven:
                alt = next((a for a in self.line if self.credit.get(a, 0) > 0 and a in self.proven), None)
                if alt is not None:  # out of turn: the head's run and the line stay as they are
                    self.credit[alt] -= 1
                    self.held[alt].append(m)
                    self.out.append((alt, m[0], m[1]))
                    continue
            self._deliver(c, m)

    def connect(self, c: int, prefetch: int) -> None:
        self.credit[c] = prefetch
        self.held[c] = []
        self._join(c)
        self.pump()

    def send(self, m: int) -> None:
        if self.waiting:
            self.waiting.append((m, False))
            return
        c = self._head()
        if c is None:
            self.waiting.append((m, False))
        else:
            self._deliver(c, (m, False))

    def ack(self, c: int, k: int) -> None:
        self.held[c].pop(k)
        self.credit[c] += 1
        self.proven.add(c)
        self._join(c)
        self.pump()

    def close(self, c: int) -> None:
        # what it held goes back to the head of the queue, in delivery order, redelivered
        self.waiting.extendleft(reversed([(m, True) for m, _ in self.held.pop(c)]))
        del self.credit[c]
        self.pump()


class RunsMachine(RuleBasedStateMachine):

    @initialize(run=st.sampled_from([1, 2, 3, 16]))
    def start(self, run: int) -> None:
        self.disp = Dispatcher(run=run)
        self.model = Model(run)
        self.eps: dict[int, InprocEndpoint] = {}
        self.dids: dict[int, list[int]] = {}   # consumer -> delivery ids it holds, in order
        self.got: list[tuple[int, int, bool]] = []
        self.producer = InprocEndpoint(self.disp, lambda items: None)
        self.next_c = 0
        self.next_m = 0

    def _output(self, c: int):  # noqa: ANN202 - on_output of consumer c
        def take(items: list[tuple[int, int, int, bytes]]) -> None:
            for ftype, flags, did, payload in items:
                assert ftype == DELIVER
                self.dids[c].append(did)
                self.got.append((c, int(payload), bool(flags & REDELIVERED)))
        return take

    @rule(prefetch=st.integers(1, 6))
    def connect(self, prefetch: int) -> None:
        c = self.next_c
        self.next_c += 1
        self.dids[c] = []
        self.eps[c] = InprocEndpoint(self.disp, self._output(c), prefetch=prefetch)
        self.model.connect(c, prefetch)

    @rule(n=st.integers(1, 12))
    def send(self, n: int) -> None:
        for _ in range(n):
            self.producer.send(self.next_m, b"%d" % self.next_m, no_reply=True)
            self.model.send(self.next_m)
            self.next_m += 1

    @precondition(lambda self: any(self.dids[c] for c in self.eps))
    @rule(data=st.data())
    def ack(self, data: st.DataObject) -> None:
        c = data.draw(st.sampled_from(sorted(c for c in self.eps if self.dids[c])))
        k = data.draw(st.integers(0, len(self.dids[c]) - 1))
        self.eps[c].ack([self.dids[c].pop(k)])
        self.model.ack(c, k)

    @precondition(lambda self: bool(self.eps))
    @rule(data=st.data())
    def close(self, data: st.DataObject) -> None:
        c = data.draw(st.sampled_from(sorted(self.eps)))
        self.eps.pop(c).close()
        del self.dids[c]
        self.model.close(c)

    @invariant()
    def deliveries_follow_the_rule(self) -> None:
        # per consumer, in order (the flush hands each endpoint its own list: the order between
        # consumers within one step is not observable, nor needed: each delivery's consumer is)
        def by_consumer(out: list[tuple[int, int, bool]]) -> dict[int, list[tuple[int, bool]]]:
            per: dict[int, list[tuple[int, bool]]] = {}
            for c, m, redelivered in out:
                per.setdefault(c, []).append((m, redelivered))
            return per
        assert by_consumer(self.got) == by_consumer(self.model.out)
        s = self.disp.stats()
        held = sum(len(v) for v in self.dids.values())
        assert (s["queue"], s["inflight"]) == (len(self.model.waiting), held)


TestRuns = RunsMachine.TestCase
TestRuns.settings = settings(max_examples=300, stateful_step_count=40, deadline=None,
                             suppress_health_check=[HealthCheck.too_slow])
