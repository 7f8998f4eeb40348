from cpython.ref cimport PyObject
from libc.stdint cimport int32_t, uint32_t, uint64_t

from teomq._core.ring_queue cimport NPRIO, Idx, IdxQueue, Msg, MsgRing, idxq_push, prio_of
from teomq._core.slots cimport Slots


# What a command name in the broker's schema leads to.
cdef enum RouteKind:
    R_FANOUT = 1        # every subscriber gets a copy
    R_QUEUE = 2         # one subscriber, in runs (scheduler.pyx), at least once
    R_SUBSCRIBE = 3     # broker command: subscribe/<cmd>
    R_UNSUBSCRIBE = 4   # broker command: unsubscribe/<cmd>
    R_HELLO = 5         # broker API command 129: answers "Hello <data>"
    R_MSG = 6           # broker API command 130: feeds <data> in as if sent, answers "OK"


cdef struct Sub:
    # One consumer's subscription to one route.
    uint64_t conn       # the consumer: gen << 32 | slot
    int32_t route
    int32_t pos         # index in its route's members array
    bint listed         # has an entry in its route's ready ring


cdef struct U64Ring:
    uint64_t *items
    size_t head
    size_t count
    size_t cap          # a power of two


cdef int u64ring_init(U64Ring *r, size_t cap) except -1
cdef int u64ring_push(U64Ring *r, uint64_t v) except -1
cdef void u64ring_free(U64Ring *r) noexcept

cdef inline uint64_t u64ring_pop(U64Ring *r) noexcept:
    # caller must check r.count first
    cdef uint64_t v = r.items[r.head]
    r.head = (r.head + 1) & (r.cap - 1)
    r.count -= 1
    return v


cdef class Route:
    """One command of the broker's schema: its waiting queue and its subscribers."""
    cdef readonly int32_t index
    cdef readonly bytes name
    cdef readonly int kind
    # messages no subscriber could take yet: a FIFO per priority level (the highest level's head
    # is served first), in memory (lanes) and behind them those paged out (spills: the durable log)
    cdef readonly tuple lanes         # NPRIO MsgRings, by level
    cdef IdxQueue spills[NPRIO]
    cdef readonly size_t n_waiting    # in memory, every level
    cdef readonly size_t n_spilled    # paged out, every level
    cdef uint32_t levels              # bit l: level l has messages waiting (in memory or paged out)
    cdef public int default_priority  # of its messages that name none (the schema's)
    cdef public uint32_t ttl_ms       # their time to live, unless they name a deadline (0: none)
    cdef public bint dead_letter_expired  # an expired message goes to the dead-letter queue
    cdef int32_t *members             # sub ids of its subscribers
    cdef readonly int32_t nmembers
    cdef int32_t mcap
    cdef U64Ring ready                # sub handles (slots.pxd) of subscribers that had credit (queue routes)
    cdef int32_t run_left             # deliveries left in the run of the ready ring's head (0: none begun)
    cdef bint pending                 # in the dispatcher's list of routes to drain
    cdef readonly uint64_t n_in       # messages routed here
    cdef readonly uint64_t n_out      # deliveries made from here
    cdef public uint64_t max_messages # limits on what waits here (0: none): past them QUEUE_FULL
    cdef public uint64_t max_bytes
    cdef readonly uint64_t q_bytes    # payload bytes waiting here (in memory and paged out)
    cdef readonly size_t n_delayed    # messages for here in the heap of delayed ones (not yet due)
    cdef readonly uint64_t d_bytes    # their payload bytes (max_messages and max_bytes count them)
    cdef readonly uint64_t n_refused  # SENDs refused at those limits
    # delivery guarantees of this route's messages (Dispatcher.set_delivery; 0: the broker's)
    cdef public double lease          # seconds a delivery may stay unanswered
    cdef public int32_t max_deliveries  # failed deliveries (nacks and crashes) before the dead-letter queue
    cdef public int32_t max_crashes   # deliveries ended on the consumer's side before it
    cdef readonly MsgRing suspects    # messages held when a consumer died or lapsed, each to go alone
    cdef bint reserving               # a consumer drains its deliveries to take a suspect alone
    cdef int add_member(self, int32_t sid, Sub *subs) except -1
    cdef void remove_member(self, int32_t sid, Sub *subs) noexcept


cdef class SubTable:
    """All subscriptions, in one array indexed by a slot table; ids are stable while used."""
    cdef Sub *items
    cdef int32_t cap                  # records allocated (t.cap once grown to it)
    cdef Slots t
    cdef int32_t alloc(self, uint64_t conn, int32_t route) except -1
    cdef void release(self, int32_t sid) noexcept


cdef extern from *:
    int __builtin_clz(unsigned int x) nogil


cdef inline MsgRing lane(Route r, int level):
    return <MsgRing><PyObject *>r.lanes[level]


cdef inline int top_level(Route r) noexcept:
    # the highest level with messages waiting (r.levels != 0)
    return 31 - __builtin_clz(r.levels)


cdef inline int lane_push(Route r, Msg *m, bint front) except -1:
    # m joins its level's messages in memory: at the tail, or at the head (front)
    cdef int lv = prio_of(m)
    if front:
        lane(r, lv).push_front(m)
    else:
        lane(r, lv).push_back_always(m)
    r.n_waiting += 1
    r.levels |= 1u << lv
    return 0


cdef inline int lane_spill(Route r, const Idx *e, int lv) except -1:
    # a paged-out message joins the tail of level lv
    idxq_push(&r.spills[lv], e)
    r.n_spilled += 1
    r.levels |= 1u << lv
    return 0


cdef inline size_t route_waiting(Route r) noexcept:
    # the messages waiting in r: in memory, paged out, suspects and delayed (its max_messages)
    return r.n_waiting + r.n_spilled + r.suspects.count + r.n_delayed


cdef inline void lane_took(Route r, int lv) noexcept:
    # one message of level lv's memory was taken
    r.n_waiting -= 1
    if (<MsgRing><PyObject *>r.lanes[lv]).count == 0 and r.spills[lv].count == 0:
        r.levels &= ~(1u << lv)
