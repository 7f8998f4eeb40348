from libc.stdint cimport uint64_t

from teomq._core.ring_queue cimport Msg


cdef class Store:
    """Where accepted messages are kept: the in-memory store (payload blocks).

    The seam under the queues: accepting a message is ``append``, which gives it the broker's
    sequence number; a message the broker is done with (answered, or dropped with its
    subscriber) is ``done``. A durable store overrides both (and recovers what it holds).
    """
    cdef readonly uint64_t last_seq     # sequence number of the latest message appended
    cdef readonly uint64_t n_held       # payload blocks held (a fanout message is one)
    cdef int append(self, Msg *m, const char *p, size_t n) except -1
    cdef int share(self, Msg *m, size_t copies) except -1
    cdef void done(self, Msg *m) noexcept
