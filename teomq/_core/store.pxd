from libc.stdint cimport int32_t, uint32_t, uint64_t
from libc.string cimport memcpy

from teomq._core.ring_queue cimport Idx, IdxQueue, Msg, MsgRing, payload_new, payload_release


cdef class Store:
    """Where accepted messages are kept: the in-memory store (payload blocks).

    The seam under the queues: accepting a message is ``append``, which gives it the broker's
    sequence number; each delivery of it is ``delivered``; a message the broker is done with
    (answered, or dropped with its subscriber) is ``done``. A durable store (seglog.pyx)
    subclasses this, overrides them and sets ``hooked`` (the dispatcher calls the in-memory
    store inline: store_append/store_delivered/store_done); what it gathered in a loop pass it
    writes in ``write_pass``, which the Outbox's flush calls before any endpoint's output.
    """
    cdef readonly uint64_t last_seq     # sequence number of the latest message appended
    cdef bint hooked                    # a subclass overrides append/share/delivered/done
    cdef bint pending                   # it has records for write_pass (the Outbox's flush)
    cdef int append(self, Msg *m, const char *p, size_t n) except -1
    cdef int share(self, Msg *m, size_t copies) except -1
    cdef int delivered(self, Msg *m) except -1
    cdef void done(self, Msg *m) noexcept
    cdef int write_pass(self) except -1
    cdef bint locate(self, const Msg *m, Idx *e) noexcept
    cdef int keep(self, Msg *m) except -1
    cdef int handed(self, Msg *m) except -1
    cdef int page_in(self, IdxQueue *q, MsgRing into, int32_t route, size_t *mem, size_t mem_max) except -1
    cdef int timed(self, Msg *m, int kind, double after) except -1


# Store.timed: what a time record says of a message
cdef enum:
    TIME_NOT_BEFORE = 1     # it is not delivered before then (a delay, a retry's backoff)
    TIME_EXPIRES = 2        # it is removed if not delivered by then (its deadline, its time to live)


cdef inline int mem_append(Store s, Msg *m, const char *p, size_t n) except -1:
    # the in-memory store's append: the payload copied once into a new block, numbered
    m.data = payload_new(n)
    if m.data == NULL:
        raise MemoryError()
    if n:
        memcpy(m.data, p, n)
    m.length = <uint32_t>n
    s.last_seq += 1
    m.seq = s.last_seq
    return 0

cdef inline int store_append(Store s, Msg *m, const char *p, size_t n) except -1:
    if s.hooked:
        return s.append(m, p, n)
    return mem_append(s, m, p, n)

cdef inline int store_delivered(Store s, Msg *m) except -1:
    if s.hooked:
        return s.delivered(m)
    return 0

cdef inline void store_done(Store s, Msg *m) noexcept:
    if s.hooked:
        s.done(m)
    else:
        payload_release(m.data)
