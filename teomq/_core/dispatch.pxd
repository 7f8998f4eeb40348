from libc.stdint cimport int32_t, uint16_t, uint32_t, uint64_t

from teomq._core.command_parser cimport CommandTable
from teomq._core.endpoint cimport Endpoint
from teomq._core.frame_codec cimport F_API, F_NO_REPLY, FrameHeader
from teomq._core.scheduler cimport Scheduler


cdef class Dispatcher(Scheduler):
    cdef public object on_message   # None, or callable(endpoint, msg_id, payload) per accepted message
    cdef public object on_backpressure  # None, or callable(bool): held messages above the high mark / back at low
    cdef public object on_refused       # None, or callable(): a SEND was refused since refusal_noted was cleared
    cdef public bint refusal_noted      # set when on_refused is called; the control plane clears it
    cdef readonly size_t queue_max
    cdef readonly size_t queue_high
    cdef readonly size_t queue_low
    cdef readonly size_t queue_mid      # low < mid < high: see pump()
    cdef readonly size_t parked_bytes   # SEND frames parked by held-back connections, all together
    cdef readonly bint backpressure
    cdef readonly uint32_t max_payload
    cdef readonly uint64_t n_in
    cdef readonly uint64_t n_refused
    cdef readonly uint64_t n_unknown_commands
    # command mode (table is None in the basic scheme)
    cdef readonly CommandTable table

    cdef int enqueue(self, Endpoint conn, FrameHeader *h, const char *p, size_t n,
                     uint16_t flags, int32_t route) except -1
    cdef int accept_command(self, Endpoint conn, FrameHeader *h, const char *payload) except -1
    cdef size_t queued(self) noexcept
    cdef size_t held(self) noexcept
    cdef int refuse(self, Endpoint conn, uint64_t fid, bint parked) except -1
    cdef int on_command_hook(self, Endpoint conn, int kind, FrameHeader *h,
                             const char *p, size_t n) except -1
    cdef int32_t _route_index(self, name) except -2
    cdef int pump(self) except -1
    cdef int schedule_flush(self) except -1


cdef inline int accept(Dispatcher d, Endpoint conn, FrameHeader *h, const char *payload) except -1:
    # A SEND of conn's, verified: into the basic queue, or through the command lookup
    # (command mode, or an API SEND). Inline: every SEND of every read comes here.
    if d.table is not None or h.flags & F_API:
        return d.accept_command(conn, h, payload)
    return d.enqueue(conn, h, payload, h.length, h.flags & F_NO_REPLY, 0)
