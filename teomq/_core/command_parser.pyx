# cython: language_level=3
"""Command table and command-string parser (the Go original's command scheme), in C.

The rules are the Go original's (kirill-scherba/command v2.3.6, ``ParseCommand`` and ``ParamsSlice``;
UPSTREAM.md "Command scheme"). Bytes throughout; names are compared as bytes, no encoding is assumed.

Pattern -> parameter positions (``parse_pattern``, at registration; rule 4)::

    4. ""  -> no positions;
       otherwise split at every "/"; each part is trimmed of white space, then of every "{" and "}"
       at both ends, then of white space again. A part that ends up empty still holds its
       position (it counts) but names no var: its name is b"".

    "{data}/{description}" -> (b"data", b"description")   " { x } /{y}" -> (b"x", b"y")
    "{a}//{b}" -> (b"a", b"", b"b")   "{a}/" -> (b"a", b"")   "{}/{z}" -> (b"", b"z")   "{{x}}" -> (b"x",)

    White space is Go's unicode.IsSpace set (WHITE_SPACE below): Python's str.isspace() also
    counts U+001C..U+001F, which Go does not trim.

Command string -> ``(index, name, vars, data)`` (``CommandTable.parse``; rules 1-3 and 5-7),
for a command with k positions::

    1. name = bytes before the first b"/"; rest = bytes after it (b"" when there is no b"/")
    2. a name not in the table raises UnknownCommand(name): "command '<name>' not found"
       (an empty name too: "command '' not found")
    3. rest == b""  -> vars (), data b""          (no vars at all, whatever k is)
    5. otherwise parts = rest.split(b"/", k)     (at most k + 1 parts)
    6. vars[i] = parts[i], or b"" when there are fewer parts; b"" too for a position without a name
    7. data = parts[k] when len(parts) > k, else b""

    So ``vars`` is () or has exactly k entries, aligned with ``params_of(index)``: a consumer
    builds its vars as {params[i]: vars[i] for each i whose params[i] is not b""}.

Examples::

    "{data}/{description}"  b"version/some_data" -> vars (b"some_data", b""), data b""
                            b"version/a/b/c/d"   -> vars (b"a", b"b"),        data b"c/d"
                            b"version", b"version/" -> vars (), data b""
    "{a}//{b}"              rest b"1/2/3/4"      -> vars (b"1", b"", b"3"),   data b"4"   i.e. {a: 1, b: 3}
    "{a}/"                  rest b"1/2/3"        -> vars (b"1", b""),         data b"3"   i.e. {a: 1}
    no pattern              b"num_players/42"    -> vars (), data b"42";  b"num_players/42/" -> data b"42/"

teomq/_py/command_parser.py is the pure-Python twin, error for error; tests/test_command_parser.py
holds the two against each other and against a reference written from the rules.
"""

cimport cython
from cpython.buffer cimport (
    PyBUF_FULL_RO, PyBuffer_IsContiguous, PyBuffer_Release, PyObject_CheckBuffer, PyObject_GetBuffer,
)
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.object cimport PyObject
from cpython.ref cimport Py_INCREF
from cpython.tuple cimport PyTuple_New, PyTuple_SET_ITEM
from libc.stdint cimport INT32_MAX, int32_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memchr, memcmp, memcpy

from operator import index as _index

from teomq.errors import UnknownCommand

__all__ = ["CommandTable", "parse_pattern", "name_length"]

# Borrowed-pointer forms of the list/tuple/bytes macros: lookup() and split() read the stored names
# without touching a reference count (the cpython.* declarations take `object` and would incref/decref).
cdef extern from "Python.h":
    PyObject *list_item "PyList_GET_ITEM"(PyObject *op, Py_ssize_t i) nogil
    PyObject *tuple_item "PyTuple_GET_ITEM"(PyObject *op, Py_ssize_t i) nogil
    char *bytes_data "PyBytes_AS_STRING"(PyObject *op) nogil
    Py_ssize_t bytes_size "PyBytes_GET_SIZE"(PyObject *op) nogil

cdef bytes EMPTY = b""
cdef size_t MIN_SLOTS = 8


cdef inline uint64_t rotl(uint64_t x, int r) noexcept nogil:
    return (x << r) | (x >> (64 - r))


cdef inline uint64_t mix(uint64_t h, uint64_t w) noexcept nogil:
    return (rotl(h, 5) ^ w) * 0x517CC1B727220A95ULL   # FxHash's step


cdef inline uint64_t hash_name(const char *p, size_t n) noexcept nogil:
    """64-bit hash of p[0:n]: FxHash's rotate-xor-multiply 8 bytes a step, then murmur3's fmix64.

    Names of 32 bytes and more run four independent lanes: the multiply's latency, not the
    loads, bounds one lane; four take the hash of a 1 MiB name from ~170 us to ~60 us, and the
    whole rejection of a 1 MiB unknown name (memchr, hash, copy of the name into the error) from
    215 us to 107 us (bench/micro/test_micro_command.py, command-reject-1MiB). No seed: payloads
    only probe, they cannot lengthen the chains, which the registered names alone decide.
    """
    cdef uint64_t h = 0x9E3779B97F4A7C15ULL ^ <uint64_t>n
    cdef uint64_t w0, w1, w2, w3, b, c, d
    if n >= 32:
        b = h ^ 0xD6E8FEB86659FD93ULL
        c = h ^ 0xA0761D6478BD642FULL
        d = h ^ 0xE7037ED1A0B428DBULL
        while n >= 32:
            memcpy(&w0, p, 8)
            memcpy(&w1, p + 8, 8)
            memcpy(&w2, p + 16, 8)
            memcpy(&w3, p + 24, 8)
            h = mix(h, w0)
            b = mix(b, w1)
            c = mix(c, w2)
            d = mix(d, w3)
            p += 32
            n -= 32
        h = mix(mix(mix(h, b), c), d)
    while n >= 8:
        memcpy(&w0, p, 8)
        h = mix(h, w0)
        p += 8
        n -= 8
    if n:
        w0 = 0
        memcpy(&w0, p, n)
        h = mix(h, w0)
    h ^= h >> 33
    h *= 0xFF51AFD7ED558CCDULL
    h ^= h >> 33
    h *= 0xC4CEB9FE1A85EC53ULL
    h ^= h >> 33
    return h


cdef size_t name_length(const char *p, size_t n) noexcept nogil:
    cdef const char *slash
    if n == 0:
        return 0
    slash = <const char *>memchr(p, b'/', n)
    return n if slash == NULL else <size_t>(slash - p)


cdef int get_view(object obj, Py_buffer *view) except -1:
    """Fill ``view`` with a C-contiguous buffer of ``obj`` (bytes of any format); caller releases it."""
    if not PyObject_CheckBuffer(obj):
        raise TypeError(f"a bytes-like object is required, not '{type(obj).__name__}'")
    PyObject_GetBuffer(obj, view, PyBUF_FULL_RO)
    if not PyBuffer_IsContiguous(view, b'C'):
        PyBuffer_Release(view)
        raise BufferError("the buffer is not C-contiguous")
    return 0


cdef str shown(bytes name):
    """The name as error messages show it: at most 256 bytes, decoded with replacement."""
    return name[:256].decode("utf-8", "replace") + ("..." if len(name) > 256 else "")


#: Go's unicode.IsSpace: what strings.TrimSpace trims (str.strip() would also take U+001C..U+001F).
WHITE_SPACE = "\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a" \
              "\u2028\u2029\u202f\u205f\u3000"


def parse_pattern(pattern) -> tuple:
    """Parameter positions of a pattern, by the Go rule: none for "", else one per "/"-separated
    part, trimmed of white space, then of "{" and "}", then of white space again; b"" for a part
    that ends up empty (a position without a var). Names come back UTF-8 encoded."""
    if not isinstance(pattern, str):
        raise TypeError(f"a pattern must be str, not '{type(pattern).__name__}'")
    if not pattern:
        return ()
    return tuple([part.strip(WHITE_SPACE).strip("{}").strip(WHITE_SPACE).encode("utf-8")
                  for part in (<str>pattern).split("/")])


def _name_length(payload) -> int:
    """Length of the command name at the start of ``payload`` (bytes before the first b"/")."""
    cdef Py_buffer view
    cdef size_t n
    if type(payload) is bytes:
        return name_length(<const char *>(<bytes>payload), len(<bytes>payload))
    get_view(payload, &view)
    n = name_length(<const char *>view.buf, <size_t>view.len)
    PyBuffer_Release(&view)
    return n

# `name_length` is the C function's name in this module; the Python wrapper takes it in the module dict.
_name_length.__name__ = _name_length.__qualname__ = "name_length"
globals()["name_length"] = _name_length
del _name_length


@cython.final
cdef class CommandTable:

    def __cinit__(self):
        self.names = []
        self.params = []
        self.nparams = NULL
        self.slots = NULL
        self.hashes = NULL
        self.mask = 0
        self.ncap = 0
        self.count = 0

    def __init__(self) -> None:
        pass

    def __dealloc__(self):
        free(self.nparams)
        free(self.slots)
        free(self.hashes)

    cdef int32_t lookup(self, const char *name, size_t n) noexcept:
        cdef uint64_t h
        cdef size_t i
        cdef int32_t idx
        cdef PyObject *item
        if self.count == 0 or n == 0:   # no slots yet; b"" is never registered
            return -1
        h = hash_name(name, n)
        i = <size_t>h & self.mask
        while True:
            idx = self.slots[i]
            if idx < 0:
                return -1
            if self.hashes[i] == h:
                item = list_item(<PyObject *>self.names, idx)
                if <size_t>bytes_size(item) == n and memcmp(bytes_data(item), name, n) == 0:
                    return idx
            i = (i + 1) & self.mask

    def add(self, name, pattern="") -> int:
        """Register command ``name`` (bytes, or str taken as UTF-8) with a parameter ``pattern``.

        Returns its index (0, 1, 2, ... in the order of registration). Raises TypeError for
        a name that is neither bytes nor str or a pattern that is not str; ValueError for an
        empty name, a name holding b"/", or a name already registered.
        """
        cdef bytes key
        cdef uint64_t h
        cdef size_t i
        cdef tuple params
        if isinstance(name, str):
            key = (<str>name).encode("utf-8")
        elif isinstance(name, bytes):
            key = bytes(name)
        else:
            raise TypeError(f"a command name must be bytes or str, not '{type(name).__name__}'")
        if not isinstance(pattern, str):
            raise TypeError(f"a pattern must be str, not '{type(pattern).__name__}'")
        if not key:
            raise ValueError("a command name cannot be empty")
        if name_length(<const char *>key, len(key)) != <size_t>len(key):
            raise ValueError(f"a command name cannot contain '/': '{shown(key)}'")
        if self.lookup(<const char *>key, len(key)) >= 0:
            raise ValueError(f"command '{shown(key)}' is already registered")
        params = parse_pattern(pattern)
        if self.count == INT32_MAX:
            raise OverflowError("a command table holds at most 2**31 - 1 commands")
        grow(self)
        self.names.append(key)
        try:
            self.params.append(params)
        except BaseException:
            self.names.pop()
            raise
        h = hash_name(<const char *>key, len(key))
        i = <size_t>h & self.mask
        while self.slots[i] >= 0:
            i = (i + 1) & self.mask
        self.slots[i] = self.count
        self.hashes[i] = h
        self.nparams[self.count] = <int32_t>len(params)
        self.count += 1
        return self.count - 1

    def find(self, name) -> int:
        """Index of the command ``name`` (bytes-like, or str taken as UTF-8), or -1."""
        cdef Py_buffer view
        cdef int32_t idx
        if isinstance(name, str):
            name = (<str>name).encode("utf-8")
        if type(name) is bytes:
            return self.lookup(<const char *>(<bytes>name), len(<bytes>name))
        get_view(name, &view)
        idx = self.lookup(<const char *>view.buf, <size_t>view.len)
        PyBuffer_Release(&view)
        return idx

    def __contains__(self, name) -> bool:
        return self.find(name) >= 0

    def __len__(self) -> int:
        return self.count

    def parse(self, payload) -> tuple:
        """Parse a command string: ``(index, name, vars, data)`` (the rules at the top).

        ``vars`` is () when the rest is empty, else one entry per position of the pattern
        (b"" for a position without a name). ``payload`` is any bytes-like object; the result
        holds bytes only. Raises UnknownCommand when the name is not registered.
        """
        cdef Py_buffer view
        cdef const char *p
        cdef size_t n
        cdef bint release = False
        if type(payload) is bytes:
            p = <const char *>(<bytes>payload)
            n = len(<bytes>payload)
        else:
            get_view(payload, &view)
            release = True
            p = <const char *>view.buf
            n = <size_t>view.len
        try:
            return split(self, p, n)
        finally:
            if release:
                PyBuffer_Release(&view)

    def name_of(self, index) -> bytes:
        """The name of command ``index``. IndexError outside 0..len-1."""
        i = _index(index)
        if not 0 <= i < self.count:
            raise IndexError(f"command index {i} out of range")
        return self.names[i]

    def params_of(self, index) -> tuple:
        """The parameter positions of command ``index``: names as bytes, b"" for a position
        without a var. IndexError outside 0..len-1."""
        i = _index(index)
        if not 0 <= i < self.count:
            raise IndexError(f"command index {i} out of range")
        return self.params[i]

    def all_names(self) -> list:
        """Every name, in index order (a new list)."""
        return list(self.names)


cdef int grow(CommandTable table) except -1:
    """Make room for one more name: nparams capacity, and slots kept at load factor <= 0.5."""
    cdef size_t nslots = table.mask + 1 if table.slots != NULL else 0
    cdef size_t new_n, i, j, k
    cdef int32_t *new_slots
    cdef uint64_t *new_hashes
    cdef int32_t *new_np
    if <size_t>table.count == table.ncap:
        k = table.ncap * 2 if table.ncap else MIN_SLOTS
        new_np = <int32_t *>realloc(table.nparams, k * sizeof(int32_t))
        if new_np == NULL:
            raise MemoryError()
        table.nparams = new_np
        table.ncap = k
    if (<size_t>table.count + 1) * 2 <= nslots:
        return 0
    new_n = nslots * 2 if nslots else MIN_SLOTS
    new_slots = <int32_t *>malloc(new_n * sizeof(int32_t))
    new_hashes = <uint64_t *>malloc(new_n * sizeof(uint64_t))
    if new_slots == NULL or new_hashes == NULL:
        free(new_slots)
        free(new_hashes)
        raise MemoryError()
    for i in range(new_n):
        new_slots[i] = -1
    for i in range(nslots):
        if table.slots[i] >= 0:
            j = <size_t>table.hashes[i] & (new_n - 1)
            while new_slots[j] >= 0:
                j = (j + 1) & (new_n - 1)
            new_slots[j] = table.slots[i]
            new_hashes[j] = table.hashes[i]
    free(table.slots)
    free(table.hashes)
    table.slots = new_slots
    table.hashes = new_hashes
    table.mask = new_n - 1
    return 0


cdef tuple split(CommandTable table, const char *p, size_t n):
    """The parse of p[0:n] (the rules at the top)."""
    # pos: index of the b"/" before the next part, or n when no part is left
    cdef size_t pos = name_length(p, n)
    cdef size_t start, end
    cdef int32_t idx = table.lookup(p, pos)
    cdef int32_t k, i
    cdef const char *slash
    cdef PyObject *params
    cdef tuple vars
    cdef object part
    if idx < 0:
        raise UnknownCommand(PyBytes_FromStringAndSize(p, pos))
    if pos + 1 >= n:    # the rest is empty: no vars at all
        return (idx, table.names[idx], (), EMPTY)
    k = table.nparams[idx]
    params = list_item(<PyObject *>table.params, idx)   # borrowed: the table keeps it
    vars = PyTuple_New(k)
    for i in range(k):
        if pos >= n:    # fewer parts than positions
            part = EMPTY
        else:
            start = pos + 1
            slash = <const char *>memchr(p + start, b'/', n - start) if start < n else NULL
            end = n if slash == NULL else <size_t>(slash - p)
            # a position without a name takes its part but gets no var: no bytes object for it
            if bytes_size(tuple_item(params, i)) == 0:
                part = EMPTY
            else:
                part = PyBytes_FromStringAndSize(p + start, end - start)
            pos = end
        Py_INCREF(part)
        PyTuple_SET_ITEM(vars, i, part)
    if pos + 1 < n:     # a part after the k-th: data (it may hold more slashes)
        part = PyBytes_FromStringAndSize(p + pos + 1, n - pos - 1)
    else:
        part = EMPTY
    return (idx, table.names[idx], vars, part)
