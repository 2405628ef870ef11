/* 4-bit GEMV with 8-bit activations on 512-bit registers (AVX-512 F+BW, no VNNI), included by
 * cpu_qmm.c after the AVX-512 float GEMV (it reuses bias_term).
 *
 * The AVX2 int8 kernel (cpu_q8.h) widened: one 64-byte load holds chunks c and c + 1 (64 weights
 * each, K a multiple of 128) of one row, so `W & 0xF` is [c.even | c+1.even] and `(W >> 4) & 0xF`
 * [c.odd | c+1.odd]. x is quantized exactly as there (int8 per block of 32) and then laid out per
 * pair of chunks as [c.even | c+1.even | c.odd | c+1.odd] (`q8w_pair_layout`), so each nibble
 * half meets one 64-byte load of x. Two vpmaddubsw, one add, one vpmaddwd with ones, one
 * conversion, one multiply by the scales and one FMA per (row, input) cover 128 weights, where
 * the AVX2 kernel spends the same 7 ops on 64. After vpmaddwd, int32 lane i sums elements
 * 8i .. 8i + 7 of chunk c (lanes 0-7) or of chunk c + 1 (lanes 8-15): the 16 block steps of the
 * pair are xd[16p .. 16p + 15], contiguous in the AVX2 layout, and the weight scales of the pair
 * come from one 4-float load and a permute (4 groups of 32, 2 of 64, or 1 of 128).
 *
 * The result is the AVX2 int8 kernel's: dequant(W) . x~ with x~ the rounded x, to fp32 accuracy.
 * With VNNI, vpdpbusd replaces the two vpmaddubsw, the add and the vpmaddwd (as in cpu_q8.h).
 */
#ifdef MM_X86

#define AVX512BW __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")))
#define Q8W_KT 16  /* pairs of chunks per K tile with several inputs: 8 inputs x 2 KB stay in L1 */

/* dpbusd256 on 512-bit registers */
AVX512BW static inline __m512i dpbusd512(__m512i acc, __m512i a, __m512i b) {
    __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
    return acc;
}

/* one row's xq from chunk order [c.even | c.odd | c+1.even | c+1.odd] to pair order */
static void q8w_pair_layout(int8_t* xq, int64_t K) {
    for (int64_t p = 0; p < K / 128; p++) {
        int8_t t[32], *b = xq + 128 * p;
        memcpy(t, b + 32, 32);
        memcpy(b + 32, b + 64, 32);
        memcpy(b + 64, t, 32);
    }
}

/* NR rows x MR inputs over pairs p0 .. p1; s[j] holds row j's widened scales (4 readable past
 * each pair's first group); lg = log2(gs / 32); idx spreads 4, 2 or 1 scales over the 16 lanes */
AVX512BW static inline __attribute__((always_inline)) void q8w_tile(
    const uint8_t* const* r, const float* const* s, const int8_t* xq, const float* xd, int64_t K, int lg,
    __m512i idx, int64_t p0, int64_t p1, int64_t pf, __m512* acc, const int NR, const int MR, const int VNNI) {
    const __m512i m4 = _mm512_set1_epi8(0x0F), ones = _mm512_set1_epi16(1);
    for (int64_t p = p0; p < p1; p++) {
        for (int j = 0; j < NR; j++) {
            _mm_prefetch((const char*)(r[j] + 64 * p + pf), _MM_HINT_T0);
            __m512i W = _mm512_loadu_si512((const void*)(r[j] + 64 * p));
            __m512i lo = _mm512_and_si512(W, m4), hi = _mm512_and_si512(_mm512_srli_epi16(W, 4), m4);
            __m512 sv = _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(_mm_loadu_ps(s[j] + ((4 * p) >> lg))));
            for (int m = 0; m < MR; m++) {
                const int8_t* xm = xq + m * K + 128 * p;
                __m512i x0 = _mm512_loadu_si512((const void*)xm), x1 = _mm512_loadu_si512((const void*)(xm + 64));
                __m512i d = VNNI ? dpbusd512(dpbusd512(_mm512_setzero_si512(), lo, x0), hi, x1)
                                 : _mm512_madd_epi16(_mm512_add_epi16(_mm512_maddubs_epi16(lo, x0),
                                                                      _mm512_maddubs_epi16(hi, x1)), ones);
                __m512 t = _mm512_mul_ps(_mm512_cvtepi32_ps(d), sv);
                acc[j * MR + m] = _mm512_fmadd_ps(t, _mm512_loadu_ps(xd + m * (K / 8) + 16 * p), acc[j * MR + m]);
            }
        }
    }
}

/* rows n0 .. n1 (at most CHUNK_ROWS) x MR inputs: y[m * ldy + n]; sb holds CHUNK_ROWS * G + 4
 * floats. One input: rows in pairs, each streaming its whole row; several: one row at a time
 * through K tiles of Q8W_KT pairs, so the tile of x stays in L1. */
AVX512BW static inline __attribute__((always_inline)) void q8w_rows(
    const int8_t* xq, const float* xd, const float* xsum, int64_t K, const uint32_t* w, const void* sc,
    const void* bi, int dt, int gs, int64_t n0, int64_t n1, float* y, int64_t ldy, float* sb, const int MR,
    const int VNNI) {
    const int NR = MR == 1 ? 2 : 1;
    const int lg = gs == 32 ? 0 : (gs == 64 ? 1 : 2);
    const __m512i idx = _mm512_srlv_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                          _mm512_set1_epi32(2 + lg));
    int64_t G = K / gs, P = K / 128;
    const int64_t KT = MR == 1 ? P : Q8W_KT, pf = MR == 1 ? 4 * PF_WORDS : 64 * Q8W_KT;
    __m512 tot[CHUNK_ROWS * 8];
    for (int64_t n = n0; n < n1; n++) q8_load_f32(sb + (n - n0) * G, sc, n * G, G, dt);
    for (int i = 0; i < 4; i++) sb[(n1 - n0) * G + i] = 0.f;  /* the last pair's overread */
    for (int64_t i = 0; i < (n1 - n0) * MR; i++) tot[i] = _mm512_setzero_ps();
    for (int64_t kt = 0; kt < P; kt += KT) {
        int64_t kend = kt + KT < P ? kt + KT : P;
        for (int64_t n = n0; n < n1; n += NR) {
            const uint8_t* r[2];
            const float* s[2];
            for (int j = 0; j < NR; j++) {
                int64_t row = n + j < n1 ? n + j : n;  /* odd tail: row n twice, stored once */
                r[j] = (const uint8_t*)w + row * (K / 2), s[j] = sb + (row - n0) * G;
            }
            __m512 acc[8];
            for (int i = 0; i < NR * MR; i++) acc[i] = tot[(n - n0) * MR + i];
            q8w_tile(r, s, xq, xd, K, lg, idx, kt, kend, pf, acc, NR, MR, VNNI);
            for (int i = 0; i < NR * MR; i++)
                if (n + i / MR < n1) tot[(n - n0) * MR + i] = acc[i];
        }
    }
    for (int64_t n = n0; n < n1; n++)
        for (int m = 0; m < MR; m++)
            y[m * ldy + n] = _mm512_reduce_add_ps(tot[(n - n0) * MR + m]) + bias_term(bi, dt, n * G, xsum + m * G, G);
}

/* mr (1..8) inputs in pair order; xq, xd and xsum point at the first one's; vnni: with vpdpbusd */
AVX512BW static void gemv4_q8w(const int8_t* xq, const float* xd, const float* xsum, int mr, int64_t K,
                               const uint32_t* w, const void* sc, const void* bi, int dt, int gs, int64_t n0,
                               int64_t n1, float* y, int64_t ldy, float* sb, int vnni) {
#define Q8W_ROWS(MR, V) q8w_rows(xq, xd, xsum, K, w, sc, bi, dt, gs, n0, n1, y, ldy, sb, MR, V)
    MR_VNNI_SWITCH(mr, vnni, Q8W_ROWS);
#undef Q8W_ROWS
}
#endif
