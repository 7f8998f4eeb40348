cimport cython
from libc.stdint cimport uint64_t


@cython.final
cdef class MessageLog:
    """The per-message log line, written by the core: a buffer flushed once per loop pass."""
    cdef char *buf
    cdef size_t used
    cdef size_t cap
    cdef size_t limit             # most bytes held unwritten; past it, new lines are dropped
    cdef readonly int fd
    cdef bint own_fd              # opened here (a path): closed by close()
    cdef long cached_sec          # the second whose "YYYY-mm-dd HH:MM:SS" is in stamp
    cdef char stamp[32]
    cdef size_t stamp_len
    cdef readonly uint64_t lines
    cdef readonly uint64_t dropped       # lines not written: the buffer full, or a write failed
    cdef readonly int last_errno         # errno of the last failed write (0: none)
    cdef int add(self, bytes name, uint64_t msg_id, const char *p, size_t n) except -1
    cdef int write_out(self) except -1
