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
from libc.stdlib cimport free

from teomq._core.frame_codec cimport E_HANDSHAKE, protocol_error


@cython.final
cdef class Outbox:

    def __cinit__(self, scheduler=None):
        self.dirty = []
        self.scheduler = scheduler
        self.flush_cb = self.flush

    cdef int schedule(self) except -1:
        if (self.dirty or (self.msglog is not None and self.msglog.used)) and not self.scheduled:
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

        The per-message log lines of the pass are written first, in one write."""
        cdef list dirty = self.dirty
        cdef Endpoint e
        self.dirty = []
        self.scheduled = False
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
        self.fl_head = -1
        self.fl_tail = -1
        self.subs = NULL
        self.backlog = None

    def __dealloc__(self):
        free(self.subs)

    # -- how output reaches the peer: the subclass's --------------------------------------

    cdef int take(self, Msg *m, uint64_t did) except -1:
        # m is delivered to this endpoint as ``did``; m stays in its flight until answered
        raise NotImplementedError

    cdef int reply(self, uint64_t msg_id, const char *p, size_t n, const Received *rx) except -1:
        # the answer to this endpoint's message msg_id (rx: the ANSWER frame's, or NULL)
        raise NotImplementedError

    cdef int _add_error(self, int code, uint64_t fid, bytes payload) except -1:
        raise NotImplementedError

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
