# cython: language_level=3
"""Endpoints: what the scheduler delivers to and takes answers from, and the outbox.

An Endpoint is a peer as the scheduler (scheduler.pyx) sees it: a slot in its endpoint table,
a state, credit, the flights it holds, its subscriptions. How a delivery, a reply or an error
reaches the peer is the subclass's: a wire connection (connection.pyx) encodes frames into its
output buffer; an in-process endpoint (inproc.pyx) hands them to Python without frames.

The Outbox lists the endpoints that have output since the last flush: one flush per loop
pass writes each of them once.
"""

cimport cython
from libc.stdlib cimport free, malloc

from teomq._core.frame_codec cimport E_HANDSHAKE, protocol_error


@cython.final
cdef class Outbox:

    def __cinit__(self, scheduler=None):
        self.dirty = []
        self.scheduler = scheduler
        self.flush_cb = self.flush

    cdef int schedule(self) except -1:
        if (self.dirty or (self.msglog is not None and self.msglog.used)
                or (self.store is not None and self.store.pending)) and not self.scheduled:
            self.scheduled = True
            if self.scheduler is None:
                self.flush()
            else:
                self.scheduler(self.flush_cb)
        return 0

    def set_scheduler(self, scheduler):
        self.scheduler = scheduler

    def set_message_log(self, MessageLog msglog):
        """Log every accepted message in C (Dispatcher.enqueue adds its line) and write the lines
        at each flush, instead of the dispatcher's on_message; None: back to on_message."""
        self.msglog = msglog

    def flush(self):
        """Hand every endpoint's pending output over: one write per endpoint per loop pass.

        A durable store's records of the pass are written to the OS first (no frame that
        depends on them leaves before), then the per-message log lines, in one write each."""
        cdef list dirty
        cdef Endpoint e
        self.scheduled = False
        if self.store is not None and self.store.pending:
            self.store.write_pass()     # (may release confirmations: endpoints made dirty)
        dirty = self.dirty
        self.dirty = []
        if self.msglog is not None and self.msglog.used:
            self.msglog.write_out()
        for e in dirty:
            e.dirty = False
            if e.state == S_CLOSED:
                e._clear_out()
            else:
                e._flush()


cdef class Endpoint:

    def __cinit__(self, *args, **kwargs):
        self.log_name = b"?"
        self.reserved = -1
        self.isolated = 0
        self.fl_head = -1
        self.fl_tail = -1
        self.subs = NULL
        self.backlog = None

    def __dealloc__(self):
        free(self.subs)
        free(self.conf_runs)

    # -- confirmations: SENDs flagged CONFIRM waiting for the durable store ---------------

    cdef int confirm_after(self, uint64_t batch, uint64_t fid) except -1:
        # message fid is recorded in the log's batch ``batch``: confirm it once that is stored
        cdef ConfirmRun *r
        cdef ConfirmRun *g
        cdef uint32_t i
        cdef uint32_t cap
        if self.conf_count:
            r = &self.conf_runs[(self.conf_head + self.conf_count - 1) % self.conf_cap]
            if r.batch == batch:
                r.last_id = fid
                r.count += 1
                return 0
        if self.conf_count == self.conf_cap:
            cap = self.conf_cap * 2 if self.conf_cap else 8
            g = <ConfirmRun *>malloc(cap * sizeof(ConfirmRun))
            if g == NULL:
                raise MemoryError()
            for i in range(self.conf_count):
                g[i] = self.conf_runs[(self.conf_head + i) % self.conf_cap]
            free(self.conf_runs)
            self.conf_runs = g
            self.conf_cap = cap
            self.conf_head = 0
        r = &self.conf_runs[(self.conf_head + self.conf_count) % self.conf_cap]
        r.batch = batch
        r.last_id = fid
        r.count = 1
        self.conf_count += 1
        return 0

    cdef bint release_confirms(self, uint64_t upto) except -1:
        # the log stored every batch up to ``upto``: those runs go out with the next flush;
        # True while runs still wait
        cdef ConfirmRun *r
        while self.conf_count:
            r = &self.conf_runs[self.conf_head]
            if r.batch > upto:
                break
            self.conf_id = r.last_id
            self.conf_n += r.count
            self.conf_head = (self.conf_head + 1) % self.conf_cap
            self.conf_count -= 1
        if self.conf_n and self.state != S_CLOSED:
            mark_dirty(self)
        return self.conf_count != 0

    # -- how output reaches the peer: the subclass's --------------------------------------

    cdef int take(self, Msg *m, uint64_t did) except -1:
        # m is delivered to this endpoint as ``did``; m stays in its flight until answered
        raise NotImplementedError

    cdef int reply(self, uint64_t msg_id, const char *p, size_t n, const Received *rx) except -1:
        # the answer to this endpoint's message msg_id (rx: the ANSWER frame's, or NULL)
        raise NotImplementedError

    cdef int _add_error(self, int code, uint64_t fid, bytes payload) except -1:
        raise NotImplementedError

    cdef int notify_cancel(self, uint64_t did) except -1:
        # the producer of delivery did withdrew it (an endpoint that announced "cancel")
        return 0

    cdef int _park(self, FrameHeader *h, const char *payload) except -1:
        # held back: keep the SEND h (payload: its h.length bytes) to accept it later, in order
        raise protocol_error(E_HANDSHAKE, "this endpoint cannot hold messages back")

    cdef int _flush(self) except -1:
        return 0

    cdef void _clear_out(self) noexcept:
        pass

    # -- Python view ----------------------------------------------------------------------

    @property
    def handshaken(self) -> bool:
        return self.state == S_READY

    @property
    def detached(self) -> bool:
        return self.state == S_CLOSED
