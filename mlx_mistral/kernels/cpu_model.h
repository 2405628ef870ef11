/* The decoder stack on the CPU in one call (included by cpu_qmm.c, after cpu_pool.h).
 *
 * Per call, M tokens at positions offset .. offset + M - 1 go through every block:
 *   x += o(attention(rope(q), rope(k) -> cache, v -> cache))   of rmsnorm(x)
 *   x += down(silu(gate) * up)                                   of rmsnorm(x)
 * then the final RMSNorm and, if asked, the output head. The matmuls are the kernels above; the
 * K/V cache is mlx-lm's KVCache layout (n_kv, capacity, head_dim) in fp32, written in place.
 * Attention runs one (head, query) pair per chunk on the pool for a few queries, and through
 * the process's BLAS (scores, then values) per head for prefill-sized blocks.
 *
 * Why one call: MLX's CPU backend spends 7-40 us per op, and a block is ~15 ops, so a small
 * model's decode step is dominated by op overhead rather than by reading its weights.
 */

typedef struct mm_mat {
    const uint32_t* w;
    const void *sc, *bi;
    int64_t N, K;
    int dt, gs, bits;
} mm_mat;

typedef struct mm_layer {
    const float *attn_norm, *mlp_norm;  /* fp32 (H) */
    mm_mat qkv[3];  /* [q; k; v] as one matrix (n_qkv 1) or three */
    int n_qkv;
    mm_mat o;
    mm_mat gu[2];  /* [gate; up] as one matrix (n_gu 1) or two */
    int n_gu;
    mm_mat down;
} mm_layer;

typedef struct mm_model {
    int64_t H, n_heads, n_kv, head_dim, F, n_layers;
    float eps, rope_base, scale;
    const mm_layer* layers;
    const float* final_norm;  /* fp32 (H) */
    mm_mat head;  /* head.w NULL: no head here */
} mm_model;

#define ATTN_BLAS_MIN_ROWS 16 /* from this many queries, attention goes through sgemm per head */
#define ATTN_ROW_BLOCK 256     /* query rows per score block: bounds it to 256 x context floats */

static void rms_norm_rows(const float* x, const float* w, int64_t M, int64_t H, float eps, float* out) {
    for (int64_t m = 0; m < M; m++) {
        const float* r = x + m * H;
        float ss = 0.f;
        for (int64_t i = 0; i < H; i++) ss += r[i] * r[i];
        float inv = 1.0f / sqrtf(ss / (float)H + eps);
        for (int64_t i = 0; i < H; i++) out[m * H + i] = r[i] * inv * w[i];
    }
}

static int mat_mul(const float* x, int64_t M, const mm_mat* a, float* y) {
    return mm_qmm(x, M, a->K, a->w, a->sc, a->bi, a->dt, a->N, a->gs, a->bits, y);
}

/* several matrices of one input: one pool job when they share a format */
static int mats_mul(const float* x, int64_t M, const mm_mat* mats, int n, float* const* ys) {
    int same = 1;
    for (int i = 1; i < n; i++)
        same &= mats[i].dt == mats[0].dt && mats[i].gs == mats[0].gs && mats[i].bits == mats[0].bits;
    if (n > 1 && same) {
        const uint32_t* ws[3];
        const void *scs[3], *bis[3];
        int64_t Ns[3];
        for (int i = 0; i < n; i++) ws[i] = mats[i].w, scs[i] = mats[i].sc, bis[i] = mats[i].bi, Ns[i] = mats[i].N;
        return mm_qmm_multi(x, M, mats[0].K, n, ws, scs, bis, Ns, mats[0].dt, mats[0].gs, mats[0].bits, ys);
    }
    for (int i = 0; i < n; i++) {
        int rc = mat_mul(x, M, &mats[i], ys[i]);
        if (rc != 0) return rc;
    }
    return 0;
}

static float dot_any(const float* a, const float* b, int64_t n) {
    int64_t n32 = n & ~(int64_t)31;
    float s = n32 ? k_dot(a, b, n32) : 0.f;
    for (int64_t i = n32; i < n; i++) s += a[i] * b[i];
    return s;
}

/* HF-order ("non-traditional") RoPE of `heads` heads of one row, in place, at position pos */
static void rope_row(float* r, int64_t ld_head, int64_t heads, int64_t hd, const float* cs, const float* sn) {
    int64_t half = hd / 2;
    for (int64_t h = 0; h < heads; h++) {
        float* v = r + h * ld_head;
        for (int64_t i = 0; i < half; i++) {
            float a = v[i], b = v[i + half];
            v[i] = a * cs[i] - b * sn[i];
            v[i + half] = a * sn[i] + b * cs[i];
        }
    }
}

typedef struct attn_args {
    const float *q, *kc, *vc;  /* q rows (M, q_ld); caches (n_kv, cap, hd) */
    int64_t q_ld, M, offset, cap, hd, n_heads, n_kv;
    float scale;
    float* out;  /* (M, n_heads * hd) */
} attn_args;

static void softmax_inplace(float* s, int64_t n) {
    float mx = s[0];
    for (int64_t j = 1; j < n; j++) mx = s[j] > mx ? s[j] : mx;
    float sum = 0.f;
    for (int64_t j = 0; j < n; j++) sum += (s[j] = expf(s[j] - mx));
    float inv = 1.0f / sum;
    for (int64_t j = 0; j < n; j++) s[j] *= inv;
}

/* one (head, query) pair: chunk i = h * M + m */
static void attn_chunk(const void* p, int64_t i) {
    const attn_args* a = p;
    int64_t h = i / a->M, m = i % a->M, hd = a->hd, L = a->offset + m + 1;
    int64_t g = h / (a->n_heads / a->n_kv);
    const float* q = a->q + m * a->q_ld + h * hd;
    const float *K = a->kc + g * a->cap * hd, *V = a->vc + g * a->cap * hd;
    float* s = malloc((size_t)L * sizeof(float));
    for (int64_t j = 0; j < L; j++) s[j] = dot_any(q, K + j * hd, hd) * a->scale;
    softmax_inplace(s, L);
    float* o = a->out + m * a->n_heads * hd + h * hd;
    for (int64_t d = 0; d < hd; d++) o[d] = 0.f;
    for (int64_t j = 0; j < L; j++) {
        const float* v = V + j * hd;
        float pj = s[j];
        for (int64_t d = 0; d < hd; d++) o[d] += pj * v[d];
    }
    free(s);
}

/* prefill-sized blocks: per head, scores = q K^T and out = P V through sgemm */
static void attn_blas(const attn_args* a) {
    int64_t hd = a->hd, rep = a->n_heads / a->n_kv, Lmax = a->offset + a->M;
    float* s = malloc((size_t)(ATTN_ROW_BLOCK * Lmax) * sizeof(float));
    for (int64_t h = 0; h < a->n_heads; h++) {
        const float *K = a->kc + (h / rep) * a->cap * hd, *V = a->vc + (h / rep) * a->cap * hd;
        for (int64_t m0 = 0; m0 < a->M; m0 += ATTN_ROW_BLOCK) {
            int64_t mb = a->M - m0 < ATTN_ROW_BLOCK ? a->M - m0 : ATTN_ROW_BLOCK;
            int64_t L = a->offset + m0 + mb;  /* keys the block's last query sees */
            g_sgemm(CBLAS_ROW_MAJOR, CBLAS_NO_TRANS, CBLAS_TRANS, (int)mb, (int)L, (int)hd, a->scale,
                    a->q + m0 * a->q_ld + h * hd, (int)a->q_ld, K, (int)hd, 0.0f, s, (int)L);
            for (int64_t r = 0; r < mb; r++) {
                int64_t valid = a->offset + m0 + r + 1;
                softmax_inplace(s + r * L, valid);
                memset(s + r * L + valid, 0, (size_t)(L - valid) * sizeof(float));
            }
            g_sgemm(CBLAS_ROW_MAJOR, CBLAS_NO_TRANS, CBLAS_NO_TRANS, (int)mb, (int)hd, (int)L, 1.0f, s, (int)L, V,
                    (int)hd, 0.0f, a->out + m0 * a->n_heads * hd + h * hd, (int)(a->n_heads * hd));
        }
    }
    free(s);
}

/* x (M, H): the inputs' embeddings in, the final-normed hidden states out. kc/vc: per layer,
 * (n_kv, caps[l], hd) fp32 caches whose first `offset` positions hold the earlier tokens; this
 * call writes positions offset .. offset + M - 1. logits (M, head.N) if the model has a head
 * here and logits is not NULL. Returns 0, or -1 for a format the kernels do not cover. */
int mm_model_forward(const mm_model* md, float* x, int64_t M, int64_t offset, float* const* kc,
                     float* const* vc, const int64_t* caps, float* logits) {
    pick_kernels();
    if (md->n_heads % md->n_kv != 0 || md->head_dim % 2 != 0) return -1;
    for (int64_t l = 0; l < md->n_layers; l++)
        if (offset + M > caps[l]) return -1;
    int64_t H = md->H, hd = md->head_dim, half = hd / 2, F = md->F;
    int64_t nq = md->n_heads * hd, nkv = md->n_kv * hd, nqkv = nq + 2 * nkv;
    int64_t inner = nq > H ? nq : H;
    float* xn = malloc((size_t)(M * inner) * sizeof(float));
    float* qkv = malloc((size_t)(M * nqkv) * sizeof(float));
    float* att = malloc((size_t)(M * nq) * sizeof(float));
    float* gu = malloc((size_t)(M * 2 * F) * sizeof(float));
    float* cs = malloc((size_t)(M * hd) * sizeof(float));  /* cos, sin per row */
    int rc = 0;
    for (int64_t m = 0; m < M; m++) {  /* as MLX's rope: inv_freq = base^(-i/half), theta = pos * inv_freq */
        float step = (float)(-log((double)md->rope_base) / (double)half);
        for (int64_t i = 0; i < half; i++) {
            float th = (float)(offset + m) * expf((float)i * step);
            cs[m * hd + i] = cosf(th);
            cs[m * hd + half + i] = sinf(th);
        }
    }
    for (int64_t l = 0; l < md->n_layers && rc == 0; l++) {
        const mm_layer* L = &md->layers[l];
        /* attention */
        rms_norm_rows(x, L->attn_norm, M, H, md->eps, xn);
        const float *q, *k, *v;
        int64_t q_ld, k_ld, v_ld;
        if (L->n_qkv == 1) {
            rc = mat_mul(xn, M, &L->qkv[0], qkv);
            q = qkv, k = qkv + nq, v = qkv + nq + nkv, q_ld = k_ld = v_ld = nqkv;
        } else {
            float* ys[3] = {qkv, qkv + M * nq, qkv + M * (nq + nkv)};
            rc = mats_mul(xn, M, L->qkv, 3, ys);
            q = ys[0], k = ys[1], v = ys[2], q_ld = nq, k_ld = v_ld = nkv;
        }
        if (rc != 0) break;
        float *K = kc[l], *V = vc[l];
        int64_t cap = caps[l];
        for (int64_t m = 0; m < M; m++) {
            rope_row((float*)q + m * q_ld, hd, md->n_heads, hd, cs + m * hd, cs + m * hd + half);
            rope_row((float*)k + m * k_ld, hd, md->n_kv, hd, cs + m * hd, cs + m * hd + half);
            for (int64_t g = 0; g < md->n_kv; g++) {
                memcpy(K + (g * cap + offset + m) * hd, k + m * k_ld + g * hd, (size_t)hd * sizeof(float));
                memcpy(V + (g * cap + offset + m) * hd, v + m * v_ld + g * hd, (size_t)hd * sizeof(float));
            }
        }
        attn_args aa = {q, K, V, q_ld, M, offset, cap, hd, md->n_heads, md->n_kv, md->scale, att};
        if (M >= ATTN_BLAS_MIN_ROWS && g_sgemm)
            attn_blas(&aa);
        else
            run_job(attn_chunk, &aa, md->n_heads * M, (offset + M) * nkv * 2 * (int64_t)sizeof(float));
        rc = mat_mul(att, M, &L->o, xn);
        if (rc != 0) break;
        for (int64_t i = 0; i < M * H; i++) x[i] += xn[i];
        /* MLP */
        rms_norm_rows(x, L->mlp_norm, M, H, md->eps, xn);
        float* gate = gu;
        float* up = gu + F;
        int64_t ld = 2 * F;
        if (L->n_gu == 1) {
            rc = mat_mul(xn, M, &L->gu[0], gu);
        } else {
            float* ys[2] = {gu, gu + M * F};
            rc = mats_mul(xn, M, L->gu, 2, ys);
            up = gu + M * F, ld = F;
        }
        if (rc != 0) break;
        for (int64_t m = 0; m < M; m++)  /* silu(gate) * up, written over the gate half in place */
            for (int64_t f = 0; f < F; f++) {
                float g = gate[m * ld + f];
                gu[m * F + f] = g / (1.0f + expf(-g)) * up[m * ld + f];
            }
        rc = mat_mul(gu, M, &L->down, xn);
        if (rc != 0) break;
        for (int64_t i = 0; i < M * H; i++) x[i] += xn[i];
    }
    if (rc == 0) {
        rms_norm_rows(x, md->final_norm, M, H, md->eps, xn);
        memcpy(x, xn, (size_t)(M * H) * sizeof(float));
        if (logits && md->head.w) rc = mat_mul(x, M, &md->head, logits);
    }
    free(xn), free(qkv), free(att), free(gu), free(cs);
    return rc;
}

/* rows `ids` of a quantized embedding table, dequantized to fp32: out (M, K) */
int mm_embed(const mm_mat* e, const int32_t* ids, int64_t M, float* out) {
    pick_kernels();
    int64_t K = e->K, G = K / e->gs, wpr = K * e->bits / 32;
    float* sb = malloc((size_t)(2 * G) * sizeof(float));
    for (int64_t m = 0; m < M; m++) {
        if (ids[m] < 0 || ids[m] >= e->N) {
            free(sb);
            return -1;
        }
        load_f32(sb, e->sc, ids[m] * G, G, e->dt);
        load_f32(sb + G, e->bi, ids[m] * G, G, e->dt);
        k_deq(e->w + ids[m] * wpr, sb, sb + G, K, e->gs, e->bits, out + m * K);
    }
    free(sb);
    return 0;
}
