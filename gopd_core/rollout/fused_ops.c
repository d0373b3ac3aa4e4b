/* Fused elementwise steps of a Llama-family layer for the bf16 scorer (`gopd_core/fused_layers.py`): RMSNorm and
 * SwiGLU (silu(gate) * up), each one pass where torch runs ~6 and 2 ops with a buffer each.
 *
 * Each reproduces the roundings of the transformers module it replaces:
 * - RMSNorm over bf16 (bf16 weights): the mean of squares and x * rsqrt(mean + eps) in float32, rounded to bf16,
 *   times the bf16 weight, rounded again (`weight * hidden.to(input_dtype)`);
 * - SwiGLU over bf16 (the MLP's gate and up projections): s = bf16(silu(gate)), y = bf16(s * up).
 * Inference only (no backward). Built into the native library by rollout/native.py; AVX512-BF16 functions, called
 * only where the CPU reports avx512_bf16. Rows (or entries) split across threads; entries contiguous.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "exp16.h"

#define FUSED __attribute__((target("avx512f,avx512bf16,avx512bw,avx512vl")))
#define FUSED_INLINE static inline __attribute__((always_inline, target("avx512f,avx512bf16,avx512bw,avx512vl")))

/* 16 bf16 -> float32 (exact), `live` of them (the rest 0). */
FUSED_INLINE __m512 widen(const uint16_t *x, __mmask16 live) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(live, x)), 16));
}

/* float32 -> bf16, rounded to nearest even (as torch rounds), `live` of 16 stored. */
FUSED_INLINE void narrow(uint16_t *y, __m512 v, __mmask16 live) {
    _mm256_mask_storeu_epi16(y, live, (__m256i)_mm512_cvtneps_pbh(v));
}

FUSED_INLINE __mmask16 lanes(int64_t left) { return left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1u); }

FUSED_INLINE __m512 silu16(__m512 g) {
    return _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
}

/* y (rows, n) bf16 = RMSNorm of x (rows, n) bf16 with bf16 weight w. */
FUSED void rms_norm_bf16(const uint16_t *x, int64_t rows, int64_t n, const uint16_t *w, float eps, uint16_t *y,
                         int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; ++r) {
        const uint16_t *row = x + r * n;
        __m512 squares = _mm512_setzero_ps();
        for (int64_t i = 0; i < n; i += 16) {
            __m512 v = widen(row + i, lanes(n - i));
            squares = _mm512_fmadd_ps(v, v, squares);
        }
        const __m512 inverse = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(squares) / (float)n + eps));
        for (int64_t i = 0; i < n; i += 16) {
            const __mmask16 live = lanes(n - i);
            __m512 rounded = _mm512_cvtpbh_ps(_mm512_cvtneps_pbh(_mm512_mul_ps(widen(row + i, live), inverse)));
            narrow(y + r * n + i, _mm512_mul_ps(widen(w + i, live), rounded), live);
        }
    }
}

/* y = bf16(bf16(silu(gate)) * up) over count bf16 entries. */
FUSED void swiglu_bf16(const uint16_t *gate, const uint16_t *up, int64_t count, uint16_t *y, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < count; i += 16) {
        const __mmask16 live = lanes(count - i);
        __m512 s = _mm512_cvtpbh_ps(_mm512_cvtneps_pbh(silu16(widen(gate + i, live))));
        narrow(y + i, _mm512_mul_ps(s, widen(up + i, live)), live);
    }
}
