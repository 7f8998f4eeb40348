# cython: language_level=3
"""Ring-buffer queue of pending messages (C structs, no Python object per message)."""

cimport cython
from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy
from libc.stdint cimport uint64_t

from teomq._core.frame_codec cimport as_bytes_view, as_u64

from teomq.errors import QueueFull

# Largest ring: 2**32 slots (128 GiB of Msg structs) is far past any sane bound.
cdef size_t MAX_CAP = (<size_t>1) << 32
# A ring larger than this (slots: 256 KiB of Msg structs) shrinks once it drains (pop_front).
cdef size_t SHRINK_FROM = 4096


@cython.final
cdef class MsgRing:

    def __cinit__(self, size_t capacity=1024, size_t max_items=1 << 20):
        cdef size_t cap = 16
        if max_items == 0:
            raise ValueError("max_items must be at least 1")
        if capacity > MAX_CAP:
            raise ValueError(f"capacity {capacity} is over the limit of {MAX_CAP} messages")
        while cap < capacity:
            cap <<= 1
        self.items = <Msg *>malloc(cap * sizeof(Msg))
        if self.items == NULL:
            raise MemoryError()
        self.cap = cap
        self.head = 0
        self.count = 0
        self.max_items = max_items

    def __dealloc__(self):
        cdef size_t i
        if self.items != NULL:
            for i in range(self.count):
                payload_release(self.items[(self.head + i) & (self.cap - 1)].data)
            free(self.items)

    cdef bint _relocate(self, size_t newcap) noexcept:
        # the items into a new ring of newcap slots, unwrapped so head is 0 again; False when
        # malloc fails (the old ring kept)
        cdef Msg *n = <Msg *>malloc(newcap * sizeof(Msg))
        cdef size_t first
        if n == NULL:
            return False
        first = self.cap - self.head
        if first > self.count:
            first = self.count
        memcpy(n, self.items + self.head, first * sizeof(Msg))
        memcpy(n + first, self.items, (self.count - first) * sizeof(Msg))
        free(self.items)
        self.items = n
        self.cap = newcap
        self.head = 0
        return True

    cdef int _grow(self) except -1:
        # double the ring
        if self.cap << 1 > MAX_CAP:
            raise MemoryError(f"queue cannot grow past {MAX_CAP} messages")
        if not self._relocate(self.cap << 1):
            raise MemoryError()
        return 0

    cdef int push_back(self, const Msg *m) except -1:
        if self.count >= self.max_items:
            return 1
        if self.count == self.cap:
            self._grow()
        self.items[(self.head + self.count) & (self.cap - 1)] = m[0]
        self.count += 1
        return 0

    cdef int push_back_always(self, const Msg *m) except -1:
        # a message the broker had already accepted (recovered from its log): never refused
        if self.count == self.cap:
            self._grow()
        self.items[(self.head + self.count) & (self.cap - 1)] = m[0]
        self.count += 1
        return 0

    cdef int push_front(self, const Msg *m) except -1:
        if self.count == self.cap:
            self._grow()
        self.head = (self.head - 1) & (self.cap - 1)
        self.items[self.head] = m[0]
        self.count += 1
        return 0

    cdef bint pop_front(self, Msg *out) noexcept:
        if self.count == 0:
            return False
        out[0] = self.items[self.head]
        self.head = (self.head + 1) & (self.cap - 1)
        self.count -= 1
        if self.count < self.cap >> 3 and self.cap > SHRINK_FROM:
            self._shrink()
        return True

    cdef bint take_match(self, uint64_t session, uint64_t msg_id, Msg *out) noexcept:
        # take out the first message of this producer session and message id (a cancel):
        # the ones after it move up by one; False when there is none. O(count): rare
        cdef size_t i, j
        cdef size_t mask = self.cap - 1
        for i in range(self.count):
            if self.items[(self.head + i) & mask].session == session and \
                    self.items[(self.head + i) & mask].msg_id == msg_id:
                out[0] = self.items[(self.head + i) & mask]
                for j in range(i, self.count - 1):
                    self.items[(self.head + j) & mask] = self.items[(self.head + j + 1) & mask]
                self.count -= 1
                return True
        return False

    cdef void _shrink(self) noexcept:
        # a ring that drained to an eighth of its slots gives back half of them (memory is
        # returned after a drain); a failed malloc keeps the old ring
        self._relocate(self.cap >> 1)

    # -- Python view, for tests and benchmarks --------------------------------------------

    cdef int _make(self, Msg *m, payload, msg_id) except -1:
        cdef uint64_t mid = as_u64(msg_id)
        cdef const unsigned char[::1] view = as_bytes_view(payload)
        cdef size_t n = view.shape[0]
        m.data = payload_new(n)
        if m.data == NULL:
            raise MemoryError()
        if n:
            memcpy(m.data, &view[0], n)
        m.length = <uint32_t>n
        msg_fields(m, 0, 0, mid, 0, 0, 0)
        m.seq = 0
        m.rx.shift = 0
        return 0

    def push(self, payload, msg_id=0):
        """Append a message; raise QueueFull at the bound."""
        cdef Msg m
        if self.count >= self.max_items:
            raise QueueFull(f"queue is full ({self.max_items} messages)")
        self._make(&m, payload, msg_id)
        self.push_back(&m)

    def push_head(self, payload, msg_id=0):
        """Put a message at the head (as redelivery does); never refused."""
        cdef Msg m
        self._make(&m, payload, msg_id)
        self.push_front(&m)

    def pop(self):
        """Remove the head message and return ``(msg_id, payload)``; IndexError when empty."""
        cdef Msg m
        if not self.pop_front(&m):
            raise IndexError("pop from an empty queue")
        try:
            return m.msg_id, PyBytes_FromStringAndSize(m.data, m.length)
        finally:
            payload_release(m.data)

    def __len__(self):
        return self.count

    @property
    def capacity(self) -> int:
        """Slots allocated now (a power of two)."""
        return self.cap
