/* CRC32C (Castagnoli, reflected polynomial 0x82F63B78).
 *
 * teomq_crc32c_update(crc, p, n) continues a CRC: start with crc = 0 and feed the
 * pieces in order. x86-64 with SSE4.2 uses the crc32 instruction, in three streams joined
 * by carry-less multiplies where it also has pclmulqdq (picked once at first call through
 * __builtin_cpu_supports); everything else uses slicing-by-8 tables.
 */
#ifndef TEOMQ_CRC32C_IMPL_H
#define TEOMQ_CRC32C_IMPL_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <stdlib.h>

static uint32_t teomq_crc32c_table[8][256];

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
#include <immintrin.h>
#else
#define TEOMQ_CRC32C_HAVE_HW 0
#endif

/* 0 unset, 1 tables, 2 the crc32 instruction, 3 crc32 and pclmulqdq (three streams, carry-less
 * multiplies for joining CRCs). Picked once, at the first call, by teomq_crc32c_select(). */
static int teomq_crc32c_mode = 0;

/* Payloads at least this long are forwarded under a new header with a derived CRC rather than
 * a recomputed one (frame_codec.pyx note_received): where deriving costs less than reading. */
static uint32_t teomq_crc32c_reframe_min = 4096;

/* CRC arithmetic for joining CRCs and forwarding a payload under a new header without reading it
 * again.
 *
 * With crc(M) taken as the polynomial M(x) x^32 mod P (pre/post inversion cancel out in
 * the differences below), appending n bytes multiplies a prefix's CRC by x^(8n) mod P:
 *   crc(A || B) = crc(A) * x^(8|B|)  XOR  crc(B)
 * so a frame whose header changes from H to H' keeps its payload B and gets
 *   crc(H' || B) = crc(H || B)  XOR  (crc(H) XOR crc(H')) * x^(8|B|).
 * Values are bit-reflected, as the CRC itself: bit 31 is the coefficient of x^0.
 */
static uint32_t teomq_crc32c_mulmod(uint32_t a, uint32_t b) {
    uint32_t prod = 0;
    for (uint32_t m = 1u << 31; m; m >>= 1) {
        if (a & m) prod ^= b;
        b = (b & 1) ? (b >> 1) ^ 0x82F63B78u : (b >> 1);
    }
    return prod;
}

#if TEOMQ_CRC32C_HAVE_HW
__attribute__((target("sse4.2")))
static uint32_t teomq_crc32c_hw(uint32_t crc, const unsigned char *p, size_t n) {
    uint64_t c = (uint32_t)~crc;
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        c = __builtin_ia32_crc32di(c, w);
        p += 8;
        n -= 8;
    }
    if (n >= 4) {
        uint32_t w;
        memcpy(&w, p, 4);
        c = __builtin_ia32_crc32si((uint32_t)c, w);
        p += 4;
        n -= 4;
    }
    while (n--) c = __builtin_ia32_crc32qi((uint32_t)c, *p++);
    return ~(uint32_t)c;
}

/* a * F mod P for a factor f = F * x^-33 (mode 3): pclmulqdq's 63-bit product of two reflected
 * 32-bit values, read as 64 bits of CRC input, stands for x * a * f; crc32 of it from 0 multiplies
 * by x^32 and reduces, giving a * f * x^33 = a * F. */
__attribute__((target("sse4.2,pclmul")))
static uint32_t teomq_crc32c_clmul(uint32_t a, uint32_t f) {
    __m128i prod = _mm_clmulepi64_si128(_mm_cvtsi32_si128((int)a), _mm_cvtsi32_si128((int)f), 0);
    return (uint32_t)__builtin_ia32_crc32di(0, (uint64_t)_mm_cvtsi128_si64(prod));
}
#endif

/* Shift factors. teomq_crc32c_shift_factor(n) is the factor of n bytes, x^(8n) mod P, in the
 * form teomq_crc32c_shift() takes: x^(8n - 33) in mode 3, x^(8n) otherwise. shift(a, f) is
 * a * x^(8n) mod P; shift(f1, f2) of two factors is the factor of their byte counts' sum.
 * Tables: lo[i] of i bytes, hi[j] of 256 j bytes, big[k] of 2^(16 + k) bytes. */
static uint32_t teomq_crc32c_lo[256], teomq_crc32c_hi[256], teomq_crc32c_big[48];

static inline uint32_t teomq_crc32c_shift(uint32_t a, uint32_t f) {
#if TEOMQ_CRC32C_HAVE_HW
    if (teomq_crc32c_mode == 3) return teomq_crc32c_clmul(a, f);
#endif
    return teomq_crc32c_mulmod(a, f);
}

static uint32_t teomq_crc32c_shift_factor(uint64_t n);

/* Three streams keep the crc32 instruction busy (latency 3 cycles, one issued per cycle): the
 * buffer's three thirds (of 8-byte words) are CRC'd side by side, from the running CRC, 0 and 0,
 * and joined as a * x^(16T) ^ b * x^(8T) ^ c for thirds of T bytes; the rest goes on serially. */
#if TEOMQ_CRC32C_HAVE_HW
__attribute__((target("sse4.2,pclmul")))
static uint32_t teomq_crc32c_hw3(uint32_t crc, const unsigned char *p, size_t n) {
    const size_t third = (n / 3) & ~(size_t)7;
    const unsigned char *p1 = p + third, *p2 = p + 2 * third;
    const uint32_t f1 = teomq_crc32c_shift_factor(third), f2 = teomq_crc32c_clmul(f1, f1);
    uint64_t a = (uint32_t)~crc, b = 0, c = 0;
    for (size_t i = 0; i < third; i += 8) {
        uint64_t w0, w1, w2;
        memcpy(&w0, p + i, 8);
        memcpy(&w1, p1 + i, 8);
        memcpy(&w2, p2 + i, 8);
        a = __builtin_ia32_crc32di(a, w0);
        b = __builtin_ia32_crc32di(b, w1);
        c = __builtin_ia32_crc32di(c, w2);
    }
    a = teomq_crc32c_clmul((uint32_t)a, f2) ^ teomq_crc32c_clmul((uint32_t)b, f1) ^ (uint32_t)c;
    return teomq_crc32c_hw(~(uint32_t)a, p + 3 * third, n - 3 * third);
}
#endif

static void teomq_crc32c_init_factors(void) {
    uint32_t one = 1u << 31, x8 = 1u << 23; /* x^0 and x^8 */
    if (teomq_crc32c_mode == 3) {
        /* x^-1 = (P(x) - 1) / x: in reflected bits, P shifted up one with the x^31 term set */
        const uint32_t xinv = (0x82F63B78u << 1) | 1u;
        for (int k = 0; k < 33; k++) one = teomq_crc32c_mulmod(one, xinv);
        x8 = teomq_crc32c_mulmod(one, x8);
    }
    teomq_crc32c_lo[0] = one;
    for (int i = 1; i < 256; i++) teomq_crc32c_lo[i] = teomq_crc32c_shift(teomq_crc32c_lo[i - 1], x8);
    uint32_t step = teomq_crc32c_shift(teomq_crc32c_lo[255], x8); /* 256 bytes */
    teomq_crc32c_hi[0] = one;
    for (int j = 1; j < 256; j++) teomq_crc32c_hi[j] = teomq_crc32c_shift(teomq_crc32c_hi[j - 1], step);
    teomq_crc32c_big[0] = teomq_crc32c_shift(teomq_crc32c_hi[255], step); /* 65536 bytes */
    for (int k = 1; k < 48; k++)
        teomq_crc32c_big[k] = teomq_crc32c_shift(teomq_crc32c_big[k - 1], teomq_crc32c_big[k - 1]);
    /* Deriving costs two 20-byte CRCs (received and new header) and two multiplies: with
     * pclmulqdq about what reading 64 bytes costs, bit by bit some hundreds of bytes' worth. */
    teomq_crc32c_reframe_min = teomq_crc32c_mode == 3 ? 64 : 512;
}

static void teomq_crc32c_select(void) {
    teomq_crc32c_init_table();
    teomq_crc32c_mode = 1;
#if TEOMQ_CRC32C_HAVE_HW
    __builtin_cpu_init();
    if (__builtin_cpu_supports("sse4.2") && !getenv("TEOMQ_CRC32C_SOFTWARE"))
        teomq_crc32c_mode = __builtin_cpu_supports("pclmul") ? 3 : 2;
#endif
    teomq_crc32c_init_factors();
}

/* x^(8n) mod P as a factor (above): two table entries joined, then one multiply per set bit from 2^16 up. */
static uint32_t teomq_crc32c_shift_factor(uint64_t n) {
    if (teomq_crc32c_mode == 0) teomq_crc32c_select();
    uint32_t f = teomq_crc32c_shift(teomq_crc32c_lo[n & 255], teomq_crc32c_hi[(n >> 8) & 255]);
    n >>= 16;
    for (int k = 0; n; k++, n >>= 1)
        if (n & 1) f = teomq_crc32c_shift(f, teomq_crc32c_big[k]);
    return f;
}

/* Below this the three streams' setup and join cost more than they save. */
#define TEOMQ_CRC32C_3WAY_MIN 128

static inline uint32_t teomq_crc32c_update(uint32_t crc, const char *p, size_t n) {
    if (teomq_crc32c_mode == 0) teomq_crc32c_select();
#if TEOMQ_CRC32C_HAVE_HW
    if (teomq_crc32c_mode == 3 && n >= TEOMQ_CRC32C_3WAY_MIN)
        return teomq_crc32c_hw3(crc, (const unsigned char *)p, n);
    if (teomq_crc32c_mode >= 2) return teomq_crc32c_hw(crc, (const unsigned char *)p, n);
#endif
    return teomq_crc32c_sw(crc, (const unsigned char *)p, n);
}

/* Always the table path; for tests and benchmarks that compare both. */
static inline uint32_t teomq_crc32c_update_sw(uint32_t crc, const char *p, size_t n) {
    if (teomq_crc32c_mode == 0) teomq_crc32c_select();
    return teomq_crc32c_sw(crc, (const unsigned char *)p, n);
}

#endif
