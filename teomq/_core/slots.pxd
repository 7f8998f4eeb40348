from cpython.ref cimport PyObject
from libc.stdint cimport int32_t, uint32_t, uint64_t

# The one generation-tagged slot table of the core: connections (and in-process endpoints),
# producer sessions, flights and subscriptions each keep their records in an array indexed
# by a slot of one of these. A handle is ``generation << 32 | slot``; the generation changes
# whenever the slot is released, so a stale or forged handle never matches a new tenant.
# The records themselves live in the owner's array, which grows with ``cap``.

cdef enum:
    SLOT_USED = -2          # next[i] of a slot in use (anything >= -1 is a free-list link)

cdef struct Slots:
    uint32_t *gen           # generation of each slot, never 0
    int32_t *next           # free-list link, or SLOT_USED
    int32_t cap
    int32_t free_head
    int32_t used
    int32_t limit           # cap never grows past this

cdef int slots_init(Slots *t, int32_t cap, int32_t limit) except -1
cdef int slots_grow(Slots *t) except -1
cdef int slots_fit(Slots *t, int32_t slot, void **records, int32_t *records_cap, size_t size) except -1
cdef void slots_free(Slots *t) noexcept


cdef inline int32_t slots_take(Slots *t) except -1:
    # A free slot, marked used (the table doubles when none is free: the owner then grows
    # its own records to t.cap before touching them).
    cdef int32_t i
    if t.free_head < 0:
        slots_grow(t)
    i = t.free_head
    t.free_head = t.next[i]
    t.next[i] = SLOT_USED
    t.used += 1
    return i

cdef inline int32_t slots_take_into(Slots *t, void **records, int32_t *records_cap,
                                    size_t size) except -1:
    # slots_take() for an owner whose records (``size`` bytes each) are in one array: it is
    # grown to the table's cap when the table grew
    cdef int32_t i = slots_take(t)
    if t.cap > records_cap[0]:
        slots_fit(t, i, records, records_cap, size)
    return i

cdef inline void slots_put(Slots *t, int32_t i) noexcept:
    # Release a used slot: its generation moves on, so every handle to it goes stale.
    t.gen[i] += 1
    if t.gen[i] == 0:
        t.gen[i] = 1
    t.next[i] = t.free_head
    t.free_head = i
    t.used -= 1

cdef inline uint64_t slots_handle(const Slots *t, int32_t i) noexcept:
    return (<uint64_t>t.gen[i] << 32) | <uint32_t>i

cdef inline int32_t slots_find(const Slots *t, uint64_t handle) noexcept:
    # The slot of a live handle, or -1 (out of range, free, or an older generation).
    cdef uint32_t i = <uint32_t>(handle & 0xFFFFFFFFu)
    if i >= <uint32_t>t.cap or t.next[i] != SLOT_USED or t.gen[i] != <uint32_t>(handle >> 32):
        return -1
    return <int32_t>i

cdef inline bint slots_used(const Slots *t, int32_t i) noexcept:
    return t.next[i] == SLOT_USED


# The owners that keep Python records (endpoints, sessions, routes) keep them in a list indexed
# by slot: a per-message lookup borrows the record (PyList_GET_ITEM, no reference counting).
cdef extern from "Python.h":
    PyObject *list_item "PyList_GET_ITEM" (PyObject *lst, Py_ssize_t i) nogil
