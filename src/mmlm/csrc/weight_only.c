/* Weight-only matmuls for decoding on a CPU: y = x W^T, W read as stored.
 *
 * Decoding a token reads every weight once, so its speed is the speed at which the weights stream in. These
 * loops read two storages at memory speed (PyTorch's own int4 kernel reads at a fifth of it on a 2-core Xeon):
 *
 *   Q4_1 blocks (llama.cpp's layout, as a GGUF file stores them): 32 weights in 20 bytes, an fp16 scale d, an
 *   fp16 minimum m and 16 bytes of 4-bit codes q (byte j: weight j in its low nibble, weight j + 16 in its high
 *   one); w = d q + m. So  sum_k w_k x_k = sum_blocks d (sum_j q_j x_j) + m (sum_j x_j),  and sum_j x_j is the
 *   same for every output row: computed once per call.
 *
 *   int8 rows: w = s_n q, one bfloat16 scale s_n per output row n.
 *
 * x and y are float32, row-major, M rows; the M rows share each block as it is read (batched decoding). The
 * output rows are split between threads (OpenMP, the runtime PyTorch itself loaded). mmlm/native.py compiles
 * this file with the machine's C compiler (-O3 -march=native) the first time it is needed; the plain C loops
 * are the reference the AVX-512 ones are tested against (tests/test_quant.py).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__) && \
    defined(__F16C__)
#define MMLM_AVX512 1
#endif
#if defined(__F16C__) || defined(MMLM_AVX512)
#include <immintrin.h>
#endif

#define QK 32           /* weights per Q4_1 block */
#define BLOCK_BYTES 20  /* d, m (fp16 each), 16 bytes of codes */
#define MAX_ROWS 8      /* x rows sharing one pass over the weights */
#define TILE 16         /* output rows per unit of thread work */
#define PREFETCH 2560    /* bytes ahead of the weights being read */

static inline float fp16_to_float(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    float f;
    if (exp == 0) {
        f = ldexpf((float)man, -24);
        memcpy(&bits, &f, 4);
        bits |= sign;
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    }
    memcpy(&f, &bits, 4);
    return f;
#endif
}

static inline float bf16_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t float_to_bf16(float f) {  /* round to nearest even, as PyTorch's cast */
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40);  /* NaN stays NaN */
    return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

/* ------------------------------------------------------------------------------------------------ Q4_1 */

/* Rows of blocks are stored in groups of four, so that one 64-byte load holds four blocks' codes:
 *   a group: d[4] (fp16), m[4] (fp16), codes[4][16]        80 bytes = four 20-byte blocks
 *   the last K / 32 % 4 blocks: each d, m, codes[16]          20 bytes, as in a GGUF file
 * (mmlm/quant.py packs and unpacks this layout; it holds a GGUF's Q4_1 bytes, reordered.)
 *
 * x is rounded to int8 per block of 32, as llama.cpp does for its dot products: x_j ~ dx xq_j, dx = max|x| / 127.
 * Then  sum_j w_j x_j ~ d dx (sum_j q_j xq_j) + m dx (sum_j xq_j),  the integer sums four bytes at a time
 * (AVX-512 VNNI's vpdpbusd: unsigned codes times signed xq): exactly the rounded x times W, in float32. */

typedef struct {
    int8_t *xq;   /* (M, K) in the weights' order: per group, the blocks' first halves, then their second ones */
    float *dx;    /* (M, nb) */
    float *dxv;   /* (M, groups, 16): a group's four dx, each repeated for its four lanes of the integer sums */
    float *xs;    /* (M, nb) sums of the rounded x per block: dx sum_j xq_j */
} QuantX;

static int quantize_x(const float *x, int64_t M, int64_t K, QuantX *q) {
    const int64_t nb = K / QK, groups = nb / 4;
    q->xq = malloc((size_t)(M * K) + 64);
    q->dx = malloc(sizeof(float) * (size_t)(M * nb + 1));
    q->dxv = malloc(sizeof(float) * (size_t)(M * groups * 16 + 1));
    q->xs = malloc(sizeof(float) * (size_t)(M * nb + 1));
    if (!q->xq || !q->dx || !q->dxv || !q->xs) return 0;
    for (int64_t r = 0; r < M; r++) {
        for (int64_t b = 0; b < nb; b++) {
            const float *xb = x + r * K + b * QK;
            /* where this block's halves go: in a group, after the earlier blocks' halves */
            int8_t *lo, *hi;
            if (b < 4 * groups) {
                lo = q->xq + r * K + (b / 4) * 128 + (b % 4) * 16;
                hi = lo + 64;
            } else {
                lo = q->xq + r * K + b * QK;
                hi = lo + 16;
            }
#ifdef MMLM_AVX512
            const __m512 x0 = _mm512_loadu_ps(xb), x1 = _mm512_loadu_ps(xb + 16);
            const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
            const float dx = amax / 127.0f, inv = dx > 0.0f ? 1.0f / dx : 0.0f;
            const __m512 vinv = _mm512_set1_ps(inv);  /* rounded to nearest, ties to even */
            const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(x0, vinv));
            const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(x1, vinv));
            _mm_storeu_si128((__m128i *)lo, _mm512_cvtepi32_epi8(q0));
            _mm_storeu_si128((__m128i *)hi, _mm512_cvtepi32_epi8(q1));
            const int32_t isum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
#else
            float amax = 0.0f;
            for (int j = 0; j < QK; j++) amax = fmaxf(amax, fabsf(xb[j]));
            const float dx = amax / 127.0f, inv = dx > 0.0f ? 1.0f / dx : 0.0f;
            int32_t isum = 0;
            for (int j = 0; j < 16; j++) {
                lo[j] = (int8_t)nearbyintf(xb[j] * inv);
                hi[j] = (int8_t)nearbyintf(xb[j + 16] * inv);
                isum += lo[j] + hi[j];
            }
#endif
            const float sum = dx * (float)isum;
            if (b < 4 * groups)
                for (int i = 0; i < 4; i++) q->dxv[(r * groups + b / 4) * 16 + (b % 4) * 4 + i] = dx;
            q->dx[r * nb + b] = dx;
            q->xs[r * nb + b] = sum;
        }
    }
    return 1;
}

static void free_x(QuantX *q) {
    free(q->xq);
    free(q->dx);
    free(q->dxv);
    free(q->xs);
}

/* out[r] = sum_k x[r][k] w[k] for one output row's groups and blocks `w`, R rows of x. */
static inline __attribute__((always_inline)) void q4_1_row(const uint8_t *w, int64_t K, const QuantX *q, int64_t r0,
                                                          int R, float *out) {
    const int64_t nb = K / QK, groups = nb / 4;
    float tail[MAX_ROWS];
    for (int r = 0; r < R; r++) tail[r] = 0.0f;
#ifdef MMLM_AVX512
    __m512 acc[MAX_ROWS];
    __m128 macc[MAX_ROWS];
    for (int r = 0; r < R; r++) {
        acc[r] = _mm512_setzero_ps();
        macc[r] = _mm_setzero_ps();
    }
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    const __m512i spread = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    for (int64_t g = 0; g < groups; g++) {
        const uint8_t *p = w + g * 80;
        _mm_prefetch((const char *)(p + PREFETCH), _MM_HINT_T0);
        __m512 d = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(
            _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)p))));                /* d0 x4, d1 x4, d2 x4, d3 x4 */
        __m128 m = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)(p + 8)));
        __m512i codes = _mm512_loadu_si512(p + 16);
        __m512i lo = _mm512_and_si512(codes, low4);                            /* the blocks' first halves */
        __m512i hi = _mm512_and_si512(_mm512_srli_epi16(codes, 4), low4);      /* their second halves */
        for (int r = 0; r < R; r++) {
            const int8_t *xr = q->xq + (r0 + r) * K + g * 128;
            __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(xr));
            s = _mm512_dpbusd_epi32(s, hi, _mm512_loadu_si512(xr + 64));
            __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(s), _mm512_loadu_ps(q->dxv + ((r0 + r) * groups + g) * 16));
            acc[r] = _mm512_fmadd_ps(f, d, acc[r]);
            macc[r] = _mm_fmadd_ps(m, _mm_loadu_ps(q->xs + (r0 + r) * nb + g * 4), macc[r]);
        }
    }
#else
    for (int64_t g = 0; g < groups; g++) {
        const uint8_t *p = w + g * 80;
        for (int i = 0; i < 4; i++) {
            uint16_t dh, mh;
            memcpy(&dh, p + 2 * i, 2);
            memcpy(&mh, p + 8 + 2 * i, 2);
            const float d = fp16_to_float(dh), m = fp16_to_float(mh);
            const uint8_t *codes = p + 16 + 16 * i;
            for (int r = 0; r < R; r++) {
                const int8_t *lo = q->xq + (r0 + r) * K + g * 128 + 16 * i, *hi = lo + 64;
                int32_t s = 0;
                for (int j = 0; j < 16; j++) s += (codes[j] & 0xF) * lo[j] + (codes[j] >> 4) * hi[j];
                const int64_t b = 4 * g + i;
                tail[r] += d * q->dx[(r0 + r) * nb + b] * (float)s + m * q->xs[(r0 + r) * nb + b];
            }
        }
    }
#endif
    for (int64_t b = 4 * groups; b < nb; b++) {  /* the blocks after the last group */
        const uint8_t *p = w + groups * 80 + (b - 4 * groups) * BLOCK_BYTES;
        uint16_t dh, mh;
        memcpy(&dh, p, 2);
        memcpy(&mh, p + 2, 2);
        const float d = fp16_to_float(dh), m = fp16_to_float(mh);
#ifdef MMLM_AVX512
        const __m128i codes = _mm_loadu_si128((const __m128i *)(p + 4)), low4 = _mm_set1_epi8(0x0F);
        const __m128i lo = _mm_and_si128(codes, low4), hi = _mm_and_si128(_mm_srli_epi16(codes, 4), low4);
#endif
        for (int r = 0; r < R; r++) {
            const int8_t *xlo = q->xq + (r0 + r) * K + b * QK, *xhi = xlo + 16;
            int32_t s = 0;
#ifdef MMLM_AVX512
            __m128i v = _mm_dpbusd_epi32(_mm_setzero_si128(), lo, _mm_loadu_si128((const __m128i *)xlo));
            v = _mm_dpbusd_epi32(v, hi, _mm_loadu_si128((const __m128i *)xhi));
            v = _mm_add_epi32(v, _mm_shuffle_epi32(v, 0x4E));
            s = _mm_cvtsi128_si32(_mm_add_epi32(v, _mm_shuffle_epi32(v, 0xB1)));
#else
            for (int j = 0; j < 16; j++) s += (p[4 + j] & 0xF) * xlo[j] + (p[4 + j] >> 4) * xhi[j];
#endif
            tail[r] += d * q->dx[(r0 + r) * nb + b] * (float)s + m * q->xs[(r0 + r) * nb + b];
        }
    }
#ifdef MMLM_AVX512
    for (int r = 0; r < R; r++) {
        __m128 h = _mm_add_ps(macc[r], _mm_movehl_ps(macc[r], macc[r]));
        h = _mm_add_ss(h, _mm_movehdup_ps(h));
        out[r] = _mm512_reduce_add_ps(acc[r]) + _mm_cvtss_f32(h) + tail[r];
    }
#else
    for (int r = 0; r < R; r++) out[r] = tail[r];
#endif
}

/* y (M, N) = x (M, K) W^T, W (N, K / 32 * 20 bytes) in the grouped Q4_1 layout above. K % 32 == 0.
 * Returns 0 when memory for x's rounding could not be had (y untouched). */
int mmlm_q4_1_matmul(const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t N, float *y, int threads) {
    const int64_t row_bytes = K / QK * BLOCK_BYTES;
    QuantX q;
    if (!quantize_x(x, M, K, &q)) {
        free_x(&q);
        return 0;
    }
    const int64_t tiles = (N + TILE - 1) / TILE;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && N * K >= 65536)
    for (int64_t t = 0; t < tiles; t++) {
        float out[MAX_ROWS];
        const int64_t n_end = (t + 1) * TILE < N ? (t + 1) * TILE : N;
        for (int64_t n = t * TILE; n < n_end; n++) {
            for (int64_t r0 = 0; r0 < M; r0 += MAX_ROWS) {
                int R = (int)(M - r0 < MAX_ROWS ? M - r0 : MAX_ROWS);
                switch (R) {  /* a constant R per call: the row loop unrolls */
                    case 1: q4_1_row(w + n * row_bytes, K, &q, r0, 1, out); break;
                    case 2: q4_1_row(w + n * row_bytes, K, &q, r0, 2, out); break;
                    case 3: q4_1_row(w + n * row_bytes, K, &q, r0, 3, out); break;
                    case 4: q4_1_row(w + n * row_bytes, K, &q, r0, 4, out); break;
                    case 5: q4_1_row(w + n * row_bytes, K, &q, r0, 5, out); break;
                    case 6: q4_1_row(w + n * row_bytes, K, &q, r0, 6, out); break;
                    case 7: q4_1_row(w + n * row_bytes, K, &q, r0, 7, out); break;
                    default: q4_1_row(w + n * row_bytes, K, &q, r0, 8, out); break;
                }
                for (int r = 0; r < R; r++) y[(r0 + r) * N + n] = out[r];
            }
        }
    }
    free_x(&q);
    return 1;
}

/* Block b of an output row: its d, m and codes. */
static inline void q4_1_block(const uint8_t *row, int64_t nb, int64_t b, float *d, float *m, const uint8_t **codes) {
    const int64_t groups = nb / 4;
    const uint8_t *dp, *mp;
    if (b < 4 * groups) {
        const uint8_t *p = row + (b / 4) * 80;
        dp = p + 2 * (b % 4), mp = p + 8 + 2 * (b % 4), *codes = p + 16 + 16 * (b % 4);
    } else {
        const uint8_t *p = row + groups * 80 + (b - 4 * groups) * BLOCK_BYTES;
        dp = p, mp = p + 2, *codes = p + 4;
    }
    uint16_t dh, mh;
    memcpy(&dh, dp, 2);
    memcpy(&mh, mp, 2);
    *d = fp16_to_float(dh);
    *m = fp16_to_float(mh);
}

/* W (N, K) in float32 (bf16 = 0) or bfloat16 (bf16 = 1), for a prefill's dense GEMM. */
void mmlm_q4_1_dequantize(const uint8_t *w, int64_t N, int64_t K, void *out, int bf16, int threads) {
    const int64_t nb = K / QK;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && N * K >= 65536)
    for (int64_t n = 0; n < N; n++) {
        for (int64_t b = 0; b < nb; b++) {
            float d, m, v[QK];
            const uint8_t *codes;
            q4_1_block(w + n * nb * BLOCK_BYTES, nb, b, &d, &m, &codes);
            for (int j = 0; j < 16; j++) {
                v[j] = (float)(codes[j] & 0xF) * d + m;
                v[j + 16] = (float)(codes[j] >> 4) * d + m;
            }
            if (bf16)
                for (int j = 0; j < QK; j++) ((uint16_t *)out)[n * K + b * QK + j] = float_to_bf16(v[j]);
            else
                memcpy((float *)out + n * K + b * QK, v, sizeof v);
        }
    }
}

/* ------------------------------------------------------------------------------------------------ int8 rows */

static inline __attribute__((always_inline)) void int8_row(
        const int8_t *w, int64_t K, const float *x, int64_t ldx, int R, float *out) {
    int64_t k = 0;
    float acc[MAX_ROWS];
    for (int r = 0; r < R; r++) acc[r] = 0.0f;
#ifdef MMLM_AVX512
    __m512 v[MAX_ROWS];
    for (int r = 0; r < R; r++) v[r] = _mm512_setzero_ps();
    for (; k + 16 <= K; k += 16) {
        __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + k))));
        for (int r = 0; r < R; r++) v[r] = _mm512_fmadd_ps(q, _mm512_loadu_ps(x + r * ldx + k), v[r]);
    }
    for (int r = 0; r < R; r++) acc[r] = _mm512_reduce_add_ps(v[r]);
#endif
    for (; k < K; k++)
        for (int r = 0; r < R; r++) acc[r] += (float)w[k] * x[r * ldx + k];
    for (int r = 0; r < R; r++) out[r] = acc[r];
}

/* y (M, N) = x (M, K) (s[:, None] W)^T, W (N, K) int8, s (N) bfloat16. */
void mmlm_int8_matmul(const float *x, int64_t M, int64_t K, const int8_t *w, const uint16_t *scales, int64_t N,
                      float *y, int threads) {
    const int64_t tiles = (N + TILE - 1) / TILE;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && N * K >= 65536)
    for (int64_t t = 0; t < tiles; t++) {
        float out[MAX_ROWS];
        const int64_t n_end = (t + 1) * TILE < N ? (t + 1) * TILE : N;
        for (int64_t n = t * TILE; n < n_end; n++) {
            const float s = bf16_to_float(scales[n]);
            for (int64_t r0 = 0; r0 < M; r0 += MAX_ROWS) {
                int R = (int)(M - r0 < MAX_ROWS ? M - r0 : MAX_ROWS);
                switch (R) {
                    case 1: int8_row(w + n * K, K, x + r0 * K, K, 1, out); break;
                    case 2: int8_row(w + n * K, K, x + r0 * K, K, 2, out); break;
                    case 3: int8_row(w + n * K, K, x + r0 * K, K, 3, out); break;
                    case 4: int8_row(w + n * K, K, x + r0 * K, K, 4, out); break;
                    case 5: int8_row(w + n * K, K, x + r0 * K, K, 5, out); break;
                    case 6: int8_row(w + n * K, K, x + r0 * K, K, 6, out); break;
                    case 7: int8_row(w + n * K, K, x + r0 * K, K, 7, out); break;
                    default: int8_row(w + n * K, K, x + r0 * K, K, 8, out); break;
                }
                for (int r = 0; r < R; r++) y[(r0 + r) * N + n] = s * out[r];
            }
        }
    }
}

/* Whether this build has the AVX-512 loops (else the plain C ones). */
int mmlm_simd(void) {
#ifdef MMLM_AVX512
    return 1;
#else
    return 0;
#endif
}
