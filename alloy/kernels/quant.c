/* Matmuls on GGUF block-quantized weights (Q8_0, Q4_0, Q4_1, Q4_K) for x86 CPUs.
 *
 * W stays in its GGUF bytes, [n rows][k / block * type_size]: a decode step streams 1.06 (Q8_0)
 * to 0.56 (Q4_0) bytes per weight instead of 4. As in llama.cpp, the fp32 activation is first
 * quantized to int8 per 32-block (scale dx, sum of q), so each block's dot product is an integer
 * one: 32 byte products summed into 8 int32 lanes by one instruction pair (AVX2: vpmaddubsw +
 * vpmaddwd) or one instruction (AVX-512 VNNI: vpdpbusd), then scaled by d_w * d_x in fp32.
 * Built twice by alloy.kernels (ALLOY_VNNI defined or not); Python picks the library the CPU runs.
 * Output rows are split over OpenMP threads (PyTorch's runtime, as in gemv.c); with several
 * activation rows, each weight row is read from memory once and from L1 for the others.
 *
 * Compiled with -ffp-contract=off: the reference quantizer below must round as ggml's C does.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

enum { Q8_0 = 0, Q4_0 = 1, Q4_1 = 2, Q4_K = 3, Q4_0X8 = 4, Q4_KX8 = 5, Q8_0X8 = 6 };
static const long BLOCK_WEIGHTS[] = {32, 32, 32, 256, 32, 256, 32};
static const long BLOCK_BYTES[] = {34, 18, 20, 144, 18, 144, 34};

static inline float fp16(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

/* Sums of u[i] * s[i] over groups of 4 bytes into 8 int32 lanes, u unsigned (<= 128 here) and
 * s signed; the AVX2 form's int16 pairs cannot saturate (2 * 128 * 127 < 32767). */
static inline __m256i dot_us(__m256i u, __m256i s) {
#ifdef ALLOY_VNNI
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

/* Signed x signed: move w's sign onto x (llama.cpp's trick), so |w| is the unsigned side. */
static inline __m256i dot_ss(__m256i w, __m256i x) {
    return dot_us(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
}

/* 16 bytes of nibbles -> 32 bytes: low halves (weights 0-15), then high halves (16-31). */
static inline __m256i nibbles16(const uint8_t *p) {
    const __m128i raw = _mm_loadu_si128((const __m128i *)p);
    const __m256i both = _mm256_set_m128i(_mm_srli_epi16(raw, 4), raw);
    return _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
}

/* The activation, quantized as llama.cpp's Q8_0 (with an fp32 scale): per 32 inputs a scale,
 * 32 int8 and their sum (the sum carries the Q4_0 offset, Q4_1 and Q4_K mins). */
typedef struct {
    float *d;
    int32_t *sum;
    int8_t *q;
} Act;

static void quantize_act(const float *x, long count, Act a) {
    for (long b = 0; b < count / 32; b++) {
        const float *xb = x + 32 * b;
        float amax = 0.0f;
        for (int i = 0; i < 32; i++) amax = fmaxf(amax, fabsf(xb[i]));
        const float d = amax / 127.0f, id = d > 0.0f ? 1.0f / d : 0.0f;
        int32_t sum = 0;
        for (int i = 0; i < 32; i++) {
            const int v = (int)nearbyintf(xb[i] * id);
            a.q[32 * b + i] = (int8_t)v;
            sum += v;
        }
        a.d[b] = d;
        a.sum[b] = sum;
    }
}

/* Software prefetch this far ahead in the weight stream. The blocks' unpacking leaves few loads
 * in the out-of-order window: measured on one core (a 32768 x 768 matrix from DRAM), Q8_0 read
 * 6.2 GB/s and Q4_0 3.1 GB/s without it, 8.3 and 6.3 with it (a plain streaming read: 11). */
#define PREFETCH_BYTES 2048
/* Inline asm: GCC 12 at -O1 and above dropped _mm_prefetch from these loops (checked in the asm). */
static inline void prefetch_ahead(const uint8_t *p) {
    __asm__ volatile("prefetcht0 %0" : : "m"(*(const char *)(p + PREFETCH_BYTES)));
}

static inline __m256i load_act(const Act a, long b) { return _mm256_loadu_si256((const __m256i *)(a.q + 32 * b)); }

/* Dot products of one weight row with R activation rows (R = 1..4, a constant at each call):
 * a block's weights are loaded and unpacked once for all R rows. Q4_1 and Q4_K mins, which do
 * not depend on the nibbles, are summed apart in fp32 through the activation's block sums. */
#define MAX_R 4
#define X8_MAX_R 8  /* the interleaved kernels take up to 8 activation rows per pass */
#define KERNEL static inline __attribute__((always_inline)) void

/* One row (R = 1) is one chain of dependent FMAs: taking blocks in pairs overlaps two chains
 * (R = 4 has four already). */
KERNEL dots_q8_0(const uint8_t *w, const Act *a, long blocks, const int R, float *out) {
    __m256 acc[MAX_R];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    long b = 0;
    if (R == 1) {
        __m256 odd = _mm256_setzero_ps();
        for (; b + 2 <= blocks; b += 2, w += 68) {
            prefetch_ahead(w);
            prefetch_ahead(w + 34);
            const __m256i w0 = _mm256_loadu_si256((const __m256i *)(w + 2));
            const __m256i w1 = _mm256_loadu_si256((const __m256i *)(w + 36));
            const __m256i p0 = dot_us(_mm256_sign_epi8(w0, w0), _mm256_sign_epi8(load_act(a[0], b), w0));
            const __m256i p1 = dot_us(_mm256_sign_epi8(w1, w1), _mm256_sign_epi8(load_act(a[0], b + 1), w1));
            acc[0] = _mm256_fmadd_ps(_mm256_set1_ps(fp16(w) * a[0].d[b]), _mm256_cvtepi32_ps(p0), acc[0]);
            odd = _mm256_fmadd_ps(_mm256_set1_ps(fp16(w + 34) * a[0].d[b + 1]), _mm256_cvtepi32_ps(p1), odd);
        }
        acc[0] = _mm256_add_ps(acc[0], odd);
    }
    for (; b < blocks; b++, w += 34) {
        prefetch_ahead(w);
        const __m256i wq = _mm256_loadu_si256((const __m256i *)(w + 2));
        const __m256i wabs = _mm256_sign_epi8(wq, wq);
        const float d = fp16(w);
        for (int r = 0; r < R; r++) {
            const __m256i p = dot_us(wabs, _mm256_sign_epi8(load_act(a[r], b), wq));
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * a[r].d[b]), _mm256_cvtepi32_ps(p), acc[r]);
        }
    }
    for (int r = 0; r < R; r++) out[r] = hsum(acc[r]);
}

/* Q4_0 (w = d (q - 8)): the nibbles less 8 are signed bytes, so the block is Q8_0's dot. */
static inline __m256i q4_0_dot(const uint8_t *w, __m256i x) {
    const __m256i q = _mm256_sub_epi8(nibbles16(w + 2), _mm256_set1_epi8(8));
    return dot_ss(q, x);
}

KERNEL dots_q4_0(const uint8_t *w, const Act *a, long blocks, const int R, float *out) {
    __m256 acc[MAX_R];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    long b = 0;
    if (R == 1) {
        __m256 odd = _mm256_setzero_ps();
        for (; b + 2 <= blocks; b += 2, w += 36) {
            prefetch_ahead(w);
            prefetch_ahead(w + 18);
            const __m256i p0 = q4_0_dot(w, load_act(a[0], b)), p1 = q4_0_dot(w + 18, load_act(a[0], b + 1));
            acc[0] = _mm256_fmadd_ps(_mm256_set1_ps(fp16(w) * a[0].d[b]), _mm256_cvtepi32_ps(p0), acc[0]);
            odd = _mm256_fmadd_ps(_mm256_set1_ps(fp16(w + 18) * a[0].d[b + 1]), _mm256_cvtepi32_ps(p1), odd);
        }
        acc[0] = _mm256_add_ps(acc[0], odd);
    }
    for (; b < blocks; b++, w += 18) {
        prefetch_ahead(w);
        const __m256i q = _mm256_sub_epi8(nibbles16(w + 2), _mm256_set1_epi8(8));
        const __m256i qabs = _mm256_sign_epi8(q, q);
        const float d = fp16(w);
        for (int r = 0; r < R; r++) {
            const __m256i p = dot_us(qabs, _mm256_sign_epi8(load_act(a[r], b), q));
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * a[r].d[b]), _mm256_cvtepi32_ps(p), acc[r]);
        }
    }
    for (int r = 0; r < R; r++) out[r] = hsum(acc[r]);
}

/* Q4_1 (w = d q + m): nibble dots, plus m dx sum(qx) per block summed apart. */
KERNEL dots_q4_1(const uint8_t *w, const Act *a, long blocks, const int R, float *out) {
    __m256 acc[MAX_R];
    float side[MAX_R];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps(), side[r] = 0.0f;
    for (long b = 0; b < blocks; b++, w += 20) {
        prefetch_ahead(w);
        const __m256i q = nibbles16(w + 4);
        const float d = fp16(w), m = fp16(w + 2);
        for (int r = 0; r < R; r++) {
            const __m256i p = dot_us(q, load_act(a[r], b));
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * a[r].d[b]), _mm256_cvtepi32_ps(p), acc[r]);
            side[r] += m * a[r].d[b] * (float)a[r].sum[b];
        }
    }
    for (int r = 0; r < R; r++) out[r] = hsum(acc[r]) + side[r];
}

static inline void scale_min_k4(int j, const uint8_t *q, int *sc, int *m) {
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

KERNEL dots_q4_k(const uint8_t *w, const Act *a, long blocks, const int R, float *out) {
    __m256 acc[MAX_R];
    float mins[MAX_R];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps(), mins[r] = 0.0f;
    const __m256i low = _mm256_set1_epi8(0x0F);
    for (long s = 0; s < blocks / 8; s++, w += 144) {
        prefetch_ahead(w);
        prefetch_ahead(w + 64);
        prefetch_ahead(w + 128);
        const float d = fp16(w), dmin = fp16(w + 2);
        for (int p = 0; p < 4; p++) {
            const __m256i raw = _mm256_loadu_si256((const __m256i *)(w + 16 + 32 * p));
            const __m256i halves[2] = {_mm256_and_si256(raw, low), _mm256_and_si256(_mm256_srli_epi16(raw, 4), low)};
            for (int h = 0; h < 2; h++) {
                const int j = 2 * p + h;
                const long b = 8 * s + j;
                int sc, m;
                scale_min_k4(j, w + 4, &sc, &m);
                const float dl = d * (float)sc, ml = dmin * (float)m;
                for (int r = 0; r < R; r++) {
                    const __m256i dot = dot_us(halves[h], load_act(a[r], b));
                    acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(dl * a[r].d[b]), _mm256_cvtepi32_ps(dot), acc[r]);
                    mins[r] += ml * a[r].d[b] * (float)a[r].sum[b];
                }
            }
        }
    }
    for (int r = 0; r < R; r++) out[r] = hsum(acc[r]) - mins[r];
}

KERNEL dots(int fmt, const uint8_t *w, const Act *a, long blocks32, const int R, float *out) {
    switch (fmt) {
    case Q8_0: dots_q8_0(w, a, blocks32, R, out); break;
    case Q4_0: dots_q4_0(w, a, blocks32, R, out); break;
    case Q4_1: dots_q4_1(w, a, blocks32, R, out); break;
    default: dots_q4_k(w, a, blocks32, R, out); break;
    }
}

#ifdef ALLOY_VNNI
/* 8 rows' weights of one 32-block (two 64-byte chunks, q4_0x8's order) against 8 activation bytes
 * at a time: the 8 rows' sums of q x in two int32 lanes per row (rows_dot16), or added into one
 * lane per row (rows_dot_x8). */
static inline __m512i rows_dot16(const __m512i q[4], const int8_t *x) {
    __m512i dot = _mm512_setzero_si512();
    for (int j = 0; j < 4; j++) {
        int64_t group;
        memcpy(&group, x + 8 * j, 8);
        dot = _mm512_dpbusd_epi32(dot, q[j], _mm512_set1_epi64(group));
    }
    return dot;  /* lanes 2i and 2i + 1: row i's sums over the first and the last 4 of each 8 weights */
}

static inline __m256i rows_dot_x8(const __m512i q[4], const int8_t *x) {
    const __m512i dot = rows_dot16(q, x);
    /* add each row's pair of lanes, keep each 64-bit lane's low half */
    return _mm512_cvtepi64_epi32(_mm512_add_epi32(dot, _mm512_srli_epi64(dot, 32)));
}

/* Q4_0 and Q8_0 keep each row's two halves (rows_dot16) apart through every block: each half takes
 * half the block's correction and the row's scale (dup_pairs), and the halves are added once per
 * call (pair_sums), where adding them per block and activation row took a shift, an add and a
 * narrowing out of ~11 instructions. */
static inline __m512 dup_pairs(__m256 v) {
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7), _mm512_castps256_ps512(v));
}

static inline __m256 pair_sums(__m512 v) {
    const __m512 both = _mm512_add_ps(v, _mm512_permute_ps(v, 0xB1));  /* lanes 2i and 2i + 1: the pair's sum */
    return _mm512_castps512_ps256(_mm512_permutexvar_ps(
        _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 0, 0, 0, 0, 0, 0, 0, 0), both));
}

static inline void nibbles_x8(const uint8_t *p, __m512i q[4]) {
    const __m512i low = _mm512_set1_epi8(0x0F);
    const __m512i c0 = _mm512_loadu_si512((const void *)p), c1 = _mm512_loadu_si512((const void *)(p + 64));
    q[0] = _mm512_and_si512(c0, low), q[1] = _mm512_and_si512(_mm512_srli_epi16(c0, 4), low);
    q[2] = _mm512_and_si512(c1, low), q[3] = _mm512_and_si512(_mm512_srli_epi16(c1, 4), low);
}

/* Q4_0 with 8 rows interleaved (alloy.kernels.quant.repack_q4_0x8; same bytes in all): per block
 * column, the 8 rows' fp16 scales (16 bytes), then two 64-byte chunks where row r's bytes
 * [8r, 8r + 8) hold its weights 0-7 | 8-15 << 4 (chunk 0) and 16-23 | 24-31 << 4 (chunk 1).
 * One 512-bit vpdpbusd then takes 8 weights of all 8 rows against the same 8 activation bytes
 * (broadcast), and the 8 rows' block sums land in one vector, scaled by one vector of their
 * scales: ~20 instructions per 256 weights, against ~12 per 32 one row at a time. (llama.cpp
 * also repacks Q4_0 and Q4_K into interleaved rows for its x86 GEMV: its "repack" buffers.) */
KERNEL dots_q4_0x8(const uint8_t *w, const Act *a, long blocks, const int R, __m256 *acc) {
    __m512 halves[X8_MAX_R];
    for (int r = 0; r < R; r++) halves[r] = _mm512_setzero_ps();
    for (long b = 0; b < blocks; b++, w += 144) {
        prefetch_ahead(w);
        prefetch_ahead(w + 64);
        prefetch_ahead(w + 128);
        const __m512 dw = dup_pairs(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)w)));
        __m512i q[4];
        nibbles_x8(w + 16, q);
        for (int r = 0; r < R; r++) {
            const __m512i exact = _mm512_sub_epi32(rows_dot16(q, a[r].q + 32 * b), _mm512_set1_epi32(4 * a[r].sum[b]));
            halves[r] = _mm512_fmadd_ps(_mm512_mul_ps(dw, _mm512_set1_ps(a[r].d[b])), _mm512_cvtepi32_ps(exact), halves[r]);
        }
    }
    for (int r = 0; r < R; r++) acc[r] = pair_sums(halves[r]);
}

/* Q8_0 with 8 rows interleaved (repack_q8_0x8; same bytes): per block column the 8 scales, then
 * four 64-byte chunks, chunk j holding row r's weights 8j..8j+7 at bytes [8r, 8r + 8), each stored
 * as w + 128 (unsigned, for vpdpbusd; AVX-512 has no vpsignb for the AVX2 kernel's sign trick):
 * the dot is then sum (w + 128) x - 128 sum x, the activation's block sum known. */
KERNEL dots_q8_0x8(const uint8_t *w, const Act *a, long blocks, const int R, __m256 *acc) {
    __m512 halves[X8_MAX_R];
    for (int r = 0; r < R; r++) halves[r] = _mm512_setzero_ps();
    for (long b = 0; b < blocks; b++, w += 272) {
        for (int line = 0; line < 272; line += 64) prefetch_ahead(w + line);
        const __m512 dw = dup_pairs(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)w)));
        const __m512i q[4] = {_mm512_loadu_si512((const void *)(w + 16)), _mm512_loadu_si512((const void *)(w + 80)),
                              _mm512_loadu_si512((const void *)(w + 144)), _mm512_loadu_si512((const void *)(w + 208))};
        for (int r = 0; r < R; r++) {
            const __m512i exact = _mm512_sub_epi32(rows_dot16(q, a[r].q + 32 * b), _mm512_set1_epi32(64 * a[r].sum[b]));
            halves[r] = _mm512_fmadd_ps(_mm512_mul_ps(dw, _mm512_set1_ps(a[r].d[b])), _mm512_cvtepi32_ps(exact), halves[r]);
        }
    }
    for (int r = 0; r < R; r++) acc[r] = pair_sums(halves[r]);
}

/* The 8 rows' 6-bit scales and mins of one Q4_K sub-block from its 12 bytes (q4_kx8's order:
 * low nibbles of scales, of mins, byte i = row i | row i + 4 << 4; then the high 2 bits, scales in
 * bits 2r, mins in 16 + 2r), one 32-bit lane per row: shared by the GEMV and the dequantizer. */
static inline void q4_kx8_scales(const uint8_t *sj, __m256i *sc, __m256i *m) {
    const __m256i nibble_shift = _mm256_setr_epi32(0, 8, 16, 24, 4, 12, 20, 28);
    const __m256i high_shift = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14), fifteen = _mm256_set1_epi32(15);
    const __m256i three = _mm256_set1_epi32(3), sixteen = _mm256_set1_epi32(16);
    uint32_t sc_low, m_low, high;
    memcpy(&sc_low, sj, 4), memcpy(&m_low, sj + 4, 4), memcpy(&high, sj + 8, 4);
    const __m256i hi = _mm256_set1_epi32((int)high);
    *sc = _mm256_or_si256(
        _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)sc_low), nibble_shift), fifteen),
        _mm256_slli_epi32(_mm256_and_si256(_mm256_srlv_epi32(hi, high_shift), three), 4));
    *m = _mm256_or_si256(
        _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)m_low), nibble_shift), fifteen),
        _mm256_slli_epi32(_mm256_and_si256(_mm256_srlv_epi32(hi, _mm256_add_epi32(high_shift, sixteen)), three), 4));
}

/* Q4_K with 8 rows interleaved (alloy.kernels.quant.repack_q4_kx8; same bytes): per super-block
 * column the 8 rows' d, then dmin (fp16), then per sub-block 12 bytes of the 8 rows' 6-bit scales
 * and mins (low nibbles of scales, of mins: byte i = row i | row i + 4 << 4; then the high 2 bits,
 * scales in bits 2r, mins in 16 + 2r), then per sub-block the nibbles in q4_0x8's order. */
KERNEL dots_q4_kx8(const uint8_t *w, const Act *a, long blocks, const int R, __m256 *acc) {
    __m256 mins[X8_MAX_R];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps(), mins[r] = _mm256_setzero_ps();
    for (long s = 0; s < blocks / 8; s++, w += 1152) {
        prefetch_ahead(w);
        prefetch_ahead(w + 64);
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)w));
        const __m256 dmin = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + 16)));
        for (int j = 0; j < 8; j++) {
            const uint8_t *sj = w + 32 + 12 * j, *qj = w + 128 + 128 * j;
            prefetch_ahead(qj);
            prefetch_ahead(qj + 64);
            __m256i sc, m;
            q4_kx8_scales(sj, &sc, &m);
            const __m256 dsc = _mm256_mul_ps(d, _mm256_cvtepi32_ps(sc)), dm = _mm256_mul_ps(dmin, _mm256_cvtepi32_ps(m));
            __m512i q[4];
            nibbles_x8(qj, q);
            const long b = 8 * s + j;
            for (int r = 0; r < R; r++) {
                const __m256i rows = rows_dot_x8(q, a[r].q + 32 * b);
                acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(dsc, _mm256_set1_ps(a[r].d[b])), _mm256_cvtepi32_ps(rows), acc[r]);
                mins[r] = _mm256_fmadd_ps(dm, _mm256_set1_ps(a[r].d[b] * (float)a[r].sum[b]), mins[r]);
            }
        }
    }
    for (int r = 0; r < R; r++) acc[r] = _mm256_sub_ps(acc[r], mins[r]);
}

KERNEL dots_x8(int fmt, const uint8_t *w, const Act *a, long blocks, const int R, __m256 *acc) {
    if (fmt == Q4_0X8)
        dots_q4_0x8(w, a, blocks, R, acc);
    else if (fmt == Q8_0X8)
        dots_q8_0x8(w, a, blocks, R, acc);
    else
        dots_q4_kx8(w, a, blocks, R, acc);
}

/* The interleaved formats: output rows in groups of 8, each group one stream of blocks. */
static void qgemv_x8(int fmt, const Act act, const uint8_t *w, const float *bias, float *y, long rows, long k,
                     long n, int threads) {
    const long blocks32 = k / 32, group_bytes = 8 * (k / BLOCK_WEIGHTS[fmt]) * BLOCK_BYTES[fmt];
    _Pragma("omp parallel for schedule(static) num_threads(threads)")
    for (long g = 0; g < n / 8; g++) {
        const uint8_t *wg = w + g * group_bytes;
        __m256 acc[X8_MAX_R];
        for (long r0 = 0; r0 < rows;) {
            /* up to 8 activation rows per pass: a group's blocks are unpacked once for all of them */
            const int R = rows - r0 >= 8 ? 8 : rows - r0 >= 4 ? 4 : 1;
            Act ar[X8_MAX_R];
            for (int r = 0; r < R; r++)
                ar[r] = (Act){act.d + (r0 + r) * blocks32, act.sum + (r0 + r) * blocks32, act.q + (r0 + r) * k};
            if (R == 8)
                dots_x8(fmt, wg, ar, blocks32, 8, acc);
            else if (R == 4)
                dots_x8(fmt, wg, ar, blocks32, 4, acc);
            else
                dots_x8(fmt, wg, ar, blocks32, 1, acc);
            for (int r = 0; r < R; r++) {
                __m256 out = acc[r];
                if (bias) out = _mm256_add_ps(out, _mm256_loadu_ps(bias + 8 * g));
                _mm256_storeu_ps(y + (r0 + r) * n + 8 * g, out);
            }
            r0 += R;
        }
    }
}

/* The interleaved layouts back to fp32 rows [n, k], the same floats as GGUF's dequantizers (a
 * multiply, then Q4_K's subtraction: ggml's roundings), for the prefill's GEMM tiles. 16 weights
 * of one row per vector: their bytes gathered from the row's 8-byte slots, widened to int32 and
 * converted (exact), then ggml's one or two roundings. Measured on the AVX-512 Xeon, one thread,
 * 256 x 768 into an L2-resident buffer: 0.085-0.097 ns per weight, where the scalar loop this
 * replaces took 0.32-0.41; the ~98M Llama's 512-token prefill went from 1100 to 1260-1310
 * tokens/s at Q8_0 / Q4_0 / Q4_K (with alloy.quant.linear's larger tiles), fp32 being ~1315. */

/* Row r's 16 weights [16h, 16h + 16) of a q4_0x8-ordered pair of 64-byte chunks, as bytes 0-15:
 * byte 8r + t of chunk h holds weight 16h + t (low nibble) and 16h + 8 + t (high). */
static inline __m128i row_nibbles_x8(const uint8_t *chunks, int r, int h) {
    const __m128i raw = _mm_loadl_epi64((const __m128i *)(chunks + 64 * h + 8 * r));
    return _mm_and_si128(_mm_unpacklo_epi64(raw, _mm_srli_epi16(raw, 4)), _mm_set1_epi8(0x0F));
}

/* The 8 rows' fp16 scales at p, as floats. */
static inline void scales_x8(const uint8_t *p, float *d) {
    _mm256_storeu_ps(d, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)));
}

/* Q8_0: row r's weights 16h.. are its 8-byte slots in chunks 2h and 2h + 1, stored as w + 128. */
static inline void dequant_q8_0x8_column(const uint8_t *p, float *o, long k) {
    float d[8];
    scales_x8(p, d);
    for (int r = 0; r < 8; r++)
        for (int h = 0; h < 2; h++) {
            const __m128i first = _mm_loadl_epi64((const __m128i *)(p + 16 + 128 * h + 8 * r));
            const __m128i both = _mm_castpd_si128(
                _mm_loadh_pd(_mm_castsi128_pd(first), (const double *)(p + 80 + 128 * h + 8 * r)));
            const __m128i q = _mm_xor_si128(both, _mm_set1_epi8((char)0x80));
            _mm512_storeu_ps(o + r * k + 16 * h,
                             _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)), _mm512_set1_ps(d[r])));
        }
}

static inline void dequant_q4_0x8_column(const uint8_t *p, float *o, long k) {
    float d[8];
    scales_x8(p, d);
    for (int r = 0; r < 8; r++)
        for (int h = 0; h < 2; h++) {
            const __m128i q = _mm_sub_epi8(row_nibbles_x8(p + 16, r, h), _mm_set1_epi8(8));
            _mm512_storeu_ps(o + r * k + 16 * h,
                             _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)), _mm512_set1_ps(d[r])));
        }
}

/* Q4_K: per sub-block the 8 rows' d * scale and dmin * min in one vector each (the scales decoded
 * as dots_q4_kx8 decodes them), then each row's d1 q - m1. */
static inline void dequant_q4_kx8_column(const uint8_t *p, float *o, long k) {
    const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
    const __m256 dmin = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 16)));
    for (int j = 0; j < 8; j++) {
        const uint8_t *sj = p + 32 + 12 * j, *qj = p + 128 + 128 * j;
        __m256i sc, m;
        q4_kx8_scales(sj, &sc, &m);
        float d1[8], m1[8];  /* per row: d * scale, dmin * min (ggml's products, rounded once each) */
        _mm256_storeu_ps(d1, _mm256_mul_ps(d, _mm256_cvtepi32_ps(sc)));
        _mm256_storeu_ps(m1, _mm256_mul_ps(dmin, _mm256_cvtepi32_ps(m)));
        for (int r = 0; r < 8; r++)
            for (int h = 0; h < 2; h++) {
                const __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(row_nibbles_x8(qj, r, h)));
                _mm512_storeu_ps(o + r * k + 32 * j + 16 * h,
                                 _mm512_sub_ps(_mm512_mul_ps(q, _mm512_set1_ps(d1[r])), _mm512_set1_ps(m1[r])));
            }
    }
}

static void dequant_x8(int fmt, const uint8_t *w, float *out, long n, long k, int threads) {
    const long columns = k / BLOCK_WEIGHTS[fmt], column_bytes = 8 * BLOCK_BYTES[fmt];
    _Pragma("omp parallel for schedule(static) num_threads(threads)")
    for (long g = 0; g < n / 8; g++) {
        const uint8_t *p = w + g * columns * column_bytes;
        float *o = out + 8 * g * k;
        for (long c = 0; c < columns; c++, p += column_bytes, o += BLOCK_WEIGHTS[fmt]) {
            if (fmt == Q8_0X8)
                dequant_q8_0x8_column(p, o, k);
            else if (fmt == Q4_0X8)
                dequant_q4_0x8_column(p, o, k);
            else
                dequant_q4_kx8_column(p, o, k);
        }
    }
}
#endif

/* y[b, j] = dot(W[j, :], x[b, :]) + bias[j] for fp32 x [rows, k]; k a multiple of the block. */
void alloy_qgemv(int fmt, const float *x, const uint8_t *w, const float *bias, float *y,
                 long rows, long k, long n, int threads) {
    const long blocks32 = k / 32, row_bytes = k / BLOCK_WEIGHTS[fmt] * BLOCK_BYTES[fmt];
    Act act = {malloc(sizeof(float) * rows * blocks32), malloc(sizeof(int32_t) * rows * blocks32),
               malloc((size_t)rows * k)};
    quantize_act(x, rows * k, act);
#ifdef ALLOY_VNNI
    if (fmt == Q4_0X8 || fmt == Q4_KX8 || fmt == Q8_0X8) {
        qgemv_x8(fmt, act, w, bias, y, rows, k, n, threads);
        free(act.d), free(act.sum), free(act.q);
        return;
    }
#endif
    const long rows4 = rows & ~3L;
    _Pragma("omp parallel for schedule(static) num_threads(threads)")
    for (long j = 0; j < n; j++) {
        const uint8_t *wj = w + j * row_bytes;
        const float add = bias ? bias[j] : 0.0f;
        float out[MAX_R];
        for (long r0 = 0; r0 < rows; r0 += (r0 < rows4 ? 4 : 1)) {
            Act ar[MAX_R];
            const int R = r0 < rows4 ? 4 : 1;
            for (int r = 0; r < R; r++)
                ar[r] = (Act){act.d + (r0 + r) * blocks32, act.sum + (r0 + r) * blocks32, act.q + (r0 + r) * k};
            if (R == 4)
                dots(fmt, wj, ar, blocks32, 4, out);
            else
                dots(fmt, wj, ar, blocks32, 1, out);
            for (int r = 0; r < R; r++) y[(r0 + r) * n + j] = out[r] + add;
        }
    }
    free(act.d);
    free(act.sum);
    free(act.q);
}

/* 32 signed bytes q -> o[0..31] = q * d (+ m when with_min: a multiply, then an add, ggml's two
 * roundings; x - m and x + (-m) are the same float, signed zeros included). */
static inline void store_block(float *o, __m256i q, float d, int with_min, float m) {
    const __m256 dv = _mm256_set1_ps(d), mv = _mm256_set1_ps(m);
    const __m128i halves[2] = {_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1)};
    for (int h = 0; h < 2; h++)
        for (int e = 0; e < 2; e++) {
            const __m128i part = e ? _mm_unpackhi_epi64(halves[h], halves[h]) : halves[h];
            const __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(part)), dv);
            _mm256_storeu_ps(o + 16 * h + 8 * e, with_min ? _mm256_add_ps(v, mv) : v);
        }
}

/* W [n, k] back to fp32, the same floats as ggml's dequantize_row_* (prefill: then a GEMM). */
void alloy_qdequant(int fmt, const uint8_t *w, float *out, long n, long k, int threads) {
#ifdef ALLOY_VNNI
    if (fmt == Q4_0X8 || fmt == Q4_KX8 || fmt == Q8_0X8) {
        dequant_x8(fmt, w, out, n, k, threads);
        return;
    }
#endif
    const long per = BLOCK_WEIGHTS[fmt], bytes = BLOCK_BYTES[fmt], blocks = n * (k / per);
    const __m256i low = _mm256_set1_epi8(0x0F);
    _Pragma("omp parallel for schedule(static) num_threads(threads)")
    for (long b = 0; b < blocks; b++) {
        const uint8_t *p = w + b * bytes;
        float *o = out + b * per;
        const float d = fp16(p);
        if (fmt == Q8_0) {
            store_block(o, _mm256_loadu_si256((const __m256i *)(p + 2)), d, 0, 0.0f);
        } else if (fmt == Q4_0) {
            store_block(o, _mm256_sub_epi8(nibbles16(p + 2), _mm256_set1_epi8(8)), d, 0, 0.0f);
        } else if (fmt == Q4_1) {
            store_block(o, nibbles16(p + 4), d, 1, fp16(p + 2));
        } else {
            const float dmin = fp16(p + 2);
            for (int j = 0; j < 8; j++) {
                int sc, m;
                scale_min_k4(j, p + 4, &sc, &m);
                const __m256i raw = _mm256_loadu_si256((const __m256i *)(p + 16 + 32 * (j / 2)));
                const __m256i q = _mm256_and_si256(j % 2 ? _mm256_srli_epi16(raw, 4) : raw, low);
                store_block(o + 32 * j, q, d * (float)sc, 1, -(dmin * (float)m));
            }
        }
    }
}

/* ggml's quantize_row_q4_K_ref and make_qkx2_quants (rmin -1, rdelta 0.1, 20 steps), op for op. */
static inline int nearest_int(float fval) {
    float val = fval + 12582912.f;
    int i;
    memcpy(&i, &val, sizeof(int));
    return (i & 0x007fffff) - 0x00400000;
}

static float make_qkx2_quants(const float *x, const float *weights, uint8_t *L, float *the_min, uint8_t *Laux) {
    const int n = 32, nmax = 15, nstep = 20;
    const float rmin = -1.f, rdelta = 0.1f;
    float min = x[0], max = x[0], sum_w = weights[0], sum_x = sum_w * x[0];
    for (int i = 1; i < n; ++i) {
        if (x[i] < min) min = x[i];
        if (x[i] > max) max = x[i];
        float w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if (min > 0) min = 0;
    if (max == min) {
        for (int i = 0; i < n; ++i) L[i] = 0;
        *the_min = -min;
        return 0.f;
    }
    float iscale = nmax / (max - min), scale = 1 / iscale, best_mad = 0;
    for (int i = 0; i < n; ++i) {
        int l = nearest_int(iscale * (x[i] - min));
        L[i] = l < 0 ? 0 : l > nmax ? nmax : l;
        float diff = scale * L[i] + min - x[i];
        best_mad += weights[i] * (diff * diff);
    }
    for (int is = 0; is <= nstep; ++is) {
        iscale = (rmin + rdelta * is + nmax) / (max - min);
        float sum_l = 0, sum_l2 = 0, sum_xl = 0;
        for (int i = 0; i < n; ++i) {
            int l = nearest_int(iscale * (x[i] - min));
            l = l < 0 ? 0 : l > nmax ? nmax : l;
            Laux[i] = l;
            float w = weights[i];
            sum_l += w * l;
            sum_l2 += w * l * l;
            sum_xl += w * l * x[i];
        }
        float D = sum_w * sum_l2 - sum_l * sum_l;
        if (D > 0) {
            float this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
            float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
            if (this_min > 0) {
                this_min = 0;
                this_scale = sum_xl / sum_l2;
            }
            float mad = 0;
            for (int i = 0; i < n; ++i) {
                float diff = this_scale * Laux[i] + this_min - x[i];
                mad += weights[i] * (diff * diff);
            }
            if (mad < best_mad) {
                memcpy(L, Laux, n);
                best_mad = mad;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    *the_min = -min;
    return scale;
}

void alloy_quantize_q4_k(const float *x, uint8_t *y, long superblocks, int threads) {
    _Pragma("omp parallel for schedule(static) num_threads(threads)")
    for (long i = 0; i < superblocks; i++) {
        const float *xi = x + 256 * i;
        uint8_t *yi = y + 144 * i, *scales = yi + 4, *q = yi + 16;
        uint8_t L[256], Laux[32];
        float weights[32], mins[8], sub_scales[8], max_scale = 0, max_min = 0;
        for (int j = 0; j < 8; ++j) {
            float sum_x2 = 0;
            for (int l = 0; l < 32; ++l) sum_x2 += xi[32 * j + l] * xi[32 * j + l];
            float av_x = sqrtf(sum_x2 / 32);
            for (int l = 0; l < 32; ++l) weights[l] = av_x + fabsf(xi[32 * j + l]);
            sub_scales[j] = make_qkx2_quants(xi + 32 * j, weights, L + 32 * j, &mins[j], Laux);
            if (sub_scales[j] > max_scale) max_scale = sub_scales[j];
            if (mins[j] > max_min) max_min = mins[j];
        }
        float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
        float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
        memset(scales, 0, 12);
        for (int j = 0; j < 8; ++j) {
            uint8_t ls = nearest_int(inv_scale * sub_scales[j]), lm = nearest_int(inv_min * mins[j]);
            ls = ls > 63 ? 63 : ls;
            lm = lm > 63 ? 63 : lm;
            if (j < 4) {
                scales[j] = ls;
                scales[j + 4] = lm;
            } else {
                scales[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
                scales[j - 4] |= ((ls >> 4) << 6);
                scales[j - 0] |= ((lm >> 4) << 6);
            }
        }
        const uint16_t d16 = _cvtss_sh(max_scale / 63.f, _MM_FROUND_TO_NEAREST_INT);
        const uint16_t dmin16 = _cvtss_sh(max_min / 63.f, _MM_FROUND_TO_NEAREST_INT);
        memcpy(yi, &d16, 2);
        memcpy(yi + 2, &dmin16, 2);
        for (int j = 0; j < 8; ++j) {
            int sc, m;
            scale_min_k4(j, scales, &sc, &m);
            const float d = _cvtsh_ss(d16) * sc;
            if (!d) continue;
            const float dm = _cvtsh_ss(dmin16) * m;
            for (int ii = 0; ii < 32; ++ii) {
                int l = nearest_int((xi[32 * j + ii] + dm) / d);
                L[32 * j + ii] = l < 0 ? 0 : l > 15 ? 15 : l;
            }
        }
        for (int j = 0; j < 256; j += 64, q += 32)
            for (int l = 0; l < 32; ++l) q[l] = L[j + l] | (L[j + l + 32] << 4);
    }
}
