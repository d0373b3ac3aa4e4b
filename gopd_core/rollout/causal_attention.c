/* Causal self-attention over whole sequences (scoring's forward pass) in bf16, softmax in float32
 * (AVX512-BF16: vdpbf16ps, two products per lane per instruction, float32 accumulation).
 *
 * 1. Per (row, kv head), keys and values are copied once into the operand layouts of vdpbf16ps:
 *    keys (ceil(L / 16), D / 2, 16, 2): for each pair of head dims, 16 keys' two values side by side;
 *    values (ceil(L / 16) * 8, D, 2): for each pair of positions, every head dim's two values side by side.
 *    Positions past L are zeros.
 * 2. Each task is QROWS consecutive queries of one head. Their scores against every key up to the last
 *    query's position go to a float32 scratch (QROWS, ceil(L / 16) * 16), 8 queries x 16 keys per tile.
 * 3. Per query: the maximum over the keys it may see (positions <= its own), e^(s - max) with a
 *    vectorised exp, the total, and the weights rounded to bf16 (zeros past its position).
 * 4. weights @ values, a tile of queries x D lanes at a time, divided by the total, stored as bf16 into
 *    out (B, L, H, D), the layout the output projection reads.
 * A whole row of scores per query fits the L2 cache at scoring lengths (QROWS x L x 4 bytes: 32 KB at
 * 512 positions), so the exact softmax needs no running rescale. Built with small_gemm.c by
 * gopd_core/rollout/native.py into one library; native.py calls it only where the CPU reports avx512_bf16.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#include "exp16.h"

#define QROWS 16  /* queries per task */
#define TILE 8    /* queries per score tile */
#define KEYS 16   /* keys per score tile: one register of float32 lanes */

#define AVX512BF16 __attribute__((target("avx512f,avx512bf16,avx512bw,avx512vl")))
#define INLINE static inline __attribute__((always_inline))

/* Step 1 for one (row, kv head): k and v at position l are k + l * stride (D bf16, contiguous). */
static void pack_head(const uint16_t *k, const uint16_t *v, int64_t stride, int64_t L, int64_t D,
                      uint32_t *keys, uint16_t *values) {
    const int64_t D2 = D / 2, padded = (L + KEYS - 1) / KEYS * KEYS;
    for (int64_t l = 0; l < padded; ++l) {
        uint32_t *dst = keys + (l / KEYS) * D2 * KEYS + l % KEYS;
        if (l < L) {
            const uint32_t *src = (const uint32_t *)(k + l * stride);
            for (int64_t p = 0; p < D2; ++p) dst[p * KEYS] = src[p];
        } else {
            for (int64_t p = 0; p < D2; ++p) dst[p * KEYS] = 0;
        }
        uint16_t *pair = values + (l / 2) * D * 2 + l % 2;
        for (int64_t d = 0; d < D; ++d) pair[2 * d] = l < L ? v[l * stride + d] : 0;
    }
}

/* Step 2: scores of `rows` <= TILE queries (pairs of bf16 at q + r * q_stride) against one key block. */
INLINE AVX512BF16 void score_tile(const int rows, const uint32_t *q, int64_t q_stride, const uint32_t *keys,
                                  int64_t D2, float scale, float *s, int64_t s_stride) {
    __m512 acc[TILE];
    for (int r = 0; r < rows; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t p = 0; p < D2; ++p) {
        __m512bh kp = (__m512bh)_mm512_loadu_si512((const void *)(keys + p * KEYS));
        for (int r = 0; r < rows; ++r)
            acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_set1_epi32((int)q[r * q_stride + p]), kp);
    }
    for (int r = 0; r < rows; ++r) _mm512_storeu_ps(s + r * s_stride, _mm512_mul_ps(acc[r], _mm512_set1_ps(scale)));
}

/* Step 3 for one query that may see `seen` keys: bf16 weights into w (zeros up to `width`), returns 1 / total. */
INLINE AVX512BF16 float softmax_row(const float *s, int64_t seen, int64_t width, uint16_t *w) {
    __m512 top = _mm512_set1_ps(-INFINITY);
    int64_t l = 0;
    for (; l + KEYS <= seen; l += KEYS) top = _mm512_max_ps(top, _mm512_loadu_ps(s + l));
    const __mmask16 tail = (__mmask16)((1u << (seen - l)) - 1u);
    if (tail) top = _mm512_max_ps(top, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), tail, s + l));
    const __m512 shift = _mm512_set1_ps(_mm512_reduce_max_ps(top));
    __m512 total = _mm512_setzero_ps();
    for (l = 0; l < width; l += KEYS) {
        __mmask16 live = l + KEYS <= seen ? (__mmask16)0xFFFF : l < seen ? tail : (__mmask16)0;
        __m512 e = _mm512_maskz_mov_ps(live, exp16(_mm512_sub_ps(_mm512_loadu_ps(s + l), shift)));
        total = _mm512_add_ps(total, e);
        _mm256_storeu_si256((__m256i *)(w + l), (__m256i)_mm512_cvtneps_pbh(e));
    }
    return 1.0f / _mm512_reduce_add_ps(total);
}

/* Step 4: out[r] = (w[r] @ values) * inverse[r] for `rows` queries, D = 16 * CHUNKS, over `width` keys. */
INLINE AVX512BF16 void weigh_tile(const int rows, const int chunks, const uint16_t *w, int64_t w_stride,
                                  const uint16_t *values, int64_t width, const float *inverse, uint16_t *out,
                                  int64_t out_stride) {
    __m512 acc[TILE][8];
    const int64_t D = 16 * chunks;
    for (int r = 0; r < rows; ++r)
        for (int c = 0; c < chunks; ++c) acc[r][c] = _mm512_setzero_ps();
    for (int64_t l = 0; l < width; l += 2) {
        __m512bh vp[8];
        for (int c = 0; c < chunks; ++c) vp[c] = (__m512bh)_mm512_loadu_si512((const void *)(values + (l * D + c * 32)));
        for (int r = 0; r < rows; ++r) {
            __m512bh wp = (__m512bh)_mm512_set1_epi32(*(const int *)(w + r * w_stride + l));
            for (int c = 0; c < chunks; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], wp, vp[c]);
        }
    }
    for (int r = 0; r < rows; ++r)
        for (int c = 0; c < chunks; ++c)
            _mm256_storeu_si256((__m256i *)(out + r * out_stride + c * 16),
                                (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[r][c], _mm512_set1_ps(inverse[r]))));
}

/* Step 4 over a task's queries: the tile height keeps the accumulators (rows x chunks) within 16 registers. */
INLINE AVX512BF16 void weigh_rows(const int chunks, int rows, const uint16_t *w, int64_t w_stride,
                                  const uint16_t *values, int64_t width, const float *inverse, uint16_t *out,
                                  int64_t out_stride) {
    const int height = chunks >= 8 ? 2 : chunks >= 4 ? 4 : 8;
    for (int r = 0; r < rows; r += height) {
        int n = rows - r < height ? rows - r : height;
        const uint16_t *wr = w + r * w_stride;
        uint16_t *o = out + r * out_stride;
        switch (n) {  /* constant heights so the tile's loops unroll */
        case 1: weigh_tile(1, chunks, wr, w_stride, values, width, inverse + r, o, out_stride); break;
        case 2: weigh_tile(2, chunks, wr, w_stride, values, width, inverse + r, o, out_stride); break;
        case 3: weigh_tile(3, chunks, wr, w_stride, values, width, inverse + r, o, out_stride); break;
        case 4: weigh_tile(4, chunks, wr, w_stride, values, width, inverse + r, o, out_stride); break;
        case 5: weigh_tile(5, chunks, wr, w_stride, values, width, inverse + r, o, out_stride); break;
        case 6: weigh_tile(6, chunks, wr, w_stride, values, width, inverse + r, o, out_stride); break;
        case 7: weigh_tile(7, chunks, wr, w_stride, values, width, inverse + r, o, out_stride); break;
        default: weigh_tile(8, chunks, wr, w_stride, values, width, inverse + r, o, out_stride); break;
        }
    }
}

/* q, k, v: bf16, element (b, h, l, d) at x + b * x_strides[0] + h * x_strides[1] + l * x_strides[2] + d
 * (k and v share strides, with Hkv heads; query head h reads kv head h / (H / Hkv)). D is a multiple of 16
 * and at most 128, every stride even. out: (B, L, H, D) bf16. scale: the scores' factor (1 / sqrt(D)).
 * Returns 0, or -1 if its scratch memory could not be allocated (out is then incomplete). */
AVX512BF16 int causal_attention_bf16(const uint16_t *q, const int64_t *q_strides, const uint16_t *k,
                                      const uint16_t *v, const int64_t *kv_strides, int64_t B, int64_t H,
                                      int64_t Hkv, int64_t L, int64_t D, float scale, uint16_t *out, int threads) {
    const int64_t padded = (L + KEYS - 1) / KEYS * KEYS, D2 = D / 2, group = H / Hkv;
    const int64_t blocks = (L + QROWS - 1) / QROWS, head_elements = padded * D;
    uint32_t *keys = (uint32_t *)malloc((size_t)(B * Hkv * head_elements) * sizeof(uint16_t));
    uint16_t *values = (uint16_t *)malloc((size_t)(B * Hkv * head_elements) * sizeof(uint16_t));
    const int chunks = (int)(D / 16);
    int failed = !keys || !values;
#pragma omp parallel num_threads(threads) if (!failed)
    {
        float *s = (float *)malloc((size_t)(QROWS * padded) * sizeof(float));
        uint16_t *w = (uint16_t *)malloc((size_t)(QROWS * padded) * sizeof(uint16_t));
        const int ready = s && w && keys && values;
        float inverse[QROWS];
        if (!ready) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t bg = 0; bg < B * Hkv; ++bg) {
            if (!keys || !values) continue;
            int64_t b = bg / Hkv, g = bg % Hkv;
            pack_head(k + b * kv_strides[0] + g * kv_strides[1], v + b * kv_strides[0] + g * kv_strides[1],
                      kv_strides[2], L, D, keys + bg * head_elements / 2, values + bg * head_elements);
        }
        /* the implicit barrier above: every head is packed before any task reads one */
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < B * H * blocks; ++task) {
            if (!ready) continue;
            /* longest tasks (the last queries of a head) first, so the dynamic schedule ends evenly */
            int64_t block = blocks - 1 - task % blocks, bh = task / blocks, b = bh / H, h = bh % H;
            int64_t first = block * QROWS, rows = L - first < QROWS ? L - first : QROWS;
            int64_t width = (first + rows + KEYS - 1) / KEYS * KEYS;  /* keys the last query may see, padded */
            const uint32_t *head_keys = keys + (b * Hkv + h / group) * head_elements / 2;
            const uint16_t *head_values = values + (b * Hkv + h / group) * head_elements;
            const uint32_t *qr = (const uint32_t *)(q + b * q_strides[0] + h * q_strides[1] + first * q_strides[2]);
            for (int64_t r = 0; r < rows; r += TILE) {
                int n = rows - r < TILE ? (int)(rows - r) : TILE;
                for (int64_t l = 0; l < width; l += KEYS) {
                    const uint32_t *qt = qr + r * q_strides[2] / 2, *kt = head_keys + l * D2;
                    float *st = s + r * padded + l;
                    if (n == TILE) score_tile(TILE, qt, q_strides[2] / 2, kt, D2, scale, st, padded);
                    else for (int i = 0; i < n; ++i) score_tile(1, qt + i * q_strides[2] / 2, 0, kt, D2, scale,
                                                                st + i * padded, padded);
                }
            }
            for (int64_t r = 0; r < rows; ++r) inverse[r] = softmax_row(s + r * padded, first + r + 1, width, w + r * padded);
            uint16_t *o = out + ((b * L + first) * H + h) * D;
            switch (chunks) {
            case 2: weigh_rows(2, (int)rows, w, padded, head_values, width, inverse, o, H * D); break;
            case 4: weigh_rows(4, (int)rows, w, padded, head_values, width, inverse, o, H * D); break;
            case 8: weigh_rows(8, (int)rows, w, padded, head_values, width, inverse, o, H * D); break;
            default: weigh_rows(chunks, (int)rows, w, padded, head_values, width, inverse, o, H * D); break;
            }
        }
        free(s);
        free(w);
    }
    free(keys);
    free(values);
    return failed ? -1 : 0;
}

/* bf16 -> float32 for 16 values: the bf16 bits are the float's upper half. */
INLINE AVX512BF16 __m512 load_bf16(const uint16_t *x) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)x)), 16));
}

INLINE AVX512BF16 __m512 load_bf16_tail(const uint16_t *x, __mmask16 live, float fill) {
    __m512i bits = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(live, x)), 16);
    return _mm512_mask_blend_ps(live, _mm512_set1_ps(fill), _mm512_castsi512_ps(bits));
}

/* log sum_v e^(logits[n, v]) in float32 for each of N rows of V bf16 logits (row n at logits + n * stride):
 * the scorer's logsumexp without a float32 copy of the logits. Two passes per row, the maximum then the sum of
 * e^(x - max), the second from the L2 cache (a row of 151,936 bf16 logits is 297 KB). Rows split across threads. */
AVX512BF16 void logsumexp_bf16(const uint16_t *logits, int64_t N, int64_t V, int64_t stride, float *out, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; ++n) {
        const uint16_t *row = logits + n * stride;
        const int64_t full = V / 16 * 16;
        const __mmask16 tail = (__mmask16)((1u << (V - full)) - 1u);
        __m512 top = _mm512_set1_ps(-INFINITY);
        __mmask16 nan = 0;
        for (int64_t v = 0; v < full; v += 16) {
            __m512 x = load_bf16(row + v);
            nan |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
            top = _mm512_max_ps(top, x);
        }
        if (tail) {
            __m512 x = load_bf16_tail(row + full, tail, -INFINITY);
            nan |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
            top = _mm512_max_ps(top, x);
        }
        const float peak = _mm512_reduce_max_ps(top);
        if (nan || peak == INFINITY || peak == -INFINITY) {  /* as torch's logsumexp: NaN, +inf, or all -inf */
            out[n] = nan ? NAN : peak;
            continue;
        }
        const __m512 shift = _mm512_set1_ps(peak);
        __m512 total = _mm512_setzero_ps();
        for (int64_t v = 0; v < full; v += 16) total = _mm512_add_ps(total, exp16(_mm512_sub_ps(load_bf16(row + v), shift)));
        if (tail) total = _mm512_add_ps(total, _mm512_maskz_mov_ps(tail, exp16(_mm512_sub_ps(load_bf16_tail(row + full, tail, 0.0f), shift))));
        out[n] = peak + logf(_mm512_reduce_add_ps(total));
    }
}

/* The update's gradient of g[n] * log softmax(logits[n])[target[n]] with respect to bf16 logits, in bf16:
 * out[n, v] = -g[n] * e^(logits[n, v] - lse[n]), plus g[n] at v = target[n] (added in float32 before rounding,
 * as torch's float32 softmax gradient then cast would), rounded to nearest even. lse: the rows' log-sum-exp
 * (`logsumexp_bf16`). One pass over the logits and one write of the gradient, both bf16, where the float32
 * way copies, exponentiates, scales and casts a float32 (N, V) buffer. out is (N, V) contiguous. */
AVX512BF16 void logprob_grad_bf16(const uint16_t *logits, int64_t N, int64_t V, int64_t stride, const float *lse,
                                  const float *grad, const int64_t *targets, uint16_t *out, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; ++n) {
        const uint16_t *row = logits + n * stride;
        uint16_t *o = out + n * V;
        const int64_t full = V / 16 * 16, target = targets[n];
        const __mmask16 tail = (__mmask16)((1u << (V - full)) - 1u);
        const __m512 shift = _mm512_set1_ps(lse[n]), scale = _mm512_set1_ps(-grad[n]), floor = _mm512_set1_ps(-87.3f);
        for (int64_t v = 0; v < full; v += 16) {
            __m512 x = _mm512_sub_ps(load_bf16(row + v), shift);
            __m512 y = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, floor, _CMP_GE_OQ), _mm512_mul_ps(exp16(x), scale));
            _mm256_storeu_si256((__m256i *)(o + v), (__m256i)_mm512_cvtneps_pbh(y));
        }
        if (tail) {
            __m512 x = _mm512_sub_ps(load_bf16_tail(row + full, tail, 0.0f), shift);
            __m512 y = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, floor, _CMP_GE_OQ) & tail, _mm512_mul_ps(exp16(x), scale));
            _mm256_mask_storeu_epi16(o + full, tail, (__m256i)_mm512_cvtneps_pbh(y));
        }
        if (target >= 0 && target < V) {  /* (-g p_t) + g in float32, then rounded, as the float32 way */
            float x = 0.0f;
            const uint32_t bits = (uint32_t)row[target] << 16;
            memcpy(&x, &bits, sizeof x);
            float p = x - lse[n] >= -87.3f ? expf(x - lse[n]) : 0.0f;
            float value = p * -grad[n] + grad[n];
            uint32_t word;
            memcpy(&word, &value, sizeof word);
            if ((word & 0x7fffffffu) > 0x7f800000u) o[target] = (uint16_t)((word >> 16) | 0x40u);
            else o[target] = (uint16_t)((word + 0x7fffu + ((word >> 16) & 1u)) >> 16);
        }
    }
}
