/* Quantized matmul for MLX's affine format on the CPU: y = x . dequant(W)^T.
 *
 * W is MLX's packing: uint32 words, row n holds K*bits/32 words; element k of a row sits at
 * bit (k % (32/bits)) * bits of word k / (32/bits) (little-endian, so the byte view is in order).
 * dequant(W)[n, k] = scale[n, k/gs] * q + bias[n, k/gs]; scales/biases are f32, f16 or bf16.
 *
 * Three paths, all reading the packed weights in place:
 *   M == 1       GEMV in factored form: y[n] = sum_g s_g * (q_g . x_g) + b_g * sum(x_g)
 *   M small      the same over blocks of up to 4 inputs (each dequantized vector feeds 4 FMAs);
 *                portable builds dequantize one row into L1 and take M dot products against it
 *   M large      dequantize a tile of rows to fp32 and hand it to cblas_sgemm (if one is set)
 * 4-bit weights can also meet x rounded to int8 (cpu_q8.h on AVX2, cpu_q8w.h on AVX-512BW).
 * Rows are split over a small pool of worker threads (cpu_pool.h). AVX2/FMA is chosen at run
 * time on x86-64; elsewhere portable C that the compiler vectorizes (NEON on arm64).
 */
#define _GNU_SOURCE  /* clock_gettime, sysconf under -std=c11 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <time.h>
#include <unistd.h>
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define MM_X86 1
#endif

#ifndef MM_SOURCE_HASH
#define MM_SOURCE_HASH "dev"
#endif

enum { DT_F32 = 0, DT_F16 = 1, DT_BF16 = 2 };
enum { CBLAS_ROW_MAJOR = 101, CBLAS_NO_TRANS = 111, CBLAS_TRANS = 112 };
typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float*, int, const float*, int,
                         float, float*, int);

static sgemm_fn g_sgemm = 0;
static int g_gemm_min_rows = 12;  /* below this M the row-dequant path beats dequant + sgemm */
static int g_wide_max_rows = 32;  /* up to this M the AVX-512 multi-row GEMV beats dequant + sgemm */
static const int64_t TILE_BYTES = 1 << 21;  /* fp32 weight tile handed to sgemm: ~L2 sized */
/* GEMV software prefetch, in words ahead of the loads in each row (4 KB): the hardware
 * prefetcher alone left one core at 5.5 GB/s from DRAM on a 24B-shaped stream, this at 8.9 */
#define PF_WORDS 1024
#define CHUNK_ROWS 16  /* rows per chunk: even, so the GEMV's row pairs never straddle chunks */

/* ---- scalar helpers ---------------------------------------------------------------------- */

static float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
    if (exp == 0) {
        float f = (float)man * (1.0f / 16777216.0f);  /* subnormal: man * 2^-24 */
        return sign ? -f : f;
    }
    bits = exp == 31 ? (sign | 0x7F800000u | (man << 13)) : (sign | ((exp + 112) << 23) | (man << 13));
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* n scales (or biases) starting at element off, as f32 */
static void load_f32(float* dst, const void* src, int64_t off, int64_t n, int dt) {
    if (dt == DT_F32) {
        memcpy(dst, (const float*)src + off, (size_t)n * 4);
    } else if (dt == DT_F16) {
        const uint16_t* p = (const uint16_t*)src + off;
        for (int64_t i = 0; i < n; i++) dst[i] = f16_to_f32(p[i]);
    } else {
        const uint16_t* p = (const uint16_t*)src + off;
        for (int64_t i = 0; i < n; i++) {
            uint32_t u = (uint32_t)p[i] << 16;
            memcpy(dst + i, &u, 4);
        }
    }
}

/* scales then biases of rows n and n + two, as f32: buf holds s0, b0, s1, b1 (G each) */
static void load_pair(float* buf, const void* sc, const void* bi, int dt, int64_t n, int two, int64_t G) {
    load_f32(buf, sc, n * G, G, dt);
    load_f32(buf + G, bi, n * G, G, dt);
    load_f32(buf + 2 * G, sc, (n + two) * G, G, dt);
    load_f32(buf + 3 * G, bi, (n + two) * G, G, dt);
}

/* ---- portable kernels -------------------------------------------------------------------- */

static void deq_row_c(const uint32_t* wr, const float* s, const float* b, int64_t K, int gs, int bits,
                      float* out) {
    const uint8_t* by = (const uint8_t*)wr;
    for (int64_t g = 0; g < K / gs; g++)
        for (int64_t k = g * gs; k < (g + 1) * gs; k++) {
            int q = bits == 4 ? (by[k >> 1] >> ((k & 1) * 4)) & 0xF : by[k];
            out[k] = s[g] * (float)q + b[g];
        }
}

static float dot_c(const float* a, const float* b, int64_t K) {
    float acc[8] = {0};  /* 8 lanes so the compiler vectorizes without reassociation flags */
    for (int64_t k = 0; k < K; k += 8)
        for (int j = 0; j < 8; j++) acc[j] += a[k + j] * b[k + j];
    return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

static void gemv_c(const float* x, const float* xsum, int64_t K, const uint32_t* w, const void* sc,
                   const void* bi, int dt, int gs, int bits, int64_t n0, int64_t n1, float* y) {
    int64_t G = K / gs, wpr = K * bits / 32;
    float* buf = malloc((size_t)(K + 2 * G) * sizeof(float));
    float *s = buf + K, *b = s + G;
    for (int64_t n = n0; n < n1; n++) {
        load_f32(s, sc, n * G, G, dt);
        load_f32(b, bi, n * G, G, dt);
        deq_row_c(w + n * wpr, s, b, K, gs, bits, buf);
        y[n] = dot_c(buf, x, K);
    }
    (void)xsum;
    free(buf);
}

/* ---- AVX2 / FMA kernels ------------------------------------------------------------------ */
#ifdef MM_X86
#define AVX2 __attribute__((target("avx2,fma")))

/* a kernel's row count (1..8) as a compile-time constant: CALL(MR, V) for mr (8 for anything
 * above), V passed through; MR_VNNI_SWITCH makes the VNNI flag a constant too */
#define MR_SWITCH(mr, CALL, V)                    \
    switch (mr) {                                 \
        case 1: CALL(1, V); break;                \
        case 2: CALL(2, V); break;                \
        case 3: CALL(3, V); break;                \
        case 4: CALL(4, V); break;                \
        case 5: CALL(5, V); break;                \
        case 6: CALL(6, V); break;                \
        case 7: CALL(7, V); break;                \
        default: CALL(8, V); break;               \
    }
#define MR_VNNI_SWITCH(mr, vnni, CALL) \
    do {                               \
        if (vnni) {                    \
            MR_SWITCH(mr, CALL, 1)     \
        } else {                       \
            MR_SWITCH(mr, CALL, 0)     \
        }                              \
    } while (0)

AVX2 static inline __m256 q4_at(const uint32_t* word, __m256i shifts, __m256i mask) {
    /* the 8 nibbles of one word, in element order, as floats */
    return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)*word), shifts), mask));
}

AVX2 static inline __m256 q8_at(const uint8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}

AVX2 static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

AVX2 static void deq_row_avx2(const uint32_t* wr, const float* s, const float* b, int64_t K, int gs,
                              int bits, float* out) {
    const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28), mask = _mm256_set1_epi32(0xF);
    for (int64_t g = 0; g < K / gs; g++) {
        __m256 vs = _mm256_set1_ps(s[g]), vb = _mm256_set1_ps(b[g]);
        float* o = out + g * gs;
        if (bits == 4) {
            const uint32_t* wg = wr + g * (gs / 8);
            for (int j = 0; j < gs / 8; j++) _mm256_storeu_ps(o + 8 * j, _mm256_fmadd_ps(q4_at(wg + j, shifts, mask), vs, vb));
        } else {
            const uint8_t* wg = (const uint8_t*)wr + g * gs;
            for (int j = 0; j < gs / 8; j++) _mm256_storeu_ps(o + 8 * j, _mm256_fmadd_ps(q8_at(wg + 8 * j), vs, vb));
        }
    }
}

AVX2 static float dot_avx2(const float* a, const float* b, int64_t K) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t k = 0; k < K; k += 32) {  /* K is a multiple of the group size, so of 32 */
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k + 8), _mm256_loadu_ps(b + k + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k + 16), _mm256_loadu_ps(b + k + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k + 24), _mm256_loadu_ps(b + k + 24), a3);
    }
    return hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
}

/* Two rows per pass share every load of x; four accumulators per row hide FMA latency. */
AVX2 static void gemv_avx2(const float* x, const float* xsum, int64_t K, const uint32_t* w, const void* sc,
                           const void* bi, int dt, int gs, int bits, int64_t n0, int64_t n1, float* y) {
    const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28), mask = _mm256_set1_epi32(0xF);
    int64_t G = K / gs, wpr = K * bits / 32;
    float* buf = malloc((size_t)(4 * G) * sizeof(float));
    float *s0 = buf, *b0 = buf + G, *s1 = buf + 2 * G, *b1 = buf + 3 * G;
    for (int64_t n = n0; n < n1; n += 2) {
        int two = n + 1 < n1;
        const uint32_t* r0 = w + n * wpr;
        const uint32_t* r1 = two ? r0 + wpr : r0;  /* odd tail: compute row n twice, store once */
        load_pair(buf, sc, bi, dt, n, two, G);
        __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0;
        float bs0 = 0.f, bs1 = 0.f;
        for (int64_t g = 0; g < G; g++) {
            const float* xg = x + g * gs;
            _mm_prefetch((const char*)(r0 + g * gs * bits / 32 + PF_WORDS), _MM_HINT_T0);
            _mm_prefetch((const char*)(r1 + g * gs * bits / 32 + PF_WORDS), _MM_HINT_T0);
            __m256 p0 = _mm256_setzero_ps(), p1 = p0, q0 = p0, q1 = p0;
            if (bits == 4) {
                const uint32_t *w0 = r0 + g * (gs / 8), *w1 = r1 + g * (gs / 8);
                for (int j = 0; j < gs / 8; j += 2) {
                    __m256 xa = _mm256_loadu_ps(xg + 8 * j), xb = _mm256_loadu_ps(xg + 8 * j + 8);
                    p0 = _mm256_fmadd_ps(q4_at(w0 + j, shifts, mask), xa, p0);
                    p1 = _mm256_fmadd_ps(q4_at(w0 + j + 1, shifts, mask), xb, p1);
                    q0 = _mm256_fmadd_ps(q4_at(w1 + j, shifts, mask), xa, q0);
                    q1 = _mm256_fmadd_ps(q4_at(w1 + j + 1, shifts, mask), xb, q1);
                }
            } else {
                const uint8_t *w0 = (const uint8_t*)r0 + g * gs, *w1 = (const uint8_t*)r1 + g * gs;
                for (int j = 0; j < gs / 8; j += 2) {
                    __m256 xa = _mm256_loadu_ps(xg + 8 * j), xb = _mm256_loadu_ps(xg + 8 * j + 8);
                    p0 = _mm256_fmadd_ps(q8_at(w0 + 8 * j), xa, p0);
                    p1 = _mm256_fmadd_ps(q8_at(w0 + 8 * j + 8), xb, p1);
                    q0 = _mm256_fmadd_ps(q8_at(w1 + 8 * j), xa, q0);
                    q1 = _mm256_fmadd_ps(q8_at(w1 + 8 * j + 8), xb, q1);
                }
            }
            acc0 = _mm256_fmadd_ps(_mm256_add_ps(p0, p1), _mm256_set1_ps(s0[g]), acc0);
            acc1 = _mm256_fmadd_ps(_mm256_add_ps(q0, q1), _mm256_set1_ps(s1[g]), acc1);
            bs0 += b0[g] * xsum[g];
            bs1 += b1[g] * xsum[g];
        }
        y[n] = hsum8(acc0) + bs0;
        if (two) y[n + 1] = hsum8(acc1) + bs1;
    }
    free(buf);
}

/* MR (1..4) inputs against one weight row at a time: each dequantized vector feeds MR FMAs. */
AVX2 static inline __attribute__((always_inline)) void gemv_mr(
    const float* x, const float* xsum, int64_t K, const uint32_t* w, const void* sc, const void* bi, int dt,
    int gs, int bits, int64_t n0, int64_t n1, float* y, int64_t ldy, float* sb, const int MR) {
    const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28), mask = _mm256_set1_epi32(0xF);
    int64_t G = K / gs, wpr = K * bits / 32;
    float *s = sb, *b = sb + G;
    for (int64_t n = n0; n < n1; n++) {
        const uint32_t* r = w + n * wpr;
        load_f32(s, sc, n * G, G, dt);
        load_f32(b, bi, n * G, G, dt);
        __m256 acc[4];
        float bs[4];
        for (int m = 0; m < MR; m++) acc[m] = _mm256_setzero_ps(), bs[m] = 0.f;
        for (int64_t g = 0; g < G; g++) {
            __m256 pe[4], po[4];  /* even and odd words: two chains per input hide FMA latency */
            for (int m = 0; m < MR; m++) pe[m] = po[m] = _mm256_setzero_ps();
            for (int j = 0; j < gs / 8; j += 2) {
                __m256 qe, qo;
                if (bits == 4) {
                    qe = q4_at(r + g * (gs / 8) + j, shifts, mask);
                    qo = q4_at(r + g * (gs / 8) + j + 1, shifts, mask);
                } else {
                    qe = q8_at((const uint8_t*)r + g * gs + 8 * j);
                    qo = q8_at((const uint8_t*)r + g * gs + 8 * j + 8);
                }
                for (int m = 0; m < MR; m++) {
                    const float* xg = x + m * K + g * gs + 8 * j;
                    pe[m] = _mm256_fmadd_ps(qe, _mm256_loadu_ps(xg), pe[m]);
                    po[m] = _mm256_fmadd_ps(qo, _mm256_loadu_ps(xg + 8), po[m]);
                }
            }
            __m256 vs = _mm256_set1_ps(s[g]);
            for (int m = 0; m < MR; m++) {
                acc[m] = _mm256_fmadd_ps(_mm256_add_ps(pe[m], po[m]), vs, acc[m]);
                bs[m] += b[g] * xsum[m * G + g];
            }
        }
        for (int m = 0; m < MR; m++) y[m * ldy + n] = hsum8(acc[m]) + bs[m];
    }
}

AVX2 static void gemv_small_avx2(const float* x, const float* xsum, int mr, int64_t K, const uint32_t* w,
                                 const void* sc, const void* bi, int dt, int gs, int bits, int64_t n0, int64_t n1,
                                 float* y, int64_t ldy, float* sb) {
    switch (mr) {
        case 1: gemv_mr(x, xsum, K, w, sc, bi, dt, gs, bits, n0, n1, y, ldy, sb, 1); break;
        case 2: gemv_mr(x, xsum, K, w, sc, bi, dt, gs, bits, n0, n1, y, ldy, sb, 2); break;
        case 3: gemv_mr(x, xsum, K, w, sc, bi, dt, gs, bits, n0, n1, y, ldy, sb, 3); break;
        default: gemv_mr(x, xsum, K, w, sc, bi, dt, gs, bits, n0, n1, y, ldy, sb, 4); break;
    }
}

#include "cpu_q8.h"

/* ---- AVX-512 4-bit GEMV ------------------------------------------------------------------ *
 * Two rows per pass in one 512-bit register: lanes 0-7 hold 8 words of row n, lanes 8-15 the
 * same words of row n + 1. Word i of a 64-element block holds elements 8i .. 8i + 7, so after a
 * right shift by 4t, lane i's low nibble is element 8i + t; vpermps reads only the low 4 bits
 * of each index, so one permute against the table 0.0 .. 15.0 turns 16 nibbles into floats
 * with no mask and no int->float conversion: shift, permute, then one FMA per input row, where
 * AVX2 spends 5 ALU ops per 8 weights. x is laid out once per call to match (`x_strided`), and
 * its 8 floats per (block, t) are broadcast to both halves by the load itself.
 *
 * The rows of a chunk (up to CHUNK_ROWS) run through K in tiles of KT_BLOCKS blocks, every row
 * pair of the chunk per tile, so the tile of x (8 inputs x 2 KB at most) stays in L1: streaming
 * all of x per row pair from L2 cost more than the weights themselves at large K or several
 * inputs. Up to 8 inputs per pass (draft verification, prefill chunks). */
#define AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")))
#define KT_BLOCKS 8

/* (K/64, 8, 8): per block b and nibble t, x[64b + 8i + t] for i = 0..7 */
static void x_strided(const float* x, int64_t K, float* xp) {
    for (int64_t b = 0; b < K / 64; b++)
        for (int t = 0; t < 8; t++)
            for (int i = 0; i < 8; i++) xp[(b * 8 + t) * 8 + i] = x[64 * b + 8 * i + t];
}

AVX512 static inline __m512 nib(__m512i w, int t, __m512 table) {
    return _mm512_permutexvar_ps(t ? _mm512_srli_epi32(w, 4 * t) : w, table);
}

static inline float scale_at(const void* p, int64_t i, int dt) {
    if (dt == DT_F32) return ((const float*)p)[i];
    uint16_t h = ((const uint16_t*)p)[i];
    if (dt == DT_F16) return f16_to_f32(h);
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* the scales of block b of rows (r, r2) as 16 lanes: 8 of row r, 8 of row r2 */
AVX512 static inline __attribute__((always_inline)) __m512 block_scales(const void* sc, int dt, int gs, int64_t G, int64_t r, int64_t r2, int64_t b) {
    if (gs == 32) {  /* lanes 0-3, 4-7 of each row: the block's two groups */
        const __m512i quarter = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
        int64_t g = 2 * b;
        __m128 v = _mm_setr_ps(scale_at(sc, r * G + g, dt), scale_at(sc, r * G + g + 1, dt),
                               scale_at(sc, r2 * G + g, dt), scale_at(sc, r2 * G + g + 1, dt));
        return _mm512_permutexvar_ps(quarter, _mm512_castps128_ps512(v));
    }
    int64_t g = gs == 128 ? b >> 1 : b;  /* gs is 64 or 128 here: no idiv per block */
    return _mm512_castpd_ps(_mm512_insertf64x4(
        _mm512_castpd256_pd512(_mm256_castps_pd(_mm256_set1_ps(scale_at(sc, r * G + g, dt)))),
        _mm256_castps_pd(_mm256_set1_ps(scale_at(sc, r2 * G + g, dt))), 1));
}

/* 16 scales or biases from index i, in their stored dtype, as floats */
AVX512 static inline __attribute__((always_inline)) __m512 load16(const void* p, int64_t i, int dt) {
    if (dt == DT_F32) return _mm512_loadu_ps((const float*)p + i);
    __m256i h = _mm256_loadu_si256((const __m256i*)((const uint16_t*)p + i));
    if (dt == DT_F16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));  /* bf16: the high half */
}

/* the first lanes of `k` of load16, zeros above, reading nothing past them */
AVX512 static inline __attribute__((always_inline)) __m512 load16_masked(const void* p, int64_t i, int dt, __mmask16 k) {
    if (dt == DT_F32) return _mm512_maskz_loadu_ps(k, (const float*)p + i);
    __m256i h = _mm256_maskz_loadu_epi16(k, (const uint16_t*)p + i);
    if (dt == DT_F16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* sum over the G groups of one row of bias[g] * xsum[g]: the bias part of the factored GEMV.
 * Vectorized: with several inputs it was a quarter of the kernel's time as a scalar loop. */
AVX512 static inline __attribute__((always_inline)) float bias_term(const void* bi, int dt, int64_t at,
                                                                      const float* xsum, int64_t G) {
    __m512 acc = _mm512_setzero_ps();
    int64_t g = 0;
    for (; g + 16 <= G; g += 16) acc = _mm512_fmadd_ps(load16(bi, at + g, dt), _mm512_loadu_ps(xsum + g), acc);
    if (g < G) {  /* masked loads: a K of 576 (SmolLM2) leaves a tail of 9 groups on every row */
        __mmask16 k = (__mmask16)((1u << (G - g)) - 1);
        acc = _mm512_fmadd_ps(load16_masked(bi, at + g, dt, k), _mm512_maskz_loadu_ps(k, xsum + g), acc);
    }
    return _mm512_reduce_add_ps(acc);
}

/* y of rows r and r + 1 (if `two`) for MR inputs from their accumulators (8 lanes per row) */
AVX512 static inline __attribute__((always_inline)) void pair_out(const __m512* t8, int64_t r, int two,
                                                                    const void* bi, int dt, const float* xsum,
                                                                    int64_t G, float* y, int64_t ldy, const int MR) {
    for (int m = 0; m < MR; m++) {
        y[m * ldy + r] = hsum8(_mm512_castps512_ps256(t8[m])) + bias_term(bi, dt, r * G, xsum + m * G, G);
        if (two)
            y[m * ldy + r + 1] = hsum8(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(t8[m]), 1))) +
                                 bias_term(bi, dt, (r + 1) * G, xsum + m * G, G);
    }
}

/* rows n0 .. n1 (at most CHUNK_ROWS) against MR inputs: y[m * ldy + n] */
AVX512 static inline __attribute__((always_inline)) void gemv4_tiled(
    const float* xp, const float* xsum, int64_t K, const uint32_t* w, const void* sc, const void* bi, int dt, int gs,
    int64_t n0, int64_t n1, float* y, int64_t ldy, const int MR) {
    const __m512 table = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    /* independent FMA chains per input: enough in flight to cover the FMA latency */
    const int CH = MR == 1 ? 4 : (MR <= 4 ? 2 : 1);
    int64_t G = K / gs, wpr = K / 8, B = K / 64;
    int npairs = (int)((n1 - n0 + 1) / 2);
    __m512 tot[CHUNK_ROWS / 2][8];  /* a pair's sums between K tiles (several inputs only) */
    /* one input: x is small enough to stay near, so each row pair streams its whole row (the
     * prefetcher sees two long streams); several: K tiles, prefetching the next tile */
    const int64_t KT = MR == 1 ? B : KT_BLOCKS, PF = MR == 1 ? PF_WORDS : 8 * KT_BLOCKS;
    for (int64_t kt = 0; kt < B; kt += KT) {
        int64_t kend = kt + KT < B ? kt + KT : B;
        for (int p = 0; p < npairs; p++) {
            int64_t r = n0 + 2 * p, r2 = r + 1 < n1 ? r + 1 : r;  /* odd tail: row r twice, stored once */
            const uint32_t *w0 = w + r * wpr, *w1 = w + r2 * wpr;
            /* the sums stay in registers across the K loop (a store per block into tot was a
             * store-to-load chain that halved the one-input rate) */
            __m512 t8[8];
            for (int m = 0; m < MR; m++) t8[m] = kt == 0 ? _mm512_setzero_ps() : tot[p][m];
            for (int64_t b = kt; b < kend; b++) {
                _mm_prefetch((const char*)(w0 + 8 * b + PF), _MM_HINT_T0);
                _mm_prefetch((const char*)(w1 + 8 * b + PF), _MM_HINT_T0);
                __m512i W = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)(w0 + 8 * b))),
                                               _mm256_loadu_si256((const __m256i*)(w1 + 8 * b)), 1);
                __m512 acc[8][4];
                for (int m = 0; m < MR; m++)
                    for (int c = 0; c < CH; c++) acc[m][c] = _mm512_setzero_ps();
#pragma GCC unroll 8
                for (int t = 0; t < 8; t++) {  /* unrolled: immediate shifts, fixed accumulators */
                    __m512 q = nib(W, t, table);
                    for (int m = 0; m < MR; m++) {
                        __m512 xv = _mm512_broadcast_f32x8(_mm256_loadu_ps(xp + m * K + (b * 8 + t) * 8));
                        acc[m][t % CH] = _mm512_fmadd_ps(q, xv, acc[m][t % CH]);
                    }
                }
                __m512 sv = block_scales(sc, dt, gs, G, r, r2, b);
                for (int m = 0; m < MR; m++) {
                    __m512 a = acc[m][0];
                    for (int c = 1; c < CH; c++) a = _mm512_add_ps(a, acc[m][c]);
                    t8[m] = _mm512_fmadd_ps(a, sv, t8[m]);
                }
            }
            if (kend == B)
                pair_out(t8, r, r + 1 < n1, bi, dt, xsum, G, y, ldy, MR);
            else
                for (int m = 0; m < MR; m++) tot[p][m] = t8[m];
        }
    }
}

/* mr (1..8) inputs; xp and xsum point at the first one's */
AVX512 static void gemv4_avx512(const float* xp, const float* xsum, int mr, int64_t K, const uint32_t* w,
                                const void* sc, const void* bi, int dt, int gs, int64_t n0, int64_t n1, float* y,
                                int64_t ldy) {
#define GEMV4_TILED(MR, V) gemv4_tiled(xp, xsum, K, w, sc, bi, dt, gs, n0, n1, y, ldy, MR)
    MR_SWITCH(mr, GEMV4_TILED, 0)
#undef GEMV4_TILED
}

#include "cpu_q8w.h"
#endif

/* ---- dispatch ------------------------------------------------------------------------------ */

typedef void (*gemv_fn)(const float*, const float*, int64_t, const uint32_t*, const void*, const void*,
                        int, int, int, int64_t, int64_t, float*);
typedef void (*deq_fn)(const uint32_t*, const float*, const float*, int64_t, int, int, float*);
typedef float (*dot_fn)(const float*, const float*, int64_t);

static gemv_fn k_gemv = gemv_c;
static deq_fn k_deq = deq_row_c;
static dot_fn k_dot = dot_c;
static int g_simd = 0;
static int g_avx512 = 0;  /* the AVX-512 4-bit GEMV for one input row (K a multiple of 64) */
/* the 4-bit GEMV on int8 activations (cpu_q8.h, cpu_q8w.h) before the float ones: 0 never,
 * 1 for every M, 2 for M >= 2 only (one row keeps the float AVX-512 GEMV) */
static int g_int8 = 0;
static int g_q8w = 0;  /* the int8 GEMV on 512-bit registers (needs AVX-512BW, K % 128 == 0) */
static int g_vnni = 0;  /* the int8 GEMVs with vpdpbusd (AVX512-VNNI and VL) */

/* what the AVX512 kernels are built for (BW/VL: their masked 16-bit loads) */
static int has_avx512(void) {
#ifdef MM_X86
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
#else
    return 0;
#endif
}

static int has_avx512bw(void) { return has_avx512() && getenv("MLX_MISTRAL_NO_AVX512") == NULL; }

/* vpdpbusd on 256- and 512-bit registers (EVEX: VNNI with VL) */
static int has_vnni(void) {
#ifdef MM_X86
    return has_avx512bw() && __builtin_cpu_supports("avx512vnni");
#else
    return 0;
#endif
}

/* VNNI wherever the CPU has it; MLX_MISTRAL_VNNI=0 keeps it off */
static int vnni_default(void) {
    const char* env = getenv("MLX_MISTRAL_VNNI");
    return has_vnni() && !(env && env[0] == '0');
}

/* int8 activations on every x86 CPU with AVX2, AVX-512 ones included: there the AVX2 int8 GEMV
 * beat the AVX-512 float one at every shape measured (alternating runs, 1 and 2 threads, the 24B
 * model's projections: 1.0-1.6x on a Skylake-SP and an Ice Lake Xeon) and took the 24B shape's
 * decode from 49% to 69% (Skylake-SP) and from 79% to 92% (Ice Lake) of the read test.
 * MLX_MISTRAL_INT8=0/1/2 forces (2: from two rows on; one row keeps the float kernels) */
static int int8_default(void) {
    const char* env = getenv("MLX_MISTRAL_INT8");
    if (env && *env) return env[0] == '1' ? 1 : env[0] == '2' ? 2 : 0;
    return g_simd == 2 ? 1 : 0;
}

/* the 512-bit int8 GEMV only when asked (MLX_MISTRAL_INT8_512=1): on a Skylake-SP Xeon it ran
 * 1.15-1.27x slower than the AVX2 one (its integer multiplies share one 512-bit port; 1 thread,
 * N 4096, K 1280, M 1/2/8), so int8 activations keep the AVX2 kernel by default */
static int q8w_default(void) {
    const char* env = getenv("MLX_MISTRAL_INT8_512");
    return g_simd == 2 && has_avx512bw() && env && env[0] == '1';
}

static void pick_kernels(void) {
    static int done = 0;
    if (done) return;
    done = 1;
#ifdef MM_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        k_gemv = gemv_avx2;
        k_deq = deq_row_avx2;
        k_dot = dot_avx2;
        g_simd = 2;
        g_avx512 = has_avx512() && getenv("MLX_MISTRAL_NO_AVX512") == NULL;
        g_int8 = int8_default();
        g_q8w = q8w_default();
        g_vnni = vnni_default();
    }
#endif
}

/* 0: keep the AVX-512 GEMV off (tests compare it with the AVX2 one); 1: on where the CPU has it */
void mm_use_avx512(int on) {
    pick_kernels();
#ifdef MM_X86
    g_avx512 = on && g_simd == 2 && has_avx512();
#else
    (void)on;
#endif
}

/* 1: the portable kernels even where AVX2 exists (how tests reach the arm64/generic path) */
void mm_use_portable(int on) {
    pick_kernels();
    k_gemv = gemv_c, k_deq = deq_row_c, k_dot = dot_c, g_simd = 0, g_avx512 = 0;
#ifdef MM_X86
    if (!on && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        k_gemv = gemv_avx2, k_deq = deq_row_avx2, k_dot = dot_avx2, g_simd = 2;
        g_avx512 = has_avx512() && getenv("MLX_MISTRAL_NO_AVX512") == NULL;
        g_int8 = int8_default();
        g_q8w = q8w_default();
        g_vnni = vnni_default();
    } else {
        g_int8 = 0, g_q8w = 0, g_vnni = 0;
    }
#else
    (void)on;
#endif
}

/* the int8-activation GEMV for 4-bit weights up to wide_max_rows inputs: 1 for every M, 2 for
 * M >= 2, 0 the float ones */
void mm_use_int8(int on) {
    pick_kernels();
    g_int8 = g_simd == 2 ? on : 0;
}

/* 1: the int8 GEMV on 512-bit registers where the CPU has AVX-512BW (K % 128 == 0); 0: the AVX2 one */
void mm_use_int8_wide(int on) {
    pick_kernels();
    g_q8w = on && g_simd == 2 && has_avx512bw();
}

/* 1: the int8 GEMVs with vpdpbusd where the CPU has AVX512-VNNI; 0: maddubs/madd */
void mm_use_vnni(int on) {
    pick_kernels();
    g_vnni = on && g_simd == 2 && has_vnni();
}

int mm_vnni(void) {
    pick_kernels();
    return g_vnni;
}

int mm_int8_wide(void) {
    pick_kernels();
    return g_q8w;
}

int mm_int8(void) {
    pick_kernels();
    return g_int8;
}

const char* mm_source_hash(void) { return MM_SOURCE_HASH; }

/* 0 portable C, 2 AVX2+FMA, 3 AVX2+FMA with the AVX-512 GEMV */
int mm_simd(void) {
    pick_kernels();
    return g_simd + (g_avx512 ? 1 : 0);
}

#include "cpu_pool.h"

/* cblas_sgemm of the process's optimized BLAS, or NULL to keep to our own kernels */
void mm_set_sgemm(void* fn) { g_sgemm = (sgemm_fn)fn; }
void mm_set_gemm_min_rows(int m) { g_gemm_min_rows = m; }
void mm_set_wide_max_rows(int m) { g_wide_max_rows = m; }

/* how mm_qmm computes M rows: */
enum { P_GEMV, P_Q8, P_WIDE, P_SMALL, P_ROWS, P_GEMM };

static int q8_ok(int64_t M, int64_t K, int bits) {
    return g_int8 && bits == 4 && K % 64 == 0 && M <= g_wide_max_rows && (g_int8 == 1 || M >= 2);
}

/* the int8 path on 512-bit registers: pairs of 64-weight chunks */
static int q8w_ok(int64_t K) { return g_q8w && K % 128 == 0; }

static int wide_ok(int64_t M, int64_t K, int bits) {
    return g_avx512 && bits == 4 && K % 64 == 0 && M <= (M == 1 ? 1 : g_wide_max_rows);
}

static int pick_path(int64_t M, int64_t K, int bits) {
    if (q8_ok(M, K, bits)) return P_Q8;
    if (M == 1) return P_GEMV;
    if (wide_ok(M, K, bits)) return P_WIDE;
    int few = M < g_gemm_min_rows || !g_sgemm;
    if (few) return g_simd == 2 ? P_SMALL : P_ROWS;
    return P_GEMM;
}

/* ---- the three paths ----------------------------------------------------------------------- */
typedef struct qmm_args {
    const float* x;
    const float* xsum;  /* (M, K/gs) group sums of x, for the factored GEMV */
    const float* xp;  /* x_strided(x) for the AVX-512 GEMV, or NULL */
    const int8_t* xq;  /* x as int8 for the int8-activation GEMV, with its steps xd, or NULL */
    const float* xd;
    int64_t M, K, N;
    const uint32_t* w;
    const void *sc, *bi;
    int dt, gs, bits;
    float* y;
    float* wt;  /* GEMM: the fp32 tile being filled, rows t0 .. t0 + its height */
    int64_t t0;
    const struct qmm_args* group;  /* several matrices in one job: their args, in chunk order */
    int ngroup;
    void (*inner)(const void*, int64_t);
} qmm_args;


static int64_t chunks(int64_t rows) { return (rows + CHUNK_ROWS - 1) / CHUNK_ROWS; }
static int64_t chunk_end(int64_t n0, int64_t rows) { return n0 + CHUNK_ROWS < rows ? n0 + CHUNK_ROWS : rows; }

static float* group_sums(const float* x, int64_t M, int64_t K, int gs) {
    float* xsum = malloc((size_t)(M * (K / gs)) * sizeof(float));  /* (M, G) */
    for (int64_t i = 0; i < M * (K / gs); i++) {
        float t = 0.f;
        for (int64_t k = i * gs; k < (i + 1) * gs; k++) t += x[k];
        xsum[i] = t;
    }
    return xsum;
}

/* x laid out for the AVX-512 GEMVs when they will run (4-bit, K % 64 == 0), else NULL */
static float* strided_for(const float* x, int64_t M, int64_t K, int bits) {
#ifdef MM_X86
    if (wide_ok(M, K, bits)) {
        float* xp = malloc((size_t)(K * M) * sizeof(float));
        for (int64_t m = 0; m < M; m++) x_strided(x + m * K, K, xp + m * K);
        return xp;
    }
#endif
    (void)x, (void)M, (void)K, (void)bits;
    return NULL;
}

/* x as int8 in chunk order (xq, M * K) and its block steps (*xd, M * K / 8) when the int8 GEMV runs;
 * xsum (M, K/gs) then holds the group sums of the rounded x */
static int8_t* quantized_for(const float* x, int64_t M, int64_t K, int gs, int bits, float** xd, float* xsum) {
    *xd = NULL;
#ifdef MM_X86
    if (q8_ok(M, K, bits)) {
        int8_t* xq = malloc((size_t)(M * K));
        *xd = malloc((size_t)(M * K / 8) * sizeof(float));
        for (int64_t m = 0; m < M; m++) {
            q8_quantize_row(x + m * K, K, gs, xq + m * K, *xd + m * (K / 8), xsum + m * (K / gs));
            if (q8w_ok(K)) q8w_pair_layout(xq + m * K, K);
        }
        return xq;
    }
#endif
    (void)x, (void)M, (void)K, (void)gs, (void)bits, (void)xsum;
    return NULL;
}

static void gemv_chunk(const void* p, int64_t i) {
    const qmm_args* a = p;
    int64_t n0 = i * CHUNK_ROWS;
#ifdef MM_X86
    if (a->xp && a->bits == 4) {
        gemv4_avx512(a->xp, a->xsum, 1, a->K, a->w, a->sc, a->bi, a->dt, a->gs, n0, chunk_end(n0, a->N), a->y, a->N);
        return;
    }
#endif
    k_gemv(a->x, a->xsum, a->K, a->w, a->sc, a->bi, a->dt, a->gs, a->bits, n0, chunk_end(n0, a->N), a->y);
}

/* one fp32 row in L1, reused by all M inputs (portable path) */
static void rows_chunk(const void* p, int64_t i) {
    const qmm_args* a = p;
    int64_t K = a->K, G = K / a->gs, wpr = K * a->bits / 32, n0 = i * CHUNK_ROWS;
    float* buf = malloc((size_t)(K + 2 * G) * sizeof(float));
    float *s = buf + K, *b = s + G;
    for (int64_t n = n0; n < chunk_end(n0, a->N); n++) {
        load_f32(s, a->sc, n * G, G, a->dt);
        load_f32(b, a->bi, n * G, G, a->dt);
        k_deq(a->w + n * wpr, s, b, K, a->gs, a->bits, buf);
        for (int64_t m = 0; m < a->M; m++) a->y[m * a->N + n] = k_dot(a->x + m * K, buf, K);
    }
    free(buf);
}

#ifdef MM_X86
/* 2 .. wide_max_rows inputs: the AVX-512 GEMV over blocks of up to 8 inputs */
static void wide_chunk(const void* p, int64_t i) {
    const qmm_args* a = p;
    int64_t G = a->K / a->gs, n0 = i * CHUNK_ROWS;
    for (int64_t m0 = 0; m0 < a->M; m0 += 8) {
        int mr = a->M - m0 < 8 ? (int)(a->M - m0) : 8;
        gemv4_avx512(a->xp + m0 * a->K, a->xsum + m0 * G, mr, a->K, a->w, a->sc, a->bi, a->dt, a->gs, n0,
                     chunk_end(n0, a->N), a->y + m0 * a->N, a->N);
    }
}

/* 1 .. wide_max_rows inputs on int8 activations, blocks of up to 8 inputs */
static void q8_chunk(const void* p, int64_t i) {
    const qmm_args* a = p;
    int64_t G = a->K / a->gs, n0 = i * CHUNK_ROWS;
    float* sb = malloc((size_t)((CHUNK_ROWS + 1) * G + 4) * sizeof(float));
    for (int64_t m0 = 0; m0 < a->M; m0 += 8) {
        int mr = a->M - m0 < 8 ? (int)(a->M - m0) : 8;
        if (q8w_ok(a->K)) {
            gemv4_q8w(a->xq + m0 * a->K, a->xd + m0 * (a->K / 8), a->xsum + m0 * G, mr, a->K, a->w, a->sc, a->bi,
                      a->dt, a->gs, n0, chunk_end(n0, a->N), a->y + m0 * a->N, a->N, sb, g_vnni);
            continue;
        }
        gemv4_q8(a->xq + m0 * a->K, a->xd + m0 * (a->K / 8), a->xsum + m0 * G, mr, a->K, a->w, a->sc, a->bi, a->dt,
                 a->gs, n0, chunk_end(n0, a->N), a->y + m0 * a->N, a->N, sb, g_vnni);
    }
    free(sb);
}

/* a few inputs (2 .. gemm_min_rows): the factored GEMV over blocks of up to 4 inputs */
static void small_chunk(const void* p, int64_t i) {
    const qmm_args* a = p;
    int64_t G = a->K / a->gs, n0 = i * CHUNK_ROWS;
    float* sb = malloc((size_t)(2 * G) * sizeof(float));
    for (int64_t m0 = 0; m0 < a->M; m0 += 4) {
        int mr = a->M - m0 < 4 ? (int)(a->M - m0) : 4;
        gemv_small_avx2(a->x + m0 * a->K, a->xsum + m0 * G, mr, a->K, a->w, a->sc, a->bi, a->dt, a->gs, a->bits,
                        n0, chunk_end(n0, a->N), a->y + m0 * a->N, a->N, sb);
    }
    free(sb);
}
#endif

static void dequant_chunk(const void* p, int64_t i) {
    const qmm_args* a = p;
    int64_t K = a->K, G = K / a->gs, wpr = K * a->bits / 32, r0 = i * CHUNK_ROWS;
    float* sb = malloc((size_t)(2 * G) * sizeof(float));
    for (int64_t r = r0; r < chunk_end(r0, a->M); r++) {  /* M holds the tile height here */
        int64_t n = a->t0 + r;
        load_f32(sb, a->sc, n * G, G, a->dt);
        load_f32(sb + G, a->bi, n * G, G, a->dt);
        k_deq(a->w + n * wpr, sb, sb + G, K, a->gs, a->bits, a->wt + r * K);
    }
    free(sb);
}

/* tiles of rows dequantized to fp32 by our threads, each multiplied by the (threaded) BLAS */
static void qmm_gemm(const qmm_args* a) {
    int64_t K = a->K, N = a->N;
    int64_t tile = TILE_BYTES / (K * 4);
    tile = tile < CHUNK_ROWS ? CHUNK_ROWS : (tile / CHUNK_ROWS) * CHUNK_ROWS;
    if (tile > N) tile = N;
    float* wt = malloc((size_t)(tile * K) * sizeof(float));
    for (int64_t t0 = 0; t0 < N; t0 += tile) {
        int64_t nt = t0 + tile < N ? tile : N - t0;
        qmm_args d = *a;
        d.M = nt, d.wt = wt, d.t0 = t0;
        run_job(dequant_chunk, &d, chunks(nt), nt * K * a->bits / 8);
        g_sgemm(CBLAS_ROW_MAJOR, CBLAS_NO_TRANS, CBLAS_TRANS, (int)a->M, (int)nt, (int)K, 1.0f, a->x, (int)K, wt,
                (int)K, 0.0f, a->y + t0, (int)N);
    }
    free(wt);
}

/* the chunk function of the GEMV-style paths */
static chunk_fn row_fn(int path) {
#ifdef MM_X86
    if (path == P_WIDE) return wide_chunk;
    if (path == P_Q8) return q8_chunk;
    if (path == P_SMALL) return small_chunk;
#endif
    (void)path;
    return gemv_chunk;
}

/* y (M, N) = x (M, K) . dequant(w (N, K*bits/32))^T; returns 0, or -1 for an unsupported format */
int mm_qmm(const float* x, int64_t M, int64_t K, const uint32_t* w, const void* scales, const void* biases,
           int dtype, int64_t N, int group_size, int bits, float* y) {
    if ((bits != 4 && bits != 8) || (group_size != 32 && group_size != 64 && group_size != 128) ||
        K % group_size != 0 || dtype < DT_F32 || dtype > DT_BF16)
        return -1;
    pick_kernels();
    qmm_args a = {x, NULL, NULL, NULL, NULL, M, K, N, w, scales, biases, dtype, group_size, bits, y, NULL, 0, NULL, 0, NULL};
    int path = pick_path(M, K, bits);
    if (path == P_GEMV || path == P_Q8 || path == P_WIDE || path == P_SMALL) {
        float* xd;
        a.xsum = group_sums(x, M, K, group_size);
        a.xp = path == P_Q8 ? NULL : strided_for(x, M, K, bits);
        a.xq = quantized_for(x, M, K, group_size, bits, &xd, (float*)a.xsum);
        a.xd = xd;
        run_job(row_fn(path), &a, chunks(N), N * K * bits / 8);
        free((void*)a.xsum);
        free((void*)a.xp);
        free((void*)a.xq);
        free(xd);
    } else if (path == P_ROWS) {
        run_job(rows_chunk, &a, chunks(N), N * K * bits / 8);
    } else {
        qmm_gemm(&a);
    }
    return 0;
}

static void group_chunk(const void* p, int64_t i) {
    const qmm_args* a = p;
    for (int g = 0; g < a->ngroup; i -= chunks(a->group[g].N), g++)
        if (i < chunks(a->group[g].N)) {
            a->inner(&a->group[g], i);
            return;
        }
}

/* Several matrices that share x and the format (q/k/v, gate/up): ys[i] (M, Ns[i]) = x . W_i^T.
 * Small M runs as one job over all their rows: one call and one thread wake-up instead of three. */
int mm_qmm_multi(const float* x, int64_t M, int64_t K, int count, const uint32_t* const* ws,
                 const void* const* scs, const void* const* bis, const int64_t* Ns, int dtype, int group_size,
                 int bits, float* const* ys) {
    pick_kernels();
    int path = pick_path(M, K, bits);
    if (count < 1 || count > 16 || !(path == P_GEMV || path == P_Q8 || path == P_WIDE || path == P_SMALL)) {
        for (int i = 0; i < count; i++) {
            int rc = mm_qmm(x, M, K, ws[i], scs[i], bis[i], dtype, Ns[i], group_size, bits, ys[i]);
            if (rc != 0) return rc;
        }
        return 0;
    }
    if ((bits != 4 && bits != 8) || (group_size != 32 && group_size != 64 && group_size != 128) ||
        K % group_size != 0 || dtype < DT_F32 || dtype > DT_BF16)
        return -1;
    float* xsum = group_sums(x, M, K, group_size);
    float* xp = path == P_Q8 ? NULL : strided_for(x, M, K, bits);
    float* xd;
    int8_t* xq = quantized_for(x, M, K, group_size, bits, &xd, xsum);
    qmm_args group[16];
    int64_t total = 0, bytes = 0;
    for (int i = 0; i < count; i++) {
        bytes += Ns[i] * K * bits / 8;
        qmm_args a = {x, xsum, xp, xq, xd, M, K, Ns[i], ws[i], scs[i], bis[i], dtype, group_size, bits, ys[i], NULL, 0, NULL, 0, NULL};
        group[i] = a;
        total += chunks(Ns[i]);
    }
    qmm_args all = group[0];
    all.group = group, all.ngroup = count;
    all.inner = row_fn(path);
    run_job(group_chunk, &all, total, bytes);
    free(xsum);
    free(xp);
    free(xq);
    free(xd);
    return 0;
}

/* w holds [gate rows; up rows] (2F, K); y (M, F) = silu(x . Wg^T) * (x . Wu^T) */
int mm_gate_up_silu(const float* x, int64_t M, int64_t K, const uint32_t* w, const void* scales,
                    const void* biases, int dtype, int64_t F, int group_size, int bits, float* y) {
    float* gu = malloc((size_t)(M * 2 * F) * sizeof(float));
    int rc = mm_qmm(x, M, K, w, scales, biases, dtype, 2 * F, group_size, bits, gu);
    if (rc == 0)
        for (int64_t m = 0; m < M; m++)
            for (int64_t f = 0; f < F; f++) {
                float g = gu[m * 2 * F + f], u = gu[m * 2 * F + F + f];
                y[m * F + f] = g / (1.0f + expf(-g)) * u;
            }
    free(gu);
    return rc;
}

#include "cpu_model.h"
