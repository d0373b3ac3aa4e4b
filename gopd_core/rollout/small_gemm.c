/* y (M, N) = x (M, K) @ W.T + bias for the few rows of a decode step (float32, AVX2 + FMA, OpenMP).
 *
 * W is stored blocked, (ceil(N / 16), K, 16): for each k the 16 weights of a column block sit side by
 * side, so one pass over a block reads it once, in order, while up to 4 input rows share each load
 * (8 accumulators of 8 floats). Blocks are split across threads; a block's rows after the first 4 are
 * served from cache. Columns past N in the last block are zero weights and are never stored.
 * Built by gopd_core/rollout/native.py; called through ctypes on contiguous float32 buffers.
 */
#include <immintrin.h>
#include <stdint.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 16
#define ROWS 4

/* One block's outputs for `rows` <= ROWS input rows into out (rows, BLOCK). Always inlined and called
 * with a constant `rows` (see `tile_rows`), so the row loops unroll and the accumulators stay in registers. */
static inline __attribute__((always_inline)) void tile(const int rows, const float *x, int64_t K, const float *w,
                                                       const float *bias, float *out) {
    __m256 a0[ROWS], a1[ROWS];
    __m256 b0 = bias ? _mm256_loadu_ps(bias) : _mm256_setzero_ps();
    __m256 b1 = bias ? _mm256_loadu_ps(bias + 8) : _mm256_setzero_ps();
    for (int r = 0; r < rows; ++r) { a0[r] = b0; a1[r] = b1; }
    for (int64_t k = 0; k < K; ++k) {
        _mm_prefetch((const char *)(w + k * BLOCK + 512), _MM_HINT_T0);
        __m256 w0 = _mm256_loadu_ps(w + k * BLOCK), w1 = _mm256_loadu_ps(w + k * BLOCK + 8);
        for (int r = 0; r < rows; ++r) {
            __m256 s = _mm256_broadcast_ss(x + r * K + k);
            a0[r] = _mm256_fmadd_ps(s, w0, a0[r]);
            a1[r] = _mm256_fmadd_ps(s, w1, a1[r]);
        }
    }
    for (int r = 0; r < rows; ++r) {
        _mm256_storeu_ps(out + r * BLOCK, a0[r]);
        _mm256_storeu_ps(out + r * BLOCK + 8, a1[r]);
    }
}

static void tile_rows(int rows, const float *x, int64_t K, const float *w, const float *bias, float *out) {
    switch (rows) {
    case 1: tile(1, x, K, w, bias, out); break;
    case 2: tile(2, x, K, w, bias, out); break;
    case 3: tile(3, x, K, w, bias, out); break;
    default: tile(ROWS, x, K, w, bias, out); break;
    }
}

/* x: (M, K); w: (ceil(N / 16), K, 16); bias: (ceil(N / 16) * 16) or NULL; y: (M, N); threads: torch's count. */
void small_gemm(const float *x, int64_t M, int64_t K, const float *w, int64_t N, const float *bias, float *y,
                int threads) {
    int64_t blocks = (N + BLOCK - 1) / BLOCK;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < blocks; ++b) {
        float out[ROWS * BLOCK];
        int64_t first = b * BLOCK, width = N - first < BLOCK ? N - first : BLOCK;
        for (int64_t m = 0; m < M; m += ROWS) {
            int rows = M - m < ROWS ? (int)(M - m) : ROWS;
            tile_rows(rows, x + m * K, K, w + b * K * BLOCK, bias ? bias + first : NULL, out);
            for (int r = 0; r < rows; ++r)
                memcpy(y + (m + r) * N + first, out + r * BLOCK, (size_t)width * sizeof(float));
        }
    }
}

/* The same product with bf16 weights and inputs, fp32 accumulation (AVX512-BF16: vdpbf16ps), for CPUs that
 * have it: half the weight bytes of the float32 kernel, and two products per lane per instruction.
 * W is stored (ceil(N / 16), K2, 16, 2) in bf16, K2 = ceil(K / 2): for each pair of k, the 16 columns' two
 * weights side by side, which is the operand layout of vdpbf16ps; x is (M, K2) pairs of bf16 (K padded with
 * a zero). Up to 8 input rows share each weight load (one 16-float accumulator per row). Compiled into the
 * same library through target attributes; native.py calls it only where the CPU reports avx512_bf16. */
#define BROWS 8

static inline __attribute__((always_inline, target("avx512f,avx512bf16"))) void tile_bf16(
        const int rows, const uint32_t *x, int64_t K2, const uint16_t *w, const float *bias, float *out) {
    __m512 acc[BROWS];
    __m512 b = bias ? _mm512_loadu_ps(bias) : _mm512_setzero_ps();
    for (int r = 0; r < rows; ++r) acc[r] = b;
    for (int64_t k = 0; k < K2; ++k) {
        _mm_prefetch((const char *)(w + k * 2 * BLOCK + 1024), _MM_HINT_T0);
        __m512bh wk = (__m512bh)_mm512_loadu_si512((const void *)(w + k * 2 * BLOCK));
        for (int r = 0; r < rows; ++r)
            acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_set1_epi32((int)x[r * K2 + k]), wk);
    }
    for (int r = 0; r < rows; ++r) _mm512_storeu_ps(out + r * BLOCK, acc[r]);
}

__attribute__((target("avx512f,avx512bf16"))) static void tile_rows_bf16(
        int rows, const uint32_t *x, int64_t K2, const uint16_t *w, const float *bias, float *out) {
    switch (rows) {
    case 1: tile_bf16(1, x, K2, w, bias, out); break;
    case 2: tile_bf16(2, x, K2, w, bias, out); break;
    case 3: tile_bf16(3, x, K2, w, bias, out); break;
    case 4: tile_bf16(4, x, K2, w, bias, out); break;
    case 5: tile_bf16(5, x, K2, w, bias, out); break;
    case 6: tile_bf16(6, x, K2, w, bias, out); break;
    case 7: tile_bf16(7, x, K2, w, bias, out); break;
    default: tile_bf16(BROWS, x, K2, w, bias, out); break;
    }
}

/* x: (M, K2) bf16 pairs; w: (ceil(N / 16), K2, 16, 2) bf16; bias: (ceil(N / 16) * 16) or NULL; y: (M, N) float32. */
__attribute__((target("avx512f,avx512bf16"))) void small_gemm_bf16(
        const uint32_t *x, int64_t M, int64_t K2, const uint16_t *w, int64_t N, const float *bias, float *y,
        int threads) {
    int64_t blocks = (N + BLOCK - 1) / BLOCK;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < blocks; ++b) {
        float out[BROWS * BLOCK];
        int64_t first = b * BLOCK, width = N - first < BLOCK ? N - first : BLOCK;
        for (int64_t m = 0; m < M; m += BROWS) {
            int rows = M - m < BROWS ? (int)(M - m) : BROWS;
            tile_rows_bf16(rows, x + m * K2, K2, w + b * K2 * 2 * BLOCK, bias ? bias + first : NULL, out);
            for (int r = 0; r < rows; ++r)
                memcpy(y + (m + r) * N + first, out + r * BLOCK, (size_t)width * sizeof(float));
        }
    }
}

/* e^x for 8 floats (Cephes' expf: range reduction by ln 2, degree-5 polynomial; ~1 ulp on [-87, 88]). */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    __m256i exponent = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(exponent));
}

/* The 8 sums of a[0..7]'s lanes, in order. */
static inline __m256 sums8(const __m256 *a) {
    __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
    __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
    __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

static float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_hadd_ps(s, s);
    return _mm_cvtss_f32(_mm_hadd_ps(s, s));
}

/* e^(x - top) for 8 floats, exactly 0 below e^-87.3 (exp8 clamps there; -inf logits must weigh nothing). */
static inline __m256 shifted_exp8(__m256 x, __m256 shift) {
    __m256 d = _mm256_sub_ps(x, shift);
    return _mm256_and_ps(_mm256_cmp_ps(d, _mm256_set1_ps(-87.3f), _CMP_GE_OQ), exp8(d));
}

/* e^(x[i] - top) for the n <= 1024 entries from x, into w: the one exponential `sample_rows` sums and walks. */
static void shifted_exps(const float *x, int64_t n, float top, float *w) {
    const __m256 shift = _mm256_set1_ps(top);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(w + i, shifted_exp8(_mm256_loadu_ps(x + i), shift));
    if (i < n) {
        float in[8] = {0}, out[8];
        memcpy(in, x + i, (size_t)(n - i) * sizeof(float));
        _mm256_storeu_ps(out, shifted_exp8(_mm256_loadu_ps(in), shift));
        memcpy(w + i, out, (size_t)(n - i) * sizeof(float));
    }
}

/* One token per row of (B, V) float32 logits drawn from softmax(logits) (temperature 1, no top-p) by the two-level
 * inverse CDF of rollout/sampling.py, in one call: per block of `block` (<= 1024) entries the float64 sum of
 * e^(x - max), their cumulative sum picks a block at uniforms[b] * total, the float64 cumulative sum inside
 * it picks the token; a draw never steps past the last token of positive weight (of the row, then of the block).
 * logprobs[b] = (x[token] - max) - log(total), the raw log-prob. sums: B * ceil(V / block) doubles of scratch.
 * Returns 0, or 1 if some row's logits are not all finite numbers below +inf (the caller then takes torch's way). */
int sample_rows(const float *logits, int64_t B, int64_t V, const double *uniforms, int64_t block, double *sums,
                int64_t *tokens, float *logprobs, int threads) {
    const int64_t blocks = (V + block - 1) / block;
    int bad = 0;
#pragma omp parallel for schedule(static) num_threads(threads) reduction(| : bad)
    for (int64_t b = 0; b < B; ++b) {
        const float *x = logits + b * V;
        double *cdf = sums + b * blocks;
        float w[1024];
        __m256 top8 = _mm256_set1_ps(-INFINITY), nan8 = _mm256_setzero_ps();
        int64_t v = 0;
        for (; v + 8 <= V; v += 8) {
            const __m256 value = _mm256_loadu_ps(x + v);
            nan8 = _mm256_or_ps(nan8, _mm256_cmp_ps(value, value, _CMP_UNORD_Q));  /* max_ps drops NaNs */
            top8 = _mm256_max_ps(top8, value);
        }
        float top8s[8], top = -INFINITY;
        int nan = _mm256_movemask_ps(nan8) != 0;
        _mm256_storeu_ps(top8s, top8);
        for (int j = 0; j < 8; ++j) top = top8s[j] > top ? top8s[j] : top;
        for (; v < V; ++v) {
            nan |= isnan(x[v]);
            top = x[v] > top ? x[v] : top;
        }
        if (nan || !isfinite(top)) {
            bad = 1;
            continue;
        }
        double running = 0.0;
        for (int64_t k = 0; k < blocks; ++k) {
            const int64_t first = k * block, n = first + block < V ? block : V - first;
            shifted_exps(x + first, n, top, w);
            __m256d low = _mm256_setzero_pd(), high = _mm256_setzero_pd();  /* float64 lanes: no serial chain */
            int64_t i = 0;
            for (; i + 8 <= n; i += 8) {
                const __m256 eight = _mm256_loadu_ps(w + i);
                low = _mm256_add_pd(low, _mm256_cvtps_pd(_mm256_castps256_ps128(eight)));
                high = _mm256_add_pd(high, _mm256_cvtps_pd(_mm256_extractf128_ps(eight, 1)));
            }
            double lanes[4], mass = 0.0;
            _mm256_storeu_pd(lanes, _mm256_add_pd(low, high));
            for (int j = 0; j < 4; ++j) mass += lanes[j];
            for (; i < n; ++i) mass += (double)w[i];
            running += mass;
            cdf[k] = running;
        }
        const double total = cdf[blocks - 1];
        if (!(total > 0.0) || !isfinite(total)) {  /* a NaN logit makes the sums NaN */
            bad = 1;
            continue;
        }
        const double target = uniforms[b] * total;
        int64_t chosen = 0, last = 0;
        for (int64_t k = 0; k < blocks; ++k) {
            chosen += cdf[k] <= target;
            last += cdf[k] < total;
        }
        chosen = chosen < last ? chosen : last;
        const double before = chosen > 0 ? cdf[chosen - 1] : 0.0, inner = target - before;
        const int64_t first = chosen * block, n = first + block < V ? block : V - first;
        shifted_exps(x + first, n, top, w);
        double walked = 0.0, mass = 0.0;
        for (int64_t i = 0; i < n; ++i) mass += (double)w[i];
        int64_t offset = 0, inner_last = 0;
        for (int64_t i = 0; i < n; ++i) {
            walked += (double)w[i];
            offset += walked <= inner;
            inner_last += walked < mass;
        }
        const int64_t token = first + (offset < inner_last ? offset : inner_last);
        tokens[b] = token;
        logprobs[b] = (float)((double)(x[token] - top) - log(total));
    }
    return bad;
}

/* 8 cached floats at x + i: float32, or bf16 (kv16) widened exactly (a bf16 is a float's upper half). */
static inline __attribute__((always_inline)) __m256 load_kv(const void *x, int64_t i, const int kv16) {
    if (kv16)
        return _mm256_castsi256_ps(
            _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)x + i))), 16));
    return _mm256_loadu_ps((const float *)x + i);
}

/* One query head over its L cached keys/values (float32, or bf16 with kv16) into o (D = 8 * chunks); p: L + 8
 * floats of scratch. Always inlined and called with constant `chunks` and `kv16` where it can be, so the loops
 * over D unroll and the loads are one kind. */
static inline __attribute__((always_inline)) void attend_head(const int chunks, const int kv16, const float *qh,
                                                              const void *k, const void *v, int64_t L,
                                                              const unsigned char *m, float scale, float *p, float *o) {
    const int64_t D = 8 * (int64_t)chunks;
    int64_t l = 0;
    for (; l + 8 <= L; l += 8) {  /* scores, 8 keys at a time: one accumulator each */
        __m256 acc[8];
        for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
        for (int c = 0; c < chunks; ++c) {
            __m256 qc = _mm256_loadu_ps(qh + c * 8);
            for (int j = 0; j < 8; ++j) acc[j] = _mm256_fmadd_ps(qc, load_kv(k, (l + j) * D + c * 8, kv16), acc[j]);
        }
        _mm256_storeu_ps(p + l, _mm256_mul_ps(sums8(acc), _mm256_set1_ps(scale)));
    }
    for (; l < L; ++l) {
        __m256 acc = _mm256_setzero_ps();
        for (int c = 0; c < chunks; ++c)
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(qh + c * 8), load_kv(k, l * D + c * 8, kv16), acc);
        p[l] = hsum8(acc) * scale;
    }
    float top = -INFINITY;
    for (l = 0; l < L; ++l)
        if ((!m || m[l]) && p[l] > top) top = p[l];
    if (top == -INFINITY) {  /* nothing to attend: zeros */
        for (int64_t d = 0; d < D; ++d) o[d] = 0.0f;
        return;
    }
    __m256 shift = _mm256_set1_ps(top), total = _mm256_setzero_ps();
    for (l = L; l < L + 8; ++l) p[l] = -INFINITY;  /* the last group's spare lanes give e^-87, zeroed below */
    for (l = 0; l < L; l += 8) _mm256_storeu_ps(p + l, exp8(_mm256_sub_ps(_mm256_loadu_ps(p + l), shift)));
    for (l = L; l < L + 8; ++l) p[l] = 0.0f;
    if (m)
        for (l = 0; l < L; ++l)
            if (!m[l]) p[l] = 0.0f;
    for (l = 0; l < L; l += 8) total = _mm256_add_ps(total, _mm256_loadu_ps(p + l));
    __m256 acc[chunks];
    for (int c = 0; c < chunks; ++c) acc[c] = _mm256_setzero_ps();
    for (l = 0; l < L; ++l) {  /* sum_l p_l v_l, one pass over the values */
        __m256 weight = _mm256_set1_ps(p[l]);
        for (int c = 0; c < chunks; ++c) acc[c] = _mm256_fmadd_ps(weight, load_kv(v, l * D + c * 8, kv16), acc[c]);
    }
    __m256 inverse = _mm256_set1_ps(1.0f / hsum8(total));
    for (int c = 0; c < chunks; ++c) _mm256_storeu_ps(o + c * 8, _mm256_mul_ps(acc[c], inverse));
}

/* Attention of one new query per row over a KV cache (a decode step), softmax in float32.
 * q: row b, head h at q + b * q_stride + h * D; keys: row b, kv head g, position l at
 * keys + b * k_stride_b + g * k_stride_h + l * D, values alike with v_strides (in elements: float32, or bf16
 * with kv16, widened exactly); query head h reads kv head h / (H / Hkv).
 * mask: (B, mask_stride) bytes, nonzero where row b may attend position l; NULL attends everywhere.
 * out: (B, H, D). D is a multiple of 8. threads: torch's count. */
void decode_attention(const float *q, int64_t q_stride, int64_t B, int64_t H, int64_t Hkv, int64_t D,
                      const void *keys, int64_t k_stride_b, int64_t k_stride_h, const void *values,
                      int64_t v_stride_b, int64_t v_stride_h, int64_t L,
                      const unsigned char *mask, int64_t mask_stride, float scale, float *out, int kv16, int threads) {
    int64_t group = H / Hkv;
    int chunks = (int)(D / 8);
    const size_t size = kv16 ? sizeof(uint16_t) : sizeof(float);
#pragma omp parallel num_threads(threads)
    {
        float *p = (float *)malloc((size_t)(L + 8) * sizeof(float));
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < B * H; ++bh) {
            int64_t b = bh / H, g = (bh % H) / group;
            const char *k = (const char *)keys + (b * k_stride_b + g * k_stride_h) * size;
            const char *v = (const char *)values + (b * v_stride_b + g * v_stride_h) * size;
            const float *qh = q + b * q_stride + (bh % H) * D;
            const unsigned char *m = mask ? mask + b * mask_stride : NULL;
            float *o = out + bh * D;
#define ATTEND(KV16)                                                                       \
    switch (chunks) { /* constant head sizes and cache kinds, so the loops unroll */        \
    case 2: attend_head(2, KV16, qh, k, v, L, m, scale, p, o); break;                        \
    case 4: attend_head(4, KV16, qh, k, v, L, m, scale, p, o); break;                        \
    case 8: attend_head(8, KV16, qh, k, v, L, m, scale, p, o); break;                        \
    case 16: attend_head(16, KV16, qh, k, v, L, m, scale, p, o); break;                      \
    default: attend_head(chunks, KV16, qh, k, v, L, m, scale, p, o); break;                  \
    }
            if (kv16) {
                ATTEND(1)
            } else {
                ATTEND(0)
            }
#undef ATTEND
        }
        free(p);
    }
}

/* float32 -> bf16, rounded to nearest even as torch rounds it (NaN stays NaN). */
static inline uint16_t to_bf16(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40u);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

/* W (N, K) float32, rows contiguous, into the layouts above, zeros past N (and past K in the last bf16 pair):
 * bf16 == 0: (ceil(N / 16), K, 16) float32 for small_gemm; bf16 == 1: (ceil(N / 16), ceil(K / 2), 16, 2) bf16
 * for small_gemm_bf16. One pass, blocks split across threads: a 151,936 x 512 head packed in torch ops (pad,
 * cast, transposed copy) took 0.3 s, at every rollout stage. */
void pack_blocks(const float *w, int64_t N, int64_t K, int bf16, void *out, int threads) {
    const int64_t blocks = (N + BLOCK - 1) / BLOCK, K2 = (K + 1) / 2;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < blocks; ++b) {
        for (int64_t c = 0; c < BLOCK; ++c) {
            const int live = b * BLOCK + c < N;
            const float *row = w + (live ? (b * BLOCK + c) * K : 0);
            if (bf16) {  /* one 32-bit word per pair of k: (k even, k odd) */
                uint32_t *o = (uint32_t *)out + b * K2 * BLOCK + c;
                for (int64_t k2 = 0; k2 < K / 2; ++k2)
                    o[k2 * BLOCK] = live ? (uint32_t)to_bf16(row[2 * k2]) | (uint32_t)to_bf16(row[2 * k2 + 1]) << 16 : 0;
                if (K % 2) o[(K2 - 1) * BLOCK] = live ? to_bf16(row[K - 1]) : 0;
            } else {
                float *o = (float *)out + b * K * BLOCK + c;
                for (int64_t k = 0; k < K; ++k) o[k * BLOCK] = live ? row[k] : 0.0f;
            }
        }
    }
}

/* ---- One decode step of a Llama-family layer in one call (native.DecodeLayer) ----------------------------------
 * The same arithmetic as lean_decode._Layer, whose Python ran ~100 small torch ops per layer and step (norms, RoPE,
 * the cache write, SiLU, residuals, casts) around the four linears: at 8 rows that was as long as the linears. */

/* Per-layer constants, mirrored by native._LayerConstants (ctypes). The weights are BlockedLinear blocks: float32
 * (small_gemm) or bf16 pairs (small_gemm_bf16, inputs rounded to bf16 as torch rounds them). */
typedef struct {
    int64_t hidden, heads, kv_heads, head_dim, intermediate;
    float input_eps, post_eps, head_eps, scale;
    const float *input_norm, *post_norm, *q_norm, *k_norm; /* q_norm/k_norm: per-head norms (Qwen3) or NULL */
    const void *qkv, *out, *gate_up, *down;
    const float *qkv_bias, *out_bias, *gate_up_bias, *down_bias; /* padded to whole blocks, or NULL */
    int64_t bf16;
} DecodeLayer;

/* y = w * (x / sqrt(mean(x^2) + eps)) over n entries, as the Llama-family RMSNorm (the sum in double). */
static void rms_norm(const float *x, const float *w, int64_t n, float eps, float *y) {
    double sum = 0.0;
    for (int64_t i = 0; i < n; ++i) sum += (double)x[i] * x[i];
    float inverse = 1.0f / sqrtf((float)(sum / (double)n) + eps);
    for (int64_t i = 0; i < n; ++i) y[i] = w[i] * (x[i] * inverse);
}

/* y (M, N) = x (M, K) @ W.T + bias through the kernel the weights were packed for; pairs: M * ceil(K / 2) words. */
static void layer_linear(const DecodeLayer *layer, const float *x, int64_t M, int64_t K, const void *w, int64_t N,
                         const float *bias, float *y, uint32_t *pairs, int threads) {
    if (!layer->bf16) {
        small_gemm(x, M, K, (const float *)w, N, bias, y, threads);
        return;
    }
    const int64_t K2 = (K + 1) / 2;
    for (int64_t m = 0; m < M; ++m)
        for (int64_t k2 = 0; k2 < K2; ++k2) {
            uint32_t high = 2 * k2 + 1 < K ? to_bf16(x[m * K + 2 * k2 + 1]) : 0;
            pairs[m * K2 + k2] = (uint32_t)to_bf16(x[m * K + 2 * k2]) | high << 16;
        }
    small_gemm_bf16(pairs, M, K2, (const uint16_t *)w, N, bias, y, threads);
}

/* Rotate-half RoPE of one head in place: x * cos + (-x2, x1) * sin. */
static void rotate_head(float *x, const float *cos, const float *sin, int64_t D) {
    const int64_t half = D / 2;
    for (int64_t d = 0; d < half; ++d) {
        float first = x[d], second = x[d + half];
        x[d] = first * cos[d] - second * sin[d];
        x[d + half] = second * cos[d + half] + first * sin[d + half];
    }
}

/* hidden (B, H) float32, updated in place by one layer for one new token per row.
 * cos/sin: (B, D), each row's rotary angles at its position (the model's own rotary module computes them).
 * keys/values: the layer's reserved cache, row b, kv head g, position l at keys + b * stride_b + g * stride_h + l * D
 * (elements: float32, or bf16 with kv16, this token's rounded to nearest even as torch rounds);
 * this token's key and value are written at `position`, then each row attends over positions 0..position.
 * mask: (B, mask_stride) bytes, nonzero where a row may attend, covering position + 1 entries; NULL: everywhere.
 * Returns 0, or -1 when its scratch memory cannot be had. */
int decode_layer(const DecodeLayer *layer, float *hidden, int64_t B, const float *cos, const float *sin,
                 void *keys, void *values, int64_t stride_b, int64_t stride_h, int64_t position,
                 const unsigned char *mask, int64_t mask_stride, int kv16, int threads) {
    const int64_t H = layer->hidden, Hq = layer->heads, Hkv = layer->kv_heads, D = layer->head_dim;
    const int64_t I = layer->intermediate, width = (Hq + 2 * Hkv) * D;
    if (B <= 0) return 0;  /* no rows: nothing to compute or write */
    int64_t widest = H > I ? H : I;  /* the longest input row of a linear: H, Hq * D or I */
    if (Hq * D > widest) widest = Hq * D;
    float *normed = malloc((size_t)(B * widest) * sizeof(float));
    float *qkv = malloc((size_t)(B * width) * sizeof(float));
    float *attended = malloc((size_t)(B * Hq * D) * sizeof(float));
    float *gate_up = malloc((size_t)(B * 2 * I) * sizeof(float));
    float *projected = malloc((size_t)(B * H) * sizeof(float));
    uint32_t *pairs = malloc((size_t)(B * ((widest + 1) / 2)) * sizeof(uint32_t));
    int status = 0;
    if (!normed || !qkv || !attended || !gate_up || !projected || !pairs) {
        status = -1;
        goto done;
    }
    for (int64_t b = 0; b < B; ++b) rms_norm(hidden + b * H, layer->input_norm, H, layer->input_eps, normed + b * H);
    layer_linear(layer, normed, B, H, layer->qkv, width, layer->qkv_bias, qkv, pairs, threads);
    for (int64_t b = 0; b < B; ++b) {
        float *row = qkv + b * width;
        for (int64_t h = 0; h < Hq + Hkv; ++h) {
            float *head = row + h * D;
            const float *norm = h < Hq ? layer->q_norm : layer->k_norm;
            if (norm) rms_norm(head, norm, D, layer->head_eps, head);
            rotate_head(head, cos + b * D, sin + b * D, D);
        }
        for (int64_t g = 0; g < Hkv; ++g) {
            const int64_t slot = b * stride_b + g * stride_h + position * D;
            const float *key = row + (Hq + g) * D, *value = row + (Hq + Hkv + g) * D;
            if (kv16) {
                for (int64_t d = 0; d < D; ++d) {
                    ((uint16_t *)keys)[slot + d] = to_bf16(key[d]);
                    ((uint16_t *)values)[slot + d] = to_bf16(value[d]);
                }
            } else {
                memcpy((float *)keys + slot, key, (size_t)D * sizeof(float));
                memcpy((float *)values + slot, value, (size_t)D * sizeof(float));
            }
        }
    }
    decode_attention(qkv, width, B, Hq, Hkv, D, keys, stride_b, stride_h, values, stride_b, stride_h, position + 1,
                     mask, mask_stride, layer->scale, attended, kv16, threads);
    layer_linear(layer, attended, B, Hq * D, layer->out, H, layer->out_bias, projected, pairs, threads);
    for (int64_t i = 0; i < B * H; ++i) hidden[i] += projected[i];
    for (int64_t b = 0; b < B; ++b) rms_norm(hidden + b * H, layer->post_norm, H, layer->post_eps, normed + b * H);
    layer_linear(layer, normed, B, H, layer->gate_up, 2 * I, layer->gate_up_bias, gate_up, pairs, threads);
    for (int64_t b = 0; b < B; ++b) {  /* silu(gate) * up, into normed (B, I) */
        const float *gate = gate_up + b * 2 * I, *up = gate + I;
        float *act = normed + b * I;
        int64_t i = 0;
        for (; i + 8 <= I; i += 8) {
            __m256 g = _mm256_loadu_ps(gate + i);
            __m256 silu = _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
            _mm256_storeu_ps(act + i, _mm256_mul_ps(silu, _mm256_loadu_ps(up + i)));
        }
        for (; i < I; ++i) act[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
    }
    layer_linear(layer, normed, B, I, layer->down, H, layer->down_bias, projected, pairs, threads);
    for (int64_t i = 0; i < B * H; ++i) hidden[i] += projected[i];
done:
    free(normed); free(qkv); free(attended); free(gate_up); free(projected); free(pairs);
    return status;
}
