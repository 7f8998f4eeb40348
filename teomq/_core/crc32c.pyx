# cython: language_level=3
"""CRC32C (Castagnoli) over any contiguous buffer: SSE4.2 instruction where the CPU has it, tables elsewhere."""

from libc.stdint cimport uint32_t


def crc32c(data, unsigned int crc=0):
    """Return the CRC32C of ``data`` continuing from ``crc`` (0 to start)."""
    cdef const unsigned char[::1] view = data
    if view.shape[0] == 0:
        return crc
    with nogil:
        crc = teomq_crc32c_update(crc, <const char *>&view[0], view.shape[0])
    return crc


def crc32c_software(data, unsigned int crc=0):
    """The table implementation, whatever the CPU; for tests and benchmarks."""
    cdef const unsigned char[::1] view = data
    if view.shape[0] == 0:
        return crc
    with nogil:
        crc = teomq_crc32c_update_sw(crc, <const char *>&view[0], view.shape[0])
    return crc


def hardware() -> bool:
    """True when the crc32 CPU instruction is in use."""
    teomq_crc32c_update(0, b"", 0)
    return teomq_crc32c_mode == 2
