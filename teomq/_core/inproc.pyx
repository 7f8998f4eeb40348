# cython: language_level=3
"""In-process endpoints: a consumer (and producer) inside the broker, without wire frames.

An InprocEndpoint is an Endpoint like a connection, to the scheduler: it has a slot, a
session, credit and flights, it subscribes to commands, it is held back and requeued like
any other. What a connection would be sent as frames is handed to ``on_output`` once per
loop pass (at the flush) as a list of tuples, nothing encoded:

- ``(T_DELIVER, flags, delivery_id, payload)``: a delivery; answer it with answer() (or
  acknowledge many with ack()),
- ``(T_REPLY, 0, msg_id, payload)``: the answer to a message this endpoint sent,
- ``(T_ERROR, 0, id, payload)``: an error (msgpack ``{"code", "reason"}``, as on the wire),
- ``(PUSHES, n, 0, frames)``: with set_pushes(), n consecutive deliveries taken as stream pushes
  in C: ``frames`` is their encoded pushes joined, their ids wait in hold for release_held().

Held back (``hold_sends``, the broker's high mark), its sends wait unaccepted, in order, as a
connection's SEND frames do, within the same bound (park_full): release_sends() accepts them.

Deliveries and answers cost a Python object each here (a tuple; the payload's bytes object is
one per message, shared by the deliveries of its fanout copies): this is for the broker's own
consumers (the web gateway's sessions, teomq.broker.InprocClient; later dead-letter
inspection, management), not for the wire path. The exception is the web gateway's stream push,
its commonest delivery by far: with set_pushes(cache, names), a delivery whose command name is
in ``names`` costs no Python object: its push, encoded once per message (PushCache), is added to
the pass's run of pushes and its id held for acknowledging (the gateway feeds acknowledgements
back within a budget per pass).
"""

from cpython.ref cimport PyObject
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.set cimport PySet_Contains
from libc.stdint cimport uint32_t, uint64_t
from libc.stdlib cimport free, realloc
from libc.string cimport memmove

from teomq._core.dispatch cimport accept, park_full
from teomq._core.endpoint cimport S_CLOSED, S_READY, mark_dirty
from teomq._core.frame_codec cimport (
    E_NOT_ALLOWED, F_API, F_NO_ANSWER, F_NO_REPLY, F_REDELIVERED, HEADER_SIZE, FrameHeader, Received,
    T_DELIVER, T_ERROR, T_REPLY, T_SEND, as_u64,
)
from teomq._core.ring_queue cimport Msg
from teomq._core.slots cimport list_item

import msgpack

cdef bytes ERR_NOT_ALLOWED = msgpack.packb(
    {"code": E_NOT_ALLOWED, "reason": "broker commands are not served to in-process endpoints"})


# payloads up to this size are kept per slot of recent messages (64 of them: at most 1 MiB)
cdef uint32_t SHARED_SMALL = 16384


cdef inline object payload_of(Dispatcher disp, Msg *m):
    # The payload object of m: one per message for every in-process delivery of it (its fanout
    # copies to every endpoint, at once or from their backlogs in turn), not one per delivery.
    # The dispatcher keeps those of recent messages by broker sequence number (unique per
    # accepted message; a block's address is not): 64 small ones, the last large one.
    cdef size_t slot = m.seq & 63
    cdef object p
    if m.length <= SHARED_SMALL:
        if disp.shared_payloads is None:
            disp.shared_payloads = [None] * 64
        if disp.shared_seq[slot] == m.seq:
            p = <object>list_item(<PyObject *>disp.shared_payloads, slot)
            if p is not None:
                return p
        p = PyBytes_FromStringAndSize(m.data, m.length)
        disp.shared_payloads[slot] = p
        disp.shared_seq[slot] = m.seq
        return p
    if disp.shared_big is not None and disp.shared_big_seq == m.seq:
        return disp.shared_big
    disp.shared_big = PyBytes_FromStringAndSize(m.data, m.length)
    disp.shared_big_seq = m.seq
    return disp.shared_big


#: on_output's item type for a run of stream pushes taken in C (not a wire frame type)
PUSHES = 256
cdef bytes EMPTY = b""


cdef class PushCache:
    """The encoded stream push of recent messages, for every endpoint given this cache.

    ``encode(payload)`` gives a message's ``(command name, push)``; it is called once per
    message (by broker sequence number: 64 slots of the latest ones, payloads up to 16 KiB)
    whatever the number of endpoints it is pushed to.
    """

    def __cinit__(self, encode):
        if not callable(encode):
            raise TypeError("encode must be callable")
        self.encode = encode
        self.names = [None] * 64
        self.frames = [None] * 64

    cdef object frame_for(self, Dispatcher disp, Msg *m, object streams):
        # m's push if its name is in streams, else None (the caller hands the delivery over as is)
        cdef size_t slot = m.seq & 63
        cdef object name, frame
        if self.seq[slot] != m.seq:
            name, frame = self.encode(payload_of(disp, m))
            self.names[slot] = name
            self.frames[slot] = frame
            self.seq[slot] = m.seq
        if not PySet_Contains(streams, <object>list_item(<PyObject *>self.names, slot)):
            return None
        return <object>list_item(<PyObject *>self.frames, slot)


def release_held_many(list endpoints, Py_ssize_t start, size_t budget):
    """Acknowledge the held ids of ``endpoints[start:]`` (InprocEndpoints, or None: skipped), all of
    one before the next, until ``budget`` are fed; then one pump and flush for all of them.

    Returns ``(fed, stop, error)``: ``stop`` is the index of the first endpoint not done (the
    budget ran out in it or before it; ``len(endpoints)`` when all are done); ``error`` is what
    acknowledging at ``stop`` raised (the ids it had got to are dropped), else None. Closed
    endpoints are passed over.
    """
    cdef Py_ssize_t i = start
    cdef Py_ssize_t n = len(endpoints)
    cdef size_t fed = 0
    cdef size_t had, k
    cdef object obj
    cdef InprocEndpoint e
    cdef Dispatcher disp = None
    cdef object error = None
    if start < 0:
        raise ValueError("start must not be negative")
    try:
        while i < n and fed < budget:
            obj = endpoints[i]
            if obj is not None:
                e = <InprocEndpoint?>obj
                if e.state == S_READY and e.n_held:
                    disp = e.disp
                    had = e.n_held
                    try:
                        k = <size_t>e._release(budget - fed)
                    except Exception as exc:
                        error = exc
                        break
                    fed += k
                    # (the credit returned may bring backlogged deliveries at once: their ids are
                    # held after these, for the owner to queue once they are handed over)
                    if k < had:
                        break           # the budget ran out in it: it is next in line
            i += 1
    finally:
        if disp is not None:
            disp.pump()
            disp.schedule_flush()
    return fed, i, error


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
        self.parked = []
        self.push_frames = []
        self.framed = False
        disp.register(self, disp.outbox)
        disp.ready(self, prefetch > 0, prefetch)
        if session is not None and not disp.bind_session(self, session):
            disp.release(self)
            raise ValueError(f"session {session!r} is already connected")
        disp.pump()                 # a consumer may take what waits at once
        disp.schedule_flush()

    def __dealloc__(self):
        free(self.held)

    cdef int take(self, Msg *m, uint64_t did) except -1:
        cdef object frame
        if self.push_cache is not None and m.length <= SHARED_SMALL:
            frame = self.push_cache.frame_for(self.disp, m, self.push_streams)
            if frame is not None:
                self.push_frames.append(frame)
                self._hold(did)
                return mark_dirty(self)
        self._end_pushes()
        self.pending.append((T_DELIVER, m.flags & F_REDELIVERED, did, payload_of(self.disp, m)))
        return mark_dirty(self)

    cdef int reply(self, uint64_t msg_id, const char *p, size_t n, const Received *rx) except -1:
        self._end_pushes()
        self.pending.append((T_REPLY, 0, msg_id, PyBytes_FromStringAndSize(p, n)))
        return mark_dirty(self)

    cdef int _add_error(self, int code, uint64_t fid, bytes payload) except -1:
        self._end_pushes()
        self.pending.append((T_ERROR, 0, fid, payload))
        return mark_dirty(self)

    cdef int _end_pushes(self) except -1:
        # the pushes taken so far become one item, in order with what comes after them
        cdef list frames = self.push_frames
        if frames:
            self.push_frames = []
            self.pending.append((PUSHES, len(frames), 0, EMPTY.join(frames)))
        return 0

    cdef int _flush(self) except -1:
        cdef list items
        self.conf_n = 0                 # (no in-process send asks for a CONFIRM)
        self._end_pushes()
        items = self.pending
        if items:
            self.pending = []
            self.on_output(items)
        return 0

    cdef void _clear_out(self) noexcept:
        self.pending = []
        self.push_frames = []

    # -- stream pushes and held acknowledgements -----------------------------------------------

    def set_pushes(self, PushCache cache, streams):
        """Take deliveries whose command name is in the set ``streams`` (kept, not copied) as
        stream pushes: encoded by ``cache``, handed over in runs (PUSHES items), their ids held to
        be acknowledged with release_held(). None: every delivery a tuple again."""
        if cache is not None and not isinstance(streams, (set, frozenset)):
            raise TypeError("streams must be a set")
        self.push_cache = cache
        self.push_streams = streams if cache is not None else None

    cdef int _hold(self, uint64_t did) except -1:
        cdef size_t cap
        cdef uint64_t *nh
        if self.n_held == self.held_cap:
            cap = self.held_cap * 2 if self.held_cap else 64
            nh = <uint64_t *>realloc(self.held, cap * sizeof(uint64_t))
            if nh == NULL:
                raise MemoryError()
            self.held = nh
            self.held_cap = cap
        self.held[self.n_held] = did
        self.n_held += 1
        return 0

    def hold_acks(self, list delivery_ids):
        """Hold these deliveries' ids, after those already held, for release_held()."""
        cdef object did
        for did in delivery_ids:
            self._hold(as_u64(did))

    @property
    def n_held(self) -> int:
        """Delivery ids held for acknowledging."""
        return self.n_held

    cdef Py_ssize_t _release(self, size_t limit) except -1:
        # acknowledge up to limit held ids, oldest first; no pump (the caller's)
        cdef size_t n = self.n_held if self.n_held < limit else limit
        cdef size_t i = 0
        try:
            while i < n:
                i += 1
                self.disp.answer(self, self.held[i - 1], F_NO_ANSWER, NULL, 0, NULL)
        finally:
            # what was acknowledged (or raised) is dropped from the hold, the rest kept in order
            self.n_held -= i
            if self.n_held:
                memmove(self.held, self.held + i, self.n_held * sizeof(uint64_t))
        return <Py_ssize_t>n

    def release_held(self, size_t limit):
        """Acknowledge up to ``limit`` of the held ids, oldest first, then deliver what the
        credit returned allows (one pump and flush, as ack()); returns how many."""
        if self.n_held == 0 or limit == 0:
            return 0
        self._live()
        fed, _, error = release_held_many([self], 0, limit)
        if error is not None:
            raise error
        return fed

    cdef int _park(self, FrameHeader *h, const char *payload) except -1:
        # Held back: keep the send (flags, id, payload; there is no frame around it) for
        # release_sends(), counted as the frame a connection would park, within the same bound.
        cdef size_t total = HEADER_SIZE + <size_t>h.length
        if park_full(self.disp, self, total):
            return self.disp.refuse(self, h.fid, True)
        self.parked.append((h.flags, h.fid, PyBytes_FromStringAndSize(payload, h.length)))
        self.parked_len += total
        self.disp.parked_bytes += total
        return 0

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

    def ack(self, list delivery_ids):
        """Acknowledge (no answer relayed) each delivery of ``delivery_ids``, in order, then deliver
        what the credit returned allows: one pump and one flush for all of them, as a read of
        many ANSWER frames has."""
        cdef object did
        self._live()
        try:
            for did in delivery_ids:
                self.disp.answer(self, as_u64(did), F_NO_ANSWER, NULL, 0, NULL)
        finally:
            self.disp.pump()
            self.disp.schedule_flush()

    def send(self, msg_id, payload, *, bint no_reply=False, bint api=False):
        """Send a message as a producer would; its answer comes to on_output as a REPLY.

        ``api``: an API send (payload ``[u8 API command][data]``: 129 hello, 130 msg), which the
        broker answers itself or feeds in, as a SEND frame flagged API.
        """
        cdef bytes data = bytes(payload)
        cdef FrameHeader h
        self._live()
        if <size_t>PyBytes_GET_SIZE(data) > self.disp.max_payload:
            raise ValueError(f"payload of {len(data)} bytes is over the broker's limit of {self.disp.max_payload}")
        h.ftype = T_SEND
        h.flags = (F_NO_REPLY if no_reply else 0) | (F_API if api else 0)
        h.fid = as_u64(msg_id)
        h.length = <uint32_t>PyBytes_GET_SIZE(data)
        accept(self.disp, self, &h, PyBytes_AS_STRING(data))
        self.disp.pump()
        self.disp.schedule_flush()

    def release_sends(self):
        """Accept the parked sends, in order, until hold_sends is set again; then deliver."""
        cdef list parked = self.parked
        cdef Py_ssize_t i = 0
        cdef Py_ssize_t n = len(parked)
        cdef FrameHeader h
        cdef bytes data
        cdef size_t total = self.parked_len
        self.parked = []            # taken over: what accept() parks again starts a new list
        self.parked_len = 0
        self.disp.parked_bytes -= total
        try:
            h.ftype = T_SEND
            while i < n and not self.hold_sends and self.state != S_CLOSED:
                h.flags, h.fid, data = parked[i]
                h.length = <uint32_t>PyBytes_GET_SIZE(data)
                i += 1
                total -= HEADER_SIZE + <size_t>h.length
                accept(self.disp, self, &h, PyBytes_AS_STRING(data))
        finally:
            if i < n and self.state != S_CLOSED:
                # held again: the rest goes back in front of anything parked meanwhile
                self.parked = parked[i:] + self.parked
                self.parked_len += total
                self.disp.parked_bytes += total
            self.disp.pump()
            self.disp.schedule_flush()

    @property
    def parked_sends(self) -> int:
        """Sends held back, not yet accepted."""
        return len(self.parked)

    def put_output(self, ftype, flags, fid, payload=b""):
        """Queue ``(ftype, flags, fid, payload)`` for on_output after what is pending, handed over
        with the next flush: the control plane's own replies and errors (a broker command's)."""
        self._end_pushes()
        self.pending.append((int(ftype), int(flags), as_u64(fid), bytes(payload)))
        mark_dirty(self)
        self.disp.schedule_flush()

    def flush_now(self):
        """Hand what is pending to on_output at once (before closing this endpoint)."""
        if self.state != S_CLOSED:
            self._flush()

    def close(self):
        """Leave: what it holds is requeued, its subscriptions end, its parked sends are dropped
        (never accepted). Idempotent."""
        if self.state != S_CLOSED:
            self.disp.parked_bytes -= self.parked_len
            self.parked_len = 0
            self.parked = []
            self.n_held = 0         # their deliveries are requeued with the rest it holds
            self.disp.release(self)
            self.disp.pump()
            self.disp.schedule_flush()

    def _live(self):
        if self.state != S_READY:
            raise RuntimeError("this in-process endpoint is closed")
