from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t

from teomq._core.endpoint cimport Endpoint
from teomq._core.ring_queue cimport Idx, IdxQueue, Msg, MsgRing
from teomq._core.store cimport Store

# The on-disk format (docs/storage.md is the spec; teomq/_py/seglog.py reads it in Python).
cdef enum:
    SEG_HEADER = 64         # segment header: magic, version, segment number, base seq, ...
    BATCH_HEADER = 40       # batch header: magic, version, length, count, first seq, time, epoch, crc
    LOG_VERSION = 1
    REC_PAD = 0             # padding: the rest of the batch body is zeros
    REC_MSG = 1             # an accepted message: [type][name len][flags u16][payload len u32]
                            # [seq][msg id][session] name payload (32 + name + payload bytes)
    REC_DELIVERED = 2       # [type][0][0 u16][attempt u32][seq]: a delivery was made (16 bytes)
    REC_DONE = 3            # [type][reason][0 u16][0 u32][seq]: nothing more to deliver (16 bytes)
    REC_MOVED = 4           # a live message copied forward out of an old segment (compaction):
                            # a message record's layout; its seq is older than the batch's
    REC_TIMES = 5           # [type][kind][ms >> 32 u16][ms u32][seq]: the message is not delivered
                            # before (kind 1) or expires at (kind 2) that wall-clock time, ms since
                            # 1970 (16 bytes; the latest record of a kind holds)
    MSG_REC = 32
    STATE_REC = 16
    PREALLOC_STEP = 1 << 20 # a segment file is preallocated this much at a time, ahead of its writes
    STATE_RESERVE = 256 << 10  # preallocated room only state records may use (a full disk):
                            # 16,384 delivered/done records; at most a quarter of a segment

cdef enum DoneReason:
    DONE_ANSWERED = 1       # answered (or acknowledged without an answer)
    DONE_DROPPED = 2        # dropped by the broker (a fanout copy's subscriber went away)


cdef struct Moved:
    # a message whose record was copied forward (compaction): the segment that holds it now
    uint64_t seq
    uint64_t no


cdef struct Segment:
    uint64_t no             # its number: file NNNNNNNNNNNNNNNNNNNN.seg
    uint64_t base_seq       # its messages have seq > base_seq (the log's last seq when it began)
    uint64_t live           # its messages not yet done (moved ones counted where they are now)
    uint64_t live_bytes     # their records' bytes (what compaction would copy)
    uint64_t end            # bytes written (header and whole batches)
    uint64_t alloc          # bytes preallocated (posix_fallocate), ahead of end
    uint64_t synced         # bytes the syncer has made durable (its fdatasync returned)
    int fd                  # -1 once closed
    bint dir_synced         # its directory entry is durable (the directory was fsynced since)
    bint reusable           # recovery: its header is whole (it may go on as the active segment)
    char *map               # recovery only: the file mapped read-only, map_len bytes
    size_t map_len


cdef struct Entry:
    # a recovered message record (recovery only), in seq order
    uint64_t seq
    uint32_t seg            # index into segs
    uint64_t off            # the record's offset in the segment file
    uint32_t attempts       # deliveries recorded
    uint8_t done
    uint64_t not_before     # REC_TIMES: wall-clock ms (0: none)
    uint64_t expires


cdef class SegmentLog(Store):
    cdef readonly object path
    cdef readonly uint64_t segment_size
    cdef readonly uint32_t epoch
    cdef Segment *segs      # oldest first; the last is the active segment
    cdef size_t nsegs
    cdef size_t segs_cap
    cdef char *buf          # the pass's batch: BATCH_HEADER reserved, then records
    cdef size_t used
    cdef size_t cap
    cdef uint32_t count     # records in the batch
    cdef uint64_t batch_seq # first message seq in the batch (0: none yet)
    cdef list routes        # the dispatcher's routes (names, kinds), set by attach()
    cdef list waiters       # endpoints with confirmations waiting for a batch to be stored
    cdef readonly bint confirm_on_write   # fsync interval/never: confirmed once written to the OS
    cdef object outbox      # an Outbox: the pass's batch is written at its flush
    cdef public bint notify_written   # call on_written after the next pass's write (the syncer is idle)
    cdef public object on_written
    cdef readonly uint64_t n_batches
    cdef readonly uint64_t synced_batches  # batches a finished sync round covered
    cdef readonly uint64_t n_records
    cdef readonly uint64_t bytes_written
    cdef readonly uint64_t n_deleted
    cdef readonly int error             # errno of the last failed write (0: none)
    cdef readonly object error_text
    # disk errors: while refusing (an errno) new messages get STORAGE errors; state records go on
    cdef readonly int refusing
    cdef readonly object refusing_text
    cdef bytes refusal                  # the ERROR payload refused SENDs get
    cdef bint roll_due                  # the active segment is full and starting the next failed
    cdef readonly bint stopped          # refusing for good (a failed fdatasync): restart the broker
    cdef readonly uint64_t n_refused
    # paging: where the latest message record is (locate), and the read-back window
    cdef uint64_t loc_seq
    cdef uint32_t loc_seg
    cdef uint32_t loc_off
    cdef uint32_t loc_len
    cdef char *rbuf
    cdef size_t rcap
    cdef uint32_t win_no                # the window holds win_len bytes of segment win_no
    cdef uint64_t win_off               # from this offset (win_no 0: none)
    cdef size_t win_len
    cdef readonly uint64_t n_reads      # preads of paged-out records
    cdef readonly uint64_t n_read_errors
    cdef readonly object read_error_text
    # compaction: messages copied forward (their segments by seq: moved), the one being emptied
    cdef Moved *moved
    cdef size_t nmoved
    cdef size_t moved_cap
    cdef Entry *rmoved                  # recovery: copies of messages whose first record is gone
    cdef size_t nrmoved
    cdef size_t rmoved_cap
    cdef uint64_t drop_hold             # no segment is deleted before this batch is stored
    cdef uint64_t compact_no            # the segment being emptied (0: none)
    cdef uint64_t compact_lo            # its messages' seqs: (lo, hi], unless moved
    cdef uint64_t compact_hi
    cdef uint64_t stuck_no              # a segment compaction could not empty (kept messages)
    cdef readonly uint64_t n_moved
    cdef readonly uint64_t n_compactions
    # recovery
    cdef Entry *entries
    cdef size_t nentries
    cdef size_t entries_cap
    cdef size_t restore_at
    cdef uint64_t rec_batches           # recovery: whole batches read, and their records
    cdef uint64_t rec_records
    cdef readonly dict recovery

    cdef bint durable(self, Msg *m) noexcept
    cdef int record(self, Msg *m, const char *p, bytes name) except -1
    cdef void state_done(self, Msg *m) noexcept
    cdef int confirm_later(self, Endpoint conn, uint64_t fid) except -1
    cdef int release_confirms(self, uint64_t upto) except -1
    cdef int make_room(self, size_t n, bint message) except -1
    cdef int grow(self, Segment *s, uint64_t need) except -1
    cdef int set_refusing(self, int err, str what) except -1
    cdef size_t reserve_room(self) noexcept
    cdef char *reserve(self, size_t n) except NULL
    cdef int seal_and_write(self) except -1
    cdef int room_for_segment(self) except -1
    cdef int open_segment(self) except -1
    cdef int drop_done_segments(self) noexcept
    cdef Segment *segment_of(self, uint64_t seq) noexcept
    cdef int add_recovered_segment(self, uint64_t no) except -1
    cdef bint resync_ok(self, const char *p, size_t avail, uint64_t last_time) noexcept
    cdef int scan_segment(self, size_t si) except -1
    cdef int zero_tail(self, Segment *s, size_t start, size_t end) except -1
    cdef int read_batch(self, size_t si, size_t off, uint32_t length) except -1
    cdef Entry *find_entry(self, uint64_t seq) noexcept
    cdef int forget(self, Msg *m) except -1
    cdef int next_restored(self, Msg *m, const char **name, size_t *name_len, Idx *e, bint load,
                           uint64_t *times) except -1
    cdef Segment *seg_by_no(self, uint32_t no) noexcept
    cdef int moved_set(self, uint64_t seq, uint64_t no) except -1
    cdef Moved *moved_find(self, uint64_t seq) noexcept
    cdef Entry *rmoved_entry(self, uint64_t seq) except NULL
    cdef int merge_rmoved(self) except -1
    cdef bint compacting(self, uint64_t seq) noexcept
    cdef int move_msg(self, Msg *m, Idx *e=*) except -1
    cdef uint64_t move_idx(self, Idx *e) except? 0
    cdef int timed_seq(self, uint64_t seq, int kind, double after) except -1
    cdef char *move_room(self, size_t n, uint32_t attempt) except? NULL
    cdef int moved_here(self, uint64_t seq, size_t n, uint32_t attempt, char *r) except -1
    cdef const char *record_at(self, const Idx *e) except? NULL
