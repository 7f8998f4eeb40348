# cython: language_level=3
"""The store seam: accepting a message is Store.append, which numbers it.

Today's store keeps payloads in memory, in refcounted blocks (ring_queue.pxd: payload_new):
``append`` copies the payload once from the read buffer into a new block and gives the Msg
the next broker sequence number; ``share`` adds references for fanout copies (one block,
one sequence number, however many subscribers); ``done`` drops one reference. The durable
store (seglog.pyx: SegmentLog) subclasses Store, overrides these, ``delivered`` and
``write_pass``, and sets ``hooked``; until a store is hooked the dispatcher runs the in-memory
ones inline (store.pxd: store_append, store_delivered, store_done), so the seam costs no call
per message.
"""

from teomq._core.ring_queue cimport payload_ref


cdef class Store:

    cdef int append(self, Msg *m, const char *p, size_t n) except -1:
        return mem_append(self, m, p, n)

    cdef int share(self, Msg *m, size_t copies) except -1:
        # ``copies`` more holders of m's payload (fanout): each calls done() once
        cdef size_t i
        for i in range(copies):
            payload_ref(m.data)
        return 0

    cdef int delivered(self, Msg *m) except -1:
        return 0

    cdef void done(self, Msg *m) noexcept:
        payload_release(m.data)

    cdef int write_pass(self) except -1:
        return 0

    cdef int keep(self, Msg *m) except -1:
        # a fanout message waits for a subscriber (none yet): the durable store records it
        return 0

    cdef int handed(self, Msg *m) except -1:
        # a fanout message that waited (kept) is handed to its subscribers: its copies are
        # theirs, the message itself is done (its payload stays with the copies)
        return 0

    cdef bint locate(self, const Msg *m, Idx *e) noexcept:
        # where m's record is, if it has one (the durable store, right after append): a queued
        # message over the memory budget keeps only that (paged out); the in-memory store: never
        return False

    cdef int page_in(self, IdxQueue *q, MsgRing into, int32_t route, size_t *mem, size_t mem_max) except -1:
        # read paged-out messages back from the front of q into ``into``: how many
        return 0

    cdef int timed(self, Msg *m, int kind, double after) except -1:
        # m is not delivered before, or expires at (kind: TIME_*), ``after`` seconds from now:
        # the durable store records it (as wall-clock time: a restart's clock is another)
        return 0
