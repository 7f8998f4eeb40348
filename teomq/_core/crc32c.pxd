from libc.stdint cimport uint32_t, uint64_t

cdef extern from "crc32c_impl.h":
    uint32_t teomq_crc32c_update(uint32_t crc, const char *p, size_t n) nogil
    uint32_t teomq_crc32c_update_sw(uint32_t crc, const char *p, size_t n) nogil
    int teomq_crc32c_mode
    uint32_t teomq_crc32c_shift(uint32_t a, uint32_t f) nogil
    uint32_t teomq_crc32c_reframe_min
    uint32_t teomq_crc32c_shift_factor(uint64_t n) nogil
