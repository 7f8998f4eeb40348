from libc.stdint cimport int32_t, uint64_t


cdef size_t name_length(const char *p, size_t n) noexcept nogil
    # bytes before the first b"/" of p[0:n] (n when there is none): the command's name


cdef class CommandTable:
    """Command names -> dense indices 0..count-1, each with its number of parameters.

    Open addressing over a power-of-two slot array; names are kept as bytes in ``names``.
    """
    cdef list names             # index -> bytes
    cdef list params            # index -> tuple of param names (bytes), from the pattern
    cdef int32_t *nparams       # index -> len(params[index])
    cdef int32_t *slots         # slot -> index, -1 empty
    cdef uint64_t *hashes       # slot -> hash of the name in it
    cdef size_t mask            # slot count - 1
    cdef size_t ncap            # capacity of nparams
    cdef readonly int32_t count
    cdef int32_t lookup(self, const char *name, size_t n) noexcept
        # index of the command named p[0:n], or -1; no Python object is touched
