from libc.stdint cimport int32_t, uint16_t, uint32_t, uint64_t

from teomq._core.frame_codec cimport FrameHeader, WriteBuffer
from teomq._core.command_parser cimport CommandTable
from teomq._core.ring_queue cimport Msg, MsgRing
from teomq._core.routes cimport Route, SubTable, U64Ring


cdef struct Flight:
    # A message delivered to a consumer and not yet answered.
    Msg msg
    uint32_t consumer      # slot of the consumer holding it
    uint32_t gen           # bumped on every release: stale delivery ids never match
    int32_t prev           # per-consumer list, in delivery order; -1 ends it
    int32_t next           # also the free-list link
    bint used


# A connection's state, in one place (asyncpg's ProtocolState is the model): every
# transition is in CoreConnection (accept_hello, detach); Python reads it as `state`.
cdef enum ConnState:
    S_NEW = 0          # no HELLO yet: every frame goes to on_control
    S_READY = 1        # handshake done: frames are handled in C
    S_CLOSED = 2       # detached: nothing more is read, written or delivered


cdef class CoreConnection:
    cdef Dispatcher disp
    cdef readonly uint32_t slot
    cdef readonly uint32_t gen
    # read buffer: bytes [rpos, rlen) are received and not yet handled
    cdef char *rbuf
    cdef size_t rlen
    cdef size_t rcap
    cdef WriteBuffer out
    cdef bint dirty
    cdef readonly int state          # a ConnState
    cdef readonly bint consumer
    cdef readonly int32_t credit
    cdef readonly int32_t prefetch
    cdef int32_t fl_head
    cdef int32_t fl_tail
    cdef readonly uint32_t inflight
    cdef bint in_ready
    cdef public object transport
    cdef int fd                      # the socket, written directly while the transport holds nothing
    cdef bint transport_backlog      # we handed the transport bytes it may not have sent yet
    # command mode: this consumer's subscriptions (sub ids), its fanout copies waiting for
    # credit, and whether some of its subscriptions lost their place in a ready ring
    cdef int32_t *subs
    cdef int32_t nsubs
    cdef int32_t subs_cap
    cdef MsgRing backlog
    cdef bint unlisted
    cdef bint slow                   # its backlog reached backlog_max: new copies are dropped
    cdef readonly uint64_t slow_dropped   # fanout copies dropped because its backlog was full
    # flow control without pausing reads (role both: its answers must keep coming): while
    # hold_sends is set, whole SEND frames are parked here, in order, and accepted later
    cdef public bint hold_sends
    cdef char *parked
    cdef size_t parked_len
    cdef size_t parked_cap
    cdef readonly uint32_t n_parked
    cdef readonly uint64_t n_refused      # its SENDs refused QUEUE_FULL: the bound reached
    cdef readonly uint64_t n_refused_parked   # ... or its parked SENDs over their bound

    cdef int _process(self) except -1
    cdef int _mark_dirty(self) except -1
    cdef int _add_error(self, int code, uint64_t fid, bytes payload) except -1
    cdef int _write_out(self) except -1
    cdef void _clear_out(self) noexcept
    cdef int _reserve(self, size_t pos, size_t total) except -1
    cdef void _shrink(self) noexcept
    cdef int _park(self, const char *frame, size_t total, FrameHeader *h) except -1


cdef class Dispatcher:
    cdef list conns            # slot -> CoreConnection or None
    cdef list free_slots
    cdef uint32_t next_gen
    cdef readonly MsgRing queue
    cdef Flight *flights
    cdef int32_t flights_cap
    cdef int32_t free_flight
    cdef U64Ring ready         # (gen << 32 | slot) of consumers with credit (basic scheme)
    cdef list dirty
    cdef bint flush_scheduled
    cdef object scheduler      # callable(callback): run callback once, later in this loop pass
    cdef object flush_cb
    cdef public object on_message   # None, or callable(conn, msg_id, payload) per accepted message
    cdef public object on_backpressure  # None, or callable(bool): held messages above the high mark / back at low
    cdef public object on_refused       # None, or callable(): a SEND was refused since refusal_noted was cleared
    cdef public bint refusal_noted      # set when on_refused is called; the control plane clears it
    cdef readonly size_t queue_high
    cdef readonly size_t queue_low
    cdef readonly size_t queue_mid      # low < mid < high: see pump()
    cdef readonly size_t parked_bytes   # SEND frames parked by held-back connections, all together
    cdef readonly bint backpressure
    cdef readonly uint32_t max_payload
    cdef readonly int32_t consumers
    cdef readonly uint64_t n_in
    cdef readonly uint64_t n_out
    cdef readonly uint64_t n_answered
    cdef readonly uint64_t n_orphaned
    cdef readonly uint64_t n_redelivered
    cdef readonly uint64_t n_refused
    cdef readonly uint64_t n_unknown_answers
    cdef readonly uint64_t n_inflight
    cdef readonly uint64_t n_copies_inflight  # of them, fanout copies (not counted toward queue_max)
    # command mode (table is None in the basic scheme)
    cdef readonly CommandTable table
    cdef list routes             # route index -> Route
    cdef SubTable subtab
    cdef list pending_routes     # routes that may deliver waiting messages now
    cdef readonly size_t n_route_queued   # in routes' own queues (count toward queue_max)
    cdef readonly size_t n_backlog        # fanout copies in consumers' backlogs (bounded per consumer)
    cdef readonly size_t backlog_max
    cdef public object on_slow_consumer   # None, or callable(conn, route name): a backlog got full
    cdef readonly uint64_t n_dropped      # fanout copies dropped with their subscriber
    cdef readonly uint64_t n_unknown_commands

    cdef int accept(self, CoreConnection conn, FrameHeader *h, const char *payload) except -1
    cdef int enqueue(self, CoreConnection conn, FrameHeader *h, const char *p, size_t n,
                     uint16_t flags, int32_t route) except -1
    cdef int accept_command(self, CoreConnection conn, FrameHeader *h, const char *payload) except -1
    cdef int route_queue(self, Route r, Msg *m) except -1
    cdef int route_fanout(self, Route r, Msg *m) except -1
    cdef int deliver_to_sub(self, Route r, int32_t sid, Msg *m) except -1
    cdef CoreConnection sub_conn(self, int32_t sid)
    cdef int mark_pending(self, Route r) except -1
    cdef MsgRing new_backlog(self)
    cdef int32_t take_ready(self, Route r) except -2
    cdef int list_sub(self, int32_t sid) except -1
    cdef int serve(self, CoreConnection c) except -1
    cdef int drain_routes(self) except -1
    cdef int drop_subs(self, CoreConnection conn) except -1
    cdef size_t queued(self) noexcept
    cdef size_t held(self) noexcept
    cdef int refuse(self, CoreConnection conn, uint64_t fid, bint parked) except -1
    cdef int on_command_hook(self, CoreConnection conn, int kind, FrameHeader *h,
                             const char *p, size_t n) except -1
    cdef int32_t _route_index(self, name) except -2
    cdef int answer(self, CoreConnection conn, FrameHeader *h, const char *payload) except -1
    cdef int deliver(self, CoreConnection conn, Msg *m) except -1
    cdef int pump(self) except -1
    cdef int ready_push(self, CoreConnection conn) except -1
    cdef int32_t flight_alloc(self) except -2
    cdef void flight_release(self, int32_t idx) noexcept
    cdef int requeue_all(self, CoreConnection conn) except -1
    cdef CoreConnection live(self, uint32_t slot, uint32_t gen)
    cdef int schedule_flush(self) except -1
    cdef void _link_free(self, int32_t start) noexcept
