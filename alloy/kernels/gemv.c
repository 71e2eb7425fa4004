/* Decode GEMV for x86 CPUs with AVX2 + FMA, and AVX-512 where built with it (alloy.kernels.VARIANTS):
 * y[b, n] = scale[n] * dot(W[n, :], x[b, :]) + bias[n].
 *
 * Decoding streams every weight once per token, so the speed is the memory read rate. MKL's
 * sgemv reads ~11 GB/s here where a plain two-thread AVX2 loop reads ~23 GB/s, and PyTorch
 * has no bf16 -> fp32 weight kernel on AVX2 at all. W stays [out, in] row-major (the
 * checkpoint's layout) in fp32, bf16 (widened to fp32 in registers: a 16-bit shift) or int8
 * (one fp32 scale per row); x and y are fp32. Rows are split over OpenMP threads; the OpenMP
 * runtime is the one PyTorch already loaded (same soname), so no second thread pool spins.
 *
 * bf16 means bf16 operands: x is rounded to bf16 (to nearest, ties to even) as it enters a bf16
 * GEMV, on every path, as llama.cpp's BF16 and PyTorch's bf16 linear take it. The product of two
 * bf16 is exact in fp32 and the sums are fp32, so every variant computes the same products; where
 * the CPU has AVX512_BF16, `vdpbf16ps` takes 32 of them an instruction (half the instructions of
 * widening the weights and FMA-ing in fp32, which set the pace from a few rows up).
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

#include "simd.h"

static inline __m256 load_f32(const float *p) { return _mm256_loadu_ps(p); }
static inline __m256 load_bf16(const uint16_t *p) {
    __m128i v = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}
static inline __m256 load_i8(const int8_t *p) {
    __m128i v = _mm_loadl_epi64((const __m128i *)p);
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
}
static inline float scalar_f32(const float *p) { return *p; }
static inline float scalar_bf16(const uint16_t *p) {
    union { uint32_t u; float f; } v = {.u = (uint32_t)(*p) << 16};
    return v.f;
}
static inline float scalar_i8(const int8_t *p) { return (float)(*p); }

/* fp32 bits rounded to the nearest bf16 (ties to even), low 16 bits cleared; NaN stays NaN. */
static inline __m256i round_bf16_bits(__m256i u) {
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_and_si256(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), odd)),
                                       _mm256_set1_epi32((int)0xFFFF0000u));
    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7FFFFFFF)), _mm256_set1_epi32(0x7F800000));
    return _mm256_blendv_epi8(r, _mm256_or_si256(u, _mm256_set1_epi32(0x400000)), nan);
}
static inline uint32_t round_bf16_scalar(float f) {
    union { float f; uint32_t u; } v = {.f = f};
    if ((v.u & 0x7FFFFFFFu) > 0x7F800000u) return v.u | 0x400000u;
    return (v.u + 0x7FFFu + ((v.u >> 16) & 1u)) & 0xFFFF0000u;
}

/* x [n] rounded to bf16, as fp32 bits (the paths that multiply in fp32) */
static __attribute__((unused)) float *bf16_rounded(const float *x, long n) {
    float *out = malloc(sizeof(float) * (n > 0 ? n : 1));
    long i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_si256((__m256i *)(out + i), round_bf16_bits(_mm256_loadu_si256((const __m256i *)(x + i))));
    for (; i < n; i++) {
        union { uint32_t u; float f; } v = {.u = round_bf16_scalar(x[i])};
        out[i] = v.f;
    }
    return out;
}

/* One kernel body per weight type. Each thread streams whole weight rows, one after another:
 * measured here, that reads 1.1x (fp32) to 2x (int8) faster than interleaving 4-8 rows, which
 * splits each core's reads over many short streams. Batch 1 keeps 4 accumulators along a row
 * (4 FMA chains hide the FMA latency). Larger batches take a tile of 2 weight rows x up to 4
 * activation rows: 8 independent FMA chains, what two FMA ports of 4-cycle latency need (one row
 * x 4, the tile before, left half of them idle), and each weight comes from memory once and from
 * L1 for the other activation rows. `dots` is always inlined with constant J and C, and its
 * closing loops are unrolled, so the accumulators live in registers (a loop indexing acc at run
 * time makes GCC keep the array on the stack and store it on every step). */
#define DEFINE_GEMV(NAME, T, LOAD, SCALAR)                                                       \
static inline __attribute__((always_inline)) void NAME##_dots(                                  \
        const float *x, const T *w, const float *scale, const float *bias, float *y,             \
        long k, long n, long j, long b0, const int J, const int C) {                              \
    const float *xb = x + b0 * k;                                                                 \
    __m256 acc[2][4];                                                                             \
    for (int r = 0; r < J; r++)                                                                   \
        for (int c = 0; c < 4; c++) acc[r][c] = _mm256_setzero_ps();                              \
    long i = 0;                                                                                   \
    if (C == 1 && J == 1) {                                                                       \
        const T *row = w + j * k;                                                                 \
        for (; i + 32 <= k; i += 32)                                                              \
            for (int u = 0; u < 4; u++)                                                           \
                acc[0][u] = _mm256_fmadd_ps(LOAD(row + i + 8 * u), _mm256_loadu_ps(xb + i + 8 * u), acc[0][u]); \
        for (; i + 8 <= k; i += 8)                                                                \
            acc[0][0] = _mm256_fmadd_ps(LOAD(row + i), _mm256_loadu_ps(xb + i), acc[0][0]);       \
        acc[0][0] = _mm256_add_ps(_mm256_add_ps(acc[0][0], acc[0][1]), _mm256_add_ps(acc[0][2], acc[0][3])); \
    } else {                                                                                      \
        for (; i + 8 <= k; i += 8) {                                                              \
            __m256 wv[2];                                                                         \
            for (int r = 0; r < J; r++) wv[r] = LOAD(w + (j + r) * k + i);                        \
            for (int c = 0; c < C; c++) {                                                         \
                const __m256 xv = _mm256_loadu_ps(xb + c * k + i);                                \
                for (int r = 0; r < J; r++) acc[r][c] = _mm256_fmadd_ps(wv[r], xv, acc[r][c]);    \
            }                                                                                     \
        }                                                                                         \
    }                                                                                             \
    _Pragma("GCC unroll 2")                                                                       \
    for (int r = 0; r < J; r++)                                                                   \
        _Pragma("GCC unroll 4")                                                                   \
        for (int c = 0; c < C; c++) {                                                             \
            const T *row = w + (j + r) * k;                                                       \
            float s = hsum(acc[r][c]);                                                            \
            for (long t = i; t < k; t++) s += SCALAR(row + t) * xb[c * k + t];                    \
            if (scale) s *= scale[j + r];                                                         \
            if (bias) s += bias[j + r];                                                           \
            y[(b0 + c) * n + j + r] = s;                                                          \
        }                                                                                         \
}                                                                                                 \
                                                                                                  \
static __attribute__((unused)) void NAME##_avx2(const float *x, const T *w, const float *scale, const float *bias, float *y, \
          long rows, long k, long n, int threads) {                                               \
    if (rows == 1) {                                                                              \
        _Pragma("omp parallel for schedule(static) num_threads(threads)")                         \
        for (long j = 0; j < n; j++) NAME##_dots(x, w, scale, bias, y, k, n, j, 0, 1, 1);         \
        return;                                                                                   \
    }                                                                                             \
    _Pragma("omp parallel for schedule(static) num_threads(threads)")                             \
    for (long j = 0; j < n; j += 2) {                                                             \
        const int two = j + 1 < n;                                                                \
        for (long b0 = 0; b0 < rows; b0 += 4) {                                                   \
            /* constant J and C in every call, so the tile's accumulators stay in registers */    \
            switch ((rows - b0 >= 4 ? 4 : (int)(rows - b0)) * 2 + two) {                          \
            case 2: NAME##_dots(x, w, scale, bias, y, k, n, j, b0, 1, 1); break;                  \
            case 3: NAME##_dots(x, w, scale, bias, y, k, n, j, b0, 2, 1); break;                  \
            case 4: NAME##_dots(x, w, scale, bias, y, k, n, j, b0, 1, 2); break;                  \
            case 5: NAME##_dots(x, w, scale, bias, y, k, n, j, b0, 2, 2); break;                  \
            case 6: NAME##_dots(x, w, scale, bias, y, k, n, j, b0, 1, 3); break;                  \
            case 7: NAME##_dots(x, w, scale, bias, y, k, n, j, b0, 2, 3); break;                  \
            case 8: NAME##_dots(x, w, scale, bias, y, k, n, j, b0, 1, 4); break;                  \
            default: NAME##_dots(x, w, scale, bias, y, k, n, j, b0, 2, 4); break;                 \
            }                                                                                     \
        }                                                                                         \
    }                                                                                             \
}

DEFINE_GEMV(alloy_gemv_f32, float, load_f32, scalar_f32)
DEFINE_GEMV(alloy_gemv_bf16, uint16_t, load_bf16, scalar_bf16)
DEFINE_GEMV(alloy_gemv_i8, int8_t, load_i8, scalar_i8)

#ifdef __AVX512F__
/* AVX-512 (built into the fused decode step's AVX-512 variant): 16 lanes, and for several
 * activation rows a tile of 2 weight rows x up to 8 activation rows, 16 independent FMA chains.
 * With AVX2's one weight row x 4 activation rows, 4 chains of 8 lanes left batch 8 bound by FMA
 * latency: a batch-8 fp32 step took twice the batch-1 step, where the weights stream once for
 * both. Tails (k not a multiple of 16) are masked loads: the same products, no scalar loop. */
static inline __m512 load16_f32(const float *p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
static inline __m512 load16_bf16(const uint16_t *p, __mmask16 m) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
static inline __m512 load16_i8(const int8_t *p, __mmask16 m) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, p)));
}

/* bf16 weights at batch > 1, where the FMAs set the pace: widening 16 weights (a zero-extension
 * and a shift) took an FMA-port slot per 8 FMAs. Instead 32 weights come in one load and split as
 * they lie: the low halves of the 32-bit lanes (the even weights) shifted up, the high halves (the
 * odd ones) already fp32 once the low half is cleared; the activations are rearranged to match,
 * once per call (pair_activations): per 32 inputs, the 16 even ones, then the 16 odd ones. The
 * same products, summed in another order. */
static inline void bf16_pairs(__m512i v, __m512 *even, __m512 *odd) {
    *even = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
    *odd = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32((int)0xFFFF0000u)));
}

static float *pair_activations(const float *x, long rows, long k) {
    float *xp = malloc(sizeof(float) * rows * k);
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    for (long r = 0; r < rows; r++) {
        const float *a = x + r * k;
        float *b = xp + r * k;
        long i = 0;
        for (; i + 32 <= k; i += 32) {
            const __m512 lo = _mm512_loadu_ps(a + i), hi = _mm512_loadu_ps(a + i + 16);
            _mm512_storeu_ps(b + i, _mm512_permutex2var_ps(lo, even, hi));
            _mm512_storeu_ps(b + i + 16, _mm512_permutex2var_ps(lo, odd, hi));
        }
        for (; i < k; i++) b[i] = a[i];  /* the tail goes the 16-lane way, in order */
    }
    return xp;
}

/* The AVX-512 entry for one weight type: batch 1 one weight row after another (NAME##_row), else
 * tiles of 2 weight rows x up to 8 activation rows (NAME##_tile); PREP lays the activations out
 * once per call as the tiles read them. */
#define DEFINE_DRIVER512(NAME, T, PREP)                                                          \
static __attribute__((unused)) void NAME##_avx512(const float *x, const T *w, const float *scale, const float *bias, float *y, \
                          long rows, long k, long n, int threads) {                               \
    void *xp = PREP;  /* the call's activations as the tiles read them (NULL: x as it is) */      \
    if (rows == 1) {                                                                              \
        _Pragma("omp parallel for schedule(static) num_threads(threads)")                         \
        for (long j = 0; j < n; j++) NAME##_row(x, xp, w, scale, bias, y, k, j, j + 2 < n);      \
        free(xp);                                                                                 \
        return;                                                                                   \
    }                                                                                             \
    _Pragma("omp parallel for schedule(static) num_threads(threads)")                             \
    for (long j = 0; j < n; j += 2) {                                                             \
        const int two = j + 1 < n;                                                                \
        for (long b0 = 0; b0 < rows; b0 += 8) {                                                   \
            /* constant J and C in every call, so the tile's accumulators stay in registers */    \
            switch ((rows - b0 >= 8 ? 8 : (int)(rows - b0)) * 2 + two) {                          \
            case 2: NAME##_tile(x, xp, w, scale, bias, y, k, n, j, b0, 1, 1); break;                  \
            case 3: NAME##_tile(x, xp, w, scale, bias, y, k, n, j, b0, 2, 1); break;                  \
            case 4: NAME##_tile(x, xp, w, scale, bias, y, k, n, j, b0, 1, 2); break;                  \
            case 5: NAME##_tile(x, xp, w, scale, bias, y, k, n, j, b0, 2, 2); break;                  \
            case 6: NAME##_tile(x, xp, w, scale, bias, y, k, n, j, b0, 1, 3); break;                  \
            case 7: NAME##_tile(x, xp, w, scale, bias, y, k, n, j, b0, 2, 3); break;                  \
            case 8: NAME##_tile(x, xp, w, scale, bias, y, k, n, j, b0, 1, 4); break;                  \
            case 9: NAME##_tile(x, xp, w, scale, bias, y, k, n, j, b0, 2, 4); break;                  \
            case 10: NAME##_tile(x, xp, w, scale, bias, y, k, n, j, b0, 1, 5); break;                 \
            case 11: NAME##_tile(x, xp, w, scale, bias, y, k, n, j, b0, 2, 5); break;                 \
            case 12: NAME##_tile(x, xp, w, scale, bias, y, k, n, j, b0, 1, 6); break;                 \
            case 13: NAME##_tile(x, xp, w, scale, bias, y, k, n, j, b0, 2, 6); break;                 \
            case 14: NAME##_tile(x, xp, w, scale, bias, y, k, n, j, b0, 1, 7); break;                 \
            case 15: NAME##_tile(x, xp, w, scale, bias, y, k, n, j, b0, 2, 7); break;                 \
            case 16: NAME##_tile(x, xp, w, scale, bias, y, k, n, j, b0, 1, 8); break;                 \
            default: NAME##_tile(x, xp, w, scale, bias, y, k, n, j, b0, 2, 8); break;                 \
            }                                                                                     \
        }                                                                                         \
    }                                                                                             \
    free(xp);                                                                                     \
}

#define DEFINE_GEMV512(NAME, T, LOAD, PAIRS)                                                     \
static inline __attribute__((always_inline)) void NAME##_tile(                                  \
        const float *x, const void *xp_, const T *w, const float *scale, const float *bias, float *y, \
        long k, long n, long j, long b0, const int J, const int C) {                              \
    const float *xp = xp_;                                                                        \
    __m512 acc[2][8];                                                                             \
    for (int r = 0; r < J; r++)                                                                   \
        for (int c = 0; c < C; c++) acc[r][c] = _mm512_setzero_ps();                              \
    long i0 = 0;                                                                                  \
    if (PAIRS) /* bf16: 32 weights a load, split into even and odd lanes (bf16_pairs) */          \
        for (; i0 + 32 <= k; i0 += 32) {                                                          \
            __m512 we[2], wo[2];                                                                  \
            for (int r = 0; r < J; r++)                                                           \
                bf16_pairs(_mm512_loadu_si512((const void *)(w + (j + r) * k + i0)), &we[r], &wo[r]); \
            if (j + 2 + J <= n)                                                                   \
                for (int r = 0; r < J; r++) _mm_prefetch((const char *)(w + (j + 2 + r) * k + i0), _MM_HINT_T1); \
            for (int c = 0; c < C; c++) {                                                         \
                const __m512 xe = _mm512_loadu_ps(xp + (b0 + c) * k + i0), xo = _mm512_loadu_ps(xp + (b0 + c) * k + i0 + 16); \
                for (int r = 0; r < J; r++)                                                       \
                    acc[r][c] = _mm512_fmadd_ps(wo[r], xo, _mm512_fmadd_ps(we[r], xe, acc[r][c])); \
            }                                                                                     \
        }                                                                                         \
    for (long i = i0; i < k; i += 16) {                                                           \
        const __mmask16 m = k - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (k - i)) - 1);   \
        __m512 wv[2];                                                                             \
        for (int r = 0; r < J; r++) wv[r] = LOAD(w + (j + r) * k + i, m);                         \
        if (j + 2 + J <= n)  /* the next pair's lines: DRAM's latency hides behind this pair's FMAs */ \
            for (int r = 0; r < J; r++) _mm_prefetch((const char *)(w + (j + 2 + r) * k + i), _MM_HINT_T1); \
        for (int c = 0; c < C; c++) {                                                             \
            const __m512 xv = _mm512_maskz_loadu_ps(m, x + (b0 + c) * k + i);                     \
            for (int r = 0; r < J; r++) acc[r][c] = _mm512_fmadd_ps(wv[r], xv, acc[r][c]);        \
        }                                                                                         \
    }                                                                                             \
    /* unrolled by hand's worth: a rolled loop here indexes acc at run time, and GCC then keeps the \
     * whole array in memory, storing all 16 accumulators on every step of the loop above (batch-8 \
     * fp32 tiles ran at 110 GFLOP/s on two cores; unrolled, 150) */                              \
    _Pragma("GCC unroll 2")                                                                       \
    for (int r = 0; r < J; r++)                                                                   \
        _Pragma("GCC unroll 8")                                                                   \
        for (int c = 0; c < C; c++) {                                                             \
            float s = _mm512_reduce_add_ps(acc[r][c]);                                            \
            if (scale) s *= scale[j + r];                                                         \
            if (bias) s += bias[j + r];                                                           \
            y[(b0 + c) * n + j + r] = s;                                                          \
        }                                                                                         \
}                                                                                                 \
                                                                                                  \
/* Batch 1: one weight row at a time (whole rows stream fastest, gemv.c's note), 4 chains along it. \
 * bf16 rows split into even and odd lanes as the tile does (bf16_pairs): widening 16 weights at a \
 * time with a zero-extending shuffle read a row at 25 GB/s on an AMD EPYC (Zen 4), where the AVX2 \
 * build's 8-wide widening read 37. */                                                            \
static inline __attribute__((always_inline)) void NAME##_row(                                   \
        const float *x, const void *xp_, const T *w, const float *scale, const float *bias, float *y, long k, long j, \
        const int PF) {                                                                           \
    const float *xp = xp_;                                                                        \
    const T *row = w + j * k;                                                                     \
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()}; \
    long i = 0;                                                                                   \
    for (; i + 64 <= k; i += 64) {                                                                \
        if (PF)                                                                                   \
            for (int u = 0; u < 64 * (int)sizeof(T); u += 64) _mm_prefetch((const char *)(row + 2 * k + i) + u, _MM_HINT_T0); \
        if (PAIRS)                                                                                \
            for (int h = 0; h < 2; h++) {                                                         \
                __m512 we, wo;                                                                    \
                bf16_pairs(_mm512_loadu_si512((const void *)(row + i + 32 * h)), &we, &wo);       \
                acc[2 * h] = _mm512_fmadd_ps(we, _mm512_loadu_ps(xp + i + 32 * h), acc[2 * h]);   \
                acc[2 * h + 1] = _mm512_fmadd_ps(wo, _mm512_loadu_ps(xp + i + 32 * h + 16), acc[2 * h + 1]); \
            }                                                                                     \
        else                                                                                      \
            for (int u = 0; u < 4; u++)                                                           \
                acc[u] = _mm512_fmadd_ps(LOAD(row + i + 16 * u, 0xFFFF), _mm512_loadu_ps(x + i + 16 * u), acc[u]); \
    }                                                                                             \
    if (PAIRS)                                                                                    \
        for (; i + 32 <= k; i += 32) {                                                            \
            __m512 we, wo;                                                                        \
            bf16_pairs(_mm512_loadu_si512((const void *)(row + i)), &we, &wo);                   \
            acc[0] = _mm512_fmadd_ps(we, _mm512_loadu_ps(xp + i), acc[0]);                        \
            acc[1] = _mm512_fmadd_ps(wo, _mm512_loadu_ps(xp + i + 16), acc[1]);                   \
        }                                                                                         \
    for (; i < k; i += 16) { /* past the last 32: x in its own order (pair_activations' tail too) */ \
        const __mmask16 m = k - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (k - i)) - 1);   \
        acc[0] = _mm512_fmadd_ps(LOAD(row + i, m), _mm512_maskz_loadu_ps(m, x + i), acc[0]);     \
    }                                                                                             \
    float s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]))); \
    if (scale) s *= scale[j];                                                                     \
    if (bias) s += bias[j];                                                                       \
    y[j] = s;                                                                                     \
}                                                                                                 \
                                                                                                  \
DEFINE_DRIVER512(NAME, T, PAIRS ? pair_activations(x, rows, k) : NULL)

DEFINE_GEMV512(alloy_gemv_f32, float, load16_f32, 0)
DEFINE_GEMV512(alloy_gemv_bf16, uint16_t, load16_bf16, 1)
DEFINE_GEMV512(alloy_gemv_i8, int8_t, load16_i8, 0)

#ifdef __AVX512BF16__
/* bf16 on AVX512_BF16: the activation rounded to bf16 once per call (bf16_activations), then each
 * `vdpbf16ps` adds 16 pairs of products to 16 fp32 sums: 32 weights as they lie in memory, no
 * widening, no rearranging. Tails are masked loads (zeros add nothing). */
static uint16_t *bf16_activations(const float *x, long n) {
    uint16_t *out = malloc(sizeof(uint16_t) * (n > 0 ? n : 1));
    long i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(out + i),
                         _mm256_cvtepi32_epi16(_mm256_srli_epi32(round_bf16_bits(_mm256_loadu_si256((const __m256i *)(x + i))), 16)));
    for (; i < n; i++) out[i] = (uint16_t)(round_bf16_scalar(x[i]) >> 16);
    return out;
}

static inline __m512bh load32_bf16(const uint16_t *p, __mmask32 m) { return (__m512bh)_mm512_maskz_loadu_epi16(m, p); }
static inline __mmask32 mask32(long left) { return left >= 32 ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1u << left) - 1); }

static inline __attribute__((always_inline)) void alloy_gemv_bf16dp_tile(
        const float *x, const void *xp, const uint16_t *w, const float *scale, const float *bias, float *y,
        long k, long n, long j, long b0, const int J, const int C) {
    (void)x;
    const uint16_t *xb = xp;
    __m512 acc[2][8];
    for (int r = 0; r < J; r++)
        for (int c = 0; c < C; c++) acc[r][c] = _mm512_setzero_ps();
    for (long i = 0; i < k; i += 32) {
        const __mmask32 m = mask32(k - i);
        __m512bh wv[2];
        for (int r = 0; r < J; r++) wv[r] = load32_bf16(w + (j + r) * k + i, m);
        if (j + 2 + J <= n)  /* the next pair's lines, as the fp32 tile does */
            for (int r = 0; r < J; r++) _mm_prefetch((const char *)(w + (j + 2 + r) * k + i), _MM_HINT_T1);
        for (int c = 0; c < C; c++) {
            const __m512bh xv = load32_bf16(xb + (b0 + c) * k + i, m);
            for (int r = 0; r < J; r++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], wv[r], xv);
        }
    }
    _Pragma("GCC unroll 2")
    for (int r = 0; r < J; r++)
        _Pragma("GCC unroll 8")
        for (int c = 0; c < C; c++) {
            float s = _mm512_reduce_add_ps(acc[r][c]);
            if (scale) s *= scale[j + r];
            if (bias) s += bias[j + r];
            y[(b0 + c) * n + j + r] = s;
        }
}

static inline __attribute__((always_inline)) void alloy_gemv_bf16dp_row(
        const float *x, const void *xp, const uint16_t *w, const float *scale, const float *bias, float *y, long k,
        long j, const int PF) {
    (void)x;
    const uint16_t *xb = xp, *row = w + j * k;
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    long i = 0;
    for (; i + 128 <= k; i += 128) {
        if (PF)
            for (int u = 0; u < 256; u += 64) _mm_prefetch((const char *)(row + 2 * k + i) + u, _MM_HINT_T0);
        for (int u = 0; u < 4; u++)
            acc[u] = _mm512_dpbf16_ps(acc[u], load32_bf16(row + i + 32 * u, 0xFFFFFFFFu), load32_bf16(xb + i + 32 * u, 0xFFFFFFFFu));
    }
    for (; i < k; i += 32)
        acc[0] = _mm512_dpbf16_ps(acc[0], load32_bf16(row + i, mask32(k - i)), load32_bf16(xb + i, mask32(k - i)));
    float s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
    if (scale) s *= scale[j];
    if (bias) s += bias[j];
    y[j] = s;
}

DEFINE_DRIVER512(alloy_gemv_bf16dp, uint16_t, bf16_activations(x, rows * k))
#endif
#define GEMV_ISA(NAME) NAME##_avx512
#else
#define GEMV_ISA(NAME) NAME##_avx2
#endif

/* The entry points: the widest variant this build's flags allow. */
void alloy_gemv_f32(const float *x, const float *w, const float *scale, const float *bias, float *y, long rows,
                    long k, long n, int threads) {
    GEMV_ISA(alloy_gemv_f32)(x, w, scale, bias, y, rows, k, n, threads);
}
void alloy_gemv_bf16(const float *x, const uint16_t *w, const float *scale, const float *bias, float *y,
                     long rows, long k, long n, int threads) {
#ifdef __AVX512BF16__
    alloy_gemv_bf16dp_avx512(x, w, scale, bias, y, rows, k, n, threads);
#else
    float *xr = bf16_rounded(x, rows * k);  /* bf16 operands, multiplied in fp32 */
    GEMV_ISA(alloy_gemv_bf16)(xr, w, scale, bias, y, rows, k, n, threads);
    free(xr);
#endif
}
void alloy_gemv_i8(const float *x, const int8_t *w, const float *scale, const float *bias, float *y, long rows,
                   long k, long n, int threads) {
    GEMV_ISA(alloy_gemv_i8)(x, w, scale, bias, y, rows, k, n, threads);
}

/* Sum of n floats: a pure streaming read, the rate a decode step's GEMVs can at best approach.
 * alloy.devices measures the CPU's memory bandwidth with it (PyTorch's own reductions read slower). */
float alloy_stream_read(const float *x, long n, int threads) {
    float total = 0.0f;
    const long n32 = n & ~31L;
    _Pragma("omp parallel num_threads(threads) reduction(+:total)")
    {
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(),
               a3 = _mm256_setzero_ps();
        _Pragma("omp for schedule(static)")
        for (long i = 0; i < n32; i += 32) {
            a0 = _mm256_add_ps(a0, _mm256_loadu_ps(x + i));
            a1 = _mm256_add_ps(a1, _mm256_loadu_ps(x + i + 8));
            a2 = _mm256_add_ps(a2, _mm256_loadu_ps(x + i + 16));
            a3 = _mm256_add_ps(a3, _mm256_loadu_ps(x + i + 24));
        }
        total += hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    }
    for (long i = n32; i < n; i++) total += x[i];
    return total;
}

/* RMSNorm of `rows` rows of n floats: y = x / sqrt(mean(x^2) + eps) * w. A decode step runs two
 * per layer on one row, where PyTorch's norm costs ~10 small ops (tens of microseconds) for a
 * microsecond of arithmetic. */
void alloy_rms_norm(const float *x, const float *w, float *y, long rows, long n, float eps) {
    for (long r = 0; r < rows; r++) {
        const float *xr = x + r * n;
        float *yr = y + r * n;
        __m256 acc = _mm256_setzero_ps();
        long i = 0;
        for (; i + 8 <= n; i += 8) {
            const __m256 v = _mm256_loadu_ps(xr + i);
            acc = _mm256_fmadd_ps(v, v, acc);
        }
        float ss = hsum(acc);
        for (long t = i; t < n; t++) ss += xr[t] * xr[t];
        const float inv = 1.0f / __builtin_sqrtf(ss / (float)n + eps);
        const __m256 iv = _mm256_set1_ps(inv);
        for (i = 0; i + 8 <= n; i += 8)
            _mm256_storeu_ps(yr + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(xr + i), iv), _mm256_loadu_ps(w + i)));
        for (long t = i; t < n; t++) yr[t] = xr[t] * inv * w[t];
    }
}
