/* CRC32C (Castagnoli, reflected polynomial 0x82F63B78).
 *
 * teomq_crc32c_update(crc, p, n) continues a CRC: start with crc = 0 and feed the
 * pieces in order. x86-64 with SSE4.2 uses the crc32 instruction (picked once at
 * first call through __builtin_cpu_supports); everything else uses slicing-by-8 tables.
 */
#ifndef TEOMQ_CRC32C_IMPL_H
#define TEOMQ_CRC32C_IMPL_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <stdlib.h>

static uint32_t teomq_crc32c_table[8][256];
static int teomq_crc32c_mode = 0; /* 0 unset, 1 table, 2 hardware */

static void teomq_crc32c_init_table(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : (c >> 1);
        teomq_crc32c_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = teomq_crc32c_table[0][i];
        for (int t = 1; t < 8; t++) {
            c = teomq_crc32c_table[0][c & 0xff] ^ (c >> 8);
            teomq_crc32c_table[t][i] = c;
        }
    }
}

static uint32_t teomq_crc32c_sw(uint32_t crc, const unsigned char *p, size_t n) {
    crc = ~crc;
    while (n && ((uintptr_t)p & 7)) {
        crc = teomq_crc32c_table[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
        n--;
    }
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        w = __builtin_bswap64(w);
#endif
        w ^= crc;
        crc = teomq_crc32c_table[7][w & 0xff] ^ teomq_crc32c_table[6][(w >> 8) & 0xff] ^
              teomq_crc32c_table[5][(w >> 16) & 0xff] ^ teomq_crc32c_table[4][(w >> 24) & 0xff] ^
              teomq_crc32c_table[3][(w >> 32) & 0xff] ^ teomq_crc32c_table[2][(w >> 40) & 0xff] ^
              teomq_crc32c_table[1][(w >> 48) & 0xff] ^ teomq_crc32c_table[0][w >> 56];
        p += 8;
        n -= 8;
    }
    while (n--) crc = teomq_crc32c_table[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
    return ~crc;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define TEOMQ_CRC32C_HAVE_HW 1
__attribute__((target("sse4.2")))
static uint32_t teomq_crc32c_hw(uint32_t crc, const unsigned char *p, size_t n) {
    uint64_t c = (uint32_t)~crc;
    while (n && ((uintptr_t)p & 7)) {
        c = __builtin_ia32_crc32qi((uint32_t)c, *p++);
        n--;
    }
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        c = __builtin_ia32_crc32di(c, w);
        p += 8;
        n -= 8;
    }
    while (n--) c = __builtin_ia32_crc32qi((uint32_t)c, *p++);
    return ~(uint32_t)c;
}
#else
#define TEOMQ_CRC32C_HAVE_HW 0
#endif

static void teomq_crc32c_select(void) {
    teomq_crc32c_init_table();
#if TEOMQ_CRC32C_HAVE_HW
    __builtin_cpu_init();
    if (__builtin_cpu_supports("sse4.2") && !getenv("TEOMQ_CRC32C_SOFTWARE")) {
        teomq_crc32c_mode = 2;
        return;
    }
#endif
    teomq_crc32c_mode = 1;
}



/* CRC arithmetic for forwarding a payload under a new header without reading it again.
 *
 * With crc(M) taken as the polynomial M(x) x^32 mod P (pre/post inversion cancel out in
 * the differences below), appending n bytes multiplies a prefix's CRC by x^(8n) mod P:
 *   crc(A || B) = crc(A) * x^(8|B|)  XOR  crc(B)
 * so a frame whose header changes from H to H' keeps its payload B and gets
 *   crc(H' || B) = crc(H || B)  XOR  (crc(H) XOR crc(H')) * x^(8|B|).
 * Values are bit-reflected, as the CRC itself: bit 31 is the coefficient of x^0.
 */
static uint32_t teomq_crc32c_x2n[32]; /* x^(2^k) mod P */
static int teomq_crc32c_x2n_ready = 0;

static uint32_t teomq_crc32c_mulmod(uint32_t a, uint32_t b) {
    uint32_t prod = 0;
    for (uint32_t m = 1u << 31; m; m >>= 1) {
        if (a & m) prod ^= b;
        b = (b & 1) ? (b >> 1) ^ 0x82F63B78u : (b >> 1);
    }
    return prod;
}

/* x^(8n) mod P: the factor that shifts a CRC past n bytes. */
static uint32_t teomq_crc32c_shift_factor(uint64_t n) {
    if (!teomq_crc32c_x2n_ready) {
        uint32_t p = 1u << 30; /* x^1 */
        for (int k = 0; k < 32; k++) {
            teomq_crc32c_x2n[k] = p;
            p = teomq_crc32c_mulmod(p, p);
        }
        teomq_crc32c_x2n_ready = 1;
    }
    uint32_t r = 1u << 31; /* x^0 */
    int k = 3;             /* n bytes = 8n bits = n * 2^3 */
    while (n) {
        if (n & 1) r = teomq_crc32c_mulmod(teomq_crc32c_x2n[k & 31], r);
        n >>= 1;
        k++;
    }
    return r;
}



#if TEOMQ_CRC32C_HAVE_HW
/* The crc32 instruction has a latency of 3 cycles and a throughput of 1: three independent
 * streams over three thirds of a long buffer keep it busy, and the thirds' CRCs are joined
 * with crc(A || B) = crc(A) * x^(8|B|) XOR crc(B). About 3x the serial speed from 8 KiB. */
#define TEOMQ_CRC32C_3WAY_MIN 8192
__attribute__((target("sse4.2")))
static uint32_t teomq_crc32c_hw3(uint32_t crc, const unsigned char *p, size_t n) {
    size_t third = (n / 3) & ~(size_t)7;
    const unsigned char *p1 = p + third, *p2 = p + 2 * third;
    uint64_t a = (uint32_t)~crc, b = 0xffffffffu, c = 0xffffffffu;
    for (size_t i = 0; i < third; i += 8) {
        uint64_t w0, w1, w2;
        memcpy(&w0, p + i, 8);
        memcpy(&w1, p1 + i, 8);
        memcpy(&w2, p2 + i, 8);
        a = __builtin_ia32_crc32di(a, w0);
        b = __builtin_ia32_crc32di(b, w1);
        c = __builtin_ia32_crc32di(c, w2);
    }
    uint32_t f = teomq_crc32c_shift_factor(third);
    uint32_t r = teomq_crc32c_mulmod(~(uint32_t)a, f) ^ ~(uint32_t)b;
    r = teomq_crc32c_mulmod(r, f) ^ ~(uint32_t)c;
    return teomq_crc32c_hw(r, p + 3 * third, n - 3 * third);
}
#endif

static inline uint32_t teomq_crc32c_update(uint32_t crc, const char *p, size_t n) {
    if (teomq_crc32c_mode == 0) teomq_crc32c_select();
#if TEOMQ_CRC32C_HAVE_HW
    if (teomq_crc32c_mode == 2) {
        if (n >= TEOMQ_CRC32C_3WAY_MIN) return teomq_crc32c_hw3(crc, (const unsigned char *)p, n);
        return teomq_crc32c_hw(crc, (const unsigned char *)p, n);
    }
#endif
    return teomq_crc32c_sw(crc, (const unsigned char *)p, n);
}

/* Always the table path; for tests and benchmarks that compare both. */
static inline uint32_t teomq_crc32c_update_sw(uint32_t crc, const char *p, size_t n) {
    if (teomq_crc32c_mode == 0) teomq_crc32c_select();
    return teomq_crc32c_sw(crc, (const unsigned char *)p, n);
}

#endif
