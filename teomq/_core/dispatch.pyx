# cython: language_level=3
"""The dispatcher: accepting messages, the bound on what the broker holds, command mode.

Every complete frame of a read is handled in C (connection.pyx); a SEND comes here. In the
basic scheme it is accepted into the one queue route; in command mode (a CommandTable is
set) its name is looked up in C and it goes to that command's route, or (broker commands,
unknown names) up to Python (on_command). Accepting is Store.append (store.pyx: the broker's
sequence number, the payload copied once from the read buffer); routing and delivery are the
scheduler's (scheduler.pyx), which this class extends.

Python sees only what it must decide: a HELLO or ERROR frame, a broker command, a bad frame,
the back-pressure edges, and one flush per loop pass (Outbox, endpoint.pyx).
"""

cimport cython
from cpython.ref cimport PyObject
from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdint cimport int32_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcmp

from teomq._core.command_parser cimport name_length
from teomq._core.endpoint cimport Outbox, S_CLOSED, confirm_now
from teomq._core.frame_codec cimport (
    E_EXPIRED, E_NO_CONSUMER, E_NOT_ALLOWED, E_QUEUE_FULL, E_STORAGE, F_API, F_CONFIRM, F_DEADLINE, F_DEADLINE_ABS, F_DELAY, F_PRIO,
    F_FAIL_FAST, F_NO_REPLY, F_REDELIVERED, HEADER_SIZE, note_received, note_received_strip, teomq_ld32,
)
from teomq._core.scheduler cimport clock_cs, monotonic_now
from teomq._core.ring_queue cimport NPRIO, Idx, IdxBlock, Msg, MsgRing, msg_cost, msg_fields, prio_of
from teomq._core.seglog cimport SegmentLog
from teomq._core.routes cimport R_FANOUT, R_HELLO, R_MSG, R_QUEUE, Route, lane, lane_push, lane_spill, route_waiting
from teomq._core.slots cimport list_item, slots_used
from teomq._core.store cimport TIME_EXPIRES, TIME_NOT_BEFORE, store_append

import time

import msgpack

# API command numbers of SEND frames flagged API (the original's 129 and 130)
cdef enum:
    API_HELLO = 129
    API_MSG = 130
#: on_command kinds besides the RouteKind values: not a command, not an API command
CMD_UNKNOWN = 0
CMD_UNKNOWN_API = -1

cdef extern from "<malloc.h>" nogil:
    int malloc_trim(size_t pad)

# waiting messages' memory that, once freed, is given back to the OS at the next tick
cdef size_t TRIM_STEP = 16 << 20

cdef bytes ERR_QUEUE_FULL = msgpack.packb(
    {"code": E_QUEUE_FULL, "reason": "queue is full: message not accepted"})
cdef bytes ERR_NO_CONSUMER = msgpack.packb(
    {"code": E_NO_CONSUMER, "reason": "no consumer: nobody consumes this queue now (the SEND asked to fail "
     "fast); message not accepted"})
cdef bytes ERR_EXPIRED_PARKED = msgpack.packb(
    {"code": E_EXPIRED, "reason": "expired: the request's deadline passed while the broker held its producer back; "
     "not accepted, never delivered"})
cdef bytes ERR_SHORT_DELAY = msgpack.packb(
    {"code": E_NOT_ALLOWED, "reason": "a SEND flagged DELAY needs its u32 delay (ms) before the payload"})
cdef bytes ERR_SHORT_DEADLINE = msgpack.packb(
    {"code": E_NOT_ALLOWED, "reason": "a SEND flagged DEADLINE needs its 4-byte deadline before the payload"})
cdef bytes ERR_HELD_BACK = msgpack.packb(
    {"code": E_QUEUE_FULL, "reason": "held back: the broker is at its high mark and this connection's "
     "parked messages reached their bound; message not accepted"})


@cython.final
cdef class Dispatcher(Scheduler):
    """The broker's shared state: endpoints, routes, flights, the bound, output to flush."""

    def __cinit__(self, *, uint32_t max_payload=1 << 20, size_t queue_max=1000000,
                  scheduler=None, size_t backlog_max=10000, double lease=0.0, int32_t run=16):
        if queue_max < 1:
            raise ValueError("queue_max must be at least 1")
        self.queue_max = queue_max
        # Producers' reads pause at 3/4 of the bound and resume at a quarter of that, so
        # publishers meet TCP back-pressure long before the bound refuses anything.
        self.queue_high = queue_max - queue_max // 4 if queue_max > 1 else 1
        self.queue_low = self.queue_high // 4
        self.queue_mid = (self.queue_high + self.queue_low) // 2
        self.outbox = Outbox(scheduler)
        self.max_payload = max_payload
        self.table = None

    # -- the bound ------------------------------------------------------------------------

    cdef size_t queued(self) noexcept:
        return self.n_route_queued

    cdef size_t held(self) noexcept:
        # Every message the broker holds for a producer: waiting or in flight. The one thing
        # queue_max bounds (and the high and low marks of back-pressure watch). Fanout copies
        # belong to their subscribers and are bounded per subscriber (prefetch, backlog_max).
        return self.n_route_queued + self.n_delayed + self.dead_msgs.count + self.n_inflight - self.n_copies_inflight

    cdef int refuse(self, Endpoint conn, uint64_t fid, bint parked) except -1:
        # QUEUE_FULL: the bound is reached, or (parked) this held-back connection's parked
        # SENDs reached theirs
        self.n_refused += 1
        if parked:
            conn.n_refused_parked += 1
            conn._add_error(E_QUEUE_FULL, fid, ERR_HELD_BACK)
        else:
            conn.n_refused += 1
            conn._add_error(E_QUEUE_FULL, fid, ERR_QUEUE_FULL)
        if not self.refusal_noted and self.on_refused is not None:
            self.refusal_noted = True   # one call until the control plane has logged it
            self.on_refused()
        return 0

    cdef bint over_limit(self, Route r, size_t n) noexcept:
        # a SEND of n bytes into r would pass r's limits or the broker's bytes bound (what
        # waits: queued, paged out, suspects and delayed)
        return ((r.max_messages and route_waiting(r) >= r.max_messages) or
                (r.max_bytes and r.q_bytes + r.d_bytes + n > r.max_bytes) or
                (self.queue_max_bytes and self.q_bytes + self.d_bytes + n > self.queue_max_bytes))

    cdef int refuse_limit(self, Endpoint conn, uint64_t fid, Route r, size_t n) except -1:
        # QUEUE_FULL at a queue's limit (the command's) or at -queue-max-bytes; the control
        # plane logs them from route_stats (Broker._tick)
        cdef str what
        self.n_refused += 1
        self.n_limit_refused += 1
        r.n_refused += 1                # (not conn.n_refused: those are -queue-max's, logged as such)
        name = r.name.decode("utf-8", "replace") if r.name else "the queue"
        if (r.max_messages and route_waiting(r) >= r.max_messages) or \
                (r.max_bytes and r.q_bytes + r.d_bytes + n > r.max_bytes):
            what = f"'{name}' is at its limit"
        else:
            what = f"the broker's -queue-max-bytes {self.queue_max_bytes} is reached"
        conn._add_error(E_QUEUE_FULL, fid, msgpack.packb({
            "code": E_QUEUE_FULL, "reason": f"queue is full: {what} ({route_waiting(r)} messages, "
            f"{r.q_bytes + r.d_bytes} bytes waiting); message not accepted, send it again later"}))
        return 0

    cdef int refuse_storage(self, Endpoint conn, uint64_t fid) except -1:
        # STORAGE: the durable store refuses new messages now (full disk, a write error); the
        # control plane logs it (storage.py), counted in the log's n_refused
        self.n_refused += 1
        conn._add_error(E_STORAGE, fid, (<SegmentLog>self.store).refusal)
        return 0

    # -- accepting (accept() is inline in dispatch.pxd) -----------------------------------

    cdef int enqueue(self, Endpoint conn, FrameHeader *h, const char *p, size_t n,
                     uint16_t flags, int32_t route) except -1:
        # Accept p[0:n] (all of the SEND's payload, or the part after a command prefix) into
        # route ``route``. Refused at the bound: QUEUE_FULL.
        cdef Msg m
        cdef PyObject *r
        cdef uint32_t deadline
        cdef uint64_t due
        if conn.hold_sends or conn.parked_len:
            # held back (role both, held messages at the high mark): the whole frame waits
            return conn._park(h, p + n - h.length)
        if self.held() >= self.queue_max:
            return self.refuse(conn, h.fid, False)
        r = list_item(<PyObject *>self.routes, route)   # borrowed: the routes list holds it
        if ((<Route>r).max_messages or (<Route>r).max_bytes or self.queue_max_bytes) and \
                self.over_limit(<Route>r, n):
            return self.refuse_limit(conn, h.fid, <Route>r, n)
        if self.in_deadline and self.in_deadline <= clock_cs(self):
            # (parked until after its deadline) not accepted: its producer gave up already
            self.n_deadline_expired += 1
            return conn._add_error(E_EXPIRED, h.fid, ERR_EXPIRED_PARKED)
        if self.in_fail_fast and (<Route>r).nmembers == 0:
            self.n_refused += 1
            self.n_no_consumer += 1
            return conn._add_error(E_NO_CONSUMER, h.fid, ERR_NO_CONSUMER)
        deadline = self.in_deadline
        if deadline == 0 and (<Route>r).ttl_ms:
            due = <uint64_t>clock_cs(self) + (<Route>r).ttl_ms // 10 + 1   # its command's time to live
            deadline = <uint32_t>due if due < 0xFFFFFFFFu else 0xFFFFFFFFu
        flags |= <uint16_t>((self.in_prio - 1 if self.in_prio else (<Route>r).default_priority) << 8)
        msg_fields(&m, flags, conn.session, h.fid, 0, route, deadline)
        if store_append(self.store, &m, p, n):   # after the fields: a durable store records them
            return self.refuse_storage(conn, h.fid)  # it cannot now (a disk error): m untouched
        if n == h.length and conn.framed:
            note_received(p - HEADER_SIZE, h.length, &m.rx)
        elif self.in_strip and n + self.in_strip == h.length and conn.framed:
            note_received_strip(p - self.in_strip - HEADER_SIZE, h.length, self.in_strip, &m.rx)
        else:
            m.rx.shift = 0          # a stripped or unframed payload: its CRC is computed afresh
        (<Route>r).n_in += 1
        if self.in_due > self.now:
            # delayed: the heap of delayed messages (tick) until due; a fanout message is
            # recorded as one waiting for a subscriber (it is not copied before it is due)
            if (<Route>r).kind != R_QUEUE and self.store.hooked:
                self.store.keep(&m)
            self.delay_push(&m, self.in_due)
            self.n_delayed_in += 1
        elif (<Route>r).kind == R_QUEUE:
            self.route_queue(<Route>r, &m)
        else:
            self.route_fanout(<Route>r, &m, False)
        if (deadline or self.in_due) and self.store.hooked:
            self.record_times(<Route>r, &m)   # after its message record (a fanout's: if kept)
        self.n_in += 1
        if h.flags & F_CONFIRM and conn.confirms:
            self.confirm(conn, h.fid)
        if not self.backpressure and self.held() >= self.queue_high:
            self.backpressure = True
            if self.on_backpressure is not None:
                self.on_backpressure(True)
        if self.outbox.msglog is not None:
            self.outbox.msglog.add(conn.log_name, h.fid, p, n)   # no Python object: a line in C
        elif self.on_message is not None:
            self.on_message(conn, h.fid, PyBytes_FromStringAndSize(p, n))
        return 0

    cdef int record_times(self, Route r, Msg *m) except -1:
        # the durable store records m's delay and deadline: a restart keeps them (wall-clock)
        if r.kind != R_QUEUE and r.nmembers and self.in_due <= self.now:
            return 0                 # fanout copies, delivered at once: not recorded
        if self.in_due > self.now:
            self.store.timed(m, TIME_NOT_BEFORE, self.in_due - self.now)
        if m.deadline:
            self.store.timed(m, TIME_EXPIRES, (<double>m.deadline - (self.now - self.epoch) * 100.0) / 100.0)
        return 0

    cdef int accept_flagged(self, Endpoint conn, FrameHeader *h, const char *payload) except -1:
        # A SEND flagged DEADLINE (its payload begins with u32 ms, relative: the absolute time
        # is the broker's, so clocks need not agree), DELAY (then u32 ms it waits before it is
        # delivered, relative as well), FAIL_FAST or a priority: noted for enqueue, stripped
        cdef const char *p = payload
        cdef size_t n = h.length
        cdef uint64_t due
        cdef uint32_t ms
        cdef bint parked = self.releasing and h.flags & F_DEADLINE_ABS
        if h.flags & F_DEADLINE:
            if n < 4:
                return conn._add_error(E_NOT_ALLOWED, h.fid, ERR_SHORT_DEADLINE)
            if parked:
                self.in_deadline = teomq_ld32(p)   # parked: set on receipt; the payload's CRC afresh
            else:
                due = <uint64_t>clock_cs(self) + teomq_ld32(p) // 10 + 1
                self.in_deadline = <uint32_t>due if due < 0xFFFFFFFFu else 0xFFFFFFFFu
                self.in_strip = 4
            p += 4
            n -= 4
        if h.flags & F_DELAY:
            if n < 4:
                return conn._add_error(E_NOT_ALLOWED, h.fid, ERR_SHORT_DELAY)
            ms = teomq_ld32(p)
            if parked:                          # the broker's clock in 10 ms steps, rounded up
                self.in_due = self.epoch + <double>ms / 100.0
            elif ms:
                self.in_due = self.now + <double>ms / 1000.0
                self.in_strip += 4
            else:
                self.in_strip += 4
            p += 4
            n -= 4
        if h.flags & F_PRIO:
            self.in_prio = (h.flags & F_PRIO) >> 8
            if self.in_prio > NPRIO:
                self.in_prio = NPRIO            # past the highest level: the highest
        self.in_fail_fast = (h.flags & F_FAIL_FAST) != 0
        try:
            if self.table is not None or h.flags & F_API:
                return self.accept_command(conn, h, p, n)
            return self.enqueue(conn, h, p, n, h.flags & F_NO_REPLY, 0)
        finally:
            self.in_strip = 0
            self.in_deadline = 0
            self.in_fail_fast = False
            self.in_due = 0.0
            self.in_prio = 0

    cdef int accept_command(self, Endpoint conn, FrameHeader *h, const char *payload, size_t n) except -1:
        # A SEND in command mode, or an API SEND: find what its name leads to (in C, no
        # Python object unless the broker itself must answer), strip msg/ prefixes.
        cdef const char *p = payload
        cdef size_t k
        cdef int32_t idx
        cdef int kind
        cdef uint16_t flags = h.flags & F_NO_REPLY
        cdef bint fed = False          # reached through msg: queued with NO_REPLY, "OK" answered here
        cdef Route r
        cdef uint64_t before
        if h.flags & F_API:
            if n == 0 or (<unsigned char>p[0] != API_HELLO and <unsigned char>p[0] != API_MSG):
                self.on_command_hook(conn, CMD_UNKNOWN_API, h, p, n)
                return 0
            kind = <unsigned char>p[0]
            p += 1
            n -= 1
            if kind == API_HELLO:
                self.on_command_hook(conn, R_HELLO, h, p, n)
                return 0
            fed = True
            self.in_deadline = 0
        while True:
            if self.table is None:      # basic scheme: msg feeds the one queue
                before = self.n_in
                self.enqueue(conn, h, p, n, F_NO_REPLY, 0)
                break
            k = name_length(p, n)
            idx = self.table.lookup(p, k)
            if idx < 0:
                self.n_unknown_commands += 1
                self.on_command_hook(conn, CMD_UNKNOWN, h, p, k)
                return 0
            r = <Route>self.routes[idx]
            # skip "name/" (or "name" when nothing follows)
            k = k + 1 if k < n else k
            if r.kind == R_MSG:
                fed = True
                self.in_deadline = 0   # answered OK here: nobody would hear of its expiry
                p += k
                n -= k
                continue
            if r.kind != R_FANOUT and r.kind != R_QUEUE:
                self.on_command_hook(conn, r.kind, h, p + k, n - k)
                return 0
            before = self.n_in
            self.enqueue(conn, h, p, n, F_NO_REPLY if fed else flags, idx)
            break
        if fed and self.n_in != before and not (h.flags & F_NO_REPLY):
            conn.reply(h.fid, "OK", 2, NULL)
        return 0

    cdef int on_command_hook(self, Endpoint conn, int kind, FrameHeader *h,
                             const char *p, size_t n) except -1:
        conn.on_command(kind, h.fid, h.flags, PyBytes_FromStringAndSize(p, n))
        if h.flags & F_CONFIRM and conn.confirms and kind != CMD_UNKNOWN and kind != CMD_UNKNOWN_API:
            self.confirm(conn, h.fid)   # a broker command, handled: confirmed in its turn
        return 0

    cdef int confirm(self, Endpoint conn, uint64_t fid) except -1:
        # conn's SEND fid, flagged CONFIRM, is handled: confirmed in order with conn's others
        # (a durable store: once the batch of this pass, or the last one written, is stored)
        if self.store.hooked:
            return (<SegmentLog>self.store).confirm_later(conn, fid)
        return confirm_now(conn, fid)

    # -- delivery and output --------------------------------------------------------------

    cdef int pump(self) except -1:
        """Deliver what waits and can be delivered now; end back-pressure when it may end."""
        if self.n_delayed and self.delayed[0].due <= self.now:
            self.delay_due()          # due since the clock was read (every read): not only at a tick
        if self.pending_routes:
            self.drain_routes()
        if self.dead_msgs.count and self.now >= self.dead_retry_at:
            try:
                self.flush_dead()
            except Exception:
                self.dead_retry_at = self.now + 1.0   # on_dead logged it; they stay, live
        # Back at the low mark; or nothing much waits and what is held is mostly in flight with
        # consumers that have not answered yet (a hung one must not stall every producer while
        # half of the bound is free).
        if self.backpressure and (self.held() <= self.queue_low or
                                  (self.queued() <= self.queue_low and self.held() <= self.queue_mid)):
            self.backpressure = False
            if self.on_backpressure is not None:
                self.on_backpressure(False)
        return 0

    cdef int schedule_flush(self) except -1:
        return self.outbox.schedule()

    def flush(self):
        """Write every endpoint's pending output: one write per endpoint per loop pass."""
        self.outbox.flush()

    def set_scheduler(self, scheduler):
        self.outbox.set_scheduler(scheduler)

    def pump_now(self):
        """Deliver what can be delivered and schedule the flush (after control-plane changes)."""
        self.pump()
        self.schedule_flush()

    def tick(self, double now):
        """The clock moves on to ``now`` (seconds): leases that ran out by then expire.

        A delivery whose lease expired goes back to the head of its route, flagged redelivered
        (its attempt number rises with its next delivery); the consumer that held it does not
        get that credit back until it answers something. Driven by one timer of the broker.
        """
        cdef Endpoint c
        cdef Route r
        self.now = now
        if self.n_inflight:
            for c in self.conns:
                if c is not None and c.fl_head >= 0:
                    self.expire(c)
        if self.n_delayed:
            self.delay_due()
        if self.n_suspects:
            for r in self.routes:       # (a reservation may have been lost: tried again)
                if r.suspects.count:
                    self.mark_pending(r)
        for r in self.routes:
            if r.n_waiting or r.suspects.count:
                self.sweep_head(r)
        if self.n_paged_out != self.n_paged_in:
            for r in self.routes:     # a read back that failed is tried again
                if r.n_spilled:
                    self.mark_pending(r)
        if self.mem_queued > self.trim_mark:
            self.trim_mark = self.mem_queued
        elif self.trim_mark >= self.mem_queued + TRIM_STEP or (self.mem_queued == 0 and self.trim_mark > TRIM_STEP // 16):
            malloc_trim(0)            # the payload blocks of a drain, given back to the OS
            self.trim_mark = self.mem_queued
        self.pump()
        self.schedule_flush()

    # -- sessions, for the control plane --------------------------------------------------

    def bind_session(self, Endpoint conn, name):
        """Give ``conn``'s session the name its HELLO announced (bytes).

        Returns False (and binds nothing) when another connected endpoint has that session:
        a session lives as long as its connection, and one connection has it at a time.
        """
        cdef object other = self.session_names.get(name)
        if conn.state == S_CLOSED or conn.session == 0:
            raise ValueError("only a ready endpoint has a session")
        if other is not None and other is not conn:
            return False
        self.session_names[name] = conn
        conn.session_name = name
        return True

    def session_of(self, name):
        """The endpoint whose session has this name, or None."""
        return self.session_names.get(name)

    # -- the durable store, for the control plane -----------------------------------------

    def set_store(self, SegmentLog log):
        """Keep the queues in ``log`` (recovered: SegmentLog.recover) instead of in memory.
        Set before anything connects, after the schema."""
        if self.n_in or self.consumers or self.eslots.used:
            raise RuntimeError("the store is set before anything connects")
        log.attach(self.routes, self.outbox)
        self.store = log
        self.outbox.store = log

    def restore(self):
        """Put every live message the store recovered back in its route's queue, in sequence
        order (one delivered before the restart flagged REDELIVERED). Returns (restored, kept):
        kept are those whose route this broker does not have (another schema): they stay in
        the log, live. In C: no Python object per message."""
        cdef SegmentLog log = <SegmentLog?>self.store
        cdef Msg m
        cdef Idx e
        cdef const char *name
        cdef size_t name_len
        cdef const char *last_name = NULL
        cdef size_t last_len = 0
        cdef int32_t idx = -1
        cdef Route r
        cdef size_t restored = 0
        cdef size_t kept = 0
        cdef bint load = True
        cdef uint64_t times[2]
        cdef double wall_ms = time.time() * 1000.0
        cdef double left
        cdef uint32_t deadline
        if self.realtime:
            self.now = monotonic_now()   # (recovery took a while): wall_ms and now read together
        while True:
            # past the memory budget the rest stay paged out: only their index entries
            load = load and not (self.mem_max and self.mem_queued >= self.mem_max)
            if not log.next_restored(&m, &name, &name_len, &e, load, times):
                break
            if last_name == NULL or name_len != last_len or memcmp(name, last_name, name_len) != 0:
                last_name = name
                last_len = name_len
                if self.basic:
                    idx = 0 if name_len == 0 else -1
                else:
                    idx = self._route_index(PyBytes_FromStringAndSize(name, name_len)) if name_len else -1
                    if idx >= 0 and (<Route>self.routes[idx]).kind != R_QUEUE and \
                            (<Route>self.routes[idx]).kind != R_FANOUT:
                        idx = -1
            if idx < 0:
                log.forget(&m)
                kept += 1
                continue
            r = <Route>list_item(<PyObject *>self.routes, idx)
            m.route = idx
            if m.attempt:
                m.flags |= F_REDELIVERED
            if times[1]:
                # its deadline, on this process's clock, rounded down: never later (past: 1,
                # removed at its turn, counted)
                left = (<double>times[1] - wall_ms) / 10.0
                deadline = <uint32_t>(clock_cs(self) + left) if left > 0.0 else 1
                m.deadline = deadline if deadline else 1
                e.deadline = m.deadline
            if times[0] and <double>times[0] > wall_ms:
                # not due yet: delayed again, for what is left of its delay
                if m.data != NULL:
                    self.mem_queued += msg_cost(&m)
                else:
                    self.n_delayed_out += 1
                self.delay_insert(&m, &e, self.now + (<double>times[0] - wall_ms) / 1000.0)
                restored += 1
                continue
            if load:
                lane_push(r, &m, False)
                self.mem_queued += msg_cost(&m)
            else:
                lane_spill(r, &e, prio_of(&m))
                self.n_paged_out += 1
            self.n_route_queued += 1
            r.q_bytes += m.length
            self.q_bytes += m.length
            self.mark_pending(r)
            restored += 1
        if not self.backpressure and self.held() >= self.queue_high:
            self.backpressure = True
            if self.on_backpressure is not None:
                self.on_backpressure(True)
        return restored, kept

    def compact(self):
        """Compaction (the durable store's): when the log chose a segment to empty
        (SegmentLog.compact_due), copy forward every live message of it this dispatcher holds:
        in flight, queued in memory, paged out (their index entries then point at the copies).
        Returns (copied, left): left live in that segment (0: it is deleted once the batch with
        the copies is stored). (0, 0) when there is nothing to do. Not per message: run by the
        control plane's timer."""
        cdef SegmentLog log
        cdef Route r
        cdef Msg *m
        cdef IdxBlock *b
        cdef MsgRing q
        cdef int lv
        cdef uint64_t seq
        cdef uint32_t j
        cdef int32_t i
        cdef size_t k
        cdef uint64_t copied = 0
        cdef uint32_t no
        if not self.store.hooked:
            return 0, 0
        log = <SegmentLog>self.store
        if not log.compact_due():
            return 0, 0
        no = <uint32_t>log.compact_no
        left = 0
        try:
            for i in range(self.flights_cap):
                if slots_used(&self.fslots, i):
                    m = &self.flights[i].msg
                    if not m.copy and log.durable(m) and log.compacting(m.seq):
                        log.move_msg(m)
                        if m.deadline:
                            log.timed(m, TIME_EXPIRES, (<double>m.deadline - (self.now - self.epoch) * 100.0) / 100.0)
                        copied += 1
            for k in range(self.n_delayed):     # delayed, or waiting for their retry
                m = &self.delayed[k].msg
                if log.durable(m) and log.compacting(m.seq):
                    if m.data != NULL:
                        # (its index entry too, if it keeps one: it may be paged out when due)
                        log.move_msg(m, &self.delayed[k].idx if self.delayed[k].idx.len else NULL)
                    else:
                        log.move_idx(&self.delayed[k].idx)
                    # the copy's times, as its first ones would be gone with their segment
                    log.timed(m, TIME_NOT_BEFORE, self.delayed[k].due - self.now)
                    if m.deadline:
                        log.timed(m, TIME_EXPIRES, (<double>m.deadline - (self.now - self.epoch) * 100.0) / 100.0)
                    copied += 1
            for k in range(self.dead_msgs.count):   # on their way to the dead-letter queue
                m = &self.dead_msgs.items[(self.dead_msgs.head + k) & (self.dead_msgs.cap - 1)]
                if log.durable(m) and log.compacting(m.seq):
                    log.move_msg(m)
                    copied += 1
            for r in self.routes:
                if r.kind != R_QUEUE and r.kind != R_FANOUT:
                    continue
                for k in range(r.suspects.count):
                    m = &r.suspects.items[(r.suspects.head + k) & (r.suspects.cap - 1)]
                    if log.compacting(m.seq):
                        log.move_msg(m)
                        if m.deadline:
                            log.timed(m, TIME_EXPIRES, (<double>m.deadline - (self.now - self.epoch) * 100.0) / 100.0)
                        copied += 1
                for lv in range(NPRIO):
                    q = lane(r, lv)
                    for k in range(q.count):
                        m = &q.items[(q.head + k) & (q.cap - 1)]
                        if log.compacting(m.seq):
                            log.move_msg(m)
                            if m.deadline:
                                log.timed(m, TIME_EXPIRES, (<double>m.deadline - (self.now - self.epoch) * 100.0) / 100.0)
                            copied += 1
                    b = r.spills[lv].first
                    while b != NULL:
                        for j in range(b.head, b.tail):
                            if b.items[j].seg == no:
                                seq = log.move_idx(&b.items[j])
                                if b.items[j].deadline:
                                    log.timed_seq(seq, TIME_EXPIRES, (<double>b.items[j].deadline -
                                                                      (self.now - self.epoch) * 100.0) / 100.0)
                                copied += 1
                        b = b.next
        except BaseException:
            log.compact_abort()       # tried again later: a transient error must not stop it
            raise
        left = log.compact_end()
        return copied, left

    # -- command mode, for the control plane ----------------------------------------------

    def set_schema(self, CommandTable table, kinds):
        """Switch to command mode: ``kinds[i]`` is the RouteKind of ``table``'s command i."""
        cdef int32_t i
        if self.table is not None:
            raise RuntimeError("the schema is set once")
        if len(kinds) != len(table):
            raise ValueError("one kind per command of the table")
        if self.n_in or self.consumers:
            raise RuntimeError("the schema is set before anything connects")
        self.routes = [Route(i, table.name_of(i), int(kinds[i])) for i in range(len(table))]
        self.table = table
        self.basic = False

    def set_limits(self, int32_t idx, uint64_t max_messages, uint64_t max_bytes):
        """Limits on what waits in route ``idx`` (a queue or fanout command): messages and
        payload bytes, 0 for none. Past them a SEND to it is refused with QUEUE_FULL."""
        cdef Route r = <Route>self.routes[idx]
        r.max_messages = max_messages
        r.max_bytes = max_bytes

    def set_delivery(self, *, double lease=-1.0, int32_t max_deliveries=-1, int32_t max_crashes=-1,
                     double retry_base=-1.0, double retry_max=-1.0, bint realtime=False):
        """The broker's delivery guarantees (docs/semantics.md); an argument left out keeps its
        value. ``lease``: seconds a delivery may stay unanswered (0: none); ``max_deliveries``:
        failed deliveries (nacks and crashes) before the dead-letter queue, ``max_crashes``: of
        them, ended on the consumer's side (0: no limit); ``retry_base``/``retry_max``: the
        backoff of a nack without a delay. ``realtime``: the clock is read at every read
        (CLOCK_MONOTONIC, loop.time()'s), not only moved by tick()."""
        if lease >= 0.0:
            self.lease = lease
        if max_deliveries >= 0:
            self.max_deliveries = max_deliveries
        if max_crashes >= 0:
            self.max_crashes = max_crashes
        if retry_base >= 0.0:
            self.retry_base = retry_base
        if retry_max >= 0.0:
            self.retry_max = retry_max
        if self.retry_max < self.retry_base:
            raise ValueError("retry_max must be at least retry_base")
        self.realtime = realtime
        if realtime:
            self.now = monotonic_now()
            self.epoch = self.now

    def set_route_delivery(self, int32_t idx, *, double lease=0.0, int32_t max_deliveries=0,
                           int32_t max_crashes=0, int priority=0, double ttl=0.0, bint dead_letter_expired=False):
        """Route ``idx``'s own lease, max_deliveries and max_crashes (0: the broker's); the
        priority of its messages that name none (0-7), their time to live in seconds (0: none)
        and whether an expired message goes to the dead-letter queue."""
        cdef Route r = <Route>self.routes[idx]
        if lease < 0.0 or max_deliveries < 0 or max_crashes < 0 or ttl < 0.0:
            raise ValueError("lease, max_deliveries, max_crashes and ttl are 0 (the broker's) or more")
        if not 0 <= priority < NPRIO:
            raise ValueError(f"priority is 0 to {NPRIO - 1}")
        if ttl > 4000000.0:
            raise ValueError("ttl is at most 4,000,000 seconds")
        r.lease = lease
        r.max_deliveries = max_deliveries
        r.max_crashes = max_crashes
        r.default_priority = priority
        r.ttl_ms = <uint32_t>(ttl * 1000.0 + 0.5) if ttl > 0.0 else 0
        if ttl > 0.0 and r.ttl_ms == 0:
            r.ttl_ms = 1
        r.dead_letter_expired = dead_letter_expired

    def route_lease_of(self, int32_t idx) -> float:
        """The lease route ``idx``'s deliveries get (seconds; 0: none)."""
        cdef Route r = <Route>self.routes[idx]
        return r.lease if r.lease > 0.0 else self.lease

    def min_lease(self) -> float:
        """The shortest lease of any route (0: none): what WELCOME tells a consumer."""
        cdef Route r
        cdef double least = self.lease
        for r in self.routes:
            if r.lease > 0.0 and (least == 0.0 or r.lease < least):
                least = r.lease
        return least

    def replay(self, int32_t idx, payload) -> bool:
        """Accept ``payload`` into route ``idx`` as a new message of no producer (a dead letter
        put back: ``teomq dlq replay``), with its command's priority (not its ttl: it is not
        delivered late by choice). False when the bound or the store refuses it now."""
        cdef Msg m
        cdef Route r = <Route>self.routes[idx]
        cdef bytes data = bytes(payload)
        if r.kind != R_QUEUE and r.kind != R_FANOUT:
            raise ValueError(f"route {idx} is not a queue or fanout command")
        if self.held() >= self.queue_max or \
                ((r.max_messages or r.max_bytes or self.queue_max_bytes) and self.over_limit(r, len(data))):
            return False
        msg_fields(&m, F_NO_REPLY | <uint16_t>(r.default_priority << 8), 0, 0, 0, idx, 0)
        m.rx.shift = 0
        if store_append(self.store, &m, data, len(data)):
            return False
        r.n_in += 1
        self.n_in += 1
        if r.kind == R_QUEUE:
            self.route_queue(r, &m)
        else:
            self.route_fanout(r, &m, False)
        self.pump()
        self.schedule_flush()
        return True

    cdef int32_t _route_index(self, name) except -2:
        if self.table is None:
            return -1
        return self.table.find(name)

    def subscribe(self, Endpoint conn, name):
        """Subscribe a consumer to the command ``name``.

        Returns 0 when subscribed, 1 when it already was, -1 when ``name`` is not a command
        of the schema, -2 when it is a broker command (nothing to subscribe to).
        """
        cdef int32_t idx = self._route_index(name)
        cdef int32_t i
        cdef Route r
        if idx < 0:
            return -1
        r = <Route>self.routes[idx]
        if r.kind != R_FANOUT and r.kind != R_QUEUE:
            return -2
        if not conn.consumer or conn.state == S_CLOSED:
            raise ValueError("only a connected consumer can subscribe")
        for i in range(conn.nsubs):
            if self.subtab.items[conn.subs[i]].route == idx:
                return 1
        self.add_sub(conn, idx)
        return 0

    def unsubscribe(self, Endpoint conn, name):
        """End a subscription: 0 done, 1 there was none, -1 unknown name, -2 broker command.

        Deliveries already made stay with the consumer; nothing more of it is sent.
        """
        cdef int32_t idx = self._route_index(name)
        cdef int32_t i
        cdef Route r
        if idx < 0:
            return -1
        r = <Route>self.routes[idx]
        if r.kind != R_FANOUT and r.kind != R_QUEUE:
            return -2
        for i in range(conn.nsubs):
            if self.subtab.items[conn.subs[i]].route == idx:
                self.remove_sub(conn, i)
                return 0
        return 1

    def subscriptions_of(self, Endpoint conn) -> list:
        """Names of the commands ``conn`` is subscribed to (none in the basic scheme)."""
        cdef int32_t i
        if self.basic:
            return []
        return [(<Route>self.routes[self.subtab.items[conn.subs[i]].route]).name
                for i in range(conn.nsubs)]

    def route_stats(self) -> list:
        """Per command: name, routing, queued, subscribers, in, out, bytes (waiting), refused,
        levels (queued by priority level), delayed (not due yet)."""
        cdef Route r
        if self.basic:
            return []
        return [{"name": r.name, "routing": r.routing, "queued": r.n_waiting + r.n_spilled + r.suspects.count,
                 "subscribers": r.nmembers, "in": r.n_in, "out": r.n_out, "bytes": r.q_bytes,
                 "refused": r.n_refused, "levels": r.level_counts(), "delayed": r.n_delayed}
                for r in self.routes if r.kind == R_FANOUT or r.kind == R_QUEUE]

    def stats(self) -> dict:
        return {
            "in": self.n_in,
            "out": self.n_out,
            "answered": self.n_answered,
            "orphaned": self.n_orphaned,
            "redelivered": self.n_redelivered,
            "expired": self.n_expired,
            "refused": self.n_refused,
            "unknown_answers": self.n_unknown_answers,
            "queue": self.queued(),
            "held": self.held(),
            "inflight": self.n_inflight,
            "consumers": self.consumers,
            "backpressure": int(self.backpressure),
            "connections": self.eslots.used,
            "dropped": self.n_dropped,
            "backlog": self.n_backlog,
            "unknown_commands": self.n_unknown_commands,
            "subscriptions": self.subtab.t.used - (self.consumers if self.basic else 0),
            "last_seq": self.store.last_seq,
            "paged_out": self.n_paged_out - self.n_paged_in,
            "queued_bytes": self.q_bytes,
            "limit_refused": self.n_limit_refused,
            "memory_queued": self.mem_queued,
            "nacked": self.n_nacked,
            "crashed": self.n_crashed,
            "dead_lettered": self.n_dead,
            "rejected": self.n_rejected,
            "deadline_expired": self.n_deadline_expired,
            "cancelled": self.n_cancelled,
            "touched": self.n_touched,
            "late_answers": self.n_late_answers,
            "delayed": self.n_delayed,
            "delayed_paged_out": self.n_delayed_out,
            "delayed_in": self.n_delayed_in,
            "no_consumer": self.n_no_consumer,
        }
