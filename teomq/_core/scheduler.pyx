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

from cpython.ref cimport PyObject
from libc.stdint cimport int32_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, realloc

from teomq._core.endpoint cimport S_CLOSED, S_READY
from teomq._core.frame_codec cimport E_UNKNOWN_ID, F_NO_ANSWER, F_NO_REPLY, F_REDELIVERED
from teomq._core.ring_queue cimport Idx, idxq_push, msg_cost, payload_release
from teomq._core.routes cimport R_QUEUE, Sub, u64ring_pop, u64ring_push
from teomq._core.slots cimport (
    list_item, slots_find, slots_free, slots_handle, slots_init, slots_put, slots_take, slots_take_into,
    slots_used,
)
from teomq._core.store cimport store_delivered, store_done

import msgpack

cdef int32_t SLOTS_MAX = 0x40000000
# a queue with messages paged out reads the next ones back once fewer than this are in memory
cdef size_t PAGE_AHEAD = 2048
cdef bytes ERR_UNKNOWN_ID = msgpack.packb(
    {"code": E_UNKNOWN_ID, "reason": "answer for a delivery this connection does not hold"})


cdef int _fit(list records, int32_t cap) except -1:
    # a slot table's Python records (endpoints, sessions) grown to its cap, with None
    while len(records) < cap:
        records.append(None)
    return 0


cdef inline int wait_push(Scheduler s, Route r, Msg *m) except -1:
    # m joins the tail of r's waiting messages: in memory, or paged out (only its 16-byte
    # index entry kept, its payload released) when the durable store has its record and the
    # memory budget is spent, or r already has messages paged out (FIFO: they come first)
    cdef Idx e
    if s.store.hooked and (r.spill.count or (s.mem_max and s.mem_queued >= s.mem_max)) and s.store.locate(m, &e):
        idxq_push(&r.spill, &e)
        payload_release(m.data)
        s.n_paged_out += 1
    else:
        r.waiting.push_back_always(m)
        s.mem_queued += msg_cost(m)
    s.n_route_queued += 1
    r.q_bytes += m.length
    s.q_bytes += m.length
    return 0


cdef inline bint wait_pop(Scheduler s, Route r, Msg *m) except -1:
    # the head of r's waiting messages, read back from the log first if it is paged out;
    # False when none (or the read failed: logged by the store, tried again at the next tick)
    if r.waiting.count < PAGE_AHEAD and r.spill.count:
        # read ahead before the head runs dry: consumers never wait for a read of their own
        s.n_paged_in += s.store.page_in(&r.spill, r.waiting, r.index, &s.mem_queued, s.mem_max)
    if r.waiting.count == 0:
        return False
    r.waiting.pop_front(m)
    s.mem_queued -= msg_cost(m)
    s.n_route_queued -= 1
    r.q_bytes -= m.length
    s.q_bytes -= m.length
    return True


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
    if r.waiting.count or r.spill.count:
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

    def __dealloc__(self):
        cdef int32_t i
        if self.flights != NULL:
            for i in range(self.flights_cap):
                if slots_used(&self.fslots, i):   # (not store.done: GC may have cleared store)
                    payload_release(self.flights[i].msg.data)
            free(self.flights)
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
        f.msg = m[0]
        f.msg.attempt += 1
        if m.copy:
            self.n_copies_inflight += 1
        f.consumer = c.slot
        f.deadline = self.now + self.lease if self.lease > 0.0 else 0.0
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
        if idx < 0 or self.flights[idx].consumer != c.slot:
            self.n_unknown_answers += 1
            if c.lapsed:
                # a late answer for a delivery whose lease expired: refused, and c's credit back
                c.lapsed -= 1
                c.credit += 1
                self.serve(c)
            return c._add_error(E_UNKNOWN_ID, fid, ERR_UNKNOWN_ID)
        f = &self.flights[idx]
        flight_unlink(self, c, idx)
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
            c.credit += 1
            if c.unlisted or c.backlog is not None:   # else nothing for serve() to do
                self.serve(c)
        return 0

    cdef int requeue(self, Endpoint c, int32_t idx) except -1:
        # a flight c no longer holds goes back: to the head of its route, flagged redelivered;
        # a fanout copy (c's alone) goes with c when c is gone, or to the head of c's backlog
        cdef Flight *f = &self.flights[idx]
        cdef Route r
        f.msg.flags |= F_REDELIVERED
        if f.msg.copy:
            if c.state == S_CLOSED:
                store_done(self.store, &f.msg)
                self.n_dropped += 1
            else:
                if c.backlog is None:
                    c.backlog = self.new_backlog()
                c.backlog.push_front(&f.msg)
                self.n_backlog += 1
                self.n_redelivered += 1
        else:
            r = <Route>self.routes[f.msg.route]
            r.waiting.push_front(&f.msg)
            self.mem_queued += msg_cost(&f.msg)
            self.n_route_queued += 1
            r.q_bytes += f.msg.length
            self.q_bytes += f.msg.length
            self.mark_pending(r)
            self.n_redelivered += 1
        flight_release(self, idx)
        return 0

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
        # requeue_all: each route's head ends in delivery order); c's credit does not come back
        # with them (it comes back as c answers: see answer())
        cdef int32_t idx = c.fl_head
        cdef int32_t last = -1
        cdef int32_t prev
        cdef double deadline
        while idx >= 0:
            deadline = self.flights[idx].deadline
            if deadline == 0.0 or deadline > self.now:
                break
            last = idx
            idx = self.flights[idx].next
        idx = last
        while idx >= 0:
            prev = self.flights[idx].prev
            flight_unlink(self, c, idx)
            c.lapsed += 1
            self.n_expired += 1
            self.requeue(c, idx)
            idx = prev
        return 0

    # -- routes ---------------------------------------------------------------------------

    cdef int route_queue(self, Route r, Msg *m) except -1:
        # The subscriber whose run it is; otherwise the route's own queue (FIFO:
        # while it holds anything, newcomers wait behind it).
        cdef int32_t sid
        cdef PyObject *c
        if r.waiting.count == 0 and r.spill.count == 0:
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
        elif r.waiting.count or r.spill.count:
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
        cdef PyObject *c
        while self.pending_routes:
            r = <Route>self.pending_routes.pop()
            r.pending = False
            while r.waiting.count or r.spill.count:
                if r.kind == R_QUEUE:
                    c = take_ready(self, r, &sid)
                    if c == NULL or not wait_pop(self, r, &m):
                        break
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
