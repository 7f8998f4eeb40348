# cython: language_level=3
"""The scheduler: one for every route, the basic scheme's queue included.

A route (routes.pyx) is what a message is sent to: in the basic scheme the one implicit
queue route (index 0, every consumer subscribes to it); in command mode one per command of
the schema, queue (one consumer at a time, in runs; at least once) or fanout (a copy to every subscriber).
Whatever has no taker waits in its route, FIFO; a consumer with credit is listed in the
ready ring of each queue route it subscribes to.

A delivery is a Flight: the Msg (broker sequence number, attempt, producer session), the
consumer holding it and its lease deadline. Its delivery id is the flight slot's handle
(slots.pxd), so a stale or forged id never matches. An answer goes to the producer's
session, not to a connection; today a session lives as long as its connection.

Nothing here knows frames or sockets: an Endpoint (endpoint.pyx) takes deliveries, replies
and errors in its own way.
"""

from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.ref cimport PyObject
from libc.stdint cimport int32_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, realloc

from teomq._core.endpoint cimport S_CLOSED, S_READY
from teomq._core.frame_codec cimport (
    E_DEAD_LETTERED, E_EXPIRED, E_LEASE_EXPIRED, E_REJECTED, E_UNKNOWN_ID, F_NO_ANSWER, F_NO_REPLY,
    F_REDELIVERED, F_REJECT, F_RETRY, teomq_ld64,
)
from teomq._core.ring_queue cimport NPRIO, Idx, MsgRing, msg_cost, payload_release, prio_of
from teomq._core.routes cimport (
    R_FANOUT, R_QUEUE, Sub, lane, lane_push, lane_spill, lane_took, top_level, u64ring_pop, u64ring_push,
)
from teomq._core.slots cimport (
    list_item, slots_find, slots_free, slots_handle, slots_init, slots_put, slots_take, slots_take_into,
    slots_used,
)
from teomq._core.store cimport TIME_NOT_BEFORE, store_delivered, store_done

import msgpack

cdef int32_t SLOTS_MAX = 0x40000000
# a queue with messages paged out reads the next ones back once fewer than this are in memory
cdef size_t PAGE_AHEAD = 2048
cdef bytes ERR_UNKNOWN_ID = msgpack.packb(
    {"code": E_UNKNOWN_ID, "reason": "answer for a delivery this connection does not hold"})
cdef bytes ERR_LEASE_EXPIRED = msgpack.packb(
    {"code": E_LEASE_EXPIRED, "reason": "answer refused: the delivery's lease ran out and the message went "
     "back to its queue (its producer gets one answer, from the delivery that holds it now)"})
cdef bytes ERR_EXPIRED = msgpack.packb(
    {"code": E_EXPIRED, "reason": "expired: the request's deadline passed before a consumer took it; "
     "it was removed, never delivered"})

# how a delivery failed (Scheduler.fail), and why a message is dead-lettered; M_CANCELLED: a
# Msg flag of the broker's own (never on the wire): its producer withdrew it while in flight
cdef enum:
    M_CANCELLED = 0x8000
    M_ENDED = 0x4000     # its last delivery ended on the consumer's side: a consumer that answers first
    FAIL_NACK = 1        # its consumer said so (ANSWER flagged RETRY)
    FAIL_CRASH = 2       # its consumer went away, or let the lease run out
    DEAD_REJECTED = 1
    DEAD_DELIVERIES = 2
    DEAD_CRASHES = 3
    DEAD_EXPIRED = 4
DEAD_REASONS = {DEAD_REJECTED: "rejected", DEAD_DELIVERIES: "max_deliveries", DEAD_CRASHES: "max_crashes",
                DEAD_EXPIRED: "expired"}
# at most this many consumer names and error texts in a failed message's history
cdef Py_ssize_t HISTORY_NAMES = 16
cdef Py_ssize_t HISTORY_ERRORS = 8


cdef inline double route_lease(Scheduler s, int32_t route) noexcept:
    cdef double lease = (<Route>list_item(<PyObject *>s.routes, route)).lease
    return lease if lease > 0.0 else s.lease


cdef inline bint before(double due, uint64_t seq, const Delayed *d) noexcept:
    # the heap's order: by due time, then by sequence number (those due at once come out in the
    # order they were accepted: a level's FIFO holds for messages delayed alike)
    return due < d.due or (due == d.due and seq < d.msg.seq)


cdef int _fit(list records, int32_t cap) except -1:
    # a slot table's Python records (endpoints, sessions) grown to its cap, with None
    while len(records) < cap:
        records.append(None)
    return 0


cdef inline int wait_push(Scheduler s, Route r, Msg *m) except -1:
    # m joins the tail of its level's waiting messages in r: in memory, or paged out (only its
    # index entry kept, its payload released) when the durable store has its record and the
    # memory budget is spent, or that level already has messages paged out (FIFO: they come first)
    cdef Idx e
    cdef int lv = prio_of(m)
    # (not one delivered before, a retry: its record's attempts, nacks and crashes are stale, and
    # read back it would start them again and escape max_deliveries)
    if s.store.hooked and m.attempt == 0 and (r.spills[lv].count or (s.mem_max and s.mem_queued >= s.mem_max)) \
            and s.store.locate(m, &e):
        lane_spill(r, &e, lv)
        payload_release(m.data)
        s.n_paged_out += 1
    else:
        lane_push(r, m, False)
        s.mem_queued += msg_cost(m)
    s.n_route_queued += 1
    r.q_bytes += m.length
    s.q_bytes += m.length
    return 0


cdef inline void unqueued(Scheduler s, Route r, Msg *m) noexcept:
    # m left r's waiting messages or suspects (in memory): what they hold goes down
    s.mem_queued -= msg_cost(m)
    s.n_route_queued -= 1
    r.q_bytes -= m.length
    s.q_bytes -= m.length


cdef inline bint wait_pop(Scheduler s, Route r, Msg *m) except -1:
    # the head of r's highest level with messages waiting, read back from the log first if it is
    # paged out; False when none (or the read failed: logged by the store, tried again at the
    # next tick). A message whose deadline passed is removed on the way (expire_msg).
    cdef int lv
    cdef MsgRing q
    cdef int k
    while r.levels:
        lv = top_level(r)
        q = lane(r, lv)
        if q.count < PAGE_AHEAD and r.spills[lv].count:
            # read ahead before the head runs dry: consumers never wait for a read of their own
            k = s.store.page_in(&r.spills[lv], q, r.index, &s.mem_queued, s.mem_max)
            s.n_paged_in += k
            r.n_waiting += k
            r.n_spilled -= k
        if q.count == 0:
            return False
        q.pop_front(m)
        lane_took(r, lv)
        unqueued(s, r, m)
        if m.deadline == 0 or m.deadline > clock_cs(s):
            return True
        s.expire_msg(m)
    return False


cdef int credit_back(Scheduler s, Endpoint c, int32_t n, uint64_t fid) except -1:
    # c answered delivery fid (or answered late): n credits come back. While c holds a suspect
    # alone (isolated) or drains for one (reserved) they are withheld: until that suspect's
    # delivery ends, or until c holds nothing. A lapse's withheld credit comes back with any answer.
    if c.isolated:
        if fid != c.isolated:
            c.withheld += n
            return 0
        c.isolated = 0
    elif c.reserved >= 0:
        if c.inflight:
            c.withheld += n
            return 0
        s.unreserve(c)       # drained: the suspect it waited for is its next delivery
    c.credit += n + c.withheld
    c.withheld = 0
    if c.credit > 0:
        s.serve(c)
    return 0


cdef inline Endpoint sub_conn(Scheduler s, int32_t sid):
    # the consumer of a subscription in use (subscriptions end before their endpoint)
    return <Endpoint>s.conns[<uint32_t>(s.subtab.items[sid].conn & 0xFFFFFFFFu)]


cdef inline void flight_release(Scheduler s, int32_t idx) noexcept:
    # the flight's slot is free again; its delivery id goes stale
    if s.flights[idx].msg.copy:
        s.n_copies_inflight -= 1
    slots_put(&s.fslots, idx)
    s.n_inflight -= 1


cdef inline void flight_unlink(Scheduler s, Endpoint c, int32_t idx) noexcept:
    # take flight idx out of c's list of flights (delivery order)
    cdef Flight *f = &s.flights[idx]
    if f.prev >= 0:
        s.flights[f.prev].next = f.next
    else:
        c.fl_head = f.next
    if f.next >= 0:
        s.flights[f.next].prev = f.prev
    else:
        c.fl_tail = f.prev
    c.inflight -= 1


# -- the queue routes' runs (module functions, inline: per delivery) ------------------------
#
# The head of a queue route's ready ring takes a run of consecutive messages: at most
# min(its free credit when the run begins, Scheduler.run); then it goes to the tail (while it
# has credit) and the next consumer's run begins. So a consumer with more free credit takes
# longer runs, one without credit none, and a read of many messages becomes a few writes of
# many messages each. With run 1 this is the per-message round robin.

cdef inline PyObject *take_ready(Scheduler s, Route r, int32_t *sid) noexcept:
    # The consumer at the head of r's ready ring (its subscription id in *sid), if it has
    # credit, or NULL; borrowed: the endpoint list holds it. The head stays in the ring until
    # its run ends (deliver_to_sub). Entries of unsubscribed subs (generation changed) and of
    # consumers without credit are dropped.
    cdef PyObject *c
    cdef int32_t i
    if s.paused:
        return NULL
    while r.ready.count:
        i = slots_find(&s.subtab.t, r.ready.items[r.ready.head])
        if i >= 0:
            c = list_item(<PyObject *>s.conns, <Py_ssize_t>(s.subtab.items[i].conn & 0xFFFFFFFFu))
            if (<Endpoint>c).credit > 0:
                if r.run_left <= 0:   # its run begins
                    r.run_left = (<Endpoint>c).credit if (<Endpoint>c).credit < s.run else s.run
                sid[0] = i
                return c
            s.subtab.items[i].listed = False
            (<Endpoint>c).unlisted = True
        u64ring_pop(&r.ready)
        r.run_left = 0
    return NULL


cdef inline int list_sub(Scheduler s, Route r, int32_t sid) except -1:
    # put subscription sid (of route r) at the tail of r's ready ring
    s.subtab.items[sid].listed = True
    u64ring_push(&r.ready, slots_handle(&s.subtab.t, sid))
    if r.levels or r.suspects.count:
        s.mark_pending(r)
    return 0


cdef inline int deliver_to_sub(Scheduler s, Route r, int32_t sid, PyObject *c, Msg *m) except -1:
    # to c, the ready ring's head take_ready() gave (subscription sid); when its run ends it
    # goes to the tail while it has credit
    s.deliver(<Endpoint>c, m)
    r.n_out += 1
    r.run_left -= 1
    if r.run_left <= 0 or (<Endpoint>c).credit <= 0:
        u64ring_pop(&r.ready)
        r.run_left = 0
        if (<Endpoint>c).credit > 0:
            u64ring_push(&r.ready, slots_handle(&s.subtab.t, sid))
        else:
            s.subtab.items[sid].listed = False
    return 0


cdef class Scheduler:

    def __cinit__(self, *args, size_t backlog_max=10000, double lease=0.0, int32_t run=16, **kwargs):
        if run < 1:
            raise ValueError("run must be at least 1")
        if backlog_max < 1:
            raise ValueError("backlog_max must be at least 1")
        if not lease >= 0.0:
            raise ValueError("lease must be 0 (none) or a positive number of seconds")
        self.conns = []
        self.sess_ep = []
        self.session_names = {}
        self.store = Store()
        slots_init(&self.eslots, 64, SLOTS_MAX)
        slots_init(&self.sslots, 64, SLOTS_MAX)
        slots_init(&self.fslots, 256, SLOTS_MAX)
        self.flights_cap = self.fslots.cap
        self.flights = <Flight *>malloc(self.flights_cap * sizeof(Flight))
        if self.flights == NULL:
            raise MemoryError()
        self.routes = [Route(0, b"", R_QUEUE)]
        self.basic = True
        self.subtab = SubTable()
        self.pending_routes = []
        self.backlog_max = backlog_max
        self.lease = lease
        self.run = run
        self.max_deliveries = 0      # no limits unless set (set_delivery; the Broker's are 20 and 3)
        self.max_crashes = 0
        self.retry_base = 1.0
        self.retry_max = 60.0
        self.rng = 0x9E3779B97F4A7C15
        self.dead_msgs = MsgRing(16, <size_t>1 << 32)
        self.dead_meta = []
        self.history = {}

    def __dealloc__(self):
        cdef int32_t i
        cdef size_t k
        if self.flights != NULL:
            for i in range(self.flights_cap):
                if slots_used(&self.fslots, i):   # (not store.done: GC may have cleared store)
                    payload_release(self.flights[i].msg.data)
            free(self.flights)
        if self.delayed != NULL:
            for k in range(self.n_delayed):
                payload_release(self.delayed[k].msg.data)
            free(self.delayed)
        slots_free(&self.eslots)
        slots_free(&self.sslots)
        slots_free(&self.fslots)

    # -- endpoints and sessions -----------------------------------------------------------

    cdef int register(self, Endpoint e, Outbox outbox) except -1:
        cdef int32_t slot = slots_take(&self.eslots)
        _fit(self.conns, self.eslots.cap)
        self.conns[slot] = e
        e.slot = <uint32_t>slot
        e.gen = self.eslots.gen[slot]
        e.outbox = outbox
        return 0

    cdef Endpoint live(self, uint64_t handle):
        cdef int32_t i = slots_find(&self.eslots, handle)
        return None if i < 0 else <Endpoint>self.conns[i]

    cdef int open_session(self, Endpoint e) except -1:
        cdef int32_t s = slots_take(&self.sslots)
        _fit(self.sess_ep, self.sslots.cap)
        self.sess_ep[s] = e
        e.session = slots_handle(&self.sslots, s)
        return 0

    cdef int ready(self, Endpoint e, bint consumer, int32_t prefetch) except -1:
        # the handshake is done: a session for its answers, and a consumer's credit
        if consumer and prefetch < 1:
            raise ValueError("a consumer needs a prefetch of at least 1")
        e.state = S_READY
        self.open_session(e)
        if consumer:
            e.consumer = True
            e.prefetch = prefetch
            e.credit = prefetch
            self.consumers += 1
            if self.basic:
                self.add_sub(e, 0)
        return 0

    cdef int release(self, Endpoint e) except -1:
        # e is gone: what it held goes back (in delivery order, to the head of its route),
        # its fanout copies and subscriptions go with it, its slot and session are freed
        cdef int32_t s
        if e.state == S_CLOSED:
            return 0
        e.state = S_CLOSED
        if e.reserved >= 0:
            self.unreserve(e)
        if e.consumer:
            e.consumer = False
            self.consumers -= 1
        self.requeue_all(e)
        self.drop_subs(e)
        self.conns[e.slot] = None
        slots_put(&self.eslots, <int32_t>e.slot)
        if e.session:
            s = slots_find(&self.sslots, e.session)
            if s >= 0:
                self.sess_ep[s] = None
                slots_put(&self.sslots, s)
        if e.session_name is not None and self.session_names.get(e.session_name) is e:
            del self.session_names[e.session_name]
        e._clear_out()
        return 0

    # -- flights --------------------------------------------------------------------------

    cdef int32_t flight_alloc(self) except -1:
        cdef int32_t idx = slots_take_into(&self.fslots, <void **>&self.flights, &self.flights_cap,
                                           sizeof(Flight))
        self.n_inflight += 1
        return idx

    cdef int deliver(self, Endpoint c, Msg *m) except -1:
        cdef int32_t idx = self.flight_alloc()
        cdef Flight *f = &self.flights[idx]
        cdef double lease
        f.msg = m[0]
        if f.msg.attempt < 0xFFFF:
            f.msg.attempt += 1
        if m.copy:
            self.n_copies_inflight += 1
        f.consumer = c.slot
        lease = route_lease(self, m.route)
        f.deadline = self.now + lease if lease > 0.0 else 0.0
        f.prev = c.fl_tail
        f.next = -1
        if c.fl_tail >= 0:
            self.flights[c.fl_tail].next = idx
        else:
            c.fl_head = idx
        c.fl_tail = idx
        c.inflight += 1
        c.credit -= 1
        if c.credit <= 0:
            c.unlisted = True      # its ready-ring entries may be dropped from now on
        self.n_out += 1
        store_delivered(self.store, &f.msg)
        return c.take(&f.msg, slots_handle(&self.fslots, idx))

    cdef int answer(self, Endpoint c, uint64_t fid, uint16_t flags, const char *p, size_t n,
                    const Received *rx) except -1:
        # c answers delivery fid: the answer goes to the producer's session, the flight ends,
        # c gets its credit back
        cdef int32_t idx = slots_find(&self.fslots, fid)
        cdef int32_t s
        cdef Flight *f
        cdef Msg m
        if idx < 0 or self.flights[idx].consumer != c.slot:
            self.n_unknown_answers += 1
            if c.lapsed:
                # a late answer for a delivery whose lease expired: refused, and c's credit back
                c.lapsed -= 1
                self.n_late_answers += 1
                credit_back(self, c, 1, fid)
                if c.leases:
                    return c._add_error(E_LEASE_EXPIRED, fid, ERR_LEASE_EXPIRED)
            elif c.consumer:
                credit_back(self, c, 0, fid)   # it answers again: a lapse's withheld credit comes back
            return c._add_error(E_UNKNOWN_ID, fid, ERR_UNKNOWN_ID)
        f = &self.flights[idx]
        flight_unlink(self, c, idx)
        if flags & (F_RETRY | F_REJECT) and c.leases:
            # a nack (RETRY) or a reject: the message is not done; c is (its credit comes back)
            m = f.msg
            flight_release(self, idx)
            self.nack(c, &m, flags, p, n)
            if c.consumer:
                c.proven = True
                credit_back(self, c, 1, fid)
            return 0
        if f.msg.nacks or f.msg.crashes:
            self.history.pop(f.msg.seq, None)
        if not (f.msg.flags & F_NO_REPLY) and not (flags & F_NO_ANSWER):
            s = slots_find(&self.sslots, f.msg.session)
            if s >= 0:
                (<Endpoint>list_item(<PyObject *>self.sess_ep, s)).reply(f.msg.msg_id, p, n, rx)
                self.n_answered += 1
            else:
                self.n_orphaned += 1   # its producer is gone: answered into nothing
        store_done(self.store, &f.msg)
        flight_release(self, idx)
        if c.consumer:
            c.proven = True
            if c.withheld == 0 and c.reserved < 0 and c.isolated == 0:
                c.credit += 1            # (the steady state)
                if c.unlisted or c.backlog is not None:   # else nothing for serve() to do
                    self.serve(c)
            else:
                credit_back(self, c, 1, fid)
        return 0

    cdef int nack(self, Endpoint c, Msg *m, uint16_t flags, const char *p, size_t n) except -1:
        # c's ANSWER flagged RETRY ({"delay", "error"}) or REJECT ({"reason"}) for m
        cdef double delay = -1.0
        error = None
        try:
            doc = msgpack.unpackb(PyBytes_FromStringAndSize(p, n)) if n else {}
        except Exception:
            doc = {}
        if not isinstance(doc, dict):
            doc = {}
        if m.copy:
            store_done(self.store, m)    # a fanout copy is its subscriber's: not retried
            self.n_nacked += 1
            return 0
        if m.flags & M_CANCELLED:
            return self.withdraw(m)
        if doc.get("release") is True and flags & F_RETRY:
            # handed back unhandled (a consumer closing): not a failure, back at the head
            m.flags |= F_REDELIVERED
            return self.to_head(m)
        if flags & F_REJECT:
            reason = doc.get("reason")
            self.note_failure(c, m, reason)
            self.n_rejected += 1
            return self.dead_letter(m, DEAD_REJECTED, reason)
        error = doc.get("error")
        d = doc.get("delay")
        if isinstance(d, (int, float)) and d >= 0:
            delay = d if d < 1e7 else 1e7
        return self.fail(c, m, FAIL_NACK, delay, error)

    cdef int requeue(self, Endpoint c, int32_t idx) except -1:
        # a flight c no longer holds goes back: to the head of its route, flagged redelivered
        # (an ending on the consumer's side: counted, past max_crashes dead-lettered; not while
        # the broker stops, nor a lease run out at a consumer that never answered); a fanout
        # copy (c's alone) goes with c when c is gone, or to the head of c's backlog; one its
        # producer cancelled is dropped
        cdef Msg m = self.flights[idx].msg
        if c.isolated == slots_handle(&self.fslots, idx):
            c.isolated = 0               # (a lapse: its credit stays withheld until it answers)
        flight_release(self, idx)
        m.flags |= F_REDELIVERED | M_ENDED
        if m.flags & M_CANCELLED:
            self.withdraw(&m)            # its producer gave up on it: not delivered again
        elif m.copy:
            if c.state == S_CLOSED:
                store_done(self.store, &m)
                self.n_dropped += 1
            else:
                if c.backlog is None:
                    c.backlog = self.new_backlog()
                c.backlog.push_front(&m)
                self.n_backlog += 1
                self.n_redelivered += 1
        elif self.paused or (c.state != S_CLOSED and not c.proven):
            # the broker stopping; or a lease run out at a consumer that never answered anything
            # (a new or hung one is no evidence against the message): back, not counted
            self.to_head(&m)
        else:
            self.fail(c, &m, FAIL_CRASH, 0.0, None)
        return 0

    cdef int to_head(self, Msg *m) except -1:
        self.n_redelivered += 1
        return self.requeue_msg(<Route>self.routes[m.route], m, True)

    cdef int requeue_all(self, Endpoint c) except -1:
        # newest first onto the heads, so each route's head ends in delivery order
        cdef int32_t idx = c.fl_tail
        cdef int32_t prev
        while idx >= 0:
            prev = self.flights[idx].prev
            self.requeue(c, idx)
            idx = prev
        c.fl_head = -1
        c.fl_tail = -1
        c.inflight = 0
        return 0

    cdef int expire(self, Endpoint c) except -1:
        # c's deliveries whose lease ran out by now go back, newest first onto the heads (as
        # requeue_all: each route's head ends in delivery order). c gets no new delivery until
        # it answers something: its free credit is withheld, and the expired deliveries' credit
        # comes back one by one as it answers them late (answer()). Touched leases (TOUCH) are
        # not in deadline order, so the whole list is looked at.
        cdef int32_t idx = c.fl_tail
        cdef int32_t prev
        cdef double deadline
        cdef uint32_t before = c.lapsed
        while idx >= 0:
            prev = self.flights[idx].prev
            deadline = self.flights[idx].deadline
            if deadline != 0.0 and deadline <= self.now:
                flight_unlink(self, c, idx)
                c.lapsed += 1
                self.n_expired += 1
                self.requeue(c, idx)
            idx = prev
        if c.lapsed != before and c.consumer:
            if c.reserved >= 0:
                self.unreserve(c)       # a lapsed consumer is no one to wait for
            if c.credit > 0:
                c.withheld += c.credit
                c.credit = 0
                c.unlisted = True
        return 0

    # -- failures, retries, dead letters (docs/semantics.md) --------------------------------

    cdef int note_failure(self, Endpoint c, Msg *m, object error) except -1:
        # m's history: who held it, what went wrong (kept while it lives, told to on_dead)
        cdef list h = self.history.get(m.seq)
        if h is None:
            h = [[], []]
            self.history[m.seq] = h
        if len(h[0]) < HISTORY_NAMES:
            h[0].append(c.log_name.decode("utf-8", "replace"))
        if error is not None:
            if len(h[1]) >= HISTORY_ERRORS:
                del h[1][0]
            h[1].append(str(error)[:1000])
        return 0

    cdef int fail(self, Endpoint c, Msg *m, int how, double delay, object error) except -1:
        # A delivery of m (not a fanout copy) failed: counted; past the route's max_crashes or
        # max_deliveries it is dead-lettered; else a crash puts it back at the head, a nack
        # behind the others (after delay; delay < 0: backoff with jitter)
        cdef Route r = <Route>self.routes[m.route]
        cdef int32_t maxc = r.max_crashes if r.max_crashes > 0 else self.max_crashes
        cdef int32_t maxd = r.max_deliveries if r.max_deliveries > 0 else self.max_deliveries
        cdef double base
        cdef uint64_t x
        m.flags |= F_REDELIVERED
        if how == FAIL_NACK:
            m.flags &= ~M_ENDED          # its consumer is alive: its turn, as any message's
            if m.nacks < 0xFFFF:
                m.nacks += 1
            self.n_nacked += 1
        else:
            if m.crashes < 0xFF:
                m.crashes += 1
            self.n_crashed += 1
            if error is None:
                error = "its lease ran out" if c.state != S_CLOSED else "its consumer went away"
        self.note_failure(c, m, error)
        if maxc > 0 and m.crashes >= maxc:
            return self.dead_letter(m, DEAD_CRASHES, error)
        if maxd > 0 and <int32_t>m.nacks + <int32_t>m.crashes >= maxd:
            return self.dead_letter(m, DEAD_DELIVERIES, error)
        if how == FAIL_CRASH:
            return self.to_head(m)
        self.n_redelivered += 1
        if delay < 0.0:
            # exponential backoff, equal jitter: half of base * 2^(nacks - 1), plus up to as much
            base = self.retry_base * (<double>(1 << (m.nacks - 1 if m.nacks < 31 else 30)))
            if base > self.retry_max:
                base = self.retry_max
            x = self.rng
            x ^= x << 13
            x ^= x >> 7
            x ^= x << 17
            self.rng = x
            delay = base / 2.0 + base / 2.0 * (<double>(x >> 11) / 9007199254740992.0)
        if delay > 0.0:
            if self.store.hooked:
                self.store.timed(m, TIME_NOT_BEFORE, delay)   # a restart keeps the wait
            return self.delay_push(m, self.now + delay)
        return self.requeue_msg(r, m, False)

    cdef int dead_letter(self, Msg *m, int reason, object detail) except -1:
        # m goes to the dead-letter queue: handed to on_dead at the next pump (flush_dead)
        self.dead_msgs.push_back_always(m)
        self.dead_meta.append((reason, detail, self.history.pop(m.seq, None)))
        return 0

    cdef int flush_dead(self) except -1:
        # Hand the dead letters to on_dead (the broker stores them: docs/semantics.md); once it
        # returned, each message is done and its producer told. If it raises they stay, live,
        # and are tried again at the next tick.
        cdef list docs = []
        cdef list meta = self.dead_meta
        cdef size_t i
        cdef Msg *m
        cdef Endpoint prod
        cdef Msg m_out
        cdef int32_t si
        cdef size_t k = len(meta)
        for i in range(k):
            m = &self.dead_msgs.items[(self.dead_msgs.head + i) & (self.dead_msgs.cap - 1)]
            reason, detail, hist = meta[i]
            si = slots_find(&self.sslots, m.session) if m.session else -1
            prod = <Endpoint>self.sess_ep[si] if si >= 0 else None
            docs.append({
                "route": (<Route>self.routes[m.route]).name.decode("utf-8", "replace"),
                "payload": PyBytes_FromStringAndSize(m.data, m.length),
                "msg_id": m.msg_id, "seq": m.seq,
                "producer": prod.log_name.decode("utf-8", "replace") if prod is not None else "",
                "attempts": m.attempt, "nacks": m.nacks, "crashes": m.crashes,
                "reason": DEAD_REASONS[reason], "detail": "" if detail is None else str(detail)[:1000],
                "consumers": hist[0] if hist is not None else [],
                "errors": hist[1] if hist is not None else [],
            })
        if self.on_dead is not None:
            self.on_dead(docs)          # raises: nothing below is done, all of them stay
        self.dead_meta = []
        for i in range(k):
            self.dead_msgs.pop_front(&m_out)
            reason = meta[i][0]
            self.n_dead += 1
            code = E_REJECTED if reason == DEAD_REJECTED else E_EXPIRED if reason == DEAD_EXPIRED else E_DEAD_LETTERED
            self.notify(&m_out, code, msgpack.packb({
                "code": code,
                "reason": (f"rejected by its consumer: {docs[i]['detail']}" if reason == DEAD_REJECTED else
                           f"expired and dead-lettered: {docs[i]['detail']}" if reason == DEAD_EXPIRED else
                           f"dead-lettered ({docs[i]['reason']}: {m_out.attempt} deliveries, {m_out.nacks} "
                           f"failed, {m_out.crashes} crashed): {docs[i]['detail']}")}))
            store_done(self.store, &m_out)
        return 0

    cdef int notify(self, Msg *m, int code, bytes payload) except -1:
        # an ERROR about m to its producer's session (unless it wants no answer, or is gone)
        cdef int32_t si
        if m.flags & F_NO_REPLY or m.session == 0:
            return 0
        si = slots_find(&self.sslots, m.session)
        if si >= 0:
            (<Endpoint>list_item(<PyObject *>self.sess_ep, si))._add_error(code, m.msg_id, payload)
        return 0

    cdef int expire_msg(self, Msg *m) except -1:
        # m's deadline passed before any consumer answered it: removed, its producer told (or
        # to the dead-letter queue, where its command says so; its producer told EXPIRED then)
        self.n_deadline_expired += 1
        if (<Route>self.routes[m.route]).dead_letter_expired and not m.copy:
            return self.dead_letter(m, DEAD_EXPIRED, "its time to live ran out before it was delivered")
        if m.nacks or m.crashes:
            self.history.pop(m.seq, None)
        if m.attempt == 0:
            self.notify(m, E_EXPIRED, ERR_EXPIRED)
        else:
            self.notify(m, E_EXPIRED, msgpack.packb({"code": E_EXPIRED, "reason": (
                f"expired: the request's deadline passed before it was answered: delivered {m.attempt} times, "
                f"none answered ({m.nacks} failed, {m.crashes} crashed); it was removed")}))
        store_done(self.store, m)
        return 0

    cdef int withdraw(self, Msg *m) except -1:
        # a cancelled message (its producer gave up) that came back: done, not delivered again
        self.history.pop(m.seq, None)
        store_done(self.store, m)
        return 0

    cdef int sweep_head(self, Route r) except -1:
        # requests at the head of r's waiting queue whose deadline passed are removed now (their
        # producers told), not when a consumer comes; those behind a live one wait for their turn
        cdef Msg *h
        cdef Msg m
        cdef int lv
        cdef MsgRing q
        cdef uint32_t now = clock_cs(self)
        while r.suspects.count:
            h = &r.suspects.items[r.suspects.head]
            if h.deadline == 0 or h.deadline > now:
                break
            r.suspects.pop_front(&m)
            self.n_suspects -= 1
            unqueued(self, r, &m)
            self.expire_msg(&m)
        for lv in range(NPRIO):
            q = lane(r, lv)
            while q.count:
                h = &q.items[q.head]
                if h.deadline == 0 or h.deadline > now:
                    break
                q.pop_front(&m)
                lane_took(r, lv)
                unqueued(self, r, &m)
                self.expire_msg(&m)
        return 0

    cdef int delay_push(self, Msg *m, double due) except -1:
        # m waits until due (the binary heap of delayed messages), then joins its queue's tail.
        # A message whose record the durable store just wrote (a queue's, or a fanout's kept for
        # later) keeps where it is (its index entry): past the memory budget its payload is
        # released now (read back when its queue needs it), else when it falls due behind
        # messages of its level paged out (FIFO). Not one delivered before (a retry): its
        # record's attempts would be stale.
        cdef Idx e
        cdef int kind = (<Route>self.routes[m.route]).kind
        if self.store.hooked and m.attempt == 0 and not m.copy and (kind == R_QUEUE or kind == R_FANOUT) and \
                self.store.locate(m, &e):
            if self.mem_max and self.mem_queued >= self.mem_max:
                payload_release(m.data)
                m.data = NULL
                self.n_delayed_out += 1
            else:
                self.mem_queued += msg_cost(m)
            return self.delay_insert(m, &e, due)
        self.mem_queued += msg_cost(m)
        return self.delay_insert(m, NULL, due)

    cdef int delay_insert(self, Msg *m, const Idx *e, double due) except -1:
        # m into the heap (e: where its record is, or NULL; m.data NULL: paged out, e given)
        cdef size_t i, parent
        cdef Delayed *nd
        cdef Route r = <Route>list_item(<PyObject *>self.routes, m.route)
        if self.n_delayed == self.n_delayed_cap:
            nd = <Delayed *>realloc(self.delayed, (2 * self.n_delayed_cap + 16) * sizeof(Delayed))
            if nd == NULL:
                raise MemoryError()
            self.delayed = nd
            self.n_delayed_cap = 2 * self.n_delayed_cap + 16
        i = self.n_delayed
        self.n_delayed += 1
        while i > 0:
            parent = (i - 1) >> 1
            if not before(due, m.seq, &self.delayed[parent]):
                break
            self.delayed[i] = self.delayed[parent]
            i = parent
        self.delayed[i].due = due
        self.delayed[i].msg = m[0]
        if e != NULL:
            self.delayed[i].idx = e[0]
        else:
            self.delayed[i].idx.len = 0         # none: it stays in memory when due
        r.n_delayed += 1                        # (a queue's limits count them: over_limit)
        r.d_bytes += m.length
        self.d_bytes += m.length
        return 0

    cdef int delay_take(self, size_t at, Msg *out, Idx *e) except -1:
        # remove heap entry ``at`` into out (and e: where its record is, when out.data is NULL),
        # the heap kept in order
        cdef size_t i = at
        cdef size_t child
        cdef Delayed last
        cdef Route r
        out[0] = self.delayed[at].msg
        e[0] = self.delayed[at].idx
        if out.data != NULL:
            self.mem_queued -= msg_cost(out)
        else:
            self.n_delayed_out -= 1
        r = <Route>list_item(<PyObject *>self.routes, out.route)
        r.n_delayed -= 1
        r.d_bytes -= out.length
        self.d_bytes -= out.length
        self.n_delayed -= 1
        if at == self.n_delayed:
            return 0
        last = self.delayed[self.n_delayed]
        # sift up (the last may be earlier than at's parent), then down
        while i > 0 and before(last.due, last.msg.seq, &self.delayed[(i - 1) >> 1]):
            self.delayed[i] = self.delayed[(i - 1) >> 1]
            i = (i - 1) >> 1
        while True:
            child = 2 * i + 1
            if child >= self.n_delayed:
                break
            if child + 1 < self.n_delayed and \
                    before(self.delayed[child + 1].due, self.delayed[child + 1].msg.seq, &self.delayed[child]):
                child += 1
            if not before(self.delayed[child].due, self.delayed[child].msg.seq, &last):
                break
            self.delayed[i] = self.delayed[child]
            i = child
        self.delayed[i] = last
        return 0

    cdef int delay_due(self) except -1:
        # the delayed messages due by now join the tails of their queues (those paged out as
        # index entries: read back in their turn, their deadline checked then)
        cdef Msg m
        cdef Idx e
        cdef Route r
        cdef int lv
        while self.n_delayed and self.delayed[0].due <= self.now:
            self.delay_take(0, &m, &e)
            r = <Route>self.routes[m.route]
            lv = prio_of(&m)
            if m.data != NULL and e.len and (r.spills[lv].count or (self.mem_max and self.mem_queued >= self.mem_max)):
                # its level has messages paged out (they came first: behind them, FIFO), or
                # the memory budget is spent: it joins them as its index entry
                payload_release(m.data)
                m.data = NULL
            if m.data == NULL:
                lane_spill(r, &e, lv)
                self.n_paged_out += 1
                self.n_route_queued += 1
                r.q_bytes += m.length
                self.q_bytes += m.length
                self.mark_pending(r)
            elif m.deadline and m.deadline <= clock_cs(self):
                self.expire_msg(&m)
            else:
                self.requeue_msg(r, &m, False)
        return 0

    cdef bint isolating(self, Route r) noexcept:
        # suspects are delivered alone only where crashes are limited (else nothing is blamed)
        return (r.max_crashes if r.max_crashes > 0 else self.max_crashes) > 0

    cdef PyObject *take_idle(self, Route r, int32_t *sid) noexcept:
        # a consumer of r's ready ring with credit and nothing in flight (borrowed), one that
        # has answered before first; NULL when none
        cdef size_t j
        cdef int32_t i
        cdef PyObject *c
        cdef PyObject *found = NULL
        for j in range(r.ready.count):
            i = slots_find(&self.subtab.t, r.ready.items[(r.ready.head + j) & (r.ready.cap - 1)])
            if i >= 0:
                c = list_item(<PyObject *>self.conns, <Py_ssize_t>(self.subtab.items[i].conn & 0xFFFFFFFFu))
                if (<Endpoint>c).credit > 0 and (<Endpoint>c).inflight == 0:
                    if (<Endpoint>c).proven:
                        sid[0] = i
                        return c
                    if found == NULL:
                        found = c
                        sid[0] = i
        return found

    cdef int serve_suspects(self, Route r) except -1:
        # Suspects (messages a consumer held when it died or lapsed: the cause, or bystanders)
        # go one at a time, each alone to an idle consumer that gets nothing else until it
        # answers: a crash with a suspect is that suspect's own. With no consumer idle, one is
        # reserved: it gets no new deliveries until its own are answered (answer() then hands
        # it the next suspect); the others serve the queue meanwhile.
        cdef int32_t sid
        cdef PyObject *c
        cdef Endpoint e
        cdef Msg m
        while r.suspects.count and not self.paused:
            c = self.take_idle(r, &sid)
            if c == NULL:
                if not r.reserving:
                    c = self.take_proven(r, &sid)
                    if c == NULL:
                        c = take_ready(self, r, &sid)
                    if c != NULL:
                        e = <Endpoint>c
                        e.withheld += e.credit
                        e.credit = 0
                        e.unlisted = True
                        e.reserved = r.index
                        r.reserving = True
                return 0
            r.suspects.pop_front(&m)
            self.n_suspects -= 1
            unqueued(self, r, &m)
            if m.deadline and m.deadline <= clock_cs(self):
                self.expire_msg(&m)
                continue
            e = <Endpoint>c
            self.deliver(e, &m)
            r.n_out += 1
            e.isolated = slots_handle(&self.fslots, e.fl_tail)   # alone until that delivery ends
            e.withheld += e.credit
            e.credit = 0
            e.unlisted = True
        return 0

    cdef int unreserve(self, Endpoint c) except -1:
        # c no longer drains for a suspect (it is idle now, gone or lapsed): its route tries again
        cdef Route r = <Route>self.routes[c.reserved]
        c.reserved = -1
        r.reserving = False
        self.mark_pending(r)
        return 0

    cdef int requeue_msg(self, Route r, Msg *m, bint front) except -1:
        # m goes back to r: a suspect (it has crashes, and r blames crashes) to r's suspects,
        # else to the head (front) or the tail of r's waiting messages
        if m.crashes and self.isolating(r):
            if front:
                r.suspects.push_front(m)
            else:
                r.suspects.push_back_always(m)
            self.n_suspects += 1
            self.mem_queued += msg_cost(m)
            self.n_route_queued += 1
            r.q_bytes += m.length
            self.q_bytes += m.length
            return self.mark_pending(r)
        if front:
            lane_push(r, m, True)
            self.mem_queued += msg_cost(m)
            self.n_route_queued += 1
            r.q_bytes += m.length
            self.q_bytes += m.length
            return self.mark_pending(r)
        # behind the others; drain_routes hands it out (to a consumer that has answered first)
        wait_push(self, r, m)
        return self.mark_pending(r)

    cdef PyObject *take_proven(self, Route r, int32_t *sid) noexcept:
        # a consumer of r's ready ring with credit that has answered before (borrowed), or
        # NULL: where a message that made a consumer fail goes first (not to a new, or hung,
        # consumer whose turn it is). O(ring): only for such messages
        cdef size_t j
        cdef int32_t i
        cdef PyObject *c
        for j in range(r.ready.count):
            i = slots_find(&self.subtab.t, r.ready.items[(r.ready.head + j) & (r.ready.cap - 1)])
            if i >= 0:
                c = list_item(<PyObject *>self.conns, <Py_ssize_t>(self.subtab.items[i].conn & 0xFFFFFFFFu))
                if (<Endpoint>c).credit > 0 and (<Endpoint>c).proven:
                    sid[0] = i
                    return c
        return NULL

    cdef int touch(self, Endpoint c, const char *p, size_t n) except -1:
        # c's handlers still run for these deliveries (TOUCH: u64 delivery ids): their leases
        # start again from now. Ids c does not hold are ignored (their answers will say)
        cdef size_t i
        cdef int32_t idx
        cdef double lease
        for i in range(n // 8):
            idx = slots_find(&self.fslots, teomq_ld64(p + 8 * i))
            if idx >= 0 and self.flights[idx].consumer == c.slot and self.flights[idx].deadline != 0.0:
                lease = route_lease(self, self.flights[idx].msg.route)
                self.flights[idx].deadline = self.now + lease
                self.n_touched += 1
        return 0

    cdef int cancel(self, Endpoint c, uint64_t msg_id) except -1:
        # c's producer gave up on its message msg_id: withdrawn from its queue (or the delayed
        # ones); one in flight gets no answer relayed and its consumer is told (CANCEL)
        cdef Msg m
        cdef Idx e
        cdef Route r
        cdef MsgRing q
        cdef int lv
        cdef size_t k
        cdef int32_t i
        if c.session == 0:
            return 0
        for r in self.routes:
            if r.suspects.count and r.suspects.take_match(c.session, msg_id, &m):
                self.n_suspects -= 1
                unqueued(self, r, &m)
                self.n_cancelled += 1
                self.history.pop(m.seq, None)
                store_done(self.store, &m)
                return 0
            for lv in range(NPRIO):
                q = lane(r, lv)
                if q.count and q.take_match(c.session, msg_id, &m):
                    lane_took(r, lv)
                    unqueued(self, r, &m)
                    self.n_cancelled += 1
                    self.history.pop(m.seq, None)
                    store_done(self.store, &m)
                    return 0
        for k in range(self.n_delayed):
            if self.delayed[k].msg.session == c.session and self.delayed[k].msg.msg_id == msg_id:
                self.delay_take(k, &m, &e)
                self.n_cancelled += 1
                self.history.pop(m.seq, None)
                store_done(self.store, &m)
                return 0
        for i in range(self.flights_cap):
            if slots_used(&self.fslots, i) and self.flights[i].msg.session == c.session and \
                    self.flights[i].msg.msg_id == msg_id and not self.flights[i].msg.copy:
                self.flights[i].msg.flags |= F_NO_REPLY | M_CANCELLED
                self.n_cancelled += 1
                (<Endpoint>self.conns[self.flights[i].consumer]).notify_cancel(slots_handle(&self.fslots, i))
                return 0
        return 0

    # -- routes ---------------------------------------------------------------------------

    cdef int route_queue(self, Route r, Msg *m) except -1:
        # The subscriber whose run it is; otherwise the route's own queue (FIFO:
        # while it holds anything, newcomers wait behind it).
        cdef int32_t sid
        cdef PyObject *c
        if r.levels == 0:
            c = take_ready(self, r, &sid)
            if c != NULL:
                return deliver_to_sub(self, r, sid, c, m)
        return wait_push(self, r, m)

    cdef int route_fanout(self, Route r, Msg *m, bint waited) except -1:
        # A copy to every subscriber, sharing one payload block; a subscriber without
        # credit keeps its copies in its backlog, in order, up to backlog_max: past that it
        # is a slow consumer and new copies for it are dropped (the others are not held up).
        # No subscriber: the route's queue.
        cdef int32_t i
        cdef Endpoint c
        if r.nmembers == 0:
            # it waits for a subscriber in the route's queue: durable like a queue's message
            # (a durable store records it now; the fanout copies later are not)
            if self.store.hooked:
                self.store.keep(m)
            return wait_push(self, r, m)
        if waited and self.store.hooked:
            self.store.handed(m)      # it waited (recorded): done as a queued message
        m.copy = True
        self.store.share(m, r.nmembers - 1)
        for i in range(r.nmembers):
            c = sub_conn(self, r.members[i])
            if c.credit > 0 and (c.backlog is None or c.backlog.count == 0):
                self.deliver(c, m)
                r.n_out += 1
            elif c.backlog is not None and c.backlog.count >= self.backlog_max:
                store_done(self.store, m)
                self.n_dropped += 1
                c.slow_dropped += 1
                if not c.slow:
                    c.slow = True
                    if self.on_slow_consumer is not None:
                        self.on_slow_consumer(c, r.name)
            else:
                if c.backlog is None:
                    c.backlog = self.new_backlog()
                c.backlog.push_back(m)
                self.n_backlog += 1
        return 0

    cdef int mark_pending(self, Route r) except -1:
        # r may deliver waiting messages now: drain_routes() (from pump) will try
        if not r.pending:
            r.pending = True
            self.pending_routes.append(r)
        return 0

    cdef MsgRing new_backlog(self):
        # a consumer's fanout backlog: bounded by backlog_max in route_fanout, not by the ring
        return MsgRing(16, <size_t>1 << 32)

    cdef int add_sub(self, Endpoint c, int32_t idx) except -1:
        # c subscribes to route idx (not yet subscribed to it)
        cdef Route r = <Route>self.routes[idx]
        cdef int32_t *ns
        cdef int32_t sid
        if c.nsubs == c.subs_cap:
            ns = <int32_t *>realloc(c.subs, (2 * c.subs_cap + 4) * sizeof(int32_t))
            if ns == NULL:
                raise MemoryError()
            c.subs = ns
            c.subs_cap = 2 * c.subs_cap + 4
        sid = self.subtab.alloc((<uint64_t>c.gen << 32) | c.slot, idx)
        c.subs[c.nsubs] = sid
        c.nsubs += 1
        r.add_member(sid, self.subtab.items)
        if r.kind == R_QUEUE:
            if c.credit > 0:
                list_sub(self, r, sid)
            else:
                c.unlisted = True
        elif r.levels:
            self.mark_pending(r)
        return 0

    cdef int remove_sub(self, Endpoint c, int32_t i) except -1:
        # c's i-th subscription ends; its copies still waiting for credit are withdrawn too
        cdef int32_t sid = c.subs[i]
        cdef int32_t idx = self.subtab.items[sid].route
        cdef MsgRing kept
        cdef Msg m
        (<Route>self.routes[idx]).remove_member(sid, self.subtab.items)
        self.subtab.release(sid)
        c.nsubs -= 1
        c.subs[i] = c.subs[c.nsubs]
        if c.backlog is not None and c.backlog.count:
            kept = self.new_backlog()
            while c.backlog.pop_front(&m):
                if m.route == idx:
                    store_done(self.store, &m)
                    self.n_backlog -= 1
                else:
                    kept.push_back(&m)
            c.backlog = kept
        return 0

    cdef int serve(self, Endpoint c) except -1:
        # c has credit again: its fanout backlog first, then its place in the ready rings of
        # the queue routes it subscribes to (only if it lost it: O(1) in the steady state).
        cdef Msg m
        cdef int32_t i
        cdef Sub *s
        cdef Route r
        while c.credit > 0 and not self.paused and c.backlog is not None and c.backlog.pop_front(&m):
            self.n_backlog -= 1
            self.deliver(c, &m)
            (<Route>self.routes[m.route]).n_out += 1
        if c.slow and (c.backlog is None or c.backlog.count <= self.backlog_max // 2):
            c.slow = False
        if c.credit > 0 and c.unlisted:
            c.unlisted = False
            for i in range(c.nsubs):
                s = &self.subtab.items[c.subs[i]]
                if not s.listed:
                    r = <Route>self.routes[s.route]
                    if r.kind == R_QUEUE:
                        list_sub(self, r, c.subs[i])
        return 0

    cdef int drain_routes(self) except -1:
        # Routes whose waiting messages may now have takers (a subscriber came or got credit).
        cdef Route r
        cdef Msg m
        cdef int32_t sid
        cdef int32_t asid
        cdef PyObject *c
        cdef PyObject *alt
        if self.paused:
            return 0   # no deliveries now; the routes stay pending
        while self.pending_routes:
            r = <Route>self.pending_routes.pop()
            r.pending = False
            if r.suspects.count:
                self.serve_suspects(r)
            while r.levels:
                if r.kind == R_QUEUE:
                    c = take_ready(self, r, &sid)
                    if c == NULL or not wait_pop(self, r, &m):
                        break
                    if m.flags & M_ENDED and not (<Endpoint>c).proven:
                        alt = self.take_proven(r, &asid)
                        if alt != NULL:
                            self.deliver(<Endpoint>alt, &m)
                            r.n_out += 1
                            continue
                    deliver_to_sub(self, r, sid, c, &m)
                else:
                    if r.nmembers == 0 or self.paused or not wait_pop(self, r, &m):
                        break
                    self.route_fanout(r, &m, True)
        return 0

    cdef int drop_subs(self, Endpoint c) except -1:
        # c is going: its subscriptions end, its fanout copies go with it.
        cdef Msg m
        cdef int32_t i
        cdef int32_t sid
        if c.backlog is not None:
            while c.backlog.pop_front(&m):
                store_done(self.store, &m)
                self.n_backlog -= 1
                self.n_dropped += 1
        for i in range(c.nsubs):
            sid = c.subs[i]
            (<Route>self.routes[self.subtab.items[sid].route]).remove_member(sid, self.subtab.items)
            self.subtab.release(sid)
        c.nsubs = 0
        return 0
