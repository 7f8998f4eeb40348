from libc.stdint cimport int32_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc

from teomq._core.frame_codec cimport Received


# A payload block: a reference count in the 16 bytes before the bytes (16, not 8: the
# payload keeps malloc's alignment for memcpy and the socket copies). A fanout message
# shares one block between its copies, so its payload is copied once however many
# subscribers get it. Every holder releases its reference with payload_release().
cdef enum:
    PAYLOAD_HEAD = 16

cdef inline char *payload_new(size_t n) noexcept nogil:
    cdef char *blk = <char *>malloc(PAYLOAD_HEAD + (n if n else 1))
    if blk == NULL:
        return NULL
    (<uint64_t *>blk)[0] = 1
    return blk + PAYLOAD_HEAD

cdef inline void payload_ref(char *p) noexcept nogil:
    (<uint64_t *>(p - PAYLOAD_HEAD))[0] += 1

cdef inline void payload_release(char *p) noexcept nogil:
    cdef uint64_t *count
    if p != NULL:
        count = <uint64_t *>(p - PAYLOAD_HEAD)
        count[0] -= 1
        if count[0] == 0:
            free(p - PAYLOAD_HEAD)


cdef struct Msg:
    # One accepted message. Whoever holds the Msg holds one reference to data (payload_new).
    # Fields in this order: 64 bytes, no padding (a copy is one cache line).
    char *data
    uint64_t session     # handle of the producer's session: where its answer goes
    uint64_t msg_id      # the producer's own message id
    uint64_t seq         # the broker's sequence number, from Store.append
    uint32_t length
    uint16_t attempt     # deliveries made so far (the first delivery is attempt 1; saturates)
    uint16_t nacks       # failures its consumers reported (ANSWER flagged RETRY)
    int32_t route        # its route: 0 the basic scheme's queue, else the command's index
    Received rx          # checksum facts of the SEND it came in (payload forwarded, not re-read)
    uint16_t flags       # SEND flags as received (NO_REPLY); REDELIVERED added on requeue; bits 8-10 its priority
    uint8_t copy         # a fanout copy: meant for one subscriber, never handed to another
    uint8_t crashes      # deliveries that ended on the consumer's side (it went away, its lease ran out)
    uint32_t deadline    # 0: none; else the broker clock (Scheduler.clock_cs) past which it is not delivered


cdef inline void msg_fields(Msg *m, uint16_t flags, uint64_t session, uint64_t msg_id, uint32_t attempt,
                            int32_t route, uint32_t deadline) noexcept nogil:
    # the fields of a Msg not delivered yet (accepted, replayed, read back from the log): no
    # fanout copy, no failure counted; the attempts recorded (saturated at 0xFFFF)
    m.flags = flags
    m.session = session
    m.msg_id = msg_id
    m.attempt = attempt if attempt < 0xFFFF else 0xFFFF
    m.route = route
    m.copy = False
    m.crashes = 0
    m.nacks = 0
    m.deadline = deadline


# What a queued message paged out to the durable log keeps in memory: where its record is, and
# its deadline. 20 bytes, in blocks of IDX_BLOCK entries (64 KiB), a FIFO per priority level of a
# queue route (IdxQueue): a block is freed as soon as its last entry is taken, so a drained queue
# holds at most one block.
cdef struct Idx:
    uint32_t seg         # the segment's number (low 32 bits)
    uint32_t off         # the message record's offset in the segment file
    uint32_t attempt     # deliveries recorded before a restart (REDELIVERED when paged in)
    uint32_t len         # the record's length: MSG_REC + name + payload
    uint32_t deadline    # Msg.deadline

cdef enum:
    IDX_BLOCK = 3275
    NPRIO = 8            # priority levels of a queue: 0 (the lowest, the default) to 7 (Msg.flags bits 8-10)

cdef inline int prio_of(const Msg *m) noexcept nogil:
    return (m.flags >> 8) & 7

cdef struct IdxBlock:
    IdxBlock *next
    uint32_t head        # first entry in use
    uint32_t tail        # one past the last
    Idx items[IDX_BLOCK]

cdef struct IdxQueue:
    IdxBlock *first
    IdxBlock *last
    size_t count

cdef inline int idxq_push(IdxQueue *q, const Idx *e) except -1:
    cdef IdxBlock *b = q.last
    if b == NULL or b.tail == IDX_BLOCK:
        b = <IdxBlock *>malloc(sizeof(IdxBlock))
        if b == NULL:
            raise MemoryError()
        b.next = NULL
        b.head = 0
        b.tail = 0
        if q.last == NULL:
            q.first = b
        else:
            q.last.next = b
        q.last = b
    b.items[b.tail] = e[0]
    b.tail += 1
    q.count += 1
    return 0

cdef inline Idx *idxq_front(IdxQueue *q) noexcept:
    # the oldest entry (NULL when empty)
    if q.count == 0:
        return NULL
    return &q.first.items[q.first.head]

cdef inline void idxq_pop(IdxQueue *q) noexcept:
    # drop the oldest entry (the queue is not empty); an emptied block is freed at once
    cdef IdxBlock *b = q.first
    b.head += 1
    q.count -= 1
    if b.head == b.tail:
        q.first = b.next
        if q.first == NULL:
            q.last = NULL
        free(b)

cdef inline void idxq_free(IdxQueue *q) noexcept:
    cdef IdxBlock *b = q.first
    cdef IdxBlock *n
    while b != NULL:
        n = b.next
        free(b)
        b = n
    q.first = NULL
    q.last = NULL
    q.count = 0


cdef inline size_t msg_cost(const Msg *m) noexcept:
    # memory a queued Msg holds: its slot, its payload block's head and malloc's, the payload
    return sizeof(Msg) + PAYLOAD_HEAD + 16 + m.length


cdef class MsgRing:
    """FIFO of Msg structs in a power-of-two ring that doubles up to a bound.

    max_items bounds push_back (new messages); push_front (redelivery of messages already
    accepted) always succeeds, growing past the bound if it must, so nothing accepted is lost.
    """
    cdef Msg *items
    cdef size_t head
    cdef size_t count
    cdef size_t cap            # always a power of two
    cdef readonly size_t max_items
    cdef bint _relocate(self, size_t newcap) noexcept
    cdef int _grow(self) except -1
    cdef int push_back(self, const Msg *m) except -1   # 0 stored, 1 full (m untouched)
    cdef int push_front(self, const Msg *m) except -1
    cdef int push_back_always(self, const Msg *m) except -1   # past the bound too (recovery)
    cdef bint pop_front(self, Msg *out) noexcept       # False when empty
    cdef bint take_match(self, uint64_t session, uint64_t msg_id, Msg *out) noexcept
    cdef void _shrink(self) noexcept
    cdef int _make(self, Msg *m, payload, msg_id) except -1
