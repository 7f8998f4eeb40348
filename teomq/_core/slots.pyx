# cython: language_level=3
"""The core's one generation-tagged slot table (slots.pxd has the inline fast path).

Used for connections, producer sessions, flights and subscriptions: a free list of slots
and a generation per slot, in two arrays that double as needed. The table holds no records:
its owner keeps them in an array of its own, indexed by slot, grown to ``cap``.
"""

from libc.stdint cimport int32_t, uint32_t
from libc.stdlib cimport free, malloc, realloc


cdef void _link(Slots *t, int32_t start) noexcept:
    cdef int32_t i
    for i in range(start, t.cap):
        t.gen[i] = 1
        t.next[i] = i + 1 if i + 1 < t.cap else -1
    t.free_head = start


cdef int slots_init(Slots *t, int32_t cap, int32_t limit) except -1:
    if cap < 1 or limit < cap:
        raise ValueError("a slot table needs 1 <= cap <= limit")
    t.gen = <uint32_t *>malloc(cap * sizeof(uint32_t))
    t.next = <int32_t *>malloc(cap * sizeof(int32_t))
    if t.gen == NULL or t.next == NULL:
        free(t.gen)
        free(t.next)
        t.gen = NULL
        t.next = NULL
        raise MemoryError()
    t.cap = cap
    t.used = 0
    t.limit = limit
    _link(t, 0)
    return 0


cdef int slots_grow(Slots *t) except -1:
    cdef int32_t old = t.cap
    cdef int32_t cap = 2 * old if old <= t.limit // 2 else t.limit
    cdef uint32_t *g
    cdef int32_t *n
    if cap <= old:
        raise MemoryError(f"slot table is full ({old} slots)")
    g = <uint32_t *>realloc(t.gen, cap * sizeof(uint32_t))
    if g == NULL:
        raise MemoryError()
    t.gen = g
    n = <int32_t *>realloc(t.next, cap * sizeof(int32_t))
    if n == NULL:
        raise MemoryError()
    t.next = n
    t.cap = cap
    _link(t, old)
    return 0


cdef int slots_fit(Slots *t, int32_t slot, void **records, int32_t *records_cap, size_t size) except -1:
    # grow an owner's record array to t.cap; on failure the slot just taken is given back
    cdef void *n = realloc(records[0], <size_t>t.cap * size)
    if n == NULL:
        slots_put(t, slot)
        raise MemoryError()
    records[0] = n
    records_cap[0] = t.cap
    return 0


cdef void slots_free(Slots *t) noexcept:
    free(t.gen)
    free(t.next)
    t.gen = NULL
    t.next = NULL
    t.cap = 0
    t.used = 0
    t.free_head = -1
