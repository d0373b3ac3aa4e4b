/* Causal self-attention in float32 with its backward pass, for the update's packed rows (AVX-512F).
 *
 * The update lays rows end to end in one sequence (attention.packed_rows); each row attends within itself.
 * torch's CPU flash SDPA ran each row's forward and backward at ~30-40 GFLOP/s on the zoo student's heads
 * (head size 32, 88-190 positions): a quarter of the update's time at 256-token responses. Here a task is one
 * row and one head (forward) or one row and one kv head with its query heads (backward, which sums their key and
 * value gradients); within it every product is one of three shapes, each vectorised over 16 float32 lanes:
 * 1. scores: S (n, n) = A (n, D) @ B^T, B copied transposed to (D, n16) so 16 keys fill a register; two query
 *    rows share each load of B (causal: a query's keys end at its own position, blocks past it are skipped);
 * 2. rows: C (n, D) = W (n, n) @ B (n, D): a tile of query rows shares each load of B's row;
 * 3. columns: C (n, D) += W^T @ A: a tile of keys shares each load of A's row, over queries at or after them.
 * Forward: S = scale * Q K^T, P = softmax over keys <= the query (float32), O = P V; the log-sum-exp of each query
 * is kept for the backward. Backward (P recomputed from S and the log-sum-exp): dP = dO V^T,
 * dS = scale * P * (dP - rowsum(dO * O)), dQ = dS K, dK = dS^T Q, dV = P^T dO.
 * Scratch is per task: the transposed keys and values and two (n, n16) float32 score buffers (at 256 positions
 * 0.5 MB); n is bounded by the caller (attention.NATIVE_TRAINING_LENGTH). Built with small_gemm.c by
 * gopd_core/rollout/native.py into one library; native.py calls it only where the CPU reports avx512f.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "exp16.h"

#define AVX512 __attribute__((target("avx512f")))
#define INLINE static inline __attribute__((always_inline))
#define LANES 16
#define SCORE_BLOCKS 8 /* key blocks of 16 per pass of the score loop: 2 x 8 accumulators */

/* rows x D at x (row stride `stride`) into (D, n16) at t, zeros past `rows`. */
static void transpose_rows(const float *x, int64_t stride, int64_t rows, int64_t D, int64_t n16, float *t) {
    for (int64_t d = 0; d < D; ++d) memset(t + d * n16 + rows, 0, (size_t)(n16 - rows) * sizeof(float));
    for (int64_t j = 0; j < rows; ++j)
        for (int64_t d = 0; d < D; ++d) t[d * n16 + j] = x[j * stride + d];
}

/* Kernel 1 for query rows i0 and i0 + 1 (`two`): S[i][j] = scale * A[i] . B[j] for key blocks 0..blocks-1. */
INLINE AVX512 void score_pair(const int two, const float *a, int64_t a_stride, const float *bt, int64_t n16,
                              int64_t D, int64_t blocks, float scale, float *s, int64_t s_stride) {
    for (int64_t first = 0; first < blocks; first += SCORE_BLOCKS) {
        const int count = blocks - first < SCORE_BLOCKS ? (int)(blocks - first) : SCORE_BLOCKS;
        __m512 acc0[SCORE_BLOCKS], acc1[SCORE_BLOCKS];
        for (int c = 0; c < count; ++c) acc0[c] = acc1[c] = _mm512_setzero_ps();
        for (int64_t d = 0; d < D; ++d) {
            const float *row = bt + d * n16 + first * LANES;
            const __m512 x0 = _mm512_set1_ps(a[d]), x1 = _mm512_set1_ps(two ? a[a_stride + d] : 0.0f);
            for (int c = 0; c < count; ++c) {
                const __m512 b = _mm512_loadu_ps(row + c * LANES);
                acc0[c] = _mm512_fmadd_ps(x0, b, acc0[c]);
                if (two) acc1[c] = _mm512_fmadd_ps(x1, b, acc1[c]);
            }
        }
        const __m512 factor = _mm512_set1_ps(scale);
        for (int c = 0; c < count; ++c) {
            _mm512_storeu_ps(s + (first + c) * LANES, _mm512_mul_ps(acc0[c], factor));
            if (two) _mm512_storeu_ps(s + s_stride + (first + c) * LANES, _mm512_mul_ps(acc1[c], factor));
        }
    }
}

/* Kernel 1 over n query rows (row i of A at a + i * a_stride), causal: row i gets keys 0..i (its block whole). */
static AVX512 void causal_scores(const float *a, int64_t a_stride, const float *bt, int64_t n, int64_t n16, int64_t D,
                                 float scale, float *s) {
    int64_t i = 0;
    for (; i + 1 < n; i += 2)
        score_pair(1, a + i * a_stride, a_stride, bt, n16, D, (i + 1) / LANES + 1, scale, s + i * n16, n16);
    if (i < n) score_pair(0, a + i * a_stride, a_stride, bt, n16, D, i / LANES + 1, scale, s + i * n16, n16);
}

/* Kernel 2 for `rows` query rows from i0: C[i] = W[i][0..keys) @ B (row j at b + j * b_stride), D = 16 * chunks.
 * W is zero past each row's own position, so the tile runs every row to the last row's keys. */
INLINE AVX512 void weigh_tile(const int rows, const int chunks, const float *w, int64_t w_stride, const float *b,
                              int64_t b_stride, int64_t keys, float *c, int64_t c_stride) {
    __m512 acc[4][8];
    for (int r = 0; r < rows; ++r)
        for (int k = 0; k < chunks; ++k) acc[r][k] = _mm512_setzero_ps();
    for (int64_t j = 0; j < keys; ++j) {
        __m512 bj[8];
        for (int k = 0; k < chunks; ++k) bj[k] = _mm512_loadu_ps(b + j * b_stride + k * LANES);
        for (int r = 0; r < rows; ++r) {
            const __m512 weight = _mm512_set1_ps(w[r * w_stride + j]);
            for (int k = 0; k < chunks; ++k) acc[r][k] = _mm512_fmadd_ps(weight, bj[k], acc[r][k]);
        }
    }
    for (int r = 0; r < rows; ++r)
        for (int k = 0; k < chunks; ++k) _mm512_storeu_ps(c + r * c_stride + k * LANES, acc[r][k]);
}

/* Kernel 3 for `cols` keys from j0: C[j] += sum over queries i >= j0 of W[i][j] * A[i], D = 16 * chunks.
 * W is zero where i < j, so every key of the tile starts at j0. */
INLINE AVX512 void gather_tile(const int cols, const int chunks, const float *w, int64_t w_stride, const float *a,
                               int64_t a_stride, int64_t j0, int64_t n, float *c, int64_t c_stride) {
    __m512 acc[4][8];
    for (int r = 0; r < cols; ++r)
        for (int k = 0; k < chunks; ++k) acc[r][k] = _mm512_loadu_ps(c + (j0 + r) * c_stride + k * LANES);
    for (int64_t i = j0; i < n; ++i) {
        __m512 ai[8];
        for (int k = 0; k < chunks; ++k) ai[k] = _mm512_loadu_ps(a + i * a_stride + k * LANES);
        for (int r = 0; r < cols; ++r) {
            const __m512 weight = _mm512_set1_ps(w[i * w_stride + j0 + r]);
            for (int k = 0; k < chunks; ++k) acc[r][k] = _mm512_fmadd_ps(weight, ai[k], acc[r][k]);
        }
    }
    for (int r = 0; r < cols; ++r)
        for (int k = 0; k < chunks; ++k) _mm512_storeu_ps(c + (j0 + r) * c_stride + k * LANES, acc[r][k]);
}

/* Tiles of 4 rows (D <= 64) or 2 (D = 128): at most 16 accumulators. Constant shapes so the loops unroll. */
#define TILE_ROWS(chunks) ((chunks) <= 4 ? 4 : 2)

static AVX512 void causal_weigh(const float *w, int64_t w_stride, const float *b, int64_t b_stride, int64_t n,
                                int64_t D, float *c, int64_t c_stride) {
    const int chunks = (int)(D / LANES), tile = TILE_ROWS(chunks);
    for (int64_t i = 0; i < n; i += tile) {
        const int rows = n - i < tile ? (int)(n - i) : tile;
        const float *wi = w + i * w_stride;
        float *ci = c + i * c_stride;
        const int64_t keys = i + rows;
#define WEIGH(R, K) weigh_tile(R, K, wi, w_stride, b, b_stride, keys, ci, c_stride)
        switch (chunks * 8 + rows) {
        case 8 + 4: WEIGH(4, 1); break;
        case 16 + 4: WEIGH(4, 2); break;
        case 32 + 4: WEIGH(4, 4); break;
        case 64 + 2: WEIGH(2, 8); break;
        default: WEIGH(rows, chunks); break;
        }
#undef WEIGH
    }
}

static AVX512 void causal_gather(const float *w, int64_t w_stride, const float *a, int64_t a_stride, int64_t n,
                                 int64_t D, float *c, int64_t c_stride) {
    const int chunks = (int)(D / LANES), tile = TILE_ROWS(chunks);
    for (int64_t j = 0; j < n; j += tile) {
        const int cols = n - j < tile ? (int)(n - j) : tile;
#define GATHER(R, K) gather_tile(R, K, w, w_stride, a, a_stride, j, n, c, c_stride)
        switch (chunks * 8 + cols) {
        case 8 + 4: GATHER(4, 1); break;
        case 16 + 4: GATHER(4, 2); break;
        case 32 + 4: GATHER(4, 4); break;
        case 64 + 2: GATHER(2, 8); break;
        default: GATHER(cols, chunks); break;
        }
#undef GATHER
    }
}

/* Softmax of row i of S over keys 0..i into P (normalised, zeros after i up to n16); returns its log-sum-exp.
 * With `lse` given (the backward), P = e^(S - lse) instead. */
static AVX512 float causal_softmax_row(float *s, int64_t i, int64_t n16, const float *lse) {
    const int64_t seen = i + 1, full = seen / LANES * LANES;
    const __mmask16 tail = (__mmask16)((1u << (seen - full)) - 1u);
    float shift;
    if (lse) {
        shift = *lse;
    } else {
        __m512 top = _mm512_set1_ps(-INFINITY);
        for (int64_t l = 0; l < full; l += LANES) top = _mm512_max_ps(top, _mm512_loadu_ps(s + l));
        if (tail) top = _mm512_max_ps(top, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), tail, s + full));
        shift = _mm512_reduce_max_ps(top);
    }
    const __m512 base = _mm512_set1_ps(shift);
    __m512 total = _mm512_setzero_ps();
    for (int64_t l = 0; l < n16; l += LANES) {
        const __mmask16 live = l + LANES <= seen ? (__mmask16)0xFFFF : l < seen ? tail : (__mmask16)0;
        const __m512 e = _mm512_maskz_mov_ps(live, exp16(_mm512_sub_ps(_mm512_loadu_ps(s + l), base)));
        total = _mm512_add_ps(total, e);
        _mm512_storeu_ps(s + l, e);
    }
    if (lse) return *lse;
    const float sum = _mm512_reduce_add_ps(total), inverse = 1.0f / sum;
    const __m512 factor = _mm512_set1_ps(inverse);
    for (int64_t l = 0; l < seen; l += LANES) _mm512_storeu_ps(s + l, _mm512_mul_ps(_mm512_loadu_ps(s + l), factor));
    return shift + logf(sum);
}

/* The longest of the R rows between bounds, rounded up to whole registers of keys. */
static int64_t longest_row(const int64_t *bounds, int64_t R) {
    int64_t longest = 0;
    for (int64_t r = 0; r < R; ++r)
        if (bounds[r + 1] - bounds[r] > longest) longest = bounds[r + 1] - bounds[r];
    return (longest + LANES - 1) / LANES * LANES;
}

/* q: (H, T, D) at q + h * q_h + t * q_t (d contiguous); k, v: (Hkv, T, D) likewise with their own strides; query
 * head h reads kv head h / (H / Hkv). Rows: positions bounds[r] .. bounds[r + 1] - 1 for r < R, each attending
 * causally within itself. out: (T, H, D) contiguous; lse: (H, T). D a multiple of 16, at most 128.
 * Returns 0, or -1 if scratch memory could not be had (out is then incomplete). */
AVX512 int training_attention_forward(const float *q, int64_t q_h, int64_t q_t, const float *k, int64_t k_h,
                                      int64_t k_t, const float *v, int64_t v_h, int64_t v_t, const int64_t *bounds,
                                      int64_t R, int64_t H, int64_t Hkv, int64_t D, float scale, float *out,
                                      float *lse, int threads) {
    const int64_t T = bounds[R], group = H / Hkv, n16_max = longest_row(bounds, R);
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *kt = malloc((size_t)(D * n16_max) * sizeof(float));
        float *s = malloc((size_t)(n16_max * n16_max) * sizeof(float));
        if (!kt || !s) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < R * H; ++task) {
            if (!kt || !s) continue;
            const int64_t r = task / H, h = task % H, t0 = bounds[r], n = bounds[r + 1] - t0;
            const int64_t n16 = (n + LANES - 1) / LANES * LANES, g = h / group;
            if (n <= 0) continue;
            const float *qh = q + h * q_h + t0 * q_t, *kg = k + g * k_h + t0 * k_t, *vg = v + g * v_h + t0 * v_t;
            transpose_rows(kg, k_t, n, D, n16, kt);
            causal_scores(qh, q_t, kt, n, n16, D, scale, s);
            for (int64_t i = 0; i < n; ++i) lse[h * T + t0 + i] = causal_softmax_row(s + i * n16, i, n16, NULL);
            causal_weigh(s, n16, vg, v_t, n, D, out + (t0 * H + h) * D, H * D);
        }
        free(kt);
        free(s);
    }
    return failed ? -1 : 0;
}

/* The backward of training_attention_forward: out, dout (T, H, D) contiguous, lse from the forward. dq: (H, T, D),
 * dk, dv: (Hkv, T, D), all contiguous, written whole. Returns 0, or -1 if scratch memory could not be had. */
AVX512 int training_attention_backward(const float *q, int64_t q_h, int64_t q_t, const float *k, int64_t k_h,
                                       int64_t k_t, const float *v, int64_t v_h, int64_t v_t, const float *out,
                                       const float *dout, const float *lse, const int64_t *bounds, int64_t R,
                                       int64_t H, int64_t Hkv, int64_t D, float scale, float *dq, float *dk,
                                       float *dv, int threads) {
    const int64_t T = bounds[R], group = H / Hkv, n16_max = longest_row(bounds, R);
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *kt = malloc((size_t)(D * n16_max) * sizeof(float));
        float *vt = malloc((size_t)(D * n16_max) * sizeof(float));
        float *p = malloc((size_t)(n16_max * n16_max) * sizeof(float));
        float *ds = malloc((size_t)(n16_max * n16_max) * sizeof(float));
        float *rowsum = malloc((size_t)n16_max * sizeof(float));
        const int ready = kt && vt && p && ds && rowsum;
        if (!ready) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < R * Hkv; ++task) {
            if (!ready) continue;
            const int64_t r = task / Hkv, g = task % Hkv, t0 = bounds[r], n = bounds[r + 1] - t0;
            const int64_t n16 = (n + LANES - 1) / LANES * LANES;
            if (n <= 0) continue;
            const float *kg = k + g * k_h + t0 * k_t, *vg = v + g * v_h + t0 * v_t;
            float *dkg = dk + (g * T + t0) * D, *dvg = dv + (g * T + t0) * D;
            memset(dkg, 0, (size_t)(n * D) * sizeof(float));
            memset(dvg, 0, (size_t)(n * D) * sizeof(float));
            transpose_rows(kg, k_t, n, D, n16, kt);
            transpose_rows(vg, v_t, n, D, n16, vt);
            for (int64_t h = g * group; h < (g + 1) * group; ++h) {
                const float *qh = q + h * q_h + t0 * q_t, *oh = out + (t0 * H + h) * D, *doh = dout + (t0 * H + h) * D;
                for (int64_t i = 0; i < n; ++i) {  /* rowsum(dO * O) */
                    __m512 acc = _mm512_setzero_ps();
                    for (int64_t d = 0; d < D; d += LANES)
                        acc = _mm512_fmadd_ps(_mm512_loadu_ps(doh + i * H * D + d), _mm512_loadu_ps(oh + i * H * D + d), acc);
                    rowsum[i] = _mm512_reduce_add_ps(acc);
                }
                causal_scores(qh, q_t, kt, n, n16, D, scale, p);
                for (int64_t i = 0; i < n; ++i) causal_softmax_row(p + i * n16, i, n16, lse + h * T + t0 + i);
                causal_scores(doh, H * D, vt, n, n16, D, 1.0f, ds);  /* dP */
                for (int64_t i = 0; i < n; ++i) {  /* dS = scale * P * (dP - rowsum), zeros after i (dP is not
                                                     * computed past the query's block: never read, never multiplied) */
                    const __m512 offset = _mm512_set1_ps(rowsum[i]), factor = _mm512_set1_ps(scale);
                    const int64_t seen = i + 1, full = seen / LANES * LANES;
                    const __mmask16 tail = (__mmask16)((1u << (seen - full)) - 1u);
                    for (int64_t l = 0; l < n16; l += LANES) {
                        const __mmask16 live = l + LANES <= seen ? (__mmask16)0xFFFF : l < seen ? tail : (__mmask16)0;
                        const __m512 grad = _mm512_maskz_sub_ps(live, _mm512_loadu_ps(ds + i * n16 + l), offset);
                        _mm512_storeu_ps(ds + i * n16 + l, _mm512_maskz_mul_ps(
                                             live, _mm512_mul_ps(_mm512_loadu_ps(p + i * n16 + l), grad), factor));
                    }
                }
                causal_weigh(ds, n16, kg, k_t, n, D, dq + (h * T + t0) * D, D);
                causal_gather(ds, n16, qh, q_t, n, D, dkg, D);
                causal_gather(p, n16, doh, H * D, n, D, dvg, D);
            }
        }
        free(kt);
        free(vt);
        free(p);
        free(ds);
        free(rowsum);
    }
    return failed ? -1 : 0;
}
