/* Little-endian loads and stores for the frame header; compilers fold these into plain moves. */
#ifndef TEOMQ_WIRE_H
#define TEOMQ_WIRE_H
#include <stdint.h>

static inline uint16_t teomq_ld16(const char *p) {
    const unsigned char *u = (const unsigned char *)p;
    return (uint16_t)(u[0] | (u[1] << 8));
}
static inline uint32_t teomq_ld32(const char *p) {
    const unsigned char *u = (const unsigned char *)p;
    return (uint32_t)u[0] | ((uint32_t)u[1] << 8) | ((uint32_t)u[2] << 16) | ((uint32_t)u[3] << 24);
}
static inline uint64_t teomq_ld64(const char *p) {
    return (uint64_t)teomq_ld32(p) | ((uint64_t)teomq_ld32(p + 4) << 32);
}
static inline void teomq_st16(char *p, uint16_t v) {
    p[0] = (char)(v & 0xff); p[1] = (char)(v >> 8);
}
static inline void teomq_st32(char *p, uint32_t v) {
    p[0] = (char)(v & 0xff); p[1] = (char)((v >> 8) & 0xff);
    p[2] = (char)((v >> 16) & 0xff); p[3] = (char)(v >> 24);
}
static inline void teomq_st64(char *p, uint64_t v) {
    teomq_st32(p, (uint32_t)v); teomq_st32(p + 4, (uint32_t)(v >> 32));
}
#endif
