from libc.stdint cimport uint16_t, uint32_t, uint64_t

from teomq._core.frame_codec cimport Received


cdef struct Msg:
    # One accepted message. Whoever holds the Msg owns data (malloc'd, freed with free()).
    char *data
    uint32_t length
    uint16_t flags       # SEND flags as received (NO_REPLY); REDELIVERED added on requeue
    uint32_t producer    # slot of the producing connection in the dispatcher's table
    uint32_t producer_gen  # that slot's generation when the message arrived
    uint64_t msg_id      # the producer's own message id
    Received rx          # checksum facts of the SEND it came in (payload forwarded, not re-read)


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
    cdef int _grow(self) except -1
    cdef int push_back(self, const Msg *m) except -1   # 0 stored, 1 full (m untouched)
    cdef int push_front(self, const Msg *m) except -1
    cdef bint pop_front(self, Msg *out) noexcept       # False when empty
    cdef int _make(self, Msg *m, payload, msg_id) except -1
