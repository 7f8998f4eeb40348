cimport cython
from libc.stdint cimport int32_t, uint8_t, uint16_t, uint32_t, uint64_t

from teomq._core.frame_codec cimport FrameHeader, Received, WriteBuffer
from teomq._core.msglog cimport MessageLog
from teomq._core.ring_queue cimport Msg, MsgRing
from teomq._core.store cimport Store


# An endpoint's state, in one place (asyncpg's ProtocolState is the model): every transition
# is in CoreConnection.accept_hello / Scheduler.ready and Scheduler.release; Python reads `state`.
cdef enum ConnState:
    S_NEW = 0          # no HELLO yet: every frame goes to on_control
    S_READY = 1        # handshake done: frames are handled in C
    S_CLOSED = 2       # detached: nothing more is read, written or delivered


cdef struct ConfirmRun:
    # SENDs flagged CONFIRM of one endpoint waiting for the log: ``count`` of them, the last
    # ``last_id``, all recorded in batches up to ``batch`` (seglog.pyx numbers its batches)
    uint64_t batch
    uint64_t last_id
    uint32_t count


cdef class Outbox:
    """The endpoints with output to hand over, flushed once per loop pass."""
    cdef list dirty
    cdef bint scheduled
    cdef object scheduler      # callable(callback): run callback once, later in this loop pass
    cdef object flush_cb
    cdef MessageLog msglog     # None, or the per-message log lines, written at each flush too
    cdef Store store           # the dispatcher's: a durable one writes the pass's records first
    @cython.final
    cdef int schedule(self) except -1


cdef class Endpoint:
    """What the scheduler knows of a peer: a wire connection (connection.pyx) or an
    in-process endpoint (inproc.pyx). Subclasses say how a delivery, a reply and an error
    reach it, and write their output at flush time."""
    cdef Outbox outbox
    cdef readonly uint32_t slot       # in the scheduler's endpoint table
    cdef readonly uint32_t gen
    cdef readonly uint64_t session    # handle of its producer session (0 until ready)
    cdef readonly object session_name # the name its HELLO gave the session, or None
    cdef public bytes log_name        # its name in the per-message log line (UTF-8, one line)
    cdef readonly int state           # a ConnState
    cdef readonly bint consumer
    cdef readonly int32_t credit
    cdef readonly int32_t prefetch
    cdef readonly uint32_t inflight
    cdef readonly uint32_t lapsed     # deliveries whose lease expired: credit it gets back as it answers
    cdef readonly int32_t withheld    # credit taken away when a lease expired: back with its next answer
    cdef readonly bint proven         # it has answered a delivery (redelivered messages go to such first)
    cdef int32_t reserved             # route whose suspect it drains for (its credit withheld), or -1
    cdef uint64_t isolated            # the suspect's delivery it holds alone (its credit withheld), or 0
    cdef public bint cancels          # it announced "cancel": told when a producer withdraws what it holds
    cdef public bint leases           # it announced "lease": late answers get LEASE_EXPIRED
    cdef int32_t fl_head              # its flights, in delivery order
    cdef int32_t fl_tail
    cdef bint framed                  # its SENDs arrive in checksummed frames (their CRC can be forwarded)
    cdef bint dirty
    # command mode: its subscriptions (sub ids), its fanout copies waiting for credit, and
    # whether some of its subscriptions lost their place in a ready ring
    cdef int32_t *subs
    cdef int32_t nsubs
    cdef int32_t subs_cap
    cdef MsgRing backlog
    cdef bint unlisted
    cdef bint slow                    # its backlog reached backlog_max: new copies are dropped
    cdef readonly uint64_t slow_dropped
    # held back (a connection of role both at the high mark): its SENDs wait, whole, in order
    cdef public bint hold_sends
    cdef size_t parked_len
    cdef readonly uint64_t n_refused        # its SENDs refused QUEUE_FULL: the bound reached
    cdef readonly uint64_t n_refused_parked # ... or its parked SENDs over their bound
    # confirmations (SENDs flagged CONFIRM): ready to go at the next flush (conf_n of them,
    # the last conf_id), and those waiting for the log, oldest first
    cdef uint64_t conf_id
    cdef uint32_t conf_n
    cdef ConfirmRun *conf_runs
    cdef uint32_t conf_head
    cdef uint32_t conf_count
    cdef uint32_t conf_cap
    cdef bint conf_listed                   # in the durable store's list of endpoints waiting
    cdef public bint confirms               # it announced the "confirm" capability (HELLO caps)
    cdef readonly uint64_t n_confirmed

    cdef int take(self, Msg *m, uint64_t did) except -1
    cdef int reply(self, uint64_t msg_id, const char *p, size_t n, const Received *rx) except -1
    cdef int _add_error(self, int code, uint64_t fid, bytes payload) except -1
    cdef int notify_cancel(self, uint64_t did) except -1
    cdef int _park(self, FrameHeader *h, const char *payload) except -1
    cdef int _flush(self) except -1
    cdef void _clear_out(self) noexcept
    cdef int confirm_after(self, uint64_t batch, uint64_t fid) except -1
    cdef bint release_confirms(self, uint64_t upto) except -1


cdef inline int mark_dirty(Endpoint e) except -1:
    # e has output: listed once in its outbox until the next flush (inline: per message)
    if not e.dirty:
        e.dirty = True
        e.outbox.dirty.append(e)
    return 0

cdef inline int confirm_now(Endpoint e, uint64_t fid) except -1:
    # a SEND flagged CONFIRM is stored (the in-memory store: once accepted): confirmed with
    # the others of this pass in one CONFIRM frame at the flush
    e.conf_id = fid
    e.conf_n += 1
    return mark_dirty(e)
