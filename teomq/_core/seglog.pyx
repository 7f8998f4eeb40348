# cython: language_level=3
"""The durable store: queues kept in an append-only log of segment files (docs/storage.md).

``SegmentLog`` is a Store (store.pyx) that also records what happens to each message of a
queue route: ``append`` keeps the payload in memory as the in-memory store does and adds a
message record (route name, broker sequence number, producer's message id and session, flags,
payload) to the loop pass's batch; each delivery adds a delivered record, the end of a message
(answered, acknowledged, dropped) a done record. No Python object is made per message. The
Outbox's flush calls ``write_pass`` before any endpoint's output: the batch gets its header
(CRC32C over the header and every record) and is written to the OS with one ``pwrite``, so no
frame that depends on a record leaves the broker before the record reached the OS. Making it
durable (``fdatasync``) is the control plane's (teomq/storage.py: a thread, off the loop):
``sync_targets``/``mark_synced``.

Segment files are preallocated a step (1 MiB) at a time ahead of their writes, each with a
64-byte header; a record that would take the pass's batch past ``segment_size`` starts the next. A segment is deleted when it and every older
one hold no live message (done records of its messages may sit in later segments, so only a
prefix of the log can go).

Recovery (``recover``, then the dispatcher's ``restore``, then ``finish_recovery``) reads every
segment in order: whole batches whose CRC holds are read record by record; a batch whose CRC
fails is skipped to the next batch that verifies (counted, reported); when none follows, the
log's tail was torn there: it is cut (zeroed) at the last whole batch, the bytes reported. A
segment or batch of another format version raises LogFormatError. A fanout message is recorded
only while it waits for a subscriber (``keep``; ``handed`` ends it): its copies belong to
connected subscribers and are not recorded.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.ref cimport PyObject
from libc.errno cimport EINTR, errno
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcmp, memcpy, memmove, memset, strerror

import os

from posix.time cimport CLOCK_REALTIME, clock_gettime, timespec

from teomq._core.crc32c cimport teomq_crc32c_update
from teomq._core.endpoint cimport S_CLOSED, Outbox, confirm_now
from teomq._core.frame_codec cimport E_STORAGE, F_REDELIVERED
from teomq._core.frame_codec cimport (
    teomq_ld16,
    teomq_ld32,
    teomq_ld64,
    teomq_st16,
    teomq_st32,
    teomq_st64,
)
from teomq._core.ring_queue cimport idxq_front, idxq_pop, msg_cost, msg_fields, payload_new, payload_release
from teomq._core.routes cimport R_FANOUT, R_QUEUE, Route
from teomq._core.store cimport TIME_EXPIRES, TIME_NOT_BEFORE, mem_append

import msgpack

from teomq.errors import LogFormatError

cdef extern from "Python.h":
    PyObject *PyList_GET_ITEM(PyObject *lst, Py_ssize_t i)
    Py_ssize_t PyList_GET_SIZE(PyObject *lst)

cdef extern from "<fcntl.h>" nogil:
    int posix_fallocate(int fd, long offset, long length)

cdef extern from "<unistd.h>" nogil:
    ssize_t pwrite(int fd, const void *buf, size_t n, long offset)
    ssize_t pread(int fd, void *buf, size_t n, long offset)
    int close(int fd)

cdef extern from "<sys/mman.h>" nogil:
    void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset)
    int munmap(void *addr, size_t length)
    void *MAP_FAILED
    int PROT_READ
    int MAP_SHARED

cdef extern from "syncer_impl.h" nogil:
    ctypedef struct teomq_syncer:
        int efd
    int teomq_syncer_start(teomq_syncer *s, int dirfd)
    int teomq_syncer_submit(teomq_syncer *s, const int *fds, int n, int dir)
    int teomq_syncer_result(teomq_syncer *s)
    void teomq_syncer_stop(teomq_syncer *s)

cdef const char *SEG_MAGIC = "TQSEGLOG"
cdef const char *BATCH_MAGIC = "TQLB"

# paging (read back): bytes one pread takes, messages one page_in reads at least / at most
cdef size_t PAGE_READ = 1 << 20
cdef int PAGE_MIN = 64
cdef int PAGE_MAX = 8192
# Idx.attempt: a message restored from the log (its record's session is a former process's)
cdef uint32_t RESTORED = 0x80000000

#: the log's format version (segment and batch headers)
FORMAT_VERSION = LOG_VERSION
#: bytes of a segment file's header, of a batch header, of a message record before its name
SEGMENT_HEADER_SIZE = SEG_HEADER
BATCH_HEADER_SIZE = BATCH_HEADER
MESSAGE_RECORD_SIZE = MSG_REC
STATE_RECORD_SIZE = STATE_REC
#: default size a segment file is rolled at (it is preallocated 1 MiB at a time)
DEFAULT_SEGMENT_SIZE = 64 << 20


def segment_name(uint64_t no):
    """The file name of segment ``no``."""
    return f"{no:020d}.seg"


def segment_numbers(path):
    """The numbers of the segment files in ``path``, in order."""
    return sorted(int(n[:len(n) - 4]) for n in os.listdir(path) if n.endswith(".seg") and n[:len(n) - 4].isdigit())


cdef uint64_t now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME, &ts)
    return <uint64_t>ts.tv_sec * 1000000000 + <uint64_t>ts.tv_nsec


cdef inline size_t pad8(size_t n) noexcept nogil:
    return (n + 7) & ~(<size_t>7)


cdef ssize_t pread_all(int fd, char *p, size_t n, uint64_t off) noexcept nogil:
    # bytes read (fewer at the end of the file), or -1 (errno)
    cdef ssize_t k
    cdef size_t done = 0
    while done < n:
        k = pread(fd, p + done, n - done, <long>(off + done))
        if k < 0:
            if errno == EINTR:
                continue
            return -1
        if k == 0:
            break
        done += <size_t>k
    return <ssize_t>done


cdef int write_all(int fd, const char *p, size_t n, uint64_t off) noexcept nogil:
    # 0, or the errno of the failed pwrite
    cdef ssize_t k
    while n:
        k = pwrite(fd, p, n, <long>off)
        if k < 0:
            if errno == EINTR:
                continue
            return errno
        p += k
        n -= <size_t>k
        off += <uint64_t>k
    return 0


cdef bint batch_ok(const char *p, size_t avail) noexcept nogil:
    # a whole batch at p (avail bytes to the end of the file) whose CRC holds
    cdef uint32_t length
    if avail < BATCH_HEADER or memcmp(p, BATCH_MAGIC, 4) != 0:
        return False
    length = teomq_ld32(p + 8)
    if length & 7 or <size_t>length > avail - BATCH_HEADER:
        return False
    return teomq_crc32c_update(teomq_crc32c_update(0, p, 36), p + BATCH_HEADER, length) == teomq_ld32(p + 36)


cdef inline size_t seq_lower_bound(const char *base, size_t n, size_t stride, uint64_t seq) noexcept nogil:
    # in an array of n records of ``stride`` bytes, sorted by the uint64 seq each begins with
    # (Entry, Moved): the index of the first whose seq is not below ``seq``
    cdef size_t lo = 0
    cdef size_t hi = n
    cdef size_t mid
    while lo < hi:
        mid = (lo + hi) >> 1
        if (<const uint64_t *>(base + mid * stride))[0] < seq:
            lo = mid + 1
        else:
            hi = mid
    return lo


cdef int room_for_one(void **items, size_t count, size_t *cap, size_t size) except -1:
    # a realloc'd array (of ``size``-byte records, count used) has room for one more
    cdef void *g
    if count == cap[0]:
        g = realloc(items[0], (cap[0] * 2 + 64) * size)
        if g == NULL:
            raise MemoryError()
        items[0] = g
        cap[0] = cap[0] * 2 + 64
    return 0


cdef bint all_zero(const char *p, size_t n) noexcept nogil:
    cdef size_t i
    for i in range(n):
        if p[i] != 0:
            return False
    return True


@cython.final
cdef class SegmentLog(Store):

    def __cinit__(self, path, *, uint64_t segment_size=DEFAULT_SEGMENT_SIZE, uint32_t epoch=0,
                  bint confirm_on_write=False):
        if segment_size < 4096:
            raise ValueError("segment_size must be at least 4096 bytes")
        self.path = os.fspath(path)
        self.segment_size = segment_size
        self.epoch = epoch
        self.hooked = True
        self.cap = 64 << 10
        self.buf = <char *>malloc(self.cap)
        self.segs_cap = 16
        self.segs = <Segment *>malloc(self.segs_cap * sizeof(Segment))
        if self.buf == NULL or self.segs == NULL:
            raise MemoryError()
        self.used = BATCH_HEADER
        self.routes = []
        self.waiters = []
        self.confirm_on_write = confirm_on_write
        self.recovery = {}

    def __dealloc__(self):
        cdef size_t i
        if self.segs != NULL:
            for i in range(self.nsegs):
                if self.segs[i].map != NULL:
                    munmap(self.segs[i].map, self.segs[i].map_len)
                if self.segs[i].fd >= 0:
                    close(self.segs[i].fd)
            free(self.segs)
        free(self.buf)
        free(self.entries)
        free(self.rbuf)
        free(self.moved)
        free(self.rmoved)

    # -- set-up ---------------------------------------------------------------------------

    def attach(self, list routes, Outbox outbox):
        """The dispatcher's routes (their names are recorded; only queue routes are durable)
        and its Outbox (whose flush writes each pass's batch)."""
        for r in routes:
            if len((<Route>r).name) > 255:
                raise ValueError(f"a durable route's name is at most 255 bytes: {(<Route>r).name[:40]!r}...")
        self.routes = routes
        self.outbox = outbox

    # -- the Store seam (per message: C only) ---------------------------------------------

    cdef bint durable(self, Msg *m) noexcept:
        cdef PyObject *r
        if m.copy or m.route < 0 or m.route >= PyList_GET_SIZE(<PyObject *>self.routes):
            return False
        r = PyList_GET_ITEM(<PyObject *>self.routes, m.route)
        # a queue's messages; a fanout command's while it waits for a subscriber (not its copies)
        return (<Route>r).kind == R_QUEUE or (<Route>r).kind == R_FANOUT

    cdef int make_room(self, size_t n, bint message) except -1:
        # Before a record of n bytes: when the pass's batch with it would pass the active
        # segment's size, the batch so far is written and the next segment begun (before a
        # message is numbered, so every segment's messages follow its base_seq). 1 when a
        # message cannot be taken (refusing: the write or the next segment failed); a state
        # record goes on in the active segment past its size then, from its reserve.
        cdef Segment *s
        if self.nsegs == 0:
            raise RuntimeError("the log is not open: recover() and finish_recovery() first")
        if self.roll_due:
            return 1 if message else 0     # (resume() starts the next segment)
        s = &self.segs[self.nsegs - 1]
        if s.end > SEG_HEADER and s.end + pad8(self.used + n) > self.segment_size:
            if self.count:
                self.seal_and_write()
                if self.count:
                    return 1 if message else 0   # the write failed: it stays in this segment's batch
            try:
                self.open_segment()
            except OSError as e:
                self.roll_due = True
                self.set_refusing(e.errno or 5, e.strerror or str(e))
                return 1 if message else 0
        return 0

    cdef size_t reserve_room(self) noexcept:
        # the active segment's room kept for state records
        return STATE_RESERVE if STATE_RESERVE < self.segment_size // 4 else <size_t>(self.segment_size // 4)

    cdef int grow(self, Segment *s, uint64_t need) except -1:
        # preallocate s up to ``need`` bytes (whole steps): 0, or refusing with the errno
        cdef uint64_t step
        cdef uint64_t most = self.segment_size + self.reserve_room()
        cdef int err
        if need <= s.alloc:
            return 0
        step = (need - s.alloc + PREALLOC_STEP - 1) // PREALLOC_STEP * PREALLOC_STEP
        if s.alloc + step > most and need <= most:
            step = most - s.alloc       # a segment holds its size and its reserve, no more
        err = posix_fallocate(s.fd, <long>s.alloc, <long>step)
        if err == 0:
            s.alloc += step
            return 0
        if err == 95:       # EOPNOTSUPP: no preallocation here; the writes themselves tell
            s.alloc = need
            return 0
        self.set_refusing(err, f"preallocating {segment_name(s.no)} to {s.alloc + step} bytes")
        return err

    cdef int set_refusing(self, int err, str what) except -1:
        # new messages get STORAGE errors until resume() (the control plane's timer) succeeds
        cdef str why = strerror(err).decode(errors='replace')
        cdef str text = what if what.endswith(why) else f"{what}: {why}"
        if err == 27:       # EFBIG
            text += " (the file size limit, RLIMIT_FSIZE: give a -segment-size below it)"
        if self.refusing == 0 or self.refusing_text != text:
            self.refusing_text = text
            self.refusal = msgpack.packb({"code": E_STORAGE, "errno": err,
                                          "reason": f"the broker cannot store messages now ({text}); "
                                                    "message not accepted, send it again later"})
        self.refusing = err
        return 0

    cdef char *reserve(self, size_t n) except NULL:
        # n bytes at the end of the pass's batch
        cdef size_t need = self.used + n
        cdef size_t cap = self.cap
        cdef char *b
        if need > cap:
            while cap < need:
                cap <<= 1
            b = <char *>realloc(self.buf, cap)
            if b == NULL:
                raise MemoryError()
            self.buf = b
            self.cap = cap
        b = self.buf + self.used
        self.used = need
        self.count += 1
        if not self.pending:
            self.pending = True
            (<Outbox>self.outbox).schedule()
        return b

    cdef int append(self, Msg *m, const char *p, size_t n) except -1:
        # 0: accepted (a queue's message recorded; a fanout one's room made, recorded by keep()
        # if it waits); 1: refused (refusing: a disk error), m untouched
        cdef Route route
        cdef size_t k
        cdef Segment *s
        if not self.durable(m):
            return mem_append(self, m, p, n)
        if self.refusing:
            self.n_refused += 1
            return 1
        route = <Route>PyList_GET_ITEM(<PyObject *>self.routes, m.route)
        k = <size_t>PyBytes_GET_SIZE(route.name)
        if self.make_room(MSG_REC + k + n, True):     # before numbering: it may start a segment
            self.n_refused += 1
            return 1
        s = &self.segs[self.nsegs - 1]
        if s.end + pad8(self.used + MSG_REC + k + n) + self.reserve_room() > s.alloc and \
                self.grow(s, s.end + pad8(self.used + MSG_REC + k + n) + self.reserve_room()):
            self.n_refused += 1
            return 1
        mem_append(self, m, p, n)
        if route.kind == R_QUEUE:
            self.record(m, p, route.name)
        return 0

    cdef int keep(self, Msg *m) except -1:
        # a fanout message with no subscriber waits in its route's queue: recorded now (append
        # made the room, in the same enqueue, so it goes where its seq says)
        if self.durable(m) and m.seq == self.last_seq:
            self.record(m, m.data, (<Route>PyList_GET_ITEM(<PyObject *>self.routes, m.route)).name)
        return 0

    cdef int record(self, Msg *m, const char *p, bytes name) except -1:
        # the message record of m (payload p[0:m.length]) in the pass's batch
        cdef size_t k = <size_t>PyBytes_GET_SIZE(name)
        cdef size_t n = m.length
        cdef char *r = self.reserve(MSG_REC + k + n)
        cdef Segment *s
        r[0] = REC_MSG
        r[1] = <char>k
        teomq_st16(r + 2, m.flags)
        teomq_st32(r + 4, <uint32_t>n)
        teomq_st64(r + 8, m.seq)
        teomq_st64(r + 16, m.msg_id)
        teomq_st64(r + 24, m.session)
        if k:
            memcpy(r + MSG_REC, PyBytes_AS_STRING(name), k)
        if n:
            memcpy(r + MSG_REC + k, p, n)
        if self.batch_seq == 0:
            self.batch_seq = m.seq
        s = &self.segs[self.nsegs - 1]
        s.live += 1
        s.live_bytes += MSG_REC + k + n
        # where the record will be: the batch is written at the segment's end (locate)
        self.loc_seq = m.seq
        self.loc_seg = <uint32_t>s.no
        self.loc_off = <uint32_t>(s.end + <uint64_t>(r - self.buf))
        self.loc_len = <uint32_t>(MSG_REC + k + n)
        return 0

    cdef bint locate(self, const Msg *m, Idx *e) noexcept:
        if m.seq != self.loc_seq or m.seq == 0:
            return False
        e.seg = self.loc_seg
        e.off = self.loc_off
        e.attempt = 0
        e.len = self.loc_len
        e.deadline = m.deadline
        return True

    cdef Segment *seg_by_no(self, uint32_t no) noexcept:
        # the open segment numbered ``no`` (low 32 bits), or NULL
        cdef size_t lo = 0
        cdef size_t hi = self.nsegs
        cdef size_t mid
        while lo < hi:
            mid = (lo + hi) >> 1
            if <uint32_t>self.segs[mid].no < no:
                lo = mid + 1
            else:
                hi = mid
        if lo < self.nsegs and <uint32_t>self.segs[lo].no == no:
            return &self.segs[lo]
        return NULL

    cdef const char *record_at(self, const Idx *e) except? NULL:
        # a paged-out message's record: in the pass's unwritten batch, in the read window, or
        # read into it (one pread of up to PAGE_READ bytes: the records after it come along);
        # NULL when it cannot be read (counted, the text kept)
        cdef Segment *s = self.seg_by_no(e.seg)
        cdef size_t want
        cdef ssize_t got
        cdef char *b
        if s == NULL or s.fd < 0:
            self.n_read_errors += 1
            self.read_error_text = f"segment {e.seg} of a paged-out message is not open"
            return NULL
        if s == &self.segs[self.nsegs - 1] and e.off >= s.end:
            return self.buf + (e.off - s.end)         # not written yet: this pass's batch
        if self.win_no == e.seg and e.off >= self.win_off and e.off + e.len <= self.win_off + self.win_len:
            return self.rbuf + (e.off - self.win_off)
        want = PAGE_READ if PAGE_READ > e.len else e.len
        if e.off + want > s.end:
            want = <size_t>(s.end - e.off)            # only what is written: records never change
        if want > self.rcap:
            b = <char *>realloc(self.rbuf, want)
            if b == NULL:
                raise MemoryError()
            self.rbuf = b
            self.rcap = want
        self.n_reads += 1
        with nogil:
            got = pread_all(s.fd, self.rbuf, want, e.off)
        if got < <ssize_t>e.len:
            self.win_no = 0
            self.n_read_errors += 1
            self.read_error_text = (f"reading {segment_name(s.no)} at offset {e.off}: "
                                    f"{strerror(errno).decode(errors='replace') if got < 0 else 'short read'}")
            return NULL
        self.win_no = e.seg
        self.win_off = e.off
        self.win_len = <size_t>got
        return self.rbuf

    cdef int page_in(self, IdxQueue *q, MsgRing into, int32_t route, size_t *mem, size_t mem_max) except -1:
        # Read paged-out messages back from the front of q into ``into`` (in order): at least
        # PAGE_MIN (or all), at most PAGE_MAX, fewer once mem reaches mem_max.
        cdef Idx *e
        cdef const char *r
        cdef Msg m
        cdef uint32_t n
        cdef int loaded = 0
        while q.count and loaded < PAGE_MAX and (loaded < PAGE_MIN or mem_max == 0 or mem[0] < mem_max):
            e = idxq_front(q)
            r = self.record_at(e)
            if r == NULL:
                break
            if (r[0] != REC_MSG and r[0] != REC_MOVED) or e.len < MSG_REC:
                self.n_read_errors += 1
                self.read_error_text = f"segment {e.seg} offset {e.off}: not a message record"
                break
            n = teomq_ld32(r + 4)
            m.data = payload_new(n)
            if m.data == NULL:
                raise MemoryError()
            if n:
                memcpy(m.data, r + MSG_REC + <uint8_t>r[1], n)
            m.length = n
            m.seq = teomq_ld64(r + 8)
            if e.attempt & RESTORED:              # its producer's session went with the restart
                msg_fields(&m, teomq_ld16(r + 2), 0, teomq_ld64(r + 16), e.attempt & ~RESTORED, route, e.deadline)
                if m.attempt:
                    m.flags |= F_REDELIVERED
            else:
                msg_fields(&m, teomq_ld16(r + 2), teomq_ld64(r + 24), teomq_ld64(r + 16), e.attempt, route,
                           e.deadline)
            m.rx.shift = 0
            into.push_back_always(&m)
            mem[0] += msg_cost(&m)
            idxq_pop(q)
            loaded += 1
        return loaded

    # -- confirmations ------------------------------------------------------------------

    cdef int confirm_later(self, Endpoint conn, uint64_t fid) except -1:
        # conn's SEND fid (flagged CONFIRM) was accepted in this pass: confirmed once the batch
        # written at the end of the pass (number n_batches + 1) is stored. A message without a
        # record (a fanout one) waits only for the records before it: the last batch written.
        cdef uint64_t batch = self.n_batches + 1 if self.count else self.n_batches
        if batch <= self.synced_batches or (self.confirm_on_write and not self.count):
            return confirm_now(conn, fid)
        conn.confirm_after(batch, fid)
        if not conn.conf_listed:
            conn.conf_listed = True
            self.waiters.append(conn)
        if not self.pending:
            self.pending = True       # the pass's write_pass hands the syncer a round if idle
            (<Outbox>self.outbox).schedule()
        return 0

    cdef int release_confirms(self, uint64_t upto) except -1:
        # every batch up to ``upto`` is stored (synced, or written where that is the promise)
        cdef list still = []
        cdef Endpoint e
        for e in self.waiters:
            if e.release_confirms(upto) and e.state != S_CLOSED:
                still.append(e)
            else:
                e.conf_listed = False
        self.waiters = still
        return 0

    @property
    def waiting(self):
        """Endpoints whose confirmations wait for a batch to be stored."""
        return len(self.waiters)

    cdef int delivered(self, Msg *m) except -1:
        cdef char *r
        if not self.durable(m):
            return 0
        self.make_room(STATE_REC, False)
        r = self.reserve(STATE_REC)
        r[0] = REC_DELIVERED
        r[1] = 0
        teomq_st16(r + 2, 0)
        teomq_st32(r + 4, m.attempt)
        teomq_st64(r + 8, m.seq)
        return 0

    cdef int timed(self, Msg *m, int kind, double after) except -1:
        if not self.durable(m):
            return 0
        return self.timed_seq(m.seq, kind, after)

    cdef int timed_seq(self, uint64_t seq, int kind, double after) except -1:
        cdef char *r
        cdef uint64_t ms
        # a delay rounded up, a deadline down: a restart never delivers a message early, nor late
        if kind == TIME_NOT_BEFORE:
            ms = (now_ns() + 999999) // 1000000 + (<uint64_t>(after * 1000.0) + 1 if after > 0.0 else 0)
        else:
            ms = now_ns() // 1000000 + (<uint64_t>(after * 1000.0) if after > 0.0 else 0)
        self.make_room(STATE_REC, False)
        r = self.reserve(STATE_REC)
        r[0] = REC_TIMES
        r[1] = <char>kind
        teomq_st16(r + 2, <uint16_t>(ms >> 32))
        teomq_st32(r + 4, <uint32_t>ms)
        teomq_st64(r + 8, seq)
        return 0

    cdef void done(self, Msg *m) noexcept:
        payload_release(m.data)
        if self.durable(m):
            self.state_done(m)

    cdef int handed(self, Msg *m) except -1:
        # a fanout message that waited goes to its subscribers as copies (its payload with
        # them): done as a waiting message
        if self.durable(m):
            self.state_done(m)
        return 0

    cdef void state_done(self, Msg *m) noexcept:
        # the done record of a recorded message, and it no longer counts as live
        cdef char *r
        cdef Segment *s
        cdef Moved *mv
        cdef size_t size
        try:
            self.make_room(STATE_REC, False)
            r = self.reserve(STATE_REC)
        except Exception as e:
            # no memory for the batch (or a bug): the message is delivered again after a restart
            self.error = 12 if isinstance(e, MemoryError) else 5
            self.error_text = f"no done record: {e!r}"
            return
        r[0] = REC_DONE
        r[1] = DONE_ANSWERED
        teomq_st16(r + 2, 0)
        teomq_st32(r + 4, 0)
        teomq_st64(r + 8, m.seq)
        s = self.segment_of(m.seq)
        if self.nmoved:
            mv = self.moved_find(m.seq)
            if mv != NULL:          # copied forward: counted where it is now
                s = self.seg_by_no(<uint32_t>mv.no)
                memmove(mv, mv + 1, (self.nmoved - <size_t>(mv - self.moved) - 1) * sizeof(Moved))
                self.nmoved -= 1
        if s != NULL and s.live:
            s.live -= 1
            size = MSG_REC + <size_t>PyBytes_GET_SIZE((<Route>PyList_GET_ITEM(<PyObject *>self.routes, m.route)).name) \
                + m.length
            s.live_bytes = s.live_bytes - size if s.live_bytes > size else 0

    cdef Segment *segment_of(self, uint64_t seq) noexcept:
        # the segment whose messages include seq (base_seq < seq <= next one's base_seq)
        cdef size_t lo = 0
        cdef size_t hi = self.nsegs
        cdef size_t mid
        if self.nsegs == 0 or seq <= self.segs[0].base_seq:
            return NULL
        while hi - lo > 1:       # invariant: segs[lo].base_seq < seq
            mid = (lo + hi) >> 1
            if self.segs[mid].base_seq < seq:
                lo = mid
            else:
                hi = mid
        return &self.segs[lo]

    # -- compaction -----------------------------------------------------------------------

    cdef Moved *moved_find(self, uint64_t seq) noexcept:
        cdef size_t lo = seq_lower_bound(<const char *>self.moved, self.nmoved, sizeof(Moved), seq)
        if lo < self.nmoved and self.moved[lo].seq == seq:
            return &self.moved[lo]
        return NULL

    cdef int moved_set(self, uint64_t seq, uint64_t no) except -1:
        # message seq is in segment no now (sorted by seq: few, so an insert may move the rest)
        cdef size_t lo = seq_lower_bound(<const char *>self.moved, self.nmoved, sizeof(Moved), seq)
        if lo < self.nmoved and self.moved[lo].seq == seq:
            self.moved[lo].no = no
            return 0
        room_for_one(<void **>&self.moved, self.nmoved, &self.moved_cap, sizeof(Moved))
        memmove(&self.moved[lo + 1], &self.moved[lo], (self.nmoved - lo) * sizeof(Moved))
        self.moved[lo].seq = seq
        self.moved[lo].no = no
        self.nmoved += 1
        return 0

    def compact_due(self):
        """Choose the segment to empty, if one is worth it: the oldest, when it pins later ones
        (three segments or more) and what is live in it is at most an eighth of a segment. The
        dispatcher then copies those messages forward (Dispatcher.compact) and calls
        compact_end. False while an earlier compaction's copies are not yet stored."""
        cdef Segment *s0
        if self.nsegs < 3 or self.refusing or self.compact_no or self.drop_hold:
            return False
        s0 = &self.segs[0]
        if s0.live == 0 or s0.no == self.stuck_no or s0.live_bytes * 8 > self.segment_size:
            return False
        self.compact_no = s0.no
        self.compact_lo = s0.base_seq
        self.compact_hi = self.segs[1].base_seq
        return True

    cdef bint compacting(self, uint64_t seq) noexcept:
        # message seq is in the segment being emptied
        cdef Moved *mv
        if self.nmoved:
            mv = self.moved_find(seq)
            if mv != NULL:
                return mv.no == self.compact_no
        return self.compact_lo < seq <= self.compact_hi

    cdef char *move_room(self, size_t n, uint32_t attempt) except? NULL:
        # room in the pass's batch for a copied message record (and its delivered record)
        cdef Segment *s
        cdef size_t need = n + (STATE_REC if attempt else 0)
        if self.make_room(need, True):
            raise OSError(self.refusing or 5, self.refusing_text or "no room for a copied record")
        s = &self.segs[self.nsegs - 1]
        if self.grow(s, s.end + pad8(self.used + need) + self.reserve_room()):
            raise OSError(self.refusing, self.refusing_text)
        return self.reserve(n)

    cdef int moved_here(self, uint64_t seq, size_t n, uint32_t attempt, char *r) except -1:
        # the copy of message seq (n bytes at r, in the pass's batch) is made: counted in the
        # active segment, not in the one being emptied; its attempts recorded again
        cdef Segment *s = &self.segs[self.nsegs - 1]
        cdef Segment *old = self.seg_by_no(<uint32_t>self.compact_no)
        cdef char *d
        if attempt:
            d = self.reserve(STATE_REC)
            d[0] = REC_DELIVERED
            d[1] = 0
            teomq_st16(d + 2, 0)
            teomq_st32(d + 4, attempt)
            teomq_st64(d + 8, seq)
        s.live += 1
        s.live_bytes += n
        if old != NULL and old.live:
            old.live -= 1
            old.live_bytes = old.live_bytes - n if old.live_bytes > n else 0
        self.moved_set(seq, s.no)
        self.n_moved += 1
        return 0

    cdef int move_msg(self, Msg *m, Idx *e=NULL) except -1:
        # copy forward a message the dispatcher holds in memory (queued, delayed or in flight);
        # e (if given) then points at the copy
        cdef bytes name = (<Route>PyList_GET_ITEM(<PyObject *>self.routes, m.route)).name
        cdef size_t k = <size_t>PyBytes_GET_SIZE(name)
        cdef size_t n = MSG_REC + k + m.length
        cdef char *r = self.move_room(n, m.attempt)
        cdef Segment *s
        r[0] = REC_MOVED
        r[1] = <char>k
        teomq_st16(r + 2, m.flags)
        teomq_st32(r + 4, m.length)
        teomq_st64(r + 8, m.seq)
        teomq_st64(r + 16, m.msg_id)
        teomq_st64(r + 24, m.session)
        if k:
            memcpy(r + MSG_REC, PyBytes_AS_STRING(name), k)
        if m.length:
            memcpy(r + MSG_REC + k, m.data, m.length)
        if e != NULL:
            s = &self.segs[self.nsegs - 1]
            e.seg = <uint32_t>s.no
            e.off = <uint32_t>(s.end + <uint64_t>(r - self.buf))
        return self.moved_here(m.seq, n, m.attempt, r)

    cdef uint64_t move_idx(self, Idx *e) except? 0:
        # copy forward a paged-out message: its record read back, written again, e moved to it;
        # its seq
        cdef const char *rec = self.record_at(e)     # (in the read window: not the batch's buffer)
        cdef char *r
        cdef Segment *s
        cdef uint32_t attempt = e.attempt & ~RESTORED
        cdef uint64_t off
        cdef uint64_t seq
        if rec == NULL:
            raise OSError(5, self.read_error_text)
        r = self.move_room(e.len, attempt)
        memcpy(r, rec, e.len)
        r[0] = REC_MOVED
        if e.attempt & RESTORED:
            teomq_st64(r + 24, 0)       # its producer's session went with a restart
        s = &self.segs[self.nsegs - 1]
        off = s.end + <uint64_t>(r - self.buf)
        seq = teomq_ld64(r + 8)
        self.moved_here(seq, e.len, attempt, r)
        e.seg = <uint32_t>s.no
        e.off = <uint32_t>off
        return seq

    def drop_done(self):
        """Delete the oldest segments that hold nothing live (as every pass's write does): for
        the control plane, once a sync lets compaction's emptied segment go with no traffic."""
        self.drop_done_segments()

    @property
    def oldest(self):
        """(number, live messages) of the oldest segment; (0, 0) when there is none."""
        if self.nsegs == 0:
            return 0, 0
        return self.segs[0].no, self.segs[0].live

    def compact_abort(self):
        """Dispatcher.compact stopped on an error (a disk error, a failed read): what it copied
        stays copied, the rest is tried again at a later round."""
        self.compact_no = 0
        if self.count:
            self.drop_hold = self.n_batches + 1   # the copies made so far: synced before a deletion

    @property
    def drop_pending(self):
        """Compaction's copies wait for a sync before segments may be deleted."""
        return self.drop_hold != 0

    def compact_end(self):
        """After Dispatcher.compact: how many live messages are left in the segment (0: it goes
        once the batch with the copies is stored; else it is not tried again: its messages are
        not the dispatcher's, those kept for commands this broker does not have)."""
        cdef Segment *old = self.seg_by_no(<uint32_t>self.compact_no)
        cdef uint64_t left = old.live if old != NULL else 0
        if left:
            self.stuck_no = self.compact_no
        else:
            self.drop_hold = self.n_batches + (1 if self.count else 0)
            self.n_compactions += 1
        self.compact_no = 0
        return left

    # -- once per loop pass ---------------------------------------------------------------

    cdef int write_pass(self) except -1:
        if self.count:
            self.seal_and_write()
        self.pending = self.count != 0   # a failed write stays pending: retried at the next flush
        # or by the control plane's timer (retry_write)
        self.drop_done_segments()
        if self.waiters:
            if self.confirm_on_write:
                if self.count == 0:         # (else the write failed: they wait for the retry)
                    self.release_confirms(self.n_batches)
            elif self.notify_written and self.on_written is not None:
                self.notify_written = False     # one call, until the syncer is idle again
                self.on_written()
        return 0

    cdef int seal_and_write(self) except -1:
        cdef size_t body = self.used - BATCH_HEADER
        cdef size_t padded = pad8(body)
        cdef size_t total
        cdef char *h
        cdef Segment *s = &self.segs[self.nsegs - 1]
        cdef int err
        cdef uint64_t grow
        cdef uint32_t crc
        if padded > 0xFFFFFFF8:
            raise OverflowError("a loop pass's batch is over 4 GiB")
        if padded != body:
            self.reserve(padded - body)
            self.count -= 1
            memset(self.buf + BATCH_HEADER + body, 0, padded - body)
        total = BATCH_HEADER + padded
        h = self.buf
        memcpy(h, BATCH_MAGIC, 4)
        teomq_st16(h + 4, LOG_VERSION)
        teomq_st16(h + 6, 0)
        teomq_st32(h + 8, <uint32_t>padded)
        teomq_st32(h + 12, self.count)
        teomq_st64(h + 16, self.batch_seq)
        teomq_st64(h + 24, now_ns())
        teomq_st32(h + 32, self.epoch)
        crc = teomq_crc32c_update(teomq_crc32c_update(0, h, 36), h + BATCH_HEADER, padded)
        teomq_st32(h + 36, crc)
        if s.end + total > s.alloc:
            # preallocate ahead of the writes, a step at a time; state records past a failed
            # preallocation use the room kept for them (a failure here shows in the write)
            grow = (s.end + total - s.alloc + PREALLOC_STEP - 1) // PREALLOC_STEP * PREALLOC_STEP
            if posix_fallocate(s.fd, <long>s.alloc, <long>grow) == 0:
                s.alloc += grow
        with nogil:
            err = write_all(s.fd, h, total, s.end)
        if err:
            # kept for the next pass and the control plane's retry (retry_write); new messages
            # are refused meanwhile
            self.error = err
            self.error_text = strerror(err).decode(errors="replace")
            self.set_refusing(err, f"writing {segment_name(s.no)} at offset {s.end}")
            self.used = BATCH_HEADER + body
            return 0
        s.end += total
        self.bytes_written += total
        self.n_batches += 1
        self.n_records += self.count
        self.used = BATCH_HEADER
        self.count = 0
        self.batch_seq = 0
        self.error = 0
        return 0

    cdef int room_for_segment(self) except -1:
        # one more Segment fits in segs
        cdef Segment *g
        if self.nsegs == self.segs_cap:
            g = <Segment *>realloc(self.segs, 2 * self.segs_cap * sizeof(Segment))
            if g == NULL:
                raise MemoryError()
            self.segs = g
            self.segs_cap *= 2
        return 0

    cdef int open_segment(self) except -1:
        # a new active segment: preallocated, its header written
        cdef Segment *s
        cdef char h[SEG_HEADER]
        cdef uint64_t no = self.segs[self.nsegs - 1].no + 1 if self.nsegs else 1
        cdef int fd
        cdef int err
        self.room_for_segment()
        fd = os.open(os.path.join(self.path, segment_name(no)),
                     os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        err = posix_fallocate(fd, 0, <long>(PREALLOC_STEP if PREALLOC_STEP < self.segment_size else self.segment_size))
        if err and err != 95:     # EOPNOTSUPP: a file system without it grows the file as it goes
            os.close(fd)
            os.unlink(os.path.join(self.path, segment_name(no)))   # the next roll tries again
            raise OSError(err, f"preallocating {segment_name(no)}: {os.strerror(err)}")
        memset(h, 0, SEG_HEADER)
        memcpy(h, SEG_MAGIC, 8)
        teomq_st16(h + 8, LOG_VERSION)
        teomq_st16(h + 10, SEG_HEADER)
        teomq_st64(h + 16, no)
        teomq_st64(h + 24, self.last_seq)
        teomq_st64(h + 32, now_ns())
        teomq_st32(h + 40, self.epoch)
        teomq_st64(h + 48, self.segment_size)
        teomq_st32(h + 60, teomq_crc32c_update(0, h, 60))
        err = write_all(fd, h, SEG_HEADER, 0)
        if err:
            os.close(fd)
            os.unlink(os.path.join(self.path, segment_name(no)))
            raise OSError(err, f"writing the header of {segment_name(no)}: {os.strerror(err)}")
        s = &self.segs[self.nsegs]
        memset(s, 0, sizeof(Segment))
        s.no = no
        s.base_seq = self.last_seq
        s.end = SEG_HEADER
        s.alloc = PREALLOC_STEP if PREALLOC_STEP < self.segment_size else self.segment_size
        s.fd = fd
        self.nsegs += 1
        return 0

    cdef int drop_done_segments(self) noexcept:
        # delete the oldest segments while they (and so everything before them) hold nothing live
        cdef size_t k = 0
        cdef size_t i
        if self.drop_hold:
            # compaction's copies first: synced, whatever the fsync policy (the originals were
            # durable; a power cut must not lose them with a copy only written)
            if self.synced_batches < self.drop_hold:
                return 0
            self.drop_hold = 0
        while k + 1 < self.nsegs and self.segs[k].live == 0:
            k += 1
        if k == 0:
            return 0
        for i in range(k):
            if self.segs[i].map != NULL:
                munmap(self.segs[i].map, self.segs[i].map_len)
            if self.segs[i].fd >= 0:
                close(self.segs[i].fd)
            try:
                os.unlink(os.path.join(self.path, segment_name(self.segs[i].no)))
            except OSError:
                pass
            self.n_deleted += 1
        memmove(self.segs, self.segs + k, (self.nsegs - k) * sizeof(Segment))
        self.nsegs -= k
        return 0

    # -- making it durable: the control plane's syncer thread ---------------------------

    def retry_write(self):
        """Write a batch whose write failed (the control plane's timer, while nothing else
        flushes); True once nothing is left unwritten."""
        if self.count:
            self.write_pass()
            if self.waiters:
                (<Outbox>self.outbox).schedule()
        return self.count == 0

    def resume(self):
        """While refusing: write what waits, start the next segment if one is due, make room
        for new messages (a preallocation step beyond the state records' reserve). True once
        new messages are accepted again (the control plane's timer calls it)."""
        cdef Segment *s
        if not self.refusing:
            return True
        if self.stopped or self.nsegs == 0:
            return False
        if self.count:
            self.write_pass()
            if self.count:
                return False
        if self.roll_due:
            try:
                self.open_segment()
            except OSError as e:
                self.set_refusing(e.errno or 5, e.strerror or str(e))
                return False
            self.roll_due = False
        s = &self.segs[self.nsegs - 1]
        if self.grow(s, s.end + self.reserve_room() + PREALLOC_STEP if self.segment_size > PREALLOC_STEP
                     else s.end + self.reserve_room() + self.segment_size // 2):
            return False
        self.refusing = 0
        self.error = 0
        return True

    def stop_accepting(self, int err, str what):
        """Refuse new messages for good (a failed fdatasync: nothing more can be promised)."""
        self.set_refusing(err, what)
        self.stopped = True

    @property
    def refusal_payload(self):
        """The ERROR payload a SEND refused while refusing gets (None when accepting)."""
        return self.refusal if self.refusing else None

    def sync_targets(self):
        """(batches, [(fd, end, segment number, directory entry synced)]): the syncer's next
        round, taken on the loop at the end of a pass: the segments with bytes not yet synced,
        and how many batches the log has written (a round covers them all). Each fd is a dup of
        the segment's, the caller's to close: a segment deleted meanwhile cannot make the
        syncer sync whatever file got its number."""
        cdef size_t i
        cdef list targets = []
        try:
            for i in range(self.nsegs):
                if self.segs[i].fd >= 0 and (self.segs[i].end > self.segs[i].synced or not self.segs[i].dir_synced):
                    targets.append((os.dup(self.segs[i].fd), self.segs[i].end, self.segs[i].no,
                                    self.segs[i].dir_synced))
        except BaseException:
            for t in targets:         # (a dup that failed: EMFILE) none of them leaks
                os.close(t[0])
            raise
        return self.n_batches, targets

    def mark_synced(self, targets, uint64_t batches):
        """The syncer's round over ``targets`` (from sync_targets, with ``batches``) finished:
        those bytes are durable, and the confirmations of those batches go out."""
        cdef size_t i
        for fd, end, no, _ in targets:
            for i in range(self.nsegs):
                if self.segs[i].no == no:
                    if end > self.segs[i].synced:
                        self.segs[i].synced = end
                    self.segs[i].dir_synced = True
                    break
        if batches > self.synced_batches:
            self.synced_batches = batches
        if self.waiters:
            self.release_confirms(batches)
            (<Outbox>self.outbox).schedule()

    def synced_offsets(self):
        """{segment file name: bytes synced} (the test-only power-cut record)."""
        cdef size_t i
        return {segment_name(self.segs[i].no): self.segs[i].synced for i in range(self.nsegs)}

    def close(self):
        """Write what the pass gathered, make every open segment durable (whatever the fsync
        policy: a clean stop keeps everything) and close it."""
        cdef size_t i
        cdef uint32_t unwritten = 0
        if self.count:
            self.seal_and_write()
            unwritten = self.count          # the write failed (refusing says why)
        self.pending = False
        for i in range(self.nsegs):
            if self.segs[i].fd >= 0:
                os.fdatasync(self.segs[i].fd)
                self.segs[i].synced = self.segs[i].end
                close(self.segs[i].fd)
                self.segs[i].fd = -1
        if unwritten:
            raise OSError(self.error or 5, f"the last batch ({unwritten} records) could not be written: "
                                           f"{self.refusing_text}")

    # -- views ----------------------------------------------------------------------------

    @property
    def segments(self):
        """[(file name, bytes written, live messages)], oldest first."""
        cdef size_t i
        return [(segment_name(self.segs[i].no), self.segs[i].end, self.segs[i].live)
                for i in range(self.nsegs)]

    def stats(self):
        return {
            "segments": self.nsegs,
            "batches": self.n_batches,
            "records": self.n_records,
            "bytes_written": self.bytes_written,
            "segments_deleted": self.n_deleted,
            "live": sum(self.segs[i].live for i in range(self.nsegs)),
            "disk_bytes": sum(self.segs[i].alloc if self.segs[i].alloc > self.segs[i].end else self.segs[i].end
                              for i in range(self.nsegs)),
            "moved": self.n_moved,
            "compactions": self.n_compactions,
        }

    # -- recovery -------------------------------------------------------------------------

    def recover(self):
        """Read every segment of the directory, oldest first; returns what was found:
        {"segments", "batches", "records", "messages" (live ones, to restore), "bad_batches",
        "skipped": [(file, offset, bytes)], "cut": [(file, offset, bytes)], "empty": [file],
        "bytes" (of the files), "data" (of the log in them)}.
        Raises LogFormatError for a segment or batch of another format version."""
        cdef size_t i
        cdef size_t live
        cdef Entry *en
        cdef Segment *s
        cdef const char *r
        numbers = segment_numbers(self.path)
        self.recovery = {"segments": 0, "batches": 0, "records": 0, "messages": 0,
                         "bad_batches": 0, "skipped": [], "cut": [], "empty": [], "bytes": 0}
        for no in numbers:
            self.add_recovered_segment(no)
        for i in range(self.nsegs):
            self.scan_segment(i)
        self.recovery["data"] = sum(self.segs[i].end for i in range(self.nsegs))   # log bytes in use
        self.merge_rmoved()
        live = 0
        for i in range(self.nentries):
            if not self.entries[i].done:
                en = &self.entries[i]
                s = &self.segs[en.seg]
                s.live += 1
                r = s.map + en.off
                s.live_bytes += MSG_REC + <uint8_t>r[1] + teomq_ld32(r + 4)
                if self.segment_of(en.seq) != s:
                    self.moved_set(en.seq, s.no)    # a copy (compaction): counted where it is
                live += 1
        self.recovery.update(segments=self.nsegs, batches=self.rec_batches, records=self.rec_records,
                             messages=live)
        self.restore_at = 0
        return self.recovery

    cdef int add_recovered_segment(self, uint64_t no) except -1:
        cdef Segment *s
        cdef int fd
        cdef size_t size
        cdef void *m
        self.room_for_segment()
        fd = os.open(os.path.join(self.path, segment_name(no)), os.O_RDWR | os.O_CLOEXEC)
        size = os.fstat(fd).st_size
        s = &self.segs[self.nsegs]
        memset(s, 0, sizeof(Segment))
        s.no = no
        s.fd = fd
        s.alloc = size
        s.dir_synced = True
        if size:
            m = mmap(NULL, size, PROT_READ, MAP_SHARED, fd, 0)
            if m == MAP_FAILED:
                os.close(fd)
                raise OSError(errno, f"mapping {segment_name(no)}: {os.strerror(errno)}")
            s.map = <char *>m
            s.map_len = size
        self.nsegs += 1
        self.recovery["bytes"] += size
        return 0

    cdef bint resync_ok(self, const char *p, size_t avail, uint64_t last_time) noexcept:
        # a batch found after a damaged one: it verifies, and it follows what came before (its
        # time not earlier, its first message after the last one read); a batch inside a damaged
        # batch's payload has to pass these too
        cdef uint64_t first
        if not batch_ok(p, avail):
            return False
        if teomq_ld64(p + 24) < last_time:
            return False
        first = teomq_ld64(p + 16)
        return first == 0 or self.nentries == 0 or first > self.entries[self.nentries - 1].seq

    cdef int scan_segment(self, size_t si) except -1:
        cdef Segment *s = &self.segs[si]
        cdef const char *p = s.map
        cdef size_t n = s.map_len
        cdef size_t off = SEG_HEADER
        cdef size_t q
        cdef size_t data_end = n
        cdef uint16_t version
        cdef uint32_t length
        cdef uint64_t last_time = 0
        cdef uint64_t first
        cdef bint header_ok
        name = segment_name(s.no)
        while data_end > 0 and p[data_end - 1] == 0:
            data_end -= 1            # after the last byte written: the preallocated zeros
        if data_end == 0:
            # created, never written (a crash right after the roll): nothing in it
            self.recovery["empty"].append(name)
            s.base_seq = self.last_seq
            s.end = SEG_HEADER
            return 0
        header_ok = n >= SEG_HEADER and teomq_crc32c_update(0, p, 60) == teomq_ld32(p + 60)
        if header_ok and memcmp(p, SEG_MAGIC, 8) != 0:
            raise LogFormatError(f"{name} in {self.path} is not a teomq log segment (bad magic)")
        if header_ok and teomq_ld16(p + 8) != LOG_VERSION:
            raise LogFormatError(f"{name} in {self.path} has log format version {teomq_ld16(p + 8)}; "
                                 f"this teomq reads version {LOG_VERSION}")
        s.reusable = header_ok and memcmp(p, SEG_MAGIC, 8) == 0
        if header_ok and teomq_ld64(p + 24) >= self.last_seq:
            s.base_seq = teomq_ld64(p + 24)
            self.last_seq = s.base_seq
        else:
            # a damaged header (or one out of order) is not believed: its messages follow the
            # last one read before it (the batches are read all the same)
            if not header_ok:
                self.recovery["skipped"].append((name, 0, SEG_HEADER))
            s.base_seq = self.last_seq
        while off + BATCH_HEADER <= data_end:
            if batch_ok(p + off, n - off):
                version = teomq_ld16(p + off + 4)
                if version != LOG_VERSION:
                    raise LogFormatError(f"{name} in {self.path}: a batch at offset {off} has log format "
                                         f"version {version}; this teomq reads version {LOG_VERSION}")
                length = teomq_ld32(p + off + 8)
                first = teomq_ld64(p + off + 16)
                if first and self.nentries and first <= self.entries[self.nentries - 1].seq:
                    raise LogFormatError(f"{name}: the batch at offset {off} goes back to message #{first}")
                if teomq_ld64(p + off + 24) > last_time:
                    last_time = teomq_ld64(p + off + 24)
                self.read_batch(si, off, length)
                off += BATCH_HEADER + length
                continue
            # a damaged batch: where its own length says the next one is, else the next batch
            # that verifies and follows what came before; none: the tail was torn here
            q = n
            if memcmp(p + off, BATCH_MAGIC, 4) == 0:
                length = teomq_ld32(p + off + 8)
                if not length & 7 and <size_t>length <= n - off - BATCH_HEADER - BATCH_HEADER:
                    if self.resync_ok(p + off + BATCH_HEADER + length, n - off - BATCH_HEADER - length, last_time):
                        q = off + BATCH_HEADER + length
            if q == n:
                q = off + 8
                while q + BATCH_HEADER <= data_end:
                    if memcmp(p + q, BATCH_MAGIC, 4) == 0 and self.resync_ok(p + q, n - q, last_time):
                        break
                    q += 8
            if q + BATCH_HEADER <= data_end:
                s.reusable = False     # appended to no more: deleted once its messages are done
                self.recovery["bad_batches"] += 1
                self.recovery["skipped"].append((name, off, q - off))
                off = q
                continue
            self.recovery["cut"].append((name, off, data_end - off))
            self.zero_tail(s, off, data_end)
            break
        s.end = off
        s.synced = off
        return 0

    cdef int zero_tail(self, Segment *s, size_t start, size_t end) except -1:
        # cut a torn tail: zeros from start (a later recovery must not see the torn bytes)
        cdef char z[65536]
        cdef size_t k
        cdef int err
        memset(z, 0, sizeof(z))
        while start < end:
            k = end - start if end - start < sizeof(z) else sizeof(z)
            err = write_all(s.fd, z, k, start)
            if err:
                raise OSError(err, f"cutting the torn tail of {segment_name(s.no)}: {os.strerror(err)}")
            start += k
        os.fdatasync(s.fd)
        return 0

    cdef int read_batch(self, size_t si, size_t off, uint32_t length) except -1:
        cdef const char *base = self.segs[si].map
        cdef const char *p = base + off + BATCH_HEADER
        cdef const char *e = p + length
        cdef uint8_t t
        cdef size_t k
        cdef uint64_t seq
        cdef Entry *en
        cdef Entry *g
        self.rec_batches += 1
        while p < e:
            t = <uint8_t>p[0]
            if t == REC_PAD:
                break
            if t == REC_MSG:
                if e - p < MSG_REC or <size_t>(e - p) < MSG_REC + <uint8_t>p[1] + <size_t>teomq_ld32(p + 4):
                    raise LogFormatError(f"{segment_name(self.segs[si].no)}: a message record at offset "
                                         f"{p - base} runs past its batch")
                seq = teomq_ld64(p + 8)
                if self.nentries and seq <= self.entries[self.nentries - 1].seq:
                    raise LogFormatError(f"{segment_name(self.segs[si].no)}: message #{seq} at offset "
                                         f"{p - base} is out of order")
                if self.nentries == self.entries_cap:
                    self.entries_cap = self.entries_cap * 2 if self.entries_cap else 1024
                    g = <Entry *>realloc(self.entries, self.entries_cap * sizeof(Entry))
                    if g == NULL:
                        raise MemoryError()
                    self.entries = g
                en = &self.entries[self.nentries]
                self.nentries += 1
                en.seq = seq
                en.seg = <uint32_t>si
                en.off = <uint64_t>(p - base)
                en.attempts = 0
                en.done = 0
                en.not_before = 0
                en.expires = 0
                if seq > self.last_seq:
                    self.last_seq = seq
                p += MSG_REC + <uint8_t>p[1] + teomq_ld32(p + 4)
            elif t == REC_MOVED:
                if e - p < MSG_REC or <size_t>(e - p) < MSG_REC + <uint8_t>p[1] + <size_t>teomq_ld32(p + 4):
                    raise LogFormatError(f"{segment_name(self.segs[si].no)}: a copied message record at offset "
                                         f"{p - base} runs past its batch")
                seq = teomq_ld64(p + 8)
                en = self.find_entry(seq)
                if en == NULL:             # its first record is gone with its segment
                    en = self.rmoved_entry(seq)
                en.seg = <uint32_t>si       # the copy: where it is now
                en.off = <uint64_t>(p - base)
                p += MSG_REC + <uint8_t>p[1] + teomq_ld32(p + 4)
            elif t == REC_DELIVERED or t == REC_DONE:
                if e - p < STATE_REC:
                    raise LogFormatError(f"{segment_name(self.segs[si].no)}: a state record at offset "
                                         f"{p - base} runs past its batch")
                en = self.find_entry(teomq_ld64(p + 8))
                if en != NULL:
                    if t == REC_DONE:
                        en.done = 1
                    elif teomq_ld32(p + 4) > en.attempts:
                        en.attempts = teomq_ld32(p + 4)
                p += STATE_REC
            elif t == REC_TIMES:
                if e - p < STATE_REC:
                    raise LogFormatError(f"{segment_name(self.segs[si].no)}: a time record at offset "
                                         f"{p - base} runs past its batch")
                en = self.find_entry(teomq_ld64(p + 8))
                if en != NULL:
                    if <uint8_t>p[1] == TIME_NOT_BEFORE:
                        en.not_before = (<uint64_t>teomq_ld16(p + 2) << 32) | teomq_ld32(p + 4)
                    elif <uint8_t>p[1] == TIME_EXPIRES:
                        en.expires = (<uint64_t>teomq_ld16(p + 2) << 32) | teomq_ld32(p + 4)
                p += STATE_REC
            else:
                raise LogFormatError(f"{segment_name(self.segs[si].no)}: unknown record type {t} at "
                                     f"offset {p - base}")
            self.rec_records += 1
        return 0

    cdef Entry *find_entry(self, uint64_t seq) noexcept:
        cdef size_t lo = seq_lower_bound(<const char *>self.entries, self.nentries, sizeof(Entry), seq)
        if lo < self.nentries and self.entries[lo].seq == seq:
            return &self.entries[lo]
        if self.nrmoved:
            lo = seq_lower_bound(<const char *>self.rmoved, self.nrmoved, sizeof(Entry), seq)
            if lo < self.nrmoved and self.rmoved[lo].seq == seq:
                return &self.rmoved[lo]
        return NULL

    cdef Entry *rmoved_entry(self, uint64_t seq) except NULL:
        # recovery: a new entry for a copied message whose first record is gone (kept apart,
        # sorted, merged into entries after the scan)
        cdef size_t lo = seq_lower_bound(<const char *>self.rmoved, self.nrmoved, sizeof(Entry), seq)
        cdef Entry *g
        room_for_one(<void **>&self.rmoved, self.nrmoved, &self.rmoved_cap, sizeof(Entry))
        memmove(&self.rmoved[lo + 1], &self.rmoved[lo], (self.nrmoved - lo) * sizeof(Entry))
        self.nrmoved += 1
        g = &self.rmoved[lo]
        g.seq = seq
        g.attempts = 0
        g.done = 0
        g.not_before = 0
        g.expires = 0
        return g

    cdef int merge_rmoved(self) except -1:
        # recovery, after the scan: the copies' entries merged into entries (both sorted)
        cdef Entry *g
        cdef size_t i
        cdef size_t j
        cdef size_t k
        if self.nrmoved == 0:
            return 0
        g = <Entry *>malloc((self.nentries + self.nrmoved) * sizeof(Entry))
        if g == NULL:
            raise MemoryError()
        i = j = k = 0
        while i < self.nentries or j < self.nrmoved:
            if j == self.nrmoved or (i < self.nentries and self.entries[i].seq < self.rmoved[j].seq):
                g[k] = self.entries[i]
                i += 1
            else:
                g[k] = self.rmoved[j]
                j += 1
            k += 1
        free(self.entries)
        self.entries = g
        self.nentries = k
        self.entries_cap = k
        free(self.rmoved)
        self.rmoved = NULL
        self.nrmoved = self.rmoved_cap = 0
        return 0

    cdef int next_restored(self, Msg *m, const char **name, size_t *name_len, Idx *e, bint load,
                           uint64_t *times) except -1:
        # The next live recovered message as a Msg (load: payload copied out of the mapped file
        # into a block; session 0: its producer's session is gone), or (not load) paged out (m's
        # fields set, its data NULL); *e its index entry, either way; its route's name;
        # times[0], times[1]: its REC_TIMES (not before, expires: wall-clock ms, 0: none).
        # 0 at the end.
        cdef Entry *en
        cdef const char *r
        cdef uint32_t n
        while self.restore_at < self.nentries:
            en = &self.entries[self.restore_at]
            self.restore_at += 1
            if en.done:
                continue
            r = self.segs[en.seg].map + en.off
            n = teomq_ld32(r + 4)
            name_len[0] = <uint8_t>r[1]
            name[0] = r + MSG_REC
            times[0] = en.not_before
            times[1] = en.expires
            msg_fields(m, teomq_ld16(r + 2), 0, teomq_ld64(r + 16), en.attempts, 0, 0)
            m.rx.shift = 0
            m.length = n
            m.seq = en.seq
            e.seg = <uint32_t>self.segs[en.seg].no     # where it is (loaded too: a delayed one
            e.off = <uint32_t>en.off                   # may be paged out when it falls due)
            e.attempt = en.attempts | RESTORED
            e.len = <uint32_t>(MSG_REC + name_len[0] + n)
            e.deadline = 0
            if not load:
                m.data = NULL
                return 1
            m.data = payload_new(n)
            if m.data == NULL:
                raise MemoryError()
            if n:
                memcpy(m.data, r + MSG_REC + name_len[0], n)
            return 1
        return 0

    cdef int forget(self, Msg *m) except -1:
        # a recovered message the broker cannot take back (its command is gone): it stays on
        # disk, live in its segment
        payload_release(m.data)
        return 0

    def finish_recovery(self):
        """After the dispatcher restored the live messages: unmap the files, delete what holds
        nothing live. The newest segment goes on as the active one if its header is whole and it
        has room (so a broker restarted again and again does not add a file each time); else a
        new one begins. The others are only read, never appended to."""
        cdef size_t i
        cdef bint reuse = (self.nsegs > 0 and self.segs[self.nsegs - 1].reusable
                           and self.segs[self.nsegs - 1].end + BATCH_HEADER < self.segment_size)
        for i in range(self.nsegs):
            if self.segs[i].map != NULL:
                munmap(self.segs[i].map, self.segs[i].map_len)
                self.segs[i].map = NULL
            if self.segs[i].fd >= 0:
                os.fdatasync(self.segs[i].fd)   # what a restart read is durable from here on
                # kept open (only read from now on, but for the active one): messages paged out
                # are read back from them
            self.segs[i].synced = self.segs[i].end
        free(self.entries)
        self.entries = NULL
        self.nentries = 0
        self.entries_cap = 0
        if not reuse:
            self.open_segment()
        self.drop_done_segments()


@cython.final
cdef class Syncer:
    """The thread that runs the log's fdatasync rounds (syncer_impl.h): C only, it never takes
    the GIL. ``submit`` hands it a round (the fds of ``SegmentLog.sync_targets``, which it closes);
    ``fd`` becomes readable when the round ended, and ``result`` then says how (0, or an errno)."""

    cdef teomq_syncer s
    cdef bint running

    def __cinit__(self, int dirfd):
        cdef int err = teomq_syncer_start(&self.s, dirfd)
        if err:
            raise OSError(err, f"starting the fsync thread: {os.strerror(err)}")
        self.running = True

    def __dealloc__(self):
        if self.running:
            with nogil:
                teomq_syncer_stop(&self.s)

    @property
    def fd(self):
        """An eventfd: readable when a round ended."""
        return self.s.efd

    def submit(self, targets, bint directory):
        """A round: fdatasync every target's fd (then close it), and the directory if asked."""
        cdef int *fds
        cdef int n = 0
        cdef int err
        if not self.running:
            raise RuntimeError("the syncer is stopped")
        fds = <int *>malloc((len(targets) + 1) * sizeof(int))
        if fds == NULL:
            raise MemoryError()
        try:
            for t in targets:
                fds[n] = t[0]
                n += 1
            err = teomq_syncer_submit(&self.s, fds, n, directory)
        finally:
            free(fds)
        if err:
            raise MemoryError()

    def result(self):
        """After ``fd`` became readable: 0 if the round synced everything, else the errno."""
        return teomq_syncer_result(&self.s)

    def stop(self):
        """Let a submitted round finish, then end the thread."""
        if self.running:
            with nogil:
                teomq_syncer_stop(&self.s)
            self.running = False
