from teomq._core.dispatch cimport Dispatcher
from teomq._core.endpoint cimport Endpoint


cdef class InprocEndpoint(Endpoint):
    cdef Dispatcher disp
    cdef object on_output
    cdef list pending
    cdef list parked        # held-back sends: (flags, id, payload), in order
