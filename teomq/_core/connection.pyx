# cython: language_level=3
"""A wire connection: its read loop, its output buffer, its SENDs held back.

The broker's protocol class (teomq/broker.py) subclasses CoreConnection, mixing in
asyncio.BufferedProtocol: get_buffer/buffer_updated below are its read path, so a socket
read crosses into C exactly once and every complete frame of it is handled here. A frame
is consumed before anything is done with it: whatever a hook raises, it is never handled
twice and the connection stays consistent.

Output is encoded into the connection's WriteBuffer (no Python object per message) and
handed over once per loop pass (Outbox.flush -> _flush): through the connection's
SocketWriter (writer.pyx) when the protocol layer gave it one, else to the transport.
"""

from cpython.buffer cimport PyBUF_WRITE
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.memoryview cimport PyMemoryView_FromMemory
from libc.stdint cimport uint16_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy, memmove

from teomq._core.dispatch cimport accept, park_full
from teomq._core.endpoint cimport S_CLOSED, S_NEW, S_READY, mark_dirty
from teomq._core.frame_codec cimport (
    E_HANDSHAKE, E_NOT_ALLOWED, EXT_MAX, INPLACE_MIN, F_REDELIVERED, HEADER_SIZE, T_ANSWER, T_DELIVER, T_ERROR,
    T_CANCEL, T_CONFIRM, T_HELLO, T_PING, T_PONG, T_REPLY, T_SEND, T_TOUCH, F_DEADLINE, F_DEADLINE_ABS, F_DELAY, Received,
    teomq_ld32, teomq_st16, teomq_st32, check_partial, grow_buffer, parse_header,
    protocol_error, verify_crc, note_received,
)
from teomq._core.ring_queue cimport Msg
from teomq._core.scheduler cimport clock_cs, monotonic_now
from teomq._core.writer cimport write_out

import msgpack

from teomq.errors import ProtocolError

cdef size_t READ_CHUNK = 65536        # free space offered to each read
cdef size_t READ_KEEP = 1 << 20       # a read buffer above this shrinks back once empty

cdef bytes ERR_NOT_ALLOWED = msgpack.packb(
    {"code": E_NOT_ALLOWED, "reason": "this frame type is sent only by a broker"})


cdef class CoreConnection(Endpoint):
    """One client connection as the core sees it.

    Subclass hooks: on_control(ftype, flags, fid, payload) for HELLO/ERROR frames and every
    frame before the handshake, on_protocol_error(exc) for bad input, on_internal_error(exc)
    when a hook raised anything else, on_command(kind, fid, flags, data) for broker commands.
    """

    def __cinit__(self, Dispatcher disp, *args, **kwargs):
        self.disp = disp
        self.rcap = READ_CHUNK
        self.rbuf = <char *>malloc(self.rcap)
        if self.rbuf == NULL:
            raise MemoryError()
        self.rlen = 0
        self.out = WriteBuffer(16384)
        self.transport = None
        self.writer = None
        self.parked = NULL
        self.framed = True
        disp.register(self, disp.outbox)

    def __dealloc__(self):
        free(self.rbuf)
        free(self.parked)

    # -- read path ------------------------------------------------------------------------

    def get_buffer(self, Py_ssize_t sizehint):
        cdef size_t want = READ_CHUNK
        if sizehint > 0 and <size_t>sizehint > want:
            want = <size_t>sizehint
        grow_buffer(&self.rbuf, &self.rcap, self.rlen + want)
        return PyMemoryView_FromMemory(self.rbuf + self.rlen, self.rcap - self.rlen, PyBUF_WRITE)

    def buffer_updated(self, Py_ssize_t nbytes):
        self.rlen += nbytes
        if self.disp.realtime:
            self.disp.now = monotonic_now()   # one clock read per read: deadlines, leases
        try:
            self._process()
        except ProtocolError as exc:
            self.on_protocol_error(exc)
        except Exception as exc:
            # a hook (or the core itself) failed: the frame was consumed; the rest of this read
            # and the connection go, and what it held is requeued: nothing half-done is kept
            self.on_internal_error(exc)
        finally:
            self.disp.pump()
            self.disp.schedule_flush()

    cdef int _process(self) except -1:
        cdef Dispatcher disp = self.disp
        cdef FrameHeader h
        cdef size_t pos = 0
        cdef size_t total
        cdef const char *payload
        cdef Received rx
        try:
            while self.state != S_CLOSED and self.rlen - pos >= HEADER_SIZE:
                parse_header(self.rbuf + pos, &h, disp.max_payload)
                total = HEADER_SIZE + <size_t>h.length
                if self.rlen - pos < total:
                    # make room for the whole frame in one piece for the next read
                    if total > self.rcap:
                        self._reserve(pos, total)
                        pos = 0
                    break
                verify_crc(self.rbuf + pos, h.length)
                payload = self.rbuf + pos + HEADER_SIZE
                # The frame counts as handled before it is: whatever a hook below raises, it is
                # never handled twice (the finally drops it with the rest of the handled bytes).
                pos += total
                if self.state != S_READY or h.ftype == T_HELLO or h.ftype == T_ERROR:
                    # rare: let Python decide; it may close us (detached) or accept the hello
                    self.on_control(h.ftype, h.flags, h.fid,
                                    PyBytes_FromStringAndSize(payload, h.length))
                elif h.ftype == T_SEND:
                    accept(disp, self, &h, payload)
                elif h.ftype == T_ANSWER:
                    note_received(payload - HEADER_SIZE, h.length, &rx)  # its CRC is forwarded
                    disp.answer(self, h.fid, h.flags, payload, h.length, &rx)
                elif h.ftype == T_PING:
                    if self.parked_len:     # answered in order, after the SENDs parked before it
                        self._park(&h, payload)
                    else:
                        self.out.add_frame(T_PONG, 0, h.fid, payload, h.length)
                        mark_dirty(self)
                elif h.ftype == T_PONG:
                    pass
                elif h.ftype == T_TOUCH:
                    disp.touch(self, payload, h.length)
                elif h.ftype == T_CANCEL:
                    if self.parked_len:     # after the SENDs parked before it
                        self._park(&h, payload)
                    else:
                        disp.cancel(self, h.fid)
                else:
                    # WELCOME, DELIVER, REPLY, FLOW, CONFIRM come only from a broker: refuse this frame, keep the connection
                    self._add_error(E_NOT_ALLOWED, h.fid, ERR_NOT_ALLOWED)
            if self.rlen - pos < HEADER_SIZE and self.state != S_CLOSED:
                check_partial(self.rbuf + pos, self.rlen - pos)
        finally:
            # drop what was handled, even when a bad frame stopped us
            if pos:
                self.rlen -= pos
                if self.rlen:
                    memmove(self.rbuf, self.rbuf + pos, self.rlen)
            if self.rlen == 0 and self.rcap > READ_KEEP:
                self._shrink()
        return 0

    cdef int _reserve(self, size_t pos, size_t total) except -1:
        # move the partial frame to the front and grow to hold all of it
        cdef char *nb
        self.rlen -= pos
        if pos and self.rlen:
            memmove(self.rbuf, self.rbuf + pos, self.rlen)
        nb = <char *>realloc(self.rbuf, total)
        if nb == NULL:
            raise MemoryError()
        self.rbuf = nb
        self.rcap = total
        return 0

    cdef void _shrink(self) noexcept:
        cdef char *nb = <char *>realloc(self.rbuf, READ_CHUNK)
        if nb != NULL:
            self.rbuf = nb
            self.rcap = READ_CHUNK

    # -- SENDs held back (hold_sends) -------------------------------------------------------

    cdef int _park(self, FrameHeader *h, const char *payload) except -1:
        # Keep a verified SEND frame whole (its header is in the read buffer before payload), in
        # arrival order, for release_sends(). Bounded (park_full, dispatch.pxd): a peer that
        # ignores FLOW (or has none) is refused past the bound, not buffered.
        cdef Dispatcher disp = self.disp
        cdef const char *frame = payload - HEADER_SIZE
        cdef size_t total = HEADER_SIZE + <size_t>h.length
        cdef char *kept
        cdef char *at
        cdef uint64_t due
        if h.ftype == T_SEND and park_full(disp, self, total):
            return disp.refuse(self, h.fid, True)  # a PING or CANCEL is never refused: it waits at the end
        if self.parked == NULL:
            self.parked = <char *>malloc(READ_CHUNK)
            if self.parked == NULL:
                raise MemoryError()
            self.parked_cap = READ_CHUNK
        grow_buffer(&self.parked, &self.parked_cap, self.parked_len + total)
        memcpy(self.parked + self.parked_len, frame, total)
        kept = self.parked + self.parked_len
        if h.ftype == T_SEND and h.flags & (F_DEADLINE | F_DELAY) and not h.flags & F_DEADLINE_ABS and \
                h.length >= 4 * ((h.flags & F_DEADLINE != 0) + (h.flags & F_DELAY != 0)):
            # its deadline and delay count from receipt, not from when it is let go: the kept copy
            # carries the absolute times, the broker's clock in 10 ms steps (its CRC is not checked
            # again; its payload's is computed afresh)
            at = kept + HEADER_SIZE
            if h.flags & F_DEADLINE:
                due = <uint64_t>clock_cs(disp) + teomq_ld32(at) // 10 + 1
                teomq_st32(at, <uint32_t>due if due < 0xFFFFFFFFu else 0xFFFFFFFFu)
                at += 4
            if h.flags & F_DELAY:
                due = <uint64_t>clock_cs(disp) + (teomq_ld32(at) + 9) // 10 + 1
                teomq_st32(at, <uint32_t>due if due < 0xFFFFFFFFu else 0xFFFFFFFFu)
            teomq_st16(kept + 4, h.flags | F_DEADLINE_ABS)
        self.parked_len += total
        disp.parked_bytes += total
        self.n_parked += 1
        return 0

    def release_sends(self):
        """Accept the parked SENDs, in order, until hold_sends is set again; then deliver."""
        cdef Dispatcher disp = self.disp
        cdef FrameHeader h
        cdef char *buf = self.parked
        cdef size_t n = self.parked_len
        cdef size_t cap = self.parked_cap
        cdef size_t pos = 0
        cdef size_t total
        self.parked = NULL          # taken over: what accept() parks again starts a new buffer
        self.parked_len = 0
        self.parked_cap = 0
        disp.parked_bytes -= n
        try:
            while pos < n and not self.hold_sends and self.state != S_CLOSED:
                parse_header(buf + pos, &h, disp.max_payload)  # verified when it was parked
                total = HEADER_SIZE + <size_t>h.length
                pos += total
                self.n_parked -= 1
                if h.ftype == T_PING:
                    self.out.add_frame(T_PONG, 0, h.fid, buf + pos - h.length, h.length)
                    mark_dirty(self)
                elif h.ftype == T_CANCEL:
                    disp.cancel(self, h.fid)
                else:
                    disp.releasing = True
                    try:
                        accept(disp, self, &h, buf + pos - h.length)
                    finally:
                        disp.releasing = False
        finally:
            if pos < n and self.state != S_CLOSED:
                # held again: the rest goes back in front of anything parked meanwhile
                memmove(buf, buf + pos, n - pos)
                n -= pos
                if self.parked_len:
                    grow_buffer(&buf, &cap, n + self.parked_len)
                    memcpy(buf + n, self.parked, self.parked_len)
                    free(self.parked)
                disp.parked_bytes += n
                self.parked = buf
                self.parked_len = n + self.parked_len
                self.parked_cap = cap
            else:
                free(buf)
            disp.pump()
            disp.schedule_flush()

    @property
    def parked_sends(self) -> int:
        """SENDs held back, not yet accepted."""
        return self.n_parked

    # -- what the scheduler hands this connection -------------------------------------------

    cdef int take(self, Msg *m, uint64_t did) except -1:
        # A DELIVER frame. A large payload is not copied into the buffer but written from its
        # Msg (one sendmsg); it stays valid until then: a Flight is released only by its
        # answer, which cannot come before its DELIVER was written, or by detach(), which
        # drops this output first.
        # a consumer that speaks "lease" gets the attempt number in flag bits 8-15 (255: 255 or more)
        cdef uint16_t flags = m.flags & F_REDELIVERED
        if self.leases:
            flags |= (m.attempt if m.attempt < 255 else 255) << 8
        if m.length >= INPLACE_MIN and m.rx.shift and self.writer is not None and self.out.n_ext < EXT_MAX:
            self.out.add_in_place(T_DELIVER, flags, did, m.data, m.length, &m.rx)
        else:
            self.out.add_forward(T_DELIVER, flags, did, m.data, m.length, &m.rx)
        return mark_dirty(self)

    cdef int reply(self, uint64_t msg_id, const char *p, size_t n, const Received *rx) except -1:
        if rx == NULL:
            self.out.add_frame(T_REPLY, 0, msg_id, p, n)
        else:
            self.out.add_forward(T_REPLY, 0, msg_id, p, n, rx)
        return mark_dirty(self)

    cdef int _add_error(self, int code, uint64_t fid, bytes payload) except -1:
        self.out.add_frame(T_ERROR, 0, fid, payload, len(payload))
        return mark_dirty(self)

    cdef int notify_cancel(self, uint64_t did) except -1:
        if self.cancels:
            self.out.add_frame(T_CANCEL, 0, did, NULL, 0)
            mark_dirty(self)
        return 0

    cdef int _flush(self) except -1:
        cdef char count[4]
        if self.conf_n:
            # the pass's confirmations: one CONFIRM frame, id the last, payload how many
            teomq_st32(count, self.conf_n)
            self.out.add_frame(T_CONFIRM, 0, self.conf_id, count, 4)
            self.n_confirmed += self.conf_n
            self.conf_n = 0
        if self.out.length == 0:
            return 0
        if self.transport is None:
            self.out.clear()
            return 0
        return write_out(self.writer, self.out, self.transport)

    cdef void _clear_out(self) noexcept:
        self.out.clear()

    # -- output, for the control plane ------------------------------------------------------

    def send_frame(self, ftype, flags, fid, payload=b""):
        """Queue a frame to this connection (written with the next flush)."""
        self.out.add(ftype, flags, fid, payload)
        mark_dirty(self)
        self.disp.schedule_flush()

    def set_writer(self, SocketWriter writer):
        """Let flushes write to the socket through ``writer`` (None: always the transport).

        The protocol layer makes one only for a plain socket transport (transports.socket_writer).
        """
        self.writer = writer

    def flush_now(self):
        """Write this connection's pending output at once (before closing it); a durable
        store's records first, as at every flush."""
        if self.outbox.store is not None and self.outbox.store.pending:
            self.outbox.store.write_pass()
        if self.out.length and self.transport is not None:
            write_out(self.writer, self.out, self.transport)
        self.out.clear()

    # -- control plane --------------------------------------------------------------------

    def accept_hello(self, bint consumer, int prefetch):
        """Mark the handshake done; a consumer starts with ``prefetch`` credits."""
        if self.state != S_NEW:
            raise protocol_error(E_HANDSHAKE, "second HELLO on one connection")
        self.disp.ready(self, consumer, prefetch)

    def detach(self):
        """The connection is gone or being closed: requeue its in-flight messages, free its slot.

        Idempotent. Messages it held go back to the head of their queue in delivery order.
        """
        cdef Dispatcher disp = self.disp
        if self.state == S_CLOSED:
            return
        self.writer = None
        disp.parked_bytes -= self.parked_len
        self.parked_len = 0         # never accepted: the client never had them confirmed
        self.n_parked = 0
        disp.release(self)
        disp.pump()
        disp.schedule_flush()

    def on_control(self, ftype, flags, fid, payload):
        raise protocol_error(E_HANDSHAKE, "no control plane attached")

    def on_protocol_error(self, exc):
        self.detach()

    def on_internal_error(self, exc):
        """A hook raised something other than ProtocolError while this connection's frame was handled."""
        self.detach()

    def on_command(self, int kind, fid, flags, data):
        """A SEND the broker answers itself (kind: a RouteKind, CMD_UNKNOWN or CMD_UNKNOWN_API).

        data is the command's rest (after ``name/``), the unknown name, or the API payload.
        """
        self._add_error(E_NOT_ALLOWED, fid, ERR_NOT_ALLOWED)

    @property
    def subscriptions(self) -> list:
        """Names of the commands this connection is subscribed to."""
        return self.disp.subscriptions_of(self)

    @property
    def pending_output(self) -> int:
        return self.out.length
