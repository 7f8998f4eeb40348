# cython: language_level=3
"""The store seam: accepting a message is Store.append, which numbers it.

Today's store keeps payloads in memory, in refcounted blocks (ring_queue.pxd: payload_new):
``append`` copies the payload once from the read buffer into a new block and gives the Msg
the next broker sequence number; ``share`` adds references for fanout copies (one block,
one sequence number, however many subscribers); ``done`` drops one reference. The durable
store (a segment log) will subclass Store and override these three.
"""

from libc.stdint cimport uint32_t, uint64_t
from libc.string cimport memcpy

from teomq._core.ring_queue cimport payload_new, payload_ref, payload_release, PAYLOAD_HEAD


cdef class Store:

    cdef int append(self, Msg *m, const char *p, size_t n) except -1:
        m.data = payload_new(n)
        if m.data == NULL:
            raise MemoryError()
        if n:
            memcpy(m.data, p, n)
        m.length = <uint32_t>n
        self.last_seq += 1
        m.seq = self.last_seq
        self.n_held += 1
        return 0

    cdef int share(self, Msg *m, size_t copies) except -1:
        # ``copies`` more holders of m's payload (fanout): each calls done() once
        cdef size_t i
        for i in range(copies):
            payload_ref(m.data)
        return 0

    cdef void done(self, Msg *m) noexcept:
        cdef uint64_t *count = <uint64_t *>(m.data - PAYLOAD_HEAD)
        if count[0] == 1:
            self.n_held -= 1
        payload_release(m.data)
