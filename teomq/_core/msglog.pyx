# cython: language_level=3
"""The broker's per-message log line, written by the core, outside Python ``logging``.

One line per accepted message, in the format of the broker's other log lines::

    2026-12-01 18:44:40,123 INFO teomq.broker.messages: message #5 from producer-7: Hello wold #5!

``add`` formats the line into a C buffer. A payload that is UTF-8 text shows its first 256
bytes (a character the cut splits left out), with backslash, tab, CR and LF backslash-escaped,
so that a line is always one line. Any other payload (ill-formed UTF-8, other control
characters but tab, CR and LF: binary) shows as ``(binary, N bytes) `` and its first 16 bytes in hex.
``write_out`` writes the buffer to the file descriptor, once
per loop pass (the Outbox's flush, endpoint.pyx). A write that fails, or a buffer past its
limit (a descriptor that does not take the lines), drops lines and counts them in ``dropped``:
the broker's loop never waits on its log beyond the write itself.
"""

cimport cython
from libc.errno cimport EAGAIN, EINTR, EIO, errno
from libc.stdint cimport uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy, memmove

import os

from libc.time cimport localtime_r, strftime, time_t, tm
from posix.time cimport CLOCK_REALTIME, clock_gettime, timespec

cdef extern from "unistd.h" nogil:
    ssize_t write(int fd, const void *buf, size_t n)

#: payload bytes a line shows (as the original broker's log did: the first 256)
SHOWN = 256
cdef size_t SHOWN_C = 256
cdef const char *HEX = "0123456789abcdef"
cdef const char *MIDDLE = " INFO teomq.broker.messages: message #"
cdef size_t MIDDLE_LEN = 38
# worst case of one payload byte in a line: an escape (2 bytes)
cdef size_t PER_BYTE = 2


cdef inline size_t utf8_prefix(const unsigned char *s, size_t n, bint *whole) noexcept:
    # At s (s[0] >= 0x80): the length of the well-formed UTF-8 sequence there (Unicode table
    # 3-7; *whole set), or of the maximal prefix of one that the ill-formed bytes have (at
    # least 1; one U+FFFD replaces it, as bytes.decode(errors="replace") does).
    cdef unsigned char c = s[0]
    cdef unsigned char lo = 0x80
    cdef unsigned char hi = 0xBF
    cdef size_t need
    cdef size_t i = 1
    whole[0] = False
    if c < 0xC2 or c > 0xF4:
        return 1
    need = 2 if c < 0xE0 else (3 if c < 0xF0 else 4)
    if c == 0xE0:
        lo = 0xA0
    elif c == 0xED:
        hi = 0x9F
    elif c == 0xF0:
        lo = 0x90
    elif c == 0xF4:
        hi = 0x8F
    while i < need and i < n:
        if s[i] < (lo if i == 1 else 0x80) or s[i] > (hi if i == 1 else 0xBF):
            break
        i += 1
    whole[0] = i == need
    return i


cdef uint64_t ONES = 0x0101010101010101
cdef uint64_t HIGHS = 0x8080808080808080


cdef inline bint plain8(const unsigned char *s) noexcept:
    # the 8 bytes at s are all printable ASCII but backslash (0x20..0x7E, not 0x5C): copied as
    # they are. Word at a time: a byte is < 0x20, or 0x5C, or >= 0x7F iff its high bit survives.
    cdef uint64_t x
    memcpy(&x, s, 8)
    return (((x - ONES * 0x20) | ((x ^ (ONES * 0x5C)) - ONES) | (x + ONES) | x) & HIGHS) == 0


cdef inline size_t put_u64(char *o, uint64_t v) noexcept:
    cdef char tmp[20]
    cdef size_t n = 0
    cdef size_t i
    while True:
        tmp[n] = <char>(48 + v % 10)
        n += 1
        v //= 10
        if v == 0:
            break
    for i in range(n):
        o[i] = tmp[n - 1 - i]
    return n


cdef size_t NOT_TEXT = <size_t>-1
#: payload bytes a binary payload's line shows, in hex
HEX_SHOWN = 16
cdef size_t HEX_SHOWN_C = 16


cdef inline size_t put_text(char *o, const unsigned char *s, size_t n, bint cut) noexcept:
    # s[0:n] as one line of UTF-8 text, or NOT_TEXT if it is not text: ill-formed UTF-8 (but
    # for a sequence the cut at n splits, when `cut`: left out), or a control character (C0
    # other than tab, CR and LF; DEL; C1). Backslash, tab, CR and LF are backslash-escaped: a line is one line.
    cdef size_t i = 0
    cdef size_t k = 0
    cdef size_t v
    cdef bint whole
    cdef unsigned char c
    while i < n:
        if i + 8 <= n and plain8(s + i):   # the common case: plain text, 8 bytes at a time
            memcpy(o + k, s + i, 8)
            k += 8
            i += 8
            continue
        c = s[i]
        if 0x20 <= c < 0x7F:
            if c == 92:
                o[k] = 92
                k += 1
            o[k] = <char>c
            k += 1
            i += 1
        elif c < 0x80:
            o[k] = 92
            if c == 10:
                o[k + 1] = 110
            elif c == 13:
                o[k + 1] = 114
            elif c == 9:
                o[k + 1] = 116
            else:
                return NOT_TEXT
            k += 2
            i += 1
        else:
            v = utf8_prefix(s + i, n - i, &whole)
            if not whole:
                if cut and i + v == n:   # a character the cut splits
                    return k
                return NOT_TEXT
            if c == 0xC2 and s[i + 1] < 0xA0:   # a C1 control (U+0080..U+009F)
                return NOT_TEXT
            memcpy(o + k, s + i, v)
            k += v
            i += v
    return k


cdef inline size_t put_binary(char *o, const unsigned char *s, size_t n) noexcept:
    # "(binary, N bytes) 0a1b2c...": the size and the first HEX_SHOWN bytes in hex
    cdef size_t k = 9
    cdef size_t i
    cdef size_t shown = n if n < HEX_SHOWN_C else HEX_SHOWN_C
    memcpy(o, "(binary, ", 9)
    k += put_u64(o + k, n)
    memcpy(o + k, " bytes) ", 8)
    k += 8
    for i in range(shown):
        o[k] = HEX[s[i] >> 4]
        o[k + 1] = HEX[s[i] & 15]
        k += 2
    if n > shown:
        memcpy(o + k, "...", 3)
        k += 3
    return k


@cython.final
cdef class MessageLog:
    """Per-message log lines to a file descriptor (or a file, appended), once per loop pass.

    ``target``: an open file descriptor (int; not closed here) or a path (opened for append,
    created if missing, closed by close()). ``limit``: most bytes held unwritten.
    """

    def __cinit__(self, target, size_t limit=8 << 20):
        self.cap = 64 << 10
        self.buf = <char *>malloc(self.cap)
        if self.buf == NULL:
            raise MemoryError()
        self.limit = limit if limit > self.cap else self.cap
        self.cached_sec = -1
        if isinstance(target, int):
            self.fd = target
            self.own_fd = False
        else:
            self.fd = os.open(os.fspath(target), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            self.own_fd = True

    def __dealloc__(self):
        free(self.buf)
        if self.own_fd and self.fd >= 0:
            os.close(self.fd)

    @property
    def pending(self) -> int:
        """Bytes of lines not yet written."""
        return self.used

    cdef int add(self, bytes name, uint64_t msg_id, const char *p, size_t n) except -1:
        # one line for message msg_id of endpoint `name` (its log name: UTF-8, one line)
        cdef timespec ts
        cdef tm t
        cdef time_t sec
        cdef size_t shown = n if n < SHOWN_C else SHOWN_C
        cdef size_t name_n = len(name) if name is not None else 1
        cdef size_t worst = 32 + 4 + MIDDLE_LEN + 20 + 6 + name_n + 2 + shown * PER_BYTE + 1 + 80  # 80: a binary form
        cdef size_t k
        cdef size_t w
        cdef size_t want
        cdef char *nb
        cdef long ms
        if self.used + worst > self.cap:
            if self.used + worst > self.limit:
                self.dropped += 1
                return 0
            want = self.cap * 2
            while want < self.used + worst:
                want *= 2
            nb = <char *>realloc(self.buf, want)
            if nb == NULL:
                self.dropped += 1
                return 0
            self.buf = nb
            self.cap = want
        clock_gettime(CLOCK_REALTIME, &ts)
        if ts.tv_sec != self.cached_sec:
            sec = ts.tv_sec
            localtime_r(&sec, &t)
            self.stamp_len = strftime(self.stamp, 32, "%Y-%m-%d %H:%M:%S", &t)
            self.cached_sec = ts.tv_sec
        k = self.used
        memcpy(self.buf + k, self.stamp, self.stamp_len)
        k += self.stamp_len
        ms = ts.tv_nsec // 1000000
        self.buf[k] = 44           # ,
        self.buf[k + 1] = <char>(48 + ms // 100)
        self.buf[k + 2] = <char>(48 + ms // 10 % 10)
        self.buf[k + 3] = <char>(48 + ms % 10)
        k += 4
        memcpy(self.buf + k, MIDDLE, MIDDLE_LEN)
        k += MIDDLE_LEN
        k += put_u64(self.buf + k, msg_id)
        memcpy(self.buf + k, " from ", 6)
        k += 6
        if name is not None:
            memcpy(self.buf + k, <const char *>name, name_n)
            k += name_n
        else:
            self.buf[k] = 63       # ?
            k += 1
        self.buf[k] = 58           # :
        self.buf[k + 1] = 32
        k += 2
        w = put_text(self.buf + k, <const unsigned char *>p, shown, n > shown)
        k += w if w != NOT_TEXT else put_binary(self.buf + k, <const unsigned char *>p, n)
        self.buf[k] = 10
        self.used = k + 1
        self.lines += 1
        return 0

    cdef int write_out(self) except -1:
        # write what is buffered; what the descriptor does not take now (EAGAIN) stays
        cdef size_t off = 0
        cdef ssize_t w
        cdef size_t lost
        cdef size_t i
        while off < self.used:
            w = write(self.fd, self.buf + off, self.used - off)
            if w <= 0:
                if w < 0 and errno == EINTR:
                    continue
                if w < 0 and errno == EAGAIN:
                    break           # the rest waits for the next pass's flush
                self.last_errno = errno if w < 0 else EIO
                lost = 0
                for i in range(off, self.used):
                    if self.buf[i] == 10:
                        lost += 1
                self.dropped += lost
                off = self.used
                break
            off += <size_t>w
        if off:
            memmove(self.buf, self.buf + off, self.used - off)
            self.used -= off
        return 0

    def write(self, bytes name, uint64_t msg_id, bytes payload not None):
        """Add the line for one message (as the core does for each accepted one)."""
        self.add(name, msg_id, payload, len(payload))

    def flush(self):
        """Write every buffered line now (as the loop pass's flush does)."""
        self.write_out()

    def close(self):
        """Write what is buffered (what the descriptor does not take now counts as dropped),
        then close the file if this log opened it."""
        cdef size_t i
        self.write_out()
        if self.used:
            for i in range(self.used):
                if self.buf[i] == 10:
                    self.dropped += 1
            self.used = 0
        if self.own_fd and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
