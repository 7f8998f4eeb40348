from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

cdef extern from "wire.h":
    uint16_t teomq_ld16(const char *p) nogil
    uint32_t teomq_ld32(const char *p) nogil
    uint64_t teomq_ld64(const char *p) nogil
    void teomq_st16(char *p, uint16_t v) nogil
    void teomq_st32(char *p, uint32_t v) nogil
    void teomq_st64(char *p, uint64_t v) nogil

# Mirrors teomq/protocol.py; docs/protocol.md is the spec.
cdef enum:
    HEADER_SIZE = 24
    PROTO_VERSION = 1

cdef enum FrameType:
    T_HELLO = 1
    T_WELCOME = 2
    T_SEND = 3
    T_DELIVER = 4
    T_ANSWER = 5
    T_REPLY = 6
    T_ERROR = 7
    T_PING = 8
    T_PONG = 9
    T_FLOW = 10          # broker -> client that announced "flow": flags 1 hold SENDs back, 0 go on
    T_CONFIRM = 11       # broker -> client: SENDs flagged CONFIRM stored (id: the last; payload: u32 count)
    T_TOUCH = 12         # consumer -> broker ("lease"): payload u64 delivery ids whose leases go on
    T_CANCEL = 13        # ("cancel") client -> broker: id = its message id, withdrawn; broker -> consumer: id = delivery id
    T_MAX = 13

cdef enum FrameFlag:
    F_NO_REPLY = 0x1
    F_NO_ANSWER = 0x2
    F_REDELIVERED = 0x4
    F_API = 0x8          # SEND: payload is [u8 API command][data], for the broker itself
    F_CONFIRM = 0x10     # SEND: confirm it once stored (T_CONFIRM)
    F_DEADLINE = 0x20    # SEND ("deadline"): the payload begins with u32 milliseconds the sender waits at most
    F_FAIL_FAST = 0x40   # SEND ("deadline"): refused NO_CONSUMER when nobody consumes its queue
    F_DELAY = 0x80       # SEND ("delay"): the payload begins (after a deadline's u32) with u32 ms: not delivered before
    F_PRIO = 0x0F00      # SEND ("priority"): bits 8-11 hold its priority + 1 (0: its command's default)
    F_DEADLINE_ABS = 0x8000  # a parked SEND's kept copy: its deadline and delay are the broker's absolute times (never on the wire)
    F_RETRY = 0x20       # ANSWER ("lease"): a nack, msgpack {"delay": seconds or nil, "error": text or nil}
    F_REJECT = 0x40      # ANSWER ("lease"): dead-letter it, msgpack {"reason": text}

cdef enum ErrCode:
    E_BAD_FRAME = 1
    E_BAD_CHECKSUM = 2
    E_TOO_LARGE = 3
    E_UNKNOWN_TYPE = 4
    E_HANDSHAKE = 5
    E_UNKNOWN_ID = 6
    E_QUEUE_FULL = 7
    E_SHUTDOWN = 8
    E_NOT_ALLOWED = 9
    E_UNKNOWN_COMMAND = 10
    E_STORAGE = 12
    E_DEAD_LETTERED = 13
    E_REJECTED = 14
    E_EXPIRED = 15
    E_NO_CONSUMER = 16
    E_LEASE_EXPIRED = 17

cdef struct FrameHeader:
    uint8_t ftype
    uint16_t flags
    uint64_t fid
    uint32_t length


cdef int parse_header(const char *p, FrameHeader *h, uint32_t max_payload) except -1
cdef int check_partial(const char *p, size_t n) except -1
cdef int verify_crc(const char *frame, uint32_t length) except -1
cdef void write_header(char *p, uint8_t ftype, uint16_t flags, uint64_t fid,
                       const char *payload, uint32_t length) noexcept nogil
cdef object protocol_error(int code, str reason)
cdef int grow_buffer(char **buf, size_t *cap, size_t need) except -1
cdef uint64_t as_u64(object v) except? 0xFFFFFFFFFFFFFFFF
cdef const unsigned char[::1] as_bytes_view(object data)


# Payloads of at least teomq_crc32c_reframe_min bytes (crc32c_impl.h: 64 with pclmulqdq) are
# forwarded under a new header with a CRC derived from the received frame's, not recomputed:
# one pass over the payload, not two. From INPLACE_MIN bytes a DELIVER's payload is not copied
# into the output buffer but written from where it is (WriteBuffer.add_in_place).
cdef enum:
    INPLACE_MIN = 4096

cdef struct Received:
    # What forwarding needs to know of a received frame's checksum.
    uint32_t crc          # the frame's crc field
    uint32_t head_crc     # CRC32C of its header bytes 0..19
    uint32_t shift        # factor of x^(8 length) mod P (crc32c_impl.h); 0: recompute instead

cdef void note_received(const char *frame, uint32_t length, Received *r) noexcept nogil
cdef void note_received_strip(const char *frame, uint32_t length, uint32_t strip, Received *r) noexcept nogil


cdef class FrameDecoder:
    cdef char *buf
    cdef size_t length
    cdef size_t cap
    cdef readonly uint32_t max_payload
    cdef object _error
    cdef list _out
    cdef int _consume(self, object data) except -1
    cdef int _parse(self) except -1
    cdef int _on_frame(self, FrameHeader *h, const char *payload) except -1


# A payload written from where its owner holds it instead of being copied into a WriteBuffer:
# it goes out after the buffer's first `at` bytes.
cdef struct Ext:
    size_t at
    const char *data
    size_t length

cdef enum:
    EXT_MAX = 256        # in-place payloads per WriteBuffer between writes (2 * EXT_MAX + 1 <= IOV_MAX)


cdef class WriteBuffer:
    """Growable output buffer of encoded frames. Caller must not keep pointers across ensure()."""
    cdef char *buf
    cdef size_t length
    cdef size_t cap
    cdef Ext *ext                # NULL until the first add_in_place()
    cdef int n_ext
    cdef int ensure(self, size_t extra) except -1
    cdef int add_frame(self, uint8_t ftype, uint16_t flags, uint64_t fid,
                       const char *payload, size_t n) except -1
    cdef int add_frame_u32(self, uint8_t ftype, uint16_t flags, uint64_t fid, uint32_t first,
                           const char *payload, size_t n) except -1
    cdef int add_forward(self, uint8_t ftype, uint16_t flags, uint64_t fid,
                         const char *payload, size_t n, const Received *r) except -1
    cdef int add_forward_header(self, uint8_t ftype, uint16_t flags, uint64_t fid,
                                size_t n, const Received *r) except -1
    cdef int add_in_place(self, uint8_t ftype, uint16_t flags, uint64_t fid,
                          const char *payload, size_t n, const Received *r) except -1
    cdef int _segments(self, void *iov) noexcept     # its bytes as iovecs (up to 2 * EXT_MAX + 1)
    cdef bytes take_rest(self, size_t sent)
    cdef bytes take_bytes(self)
    cdef void clear(self) noexcept
