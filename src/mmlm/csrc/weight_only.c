/* mmlm's compiled loops for decoding on a CPU: weight-only matmuls y = x W^T with W read as stored, and a whole
 * Llama block's decoding step in one call. Further down, three loops for sampling a UNet (attention with small
 * heads, GroupNorm + SiLU, Winograd's convolutions), each beside the plain formula it replaces in
 * mmlm/models/kernels.
 *
 * Decoding a token reads every weight once. At one token per row PyTorch's per-op dispatch and the Python between
 * the ops cost as much as those reads, and its int4 kernel reads at a fifth of a 2-core Xeon's bandwidth. Two
 * storages, as mmlm/quant.py packs them:
 *
 *   Q4_1 blocks (llama.cpp's: 32 weights in 20 bytes, an fp16 scale d, an fp16 minimum m and 16 bytes of 4-bit
 *   codes q, byte j holding weight j in its low nibble and weight j + 16 in its high one; w = d q + m), a row's
 *   blocks in groups of four so that one 64-byte load holds four blocks' codes.
 *
 *   int8 rows: w = s_n q, one bfloat16 scale s_n per output row n.
 *
 * x and y are float32, row-major, M rows; up to 8 rows share each block as it is read (batched decoding). x is
 * written as two int8 digits per block of 32 and multiplied with AVX-512 VNNI's byte dot products, or as the one
 * int16 they make with AVX2's 16-bit ones (below). The output rows are split between threads (OpenMP: the runtime
 * PyTorch itself loaded, found by soname). mmlm/native.py compiles this file with the machine's C compiler
 * (-O3 -march=native) the first time it is needed. Without AVX-512 VNNI or AVX2 the plain C loops run;
 * tests/test_native.py checks all three builds against the formulas (mmlm/quant.py's q4_1_reference and
 * round_to_int8_blocks).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__) && \
    defined(__F16C__)
#define MMLM_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define MMLM_AVX2 1  /* no byte dot products: x as one int16 per weight (below) and 16-bit ones (vpmaddwd) */
#endif
#if defined(__F16C__) || defined(MMLM_AVX512) || defined(MMLM_AVX2)
#include <immintrin.h>
#endif

#define QK 32           /* weights per Q4_1 block */
#define BLOCK_BYTES 20  /* d, m (fp16 each), 16 bytes of codes */
#define MAX_ROWS 8      /* x rows sharing one pass over the weights */
#define TILE 16         /* output rows per unit of thread work */
#define PREFETCH 2560    /* bytes ahead of the weights being read */
#define STREAMS 4        /* a thread reads its output rows from this many places at once (more prefetch streams) */

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

/* The loop both matmuls share: every output row n (threads split the rows in tiles; a tile's rows come from
 * STREAMS places of W at once) for every chunk of up to MAX_ROWS rows of x starting at r0 (R of them), BODY
 * computing out[0..R) for them. ROWS(R, ROW) calls ROW(r) with r a constant, so each loop over x's rows unrolls. */
static inline int64_t stream_row(int64_t i, int64_t N) {
    return N % STREAMS ? i : (i % STREAMS) * (N / STREAMS) + i / STREAMS;
}

#define EACH_OUTPUT_ROW(BODY)                                                                                       \
    _Pragma("omp parallel for schedule(static) num_threads(threads) if (threads > 1 && N * K >= 65536)")          \
    for (int64_t t = 0; t < (N + TILE - 1) / TILE; t++) {                                                          \
        float out[MAX_ROWS];                                                                                       \
        const int64_t n_end = (t + 1) * TILE < N ? (t + 1) * TILE : N;                                             \
        for (int64_t i = t * TILE; i < n_end; i++) {                                                               \
            const int64_t n = stream_row(i, N);                                                                    \
            for (int64_t r0 = 0; r0 < M; r0 += MAX_ROWS) {                                                         \
                const int R = (int)(M - r0 < MAX_ROWS ? M - r0 : MAX_ROWS);                                        \
                BODY                                                                                               \
            }                                                                                                      \
        }                                                                                                          \
    }

#define ROWS(R, ROW)                                                                                               \
    switch (R) {                                                                                                   \
        case 1: ROW(1); break;                                                                                     \
        case 2: ROW(2); break;                                                                                     \
        case 3: ROW(3); break;                                                                                     \
        case 4: ROW(4); break;                                                                                     \
        case 5: ROW(5); break;                                                                                     \
        case 6: ROW(6); break;                                                                                     \
        case 7: ROW(7); break;                                                                                     \
        default: ROW(8); break;                                                                                    \
    }

/* ------------------------------------------------------------------------------------------------ Q4_1 */

/* Rows of blocks are stored in groups of four, so that one 64-byte load holds four blocks' codes:
 *   a group: d[4] (fp16), m[4] (fp16), codes[4][16]        80 bytes = four 20-byte blocks
 *   the last K / 32 % 4 blocks: each d, m, codes[16]          20 bytes, as in a GGUF file
 * (mmlm/quant.py packs and unpacks this layout; it holds a GGUF's Q4_1 bytes, reordered.)
 *
 * x is written as two int8 digits per block of 32 (llama.cpp rounds it to the first only): with dx = max|x| / 127,
 * a = x / dx, xq = round(a), xr = round(254 (a - xq)), so x_j ~ dr (254 xq_j + xr_j), dr = dx / 254: 15 bits where
 * bfloat16 keeps 8. Then  sum_j w_j x_j ~ d dr (254 sum_j q_j xq_j + sum_j q_j xr_j) + m sum_j x^_j,  the integer
 * sums four bytes at a time (AVX-512 VNNI's vpdpbusd: unsigned codes times signed digits): exactly the rounded x
 * times W, in float32.
 *
 * AVX2 has no byte dot product that takes two digits cheaply, so there x is stored as the one int16 they make,
 * 254 xq + xr (|.| <= 32258), and multiplied 16 bits at a time (vpmaddwd) with the codes widened to int16. Its
 * order in a group: for blocks (0, 1) then (2, 3), four vectors of 16: weights 0-7 of the first block and of the
 * second, then 8-15, 16-23, 24-31 (what unpacking 32 bytes of codes into 16-bit lanes gives); one vector's
 * eight int32 sums are then four of each block. Outside groups (the tail, int8 rows), x's own order. */

typedef struct {
    int8_t *xq;   /* (M, 2, K): per row xq then xr, in the weights' order: per group, the blocks' first halves,
                     then their second ones. AVX2: (M, K) int16 254 xq + xr, in the order above */
    float *dx;    /* (M, nb): dr */
    float *dxv;   /* (M, groups, 16): a group's four dr, each repeated for its four lanes of the integer sums */
    float *xs;    /* (M, nb) sums of the rounded x per block */
    float *total; /* (M) sums of the rounded x over the blocks that come in pairs */
} QuantX;

/* grouped = 1: the digits in the Q4_1 groups' order, dxv per group (d0 x4, d1 x4, d2 x4, d3 x4);
 * grouped = 0: in x's own order, dxv per pair of blocks (d0 x8, d1 x8), for int8 rows. */
#ifdef MMLM_AVX2
/* Where x's weights j .. j + 7 (j % 8 == 0) of block b go in a row of the int16 x (AVX2's order above; the blocks
 * after the last group in pairs the same way, a last odd one in x's order; not grouped: x's order throughout). */
static inline int64_t x16_at(int64_t b, int j, int grouped, int64_t groups, int64_t nb) {
    if (b < 4 * groups) {
        const int64_t i = b % 4;
        return (b / 4) * 128 + ((i / 2) * 4 + j / 8) * 16 + (i % 2) * 8;
    }
    const int64_t t = b - 4 * groups;
    if (!grouped || t >= (nb - 4 * groups) / 2 * 2) return b * QK + j;
    return (b - t % 2) * QK + (j / 8) * 16 + (t % 2) * 8;
}

static inline int32_t hsum8_epi32(__m256i v) {
    __m128i h = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4E));
    return _mm_cvtsi128_si32(_mm_add_epi32(h, _mm_shuffle_epi32(h, 0xB1)));
}

static inline float hsum8_ps(__m256 v) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}

/* e^xc = e^r 2^n for eight floats xc in range: n = round(xc / ln 2), r = xc - n ln 2 (|r| <= ln 2 / 2, ln 2 in two
 * parts so that n ln2_hi is exact), e^r by its Taylor polynomial to degree 6 (Horner); returns e^r, n in *n. */
static inline __m256 exp8_reduced(__m256 xc, __m256 *n) {
    *n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(*n, _mm256_set1_ps(0.693359375f), xc);
    r = _mm256_fnmadd_ps(*n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.0f / 720.0f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    return _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
}

/* 2^e for integer e with -126 <= e <= 127, put in the exponent bits */
static inline __m256 pow2_8(__m256i e) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e, _mm256_set1_epi32(127)), 23));
}

/* e^x for eight floats, within 3 ulp of expf where that is a normal float (0 where it is subnormal, inf past the
 * largest; NaN stays NaN). */
static inline __m256 exp8(__m256 x) {
    /* ln of the least normal float and of the largest */
    const __m256 lo = _mm256_set1_ps(-87.33654f), hi = _mm256_set1_ps(88.72283f);
    const __m256 inf = _mm256_set1_ps(INFINITY), under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    const __m256 over = _mm256_cmp_ps(x, hi, _CMP_GT_OQ);
    __m256 n;
    const __m256 p = exp8_reduced(_mm256_min_ps(_mm256_max_ps(x, lo), hi), &n);
    /* 2^n in two factors, so that n = 128 (x near 88.7) stays finite */
    const __m256i e = _mm256_cvtps_epi32(n), e1 = _mm256_srai_epi32(e, 1);
    const __m256 y = _mm256_mul_ps(_mm256_mul_ps(p, pow2_8(e1)), pow2_8(_mm256_sub_epi32(e, e1)));
    const __m256 y2 = _mm256_blendv_ps(_mm256_blendv_ps(y, _mm256_setzero_ps(), under), inf, over);
    return _mm256_blendv_ps(y2, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));  /* NaN stays NaN */
}

/* exp8 for x <= 0 (a score minus the largest): nothing overflows, so 2^n is one factor; below ln of the least
 * normal float (and at -inf) the result is 0. Within 3 ulp of expf, as exp8. */
static inline __m256 exp8_nonpositive(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.33654f), under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    __m256 n;
    const __m256 p = exp8_reduced(_mm256_max_ps(x, lo), &n);
    return _mm256_andnot_ps(under, _mm256_mul_ps(p, pow2_8(_mm256_cvtps_epi32(n))));
}

/* 2^x for eight floats x within [-126, 126] (the normal floats' exponents): 2^n 2^r, n = round(x), |r| <= 1/2,
 * 2^r by a degree-5 polynomial fitted for least relative error (within 2.3e-7, 2 ulp). */
static inline __m256 exp2_8_normal(__m256 x) {
    const __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), r = _mm256_sub_ps(x, n);
    __m256 p = _mm256_set1_ps(1.3266970636e-3f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(9.6754599363e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.5507425219e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(2.4022121727e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(6.9314694405e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0000001192f));
    return _mm256_mul_ps(p, pow2_8(_mm256_cvtps_epi32(n)));
}

/* 2^x for eight floats x <= 0 (a score minus the largest, in units of log2 e). Below -126 x is taken as -126: a
 * weight of 2^-126 beside the largest's 1 instead of 0. Half the time of exp8_nonpositive on Zen 1 (no ln 2
 * split, no underflow blend, one degree less). */
static inline __m256 exp2_8_nonpositive(__m256 x) {
    return exp2_8_normal(_mm256_max_ps(x, _mm256_set1_ps(-126.0f)));
}

/* 1 / d for eight floats d >= 1: the approximate reciprocal (12 bits) and one Newton step (~2 ulp), where a
 * division takes ~3x as long on Zen 1. */
static inline __m256 recip8(__m256 d) {
    const __m256 r = _mm256_rcp_ps(d);
    return _mm256_mul_ps(r, _mm256_fnmadd_ps(d, r, _mm256_set1_ps(2.0f)));
}

/* silu(z) = z / (1 + e^-z) for eight floats: e^-z = 2^(-z log2 e), its exponent kept within the normal floats'
 * (so z beyond +-87 gives z and ~0, as the formula). */
static inline __m256 silu8(__m256 z) {
    const __m256 x = _mm256_mul_ps(z, _mm256_set1_ps(-1.44269504f));
    const __m256 e = exp2_8_normal(_mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-126.0f)), _mm256_set1_ps(126.0f)));
    return _mm256_mul_ps(z, recip8(_mm256_add_ps(_mm256_set1_ps(1.0f), e)));
}
#endif

/* float32 vectors of the widest width the build has, for the float loops (int8 rows with K % 32 != 0, attention,
 * RMSNorm): VF lanes, VF_MAX registers of accumulators at most; vf_int8(p) VF int8 at p as floats. */
#if defined(__AVX512F__)
typedef __m512 vf;
#define VF 16
#define VF_MAX 8
#define vf_zero _mm512_setzero_ps
#define vf_set1 _mm512_set1_ps
#define vf_load _mm512_loadu_ps
#define vf_store _mm512_storeu_ps
#define vf_fmadd _mm512_fmadd_ps
#define vf_sum _mm512_reduce_add_ps
#define vf_int8(p) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p))))
#elif defined(MMLM_AVX2)
typedef __m256 vf;
#define VF 8
#define VF_MAX 12
#define vf_zero _mm256_setzero_ps
#define vf_set1 _mm256_set1_ps
#define vf_load _mm256_loadu_ps
#define vf_store _mm256_storeu_ps
#define vf_fmadd _mm256_fmadd_ps
#define vf_sum hsum8_ps
#define vf_int8(p) _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p))))
#endif

static int quantize_x(const float *x, int64_t M, int64_t K, QuantX *q, int grouped) {
    const int64_t nb = K / QK, groups = grouped ? nb / 4 : 0, pairs = nb / 2;
    q->xq = aligned_alloc(64, (size_t)((2 * M * K + 127) / 64 * 64));  /* no vector load splits a cache line */
    q->dx = malloc(sizeof(float) * (size_t)(M * nb + 1));
    q->dxv = malloc(sizeof(float) * (size_t)(M * nb * 8 + 1));
    q->xs = malloc(sizeof(float) * (size_t)(M * nb + 1));
    q->total = malloc(sizeof(float) * (size_t)(M + 1));
    if (!q->xq || !q->dx || !q->dxv || !q->xs || !q->total) return 0;
    for (int64_t r = 0; r < M; r++) {
        q->total[r] = 0.0f;
        for (int64_t b = 0; b < nb; b++) {
            const float *xb = x + r * K + b * QK;
            /* where this block's halves go: in a group, after the earlier blocks' halves */
            int8_t *lo, *hi;
            if (b < 4 * groups) {
                lo = q->xq + 2 * r * K + (b / 4) * 128 + (b % 4) * 16;
                hi = lo + 64;
            } else {
                lo = q->xq + 2 * r * K + b * QK;
                hi = lo + 16;
            }
#ifdef MMLM_AVX512
            const __m512 x0 = _mm512_loadu_ps(xb), x1 = _mm512_loadu_ps(xb + 16);
            const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
            const float dx = amax / 127.0f, inv = dx > 0.0f ? 1.0f / dx : 0.0f;
            const __m512 vinv = _mm512_set1_ps(inv), v254 = _mm512_set1_ps(254.0f);
            const __m512 a0 = _mm512_mul_ps(x0, vinv), a1 = _mm512_mul_ps(x1, vinv);
            /* rounded to nearest, ties to even (the default rounding mode) */
            const __m512 r0 = _mm512_roundscale_ps(a0, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            const __m512 r1 = _mm512_roundscale_ps(a1, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            const __m512i q0 = _mm512_cvtps_epi32(r0), q1 = _mm512_cvtps_epi32(r1);
            const __m512i e0 = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_sub_ps(a0, r0), v254));
            const __m512i e1 = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_sub_ps(a1, r1), v254));
            _mm_storeu_si128((__m128i *)lo, _mm512_cvtepi32_epi8(q0));
            _mm_storeu_si128((__m128i *)hi, _mm512_cvtepi32_epi8(q1));
            _mm_storeu_si128((__m128i *)(lo + K), _mm512_cvtepi32_epi8(e0));
            _mm_storeu_si128((__m128i *)(hi + K), _mm512_cvtepi32_epi8(e1));
            const int32_t isum = 254 * _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1)) +
                                 _mm512_reduce_add_epi32(_mm512_add_epi32(e0, e1));
#elif defined(MMLM_AVX2)
            (void)lo, (void)hi;
            int16_t *x16 = (int16_t *)q->xq + r * K;
            __m256 xv[4], top = _mm256_setzero_ps();
            for (int i = 0; i < 4; i++) {
                xv[i] = _mm256_loadu_ps(xb + 8 * i);
                top = _mm256_max_ps(top, _mm256_andnot_ps(_mm256_set1_ps(-0.0f), xv[i]));
            }
            __m128 t4 = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
            t4 = _mm_max_ps(t4, _mm_movehl_ps(t4, t4));
            const float amax = _mm_cvtss_f32(_mm_max_ss(t4, _mm_movehdup_ps(t4)));
            const float dx = amax / 127.0f, inv = dx > 0.0f ? 1.0f / dx : 0.0f;
            const __m256 vinv = _mm256_set1_ps(inv), v254 = _mm256_set1_ps(254.0f);
            __m256i sums = _mm256_setzero_si256();
            for (int i = 0; i < 4; i++) {  /* weights 8i .. 8i + 7 */
                const __m256 a = _mm256_mul_ps(xv[i], vinv);
                const __m256 r = _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                const __m256 e = _mm256_round_ps(_mm256_mul_ps(_mm256_sub_ps(a, r), v254),
                                                 _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                const __m256i v = _mm256_cvtps_epi32(_mm256_fmadd_ps(r, v254, e));  /* 254 xq + xr: exact */
                sums = _mm256_add_epi32(sums, v);
                _mm_storeu_si128((__m128i *)(x16 + x16_at(b, 8 * i, grouped, groups, nb)),
                                 _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1)));
            }
            const int32_t isum = hsum8_epi32(sums);
#else
            float amax = 0.0f;
            for (int j = 0; j < QK; j++) amax = fmaxf(amax, fabsf(xb[j]));
            const float dx = amax / 127.0f, inv = dx > 0.0f ? 1.0f / dx : 0.0f;
            int32_t isum = 0;
            for (int j = 0; j < QK; j++) {
                const float a = xb[j] * inv, first = nearbyintf(a);
                const int8_t second = (int8_t)nearbyintf((a - first) * 254.0f);
                int8_t *digit = j < 16 ? lo + j : hi + j - 16;
                digit[0] = (int8_t)first;
                digit[K] = second;
                isum += 254 * (int32_t)first + second;
            }
#endif
            const float dr = dx / 254.0f, sum = dr * (float)isum;
            if (b < 4 * groups)
                for (int i = 0; i < 4; i++) q->dxv[(r * groups + b / 4) * 16 + (b % 4) * 4 + i] = dr;
            if (!grouped && b < 2 * pairs) {
                for (int i = 0; i < 8; i++) q->dxv[(r * pairs + b / 2) * 16 + (b % 2) * 8 + i] = dr;
                q->total[r] += sum;
            }
            q->dx[r * nb + b] = dr;
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
    free(q->total);
}

#ifdef MMLM_AVX2
/* A group's weights for the AVX2 loops: its four blocks' codes as int16 in x's order (wv), its scales d0 x4, d1 x4
 * (d01) and d2 x4, d3 x4 (d23), its minimums m. */
static inline __attribute__((always_inline)) void group_weights(const uint8_t *p, __m256i wv[8], __m256 *d01,
                                                                __m256 *d23, __m128 *m) {
    const __m256i low4 = _mm256_set1_epi8(0x0F), zero = _mm256_setzero_si256();
    const __m128 d4 = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)p));
    *d01 = _mm256_set_m128(_mm_permute_ps(d4, 0x55), _mm_permute_ps(d4, 0x00));
    *d23 = _mm256_set_m128(_mm_permute_ps(d4, 0xFF), _mm_permute_ps(d4, 0xAA));
    *m = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)(p + 8)));
    for (int h = 0; h < 2; h++) {
        const __m256i codes = _mm256_loadu_si256((const __m256i *)(p + 16 + 32 * h));  /* blocks 2h, 2h + 1 */
        const __m256i lo = _mm256_and_si256(codes, low4), hi = _mm256_and_si256(_mm256_srli_epi16(codes, 4), low4);
        wv[4 * h] = _mm256_unpacklo_epi8(lo, zero);      /* weights 0-7 of both blocks */
        wv[4 * h + 1] = _mm256_unpackhi_epi8(lo, zero);  /* 8-15 */
        wv[4 * h + 2] = _mm256_unpacklo_epi8(hi, zero);  /* 16-23 */
        wv[4 * h + 3] = _mm256_unpackhi_epi8(hi, zero);  /* 24-31 */
    }
}

/* The integer sums of blocks (0, 1) (s[0]) and (2, 3) (s[1]) of a group, four lanes each, x16 the group's x. */
static inline __attribute__((always_inline)) void group_sums(const __m256i wv[8], const int16_t *x16, __m256i s[2]) {
    for (int h = 0; h < 2; h++) {
        const __m256i *xv = (const __m256i *)(x16 + 64 * h);
        s[h] = _mm256_add_epi32(
            _mm256_add_epi32(_mm256_madd_epi16(wv[4 * h], _mm256_loadu_si256(xv)),
                             _mm256_madd_epi16(wv[4 * h + 1], _mm256_loadu_si256(xv + 1))),
            _mm256_add_epi32(_mm256_madd_epi16(wv[4 * h + 2], _mm256_loadu_si256(xv + 2)),
                             _mm256_madd_epi16(wv[4 * h + 3], _mm256_loadu_si256(xv + 3))));
    }
}
#endif

/* out[r] = x row r0 + r . W row w, for R rows of x; the groups from g0 on (0: all; q4_1_two_rows reads the groups
 * itself and passes their count, leaving this the blocks after them). */
static inline __attribute__((always_inline)) void q4_1_row(const uint8_t *w, int64_t K, const QuantX *q, int64_t r0,
                                                          int R, float *out, int64_t g0) {
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
    const __m512 v254 = _mm512_set1_ps(254.0f);
    for (int64_t g = g0; g < groups; g++) {
        const uint8_t *p = w + g * 80;
        _mm_prefetch((const char *)(p + PREFETCH), _MM_HINT_T0);
        __m512 d = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(
            _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)p))));                /* d0 x4, d1 x4, d2 x4, d3 x4 */
        __m128 m = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)(p + 8)));
        __m512i codes = _mm512_loadu_si512(p + 16);
        __m512i lo = _mm512_and_si512(codes, low4);                            /* the blocks' first halves */
        __m512i hi = _mm512_and_si512(_mm512_srli_epi16(codes, 4), low4);      /* their second halves */
        for (int r = 0; r < R; r++) {
            const int8_t *xr = q->xq + 2 * (r0 + r) * K + g * 128;
            __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(xr));
            s = _mm512_dpbusd_epi32(s, hi, _mm512_loadu_si512(xr + 64));
            __m512i e = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(xr + K));
            e = _mm512_dpbusd_epi32(e, hi, _mm512_loadu_si512(xr + K + 64));
            __m512 f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), v254, _mm512_cvtepi32_ps(e));  /* exact: < 2^24 */
            f = _mm512_mul_ps(f, _mm512_loadu_ps(q->dxv + ((r0 + r) * groups + g) * 16));
            acc[r] = _mm512_fmadd_ps(f, d, acc[r]);
            macc[r] = _mm_fmadd_ps(m, _mm_loadu_ps(q->xs + (r0 + r) * nb + g * 4), macc[r]);
        }
    }
#elif defined(MMLM_AVX2)
    __m256 acc[MAX_ROWS], acc2[MAX_ROWS];
    __m128 macc[MAX_ROWS];
    for (int r = 0; r < R; r++) {
        acc[r] = _mm256_setzero_ps();
        acc2[r] = _mm256_setzero_ps();
        macc[r] = _mm_setzero_ps();
    }
    const __m256i low4 = _mm256_set1_epi8(0x0F), zero = _mm256_setzero_si256();  /* the blocks after the groups */
    for (int64_t g = g0; g < groups; g++) {
        const uint8_t *p = w + g * 80;
        _mm_prefetch((const char *)(p + PREFETCH), _MM_HINT_T0);
        __m256i wv[8];
        __m256 d01, d23;
        __m128 m;
        group_weights(p, wv, &d01, &d23, &m);
        for (int r = 0; r < R; r++) {
            __m256i s[2];
            group_sums(wv, (const int16_t *)q->xq + (r0 + r) * K + g * 128, s);
            const float *dv = q->dxv + ((r0 + r) * groups + g) * 16;  /* exact: the sums are < 2^24 */
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[0]), _mm256_mul_ps(_mm256_loadu_ps(dv), d01), acc[r]);
            acc2[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[1]), _mm256_mul_ps(_mm256_loadu_ps(dv + 8), d23), acc2[r]);
            macc[r] = _mm_fmadd_ps(m, _mm_loadu_ps(q->xs + (r0 + r) * nb + g * 4), macc[r]);
        }
    }
#else
    for (int64_t g = g0; g < groups; g++) {
        const uint8_t *p = w + g * 80;
        for (int i = 0; i < 4; i++) {
            uint16_t dh, mh;
            memcpy(&dh, p + 2 * i, 2);
            memcpy(&mh, p + 8 + 2 * i, 2);
            const float d = fp16_to_float(dh), m = fp16_to_float(mh);
            const uint8_t *codes = p + 16 + 16 * i;
            for (int r = 0; r < R; r++) {
                const int8_t *lo = q->xq + 2 * (r0 + r) * K + g * 128 + 16 * i, *hi = lo + 64;
                int32_t s = 0;
                for (int j = 0; j < 16; j++)
                    s += (codes[j] & 0xF) * (254 * lo[j] + lo[j + K]) + (codes[j] >> 4) * (254 * hi[j] + hi[j + K]);
                const int64_t b = 4 * g + i;
                tail[r] += d * q->dx[(r0 + r) * nb + b] * (float)s + m * q->xs[(r0 + r) * nb + b];
            }
        }
    }
#endif
    int64_t after = 4 * groups;  /* the blocks after the last group */
#ifdef MMLM_AVX2
    for (; after + 2 <= nb; after += 2) {  /* in pairs, as half a group */
        const uint8_t *p = w + groups * 80 + (after - 4 * groups) * BLOCK_BYTES;
        uint16_t h[4];
        memcpy(h, p, 4);
        memcpy(h + 2, p + BLOCK_BYTES, 4);
        const __m128 dm = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)h));  /* d0, m0, d1, m1 */
        const __m256 dd = _mm256_set_m128(_mm_permute_ps(dm, 0xAA), _mm_permute_ps(dm, 0x00));
        const float m0 = _mm_cvtss_f32(_mm_permute_ps(dm, 0x55)), m1 = _mm_cvtss_f32(_mm_permute_ps(dm, 0xFF));
        const __m256i codes = _mm256_set_m128i(_mm_loadu_si128((const __m128i *)(p + BLOCK_BYTES + 4)),
                                               _mm_loadu_si128((const __m128i *)(p + 4)));
        const __m256i lo = _mm256_and_si256(codes, low4), hi = _mm256_and_si256(_mm256_srli_epi16(codes, 4), low4);
        const __m256i w0 = _mm256_unpacklo_epi8(lo, zero), w1 = _mm256_unpackhi_epi8(lo, zero);
        const __m256i w2 = _mm256_unpacklo_epi8(hi, zero), w3 = _mm256_unpackhi_epi8(hi, zero);
        for (int r = 0; r < R; r++) {
            const __m256i *xv = (const __m256i *)((const int16_t *)q->xq + (r0 + r) * K + after * QK);
            const __m256i sum = _mm256_add_epi32(
                _mm256_add_epi32(_mm256_madd_epi16(w0, _mm256_loadu_si256(xv)),
                                 _mm256_madd_epi16(w1, _mm256_loadu_si256(xv + 1))),
                _mm256_add_epi32(_mm256_madd_epi16(w2, _mm256_loadu_si256(xv + 2)),
                                 _mm256_madd_epi16(w3, _mm256_loadu_si256(xv + 3))));
            const float *dx = q->dx + (r0 + r) * nb + after, *xs = q->xs + (r0 + r) * nb + after;
            const __m256 dv = _mm256_set_m128(_mm_set1_ps(dx[1]), _mm_set1_ps(dx[0]));
            acc2[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_mul_ps(dv, dd), acc2[r]);
            tail[r] += m0 * xs[0] + m1 * xs[1];
        }
    }
#endif
    for (int64_t b = after; b < nb; b++) {
        const uint8_t *p = w + groups * 80 + (b - 4 * groups) * BLOCK_BYTES;
        uint16_t dh, mh;
        memcpy(&dh, p, 2);
        memcpy(&mh, p + 2, 2);
        const float d = fp16_to_float(dh), m = fp16_to_float(mh);
#if defined(MMLM_AVX512) || defined(MMLM_AVX2)
        const __m128i codes = _mm_loadu_si128((const __m128i *)(p + 4)), low4 = _mm_set1_epi8(0x0F);
        const __m128i lo = _mm_and_si128(codes, low4), hi = _mm_and_si128(_mm_srli_epi16(codes, 4), low4);
#endif
#ifdef MMLM_AVX2
        const __m256i wlo = _mm256_cvtepu8_epi16(lo), whi = _mm256_cvtepu8_epi16(hi);  /* weights 0-15, 16-31 */
#endif
        for (int r = 0; r < R; r++) {
            const int8_t *xlo = q->xq + 2 * (r0 + r) * K + b * QK, *xhi = xlo + 16;
            int32_t s = 0;
#ifdef MMLM_AVX512
            __m128i v = _mm_dpbusd_epi32(_mm_setzero_si128(), lo, _mm_loadu_si128((const __m128i *)xlo));
            v = _mm_dpbusd_epi32(v, hi, _mm_loadu_si128((const __m128i *)xhi));
            __m128i e = _mm_dpbusd_epi32(_mm_setzero_si128(), lo, _mm_loadu_si128((const __m128i *)(xlo + K)));
            e = _mm_dpbusd_epi32(e, hi, _mm_loadu_si128((const __m128i *)(xhi + K)));
            v = _mm_add_epi32(_mm_mullo_epi32(v, _mm_set1_epi32(254)), e);
            v = _mm_add_epi32(v, _mm_shuffle_epi32(v, 0x4E));
            s = _mm_cvtsi128_si32(_mm_add_epi32(v, _mm_shuffle_epi32(v, 0xB1)));
#elif defined(MMLM_AVX2)
            (void)xhi;
            const int16_t *x16 = (const int16_t *)q->xq + (r0 + r) * K + b * QK;
            s = hsum8_epi32(_mm256_add_epi32(_mm256_madd_epi16(wlo, _mm256_loadu_si256((const __m256i *)x16)),
                                             _mm256_madd_epi16(whi, _mm256_loadu_si256((const __m256i *)(x16 + 16)))));
#else
            for (int j = 0; j < 16; j++)
                s += (p[4 + j] & 0xF) * (254 * xlo[j] + xlo[j + K]) + (p[4 + j] >> 4) * (254 * xhi[j] + xhi[j + K]);
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
#elif defined(MMLM_AVX2)
    for (int r = 0; r < R; r++) {
        __m128 h = _mm_add_ps(macc[r], _mm_movehl_ps(macc[r], macc[r]));
        h = _mm_add_ss(h, _mm_movehdup_ps(h));
        out[r] = hsum8_ps(_mm256_add_ps(acc[r], acc2[r])) + _mm_cvtss_f32(h) + tail[r];
    }
#else
    for (int r = 0; r < R; r++) out[r] = tail[r];
#endif
}

#ifdef MMLM_AVX2
/* Batch 1: one x row against two weight rows, x's loads and the final horizontal sums shared between them (a row at
 * K = 576 is four groups, and its fixed cost was ~1/5 of its time). ya, yb = x . W row wa, x . W row wb. */
static void q4_1_two_rows(const uint8_t *wa, const uint8_t *wb, int64_t K, const QuantX *q, float *ya, float *yb) {
    const int64_t nb = K / QK, groups = nb / 4;
    const uint8_t *rows[2] = {wa, wb};
    __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()}, acc2[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    __m128 macc[2] = {_mm_setzero_ps(), _mm_setzero_ps()};
    for (int64_t g = 0; g < groups; g++) {
        const int16_t *x16 = (const int16_t *)q->xq + g * 128;
        const __m256 dv01 = _mm256_loadu_ps(q->dxv + g * 16), dv23 = _mm256_loadu_ps(q->dxv + g * 16 + 8);
        const __m128 xsum = _mm_loadu_ps(q->xs + g * 4);
        for (int r = 0; r < 2; r++) {  /* as q4_1_row's group loop */
            const uint8_t *p = rows[r] + g * 80;
            _mm_prefetch((const char *)(p + PREFETCH), _MM_HINT_T0);
            __m256i wv[8], s[2];
            __m256 d01, d23;
            __m128 m;
            group_weights(p, wv, &d01, &d23, &m);
            group_sums(wv, x16, s);
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[0]), _mm256_mul_ps(dv01, d01), acc[r]);
            acc2[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[1]), _mm256_mul_ps(dv23, d23), acc2[r]);
            macc[r] = _mm_fmadd_ps(m, xsum, macc[r]);
        }
    }
    float rest[2];  /* the blocks after the last group */
    q4_1_row(wa, K, q, 0, 1, rest, groups);
    q4_1_row(wb, K, q, 0, 1, rest + 1, groups);
    const __m256 both = _mm256_hadd_ps(_mm256_add_ps(acc[0], acc2[0]), _mm256_add_ps(acc[1], acc2[1]));
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(both), _mm256_extractf128_ps(both, 1));  /* a, a, b, b (partial) */
    h = _mm_add_ps(h, _mm_hadd_ps(macc[0], macc[1]));
    h = _mm_hadd_ps(h, h);                                                                   /* a, b, a, b */
    *ya = _mm_cvtss_f32(h) + rest[0];
    *yb = _mm_cvtss_f32(_mm_shuffle_ps(h, h, 1)) + rest[1];
}
#endif

/* y (M, N) = x (M, K) W^T, W (N, K / 32 * 20 bytes) in the grouped Q4_1 layout above. K % 32 == 0.
 * Returns 0 when memory for x's rounding could not be had (y untouched). */
int mmlm_q4_1_matmul(const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t N, float *y, int threads) {
    const int64_t row_bytes = K / QK * BLOCK_BYTES;
    QuantX q;
    if (!quantize_x(x, M, K, &q, 1)) {
        free_x(&q);
        return 0;
    }
#ifdef MMLM_AVX2
    if (M == 1) {  /* output rows two at a time, in the order EACH_OUTPUT_ROW takes them */
        _Pragma("omp parallel for schedule(static) num_threads(threads) if (threads > 1 && N * K >= 65536)")
        for (int64_t i = 0; i < N / 2 * 2; i += 2) {
            const int64_t na = stream_row(i, N), nb = stream_row(i + 1, N);
            q4_1_two_rows(w + na * row_bytes, w + nb * row_bytes, K, &q, y + na, y + nb);
        }
        if (N % 2) q4_1_row(w + stream_row(N - 1, N) * row_bytes, K, &q, 0, 1, y + stream_row(N - 1, N), 0);
        free_x(&q);
        return 1;
    }
#endif
#define Q4_ROW(rows) q4_1_row(w + n * row_bytes, K, &q, r0, rows, out, 0)
    EACH_OUTPUT_ROW({
        ROWS(R, Q4_ROW)
        for (int r = 0; r < R; r++) y[(r0 + r) * N + n] = out[r];
    })
#undef Q4_ROW
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

/* y (M, N) = x (M, K) (s[:, None] W)^T, W (N, K) int8, s (N) bfloat16, x in float32 (K % 32 != 0). */
static inline __attribute__((always_inline)) void int8_row_float(
        const int8_t *w, int64_t K, const float *x, int64_t ldx, int R, float *out) {
    int64_t k = 0;
    float acc[MAX_ROWS];
    for (int r = 0; r < R; r++) acc[r] = 0.0f;
#ifdef VF
    vf v[MAX_ROWS];
    for (int r = 0; r < R; r++) v[r] = vf_zero();
    for (; k + VF <= K; k += VF) {
        const vf q = vf_int8(w + k);
        for (int r = 0; r < R; r++) v[r] = vf_fmadd(q, vf_load(x + r * ldx + k), v[r]);
    }
    for (int r = 0; r < R; r++) acc[r] = vf_sum(v[r]);
#endif
    for (; k < K; k++)
        for (int r = 0; r < R; r++) acc[r] += (float)w[k] * x[r * ldx + k];
    for (int r = 0; r < R; r++) out[r] = acc[r];
}

/* The same with x as two int8 digits per block (K % 32 == 0; `quantize_x` in x's order): sum_k q_k x^_k =
 * sum_blocks dr (254 sum q xq + sum q xr). AVX-512 VNNI multiplies unsigned bytes by signed ones, so the weights go
 * in as q + 128 (q xor 0x80) and 128 sum x^ comes off at the end. */
static inline __attribute__((always_inline)) void int8_row_digits(
        const int8_t *w, int64_t K, const QuantX *q, int64_t r0, int R, float *out) {
    const int64_t nb = K / QK;
    float tail[MAX_ROWS];
    for (int r = 0; r < R; r++) tail[r] = 0.0f;
    int64_t b0 = 0;
#ifdef MMLM_AVX512
    const int64_t pairs = nb / 2;
    __m512 acc[MAX_ROWS];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    const __m512 v254 = _mm512_set1_ps(254.0f);
    for (int64_t c = 0; c < pairs; c++) {
        _mm_prefetch((const char *)(w + 64 * c + PREFETCH), _MM_HINT_T0);
        const __m512i wv = _mm512_xor_si512(_mm512_loadu_si512(w + 64 * c), flip);  /* q + 128, unsigned */
        for (int r = 0; r < R; r++) {
            const int8_t *xr = q->xq + 2 * (r0 + r) * K + 64 * c;
            __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv, _mm512_loadu_si512(xr));
            __m512i e = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv, _mm512_loadu_si512(xr + K));
            __m512 f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), v254, _mm512_cvtepi32_ps(e));
            acc[r] = _mm512_fmadd_ps(f, _mm512_loadu_ps(q->dxv + ((r0 + r) * pairs + c) * 16), acc[r]);
        }
    }
    for (int r = 0; r < R; r++) tail[r] = _mm512_reduce_add_ps(acc[r]) - 128.0f * q->total[r0 + r];
    b0 = 2 * pairs;
#elif defined(MMLM_AVX2)
    __m256 acc[MAX_ROWS];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        _mm_prefetch((const char *)(w + QK * b + PREFETCH), _MM_HINT_T0);
        const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + QK * b)));
        const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + QK * b + 16)));
        for (int r = 0; r < R; r++) {
            const int16_t *x16 = (const int16_t *)q->xq + (r0 + r) * K + QK * b;
            const __m256i s = _mm256_add_epi32(_mm256_madd_epi16(w0, _mm256_loadu_si256((const __m256i *)x16)),
                                               _mm256_madd_epi16(w1, _mm256_loadu_si256((const __m256i *)(x16 + 16))));
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(q->dx[(r0 + r) * nb + b]), acc[r]);
        }
    }
    for (int r = 0; r < R; r++) tail[r] = hsum8_ps(acc[r]);
    b0 = nb;
#endif
    for (int64_t b = b0; b < nb; b++)
        for (int r = 0; r < R; r++) {
            const int8_t *xr = q->xq + 2 * (r0 + r) * K + b * QK;
            int32_t s = 0;
            for (int j = 0; j < QK; j++) s += w[b * QK + j] * (254 * xr[j] + xr[j + K]);
            tail[r] += q->dx[(r0 + r) * nb + b] * (float)s;
        }
    for (int r = 0; r < R; r++) out[r] = tail[r];
}

/* y (M, N) = x (M, K) (s[:, None] W)^T, W (N, K) int8, s (N) bfloat16: x read as two int8 digits per block of 32
 * where K % 32 == 0, as float32 otherwise. Returns 0 when memory for x's digits could not be had. */
int mmlm_int8_matmul(const float *x, int64_t M, int64_t K, const int8_t *w, const uint16_t *scales, int64_t N,
                     float *y, int threads) {
    const int digits = K % QK == 0;
    QuantX q;
    memset(&q, 0, sizeof q);
    if (digits && !quantize_x(x, M, K, &q, 0)) {
        free_x(&q);
        return 0;
    }
#define INT8_ROW(rows)                                                                                             \
    do {                                                                                                           \
        if (digits) int8_row_digits(w + n * K, K, &q, r0, rows, out);                                              \
        else int8_row_float(w + n * K, K, x + r0 * K, K, rows, out);                                               \
    } while (0)
    EACH_OUTPUT_ROW({
        ROWS(R, INT8_ROW)
        const float s = bf16_to_float(scales[n]);
        for (int r = 0; r < R; r++) y[(r0 + r) * N + n] = s * out[r];
    })
#undef INT8_ROW
    free_x(&q);
    return 1;
}

/* ------------------------------------------------------------------------------------------------ decoding */
/* Two small steps of a decoding step, whose PyTorch ops cost more in dispatch than in arithmetic at one token. */

static inline float dot(const float *a, const float *b, int64_t n) {
    int64_t i = 0;
    float s = 0.0f;
#ifdef VF
    vf acc = vf_zero();
    for (; i + VF <= n; i += VF) acc = vf_fmadd(vf_load(a + i), vf_load(b + i), acc);
    s = vf_sum(acc);
#endif
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* y = w x / sqrt(mean(x^2) + eps) per row of n; x, y (rows, n), w (n). */
void mmlm_rms_norm(const float *x, int64_t rows, int64_t n, const float *w, float eps, float *y) {
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * n;
        const float scale = 1.0f / sqrtf(dot(xr, xr, n) / (float)n + eps);
        for (int64_t i = 0; i < n; i++) y[r * n + i] = w[i] * (xr[i] * scale);
    }
}

/* One query per row and head: out[b][h] = softmax(q k^T / sqrt(d) over the keys the mask keeps) v.
 * q (B, H, d) at strides (qb, qh); k, v (B, Hkv, S, d) at strides (kb, kh, d) and (vb, vh, d); mask (B, S) bytes
 * at stride mb (1 = may attend; NULL: every key), mb = 0 for one row shared by all; out (B, H, d) contiguous.
 * Head h reads key/value head h / (H / Hkv) (grouped-query attention). scores: B * H * S floats of room. */
void mmlm_decode_attention(const float *q, int64_t qb, int64_t qh, const float *k, int64_t kb, int64_t kh,
                           const float *v, int64_t vb, int64_t vh, const uint8_t *mask, int64_t mb, int64_t B,
                           int64_t H, int64_t Hkv, int64_t S, int64_t d, float *out, float *scores, int threads) {
    const float scale = 1.0f / sqrtf((float)d);
    const int64_t rep = H / Hkv;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && B * H * S * d >= 16384)
    for (int64_t bh = 0; bh < B * H; bh++) {
        const int64_t b = bh / H, h = bh % H, g = h / rep;
        const float *qr = q + b * qb + h * qh, *kr = k + b * kb + g * kh, *vr = v + b * vb + g * vh;
        const uint8_t *mr = mask ? mask + b * mb : NULL;
        float *p = scores + bh * S, *o = out + bh * d, top = -INFINITY;
        for (int64_t s = 0; s < S; s++) {
            p[s] = (mr && !mr[s]) ? -INFINITY : dot(qr, kr + s * d, d) * scale;
            top = p[s] > top ? p[s] : top;
        }
        for (int64_t i = 0; i < d; i++) o[i] = 0.0f;
        if (top == -INFINITY) {  /* no key to attend to: NaN, as softmax over nothing gives */
            for (int64_t i = 0; i < d; i++) o[i] = NAN;
            continue;
        }
        float total = 0.0f;
        int64_t s0 = 0;
#ifdef MMLM_AVX2
        __m256 sums = _mm256_setzero_ps();
        for (; s0 + 8 <= S; s0 += 8) {  /* -inf (a masked key) minus top gives exactly 0 */
            const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + s0), _mm256_set1_ps(top)));
            _mm256_storeu_ps(p + s0, e);
            sums = _mm256_add_ps(sums, e);
        }
        total = hsum8_ps(sums);
#endif
        for (int64_t s = s0; s < S; s++) {
            p[s] = p[s] == -INFINITY ? 0.0f : expf(p[s] - top);
            total += p[s];
        }
#ifdef VF
        if (d % VF == 0 && d <= VF * VF_MAX) {  /* the output row in registers while the values stream past */
            vf acc[VF_MAX];
            const int64_t parts = d / VF;
            for (int64_t j = 0; j < parts; j++) acc[j] = vf_zero();
            for (int64_t s = 0; s < S; s++) {
                if (p[s] == 0.0f) continue;
                const vf e = vf_set1(p[s]);
                for (int64_t j = 0; j < parts; j++) acc[j] = vf_fmadd(e, vf_load(vr + s * d + VF * j), acc[j]);
            }
            for (int64_t j = 0; j < parts; j++) vf_store(o + VF * j, acc[j]);
        } else
#endif
        {
            for (int64_t s = 0; s < S; s++)
                if (p[s] != 0.0f)
                    for (int64_t i = 0; i < d; i++) o[i] += p[s] * vr[s * d + i];
        }
        for (int64_t i = 0; i < d; i++) o[i] /= total;
    }
}

#ifdef MMLM_AVX2
/* One query of `mmlm_attention` (below): kT, vT (d, Sp), p (Sp) scratch, o (d) out. */
static inline __attribute__((always_inline)) void attention_query(const float *qr, const float *kT, const float *vT,
                                                                 float *p, int64_t S, int64_t Sp, int64_t d,
                                                                 float scale, float *o) {
    __m256 qs[64];  /* q log2(e) / sqrt(d) (scale), each broadcast (d <= 64: the caller's contract) */
    for (int64_t i = 0; i < d; i++) qs[i] = _mm256_set1_ps(qr[i] * scale);
    __m256 mx = _mm256_set1_ps(-INFINITY);
    int64_t s = 0;
    for (; s + 32 <= Sp; s += 32) {  /* four vectors of keys: four independent chains of multiply-adds */
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t i = 0; i < d; i++) {
            const float *kr = kT + i * Sp + s;
            a0 = _mm256_fmadd_ps(qs[i], _mm256_loadu_ps(kr), a0);
            a1 = _mm256_fmadd_ps(qs[i], _mm256_loadu_ps(kr + 8), a1);
            a2 = _mm256_fmadd_ps(qs[i], _mm256_loadu_ps(kr + 16), a2);
            a3 = _mm256_fmadd_ps(qs[i], _mm256_loadu_ps(kr + 24), a3);
        }
        _mm256_storeu_ps(p + s, a0);
        _mm256_storeu_ps(p + s + 8, a1);
        _mm256_storeu_ps(p + s + 16, a2);
        _mm256_storeu_ps(p + s + 24, a3);
        mx = _mm256_max_ps(mx, _mm256_max_ps(_mm256_max_ps(a0, a1), _mm256_max_ps(a2, a3)));
    }
    for (; s < Sp; s += 8) {
        __m256 sc = _mm256_setzero_ps();
        for (int64_t i = 0; i < d; i++) sc = _mm256_fmadd_ps(qs[i], _mm256_loadu_ps(kT + i * Sp + s), sc);
        _mm256_storeu_ps(p + s, sc);
    }
    for (int64_t j = S; j < Sp; j++) p[j] = -INFINITY;  /* the padding */
    for (s = Sp / 32 * 32; s < Sp; s += 8) mx = _mm256_max_ps(mx, _mm256_loadu_ps(p + s));
    float m8[8], top = -INFINITY;
    _mm256_storeu_ps(m8, mx);
    for (int j = 0; j < 8; j++) top = m8[j] > top ? m8[j] : top;
    if (S % 32 && Sp >= 32) {  /* a padded score (0 in the four-vector pass) must not be the maximum */
        top = -INFINITY;
        for (int64_t j = 0; j < S; j++) top = p[j] > top ? p[j] : top;
    }
    __m256 sums = _mm256_setzero_ps();
    const __m256 topv = _mm256_set1_ps(top);
    if (d <= 8) {  /* the exponentials and the weighted sum of the values in one pass */
        __m256 acc[8];
        for (int64_t j = 0; j < d; j++) acc[j] = _mm256_setzero_ps();
        for (s = 0; s < Sp; s += 8) {
            const __m256 e = exp2_8_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(p + s), topv));
            sums = _mm256_add_ps(sums, e);
            for (int64_t j = 0; j < d; j++) acc[j] = _mm256_fmadd_ps(e, _mm256_loadu_ps(vT + j * Sp + s), acc[j]);
        }
        const float total = hsum8_ps(sums);
        for (int64_t j = 0; j < d; j++) o[j] = hsum8_ps(acc[j]) / total;
        return;
    }
    for (s = 0; s < Sp; s += 8) {
        const __m256 e = exp2_8_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(p + s), topv));
        _mm256_storeu_ps(p + s, e);
        sums = _mm256_add_ps(sums, e);
    }
    const float total = hsum8_ps(sums);
    for (int64_t i0 = 0; i0 < d; i0 += 8) {  /* eight output dims at a time, each summed over the keys */
        const int64_t n = d - i0 < 8 ? d - i0 : 8;
        __m256 acc[8];
        for (int64_t j = 0; j < n; j++) acc[j] = _mm256_setzero_ps();
        for (s = 0; s < Sp; s += 8) {
            const __m256 e = _mm256_loadu_ps(p + s);
            for (int64_t j = 0; j < n; j++) acc[j] = _mm256_fmadd_ps(e, _mm256_loadu_ps(vT + (i0 + j) * Sp + s), acc[j]);
        }
        for (int64_t j = 0; j < n; j++) o[i0 + j] = hsum8_ps(acc[j]) / total;
    }
}
#endif

#ifdef MMLM_AVX2
/* Two queries of `mmlm_attention` at once for heads of d <= 4 dims: each key and value vector loaded once for both.
 * p0, p1 (Sp) scratch, o0, o1 (d) out. */
static inline __attribute__((always_inline)) void attention_query_pair(const float *q0, const float *q1,
                                                                      const float *kT, const float *vT, float *p0,
                                                                      float *p1, int64_t S, int64_t Sp, int64_t d,
                                                                      float scale, float *o0, float *o1) {
    __m256 qa[4], qb[4];
    for (int64_t i = 0; i < d; i++) {
        qa[i] = _mm256_set1_ps(q0[i] * scale);
        qb[i] = _mm256_set1_ps(q1[i] * scale);
    }
    __m256 ma = _mm256_set1_ps(-INFINITY), mb = ma;
    int64_t s;
    for (s = 0; s < Sp; s += 8) {
        __m256 a = _mm256_setzero_ps(), b = a;
        for (int64_t i = 0; i < d; i++) {
            const __m256 k = _mm256_loadu_ps(kT + i * Sp + s);
            a = _mm256_fmadd_ps(qa[i], k, a);
            b = _mm256_fmadd_ps(qb[i], k, b);
        }
        _mm256_storeu_ps(p0 + s, a);
        _mm256_storeu_ps(p1 + s, b);
        if (s + 8 > S) {  /* the last, padded vector: padding scores -inf */
            for (int64_t j = S; j < Sp; j++) p0[j] = p1[j] = -INFINITY;
            a = _mm256_loadu_ps(p0 + s);
            b = _mm256_loadu_ps(p1 + s);
        }
        ma = _mm256_max_ps(ma, a);
        mb = _mm256_max_ps(mb, b);
    }
    float m8[8], ta = -INFINITY, tb = -INFINITY;
    _mm256_storeu_ps(m8, ma);
    for (int j = 0; j < 8; j++) ta = m8[j] > ta ? m8[j] : ta;
    _mm256_storeu_ps(m8, mb);
    for (int j = 0; j < 8; j++) tb = m8[j] > tb ? m8[j] : tb;
    const __m256 tav = _mm256_set1_ps(ta), tbv = _mm256_set1_ps(tb);
    __m256 sa = _mm256_setzero_ps(), sb = sa, acca[4], accb[4];
    for (int64_t j = 0; j < d; j++) acca[j] = accb[j] = _mm256_setzero_ps();
    for (s = 0; s < Sp; s += 8) {
        const __m256 ea = exp2_8_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(p0 + s), tav));
        const __m256 eb = exp2_8_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(p1 + s), tbv));
        sa = _mm256_add_ps(sa, ea);
        sb = _mm256_add_ps(sb, eb);
        for (int64_t j = 0; j < d; j++) {
            const __m256 v = _mm256_loadu_ps(vT + j * Sp + s);
            acca[j] = _mm256_fmadd_ps(ea, v, acca[j]);
            accb[j] = _mm256_fmadd_ps(eb, v, accb[j]);
        }
    }
    const float totala = hsum8_ps(sa), totalb = hsum8_ps(sb);
    for (int64_t j = 0; j < d; j++) {
        o0[j] = hsum8_ps(acca[j]) / totala;
        o1[j] = hsum8_ps(accb[j]) / totalb;
    }
}
#endif

/* out (B, T, H, d) = softmax(q k^T / sqrt(d)) v for every query: no mask, many queries, a small head dim (a UNet's
 * attention over image positions: d 4 to 32, hundreds of keys). There the scores cost more than the products:
 * S exponentials per query against 2 S d multiply-adds, and PyTorch's kernels spend ~2 ns on each (its exp over
 * a tensor runs at the same rate). Here the scores of one query stay in L1 and the exponentials are powers of 2
 * (e^x = 2^(x log2 e), log2 e folded into the query's scale; exp2_8_nonpositive). Per (b, h): k and v transposed
 * to (d, S) once, so that eight keys' scores are d multiply-adds of eight lanes; then per query (two at a time for
 * d = 4, sharing each load): the scores and their maximum, p = 2^(score - max) and its sum,
 * out_i = sum_s p_s v_si / sum, with eight keys to a vector throughout. q, k, v: strides for b, h and the
 * position; unit stride along d; d <= 64.
 * Returns 0 when memory for a head's transposed keys could not be had (out is then incomplete), else 1. */
int mmlm_attention(const float *q, int64_t qb, int64_t qh, int64_t qt, const float *k, int64_t kb, int64_t kh,
                    int64_t kt, const float *v, int64_t vb, int64_t vh, int64_t vt, int64_t B, int64_t H, int64_t T,
                    int64_t S, int64_t d, float *out, int threads) {
    const float scale = 1.44269504f / sqrtf((float)d);  /* scores in units of log2 e: 2^score */
    const int64_t Sp = (S + 7) / 8 * 8;  /* keys padded to whole vectors: padding scores -inf, values 0 */
    int ok = 1;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && B * H * T * S * d >= 65536) \
    reduction(&& : ok)
    for (int64_t bh = 0; bh < B * H; bh++) {
        const int64_t b = bh / H, h = bh % H;
        float *buf = malloc(sizeof(float) * (size_t)(2 * d + 2) * (size_t)Sp);
        if (!buf) {
            ok = 0;
            continue;
        }
        /* (d, Sp), (d, Sp), (Sp), (Sp) */
        float *kT = buf, *vT = buf + d * Sp, *p = buf + 2 * d * Sp, *p1 = buf + (2 * d + 1) * Sp;
        for (int64_t i = 0; i < d; i++)
            for (int64_t s = 0; s < Sp; s++) {
                kT[i * Sp + s] = s < S ? k[b * kb + h * kh + s * kt + i] : 0.0f;
                vT[i * Sp + s] = s < S ? v[b * vb + h * vh + s * vt + i] : 0.0f;
            }
        int64_t t = 0;
#ifdef MMLM_AVX2
        if (d == 4)
            for (; t + 2 <= T; t += 2)
                attention_query_pair(q + b * qb + h * qh + t * qt, q + b * qb + h * qh + (t + 1) * qt, kT, vT, p, p1, S,
                                     Sp, 4, scale, out + ((b * T + t) * H + h) * d,
                                     out + ((b * T + t + 1) * H + h) * d);
#else
        (void)p1;
#endif
        for (; t < T; t++) {
            const float *qr = q + b * qb + h * qh + t * qt;
            float *o = out + ((b * T + t) * H + h) * d;  /* (B, T, H, d): heads side by side */
#ifdef MMLM_AVX2
            switch (d) {  /* a constant d: loops over it unroll, its sums stay in registers */
                case 4: attention_query(qr, kT, vT, p, S, Sp, 4, scale, o); break;
                case 8: attention_query(qr, kT, vT, p, S, Sp, 8, scale, o); break;
                case 16: attention_query(qr, kT, vT, p, S, Sp, 16, scale, o); break;
                case 32: attention_query(qr, kT, vT, p, S, Sp, 32, scale, o); break;
                default: attention_query(qr, kT, vT, p, S, Sp, d, scale, o);
            }
#else
            float top = -INFINITY, total = 0.0f;
            for (int64_t s = 0; s < S; s++) {
                float sc = 0.0f;
                for (int64_t i = 0; i < d; i++) sc += qr[i] * scale * kT[i * Sp + s];
                p[s] = sc;
                top = sc > top ? sc : top;
            }
            for (int64_t s = 0; s < S; s++) {
                p[s] = exp2f(p[s] - top);
                total += p[s];
            }
            for (int64_t i = 0; i < d; i++) {
                float acc = 0.0f;
                for (int64_t s = 0; s < S; s++) acc += p[s] * vT[i * Sp + s];
                o[i] = acc / total;
            }
#endif
        }
        free(buf);
    }
    return ok;
}

/* ------------------------------------------------------------------------------------------------ a whole layer */

/* A weight-only linear layer as QuantLinear stores it: bits 4 (Q4_1 groups, `w`) or 8 (int8 rows `w`, bfloat16
 * `scales`); bias NULL or (out) float32. */
typedef struct {
    int64_t bits, out_features, in_features;
    const void *w;
    const uint16_t *scales;
    const float *bias;
} Linear;

static int linear(const Linear *l, const float *x, int64_t M, float *y, int threads) {
    if (l->bits == 4) {
        if (!mmlm_q4_1_matmul(x, M, l->in_features, (const uint8_t *)l->w, l->out_features, y, threads)) return 0;
    } else if (!mmlm_int8_matmul(x, M, l->in_features, (const int8_t *)l->w, l->scales, l->out_features, y,
                                 threads)) {
        return 0;
    }
    if (l->bias)
        for (int64_t r = 0; r < M; r++)
            for (int64_t n = 0; n < l->out_features; n++) y[r * l->out_features + n] += l->bias[n];
    return 1;
}

/* x[:h] cos[:h] - x[h:] sin[:h], x[h:] cos[h:] + x[:h] sin[h:] (h = d / 2): Llama's rotary embedding, in place. */
static void rope(float *x, const float *cos, const float *sin, int64_t d) {
    const int64_t h = d / 2;
    for (int64_t i = 0; i < h; i++) {
        const float a = x[i], b = x[i + h];
        x[i] = a * cos[i] - b * sin[i];
        x[i + h] = b * cos[i + h] + a * sin[i + h];
    }
}

/* One decoding step of a Llama block (models/blocks.py Block with Attention, RMSNorm, SwiGLU) for B rows of one
 * token each, x (B, C) updated in place:
 *   h = rms_norm(x, norm1); q, k, v = qkv(h), q and k rotated (cos, sin (B, d)); k, v written to the cache at
 *   `slot`; x += proj(attention(q, cached k, v; mask)); h = rms_norm(x, norm2); x += fc2(silu(gate) * up),
 *   [gate, up] = fc1(h).
 * Cache k, v (B, Hkv, >= slot + 1, d) at strides (cb, ch, d, 1) (a window of a larger pool, as continuous batching
 * reads it); mask (B, slot + 1) bytes at stride mb (1 = a real token). Returns 0 when memory for the
 * intermediates could not be had. */
int mmlm_decoder_layer(float *x, int64_t B, int64_t C, const float *norm1, const float *norm2, float eps,
                       const Linear *qkv, const Linear *proj, const Linear *fc1, const Linear *fc2,
                       const float *cos, const float *sin, float *kc, float *vc, int64_t cb, int64_t ch, int64_t slot,
                       const uint8_t *mask, int64_t mb, int64_t H, int64_t Hkv, int64_t d, int64_t hidden,
                       int threads) {
    const int64_t S = slot + 1, width = (H + 2 * Hkv) * d;
    float *h = malloc(sizeof(float) * (size_t)(B * C)), *t = malloc(sizeof(float) * (size_t)(B * width));
    float *a = malloc(sizeof(float) * (size_t)(B * (H * d > hidden ? H * d : hidden)));
    float *z = malloc(sizeof(float) * (size_t)(B * 2 * hidden)), *scores = malloc(sizeof(float) * (size_t)(B * H * S));
    int ok = h && t && a && z && scores;
    if (ok) {
        mmlm_rms_norm(x, B, C, norm1, eps, h);
        ok = linear(qkv, h, B, t, threads);  /* (B, [q heads, k heads, v heads] x d) */
    }
    if (ok) {
        for (int64_t b = 0; b < B; b++) {
            float *row = t + b * width;
            for (int64_t j = 0; j < H + Hkv; j++) rope(row + j * d, cos + b * d, sin + b * d, d);
            for (int64_t g = 0; g < Hkv; g++) {
                memcpy(kc + b * cb + g * ch + slot * d, row + (H + g) * d, sizeof(float) * (size_t)d);
                memcpy(vc + b * cb + g * ch + slot * d, row + (H + Hkv + g) * d, sizeof(float) * (size_t)d);
            }
        }
        mmlm_decode_attention(t, width, d, kc, cb, ch, vc, cb, ch, mask, mb, B, H, Hkv, S, d, a, scores, threads);
        ok = linear(proj, a, B, h, threads);
    }
    if (ok) {
        for (int64_t i = 0; i < B * C; i++) x[i] += h[i];
        mmlm_rms_norm(x, B, C, norm2, eps, h);
        ok = linear(fc1, h, B, z, threads);
    }
    if (ok) {
        for (int64_t b = 0; b < B; b++) {  /* silu(gate) * up */
            int64_t i = 0;
            const float *gates = z + b * 2 * hidden, *ups = gates + hidden;
#ifdef MMLM_AVX2
            for (; i + 8 <= hidden; i += 8) {
                const __m256 act = silu8(_mm256_loadu_ps(gates + i));
                _mm256_storeu_ps(a + b * hidden + i, _mm256_mul_ps(act, _mm256_loadu_ps(ups + i)));
            }
#endif
            for (; i < hidden; i++) a[b * hidden + i] = gates[i] / (1.0f + expf(-gates[i])) * ups[i];
        }
        ok = linear(fc2, a, B, h, threads);
    }
    if (ok)
        for (int64_t i = 0; i < B * C; i++) x[i] += h[i];
    free(h);
    free(t);
    free(a);
    free(z);
    free(scores);
    return ok;
}

/* ------------------------------------------------------------------------------------------------ GEGLU */
/* out (rows, n) = h GELU(g) for z = [h, g] (rows, 2 n): GELU(g) = g (1 + erf(g / sqrt 2)) / 2, erf by Abramowitz and
 * Stegun's 7.1.26 (|error| < 1.5e-7): 1 - erf(a) = t (a1 + t (a2 + ... a5)) e^(-a^2), t = 1 / (1 + p a) for a >= 0;
 * for x < 0, 1 + erf(x) = 1 - erf(|x|) is taken as that product directly, so the tail keeps its relative precision. One pass where PyTorch makes two (GELU, then the product) and allocates between them. */
#ifdef MMLM_AVX2
static inline __m256 gelu8(__m256 x) {
    const __m256 sign = _mm256_set1_ps(-0.0f), one = _mm256_set1_ps(1.0f), half = _mm256_set1_ps(0.5f);
    const __m256 a = _mm256_andnot_ps(sign, _mm256_mul_ps(x, _mm256_set1_ps(0.70710678f)));  /* |x| / sqrt 2 */
    const __m256 t = _mm256_div_ps(one, _mm256_fmadd_ps(_mm256_set1_ps(0.3275911f), a, one));
    __m256 q = _mm256_set1_ps(1.061405429f);
    q = _mm256_fmadd_ps(q, t, _mm256_set1_ps(-1.453152027f));
    q = _mm256_fmadd_ps(q, t, _mm256_set1_ps(1.421413741f));
    q = _mm256_fmadd_ps(q, t, _mm256_set1_ps(-0.284496736f));
    q = _mm256_fmadd_ps(q, t, _mm256_set1_ps(0.254829592f));
    const __m256 e = exp8_nonpositive(_mm256_sub_ps(_mm256_setzero_ps(), _mm256_mul_ps(a, a)));
    const __m256 c = _mm256_mul_ps(_mm256_mul_ps(q, t), e);  /* 1 - erf(|x| / sqrt 2) */
    /* 1 + erf(x / sqrt 2): c itself where x < 0 (no cancellation in the tail), else 2 - c; blendv picks by the sign
     * bit, x's own */
    const __m256 onep = _mm256_blendv_ps(_mm256_sub_ps(_mm256_set1_ps(2.0f), c), c, x);
    return _mm256_mul_ps(_mm256_mul_ps(half, x), onep);
}
#endif

static inline float gelu1(float g) { return 0.5f * g * (1.0f + erff(g * 0.70710678f)); }

void mmlm_geglu(const float *z, int64_t rows, int64_t n, float *out, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && rows * n >= 65536)
    for (int64_t r = 0; r < rows; r++) {
        const float *h = z + r * 2 * n, *g = h + n;
        float *o = out + r * n;
        int64_t i = 0;
#ifdef MMLM_AVX2
        for (; i + 8 <= n; i += 8)
            _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_loadu_ps(h + i), gelu8(_mm256_loadu_ps(g + i))));
#endif
        for (; i < n; i++) o[i] = h[i] * gelu1(g[i]);
    }
}

/* ------------------------------------------------------------------------------------------------ GroupNorm */
/* y = silu(GroupNorm(x)) over channels-last x (N, P positions, C), G groups of C / G channels: per image and group
 * the mean and variance over its P C / G values (two passes), then one pass writing
 * z = (x - mean) / sqrt(var + eps) gamma_c + beta_c and, with `silu`, z / (1 + e^-z). PyTorch runs the norm
 * and the activation as two passes over the map, and its GroupNorm is ~3x slower on channels-last maps than on
 * NCHW ones. */
void mmlm_group_norm_silu(const float *x, int64_t N, int64_t P, int64_t C, int64_t G, const float *gamma,
                          const float *beta, float eps, int silu, float *y, int threads) {
    const int64_t cg = C / G;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && N * P * C >= 65536)
    for (int64_t n = 0; n < N; n++) {
        const float *xn = x + n * P * C;
        float *yn = y + n * P * C;
        /* per channel over the positions (eight channels to a vector), then per group over its channels */
        float acc[C > 0 ? C : 1], mean_c[C > 0 ? C : 1], scale[C > 0 ? C : 1], shift[C > 0 ? C : 1];
        double mean[G > 0 ? G : 1], var[G > 0 ? G : 1];
        for (int64_t c = 0; c < C; c++) acc[c] = 0.0f;
        for (int64_t p = 0; p < P; p++) {
            const float *xr = xn + p * C;
#pragma omp simd
            for (int64_t c = 0; c < C; c++) acc[c] += xr[c];
        }
        for (int64_t g = 0; g < G; g++) {
            double t = 0.0;
            for (int64_t c = g * cg; c < (g + 1) * cg; c++) t += acc[c];
            mean[g] = t / (double)(P * cg);
            for (int64_t c = g * cg; c < (g + 1) * cg; c++) mean_c[c] = (float)mean[g];
        }
        for (int64_t c = 0; c < C; c++) acc[c] = 0.0f;
        for (int64_t p = 0; p < P; p++) {
            const float *xr = xn + p * C;
#pragma omp simd
            for (int64_t c = 0; c < C; c++) acc[c] += (xr[c] - mean_c[c]) * (xr[c] - mean_c[c]);
        }
        for (int64_t g = 0; g < G; g++) {
            double t = 0.0;
            for (int64_t c = g * cg; c < (g + 1) * cg; c++) t += acc[c];
            var[g] = t / (double)(P * cg);
            const float r = (float)(1.0 / sqrt(var[g] + (double)eps));
            for (int64_t c = g * cg; c < (g + 1) * cg; c++) {
                scale[c] = r * (gamma ? gamma[c] : 1.0f);
                shift[c] = (beta ? beta[c] : 0.0f) - mean_c[c] * scale[c];
            }
        }
        for (int64_t p = 0; p < P; p++) {
            const float *xr = xn + p * C;
            float *yr = yn + p * C;
            int64_t c = 0;
#ifdef MMLM_AVX2
            for (; c + 8 <= C; c += 8) {
                const __m256 z = _mm256_fmadd_ps(_mm256_loadu_ps(xr + c), _mm256_loadu_ps(scale + c),
                                                 _mm256_loadu_ps(shift + c));
                _mm256_storeu_ps(yr + c, silu ? silu8(z) : z);
            }
#endif
            for (; c < C; c++) {
                const float z = xr[c] * scale[c] + shift[c];
                yr[c] = silu ? z / (1.0f + expf(-z)) : z;
            }
        }
    }
}

/* ------------------------------------------------------------------------------------------------ Winograd */
/* A 3x3 convolution (stride 1, zero padding 1) as Winograd's F(4x4, 3x3): each 4x4 tile of outputs is
 *   Y = A^T [ (G g G^T) . (B^T d B) ] A
 * with d the 6x6 patch of input under the tile, g the 3x3 kernel and . the elementwise product over the 36
 * positions; summed over input channels, the 36 products are 36 matmuls (P tiles, C) x (C, O)
 * (mmlm/models/kernels/images.py has G). 36 multiplies per tile and channel pair where the direct form takes 144.
 * Below: the transforms around the matmuls as two loops (PyTorch's batched GEMM between them, for many channels),
 * and the whole convolution in one pass over a few tiles at a time (few channels), over channels-last
 * (N, H, W, C) tensors, H and W multiples of 4 (the interpolation points 0, 1, -1, 2, -2 and infinity):
 *   B^T = [4  0 -5  0  1  0;      A^T = [1  1  1  1  1  0;
 *          0 -4 -4  1  1  0;             0  1 -1  2 -2  0;
 *          0  4 -4 -1  1  0;             0  1  1  4  4  0;
 *          0 -2 -1  2  1  0;             0  1 -1  8 -8  1].
 *          0  2 -1 -2  1  0;
 *          0  4  0 -5  0  1]
 * Tile p = (n H/4 + i) W/4 + j covers outputs (4i, 4j) .. (4i + 3, 4j + 3) and inputs 4i - 1 .. 4i + 4 (outside:
 * the zero padding). */

/* B^T u for one column u of six (stride su) into t (stride st). */
#define WINOGRAD_BT(u, su, t, st)                                             \
    do {                                                                      \
        const float u0 = (u)[0], u1 = (u)[(su)], u2 = (u)[2 * (su)], u3 = (u)[3 * (su)], u4 = (u)[4 * (su)], \
                    u5 = (u)[5 * (su)];                                       \
        (t)[0] = 4.0f * u0 - 5.0f * u2 + u4;                                  \
        (t)[(st)] = u3 + u4 - 4.0f * (u1 + u2);                               \
        (t)[2 * (st)] = u4 - u3 + 4.0f * (u1 - u2);                           \
        (t)[3 * (st)] = u4 - u2 + 2.0f * (u3 - u1);                           \
        (t)[4 * (st)] = u4 - u2 + 2.0f * (u1 - u3);                           \
        (t)[5 * (st)] = 4.0f * u1 - 5.0f * u3 + u5;                           \
    } while (0)

#ifdef MMLM_AVX2
/* B^T u for six vectors u into t[0], t[st], .., t[5 st] */
static inline void winograd_bt8(const __m256 *u, __m256 *t, int st) {
    const __m256 four = _mm256_set1_ps(4.0f), five = _mm256_set1_ps(5.0f), two = _mm256_set1_ps(2.0f);
    const __m256 u4u2 = _mm256_sub_ps(u[4], u[2]), u4u3 = _mm256_add_ps(u[3], u[4]);
    t[0] = _mm256_fnmadd_ps(five, u[2], _mm256_fmadd_ps(four, u[0], u[4]));
    t[st] = _mm256_fnmadd_ps(four, _mm256_add_ps(u[1], u[2]), u4u3);
    t[2 * st] = _mm256_fmadd_ps(four, _mm256_sub_ps(u[1], u[2]), _mm256_sub_ps(u[4], u[3]));
    t[3 * st] = _mm256_fmadd_ps(two, _mm256_sub_ps(u[3], u[1]), u4u2);
    t[4 * st] = _mm256_fmadd_ps(two, _mm256_sub_ps(u[1], u[3]), u4u2);
    t[5 * st] = _mm256_fnmadd_ps(five, u[3], _mm256_fmadd_ps(four, u[1], u[5]));
}
#endif

/* B^T d B of tile p's 6x6 patch of x (N, H, W, C), th x tw tiles an image: position q (0..35) of channel k at
 * v[q vs + k]. zero: C zeros (the padding). */
static void winograd_input_tile(const float *x, int64_t H, int64_t W, int64_t C, int64_t th, int64_t tw, int64_t p,
                                const float *zero, float *v, int64_t vs) {
    const int64_t n = p / (th * tw), i = p / tw % th, j = p % tw;
    const float *d[6][6];
    for (int a = 0; a < 6; a++)
        for (int b = 0; b < 6; b++) {
            const int64_t r = 4 * i - 1 + a, c = 4 * j - 1 + b;
            d[a][b] = (r < 0 || r >= H || c < 0 || c >= W) ? zero : x + ((n * H + r) * W + c) * C;
        }
    int64_t k0 = 0;
#ifdef MMLM_AVX2
    for (; k0 + 8 <= C; k0 += 8) {  /* eight channels to a vector */
        __m256 t[6][6];
        for (int b = 0; b < 6; b++) {  /* B^T d: each column */
            __m256 u[6];
            for (int a = 0; a < 6; a++) u[a] = _mm256_loadu_ps(d[a][b] + k0);
            winograd_bt8(u, t[0] + b, 6);
        }
        for (int a = 0; a < 6; a++) {  /* (B^T d) B: each row */
            __m256 r[6];
            winograd_bt8(t[a], r, 1);
            for (int b = 0; b < 6; b++) _mm256_storeu_ps(v + (6 * a + b) * vs + k0, r[b]);
        }
    }
#endif
    for (; k0 < C; k0 += 8) {  /* eight channels at a time through a 6x6 scratch */
        const int64_t kn = C - k0 < 8 ? C - k0 : 8;
        float u[6][6][8], t[6][6][8];
        for (int a = 0; a < 6; a++)
            for (int b = 0; b < 6; b++)
                for (int64_t k = 0; k < 8; k++) u[a][b][k] = k < kn ? d[a][b][k0 + k] : 0.0f;
        for (int b = 0; b < 6; b++)  /* B^T d: each column */
            for (int64_t k = 0; k < 8; k++) WINOGRAD_BT(&u[0][b][k], 48, &t[0][b][k], 48);
        for (int a = 0; a < 6; a++)  /* (B^T d) B: each row */
            for (int64_t k = 0; k < 8; k++) WINOGRAD_BT(&t[a][0][k], 8, &u[a][0][k], 8);
        for (int a = 0; a < 6; a++)
            for (int b = 0; b < 6; b++)
                for (int64_t k = 0; k < kn; k++) v[(6 * a + b) * vs + k0 + k] = u[a][b][k];
    }
}

/* V (36, P, C) = B^T d B for every tile's patch of x (N, H, W, C). Returns 0 (V untouched) when memory for a row
 * of zeros could not be had, else 1. */
int mmlm_winograd_input(const float *x, int64_t N, int64_t H, int64_t W, int64_t C, float *V, int threads) {
    const int64_t th = H / 4, tw = W / 4, P = N * th * tw;
    float *zero = calloc((size_t)C, sizeof(float));
    if (!zero) return 0;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && P * C >= 4096)
    for (int64_t p = 0; p < P; p++) winograd_input_tile(x, H, W, C, th, tw, p, zero, V + p * C, P * C);
    free(zero);
    return 1;
}

#ifdef MMLM_AVX2
/* A^T u for six vectors u into t[0], t[st], t[2 st], t[3 st] */
static inline void winograd_at8(const __m256 *u, __m256 *t, int st) {
    const __m256 two = _mm256_set1_ps(2.0f), four = _mm256_set1_ps(4.0f), eight = _mm256_set1_ps(8.0f);
    const __m256 p12 = _mm256_add_ps(u[1], u[2]), m12 = _mm256_sub_ps(u[1], u[2]);
    const __m256 p34 = _mm256_add_ps(u[3], u[4]), m34 = _mm256_sub_ps(u[3], u[4]);
    t[0] = _mm256_add_ps(_mm256_add_ps(u[0], p12), p34);
    t[st] = _mm256_fmadd_ps(two, m34, m12);
    t[2 * st] = _mm256_fmadd_ps(four, p34, p12);
    t[3 * st] = _mm256_add_ps(_mm256_fmadd_ps(eight, m34, m12), u[5]);
}
#endif

/* Output channels o0 .. o0 + on of y's 4x4 tile p (y (N, H, W, O)) = A^T m A + bias (O) + shift (N, O) + residual
 * (N, H, W, O), the three optional (NULL); the tile's 36 sums of channel o0 + k at m[q ms + k]. */
static void winograd_output_tile(const float *m, int64_t ms, int64_t H, int64_t W, int64_t O, int64_t th, int64_t tw,
                                 int64_t p, int64_t o0, int64_t on, const float *bias, const float *shift,
                                 const float *residual, float *y) {
    const int64_t n = p / (th * tw), i = p / tw % th, j = p % tw;
    int64_t k0 = 0;
#ifdef MMLM_AVX2
    for (; k0 + 8 <= on; k0 += 8) {
        const int64_t o = o0 + k0;
        __m256 add = bias ? _mm256_loadu_ps(bias + o) : _mm256_setzero_ps();
        if (shift) add = _mm256_add_ps(add, _mm256_loadu_ps(shift + n * O + o));
        __m256 s[4][6];  /* A^T m: its four rows */
        for (int b = 0; b < 6; b++) {
            __m256 u[6];
            for (int a = 0; a < 6; a++) u[a] = _mm256_loadu_ps(m + (6 * a + b) * ms + k0);
            winograd_at8(u, &s[0][b], 6);
        }
        for (int a = 0; a < 4; a++) {  /* (A^T m) A, + the bias, the shift and the skip */
            const int64_t at = ((n * H + 4 * i + a) * W + 4 * j) * O + o;
            __m256 r4[4];
            winograd_at8(s[a], r4, 1);
            for (int b = 0; b < 4; b++) {
                __m256 r = _mm256_add_ps(r4[b], add);
                if (residual) r = _mm256_add_ps(r, _mm256_loadu_ps(residual + at + b * O));
                _mm256_storeu_ps(y + at + b * O, r);
            }
        }
    }
#endif
    for (; k0 < on; k0 += 8) {
        const int64_t kn = on - k0 < 8 ? on - k0 : 8, o = o0 + k0;
        float s[4][6][8];  /* A^T m: its four rows */
        for (int b = 0; b < 6; b++)
            for (int64_t k = 0; k < 8; k++) {
                float u[6];
                for (int a = 0; a < 6; a++) u[a] = k < kn ? m[(6 * a + b) * ms + k0 + k] : 0.0f;
                s[0][b][k] = u[0] + u[1] + u[2] + u[3] + u[4];
                s[1][b][k] = u[1] - u[2] + 2.0f * (u[3] - u[4]);
                s[2][b][k] = u[1] + u[2] + 4.0f * (u[3] + u[4]);
                s[3][b][k] = u[1] - u[2] + 8.0f * (u[3] - u[4]) + u[5];
            }
        for (int a = 0; a < 4; a++) {  /* (A^T m) A, + the bias, the shift and the skip */
            float *yr = y + ((n * H + 4 * i + a) * W + 4 * j) * O + o;
            const float *rr = residual ? residual + ((n * H + 4 * i + a) * W + 4 * j) * O + o : NULL;
            for (int64_t k = 0; k < kn; k++) {
                const float *u = s[a][0] + k;  /* u[8 b] = s[a][b][k] */
                const float add = (bias ? bias[o + k] : 0.0f) + (shift ? shift[n * O + o + k] : 0.0f);
                float r4[4] = {u[0] + u[8] + u[16] + u[24] + u[32], u[8] - u[16] + 2.0f * (u[24] - u[32]),
                               u[8] + u[16] + 4.0f * (u[24] + u[32]), u[8] - u[16] + 8.0f * (u[24] - u[32]) + u[40]};
                for (int b = 0; b < 4; b++) yr[b * O + k] = r4[b] + add + (rr ? rr[b * O + k] : 0.0f);
            }
        }
    }
}

/* y (N, H, W, O) = A^T m A for every tile's 36 sums m = M[:, p] (M (36, P, O)), + bias (O) + shift (N, O) +
 * residual (N, H, W, O), each of the three optional (NULL). */
void mmlm_winograd_output(const float *M, int64_t N, int64_t H, int64_t W, int64_t O, const float *bias,
                          const float *shift, const float *residual, float *y, int threads) {
    const int64_t th = H / 4, tw = W / 4, P = N * th * tw;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && P * O >= 4096)
    for (int64_t p = 0; p < P; p++)
        winograd_output_tile(M + p * O, P * O, H, W, O, th, tw, p, 0, O, bias, shift, residual, y);
}

/* What a matmul's tile does with its sums before storing them (after the bias). */
enum { ACT_NONE = 0, ACT_GEGLU = 1, ACT_GELU = 2, ACT_QUICK_GELU = 3 };

static inline float act1(float s, int act) {
    return act == ACT_GELU ? gelu1(s) : act == ACT_QUICK_GELU ? s / (1.0f + expf(-1.702f * s)) : s;
}

/* c (6 rows, 16 columns; row stride ldc) = act(a (6 rows of K; row stride lda) b (K rows of 16; row stride ldb)
 * + bias (16)) + res (6 rows of 16; row stride ldr), bias and res optional (NULL): the twelve vectors of sums stay
 * in registers while K goes by, each b row loaded once for the six rows. act: ACT_GELU GELU(z) (erf's),
 * ACT_QUICK_GELU z sigmoid(1.702 z); ACT_GEGLU takes the sixteen columns as eight h, then their eight gates, and
 * writes eight: h GELU(gate). Rows of a past `rows` repeat its last one (their sums are written all the same: c
 * must have six rows). */
static inline void gemm6x16(const float *a, int64_t lda, int rows, const float *b, int64_t ldb, int64_t K, float *c,
                            int64_t ldc, const float *bias, const float *res, int64_t ldr, int act) {
#ifndef MMLM_AVX2
    for (int r = 0; r < 6; r++) {
        const float *ar = a + (r < rows ? r : rows - 1) * lda;
        float s[16];
        for (int o = 0; o < 16; o++) {
            s[o] = bias ? bias[o] : 0.0f;
            for (int64_t k = 0; k < K; k++) s[o] += ar[k] * b[k * ldb + o];
        }
        for (int o = 0; o < (act == ACT_GEGLU ? 8 : 16); o++)
            c[r * ldc + o] = act == ACT_GEGLU ? s[o] * gelu1(s[8 + o])
                                              : act1(s[o], act) + (res ? res[(r < rows ? r : 0) * ldr + o] : 0.0f);
    }
#else  /* twelve named sums: an array of them gcc keeps on the stack, storing each one after every multiply-add */
    __m256 s00 = _mm256_setzero_ps(), s01 = s00, s10 = s00, s11 = s00, s20 = s00, s21 = s00, s30 = s00, s31 = s00,
           s40 = s00, s41 = s00, s50 = s00, s51 = s00;
    const float *a0 = a, *a1 = a + (rows > 1) * lda, *a2 = a + (rows > 2 ? 2 : rows - 1) * lda,
                *a3 = a + (rows > 3 ? 3 : rows - 1) * lda, *a4 = a + (rows > 4 ? 4 : rows - 1) * lda,
                *a5 = a + (rows > 5 ? 5 : rows - 1) * lda;
    for (int64_t k = 0; k < K; k++, b += ldb) {
        const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
        __m256 x;
#define GEMM_ROW(i)                                                                                                  \
    x = _mm256_broadcast_ss(a##i + k);                                                                              \
    s##i##0 = _mm256_fmadd_ps(x, b0, s##i##0);                                                                      \
    s##i##1 = _mm256_fmadd_ps(x, b1, s##i##1);
        GEMM_ROW(0) GEMM_ROW(1) GEMM_ROW(2) GEMM_ROW(3) GEMM_ROW(4) GEMM_ROW(5)
#undef GEMM_ROW
    }
    if (bias) {
        const __m256 c0 = _mm256_loadu_ps(bias), c1 = _mm256_loadu_ps(bias + 8);
#define GEMM_ADD(i)                                                                                                  \
    s##i##0 = _mm256_add_ps(s##i##0, c0);                                                                           \
    s##i##1 = _mm256_add_ps(s##i##1, c1);
        GEMM_ADD(0) GEMM_ADD(1) GEMM_ADD(2) GEMM_ADD(3) GEMM_ADD(4) GEMM_ADD(5)
#undef GEMM_ADD
    }
    if (act == ACT_GEGLU) {
#define GEMM_GEGLU(i) _mm256_storeu_ps(c + i * ldc, _mm256_mul_ps(s##i##0, gelu8(s##i##1)));
        GEMM_GEGLU(0) GEMM_GEGLU(1) GEMM_GEGLU(2) GEMM_GEGLU(3) GEMM_GEGLU(4) GEMM_GEGLU(5)
#undef GEMM_GEGLU
        return;
    }
    if (act == ACT_GELU) {
#define GEMM_GELU(i)                                                                                                 \
    s##i##0 = gelu8(s##i##0);                                                                                       \
    s##i##1 = gelu8(s##i##1);
        GEMM_GELU(0) GEMM_GELU(1) GEMM_GELU(2) GEMM_GELU(3) GEMM_GELU(4) GEMM_GELU(5)
#undef GEMM_GELU
    } else if (act == ACT_QUICK_GELU) {  /* z sigmoid(1.702 z) = silu(1.702 z) / 1.702 */
        const __m256 k = _mm256_set1_ps(1.702f), inv = _mm256_set1_ps(1.0f / 1.702f);
#define GEMM_QUICK(i)                                                                                                \
    s##i##0 = _mm256_mul_ps(silu8(_mm256_mul_ps(s##i##0, k)), inv);                                                 \
    s##i##1 = _mm256_mul_ps(silu8(_mm256_mul_ps(s##i##1, k)), inv);
        GEMM_QUICK(0) GEMM_QUICK(1) GEMM_QUICK(2) GEMM_QUICK(3) GEMM_QUICK(4) GEMM_QUICK(5)
#undef GEMM_QUICK
    }
    if (res) {  /* rows past `rows` read row 0's */
#define GEMM_RES(i)                                                                                                  \
    s##i##0 = _mm256_add_ps(s##i##0, _mm256_loadu_ps(res + (i < rows ? i : 0) * ldr));                              \
    s##i##1 = _mm256_add_ps(s##i##1, _mm256_loadu_ps(res + (i < rows ? i : 0) * ldr + 8));
        GEMM_RES(0) GEMM_RES(1) GEMM_RES(2) GEMM_RES(3) GEMM_RES(4) GEMM_RES(5)
#undef GEMM_RES
    }
#define GEMM_STORE(i)                                                                                                \
    _mm256_storeu_ps(c + i * ldc, s##i##0);                                                                         \
    _mm256_storeu_ps(c + i * ldc + 8, s##i##1);
    GEMM_STORE(0) GEMM_STORE(1) GEMM_STORE(2) GEMM_STORE(3) GEMM_STORE(4) GEMM_STORE(5)
#undef GEMM_STORE
#endif
}

/* y (M, N) = act(x (M, K) w^T + bias) + residual (M, N) (bias and residual optional: NULL), float32, w and bias as
 * packed by mmlm/models/kernels/mlp.py: w (P, K, 16), panel j holding sixteen columns of w^T, and bias (16 P) in the
 * same order, zeros past the last column. Panel j is columns 16 j .. 16 j + 15, except with ACT_GEGLU: then y (M, N)
 * is h GELU(gate) of the 2 N columns [h, gate] of x w^T + bias, and panel j holds h's columns 8 j .. 8 j + 7, then
 * the gate's for them (residual unread). Threads take chunks of rows; a chunk's rows (in the core's cache) meet
 * each panel in turn, six rows at a time. */
void mmlm_linear(const float *x, int64_t M, int64_t K, const float *w, int64_t N, const float *bias,
                 const float *residual, float *y, int act, int threads) {
    const int64_t width = act == ACT_GEGLU ? 8 : 16, panels = (N + width - 1) / width;
    /* chunks of up to eight groups of six rows, at least ~4 a thread, a multiple of the threads in number, each
     * thread's share of the groups within one of the others' (1088 rows in 48-row chunks would give one thread
     * 12 chunks and the other 11) */
    const int64_t groups = (M + 5) / 6, nt = threads > 1 ? threads : 1;
    int64_t chunks = (groups + 7) / 8 > 4 * nt ? (groups + 7) / 8 : 4 * nt;
    chunks = (chunks + nt - 1) / nt * nt;
    chunks = chunks < groups ? chunks : groups;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && M * N * K >= 262144)
    for (int64_t ch = 0; ch < chunks; ch++) {
        const int64_t g1 = (ch + 1) * groups / chunks, m0 = ch * groups / chunks * 6, m1 = 6 * g1 < M ? 6 * g1 : M;
        for (int64_t j = 0; j < panels; j++) {
            const int64_t n0 = width * j, nn = N - n0 < width ? N - n0 : width;
            const float *wj = w + j * K * 16, *bj = bias ? bias + 16 * j : NULL;
            for (int64_t m = m0; m < m1; m += 6) {
                const int r = m1 - m < 6 ? (int)(m1 - m) : 6;
                const float *res = residual ? residual + m * N + n0 : NULL;
                if (r == 6 && nn == width) {
                    gemm6x16(x + m * K, K, 6, wj, 16, K, y + m * N + n0, N, bj, res, N, act);
                } else {  /* a tile past the last row or column: through a scratch tile */
                    float t[6 * 16];
                    gemm6x16(x + m * K, K, r, wj, 16, K, t, 16, bj, NULL, 0, act);
                    for (int i = 0; i < r; i++)
                        for (int64_t o = 0; o < nn; o++) y[(m + i) * N + n0 + o] = t[i * 16 + o] + (res ? res[i * N + o] : 0.0f);
                }
            }
        }
    }
}

/* out (B, T, H, d) = softmax(q k^T / sqrt(d) [causal]) v as small matmuls through gemm6x16, per (b, h) and block
 * of up to 48 queries (a CLIP tower's 17 to 257 tokens, a UNet's cross-attention to 77): the keys packed once to
 * (d, Sp) with the scale (in units of log2 e) folded in, Sp = S rounded up to 16; then per block of up to 256 keys
 * the scores (48, 256) = q k^T, six queries against sixteen keys at a time, staying in the core's cache; each row's
 * p = 2^(score - its largest so far), the sums of earlier blocks scaled down when a larger score comes (the online
 * softmax of flash attention); out += p v straight from v's rows, sixteen dims at a time (the last d % 16 through a
 * padded copy); at the end out / the row's total, into the output's rows. causal: the T queries are the last T of
 * the S positions (query t sees keys up to t + S - T). Returns 0 when scratch memory could not be had (out is then
 * incomplete), else 1. */
#define ATTN_BLOCK 48
#define ATTN_KEYS 256
int mmlm_attention_tiled(const float *q, int64_t qb, int64_t qh, int64_t qt, const float *k, int64_t kb, int64_t kh,
                         int64_t kt, const float *v, int64_t vb, int64_t vh, int64_t vt, int64_t B, int64_t H,
                         int64_t T, int64_t S, int64_t d, int causal, float *out, int threads) {
    const float scale = 1.44269504f / sqrtf((float)d);
    const int64_t Sp = (S + 15) / 16 * 16, blocks = (T + ATTN_BLOCK - 1) / ATTN_BLOCK, ldo = H * d;
    int ok = 1;
#pragma omp parallel num_threads(threads) if (threads > 1 && B * H * T * S * d >= 65536) reduction(&& : ok)
    {
        /* kT (d, Sp); scores (ATTN_BLOCK, ATTN_KEYS); the block's sums (ATTN_BLOCK, d), largest scores and totals;
         * for d not a multiple of 16, the last dims of a block's values padded to sixteen (ATTN_KEYS, 16) and a
         * tile of their products (6, 16) */
        float *kT = malloc(sizeof(float) * (size_t)(d * Sp + ATTN_BLOCK * (ATTN_KEYS + d + 2) + ATTN_KEYS * 16 + 96));
        float *sc = kT + d * Sp, *acc = sc + ATTN_BLOCK * ATTN_KEYS, *top = acc + ATTN_BLOCK * d, *total = top + ATTN_BLOCK;
        float *vtail = total + ATTN_BLOCK, *tile = vtail + ATTN_KEYS * 16;
        const int64_t full = d / 16 * 16, rest = d - full;
        int64_t packed = -1;  /* the (b, h) whose keys kT holds */
#pragma omp for schedule(static)
        for (int64_t item = 0; item < B * H * blocks; item++) {
            if (!kT) {
                ok = 0;
                continue;
            }
            const int64_t bh = item / blocks, b = bh / H, h = bh % H, t0 = item % blocks * ATTN_BLOCK;
            const int64_t t1 = t0 + ATTN_BLOCK < T ? t0 + ATTN_BLOCK : T;
            const float *kbh = k + b * kb + h * kh, *vbh = v + b * vb + h * vh, *qbh = q + b * qb + h * qh;
            if (packed != bh) {
                for (int64_t s = 0; s < Sp; s++)  /* each key's row read along, written down a column */
                    for (int64_t i = 0; i < d; i++) kT[i * Sp + s] = s < S ? kbh[s * kt + i] * scale : 0.0f;
                packed = bh;
            }
            for (int64_t t = t0; t < t1; t++) top[t - t0] = -INFINITY, total[t - t0] = 0.0f;
            memset(acc, 0, sizeof(float) * ATTN_BLOCK * d);
            /* the keys this block's last query sees: causal rows stop early, and so do their products */
            const int64_t seen = causal && t1 + S - T < S ? t1 + S - T : S;
            for (int64_t s0 = 0; s0 < seen; s0 += ATTN_KEYS) {  /* a block of keys: its scores, then online softmax */
                const int64_t s1 = s0 + ATTN_KEYS < seen ? s0 + ATTN_KEYS : seen;
                for (int64_t t = t0; t < t1; t += 6) {
                    const int r = t1 - t < 6 ? (int)(t1 - t) : 6;
                    for (int64_t j = s0; j < s1; j += 16)  /* rows past r: gemm6x16 writes six (sc has room) */
                        gemm6x16(qbh + t * qt, qt, r, kT + j, Sp, d, sc + (t - t0) * ATTN_KEYS + (j - s0), ATTN_KEYS,
                                 NULL, NULL, 0, ACT_NONE);
                }
                for (int64_t t = t0; t < t1; t++) {  /* p = 2^(score - max so far); earlier sums rescaled to it */
                    float *p = sc + (t - t0) * ATTN_KEYS, *a = acc + (t - t0) * d;
                    const int64_t lim = causal && t + 1 + S - T < s1 ? t + 1 + S - T : s1, n = lim > s0 ? lim - s0 : 0;
                    float m = top[t - t0];
                    for (int64_t s = 0; s < n; s++) m = p[s] > m ? p[s] : m;
                    float sum = 0.0f;
                    int64_t s = 0;
                    if (n > 0) {
#ifdef MMLM_AVX2
                        const __m256 mv = _mm256_set1_ps(m);
                        __m256 sv = _mm256_setzero_ps();
                        for (; s + 8 <= n; s += 8) {
                            const __m256 e = exp2_8_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(p + s), mv));
                            _mm256_storeu_ps(p + s, e);
                            sv = _mm256_add_ps(sv, e);
                        }
                        sum = hsum8_ps(sv);
#endif
                        for (; s < n; s++) sum += p[s] = exp2f(p[s] - m);
                        if (m > top[t - t0] && top[t - t0] > -INFINITY) {  /* a larger score: the sums so far shrink */
                            const float c = exp2f(top[t - t0] - m);
                            total[t - t0] *= c;
                            for (int64_t i = 0; i < d; i++) a[i] *= c;
                        }
                        top[t - t0] = m;
                        total[t - t0] += sum;
                    }
                    for (; s < s1 - s0; s++) p[s] = 0.0f;  /* keys later than this causal row */
                }
                if (rest)
                    for (int64_t s = s0; s < s1; s++)
                        for (int64_t i = 0; i < 16; i++) vtail[(s - s0) * 16 + i] = i < rest ? vbh[s * vt + full + i] : 0.0f;
                for (int64_t t = t0; t < t1; t += 6) {  /* acc += p v over the block's keys, sixteen dims at a time */
                    const int r = t1 - t < 6 ? (int)(t1 - t) : 6;
                    const int64_t n = causal && t + r + S - T < s1 ? t + r + S - T - s0 : s1 - s0;
                    if (n <= 0) continue;
                    for (int64_t j = 0; j < full; j += 16) {
                        float *a = acc + (t - t0) * d + j;  /* rows past r: acc has room */
                        gemm6x16(sc + (t - t0) * ATTN_KEYS, ATTN_KEYS, r, vbh + s0 * vt + j, vt, n, a, d, NULL, a, d,
                                 ACT_NONE);
                    }
                    if (rest) {
                        gemm6x16(sc + (t - t0) * ATTN_KEYS, ATTN_KEYS, r, vtail, 16, n, tile, 16, NULL, NULL, 0, ACT_NONE);
                        for (int i = 0; i < r; i++)
                            for (int64_t c = 0; c < rest; c++) acc[(t - t0 + i) * d + full + c] += tile[i * 16 + c];
                    }
                }
            }
            for (int64_t t = t0; t < t1; t++) {
                const float inv = 1.0f / total[t - t0];
                float *o = out + (b * T + t) * ldo + h * d;
                for (int64_t i = 0; i < d; i++) o[i] = acc[(t - t0) * d + i] * inv;
            }
        }
        free(kT);
    }
    return ok;
}

/* The whole convolution in one pass, tiles in blocks of T (a multiple of 6) whose transformed patches stay in the
 * core's cache: y (N, H, W, O) = conv(x (N, H, W, C)) + bias + shift + residual (as mmlm_winograd_output), with
 * U (36, C, Op) the transformed kernels, Op = O rounded up to 16 (zero columns past O). For each block: B^T d B of
 * its tiles (36, T, C); then sixteen output channels at a time, the 36 products (T, C) x (C, 16) and A^T m A of
 * those channels. Returns 0 (y incomplete) when scratch memory could not be had, else 1. */
int mmlm_winograd_conv(const float *x, int64_t N, int64_t H, int64_t W, int64_t C, const float *U, int64_t O,
                       int64_t Op, int64_t T, const float *bias, const float *shift, const float *residual, float *y,
                       int threads) {
    const int64_t th = H / 4, tw = W / 4, P = N * th * tw, blocks = (P + T - 1) / T;
    float *zero = calloc((size_t)C, sizeof(float));
    if (!zero) return 0;
    int ok = 1;
#pragma omp parallel num_threads(threads) if (threads > 1 && blocks > 1)
    {
        float *V = malloc(sizeof(float) * 36 * T * C), *M = malloc(sizeof(float) * 36 * T * 16);
        if (!V || !M) {
#pragma omp atomic write
            ok = 0;
        }
#pragma omp for schedule(static)
        for (int64_t blk = 0; blk < blocks; blk++) {
            if (!V || !M) continue;
            const int64_t p0 = blk * T, tn = P - p0 < T ? P - p0 : T;
            for (int64_t t = 0; t < tn; t++) winograd_input_tile(x, H, W, C, th, tw, p0 + t, zero, V + t * C, T * C);
            if (tn < T)  /* the last block's rows past P: zeros (their sums are never read) */
                for (int q = 0; q < 36; q++) memset(V + (q * T + tn) * C, 0, sizeof(float) * (T - tn) * C);
            for (int64_t o0 = 0; o0 < O; o0 += 16) {
                for (int q = 0; q < 36; q++)
                    for (int64_t r = 0; r < T; r += 6)
                        gemm6x16(V + (q * T + r) * C, C, 6, U + q * C * Op + o0, Op, C, M + (q * T + r) * 16, 16, NULL,
                                 NULL, 0, ACT_NONE);
                for (int64_t t = 0; t < tn; t++)
                    winograd_output_tile(M + t * 16, T * 16, H, W, O, th, tw, p0 + t, o0, O - o0 < 16 ? O - o0 : 16,
                                         bias, shift, residual, y);
            }
        }
        free(V);
        free(M);
    }
    free(zero);
    return ok;
}

/* Which loops this build has: 2 AVX-512 VNNI, 1 AVX2, 0 the plain C ones. */
int mmlm_simd(void) {
#if defined(MMLM_AVX512)
    return 2;
#elif defined(MMLM_AVX2)
    return 1;
#else
    return 0;
#endif
}
