from libc.stdint cimport int32_t, uint16_t, uint32_t, uint64_t

from teomq._core.command_parser cimport CommandTable
from teomq._core.endpoint cimport Endpoint
from teomq._core.frame_codec cimport (
    F_API, F_DEADLINE, F_DELAY, F_FAIL_FAST, F_NO_REPLY, F_PRIO, HEADER_SIZE, FrameHeader,
)
from teomq._core.ring_queue cimport Msg
from teomq._core.routes cimport Route
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
    cdef readonly uint64_t n_limit_refused   # of them, at a queue's limit or queue_max_bytes
    cdef public uint64_t queue_max_bytes     # payload bytes all routes may have waiting (0: none)
    cdef readonly uint64_t n_unknown_commands
    # command mode (table is None in the basic scheme)
    cdef readonly CommandTable table
    # in-process deliveries (inproc.pyx): payload objects of recent messages by sequence number,
    # shared by the deliveries of their fanout copies (slot seq & 63; one slot for large ones)
    cdef uint64_t shared_seq[64]
    cdef list shared_payloads
    cdef uint64_t shared_big_seq
    cdef object shared_big
    # the SEND being accepted (accept_flagged): bytes stripped before its payload, its deadline,
    # whether it fails fast
    cdef uint32_t in_strip
    cdef uint32_t in_deadline
    cdef bint in_fail_fast
    cdef double in_due                 # F_DELAY: not delivered before this time (the clock; 0: now)
    cdef int in_prio                   # F_PRIO: its priority + 1 (0: its command's default)
    cdef bint releasing                # release_sends() re-accepts parked frames (F_DEADLINE_ABS is ours)
    cdef readonly uint64_t n_no_consumer
    cdef double dead_retry_at          # on_dead failed: tried again from then (tick)

    cdef int enqueue(self, Endpoint conn, FrameHeader *h, const char *p, size_t n,
                     uint16_t flags, int32_t route) except -1
    cdef int accept_command(self, Endpoint conn, FrameHeader *h, const char *payload, size_t n) except -1
    cdef int accept_flagged(self, Endpoint conn, FrameHeader *h, const char *payload) except -1
    cdef int record_times(self, Route r, Msg *m) except -1
    cdef size_t queued(self) noexcept
    cdef size_t held(self) noexcept
    cdef int refuse(self, Endpoint conn, uint64_t fid, bint parked) except -1
    cdef int refuse_storage(self, Endpoint conn, uint64_t fid) except -1
    cdef bint over_limit(self, Route r, size_t n) noexcept
    cdef int refuse_limit(self, Endpoint conn, uint64_t fid, Route r, size_t n) except -1
    cdef int on_command_hook(self, Endpoint conn, int kind, FrameHeader *h,
                             const char *p, size_t n) except -1
    cdef int confirm(self, Endpoint conn, uint64_t fid) except -1
    cdef int32_t _route_index(self, name) except -2
    cdef int pump(self) except -1
    cdef int schedule_flush(self) except -1


cdef inline int accept(Dispatcher d, Endpoint conn, FrameHeader *h, const char *payload) except -1:
    # A SEND of conn's, verified: into the basic queue, or through the command lookup
    # (command mode, or an API SEND). Inline: every SEND of every read comes here.
    if h.flags & (F_DEADLINE | F_FAIL_FAST | F_DELAY | F_PRIO):
        return d.accept_flagged(conn, h, payload)
    if d.table is not None or h.flags & F_API:
        return d.accept_command(conn, h, payload, h.length)
    return d.enqueue(conn, h, payload, h.length, h.flags & F_NO_REPLY, 0)


# Parked SENDs (Endpoint._park, while hold_sends): what one endpoint may have (or two of the
# largest frames), and all endpoints together (or four), counted as whole frames. A client that
# heeds FLOW parks what was on the wire when HOLD reached it: 6-12 MB in bursts of 100 x 64 KiB
# on loopback here.
cdef enum:
    PARK_ENDPOINT = 64 << 20
    PARK_TOTAL = 256 << 20


cdef inline bint park_full(Dispatcher d, Endpoint e, size_t total) noexcept:
    # parking ``total`` more bytes for e would pass e's bound or all endpoints' together
    cdef size_t frame_max = HEADER_SIZE + <size_t>d.max_payload
    cdef size_t limit = 2 * frame_max if 2 * frame_max > PARK_ENDPOINT else PARK_ENDPOINT
    cdef size_t limit_all = 4 * frame_max if 4 * frame_max > PARK_TOTAL else PARK_TOTAL
    return e.parked_len + total > limit or d.parked_bytes + total > limit_all
