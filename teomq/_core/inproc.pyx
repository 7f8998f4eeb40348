# cython: language_level=3
"""In-process endpoints: a consumer (and producer) inside the broker, without wire frames.

An InprocEndpoint is an Endpoint like a connection, to the scheduler: it has a slot, a
session, credit and flights, it subscribes to commands, it is held back and requeued like
any other. What a connection would be sent as frames is handed to ``on_output`` once per
loop pass (at the flush) as a list of tuples, nothing encoded:

- ``(T_DELIVER, flags, delivery_id, payload)``: a delivery; answer it with answer(),
- ``(T_REPLY, 0, msg_id, payload)``: the answer to a message this endpoint sent,
- ``(T_ERROR, 0, id, payload)``: an error (msgpack ``{"code", "reason"}``, as on the wire).

Deliveries and answers cost a Python object each here: this is for the broker's own
consumers (the web gateway, dead-letter inspection, management), not for the wire path.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport uint32_t, uint64_t

from teomq._core.dispatch cimport accept
from teomq._core.endpoint cimport S_CLOSED, S_READY, mark_dirty
from teomq._core.frame_codec cimport (
    E_NOT_ALLOWED, F_NO_ANSWER, F_NO_REPLY, F_REDELIVERED, FrameHeader, Received, T_DELIVER, T_ERROR,
    T_REPLY, T_SEND, as_u64,
)
from teomq._core.ring_queue cimport Msg

import msgpack

cdef bytes ERR_NOT_ALLOWED = msgpack.packb(
    {"code": E_NOT_ALLOWED, "reason": "broker commands are not served to in-process endpoints"})


cdef class InprocEndpoint(Endpoint):
    """A consumer and producer inside the broker.

    ``on_output(items)`` gets what the scheduler hands it, once per flush. A consumer
    (``prefetch`` >= 1) takes deliveries like a connected consumer with that prefetch: in the
    basic scheme from the queue, in command mode from the commands it subscribe()s to.
    """

    def __cinit__(self, Dispatcher disp, on_output, *, int prefetch=0, session=None):
        if not callable(on_output):
            raise TypeError("on_output must be callable")
        self.disp = disp
        self.on_output = on_output
        self.pending = []
        self.framed = False
        disp.register(self, disp.outbox)
        disp.ready(self, prefetch > 0, prefetch)
        if session is not None and not disp.bind_session(self, session):
            disp.release(self)
            raise ValueError(f"session {session!r} is already connected")
        disp.pump()                 # a consumer may take what waits at once
        disp.schedule_flush()

    cdef int take(self, Msg *m, uint64_t did) except -1:
        self.pending.append((T_DELIVER, m.flags & F_REDELIVERED, did,
                             PyBytes_FromStringAndSize(m.data, m.length)))
        return mark_dirty(self)

    cdef int reply(self, uint64_t msg_id, const char *p, size_t n, const Received *rx) except -1:
        self.pending.append((T_REPLY, 0, msg_id, PyBytes_FromStringAndSize(p, n)))
        return mark_dirty(self)

    cdef int _add_error(self, int code, uint64_t fid, bytes payload) except -1:
        self.pending.append((T_ERROR, 0, fid, payload))
        return mark_dirty(self)

    cdef int _flush(self) except -1:
        cdef list items = self.pending
        if items:
            self.pending = []
            self.on_output(items)
        return 0

    cdef void _clear_out(self) noexcept:
        self.pending = []

    def on_command(self, int kind, fid, flags, data):
        self._add_error(E_NOT_ALLOWED, fid, ERR_NOT_ALLOWED)

    def answer(self, delivery_id, payload=b"", *, bint no_answer=False):
        """Answer (or, with no_answer, just acknowledge) a delivery this endpoint holds."""
        cdef bytes data = bytes(payload)
        self._live()
        self.disp.answer(self, as_u64(delivery_id), F_NO_ANSWER if no_answer else 0,
                         PyBytes_AS_STRING(data), <size_t>PyBytes_GET_SIZE(data), NULL)
        self.disp.pump()
        self.disp.schedule_flush()

    def send(self, msg_id, payload, *, bint no_reply=False):
        """Send a message as a producer would; its answer comes to on_output as a REPLY."""
        cdef bytes data = bytes(payload)
        cdef FrameHeader h
        self._live()
        if <size_t>PyBytes_GET_SIZE(data) > self.disp.max_payload:
            raise ValueError(f"payload of {len(data)} bytes is over the broker's limit of {self.disp.max_payload}")
        h.ftype = T_SEND
        h.flags = F_NO_REPLY if no_reply else 0
        h.fid = as_u64(msg_id)
        h.length = <uint32_t>PyBytes_GET_SIZE(data)
        accept(self.disp, self, &h, PyBytes_AS_STRING(data))
        self.disp.pump()
        self.disp.schedule_flush()

    def close(self):
        """Leave: what it holds is requeued, its subscriptions end. Idempotent."""
        if self.state != S_CLOSED:
            self.disp.release(self)
            self.disp.pump()
            self.disp.schedule_flush()

    def _live(self):
        if self.state != S_READY:
            raise RuntimeError("this in-process endpoint is closed")
