from teomq._core.frame_codec cimport WriteBuffer


cdef class SocketWriter:
    """The one place the core writes to a socket: owned by the protocol layer, made only for
    a plain TCP or Unix socket transport (teomq/transports.py: socket_writer)."""
    cdef readonly int fd
    cdef bint backlog          # the transport holds bytes of ours: it owns ordering until empty
    cdef int write(self, WriteBuffer out, object transport) except -1


cdef int write_out(SocketWriter writer, WriteBuffer out, object transport) except -1
