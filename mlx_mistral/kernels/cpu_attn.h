/* One decode row's attention for the query heads of one KV head, and the MLP's SiLU-multiply (included by
 * cpu_qmm.c, after its AVX2 kernels; cpu_model.h calls these).
 *
 * Portable C, and AVX2/FMA twins chosen where the GEMV kernels are (g_simd == 2). Why twins: the
 * library is built without -march, so the C loops compile to SSE2 with a libm expf per element.
 * A SmolLM2 decode step at 500 cached positions spent ~30% of one thread here (per position a
 * dot call, a scalar exp and 4-wide multiply-adds); the AVX2 versions keep the output row in
 * registers, take e^x eight lanes at a time and read the shared K and V rows once per group.
 */

/* out (hd) = softmax(scale * q . K^T) V over L cached positions (K, V: L rows of hd); s: L floats */
static void attn_row_c(const float* q, const float* K, const float* V, int64_t L, int64_t hd, float scale, float* s,
                       float* out) {
    for (int64_t j = 0; j < L; j++) s[j] = dot_any(q, K + j * hd, hd) * scale;
    softmax_inplace(s, L);
    for (int64_t d = 0; d < hd; d++) out[d] = 0.f;
    for (int64_t j = 0; j < L; j++) {
        const float* v = V + j * hd;
        float pj = s[j];
        for (int64_t d = 0; d < hd; d++) out[d] += pj * v[d];
    }
}

/* out[i] = silu(gate[i]) * up[i]; out may be gate itself */
static void silu_mul_c(const float* gate, const float* up, float* out, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        float g = gate[i];
        out[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

#ifdef MM_X86
/* e^x in 8 lanes: Cephes' expf (range reduction by ln 2 in two parts, degree-5 polynomial),
 * within 2 ulp of libm's expf over the clamped range; below -87.3 it returns ~1e-38, not 0 */
AVX2 static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3365448f)), _mm256_set1_ps(88.3762626f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

/* lanes [0, n) of 8 from p, zeros above (the tails of rows whose length is not a multiple of 8) */
AVX2 static inline __m256 load_tail(const float* p, int64_t n) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32((int)n), lane));
}

#define ATTN_VBLOCK 64  /* cached positions per pass of the group's heads over V: 64 x hd floats in L1 */

/* as attn_group_c (rep heads sharing K and V), for hd a multiple of 8. Each key and value row is
 * read from memory once for the whole group: per head, its 4:1 (Mistral) or 3:1 (SmolLM2) GQA
 * re-read of the cache cost bandwidth at long contexts. s: rep * L floats. HD: hd as a constant
 * (64, 128: the loops over it unroll, with no per-lane width tests), or 0 to read hd. */
AVX2 static inline __attribute__((always_inline)) void attn_group_hd(
    const float* q, const float* K, const float* V, int64_t L, int64_t hd_, int64_t rep, float scale, float* s,
    float* out, const int64_t HD) {
    const int64_t hd = HD ? HD : hd_;
    for (int64_t j = 0; j < L; j++) {
        const float* k = K + j * hd;
        for (int64_t h = 0; h < rep; h++) {
            const float* qh = q + h * hd;
            __m256 a0 = _mm256_mul_ps(_mm256_loadu_ps(qh), _mm256_loadu_ps(k)), a1 = _mm256_setzero_ps();
            for (int64_t d = 8; d < hd; d += 16) {
                a1 = _mm256_fmadd_ps(_mm256_loadu_ps(qh + d), _mm256_loadu_ps(k + d), a1);
                if (d + 8 < hd) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qh + d + 8), _mm256_loadu_ps(k + d + 8), a0);
            }
            s[h * L + j] = hsum8(_mm256_add_ps(a0, a1)) * scale;
        }
    }
    for (int64_t h = 0; h < rep; h++) {  /* the exponentials, normalized before the values */
        float* sh = s + h * L;
        float mx = -INFINITY;
        for (int64_t j = 0; j < L; j++) mx = sh[j] > mx ? sh[j] : mx;
        __m256 vmax = _mm256_set1_ps(mx), vsum = _mm256_setzero_ps();
        int64_t j = 0;
        for (; j + 8 <= L; j += 8) {
            __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(sh + j), vmax));
            _mm256_storeu_ps(sh + j, e);
            vsum = _mm256_add_ps(vsum, e);
        }
        float sum = hsum8(vsum);
        for (; j < L; j++) sum += (sh[j] = expf(sh[j] - mx));
        float inv = 1.0f / sum;
        for (j = 0; j < L; j++) sh[j] *= inv;
    }
    for (int64_t j0 = 0; j0 < L; j0 += ATTN_VBLOCK) {  /* a block of V rows, then each head over it */
        int64_t j1 = j0 + ATTN_VBLOCK < L ? j0 + ATTN_VBLOCK : L;
        for (int64_t h = 0; h < rep; h++) {
            for (int64_t d0 = 0; d0 < hd; d0 += 64) {  /* 64 output lanes in 8 registers */
                const int w = hd - d0 < 64 ? (int)(hd - d0) / 8 : 8;  /* registers in use */
                float* o_h = out + h * hd + d0;
                __m256 o[8];
                for (int i = 0; i < 8; i++) o[i] = j0 > 0 && i < w ? _mm256_loadu_ps(o_h + 8 * i) : _mm256_setzero_ps();
                if (w == 8) {
                    for (int64_t jj = j0; jj < j1; jj++) {
                        __m256 p = _mm256_broadcast_ss(s + h * L + jj);
                        const float* v = V + jj * hd + d0;
                        for (int i = 0; i < 8; i++) o[i] = _mm256_fmadd_ps(p, _mm256_loadu_ps(v + 8 * i), o[i]);
                    }
                } else {
                    for (int64_t jj = j0; jj < j1; jj++) {
                        __m256 p = _mm256_broadcast_ss(s + h * L + jj);
                        const float* v = V + jj * hd + d0;
                        for (int i = 0; i < w; i++) o[i] = _mm256_fmadd_ps(p, _mm256_loadu_ps(v + 8 * i), o[i]);
                    }
                }
                for (int i = 0; i < w; i++) _mm256_storeu_ps(o_h + 8 * i, o[i]);
            }
        }
    }
}

AVX2 static void attn_group_avx2(const float* q, const float* K, const float* V, int64_t L, int64_t hd, int64_t rep,
                                 float scale, float* s, float* out) {
    if (hd == 64)
        attn_group_hd(q, K, V, L, hd, rep, scale, s, out, 64);
    else if (hd == 128)
        attn_group_hd(q, K, V, L, hd, rep, scale, s, out, 128);
    else
        attn_group_hd(q, K, V, L, hd, rep, scale, s, out, 0);
}

AVX2 static void silu_mul_avx2(const float* gate, const float* up, float* out, int64_t n) {
    const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
    for (int64_t i = 0; i < n; i += 8) {
        int64_t w = n - i < 8 ? n - i : 8;
        __m256 g = w == 8 ? _mm256_loadu_ps(gate + i) : load_tail(gate + i, w);
        __m256 u = w == 8 ? _mm256_loadu_ps(up + i) : load_tail(up + i, w);
        __m256 r = _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, exp8(_mm256_sub_ps(zero, g)))), u);
        if (w == 8)
            _mm256_storeu_ps(out + i, r);
        else
            _mm256_maskstore_ps(out + i, _mm256_cmpgt_epi32(_mm256_set1_epi32((int)w),
                                                           _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)), r);
    }
}
#endif

/* rep query heads (q, out: rep rows of hd) over the K and V they share; s: rep * L floats */
static void attn_group(const float* q, const float* K, const float* V, int64_t L, int64_t hd, int64_t rep,
                       float scale, float* s, float* out) {
#ifdef MM_X86
    if (g_simd == 2 && hd % 8 == 0) {
        attn_group_avx2(q, K, V, L, hd, rep, scale, s, out);
        return;
    }
#endif
    for (int64_t h = 0; h < rep; h++) attn_row_c(q + h * hd, K, V, L, hd, scale, s, out + h * hd);
}

static void silu_mul(const float* gate, const float* up, float* out, int64_t n) {
#ifdef MM_X86
    if (g_simd == 2) {
        silu_mul_avx2(gate, up, out, n);
        return;
    }
#endif
    silu_mul_c(gate, up, out, n);
}
