# cython: language_level=3
"""The write side's one syscall site: send()/sendmsg() of a WriteBuffer to a socket.

The core is sans-IO: a WriteBuffer (frame_codec.pyx) holds encoded frames and in-place
payloads and gives them out as iovecs (``_segments``) or bytes (``take_rest``). Writing them
is the protocol layer's: it makes a SocketWriter for a connection whose transport is a plain
TCP or Unix socket (teomq/transports.py: socket_writer), and none for anything else (TLS,
wrapping or virtual transports), whose every byte then goes through ``transport.write``.

With a writer, a flush is one send() (one sendmsg() with in-place payloads) straight to the
socket while the transport holds nothing of ours: no bytes object, no copy. What the socket
does not take goes to the transport as one bytes, and from then on the transport owns the
ordering until it reports an empty write buffer.
"""

cimport cython
from libc.string cimport memset

from teomq._core.frame_codec cimport EXT_MAX

cdef extern from "sys/uio.h" nogil:
    struct iovec:
        void *iov_base
        size_t iov_len

cdef extern from "sys/socket.h" nogil:
    struct msghdr:
        void *msg_name
        int msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags
    ssize_t send(int fd, const void *buf, size_t n, int flags)
    ssize_t sendmsg(int fd, const msghdr *msg, int flags)
    int MSG_DONTWAIT
    int MSG_NOSIGNAL


@cython.final
cdef class SocketWriter:

    def __cinit__(self, int fd, bint backlog=False):
        if fd < 0:
            raise ValueError("a SocketWriter needs an open socket")
        self.fd = fd
        self.backlog = backlog

    cdef int write(self, WriteBuffer out, object transport) except -1:
        # Everything in ``out``, which is empty after.
        cdef iovec iov[2 * EXT_MAX + 1]
        cdef msghdr mh
        cdef int k, i
        cdef size_t total = 0
        cdef ssize_t n = 0
        if self.backlog and transport.get_write_buffer_size() == 0:
            self.backlog = False
        if not self.backlog:
            if out.n_ext == 0:
                total = out.length
                with nogil:
                    n = send(self.fd, out.buf, total, MSG_DONTWAIT | MSG_NOSIGNAL)
            else:
                k = out._segments(iov)
                for i in range(k):
                    total += iov[i].iov_len
                memset(&mh, 0, sizeof(mh))
                mh.msg_iov = iov
                mh.msg_iovlen = k
                with nogil:
                    n = sendmsg(self.fd, &mh, MSG_DONTWAIT | MSG_NOSIGNAL)
            if n < 0:
                n = 0  # EAGAIN, or an error the transport will meet and report itself
            if <size_t>n == total:
                out.clear()
                return 0
            self.backlog = True
        # empty first (take_rest does): a transport may add to this buffer from write() (one
        # that feeds something back into the core before it returns)
        transport.write(out.take_rest(<size_t>n))
        return 0

    @property
    def transport_backlog(self) -> bool:
        """Whether the transport holds bytes of ours (written only through it until empty)."""
        return self.backlog


cdef int write_out(SocketWriter writer, WriteBuffer out, object transport) except -1:
    """Write ``out``: through ``writer`` when there is one, else all of it to the transport."""
    if writer is not None:
        return writer.write(out, transport)
    transport.write(out.take_bytes())
    return 0
