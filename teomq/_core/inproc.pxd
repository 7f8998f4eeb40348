from teomq._core.dispatch cimport Dispatcher
from teomq._core.endpoint cimport Endpoint


cdef class InprocEndpoint(Endpoint):
    cdef Dispatcher disp
    cdef object on_output
    cdef list pending
