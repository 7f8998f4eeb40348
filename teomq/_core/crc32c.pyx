# cython: language_level=3
"""CRC32C (Castagnoli) over any contiguous buffer: SSE4.2 instruction where the CPU has it, tables elsewhere."""

from libc.stdint cimport uint32_t, uint64_t

from teomq._core.frame_codec cimport as_bytes_view, as_u64


cdef object _crc(object data, object crc, bint software):
    cdef const unsigned char[::1] view = as_bytes_view(data)
    cdef uint64_t c0 = as_u64(crc)
    cdef uint32_t c
    if c0 > 0xFFFFFFFF:
        raise OverflowError("crc is over 2**32 - 1")
    c = <uint32_t>c0
    if view.shape[0] == 0:
        return c
    with nogil:
        if software:
            c = teomq_crc32c_update_sw(c, <const char *>&view[0], view.shape[0])
        else:
            c = teomq_crc32c_update(c, <const char *>&view[0], view.shape[0])
    return c


def crc32c(data, crc=0):
    """Return the CRC32C of ``data`` continuing from ``crc`` (0 to start)."""
    return _crc(data, crc, False)


def crc32c_software(data, crc=0):
    """The table implementation, whatever the CPU; for tests and benchmarks."""
    return _crc(data, crc, True)


def hardware() -> bool:
    """True when the crc32 CPU instruction is in use."""
    teomq_crc32c_update(0, b"", 0)
    return teomq_crc32c_mode >= 2


def reframe_crc(frame_crc, old_head_crc, new_head_crc, payload_length):
    """CRC of the same payload behind a different header, without reading the payload:
    ``crc(H' + B) = crc(H + B) ^ (crc(H) ^ crc(H')) * x^(8 len(B))`` (for tests)."""
    cdef uint32_t f = teomq_crc32c_shift_factor(as_u64(payload_length))
    return <uint32_t>as_u64(frame_crc) ^ teomq_crc32c_shift(
        <uint32_t>as_u64(old_head_crc) ^ <uint32_t>as_u64(new_head_crc), f)
