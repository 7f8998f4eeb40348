from libc.stdint cimport uint32_t

from teomq._core.dispatch cimport Dispatcher
from teomq._core.endpoint cimport Endpoint
from teomq._core.frame_codec cimport FrameHeader, WriteBuffer
from teomq._core.writer cimport SocketWriter


cdef class CoreConnection(Endpoint):
    cdef Dispatcher disp
    # read buffer: bytes [0, rlen) are received and not yet handled
    cdef char *rbuf
    cdef size_t rlen
    cdef size_t rcap
    cdef WriteBuffer out
    cdef public object transport
    cdef readonly SocketWriter writer    # None: every byte goes through the transport
    # SENDs held back (hold_sends): whole frames, in order, accepted by release_sends()
    cdef char *parked
    cdef size_t parked_cap
    cdef readonly uint32_t n_parked

    cdef int _process(self) except -1
    cdef int _reserve(self, size_t pos, size_t total) except -1
    cdef void _shrink(self) noexcept
