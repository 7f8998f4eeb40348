# cython: language_level=3
"""Sans-IO core of a client connection: one call per socket read handles every frame in it.

Frames the core handles itself, in C:
- REPLY: the pending entry of that message id is looked up in a ring indexed by id (ids are
  the client's own counter, so ``id & mask`` is the slot) and resolved: a Future gets
  ``set_result(answer)``, a send() callback is called ``(id, answer, None)``.
- DELIVER, when a synchronous handler is installed: ``handler(payload)`` is called and a
  plain-bytes answer is encoded into the output buffer as an ANSWER.

Everything else (WELCOME, ERROR, PING, a REPLY whose id is not in the ring, DELIVER without
a sync handler) goes to ``on_frame(ftype, flags, fid, payload)``; a handler result that is
not plain bytes within the limit (None, str, an awaitable, ...) or a handler exception goes
to ``on_result(did, payload, result, exc)``. Output accumulates in ``wbuf`` for the owner to
write once per loop pass.

Wire schema: see frame_codec.pyx (24-byte header: magic, version, type, flags, reserved,
id, length, crc32c).
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.ref cimport PyObject, Py_INCREF, Py_XDECREF
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc

from teomq._core.frame_codec cimport (
    F_DEADLINE, F_REDELIVERED, FrameDecoder, FrameHeader, T_ANSWER, T_DELIVER, T_REPLY, T_SEND, WriteBuffer,
    as_u64,
)
from teomq._core.writer cimport SocketWriter, write_out



@cython.final
cdef class ClientCore(FrameDecoder):

    cdef readonly WriteBuffer wbuf
    cdef readonly SocketWriter writer   # None: every byte goes through the transport
    # pending: slot = id & mask; entries[slot] is an owned reference or NULL
    cdef PyObject **entries
    cdef uint64_t *ids
    cdef unsigned char *is_future
    cdef size_t mask
    cdef readonly uint64_t next_id
    cdef readonly size_t npending
    cdef uint64_t low_id            # no pending id is below this
    cdef public object handler      # sync consumer handler, or None
    cdef public uint32_t max_send
    cdef public uint32_t deadline_ms    # requests carry this deadline (F_DEADLINE; 0: none, a broker without "deadline")
    cdef object on_frame
    cdef object on_result
    cdef object on_callback_error
    cdef readonly uint64_t sent
    cdef readonly uint64_t replies
    cdef readonly uint64_t received
    cdef readonly uint64_t answered
    cdef readonly uint64_t redelivered
    # the send() fast path (Client.send, Client.request): set by the protocol layer
    cdef public bint fast               # connected, not held back, not closing, may produce
    cdef public bint flush_scheduled    # a flush of wbuf is scheduled this loop pass
    cdef public bint timer_armed        # the request-deadline timer runs
    cdef object call_soon
    cdef object flush_cb
    cdef object arm_cb

    def __cinit__(self, max_payload, on_frame, on_result, on_callback_error):
        self.writer = None
        self.mask = 255
        self.entries = <PyObject **>calloc(self.mask + 1, sizeof(PyObject *))
        self.ids = <uint64_t *>malloc((self.mask + 1) * sizeof(uint64_t))
        self.is_future = <unsigned char *>malloc(self.mask + 1)
        if self.entries == NULL or self.ids == NULL or self.is_future == NULL:
            raise MemoryError()
        self.wbuf = WriteBuffer(16384)
        self.next_id = 1
        self.low_id = 1
        self.handler = None
        self.max_send = 0
        self.on_frame = on_frame
        self.on_result = on_result
        self.on_callback_error = on_callback_error

    def __dealloc__(self):
        cdef size_t i
        if self.entries != NULL:
            for i in range(self.mask + 1):
                Py_XDECREF(self.entries[i])
            free(self.entries)
        free(self.ids)
        free(self.is_future)

    # -- pending requests -----------------------------------------------------------------

    def take_id(self) -> int:
        """A fresh message id that is not tracked here (publish, or a custom-timeout request)."""
        cdef uint64_t mid = self.next_id
        self.next_id += 1
        return mid

    def set_scheduling(self, call_soon, flush_cb, arm_cb):
        """How send() schedules this loop pass's flush (``call_soon(flush_cb)``, once until
        flush_scheduled is cleared) and the deadline timer (``arm_cb()`` while not timer_armed)."""
        self.call_soon = call_soon
        self.flush_cb = flush_cb
        self.arm_cb = arm_cb

    def send(self, payload, entry, bint is_future) -> int:
        """A request with the default timeout in one call: track ``entry``, encode the SEND,
        schedule the flush and the deadline timer. -1 (nothing done) unless the fast path
        applies: ``fast`` set, ``payload`` bytes within max_send, ``entry`` a Future (``is_future``)
        or callable."""
        cdef uint64_t mid
        if (not self.fast or type(payload) is not bytes
                or <size_t>PyBytes_GET_SIZE(payload) > self.max_send or (not is_future and not callable(entry))):
            return -1
        mid = self._register(entry, is_future)
        self._add_send(mid, payload)
        if not self.timer_armed:
            self.arm_cb()               # arms the timer and sets timer_armed
        if not self.flush_scheduled:
            self.call_soon(self.flush_cb)
            self.flush_scheduled = True
        return mid

    def submit(self, payload, entry, bint is_future) -> int:
        """register(entry) and encode its SEND frame in one call; ``payload`` must be bytes."""
        cdef uint64_t mid
        if type(payload) is not bytes:
            raise TypeError("submit() takes bytes")
        mid = self._register(entry, is_future)
        self._add_send(mid, payload)
        return mid

    cdef inline int _add_send(self, uint64_t mid, bytes payload) except -1:
        # a request's SEND: with its deadline (the default timeout) when the broker takes one
        if self.deadline_ms and <size_t>PyBytes_GET_SIZE(payload) + 4 <= self.max_payload:   # (the broker's limit)
            self.wbuf.add_frame_u32(T_SEND, F_DEADLINE, mid, self.deadline_ms, PyBytes_AS_STRING(payload),
                                    <size_t>PyBytes_GET_SIZE(payload))
        else:
            self.wbuf.add_frame(T_SEND, 0, mid, PyBytes_AS_STRING(payload), <size_t>PyBytes_GET_SIZE(payload))
        self.sent += 1
        return 0

    def register(self, entry, bint is_future) -> int:
        """Track ``entry`` (a Future or a send() callback) under a fresh message id."""
        return self._register(entry, is_future)

    cdef uint64_t _register(self, object entry, bint is_future) except 0:
        cdef uint64_t mid = self.next_id
        cdef size_t slot = mid & self.mask
        while self.entries[slot] != NULL:
            self._grow()
            slot = mid & self.mask
        self.next_id += 1
        Py_INCREF(entry)
        self.entries[slot] = <PyObject *>entry
        self.ids[slot] = mid
        self.is_future[slot] = is_future
        self.npending += 1
        return mid

    cdef int _grow(self) except -1:
        # double the ring; every pending id keeps its place as id & new mask
        cdef size_t newcap = (self.mask + 1) * 2
        cdef size_t i, slot
        cdef PyObject **ne = <PyObject **>calloc(newcap, sizeof(PyObject *))
        cdef uint64_t *ni = <uint64_t *>malloc(newcap * sizeof(uint64_t))
        cdef unsigned char *nf = <unsigned char *>malloc(newcap)
        if ne == NULL or ni == NULL or nf == NULL:
            free(ne)
            free(ni)
            free(nf)
            raise MemoryError()
        for i in range(self.mask + 1):
            if self.entries[i] != NULL:
                slot = self.ids[i] & (newcap - 1)
                ne[slot] = self.entries[i]
                ni[slot] = self.ids[i]
                nf[slot] = self.is_future[i]
        free(self.entries)
        free(self.ids)
        free(self.is_future)
        self.entries = ne
        self.ids = ni
        self.is_future = nf
        self.mask = newcap - 1
        return 0

    cdef inline object _take(self, uint64_t mid):
        # remove and return the entry of mid (a new reference), or None
        cdef size_t slot = mid & self.mask
        cdef PyObject *e = self.entries[slot]
        cdef object entry
        if e == NULL or self.ids[slot] != mid:
            return None
        entry = <object>e
        Py_XDECREF(e)            # the ring's reference; `entry` holds its own
        self.entries[slot] = NULL
        self.npending -= 1
        return entry

    def pop(self, mid):
        """Stop tracking ``mid``; return its entry or None."""
        return self._take(as_u64(mid))

    def expire_upto(self, last):
        """Remove and return ``[(id, entry), ...]`` for every tracked id <= last, in id order."""
        cdef uint64_t upto = as_u64(last)
        cdef uint64_t mid
        cdef list out = []
        cdef object entry
        if upto >= self.next_id:
            upto = self.next_id - 1
        mid = self.low_id
        while mid <= upto and self.npending:
            entry = self._take(mid)
            if entry is not None:
                out.append((mid, entry))
            mid += 1
        if upto + 1 > self.low_id:
            self.low_id = upto + 1
        return out

    def take_all(self):
        """Remove and return every tracked ``(id, entry)``, in id order (connection lost)."""
        return self.expire_upto(self.next_id)

    # -- input ----------------------------------------------------------------------------

    def feed(self, data):
        """Handle every complete frame of ``data`` (one socket read). Raises ProtocolError."""
        self._consume(data)
        self._parse()

    cdef int _on_frame(self, FrameHeader *h, const char *p) except -1:
        cdef object entry
        cdef object payload = PyBytes_FromStringAndSize(p, h.length)
        cdef object result
        cdef size_t slot
        if h.ftype == T_REPLY:
            slot = h.fid & self.mask
            entry = self._take(h.fid)
            if entry is None:
                self.on_frame(h.ftype, h.flags, h.fid, payload)
                return 0
            self.replies += 1
            if self.is_future[slot]:
                try:
                    entry.set_result(payload)
                except Exception:
                    pass    # cancelled meanwhile (a future's only error here: InvalidStateError)
            else:
                try:
                    entry(h.fid, payload, None)
                except Exception as exc:
                    self.on_callback_error(h.fid, exc)
            return 0
        if h.ftype == T_DELIVER and self.handler is not None:
            self.received += 1
            if h.flags & F_REDELIVERED:
                self.redelivered += 1
            try:
                result = self.handler(payload)
            except Exception as exc:
                self.on_result(h.fid, payload, None, exc)
                return 0
            if type(result) is bytes and <size_t>PyBytes_GET_SIZE(result) <= self.max_send:
                self.answered += 1
                self.wbuf.add_frame(T_ANSWER, 0, h.fid, PyBytes_AS_STRING(result),
                                    <size_t>PyBytes_GET_SIZE(result))
            else:
                self.on_result(h.fid, payload, result, None)
            return 0
        self.on_frame(h.ftype, h.flags, h.fid, payload)
        return 0

    def set_writer(self, SocketWriter writer):
        """Let write_out() send to the socket through ``writer`` (None: always the transport).

        The protocol layer makes one only for a plain socket transport (transports.socket_writer),
        with ``backlog=True``: the HELLO went through the transport, so it is asked once first.
        """
        self.writer = writer

    def write_out(self, transport):
        """Write the output buffer: one send(), the transport only for what the socket refuses."""
        if self.wbuf.length:
            write_out(self.writer, self.wbuf, transport)

    def poison(self, exc):
        """Stop handling input (the owner is closing the connection for ``exc``)."""
        self._error = exc
