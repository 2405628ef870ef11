/* The decoder stack on the CPU in one call (included by cpu_qmm.c, after cpu_pool.h).
 *
 * Per call, M rows go through every block; row m is one token of sequence seq[m] at position
 * pos[m] (a prefill chunk: one sequence at consecutive positions; a batched decode step: M
 * sequences of one token each, at their own lengths):
 *   x += o(attention(rope(q), rope(k) -> cache, v -> cache))   of rmsnorm(x)
 *   x += down(silu(gate) * up)                                   of rmsnorm(x)
 * then the final RMSNorm and, if asked, the output head. The matmuls are the kernels above and
 * read each weight once for all M rows; the K/V caches are mlx-lm's KVCache layout
 * (n_kv, capacity, head_dim) in fp32, one per (sequence, layer), written in place. Attention
 * runs one (head, row) pair per chunk on the pool, over the row's own sequence and length, and
 * through the process's BLAS (scores, then values) per head for prefill-sized blocks.
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
    /* A tensor-parallel rank's all_sum of the o and down projections' partial products (n
     * floats, summed in place across the ranks; 0 = done). NULL: the model is whole. Called on
     * the calling thread between pool jobs. */
    int (*reduce)(void* ctx, float* buf, int64_t n);
    void* reduce_ctx;
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

/* x += y (M*H) after summing a row-parallel projection's partial product y across the ranks;
 * the pool's workers sleep meanwhile (a spinning worker would take the core another rank on
 * this host needs to finish its half of the sum) */
static int add_reduced(const mm_model* md, float* x, float* y, int64_t n) {
    if (md->reduce) {
        atomic_store(&g_resting, 1);
        int rc = md->reduce(md->reduce_ctx, y, n);
        atomic_store(&g_resting, 0);
        if (rc != 0) return -2;
    }
    for (int64_t i = 0; i < n; i++) x[i] += y[i];
    return 0;
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

/* Rows m = 0 .. M-1 of a call: row m is sequence seq[m]'s token at position pos[m]. A prefill
 * chunk is one sequence with consecutive positions; a batched decode step is M sequences of one
 * row each. kc/vc/caps: per (sequence, layer) at s * n_layers + l. */
typedef struct attn_args {
    const float* q;  /* q rows (M, q_ld) */
    float* const* kc;  /* this layer's (n_kv, cap, hd) caches, one per sequence */
    float* const* vc;
    const int64_t *caps, *pos, *seq;
    int64_t q_ld, M, hd, n_heads, n_kv;
    float scale;
    float* out;  /* (M, n_heads * hd) */
    const unsigned char* done;  /* rows already attended (by attn_blas over their segment), or NULL */
} attn_args;

static void softmax_inplace(float* s, int64_t n) {
    float mx = s[0];
    for (int64_t j = 1; j < n; j++) mx = s[j] > mx ? s[j] : mx;
    float sum = 0.f;
    for (int64_t j = 0; j < n; j++) sum += (s[j] = expf(s[j] - mx));
    float inv = 1.0f / sum;
    for (int64_t j = 0; j < n; j++) s[j] *= inv;
}

#include "cpu_attn.h"

/* one (KV head, row) pair, with the query heads that share it: chunk i = g * M + m; the row sees
 * its own sequence's first pos + 1 keys */
static void attn_chunk(const void* p, int64_t i) {
    const attn_args* a = p;
    int64_t g = i / a->M, m = i % a->M, hd = a->hd, L = a->pos[m] + 1, s_ = a->seq[m];
    if (a->done && a->done[m]) return;
    int64_t rep = a->n_heads / a->n_kv, cap = a->caps[s_];
    float* s = malloc((size_t)(rep * L) * sizeof(float));
    attn_group(a->q + m * a->q_ld + g * rep * hd, a->kc[s_] + g * cap * hd, a->vc[s_] + g * cap * hd, L, hd, rep,
               a->scale, s, a->out + m * a->n_heads * hd + g * rep * hd);
    free(s);
}

/* prefill-sized blocks of ONE sequence at consecutive positions: per head, scores = q K^T and
 * out = P V through sgemm */
static void attn_blas(const attn_args* a) {
    int64_t hd = a->hd, rep = a->n_heads / a->n_kv, offset = a->pos[0], cap = a->caps[0];
    int64_t Lmax = offset + a->M;
    float* s = malloc((size_t)(ATTN_ROW_BLOCK * Lmax) * sizeof(float));
    for (int64_t h = 0; h < a->n_heads; h++) {
        const float *K = a->kc[0] + (h / rep) * cap * hd, *V = a->vc[0] + (h / rep) * cap * hd;
        for (int64_t m0 = 0; m0 < a->M; m0 += ATTN_ROW_BLOCK) {
            int64_t mb = a->M - m0 < ATTN_ROW_BLOCK ? a->M - m0 : ATTN_ROW_BLOCK;
            int64_t L = offset + m0 + mb;  /* keys the block's last query sees */
            g_sgemm(CBLAS_ROW_MAJOR, CBLAS_NO_TRANS, CBLAS_TRANS, (int)mb, (int)L, (int)hd, a->scale,
                    a->q + m0 * a->q_ld + h * hd, (int)a->q_ld, K, (int)hd, 0.0f, s, (int)L);
            for (int64_t r = 0; r < mb; r++) {
                int64_t valid = offset + m0 + r + 1;
                softmax_inplace(s + r * L, valid);
                memset(s + r * L + valid, 0, (size_t)(L - valid) * sizeof(float));
            }
            g_sgemm(CBLAS_ROW_MAJOR, CBLAS_NO_TRANS, CBLAS_NO_TRANS, (int)mb, (int)hd, (int)L, 1.0f, s, (int)L, V,
                    (int)hd, 0.0f, a->out + m0 * a->n_heads * hd + h * hd, (int)(a->n_heads * hd));
        }
    }
    free(s);
}

/* cos then sin of each row's own position: cs (M, hd). As MLX's rope: inv_freq = base^(-i/half) */
static void rope_table(const mm_model* md, const int64_t* pos, int64_t M, float* cs) {
    int64_t hd = md->head_dim, half = hd / 2;
    float step = (float)(-log((double)md->rope_base) / (double)half);
    for (int64_t m = 0; m < M; m++)
        for (int64_t i = 0; i < half; i++) {
            float th = (float)pos[m] * expf((float)i * step);
            cs[m * hd + i] = cosf(th);
            cs[m * hd + half + i] = sinf(th);
        }
}

typedef struct fwd_scratch {
    float *xn, *qkv, *att, *gu, *cs;
    float **kl, **vl;  /* this layer's cache of each sequence */
    int64_t* capl;
    unsigned char* done;  /* (M) rows attended by a per-segment BLAS pass */
} fwd_scratch;

typedef struct fwd_rows {
    int64_t M, n_seq;
    const int64_t *pos, *seq;  /* per row */
    float* const *kc, *const *vc;  /* per (sequence, layer): s * n_layers + l */
    const int64_t* caps;
    int64_t logit_from;  /* logits of rows logit_from .. M - 1 only */
} fwd_rows;

/* Runs of rows of one sequence at consecutive positions (a prefill chunk) that are long enough
 * go through attn_blas, one run at a time; done[m] marks their rows. Returns whether any row is
 * left for the per-row chunks (decode rows, short chunks). */
static int attend_segments(const attn_args* a, unsigned char* done) {
    int left = 0;
    for (int64_t m0 = 0, m1; m0 < a->M; m0 = m1) {
        for (m1 = m0 + 1; m1 < a->M && a->seq[m1] == a->seq[m0] && a->pos[m1] == a->pos[m1 - 1] + 1; m1++) {}
        int blas = m1 - m0 >= ATTN_BLAS_MIN_ROWS && g_sgemm;
        memset(done + m0, blas, (size_t)(m1 - m0));
        left |= !blas;
        if (!blas) continue;
        int64_t s = a->seq[m0];
        attn_args run = *a;
        run.q = a->q + m0 * a->q_ld, run.out = a->out + m0 * a->n_heads * a->hd;
        run.kc = a->kc + s, run.vc = a->vc + s, run.caps = a->caps + s, run.pos = a->pos + m0;
        run.M = m1 - m0;
        attn_blas(&run);
    }
    return left;
}

/* x += o(attention(...)) of rmsnorm(x) for layer l: q/k/v, RoPE, K/V into each row's own cache */
static int attention_block(const mm_model* md, int64_t l, float* x, const fwd_rows* r, fwd_scratch* t) {
    const mm_layer* L = &md->layers[l];
    int64_t M = r->M, H = md->H, hd = md->head_dim, half = hd / 2;
    int64_t nq = md->n_heads * hd, nkv = md->n_kv * hd, nqkv = nq + 2 * nkv;
    rms_norm_rows(x, L->attn_norm, M, H, md->eps, t->xn);
    const float *q, *k, *v;
    int64_t q_ld, k_ld, v_ld;
    int rc;
    if (L->n_qkv == 1) {
        rc = mat_mul(t->xn, M, &L->qkv[0], t->qkv);
        q = t->qkv, k = t->qkv + nq, v = t->qkv + nq + nkv, q_ld = k_ld = v_ld = nqkv;
    } else {
        float* ys[3] = {t->qkv, t->qkv + M * nq, t->qkv + M * (nq + nkv)};
        rc = mats_mul(t->xn, M, L->qkv, 3, ys);
        q = ys[0], k = ys[1], v = ys[2], q_ld = nq, k_ld = v_ld = nkv;
    }
    if (rc != 0) return rc;
    for (int64_t s = 0; s < r->n_seq; s++) {
        t->kl[s] = r->kc[s * md->n_layers + l], t->vl[s] = r->vc[s * md->n_layers + l];
        t->capl[s] = r->caps[s * md->n_layers + l];
    }
    int64_t bytes = 0;
    for (int64_t m = 0; m < M; m++) {
        int64_t s = r->seq[m], cap = t->capl[s], p = r->pos[m];
        rope_row((float*)q + m * q_ld, hd, md->n_heads, hd, t->cs + m * hd, t->cs + m * hd + half);
        rope_row((float*)k + m * k_ld, hd, md->n_kv, hd, t->cs + m * hd, t->cs + m * hd + half);
        for (int64_t g = 0; g < md->n_kv; g++) {
            memcpy(t->kl[s] + (g * cap + p) * hd, k + m * k_ld + g * hd, (size_t)hd * sizeof(float));
            memcpy(t->vl[s] + (g * cap + p) * hd, v + m * v_ld + g * hd, (size_t)hd * sizeof(float));
        }
        bytes += (p + 1) * nkv * 2 * (int64_t)sizeof(float);
    }
    attn_args aa = {q, t->kl, t->vl, t->capl, r->pos, r->seq, q_ld, M, hd, md->n_heads, md->n_kv, md->scale, t->att,
                    NULL};
    if (attend_segments(&aa, t->done)) {  /* rows no BLAS pass covered: one (KV head, row) chunk each */
        aa.done = t->done;
        run_job(attn_chunk, &aa, md->n_kv * M, bytes);
    }
    rc = mat_mul(t->att, M, &L->o, t->xn);
    return rc != 0 ? rc : add_reduced(md, x, t->xn, M * H);
}

/* x += down(silu(gate) * up) of rmsnorm(x) for layer l */
static int mlp_block(const mm_model* md, int64_t l, float* x, int64_t M, fwd_scratch* t) {
    const mm_layer* L = &md->layers[l];
    int64_t H = md->H, F = md->F;
    rms_norm_rows(x, L->mlp_norm, M, H, md->eps, t->xn);
    float *gu = t->gu, *gate = gu, *up = gu + F;
    int64_t ld = 2 * F;
    int rc;
    if (L->n_gu == 1) {
        rc = mat_mul(t->xn, M, &L->gu[0], gu);
    } else {
        float* ys[2] = {gu, gu + M * F};
        rc = mats_mul(t->xn, M, L->gu, 2, ys);
        up = gu + M * F, ld = F;
    }
    if (rc != 0) return rc;
    for (int64_t m = 0; m < M; m++)  /* silu(gate) * up into rows of F, in order: row m's output ends before its input */
        silu_mul(gate + m * ld, up + m * ld, gu + m * F, F);
    rc = mat_mul(gu, M, &L->down, t->xn);
    return rc != 0 ? rc : add_reduced(md, x, t->xn, M * H);
}

/* x (M, H): the rows' embeddings in, the final-normed hidden states out; every row's K/V written
 * at its own position. logits (M, head.N) if the model has a head here and logits is not NULL.
 * Returns 0, -1 for a format the kernels do not cover or a cache too small, -2 when the
 * model's reduce hook failed (its caller holds the reason). */
static int forward_rows(const mm_model* md, float* x, const fwd_rows* r, float* logits) {
    pick_kernels();
    if (md->n_heads % md->n_kv != 0 || md->head_dim % 2 != 0 || r->logit_from < 0) return -1;
    for (int64_t m = 0; m < r->M; m++)
        for (int64_t l = 0; l < md->n_layers; l++)
            if (r->seq[m] < 0 || r->seq[m] >= r->n_seq || r->pos[m] < 0 ||
                r->pos[m] + 1 > r->caps[r->seq[m] * md->n_layers + l])
                return -1;
    int64_t M = r->M, H = md->H, hd = md->head_dim, F = md->F;
    int64_t nq = md->n_heads * hd, nqkv = nq + 2 * md->n_kv * hd, inner = nq > H ? nq : H;
    fwd_scratch t = {malloc((size_t)(M * inner) * sizeof(float)), malloc((size_t)(M * nqkv) * sizeof(float)),
                     malloc((size_t)(M * nq) * sizeof(float)), malloc((size_t)(M * 2 * F) * sizeof(float)),
                     malloc((size_t)(M * hd) * sizeof(float)), malloc((size_t)r->n_seq * sizeof(float*)),
                     malloc((size_t)r->n_seq * sizeof(float*)), malloc((size_t)r->n_seq * sizeof(int64_t)),
                     malloc((size_t)M)};
    rope_table(md, r->pos, M, t.cs);
    int rc = 0;
    for (int64_t l = 0; l < md->n_layers && rc == 0; l++) {
        rc = attention_block(md, l, x, r, &t);
        if (rc == 0) rc = mlp_block(md, l, x, M, &t);
    }
    if (rc == 0) {
        rms_norm_rows(x, md->final_norm, M, H, md->eps, t.xn);
        memcpy(x, t.xn, (size_t)(M * H) * sizeof(float));
        if (logits && md->head.w && r->logit_from < M)
            rc = mat_mul(x + r->logit_from * H, M - r->logit_from, &md->head, logits);
    }
    free(t.xn), free(t.qkv), free(t.att), free(t.gu), free(t.cs), free(t.kl), free(t.vl), free(t.capl), free(t.done);
    return rc;
}

/* Any rows: row m is sequence seq[m]'s token at position pos[m] (0 <= seq[m] < n_seq), e.g.
 * the prefill chunks of several sequences and the decode rows of others in one call, so the
 * weights are read once for all of them. A sequence's rows at consecutive positions attend to
 * each other causally (every row's K/V is written before any row attends). logits: rows
 * logit_from .. M - 1 (n_out = M - logit_from rows), or NULL. kc/vc/caps: per (sequence, layer)
 * at s * n_layers + l. */
int mm_model_rows(const mm_model* md, float* x, int64_t M, const int64_t* pos, const int64_t* seq, int64_t n_seq,
                  float* const* kc, float* const* vc, const int64_t* caps, int64_t logit_from, float* logits) {
    fwd_rows r = {M, n_seq, pos, seq, kc, vc, caps, logit_from};
    return forward_rows(md, x, &r, logits);
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
