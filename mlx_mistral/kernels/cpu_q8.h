/* 4-bit GEMV with 8-bit activations and integer dot products (AVX2), included by cpu_qmm.c.
 *
 * llama.cpp's ground: x is quantized once per call to int8 in blocks of 32 (one fp32 step d per
 * block, round to nearest), then 64 weights cost one 32-byte load, a shift, two masks, two
 * maddubs (unsigned nibble x signed int8, summed in pairs to int16), one madd (to int32), one
 * conversion and one FMA, where the float path spends 5 ALU ops per 8 weights.
 *
 * Layout. MLX packs element 2j of a 64-element chunk in the low nibble of byte j and 2j + 1 in
 * the high one. So `w & 0xF` holds the chunk's even elements and `(w >> 4) & 0xF` the odd ones,
 * in byte order; x is stored per chunk as its 32 even then its 32 odd elements (`xq`) so both
 * line up byte for byte. After madd, int32 lane i sums elements 8i .. 8i + 7: lanes 0-3 are
 * the chunk's first 32-block, lanes 4-7 its second, and `xd` holds their steps as 8 floats.
 *
 * y[n] = sum_chunks (isum . xd) * s_g + sum_g b_g * xsum_g = dequant(W)[n] . x~, with x~ the
 * rounded x: the only error is x's rounding, |x~ - x| <= d/2 per element.
 *
 * VNNI (AVX512-VNNI with VL: Ice Lake and later Xeons, Zen 4): vpdpbusd does maddubs + madd +
 * add in one instruction, with the same int32 lanes (its products are summed in int32, where
 * maddubs sums pairs in int16 first; they never saturate here, 2 x 15 x 127 < 32767), so the
 * results are bit-identical. Each kernel is instantiated with and without it.
 */
#ifdef MM_X86

#define Q8_KT 32  /* chunks of 64 per K tile with several inputs: 8 inputs x 3 KB stay in L1 */

/* one input row: xq (K) int8 in chunk order, xd (K/64, 8) steps, xsum (K/gs) group sums of the
 * rounded x: the biases then meet the same x as the scales, so the dot product is exactly that of
 * dequant(W) with the rounded x, whose error is centered (the nibbles alone are not) */
static void q8_quantize_row(const float* x, int64_t K, int gs, int8_t* xq, float* xd, float* xsum) {
    for (int64_t g = 0; g < K / gs; g++) xsum[g] = 0.f;
    for (int64_t c = 0; c < K / 64; c++) {
        const float* xc = x + 64 * c;
        for (int h = 0; h < 2; h++) {  /* the chunk's two blocks of 32 */
            float amax = 0.f;
            for (int k = 32 * h; k < 32 * h + 32; k++) amax = fabsf(xc[k]) > amax ? fabsf(xc[k]) : amax;
            float d = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
            int isum = 0;
            for (int i = 0; i < 4; i++) xd[8 * c + 4 * h + i] = d;
            for (int k = 32 * h; k < 32 * h + 32; k++) {  /* element k sits at even/odd slot k/2 */
                int q = _mm_cvt_ss2si(_mm_set_ss(xc[k] * inv));  /* nearest; lrintf is a libm call */
                xq[64 * c + (k & 1) * 32 + k / 2] = (int8_t)q;
                isum += q;
            }
            xsum[(64 * c + 32 * h) / gs] += d * (float)isum;
        }
    }
}

/* n floats from stored scales or biases (f32, f16, bf16): the 16-bit ones widened 8 at a time */
__attribute__((target("avx2,fma,f16c"))) static void q8_load_f32(float* dst, const void* src, int64_t off,
                                                                    int64_t n, int dt) {
    int64_t i = 0;
    if (dt == DT_BF16) {
        const uint16_t* p = (const uint16_t*)src + off;
        for (; i + 8 <= n; i += 8)
            _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(
                                          _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(p + i))), 16)));
    } else if (dt == DT_F16) {
        const uint16_t* p = (const uint16_t*)src + off;
        for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(p + i))));
    }
    load_f32(dst + i, src, off + i, n - i, dt);
}

/* the weight scale of chunk c as 8 lanes: one group (c >> sh: group size 64 << sh), or (group
 * size 32) two groups of 4 lanes. A shift, not c * 64 / gs: an idiv per chunk cost more than the math */
AVX2 static inline __m256 q8_chunk_scale(const float* s, int64_t c, int gs, int sh) {
    if (gs == 32) return _mm256_setr_m128(_mm_set1_ps(s[2 * c]), _mm_set1_ps(s[2 * c + 1]));
    return _mm256_set1_ps(s[c >> sh]);
}

/* acc + per int32 lane the dot product of 4 unsigned bytes of a with 4 signed bytes of b
 * (vpdpbusd). Inline asm, not the intrinsic: the intrinsic needs the VNNI target on every
 * function it is inlined into, and the kernels share one target attribute for both
 * instantiations; only the VNNI one, picked where the CPU has it, runs this. */
AVX2 static inline __m256i dpbusd256(__m256i acc, __m256i a, __m256i b) {
    __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
    return acc;
}

/* int32 lanes of one 64-weight chunk (lo/hi nibbles) against one input's 64 int8 values */
AVX2 static inline __attribute__((always_inline)) __m256 q8_dot(__m256i lo, __m256i hi, const int8_t* xq,
                                                                 __m256i ones, const int VNNI) {
    __m256i x0 = _mm256_loadu_si256((const __m256i*)xq), x1 = _mm256_loadu_si256((const __m256i*)(xq + 32));
    if (VNNI) return _mm256_cvtepi32_ps(dpbusd256(dpbusd256(_mm256_setzero_si256(), lo, x0), hi, x1));
    __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, x0), _mm256_maddubs_epi16(hi, x1));
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones));
}

/* sum_g b[g] * xs[g], the bias part of one row and input, 8 lanes at a time: as a scalar loop
 * it was a chain of G dependent adds, at K 5120 as long as the row's integer dot products */
AVX2 static inline float q8_bias_dot(const float* b, const float* xs, int64_t G) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int64_t g = 0;
    for (; g + 16 <= G; g += 16) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(b + g), _mm256_loadu_ps(xs + g), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(b + g + 8), _mm256_loadu_ps(xs + g + 8), a1);
    }
    if (g + 8 <= G) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(b + g), _mm256_loadu_ps(xs + g), a0), g += 8;
    float t = hsum8(_mm256_add_ps(a0, a1));
    for (; g < G; g++) t += b[g] * xs[g];
    return t;
}

/* NR rows (r[0..NR-1]) x MR inputs over chunks c0 .. c1; acc[j * MR + m] accumulates row j, input m */
AVX2 static inline __attribute__((always_inline)) void q8_tile(
    const uint32_t* const* r, const float* const* s, const int8_t* xq, const float* xd, int64_t K, int gs,
    int64_t c0, int64_t c1, int64_t pf, __m256* acc, const int NR, const int MR, const int VNNI) {
    const __m256i m4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    const int sh = gs == 128 ? 1 : 0;
    for (int64_t c = c0; c < c1; c++) {
        for (int j = 0; j < NR; j++) {
            _mm_prefetch((const char*)(r[j] + 8 * c + pf), _MM_HINT_T0);
            __m256i W = _mm256_loadu_si256((const __m256i*)(r[j] + 8 * c));
            __m256i lo = _mm256_and_si256(W, m4), hi = _mm256_and_si256(_mm256_srli_epi16(W, 4), m4);
            __m256 sv = q8_chunk_scale(s[j], c, gs, sh);
            for (int m = 0; m < MR; m++) {
                __m256 t = _mm256_mul_ps(q8_dot(lo, hi, xq + m * K + 64 * c, ones, VNNI), sv);
                acc[j * MR + m] = _mm256_fmadd_ps(t, _mm256_loadu_ps(xd + m * (K / 8) + 8 * c), acc[j * MR + m]);
            }
        }
    }
}

/* rows n0 .. n1 (at most CHUNK_ROWS) x MR inputs: y[m * ldy + n]. One input: rows in pairs, each
 * streaming its whole row; several: one row at a time through K tiles of Q8_KT chunks. */
AVX2 static inline __attribute__((always_inline)) void q8_rows(
    const int8_t* xq, const float* xd, const float* xsum, int64_t K, const uint32_t* w, const void* sc,
    const void* bi, int dt, int gs, int64_t n0, int64_t n1, float* y, int64_t ldy, float* sb, const int MR,
    const int VNNI) {
    const int NR = MR == 1 ? 2 : 1;
    int64_t G = K / gs, wpr = K / 8, C = K / 64;
    const int64_t KT = MR == 1 ? C : Q8_KT, pf = MR == 1 ? PF_WORDS : 8 * Q8_KT;
    __m256 tot[CHUNK_ROWS * 8];
    /* (rows, G) scales of the chunk's rows: fp32 ones in place, 16-bit ones widened once (a
     * copy of fp32 ones was a memcpy call per row, ~10% of the GEMV's time at K 576) */
    const float* s_all = dt == DT_F32 ? (const float*)sc + n0 * G : sb;
    if (dt != DT_F32)
        for (int64_t n = n0; n < n1; n++) q8_load_f32(sb + (n - n0) * G, sc, n * G, G, dt);
    for (int64_t i = 0; i < (n1 - n0) * MR; i++) tot[i] = _mm256_setzero_ps();
    for (int64_t kt = 0; kt < C; kt += KT) {
        int64_t kend = kt + KT < C ? kt + KT : C;
        for (int64_t n = n0; n < n1; n += NR) {
            const uint32_t* r[2];
            const float* s[2];
            for (int j = 0; j < NR; j++) {
                int64_t row = n + j < n1 ? n + j : n;  /* odd tail: row n twice, stored once */
                r[j] = w + row * wpr, s[j] = s_all + (row - n0) * G;
            }
            __m256 acc[8];
            for (int i = 0; i < NR * MR; i++) acc[i] = tot[(n - n0) * MR + i];
            q8_tile(r, s, xq, xd, K, gs, kt, kend, pf, acc, NR, MR, VNNI);
            for (int i = 0; i < NR * MR; i++)
                if (n + i / MR < n1) tot[(n - n0) * MR + i] = acc[i];
        }
    }
    for (int64_t n = n0; n < n1; n++) {
        const float* b = dt == DT_F32 ? (const float*)bi + n * G : sb + CHUNK_ROWS * G;
        if (dt != DT_F32) q8_load_f32(sb + CHUNK_ROWS * G, bi, n * G, G, dt);
        for (int m = 0; m < MR; m++) {
            y[m * ldy + n] = hsum8(tot[(n - n0) * MR + m]) + q8_bias_dot(b, xsum + m * G, G);
        }
    }
}

/* mr (1..8) inputs; xq, xd and xsum point at the first one's; vnni: with vpdpbusd */
AVX2 static void gemv4_q8(const int8_t* xq, const float* xd, const float* xsum, int mr, int64_t K,
                          const uint32_t* w, const void* sc, const void* bi, int dt, int gs, int64_t n0, int64_t n1,
                          float* y, int64_t ldy, float* sb, int vnni) {
#define Q8_ROWS(MR, V) q8_rows(xq, xd, xsum, K, w, sc, bi, dt, gs, n0, n1, y, ldy, sb, MR, V)
    MR_VNNI_SWITCH(mr, vnni, Q8_ROWS);
#undef Q8_ROWS
}
#endif
