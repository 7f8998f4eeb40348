# cython: language_level=3
"""Dispatch loop of the broker: every complete frame of a read is handled here, in C.

Python sees only what it must decide: a connection's HELLO or ERROR frame (on_control),
a bad frame (on_protocol_error via ProtocolError), and one flush per loop pass.

Per message nothing is allocated on the Python heap: a SEND's payload is copied once from
the read buffer into a malloc'd block held by a Msg (queue) and then a Flight (in flight);
DELIVER and REPLY frames are encoded into the target connection's WriteBuffer, which is
written once per loop pass by flush(); a large payload is not copied there but written from
its Msg (WriteBuffer.add_in_place, one sendmsg).

Command scheme (a CommandTable is set): accept_command looks the name up in C and hands the
Msg to its Route (routes.pyx): queue routing takes the next subscription with credit, fanout
makes one Msg per subscriber sharing one refcounted payload block; what has no taker waits
in the route's own queue. Only broker commands and unknown names reach Python (on_command).

Delivery ids are ``flight generation << 32 | flight index``: O(1) lookup, and a stale or
forged id never matches because the generation changes whenever a flight is released.
"""

cimport cython
from cpython.memoryview cimport PyMemoryView_FromMemory
from cpython.buffer cimport PyBUF_WRITE
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport int32_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy, memmove

from teomq._core.command_parser cimport CommandTable, name_length
from teomq._core.frame_codec cimport (
    E_HANDSHAKE, E_NOT_ALLOWED, E_QUEUE_FULL, E_UNKNOWN_ID, EXT_MAX, F_API, F_NO_ANSWER, F_NO_REPLY,
    F_REDELIVERED, FrameHeader, HEADER_SIZE, T_ANSWER, T_DELIVER, T_ERROR, T_HELLO, T_MAX, T_PING,
    T_PONG, T_REPLY, T_SEND, Received, WriteBuffer, check_partial, grow_buffer, note_received,
    parse_header,
    protocol_error, verify_crc,
)
from teomq._core.ring_queue cimport Msg, MsgRing, payload_new, payload_ref, payload_release
from teomq._core.routes cimport (
    R_FANOUT, R_HELLO, R_MSG, R_QUEUE, R_SUBSCRIBE, R_UNSUBSCRIBE, Route, Sub, SubTable,
    u64ring_free, u64ring_init, u64ring_pop, u64ring_push,
)

import msgpack

from teomq.errors import ProtocolError

cdef size_t READ_CHUNK = 65536        # free space offered to each read
cdef size_t READ_KEEP = 1 << 20       # a read buffer above this shrinks back once empty
# Parked SENDs (see CoreConnection._park): what a held-back connection may have (or two of the
# largest frames), and all connections together (or four). A client that heeds FLOW parks what
# was on the wire when HOLD reached it: 6-12 MB in bursts of 100 x 64 KiB on loopback here.
cdef size_t PARK_CONN = 64 << 20
cdef size_t PARK_TOTAL = 256 << 20
# API command numbers of SEND frames flagged API (the original's 129 and 130)
cdef enum:
    API_HELLO = 129
    API_MSG = 130
#: on_command kinds besides the RouteKind values: not a command, not an API command
CMD_UNKNOWN = 0
CMD_UNKNOWN_API = -1

cdef bytes ERR_QUEUE_FULL = msgpack.packb(
    {"code": E_QUEUE_FULL, "reason": "queue is full: message not accepted"})
cdef bytes ERR_HELD_BACK = msgpack.packb(
    {"code": E_QUEUE_FULL, "reason": "held back: the broker is at its high mark and this connection's "
     "parked messages reached their bound; message not accepted"})
cdef bytes ERR_NOT_ALLOWED = msgpack.packb(
    {"code": E_NOT_ALLOWED, "reason": "this frame type is sent only by a broker"})
cdef bytes ERR_UNKNOWN_ID = msgpack.packb(
    {"code": E_UNKNOWN_ID, "reason": "answer for a delivery this connection does not hold"})


cdef class CoreConnection:
    """One client connection as the core sees it.

    The Python subclass mixes in asyncio.BufferedProtocol; get_buffer/buffer_updated below
    are its read path, so a socket read crosses into C exactly once.
    Subclass hooks: on_control(ftype, flags, fid, payload) for HELLO/ERROR frames and every
    frame before the handshake, on_protocol_error(exc) for bad input.
    """

    def __cinit__(self, Dispatcher disp, *args, **kwargs):
        self.disp = disp
        self.rcap = READ_CHUNK
        self.rbuf = <char *>malloc(self.rcap)
        if self.rbuf == NULL:
            raise MemoryError()
        self.rlen = 0
        self.out = WriteBuffer(16384)
        self.fl_head = -1
        self.fl_tail = -1
        self.transport = None
        self.fd = -1
        self.subs = NULL
        self.backlog = None
        self.parked = NULL
        disp.next_gen += 1
        self.gen = disp.next_gen
        if disp.free_slots:
            self.slot = disp.free_slots.pop()
            disp.conns[self.slot] = self
        else:
            self.slot = len(disp.conns)
            disp.conns.append(self)

    def __dealloc__(self):
        free(self.rbuf)
        free(self.subs)
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
                    disp.accept(self, &h, payload)
                elif h.ftype == T_ANSWER:
                    disp.answer(self, &h, payload)
                elif h.ftype == T_PING:
                    if self.parked_len:     # answered in order, after the SENDs parked before it
                        self._park(payload - HEADER_SIZE, total, &h)
                    else:
                        self.out.add_frame(T_PONG, 0, h.fid, payload, h.length)
                        self._mark_dirty()
                elif h.ftype == T_PONG:
                    pass
                else:
                    # WELCOME, DELIVER, REPLY, FLOW come only from a broker: refuse this frame, keep the connection
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

    cdef int _park(self, const char *frame, size_t total, FrameHeader *h) except -1:
        # Keep a verified SEND frame whole, in arrival order, for release_sends(). Bounded:
        # a peer that ignores FLOW (or has none) is refused past the bound, not buffered.
        cdef Dispatcher disp = self.disp
        cdef size_t frame_max = HEADER_SIZE + <size_t>disp.max_payload
        cdef size_t limit = 2 * frame_max if 2 * frame_max > PARK_CONN else PARK_CONN
        cdef size_t limit_all = 4 * frame_max if 4 * frame_max > PARK_TOTAL else PARK_TOTAL
        if h.ftype != T_PING and (self.parked_len + total > limit or disp.parked_bytes + total > limit_all):
            return disp.refuse(self, h.fid, True)  # a PING is never refused: it waits at the end
        if self.parked == NULL:
            self.parked = <char *>malloc(READ_CHUNK)
            if self.parked == NULL:
                raise MemoryError()
            self.parked_cap = READ_CHUNK
        grow_buffer(&self.parked, &self.parked_cap, self.parked_len + total)
        memcpy(self.parked + self.parked_len, frame, total)
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
                    self._mark_dirty()
                else:
                    disp.accept(self, &h, buf + pos - h.length)
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

    # -- output ---------------------------------------------------------------------------

    cdef int _mark_dirty(self) except -1:
        if not self.dirty:
            self.dirty = True
            self.disp.dirty.append(self)
        return 0

    cdef int _add_error(self, int code, uint64_t fid, bytes payload) except -1:
        self.out.add_frame(T_ERROR, 0, fid, payload, len(payload))
        return self._mark_dirty()

    def send_frame(self, ftype, flags, fid, payload=b""):
        """Queue a frame to this connection (written with the next flush)."""
        self.out.add(ftype, flags, fid, payload)
        self._mark_dirty()
        self.disp.schedule_flush()

    cdef int _write_out(self) except -1:
        # One write of everything pending (WriteBuffer.write_to: straight to the socket while
        # the transport holds nothing of ours; saves the take_bytes() copy of every frame).
        # In-place payloads (deliver()) stay valid until then: a Flight is released only by
        # its answer, which cannot come before its DELIVER was written, or by detach(), which
        # drops this output first.
        return self.out.write_to(self.fd, &self.transport_backlog, self.transport)

    cdef void _clear_out(self) noexcept:
        self.out.clear()

    def set_socket(self, int fd):
        """Let flush() write to this socket directly (-1: always go through the transport)."""
        self.fd = fd

    def flush_now(self):
        """Write this connection's pending output at once (before closing it)."""
        if self.out.length and self.transport is not None:
            self._write_out()
        self._clear_out()

    # -- control plane --------------------------------------------------------------------

    def accept_hello(self, bint consumer, int prefetch):
        """Mark the handshake done; a consumer starts with ``prefetch`` credits."""
        if self.state != S_NEW:
            raise protocol_error(E_HANDSHAKE, "second HELLO on one connection")
        self.state = S_READY
        if consumer:
            if prefetch < 1:
                raise ValueError("a consumer needs a prefetch of at least 1")
            self.consumer = True
            self.prefetch = prefetch
            self.credit = prefetch
            self.disp.consumers += 1
            self.disp.ready_push(self)

    def detach(self):
        """The connection is gone or being closed: requeue its in-flight messages, free its slot.

        Idempotent. Messages it held go back to the head of the queue in delivery order.
        """
        cdef Dispatcher disp = self.disp
        if self.state == S_CLOSED:
            return
        self.state = S_CLOSED
        self.fd = -1
        disp.parked_bytes -= self.parked_len
        self.parked_len = 0         # never accepted: the client never had them confirmed
        self.n_parked = 0
        if self.consumer:
            self.consumer = False
            disp.consumers -= 1
        disp.requeue_all(self)
        disp.drop_subs(self)
        disp.conns[self.slot] = None
        disp.free_slots.append(self.slot)
        self._clear_out()
        disp.pump()
        disp.schedule_flush()

    def on_control(self, ftype, flags, fid, payload):
        raise protocol_error(E_HANDSHAKE, "no control plane attached")

    def on_protocol_error(self, exc):
        self.detach()

    def on_internal_error(self, exc):
        """A hook raised something other than ProtocolError while this connection's frame was handled."""
        self.detach()

    @property
    def handshaken(self) -> bool:
        return self.state == S_READY

    @property
    def detached(self) -> bool:
        return self.state == S_CLOSED

    def on_command(self, int kind, fid, flags, data):
        """A SEND the broker answers itself (kind: a RouteKind, CMD_UNKNOWN or CMD_UNKNOWN_API).

        data is the command's rest (after ``name/``), the unknown name, or the API payload.
        """
        self._add_error(E_NOT_ALLOWED, fid, ERR_NOT_ALLOWED)

    @property
    def subscriptions(self) -> list:
        """Names of the commands this connection is subscribed to."""
        cdef int32_t i
        return [(<Route>self.disp.routes[self.disp.subtab.items[self.subs[i]].route]).name
                for i in range(self.nsubs)]

    @property
    def pending_output(self) -> int:
        return self.out.length


@cython.final
cdef class Dispatcher:
    """The broker's shared state: connections, the queue, in-flight messages, output to flush."""

    def __cinit__(self, *, uint32_t max_payload=1 << 20, size_t queue_max=1000000,
                  scheduler=None, size_t backlog_max=10000):
        self.conns = []
        self.free_slots = []
        self.queue = MsgRing(1024, queue_max)
        # Producers' reads pause at 3/4 of the bound and resume at a quarter of that, so
        # publishers meet TCP back-pressure long before the bound refuses anything.
        self.queue_high = queue_max - queue_max // 4 if queue_max > 1 else 1
        self.queue_low = self.queue_high // 4
        self.queue_mid = (self.queue_high + self.queue_low) // 2
        self.on_backpressure = None
        self.flights_cap = 256
        self.flights = <Flight *>malloc(self.flights_cap * sizeof(Flight))
        u64ring_init(&self.ready, 64)
        if self.flights == NULL:
            raise MemoryError()
        self._link_free(0)
        self.dirty = []
        self.scheduler = scheduler
        self.flush_cb = self.flush
        self.max_payload = max_payload
        self.on_message = None
        self.table = None
        self.routes = []
        self.subtab = SubTable()
        self.pending_routes = []
        if backlog_max < 1:
            raise ValueError("backlog_max must be at least 1")
        self.backlog_max = backlog_max
        self.on_slow_consumer = None

    def __dealloc__(self):
        cdef int32_t i
        if self.flights != NULL:
            for i in range(self.flights_cap):
                if self.flights[i].used:
                    payload_release(self.flights[i].msg.data)
            free(self.flights)
        u64ring_free(&self.ready)

    cdef void _link_free(self, int32_t start) noexcept:
        cdef int32_t i
        for i in range(start, self.flights_cap):
            self.flights[i].used = False
            self.flights[i].gen = 1
            self.flights[i].next = i + 1 if i + 1 < self.flights_cap else -1
        self.free_flight = start

    # -- connections ----------------------------------------------------------------------

    cdef CoreConnection live(self, uint32_t slot, uint32_t gen):
        cdef object c
        if slot >= <uint32_t>len(self.conns):
            return None
        c = self.conns[slot]
        if c is None or (<CoreConnection>c).gen != gen:
            return None
        return <CoreConnection>c

    # -- messages -------------------------------------------------------------------------

    cdef size_t queued(self) noexcept:
        return self.queue.count + self.n_route_queued

    cdef size_t held(self) noexcept:
        # Every message the broker holds for a producer: waiting or in flight. The one thing
        # queue_max bounds (and the high and low marks of back-pressure watch). Fanout copies
        # belong to their subscribers and are bounded per subscriber (prefetch, backlog_max).
        return self.queue.count + self.n_route_queued + self.n_inflight - self.n_copies_inflight

    cdef int refuse(self, CoreConnection conn, uint64_t fid, bint parked) except -1:
        # QUEUE_FULL: the bound is reached, or (parked) this held-back connection's parked
        # SENDs reached theirs
        self.n_refused += 1
        if parked:
            conn.n_refused_parked += 1
            conn._add_error(E_QUEUE_FULL, fid, ERR_HELD_BACK)
        else:
            conn.n_refused += 1
            conn._add_error(E_QUEUE_FULL, fid, ERR_QUEUE_FULL)
        if not self.refusal_noted and self.on_refused is not None:
            self.refusal_noted = True   # one call until the control plane has logged it
            self.on_refused()
        return 0

    cdef int accept(self, CoreConnection conn, FrameHeader *h, const char *payload) except -1:
        if self.table is not None or h.flags & F_API:
            return self.accept_command(conn, h, payload)
        return self.enqueue(conn, h, payload, h.length, h.flags & F_NO_REPLY, -1)

    cdef int enqueue(self, CoreConnection conn, FrameHeader *h, const char *p, size_t n,
                     uint16_t flags, int32_t route) except -1:
        # Accept p[0:n] (all of the SEND's payload, or the part after a command prefix) into
        # the basic queue (route -1) or a command route. Refused at the bound: QUEUE_FULL.
        cdef Msg m
        cdef Route r
        if conn.hold_sends or conn.parked_len:
            # held back (role both, held messages at the high mark): the whole frame waits
            return conn._park(p + n - h.length - HEADER_SIZE, HEADER_SIZE + <size_t>h.length, h)
        if self.held() >= self.queue.max_items:
            return self.refuse(conn, h.fid, False)
        m.data = payload_new(n)
        if m.data == NULL:
            raise MemoryError()
        if n:
            memcpy(m.data, p, n)
        m.length = <uint32_t>n
        m.flags = flags
        m.producer = conn.slot
        m.producer_gen = conn.gen
        m.msg_id = h.fid
        m.route = route
        m.copy = False
        if n == h.length:
            note_received(p - HEADER_SIZE, h.length, &m.rx)
        else:
            m.rx.shift = 0          # a stripped payload: its CRC is computed afresh
        if route < 0:
            self.queue.push_back(&m)
        else:
            r = <Route>self.routes[route]
            r.n_in += 1
            if r.kind == R_QUEUE:
                self.route_queue(r, &m)
            else:
                self.route_fanout(r, &m)
        self.n_in += 1
        if not self.backpressure and self.held() >= self.queue_high:
            self.backpressure = True
            if self.on_backpressure is not None:
                self.on_backpressure(True)
        if self.on_message is not None:
            self.on_message(conn, h.fid, PyBytes_FromStringAndSize(p, n))
        return 0

    cdef int accept_command(self, CoreConnection conn, FrameHeader *h, const char *payload) except -1:
        # A SEND in command mode, or an API SEND: find what its name leads to (in C, no
        # Python object unless the broker itself must answer), strip msg/ prefixes.
        cdef const char *p = payload
        cdef size_t n = h.length
        cdef size_t k
        cdef int32_t idx
        cdef int kind
        cdef uint16_t flags = h.flags & F_NO_REPLY
        cdef bint fed = False          # reached through msg: queued with NO_REPLY, "OK" answered here
        cdef Route r
        cdef uint64_t before
        if h.flags & F_API:
            if n == 0 or (<unsigned char>p[0] != API_HELLO and <unsigned char>p[0] != API_MSG):
                self.on_command_hook(conn, CMD_UNKNOWN_API, h, p, n)
                return 0
            kind = <unsigned char>p[0]
            p += 1
            n -= 1
            if kind == API_HELLO:
                self.on_command_hook(conn, R_HELLO, h, p, n)
                return 0
            fed = True
        while True:
            if self.table is None:      # basic scheme: msg feeds the one queue
                before = self.n_in
                self.enqueue(conn, h, p, n, F_NO_REPLY, -1)
                break
            k = name_length(p, n)
            idx = self.table.lookup(p, k)
            if idx < 0:
                self.n_unknown_commands += 1
                self.on_command_hook(conn, CMD_UNKNOWN, h, p, k)
                return 0
            r = <Route>self.routes[idx]
            # skip "name/" (or "name" when nothing follows)
            k = k + 1 if k < n else k
            if r.kind == R_MSG:
                fed = True
                p += k
                n -= k
                continue
            if r.kind != R_FANOUT and r.kind != R_QUEUE:
                self.on_command_hook(conn, r.kind, h, p + k, n - k)
                return 0
            before = self.n_in
            self.enqueue(conn, h, p, n, F_NO_REPLY if fed else flags, idx)
            break
        if fed and self.n_in != before and not (h.flags & F_NO_REPLY):
            conn.out.add_frame(T_REPLY, 0, h.fid, "OK", 2)
            conn._mark_dirty()
        return 0

    cdef int on_command_hook(self, CoreConnection conn, int kind, FrameHeader *h,
                             const char *p, size_t n) except -1:
        conn.on_command(kind, h.fid, h.flags, PyBytes_FromStringAndSize(p, n))
        return 0

    cdef int answer(self, CoreConnection conn, FrameHeader *h, const char *payload) except -1:
        cdef uint32_t idx = <uint32_t>(h.fid & 0xFFFFFFFFu)
        cdef Flight *f
        cdef CoreConnection prod
        cdef Received rx
        if idx >= <uint32_t>self.flights_cap:
            f = NULL
        else:
            f = &self.flights[idx]
        if (f == NULL or not f.used or f.gen != <uint32_t>(h.fid >> 32)
                or f.consumer != conn.slot):
            self.n_unknown_answers += 1
            conn._add_error(E_UNKNOWN_ID, h.fid, ERR_UNKNOWN_ID)
            return 0
        # unlink from the consumer's in-flight list
        if f.prev >= 0:
            self.flights[f.prev].next = f.next
        else:
            conn.fl_head = f.next
        if f.next >= 0:
            self.flights[f.next].prev = f.prev
        else:
            conn.fl_tail = f.prev
        conn.inflight -= 1
        if not (f.msg.flags & F_NO_REPLY) and not (h.flags & F_NO_ANSWER):
            prod = self.live(f.msg.producer, f.msg.producer_gen)
            if prod is not None:
                note_received(payload - HEADER_SIZE, h.length, &rx)
                prod.out.add_forward(T_REPLY, 0, f.msg.msg_id, payload, h.length, &rx)
                prod._mark_dirty()
                self.n_answered += 1
            else:
                self.n_orphaned += 1   # its producer is gone: answered into nothing
        payload_release(f.msg.data)
        self.flight_release(<int32_t>idx)
        if conn.consumer:
            conn.credit += 1
            if self.table is not None:
                self.serve(conn)
            elif not conn.in_ready:
                self.ready_push(conn)
        return 0

    cdef int32_t flight_alloc(self) except -2:
        cdef int32_t idx
        cdef int32_t old = self.flights_cap
        cdef Flight *nf
        if self.free_flight < 0:
            if old >= 0x40000000:
                raise MemoryError("in-flight table is full")
            nf = <Flight *>realloc(self.flights, 2 * old * sizeof(Flight))
            if nf == NULL:
                raise MemoryError()
            self.flights = nf
            self.flights_cap = 2 * old
            self._link_free(old)
        idx = self.free_flight
        self.free_flight = self.flights[idx].next
        self.flights[idx].used = True
        self.n_inflight += 1
        return idx

    cdef void flight_release(self, int32_t idx) noexcept:
        cdef Flight *f = &self.flights[idx]
        f.used = False
        f.gen += 1
        if f.gen == 0:
            f.gen = 1
        f.next = self.free_flight
        self.free_flight = idx
        self.n_inflight -= 1
        if f.msg.copy:
            self.n_copies_inflight -= 1

    cdef int deliver(self, CoreConnection conn, Msg *m) except -1:
        cdef uint64_t did
        cdef int32_t idx = self.flight_alloc()
        cdef Flight *f = &self.flights[idx]
        f.msg = m[0]
        if m.copy:
            self.n_copies_inflight += 1
        f.consumer = conn.slot
        f.prev = conn.fl_tail
        f.next = -1
        if conn.fl_tail >= 0:
            self.flights[conn.fl_tail].next = idx
        else:
            conn.fl_head = idx
        conn.fl_tail = idx
        conn.inflight += 1
        conn.credit -= 1
        if conn.credit <= 0:
            conn.unlisted = True      # its ready-ring entries may be dropped from now on
        did = (<uint64_t>f.gen << 32) | <uint32_t>idx
        if m.rx.shift and conn.fd >= 0 and conn.out.n_ext < EXT_MAX:
            # large payload: header into the buffer, payload written from the Msg in place
            conn.out.add_in_place(T_DELIVER, m.flags & F_REDELIVERED, did, m.data, m.length, &m.rx)
        else:
            conn.out.add_forward(T_DELIVER, m.flags & F_REDELIVERED, did, m.data, m.length, &m.rx)
        conn._mark_dirty()
        self.n_out += 1
        return 0

    cdef int requeue_all(self, CoreConnection conn) except -1:
        # newest first onto the head, so the queue head ends in delivery order
        cdef int32_t idx = conn.fl_tail
        cdef int32_t prev
        cdef Flight *f
        cdef Route r
        while idx >= 0:
            f = &self.flights[idx]
            prev = f.prev
            if f.msg.copy:
                # a fanout copy was this subscriber's alone: it goes with the subscriber
                payload_release(f.msg.data)
                self.n_dropped += 1
            else:
                f.msg.flags |= F_REDELIVERED
                if f.msg.route < 0:
                    self.queue.push_front(&f.msg)
                else:
                    r = <Route>self.routes[f.msg.route]
                    r.waiting.push_front(&f.msg)
                    self.n_route_queued += 1
                    self.mark_pending(r)
                self.n_redelivered += 1
            self.flight_release(idx)
            idx = prev
        conn.fl_head = -1
        conn.fl_tail = -1
        conn.inflight = 0
        return 0

    # -- command routes ---------------------------------------------------------------------

    cdef int route_queue(self, Route r, Msg *m) except -1:
        # One subscriber with credit, round robin; otherwise the route's own queue (FIFO:
        # while it holds anything, newcomers wait behind it).
        cdef int32_t sid
        if r.waiting.count == 0:
            sid = self.take_ready(r)
            if sid >= 0:
                return self.deliver_to_sub(r, sid, m)
        r.waiting.push_back(m)
        self.n_route_queued += 1
        return 0

    cdef int deliver_to_sub(self, Route r, int32_t sid, Msg *m) except -1:
        # queue routing: to the consumer of a subscription take_ready() gave, which goes
        # back to the tail of the ready ring while it has credit (round robin)
        cdef CoreConnection c = self.sub_conn(sid)
        self.deliver(c, m)
        r.n_out += 1
        if c.credit > 0:
            self.list_sub(sid)
        return 0

    cdef int route_fanout(self, Route r, Msg *m) except -1:
        # A copy to every subscriber, sharing one payload block; a subscriber without
        # credit keeps its copies in its backlog, in order, up to backlog_max: past that it
        # is a slow consumer and new copies for it are dropped (the others are not held up).
        # No subscriber: the route's queue.
        cdef int32_t i
        cdef CoreConnection c
        if r.nmembers == 0:
            r.waiting.push_back(m)
            self.n_route_queued += 1
            return 0
        m.copy = True
        for i in range(1, r.nmembers):
            payload_ref(m.data)
        for i in range(r.nmembers):
            c = self.sub_conn(r.members[i])
            if c.credit > 0 and (c.backlog is None or c.backlog.count == 0):
                self.deliver(c, m)
                r.n_out += 1
            elif c.backlog is not None and c.backlog.count >= self.backlog_max:
                payload_release(m.data)
                self.n_dropped += 1
                c.slow_dropped += 1
                if not c.slow:
                    c.slow = True
                    if self.on_slow_consumer is not None:
                        self.on_slow_consumer(c, r.name)
            else:
                if c.backlog is None:
                    c.backlog = self.new_backlog()
                c.backlog.push_back(m)
                self.n_backlog += 1
        return 0

    cdef int32_t take_ready(self, Route r) except -2:
        # The next listed subscriber whose consumer has credit, or -1. Entries of
        # unsubscribed subs (generation changed) and of consumers without credit are dropped.
        cdef uint64_t e
        cdef int32_t sid
        cdef Sub *s
        cdef CoreConnection c
        while r.ready.count:
            e = u64ring_pop(&r.ready)
            sid = <int32_t>(e & 0xFFFFFFFFu)
            s = &self.subtab.items[sid]
            if not s.used or s.gen != <uint32_t>(e >> 32):
                continue
            s.listed = False
            c = self.sub_conn(sid)
            if c.credit > 0:
                return sid
            c.unlisted = True
        return -1

    cdef int list_sub(self, int32_t sid) except -1:
        cdef Sub *s = &self.subtab.items[sid]
        cdef Route r = <Route>self.routes[s.route]
        s.listed = True
        u64ring_push(&r.ready, (<uint64_t>s.gen << 32) | <uint32_t>sid)
        if r.waiting.count:
            self.mark_pending(r)
        return 0

    cdef int mark_pending(self, Route r) except -1:
        # r may deliver waiting messages now: drain_routes() (from pump) will try
        if not r.pending:
            r.pending = True
            self.pending_routes.append(r)
        return 0

    cdef CoreConnection sub_conn(self, int32_t sid):
        # the consumer of a subscription in use (subscriptions end before their connection)
        return <CoreConnection>self.conns[<uint32_t>(self.subtab.items[sid].conn & 0xFFFFFFFFu)]

    cdef MsgRing new_backlog(self):
        # a consumer's fanout backlog: bounded by backlog_max in route_fanout, not by the ring
        return MsgRing(16, <size_t>1 << 32)

    cdef int serve(self, CoreConnection c) except -1:
        # c has credit again: its fanout backlog first, then its place in the ready rings of
        # the queue routes it subscribes to (only if it lost it: O(1) in the steady state).
        cdef Msg m
        cdef int32_t i
        cdef Sub *s
        cdef Route r
        while c.credit > 0 and c.backlog is not None and c.backlog.pop_front(&m):
            self.n_backlog -= 1
            self.deliver(c, &m)
            (<Route>self.routes[m.route]).n_out += 1
        if c.slow and (c.backlog is None or c.backlog.count <= self.backlog_max // 2):
            c.slow = False
        if c.credit > 0 and c.unlisted:
            c.unlisted = False
            for i in range(c.nsubs):
                s = &self.subtab.items[c.subs[i]]
                if not s.listed and (<Route>self.routes[s.route]).kind == R_QUEUE:
                    self.list_sub(c.subs[i])
        return 0

    cdef int drain_routes(self) except -1:
        # Routes whose waiting messages may now have takers (a subscriber came or got credit).
        cdef Route r
        cdef Msg m
        cdef int32_t sid
        while self.pending_routes:
            r = <Route>self.pending_routes.pop()
            r.pending = False
            while r.waiting.count:
                if r.kind == R_QUEUE:
                    sid = self.take_ready(r)
                    if sid < 0:
                        break
                    r.waiting.pop_front(&m)
                    self.n_route_queued -= 1
                    self.deliver_to_sub(r, sid, &m)
                else:
                    if r.nmembers == 0:
                        break
                    r.waiting.pop_front(&m)
                    self.n_route_queued -= 1
                    self.route_fanout(r, &m)
        return 0

    cdef int drop_subs(self, CoreConnection conn) except -1:
        # conn is going: its subscriptions end, its fanout copies go with it.
        cdef Msg m
        cdef int32_t i
        cdef Sub *s
        if conn.backlog is not None:
            while conn.backlog.pop_front(&m):
                payload_release(m.data)
                self.n_backlog -= 1
                self.n_dropped += 1
        for i in range(conn.nsubs):
            s = &self.subtab.items[conn.subs[i]]
            (<Route>self.routes[s.route]).remove_member(conn.subs[i], self.subtab.items)
            self.subtab.release(conn.subs[i])
        conn.nsubs = 0
        return 0

    cdef int ready_push(self, CoreConnection conn) except -1:
        u64ring_push(&self.ready, (<uint64_t>conn.gen << 32) | conn.slot)
        conn.in_ready = True
        return 0

    cdef int pump(self) except -1:
        """Hand queued messages to consumers with credit, round robin."""
        cdef uint64_t entry
        cdef CoreConnection c
        cdef Msg m
        if self.pending_routes:
            self.drain_routes()
        while self.queue.count and self.ready.count:
            entry = u64ring_pop(&self.ready)
            c = self.live(<uint32_t>(entry & 0xFFFFFFFFu), <uint32_t>(entry >> 32))
            if c is None:
                continue            # stale entry of a closed connection
            c.in_ready = False
            if not c.consumer or c.credit <= 0:
                continue
            self.queue.pop_front(&m)
            self.deliver(c, &m)
            if c.credit > 0:
                self.ready_push(c)
        # Back at the low mark; or nothing much waits and what is held is mostly in flight with
        # consumers that have not answered yet (a hung one must not stall every producer while
        # half of the bound is free).
        if self.backpressure and (self.held() <= self.queue_low or
                                  (self.queued() <= self.queue_low and self.held() <= self.queue_mid)):
            self.backpressure = False
            if self.on_backpressure is not None:
                self.on_backpressure(False)
        return 0

    # -- output ---------------------------------------------------------------------------

    cdef int schedule_flush(self) except -1:
        if self.dirty and not self.flush_scheduled:
            self.flush_scheduled = True
            if self.scheduler is None:
                self.flush()
            else:
                self.scheduler(self.flush_cb)
        return 0

    def flush(self):
        """Write every connection's pending output: one write per connection per loop pass."""
        cdef list dirty = self.dirty
        cdef CoreConnection c
        self.dirty = []
        self.flush_scheduled = False
        for c in dirty:
            c.dirty = False
            if c.out.length == 0:
                continue
            if c.state == S_CLOSED or c.transport is None:
                c._clear_out()
                continue
            c._write_out()

    def set_scheduler(self, scheduler):
        self.scheduler = scheduler

    def pump_now(self):
        """Deliver what can be delivered and schedule the flush (after control-plane changes)."""
        self.pump()
        self.schedule_flush()

    # -- command mode, for the control plane ------------------------------------------------

    def set_schema(self, CommandTable table, kinds):
        """Switch to command mode: ``kinds[i]`` is the RouteKind of ``table``'s command i."""
        cdef int32_t i
        if self.table is not None:
            raise RuntimeError("the schema is set once")
        if len(kinds) != len(table):
            raise ValueError("one kind per command of the table")
        self.routes = [Route(i, table.name_of(i), int(kinds[i])) for i in range(len(table))]
        self.table = table

    cdef int32_t _route_index(self, name) except -2:
        if self.table is None:
            return -1
        return self.table.find(name)

    def subscribe(self, CoreConnection conn, name):
        """Subscribe a consumer to the command ``name``.

        Returns 0 when subscribed, 1 when it already was, -1 when ``name`` is not a command
        of the schema, -2 when it is a broker command (nothing to subscribe to).
        """
        cdef int32_t idx = self._route_index(name)
        cdef int32_t i, sid
        cdef int32_t *ns
        cdef Route r
        if idx < 0:
            return -1
        r = <Route>self.routes[idx]
        if r.kind != R_FANOUT and r.kind != R_QUEUE:
            return -2
        if not conn.consumer or conn.state == S_CLOSED:
            raise ValueError("only a connected consumer can subscribe")
        for i in range(conn.nsubs):
            if self.subtab.items[conn.subs[i]].route == idx:
                return 1
        if conn.nsubs == conn.subs_cap:
            ns = <int32_t *>realloc(conn.subs, (2 * conn.subs_cap + 4) * sizeof(int32_t))
            if ns == NULL:
                raise MemoryError()
            conn.subs = ns
            conn.subs_cap = 2 * conn.subs_cap + 4
        sid = self.subtab.alloc((<uint64_t>conn.gen << 32) | conn.slot, idx)
        conn.subs[conn.nsubs] = sid
        conn.nsubs += 1
        r.add_member(sid, self.subtab.items)
        if r.kind == R_QUEUE:
            if conn.credit > 0:
                self.list_sub(sid)
            else:
                conn.unlisted = True
        elif r.waiting.count:
            self.mark_pending(r)
        return 0

    def unsubscribe(self, CoreConnection conn, name):
        """End a subscription: 0 done, 1 there was none, -1 unknown name, -2 broker command.

        Deliveries already made stay with the consumer; nothing more of it is sent.
        """
        cdef int32_t idx = self._route_index(name)
        cdef int32_t i, sid
        cdef Route r
        cdef MsgRing kept
        cdef Msg m
        if idx < 0:
            return -1
        r = <Route>self.routes[idx]
        if r.kind != R_FANOUT and r.kind != R_QUEUE:
            return -2
        for i in range(conn.nsubs):
            sid = conn.subs[i]
            if self.subtab.items[sid].route == idx:
                r.remove_member(sid, self.subtab.items)
                self.subtab.release(sid)
                conn.nsubs -= 1
                conn.subs[i] = conn.subs[conn.nsubs]
                if conn.backlog is not None and conn.backlog.count:
                    # copies of this command still waiting for credit are withdrawn too
                    kept = self.new_backlog()
                    while conn.backlog.pop_front(&m):
                        if m.route == idx:
                            payload_release(m.data)
                            self.n_backlog -= 1
                        else:
                            kept.push_back(&m)
                    conn.backlog = kept
                return 0
        return 1

    def route_stats(self) -> list:
        """Per command: name, routing, queued, subscribers, in, out."""
        cdef Route r
        return [{"name": r.name, "routing": r.routing, "queued": r.waiting.count,
                 "subscribers": r.nmembers, "in": r.n_in, "out": r.n_out}
                for r in self.routes if r.kind == R_FANOUT or r.kind == R_QUEUE]

    def stats(self) -> dict:
        return {
            "in": self.n_in,
            "out": self.n_out,
            "answered": self.n_answered,
            "orphaned": self.n_orphaned,
            "redelivered": self.n_redelivered,
            "refused": self.n_refused,
            "unknown_answers": self.n_unknown_answers,
            "queue": self.queued(),
            "held": self.held(),
            "inflight": self.n_inflight,
            "consumers": self.consumers,
            "backpressure": int(self.backpressure),
            "connections": len(self.conns) - len(self.free_slots),
            "dropped": self.n_dropped,
            "backlog": self.n_backlog,
            "unknown_commands": self.n_unknown_commands,
            "subscriptions": self.subtab.used,
        }
