from teomq._core.dispatch cimport Dispatcher
from teomq._core.endpoint cimport Endpoint
from teomq._core.ring_queue cimport Msg
from libc.stdint cimport uint64_t


cdef class PushCache:
    cdef uint64_t seq[64]
    cdef list names
    cdef list frames
    cdef object encode
    cdef object frame_for(self, Dispatcher disp, Msg *m, object streams)


cdef class InprocEndpoint(Endpoint):
    cdef Dispatcher disp
    cdef object on_output
    cdef list pending
    cdef list parked        # held-back sends: (flags, id, payload), in order
    cdef PushCache push_cache   # set_pushes(): stream pushes taken in C, None: every delivery a tuple
    cdef object push_streams    # ... the names they are taken for (a set, the session's own)
    cdef list push_frames       # encoded pushes taken since the last item handed over
    cdef uint64_t *held         # delivery ids to acknowledge (hold_acks, release_held), in order
    cdef size_t n_held
    cdef size_t held_cap
    cdef int _end_pushes(self) except -1
    cdef int _hold(self, uint64_t did) except -1
    cdef Py_ssize_t _release(self, size_t limit) except -1
