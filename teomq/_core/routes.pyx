# cython: language_level=3
"""Command routes of the broker: per-command queues and subscriber indexes.

A route is one command of the broker's schema. It holds the messages that wait for a
subscriber (its own queue, so one command nobody takes never blocks another) and the
index of its subscribers, so routing a message costs the same however many
subscriptions other commands have:

- fanout: the route's members array, one copy per member;
- queue: a ring of the handles (slots.pxd) of subscriptions that had credit when listed; an
  entry whose generation no longer matches (unsubscribed) is skipped.

The basic scheme is one such queue route (index 0, no name) every consumer subscribes to.

The scheduler (scheduler.pyx) owns the logic; this module only keeps the structures.
"""

cimport cython
from libc.stdint cimport int32_t, uint64_t
from libc.stdlib cimport free, malloc, realloc

from teomq._core.ring_queue cimport NPRIO, MsgRing, idxq_free
from teomq._core.slots cimport slots_free, slots_init, slots_put, slots_take_into

# Command queues are bounded by the dispatcher's total (queue_max), not one by one.
cdef size_t ROUTE_QUEUE_MAX = (<size_t>1) << 32

#: RouteKind by name, for the control plane (Dispatcher.set_schema takes these values)
KINDS = {"fanout": R_FANOUT, "queue": R_QUEUE, "subscribe": R_SUBSCRIBE, "unsubscribe": R_UNSUBSCRIBE,
         "hello": R_HELLO, "msg": R_MSG}


# A FIFO of u64 entries (generation << 32 | index) in a power-of-two ring that doubles:
# the dispatcher's ring of consumers with credit and each queue route's ring of subscriptions.
cdef int u64ring_init(U64Ring *r, size_t cap) except -1:
    r.items = <uint64_t *>malloc(cap * sizeof(uint64_t))
    if r.items == NULL:
        raise MemoryError()
    r.head = 0
    r.count = 0
    r.cap = cap
    return 0


cdef int u64ring_push(U64Ring *r, uint64_t v) except -1:
    cdef uint64_t *n
    cdef size_t i
    if r.count == r.cap:
        n = <uint64_t *>malloc(2 * r.cap * sizeof(uint64_t))
        if n == NULL:
            raise MemoryError()
        for i in range(r.count):
            n[i] = r.items[(r.head + i) & (r.cap - 1)]
        free(r.items)
        r.items = n
        r.cap *= 2
        r.head = 0
    r.items[(r.head + r.count) & (r.cap - 1)] = v
    r.count += 1
    return 0


cdef void u64ring_free(U64Ring *r) noexcept:
    free(r.items)
    r.items = NULL
    r.count = 0


@cython.final
cdef class Route:

    def __cinit__(self, int32_t index, bytes name, int kind):
        self.index = index
        self.name = name
        self.kind = kind
        self.lanes = tuple([MsgRing(16, ROUTE_QUEUE_MAX) for _ in range(NPRIO)])
        self.suspects = MsgRing(16, ROUTE_QUEUE_MAX)
        self.mcap = 4
        self.members = <int32_t *>malloc(self.mcap * sizeof(int32_t))
        if self.members == NULL:
            raise MemoryError()
        u64ring_init(&self.ready, 16)

    def __dealloc__(self):
        free(self.members)
        u64ring_free(&self.ready)
        cdef int i
        for i in range(NPRIO):
            idxq_free(&self.spills[i])

    cdef int add_member(self, int32_t sid, Sub *subs) except -1:
        cdef int32_t *n
        if self.nmembers == self.mcap:
            n = <int32_t *>realloc(self.members, 2 * self.mcap * sizeof(int32_t))
            if n == NULL:
                raise MemoryError()
            self.members = n
            self.mcap *= 2
        self.members[self.nmembers] = sid
        subs[sid].pos = self.nmembers
        self.nmembers += 1
        return 0

    cdef void remove_member(self, int32_t sid, Sub *subs) noexcept:
        # swap the last member into the hole: O(1), members are unordered
        cdef int32_t pos = subs[sid].pos
        cdef int32_t last = self.members[self.nmembers - 1]
        self.members[pos] = last
        subs[last].pos = pos
        self.nmembers -= 1

    @property
    def queued(self) -> int:
        return self.n_waiting + self.n_spilled + self.suspects.count

    @property
    def paged_out(self) -> int:
        """Waiting messages paged out to the durable log (only their index entries in memory)."""
        return self.n_spilled

    def level_counts(self):
        """Messages waiting at each priority level (in memory and paged out), lowest level first."""
        cdef int i
        return [(<MsgRing>self.lanes[i]).count + self.spills[i].count for i in range(NPRIO)]

    @property
    def routing(self) -> str:
        return {R_FANOUT: "fanout", R_QUEUE: "queue"}.get(self.kind, "broker")


@cython.final
cdef class SubTable:

    def __cinit__(self):
        slots_init(&self.t, 64, 0x40000000)
        self.items = <Sub *>malloc(self.t.cap * sizeof(Sub))
        if self.items == NULL:
            raise MemoryError()
        self.cap = self.t.cap

    def __dealloc__(self):
        free(self.items)
        slots_free(&self.t)

    cdef int32_t alloc(self, uint64_t conn, int32_t route) except -1:
        cdef int32_t sid = slots_take_into(&self.t, <void **>&self.items, &self.cap, sizeof(Sub))
        self.items[sid].listed = False
        self.items[sid].conn = conn
        self.items[sid].route = route
        return sid

    cdef void release(self, int32_t sid) noexcept:
        self.items[sid].listed = False
        slots_put(&self.t, sid)

    @property
    def used(self) -> int:
        """Subscriptions in use."""
        return self.t.used
