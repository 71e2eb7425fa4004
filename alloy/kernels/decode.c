/* One decode step of a whole pre-norm transformer in one call: every layer's norms, projections,
 * RoPE, KV-cache write, attention, MLP and residuals, then the final norm and the head.
 *
 * Why: once the GEMVs stream at memory speed (gemv.c, quant.c), what is left of a decode step is
 * ~30 small PyTorch ops per layer, each a few microseconds of dispatch for a microsecond of
 * arithmetic: measured on the 98M Llama in Q4_0 (12 layers), half the step. Here they are loops
 * over a few thousand floats between the GEMVs. The weights stay where alloy.infer.optimize put
 * them (DecodeLinear: fp32 / bf16 / int8 rows; QuantLinear: GGUF blocks), the KV cache is the
 * model's own (prefill writes it with PyTorch, decode here), so the two paths interleave freely.
 *
 * Rows: `rows` sequences, each at its own position (generation: all the same; serving's slot
 * cache: wherever each request is), each with its own cache row. Built per instruction set with
 * quant.c's flags (alloy.kernels.quant).
 */
#include <math.h>
#include <stdlib.h>

#include "gemv.c"
#include "quant.c"

enum { LIN_F32 = 100, LIN_BF16 = 101, LIN_I8 = 102 };  /* below 100: a GGUF format id (quant.c) */
enum { ACT_SILU = 0, ACT_GELU_TANH = 1, ACT_GELU = 2, ACT_RELU = 3 };

typedef struct {
    const void *w;        /* [n, k]: fp32, bf16, int8 or GGUF blocks */
    const float *scale;   /* int8: one per output row */
    const float *bias;    /* [n] or NULL */
    long k, n;
    int kind;
} Lin;

typedef struct {
    Lin qkv, o, up, down;  /* up: [gate; up] when gated */
    /* input norms (NULL: none, OLMo 2), output norms (Gemma's sandwich, OLMo 2), q/k norms; NULL: none */
    const float *attn_norm, *mlp_norm, *attn_post_norm, *mlp_post_norm, *q_norm, *k_norm;
    void *k_cache, *v_cache;   /* [rows, kv_heads, max_len, head_dim]: fp32, or bf16 (Model.kv_bf16) */
    long window;               /* 0: every earlier slot */
    int rope_row;              /* which of the step's cos/sin tables */
} Layer;

typedef struct {
    long rows, hidden, heads, kv_heads, head_dim, rope_dim, ffn, max_len;
    float eps, softmax_scale;
    int gated, act, qk_norm_per_head, n_layers, n_tables;  /* n_tables: RoPE tables per row */
    int kv_bf16;               /* the KV cache holds bf16 (AVX-512 builds only) */
    const Layer *layers;
    const float *final_norm;  /* NULL: none */
    Lin head;                 /* head.w NULL: no head (x is left normed in `out`) */
} Model;

static void linear(const Lin *l, const float *x, float *y, long rows, int threads) {
    switch (l->kind) {
    case LIN_F32: alloy_gemv_f32(x, l->w, l->scale, l->bias, y, rows, l->k, l->n, threads); break;
    case LIN_BF16: alloy_gemv_bf16(x, l->w, l->scale, l->bias, y, rows, l->k, l->n, threads); break;
    case LIN_I8: alloy_gemv_i8(x, l->w, l->scale, l->bias, y, rows, l->k, l->n, threads); break;
    default: alloy_qgemv(l->kind, x, l->w, l->bias, y, rows, l->k, l->n, threads); break;
    }
}

/* The leading rope_dim features of each of `heads` heads, rotated in place (half-split layout):
 * the products then the sum, as PyTorch's x * cos + rotate_half(x) * sin rounds them. */
static void rope(float *x, long heads, long head_dim, long rope_dim, const float *cos, const float *sin) {
    const long half = rope_dim / 2;
    for (long h = 0; h < heads; h++) {
        float *v = x + h * head_dim;
        for (long i = 0; i < half; i++) {
            const float a = v[i], b = v[i + half];
            v[i] = a * cos[i] + (-b) * sin[i];
            v[i + half] = b * cos[i + half] + a * sin[i + half];
        }
    }
}

static inline float dot(const float *a, const float *b, long n) {
    __m256 acc = _mm256_setzero_ps();
    long i = 0;
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    float s = hsum(acc);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* dot(a, b + i * n, n) for i < 4: four independent FMA chains where one dot is a single chain bound
 * by the FMA latency (a head's 64 features are 8 dependent FMAs). */
static inline void dot4(const float *a, const float *b, long n, float *out) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    long i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 av = _mm256_loadu_ps(a + i);
        for (int r = 0; r < 4; r++) acc[r] = _mm256_fmadd_ps(av, _mm256_loadu_ps(b + r * n + i), acc[r]);
    }
    for (int r = 0; r < 4; r++) {
        float s = hsum(acc[r]);
        for (long j = i; j < n; j++) s += a[j] * b[r * n + j];
        out[r] = s;
    }
}

#ifdef __AVX512F__
/* e^x for x <= 88.7 (softmax after the max is subtracted; SiLU's e^-x), 16 lanes: x = n ln2 + r, |r| <= ln2 / 2, a
 * degree-6 polynomial for e^r (Cephes' expf coefficients, ~1 ulp), then 2^n by scalef (which
 * underflows to 0 as expf does). glibc's expf, one call per score, was a fifth of attention. */
static inline __m512 exp512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.33654f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    const __m512 e = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(e, n);
}

static inline __mmask16 tail16(long left) { return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1); }

/* 16 of a cache's features from element `at`, fp32 or bf16 (widened: exact) */
static inline __m512 kv_load(const void *cache, long at, __mmask16 m, const int bf16) {
    return bf16 ? load16_bf16((const uint16_t *)cache + at, m) : _mm512_maskz_loadu_ps(m, (const float *)cache + at);
}

/* One (row, head): scores s[t] = softmax(scale q.k_t) over `span` slots, o = sum_t s[t] v_t.
 * 16 lanes; the head's features in registers 64 at a time (a Llama head is 64 or 128). kc, vc: the
 * head's first slot, fp32 or (BF16) bf16 — a constant at each call, so each is its own loop. */
static inline __attribute__((always_inline)) void attend(const float *q, const void *kc, const void *vc, long span,
                                                         long hd, float scale, float *s, float *o, const int BF16) {
    float top = -INFINITY;
    for (long t = 0; t < span; t++) {
        __m512 acc = _mm512_setzero_ps();
        for (long i = 0; i < hd; i += 16) {
            const __mmask16 m = tail16(hd - i);
            acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, q + i), kv_load(kc, t * hd + i, m, BF16), acc);
        }
        s[t] = _mm512_reduce_add_ps(acc) * scale;
        top = s[t] > top ? s[t] : top;
    }
    __m512 total = _mm512_setzero_ps();
    const __m512 topv = _mm512_set1_ps(top);
    for (long t = 0; t < span; t += 16) {
        const __mmask16 m = tail16(span - t);
        const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + t), topv));
        total = _mm512_add_ps(total, _mm512_maskz_mov_ps(m, e));
        _mm512_mask_storeu_ps(s + t, m, e);
    }
    const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(total));
    for (long t = 0; t < span; t += 16) {
        const __mmask16 m = tail16(span - t);
        _mm512_mask_storeu_ps(s + t, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, s + t), inv));
    }
    for (long i = 0; i < hd; i += 64) {
        __mmask16 m[4];
        __m512 acc[4];
        for (int u = 0; u < 4; u++) m[u] = i + 16 * u < hd ? tail16(hd - i - 16 * u) : 0, acc[u] = _mm512_setzero_ps();
        for (long t = 0; t < span; t++) {
            const __m512 pv = _mm512_set1_ps(s[t]);
            for (int u = 0; u < 4; u++) acc[u] = _mm512_fmadd_ps(pv, kv_load(vc, t * hd + i + 16 * u, m[u], BF16), acc[u]);
        }
        for (int u = 0; u < 4; u++) _mm512_mask_storeu_ps(o + i + 16 * u, m[u], acc[u]);
    }
}
#else
static void attend(const float *q, const void *kc_, const void *vc_, long span, long hd, float scale, float *s,
                   float *o, const int BF16) {
    (void)BF16;  /* fp32 caches only here (alloy.infer.fused declines a bf16 cache without AVX-512) */
    const float *kc = kc_, *vc = vc_;
    float top = -INFINITY;
    long t = 0;
    for (; t + 4 <= span; t += 4) dot4(q, kc + t * hd, hd, s + t);
    for (; t < span; t++) s[t] = dot(q, kc + t * hd, hd);
    for (t = 0; t < span; t++) {
        s[t] *= scale;
        top = s[t] > top ? s[t] : top;
    }
    float total = 0.0f;
    for (t = 0; t < span; t++) {
        s[t] = expf(s[t] - top);
        total += s[t];
    }
    for (t = 0; t < span; t++) s[t] /= total;
    /* o = sum_t s[t] v_t, 32 features at a time held in registers across t (a load and store of
     * o per slot made the loop wait on store forwarding) */
    long i = 0;
    for (; i + 32 <= hd; i += 32) {
        __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        for (t = 0; t < span; t++) {
            const __m256 pv = _mm256_set1_ps(s[t]);
            const float *v = vc + t * hd + i;
            for (int u = 0; u < 4; u++) acc[u] = _mm256_fmadd_ps(pv, _mm256_loadu_ps(v + 8 * u), acc[u]);
        }
        for (int u = 0; u < 4; u++) _mm256_storeu_ps(o + i + 8 * u, acc[u]);
    }
    for (; i < hd; i++) {
        float acc = 0.0f;
        for (t = 0; t < span; t++) acc += s[t] * vc[t * hd + i];
        o[i] = acc;
    }
}
#endif

/* Single-query attention of every (row, head) over its row's cache slots [lo, pos[r]]; out [rows,
 * heads * hd]; scores: `stride` floats per (row, head). */
static void attention(const Model *m, const Layer *l, const float *qkv, long qkv_n, float *out, const long *pos,
                      float *scores, long stride, int threads) {
    const long hd = m->head_dim, group = m->heads / m->kv_heads;
    _Pragma("omp parallel for schedule(static) num_threads(threads)")
    for (long rh = 0; rh < m->rows * m->heads; rh++) {
        const long r = rh / m->heads, h = rh % m->heads, g = h / group;
        const long lo = l->window && pos[r] - l->window + 1 > 0 ? pos[r] - l->window + 1 : 0, span = pos[r] + 1 - lo;
        const long base = ((r * m->kv_heads + g) * m->max_len + lo) * hd;
        const float *q = qkv + r * qkv_n + h * hd;
        float *o = out + r * m->heads * hd + h * hd, *s = scores + rh * stride;
        if (m->kv_bf16)
            attend(q, (const uint16_t *)l->k_cache + base, (const uint16_t *)l->v_cache + base, span, hd,
                   m->softmax_scale, s, o, 1);
        else
            attend(q, (const float *)l->k_cache + base, (const float *)l->v_cache + base, span, hd, m->softmax_scale,
                   s, o, 0);
    }
}

static inline float activate(float x, int act) {
    switch (act) {
    case ACT_SILU: return x / (1.0f + expf(-x));
    case ACT_GELU_TANH: return 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
    case ACT_GELU: return 0.5f * x * (1.0f + erff(x * 0.7071067811865476f));
    default: return x > 0.0f ? x : 0.0f;
    }
}

/* hid [rows, ffn] = act(gate) (* up) from up [rows, up_n] ([gate; up] when gated), over both
 * threads: rows x ffn exp/erf/tanh calls are the longest serial stretch of a batched step (the other
 * thread would spin in the barrier meanwhile). SiLU 16 lanes at a time on AVX-512 (exp512 holds for
 * -x up to 88.7, where e^-x overflows to inf and x / inf to 0, as expf): glibc's expf per element
 * was ~2 % of a batch-8 step. */
static void mlp_activation(const Model *m, const float *up, long up_n, float *hid, int threads) {
    const long R = m->rows, ffn = m->ffn;
#ifdef __AVX512F__
    if (m->act == ACT_SILU) {
        const long chunks = (ffn + 15) / 16;
        _Pragma("omp parallel for schedule(static) num_threads(threads)")
        for (long rc = 0; rc < R * chunks; rc++) {
            const long r = rc / chunks, i = (rc % chunks) * 16;
            const __mmask16 mk = tail16(ffn - i);
            const __m512 a = _mm512_maskz_loadu_ps(mk, up + r * up_n + i);
            __m512 h = _mm512_div_ps(a, _mm512_add_ps(_mm512_set1_ps(1.0f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), a))));
            if (m->gated) h = _mm512_mul_ps(h, _mm512_maskz_loadu_ps(mk, up + r * up_n + ffn + i));
            _mm512_mask_storeu_ps(hid + r * ffn + i, mk, h);
        }
        return;
    }
#endif
    _Pragma("omp parallel for schedule(static) num_threads(threads)")
    for (long ri = 0; ri < R * ffn; ri++) {
        const long r = ri / ffn, i = ri % ffn;
        const float a = up[r * up_n + i];
        hid[ri] = m->gated ? activate(a, m->act) * up[r * up_n + ffn + i] : activate(a, m->act);
    }
}

static void norm_or_copy(const float *x, const float *w, float *y, long rows, long n, float eps) {
    if (w)
        alloy_rms_norm(x, w, y, rows, n, eps);
    else
        memcpy(y, x, sizeof(float) * rows * n);
}

static void add_into(float *x, const float *y, long n) {
    for (long i = 0; i < n; i++) x[i] += y[i];
}

/* x [rows, hidden]: row r's embedded token at slot pos[r] in, the last hidden state out (normed
 * when the model has a final norm); logits [rows, vocab] when the model has a head. rope: per row,
 * per table, cos then sin, each [rope_dim] (the same floats PyTorch's tables hold for the row's
 * position). */
void alloy_decode_step(const Model *m, float *x, float *logits, const long *pos, const float *rope_tables,
                       int threads) {
    const long R = m->rows, H = m->hidden, hd = m->head_dim, nq = m->heads * hd, nkv = m->kv_heads * hd;
    const long qkv_n = nq + 2 * nkv, ffn = m->ffn, up_n = m->gated ? 2 * ffn : ffn;
    float *xn = malloc(sizeof(float) * R * H), *qkv = malloc(sizeof(float) * R * qkv_n);
    float *att = malloc(sizeof(float) * R * nq), *out = malloc(sizeof(float) * R * H);
    float *up = malloc(sizeof(float) * R * up_n), *hid = malloc(sizeof(float) * R * ffn);
    long stride = 0;  /* the longest row's slots */
    for (long r = 0; r < R; r++) stride = pos[r] + 1 > stride ? pos[r] + 1 : stride;
    float *scores = malloc(sizeof(float) * R * m->heads * stride);
    for (int li = 0; li < m->n_layers; li++) {
        const Layer *l = m->layers + li;
        norm_or_copy(x, l->attn_norm, xn, R, H, m->eps);
        linear(&l->qkv, xn, qkv, R, threads);
        for (long r = 0; r < R; r++) {
            float *q = qkv + r * qkv_n, *k = q + nq, *v = k + nkv;
            const float *cos = rope_tables + 2 * (r * m->n_tables + l->rope_row) * m->rope_dim, *sin = cos + m->rope_dim;
            if (l->q_norm) {
                const int per_head = m->qk_norm_per_head;
                alloy_rms_norm(q, l->q_norm, q, per_head ? m->heads : 1, per_head ? hd : nq, m->eps);
                alloy_rms_norm(k, l->k_norm, k, per_head ? m->kv_heads : 1, per_head ? hd : nkv, m->eps);
            }
            if (m->rope_dim) {
                rope(q, m->heads, hd, m->rope_dim, cos, sin);
                rope(k, m->kv_heads, hd, m->rope_dim, cos, sin);
            }
            for (long g = 0; g < m->kv_heads; g++) {
                const long slot = ((r * m->kv_heads + g) * m->max_len + pos[r]) * hd;
                if (m->kv_bf16) {  /* rounded to nearest even, as PyTorch's copy into the cache rounds */
                    uint16_t *kb = (uint16_t *)l->k_cache + slot, *vb = (uint16_t *)l->v_cache + slot;
                    for (long i = 0; i < hd; i++) {
                        kb[i] = (uint16_t)(round_bf16_scalar(k[g * hd + i]) >> 16);
                        vb[i] = (uint16_t)(round_bf16_scalar(v[g * hd + i]) >> 16);
                    }
                } else {
                    memcpy((float *)l->k_cache + slot, k + g * hd, sizeof(float) * hd);
                    memcpy((float *)l->v_cache + slot, v + g * hd, sizeof(float) * hd);
                }
            }
        }
        attention(m, l, qkv, qkv_n, att, pos, scores, stride, threads);
        linear(&l->o, att, out, R, threads);
        if (l->attn_post_norm) alloy_rms_norm(out, l->attn_post_norm, out, R, H, m->eps);
        add_into(x, out, R * H);
        norm_or_copy(x, l->mlp_norm, xn, R, H, m->eps);
        linear(&l->up, xn, up, R, threads);
        mlp_activation(m, up, up_n, hid, threads);
        linear(&l->down, hid, out, R, threads);
        if (l->mlp_post_norm) alloy_rms_norm(out, l->mlp_post_norm, out, R, H, m->eps);
        add_into(x, out, R * H);
    }
    if (m->final_norm) alloy_rms_norm(x, m->final_norm, x, R, H, m->eps);
    if (m->head.w) linear(&m->head, x, logits, R, threads);
    free(xn), free(qkv), free(att), free(out), free(up), free(hid), free(scores);
}
