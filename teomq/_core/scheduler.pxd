cimport cython
from cpython.ref cimport PyObject
from libc.stdint cimport int32_t, uint16_t, uint32_t, uint64_t
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

from teomq._core.endpoint cimport Endpoint, Outbox
from teomq._core.frame_codec cimport Received
from teomq._core.ring_queue cimport Idx, Msg, MsgRing
from teomq._core.routes cimport Route, SubTable
from teomq._core.slots cimport Slots
from teomq._core.store cimport Store


cdef inline double monotonic_now() noexcept nogil:
    # the clock of asyncio's and uvloop's loop.time() (CLOCK_MONOTONIC), in seconds
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <double>ts.tv_sec + <double>ts.tv_nsec * 1e-9


cdef struct Delayed:
    # a message for later (a delay, a nack's delay or backoff): due on the clock. Past the memory
    # budget a message with a record in the durable log keeps only where it is (idx; msg.data NULL)
    double due
    Msg msg
    Idx idx


cdef struct Flight:
    # A message delivered to a consumer and not yet answered. Its delivery id is the flight
    # slot's handle; msg carries the broker sequence number, the attempt and the session.
    Msg msg
    uint32_t consumer      # endpoint slot of the consumer holding it
    int32_t prev           # per-consumer list, in delivery order; -1 ends it
    int32_t next
    double deadline        # lease deadline on the scheduler's clock (tick); 0: no lease


cdef class Scheduler:
    # endpoints (wire connections and in-process endpoints) by slot
    cdef list conns
    cdef Slots eslots
    # producer sessions by slot: where answers go
    cdef list sess_ep
    cdef Slots sslots
    cdef readonly Store store
    cdef readonly Outbox outbox
    cdef Flight *flights
    cdef int32_t flights_cap
    cdef Slots fslots
    # routes: index 0 is the basic scheme's queue; in command mode one per command
    cdef list routes
    cdef SubTable subtab
    cdef list pending_routes     # routes that may deliver waiting messages now
    cdef readonly bint basic     # the basic scheme: every consumer takes from route 0
    cdef dict session_names      # a session's name (HELLO) -> its endpoint, while connected
    cdef readonly double lease   # seconds a delivery may stay unanswered (0: no lease)
    cdef readonly int32_t run    # most consecutive messages of a queue route one consumer takes
    cdef public bint paused      # no new deliveries from queue routes (a broker shutting down)
    cdef readonly double now     # the clock, as of the last tick()
    cdef readonly int32_t consumers
    cdef readonly size_t n_route_queued   # waiting in routes (count toward queue_max), paged out too
    cdef public size_t mem_max            # memory budget of waiting messages (bytes; 0: none):
                                          # past it a durable store's messages are paged out
    cdef readonly size_t mem_queued       # memory waiting messages hold (ring_queue.pxd: msg_cost)
    cdef size_t trim_mark                 # mem_queued when memory was last given back (tick)
    cdef readonly uint64_t q_bytes        # payload bytes waiting in all routes
    cdef readonly uint64_t d_bytes        # payload bytes of the delayed messages (not yet due)
    cdef readonly uint64_t n_paged_out
    cdef readonly uint64_t n_paged_in
    cdef readonly size_t n_backlog        # fanout copies in consumers' backlogs
    cdef readonly size_t backlog_max
    cdef public object on_slow_consumer   # None, or callable(endpoint, route name): a backlog got full
    cdef readonly uint64_t n_out
    cdef readonly uint64_t n_answered
    cdef readonly uint64_t n_orphaned
    cdef readonly uint64_t n_redelivered
    cdef readonly uint64_t n_expired
    cdef readonly uint64_t n_unknown_answers
    cdef readonly uint64_t n_inflight
    cdef readonly uint64_t n_copies_inflight
    cdef readonly uint64_t n_dropped
    # delivery guarantees (docs/semantics.md): defaults of every route (Route overrides them)
    cdef readonly double epoch            # the clock's origin for message deadlines (Msg.deadline)
    cdef public bint realtime             # read the clock at each read (the broker); else tick() moves it
    cdef readonly int32_t max_deliveries  # failed deliveries before the dead-letter queue
    cdef readonly int32_t max_crashes     # of them, ended on the consumer's side
    cdef readonly double retry_base       # backoff of a nack without a delay: base * 2^(n-1), jittered
    cdef readonly double retry_max
    cdef uint64_t rng                     # xorshift64 state (backoff jitter)
    cdef Delayed *delayed                 # binary heap by due time
    cdef size_t n_delayed_cap
    cdef readonly size_t n_delayed
    cdef readonly size_t n_delayed_out     # of them, paged out (only their index entries in memory)
    cdef readonly uint64_t n_delayed_in    # messages accepted with a delay
    cdef MsgRing dead_msgs                # dead letters waiting for on_dead (pump), in order
    cdef list dead_meta                   # and what on_dead is told of each
    cdef dict history                     # seq -> [consumer names, error texts] of messages that failed
    cdef public object on_dead            # callable(list of dicts) -> None: store them (raise: kept, tried again)
    cdef readonly uint64_t n_nacked
    cdef readonly uint64_t n_crashed
    cdef readonly uint64_t n_dead
    cdef readonly uint64_t n_rejected
    cdef readonly uint64_t n_deadline_expired
    cdef readonly uint64_t n_cancelled
    cdef readonly uint64_t n_touched
    cdef readonly uint64_t n_late_answers
    cdef readonly size_t n_suspects       # messages in the routes' suspects rings

    @cython.final
    cdef int register(self, Endpoint e, Outbox outbox) except -1
    @cython.final
    cdef Endpoint live(self, uint64_t handle)
    @cython.final
    cdef int open_session(self, Endpoint e) except -1
    @cython.final
    cdef int ready(self, Endpoint e, bint consumer, int32_t prefetch) except -1
    @cython.final
    cdef int release(self, Endpoint e) except -1
    @cython.final
    cdef int deliver(self, Endpoint c, Msg *m) except -1
    @cython.final
    cdef int answer(self, Endpoint c, uint64_t fid, uint16_t flags, const char *p, size_t n,
                    const Received *rx) except -1
    @cython.final
    cdef int32_t flight_alloc(self) except -1
    @cython.final
    cdef int requeue(self, Endpoint c, int32_t idx) except -1
    @cython.final
    cdef int requeue_all(self, Endpoint c) except -1
    @cython.final
    cdef int route_queue(self, Route r, Msg *m) except -1
    @cython.final
    cdef int route_fanout(self, Route r, Msg *m, bint waited) except -1
    @cython.final
    cdef int mark_pending(self, Route r) except -1
    @cython.final
    cdef MsgRing new_backlog(self)
    @cython.final
    cdef int add_sub(self, Endpoint c, int32_t idx) except -1
    @cython.final
    cdef int remove_sub(self, Endpoint c, int32_t i) except -1
    @cython.final
    cdef int serve(self, Endpoint c) except -1
    @cython.final
    cdef int drain_routes(self) except -1
    @cython.final
    cdef int drop_subs(self, Endpoint c) except -1
    @cython.final
    cdef int expire(self, Endpoint c) except -1
    @cython.final
    cdef int nack(self, Endpoint c, Msg *m, uint16_t flags, const char *p, size_t n) except -1
    @cython.final
    cdef int to_head(self, Msg *m) except -1
    @cython.final
    cdef int note_failure(self, Endpoint c, Msg *m, object error) except -1
    @cython.final
    cdef int sweep_head(self, Route r) except -1
    @cython.final
    cdef int delay_take(self, size_t at, Msg *out, Idx *e) except -1
    @cython.final
    cdef int touch(self, Endpoint c, const char *p, size_t n) except -1
    @cython.final
    cdef int cancel(self, Endpoint c, uint64_t msg_id) except -1
    @cython.final
    cdef int fail(self, Endpoint c, Msg *m, int how, double delay, object error) except -1
    @cython.final
    cdef int dead_letter(self, Msg *m, int reason, object detail) except -1
    @cython.final
    cdef int delay_push(self, Msg *m, double due) except -1
    @cython.final
    cdef int delay_insert(self, Msg *m, const Idx *e, double due) except -1
    @cython.final
    cdef int delay_due(self) except -1
    @cython.final
    cdef int notify(self, Msg *m, int code, bytes payload) except -1
    @cython.final
    cdef int expire_msg(self, Msg *m) except -1
    @cython.final
    cdef int flush_dead(self) except -1
    @cython.final
    cdef bint isolating(self, Route r) noexcept
    @cython.final
    cdef PyObject *take_idle(self, Route r, int32_t *sid) noexcept
    @cython.final
    cdef int withdraw(self, Msg *m) except -1
    @cython.final
    cdef int serve_suspects(self, Route r) except -1
    @cython.final
    cdef int unreserve(self, Endpoint c) except -1
    @cython.final
    cdef int requeue_msg(self, Route r, Msg *m, bint front) except -1
    @cython.final
    cdef PyObject *take_proven(self, Route r, int32_t *sid) noexcept


cdef inline uint32_t clock_cs(Scheduler s) noexcept:
    # the clock in 10 ms steps from its origin: what a message's deadline is compared with
    return <uint32_t>((s.now - s.epoch) * 100.0) if s.now > s.epoch else 0
