"""Type stub of the compiled teomq._core.crc32c (crc32c.pyx): CRC32C over any contiguous buffer."""

from typing import SupportsIndex

from _typeshed import ReadableBuffer

def crc32c(data: ReadableBuffer, crc: SupportsIndex = 0) -> int:
    """Return the CRC32C of ``data`` continuing from ``crc`` (0 to start)."""

def crc32c_software(data: ReadableBuffer, crc: SupportsIndex = 0) -> int:
    """The table implementation, whatever the CPU; for tests and benchmarks."""

def hardware() -> bool:
    """True when the crc32 CPU instruction is in use."""

def reframe_crc(
    frame_crc: SupportsIndex, old_head_crc: SupportsIndex, new_head_crc: SupportsIndex,
    payload_length: SupportsIndex,
) -> int:
    """CRC of the same payload behind a different header, without reading the payload (for tests)."""
