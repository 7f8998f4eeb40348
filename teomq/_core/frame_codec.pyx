# cython: language_level=3
"""Frame codec of the teomq wire protocol.

Wire schema (little-endian; docs/protocol.md is the full spec)::

    0   2  magic     b"TQ"
    2   1  version   1
    3   1  type      1..9 (HELLO WELCOME SEND DELIVER ANSWER REPLY ERROR PING PONG)
    4   2  flags     NO_REPLY=1 (SEND), NO_ANSWER=2 (ANSWER), REDELIVERED=4 (DELIVER), API=8 (SEND)
    6   2  reserved  must be 0
    8   8  id        message id / delivery id
    16  4  length    payload bytes; over the receiver's limit -> TOO_LARGE, refused from the header
    20  4  crc       CRC32C of bytes 0..19 then the payload
    24  *  payload

Checks run in this order, the first failure wins: magic, version, reserved, type,
length (all from the header alone, before any payload is buffered), then crc. Magic and
version are checked as soon as their bytes arrive, before the rest of the header.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy, memmove

cdef extern from "sys/uio.h" nogil:
    struct iovec:
        void *iov_base
        size_t iov_len

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

from teomq._core.crc32c cimport (
    teomq_crc32c_reframe_min, teomq_crc32c_shift, teomq_crc32c_shift_factor, teomq_crc32c_update,
)

from operator import index as _index

from teomq.errors import ProtocolError


cdef inline uint64_t as_u64(object v) except? 0xFFFFFFFFFFFFFFFF:
    """An int (or __index__ object) as u64: TypeError for float/None, OverflowError out of range."""
    if type(v) is not int:
        v = _index(v)
    return <uint64_t>v


cdef inline int small_int(object v, int lo, int hi, str what) except? -1:
    """An int (or __index__ object) in lo..hi: TypeError for float/None, ValueError outside."""
    cdef long long c
    if type(v) is not int:
        v = _index(v)
    try:
        c = v
    except OverflowError:
        raise ValueError(f"{what} {v}") from None
    if c < lo or c > hi:
        raise ValueError(f"{what} {v}")
    return <int>c


cdef inline const unsigned char[::1] as_bytes_view(object data):
    if data is None:
        raise TypeError("a bytes-like object is required, not 'NoneType'")
    return data


cdef object protocol_error(int code, str reason):
    return ProtocolError(code, reason)


cdef int parse_header(const char *p, FrameHeader *h, uint32_t max_payload) except -1:
    """Validate and decode the 24 header bytes at p. Raises ProtocolError."""
    if p[0] != b'T' or p[1] != b'Q':
        raise protocol_error(E_BAD_FRAME, "bad magic: not a teomq frame")
    if <uint8_t>p[2] != PROTO_VERSION:
        raise protocol_error(E_BAD_FRAME, f"unsupported protocol version {<uint8_t>p[2]}")
    if teomq_ld16(p + 6) != 0:
        raise protocol_error(E_BAD_FRAME, "reserved header field is not zero")
    h.ftype = <uint8_t>p[3]
    if h.ftype == 0 or h.ftype > T_MAX:
        raise protocol_error(E_UNKNOWN_TYPE, f"unknown frame type {h.ftype}")
    h.flags = teomq_ld16(p + 4)
    h.fid = teomq_ld64(p + 8)
    h.length = teomq_ld32(p + 16)
    if h.length > max_payload:
        raise protocol_error(
            E_TOO_LARGE, f"frame payload of {h.length} bytes is over the limit of {max_payload}")
    return 0


cdef int grow_buffer(char **buf, size_t *cap, size_t need) except -1:
    """Make *buf hold at least need bytes, doubling *cap; the contents are kept."""
    cdef size_t c = cap[0]
    cdef char *nb
    if need <= c:
        return 0
    while c < need:
        c <<= 1
    nb = <char *>realloc(buf[0], c)
    if nb == NULL:
        raise MemoryError()
    buf[0] = nb
    cap[0] = c
    return 0


cdef int check_partial(const char *p, size_t n) except -1:
    """Refuse a partial header early when its first bytes already show it is not a frame."""
    if n >= 1 and p[0] != b'T' or n >= 2 and p[1] != b'Q':
        raise protocol_error(E_BAD_FRAME, "bad magic: not a teomq frame")
    if n >= 3 and <uint8_t>p[2] != PROTO_VERSION:
        raise protocol_error(E_BAD_FRAME, f"unsupported protocol version {<uint8_t>p[2]}")
    return 0


cdef int verify_crc(const char *frame, uint32_t length) except -1:
    """frame points at a whole frame (header + length payload bytes)."""
    cdef uint32_t crc = teomq_crc32c_update(0, frame, 20)
    crc = teomq_crc32c_update(crc, frame + HEADER_SIZE, length)
    if crc != teomq_ld32(frame + 20):
        raise protocol_error(E_BAD_CHECKSUM, "frame checksum mismatch")
    return 0


cdef void write_header(char *p, uint8_t ftype, uint16_t flags, uint64_t fid,
                       const char *payload, uint32_t length) noexcept nogil:
    p[0] = b'T'
    p[1] = b'Q'
    p[2] = PROTO_VERSION
    p[3] = <char>ftype
    teomq_st16(p + 4, flags)
    teomq_st16(p + 6, 0)
    teomq_st64(p + 8, fid)
    teomq_st32(p + 16, length)
    cdef uint32_t crc = teomq_crc32c_update(0, p, 20)
    if length:
        crc = teomq_crc32c_update(crc, payload, length)
    teomq_st32(p + 20, crc)


cdef void note_received(const char *frame, uint32_t length, Received *r) noexcept nogil:
    """Record a verified frame's checksum facts so its payload can be forwarded cheaply."""
    r.crc = teomq_ld32(frame + 20)
    if length >= teomq_crc32c_reframe_min:
        r.head_crc = teomq_crc32c_update(0, frame, 20)
        r.shift = teomq_crc32c_shift_factor(length)
    else:
        r.head_crc = 0
        r.shift = 0


cdef void note_received_strip(const char *frame, uint32_t length, uint32_t strip, Received *r) noexcept nogil:
    """The same for a payload forwarded without its first ``strip`` bytes (a SEND's deadline):
    the CRC of the header and those bytes stands for the header's, and the factor is that of
    what is forwarded (CRC32C is affine: the derivation does not need equal lengths)."""
    r.crc = teomq_ld32(frame + 20)
    if length - strip >= teomq_crc32c_reframe_min:
        r.head_crc = teomq_crc32c_update(teomq_crc32c_update(0, frame, 20), frame + 24, strip)
        r.shift = teomq_crc32c_shift_factor(length - strip)
    else:
        r.head_crc = 0
        r.shift = 0


@cython.final
cdef class WriteBuffer:
    """Reusable output buffer: frames are encoded straight into it; take() hands the bytes out."""

    def __cinit__(self, size_t initial=4096):
        self.cap = initial if initial >= 64 else 64
        self.buf = <char *>malloc(self.cap)
        if self.buf == NULL:
            raise MemoryError()
        self.length = 0
        self.ext = NULL
        self.n_ext = 0

    def __dealloc__(self):
        free(self.buf)
        free(self.ext)

    cdef int ensure(self, size_t extra) except -1:
        return grow_buffer(&self.buf, &self.cap, self.length + extra)

    cdef int add_frame(self, uint8_t ftype, uint16_t flags, uint64_t fid,
                       const char *payload, size_t n) except -1:
        self.ensure(HEADER_SIZE + n)
        cdef char *p = self.buf + self.length
        if n:
            memcpy(p + HEADER_SIZE, payload, n)
        write_header(p, ftype, flags, fid, p + HEADER_SIZE, <uint32_t>n)
        self.length += HEADER_SIZE + n
        return 0

    cdef int add_frame_u32(self, uint8_t ftype, uint16_t flags, uint64_t fid, uint32_t first,
                           const char *payload, size_t n) except -1:
        """add_frame() of a payload that begins with the u32 ``first`` (a SEND's deadline)."""
        self.ensure(HEADER_SIZE + 4 + n)
        cdef char *p = self.buf + self.length
        teomq_st32(p + HEADER_SIZE, first)
        if n:
            memcpy(p + HEADER_SIZE + 4, payload, n)
        write_header(p, ftype, flags, fid, p + HEADER_SIZE, <uint32_t>(n + 4))
        self.length += HEADER_SIZE + 4 + n
        return 0

    cdef int add_forward(self, uint8_t ftype, uint16_t flags, uint64_t fid,
                         const char *payload, size_t n, const Received *r) except -1:
        """add_frame() for a payload received in a frame described by r: its CRC is derived."""
        if r.shift == 0:
            return self.add_frame(ftype, flags, fid, payload, n)
        self.ensure(HEADER_SIZE + n)
        memcpy(self.buf + self.length + HEADER_SIZE, payload, n)
        self.add_forward_header(ftype, flags, fid, n, r)
        self.length += n
        return 0

    cdef int add_forward_header(self, uint8_t ftype, uint16_t flags, uint64_t fid,
                                size_t n, const Received *r) except -1:
        """Only the header of a forwarded frame (caller must have r.shift != 0); the n payload
        bytes are the caller's to place right after it, here or in a write of its own."""
        cdef char *p
        cdef uint32_t head
        self.ensure(HEADER_SIZE)
        p = self.buf + self.length
        write_header(p, ftype, flags, fid, NULL, 0)  # header fields; length and crc set below
        teomq_st32(p + 16, <uint32_t>n)
        head = teomq_crc32c_update(0, p, 20)
        teomq_st32(p + 20, r.crc ^ teomq_crc32c_shift(r.head_crc ^ head, r.shift))
        self.length += HEADER_SIZE
        return 0

    cdef int add_in_place(self, uint8_t ftype, uint16_t flags, uint64_t fid,
                          const char *payload, size_t n, const Received *r) except -1:
        """A forwarded frame whose payload is not copied: the header goes into the buffer and
        the payload is written from where it is (writer.pyx: sendmsg) at the next write. Caller must
        have r.shift != 0 and n_ext < EXT_MAX, and keep the payload valid until the buffer is
        written or cleared."""
        if self.ext == NULL:
            self.ext = <Ext *>malloc(EXT_MAX * sizeof(Ext))
            if self.ext == NULL:
                raise MemoryError()
        self.add_forward_header(ftype, flags, fid, n, r)
        self.ext[self.n_ext].at = self.length
        self.ext[self.n_ext].data = payload
        self.ext[self.n_ext].length = n
        self.n_ext += 1
        return 0

    cdef int _segments(self, void *iov_out) noexcept:
        # the buffer interleaved with the in-place payloads, as iovecs; returns their count
        cdef iovec *iov = <iovec *>iov_out
        cdef int k = 0, i
        cdef size_t prev = 0
        for i in range(self.n_ext):
            if self.ext[i].at > prev:
                iov[k].iov_base = self.buf + prev
                iov[k].iov_len = self.ext[i].at - prev
                k += 1
            iov[k].iov_base = <void *>self.ext[i].data
            iov[k].iov_len = self.ext[i].length
            k += 1
            prev = self.ext[i].at
        if self.length > prev:
            iov[k].iov_base = self.buf + prev
            iov[k].iov_len = self.length - prev
            k += 1
        return k

    cdef bytes take_rest(self, size_t sent):
        """Everything after the first ``sent`` bytes of its segments, as one bytes; the
        buffer is empty after (the in-place payloads need not outlive this call)."""
        cdef iovec iov[2 * EXT_MAX + 1]
        cdef int k, i
        cdef size_t total = 0, skip = sent, take
        cdef bytes rest
        cdef char *dst
        if self.n_ext == 0:
            rest = PyBytes_FromStringAndSize(self.buf + sent, self.length - sent)
            self.length = 0
            return rest
        k = self._segments(iov)
        for i in range(k):
            total += iov[i].iov_len
        rest = PyBytes_FromStringAndSize(NULL, total - sent)
        dst = PyBytes_AS_STRING(rest)
        for i in range(k):
            if skip >= iov[i].iov_len:
                skip -= iov[i].iov_len
                continue
            take = iov[i].iov_len - skip
            memcpy(dst, <char *>iov[i].iov_base + skip, take)
            dst += take
            skip = 0
        self.clear()
        return rest

    cdef bytes take_bytes(self):
        return self.take_rest(0)

    cdef void clear(self) noexcept:
        self.length = 0
        self.n_ext = 0

    def add(self, ftype, flags, fid, payload=b""):
        """Encode one frame onto the buffer."""
        cdef int t = small_int(ftype, 1, T_MAX, "unknown frame type")
        cdef int fl = small_int(flags, 0, 0xFFFF, "flags out of range:")
        cdef uint64_t i = as_u64(fid)
        cdef const unsigned char[::1] view
        if type(payload) is bytes:
            # fast path: no buffer-protocol set-up for the common type (saves ~40% of add())
            self.add_frame(<uint8_t>t, <uint16_t>fl, i, PyBytes_AS_STRING(payload),
                           <size_t>PyBytes_GET_SIZE(payload))
            return
        view = as_bytes_view(payload)
        if view.shape[0] > 0xFFFFFFFF:
            raise ValueError("payload too long")
        if view.shape[0]:
            self.add_frame(<uint8_t>t, <uint16_t>fl, i, <const char *>&view[0], view.shape[0])
        else:
            self.add_frame(<uint8_t>t, <uint16_t>fl, i, NULL, 0)

    def take(self) -> bytes:
        """Return everything encoded so far and empty the buffer."""
        return self.take_bytes()

    def __len__(self):
        return self.length


def encode_frame(ftype, flags, fid, payload=b"") -> bytes:
    """Encode one frame to bytes."""
    cdef WriteBuffer wb = WriteBuffer(HEADER_SIZE + len(payload))
    wb.add(ftype, flags, fid, payload)
    return wb.take_bytes()


cdef class FrameDecoder:
    """Incremental decoder: feed() any chunking of a byte stream, get back every complete frame.

    Frames come back as tuples ``(type, flags, id, payload: bytes)``. After a ProtocolError
    the decoder is poisoned: every later feed() raises the same error. Subclasses in C
    (ClientCore) override ``_on_frame`` to handle frames instead of listing them.
    """

    def __cinit__(self, max_payload=1 << 20, *args, **kwargs):
        self.set_max_payload(max_payload)
        self.cap = 65536
        self.buf = <char *>malloc(self.cap)
        if self.buf == NULL:
            raise MemoryError()
        self.length = 0
        self._error = None

    def __dealloc__(self):
        free(self.buf)

    def set_max_payload(self, max_payload):
        """Hold frames not yet parsed to a new payload limit (e.g. the peer's, once known)."""
        cdef uint64_t mp = as_u64(max_payload)
        if mp > 0xFFFFFFFF:
            raise OverflowError("max_payload is over 2**32 - 1")
        self.max_payload = <uint32_t>mp

    cdef int _consume(self, object data) except -1:
        # append one read to the buffer (raises the poisoning error first)
        cdef const unsigned char[::1] view
        cdef const char *p
        cdef size_t n
        if self._error is not None:
            raise self._error
        if type(data) is bytes:  # what a transport hands over: skip the buffer protocol
            p = PyBytes_AS_STRING(data)
            n = <size_t>PyBytes_GET_SIZE(data)
        else:
            view = as_bytes_view(data)
            n = view.shape[0]
            p = <const char *>&view[0] if n else NULL
        if n:
            grow_buffer(&self.buf, &self.cap, self.length + n)
            memcpy(self.buf + self.length, p, n)
            self.length += n
        return 0

    cdef int _parse(self) except -1:
        # every complete frame in the buffer to _on_frame; a frame is consumed before it is
        # handled, and a handler that poisons the decoder stops the loop
        cdef FrameHeader h
        cdef size_t pos = 0
        cdef size_t total
        try:
            while self.length - pos >= HEADER_SIZE:
                parse_header(self.buf + pos, &h, self.max_payload)
                total = HEADER_SIZE + <size_t>h.length
                if self.length - pos < total:
                    break
                verify_crc(self.buf + pos, h.length)
                pos += total
                self._on_frame(&h, self.buf + pos - h.length)
                if self._error is not None:
                    return 0
            if self.length - pos < HEADER_SIZE:
                check_partial(self.buf + pos, self.length - pos)
        except ProtocolError as exc:
            self._error = exc
            self.length = 0
            raise
        finally:
            if pos and self._error is None:
                self.length -= pos
                if self.length:
                    memmove(self.buf, self.buf + pos, self.length)
        return 0

    cdef int _on_frame(self, FrameHeader *h, const char *payload) except -1:
        self._out.append((h.ftype, h.flags, h.fid, PyBytes_FromStringAndSize(payload, h.length)))
        return 0

    def feed(self, data) -> list:
        """Add bytes; return the list of frames completed by them (may be empty)."""
        cdef list out = []
        self._consume(data)
        self._out = out
        try:
            self._parse()
        finally:
            self._out = None
        return out

    @property
    def buffered(self) -> int:
        """Bytes held that do not yet make a complete frame."""
        return self.length
