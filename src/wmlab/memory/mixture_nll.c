/* M's mixture loss and its gradient in one pass (wmlab.memory.model.mixture_nll).
 *
 * Each row is one step's head output: for every z dimension, K mixture logits, K means and
 * K log sigmas, contiguous (the head's layout), then anything else (the done head), which
 * this kernel leaves alone. In PyTorch the loss is ~25 ops over (rows, z, K) tensors with
 * K = 5, each a pass over memory, and log_softmax over a last dimension of 5 is slow; here
 * the loss and all three gradients come from one read of the row. Each row is first
 * transposed to component-major order (k, d) so that every loop below runs over the z
 * dimensions, which the compiler vectorises. Compiled by wmlab.native.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define MAX_Z 1024
#define MAX_K 16

static const float HALF_LOG_2PI = 0.91893853320467274f;

/* The per-row working set, component-major ([k][d] at k * stride + d), packed tightly so
 * that it stays in L1: a stride of a power of two made the arrays alias in the cache. */
typedef struct {
    int64_t stride;
    float *logit, *mean, *log_sigma, *u, *inv_sigma, *e_logit, *a;
    float *l_max, *l_sum, *l_lse, *a_max, *a_sum, *a_lse;
} Work;

#define WORK_FLOATS (7 * MAX_K * (MAX_Z + 16) + 6 * (MAX_Z + 16))

static Work make_work(float *base, int64_t z_dim, int64_t k_count) {
    Work w;
    w.stride = ((z_dim + 15) / 16) * 16 + 16;  /* a multiple of 16 floats, not of 2^n */
    const int64_t block = k_count * w.stride;
    float *p = base;
    w.logit = p; p += block;
    w.mean = p; p += block;
    w.log_sigma = p; p += block;
    w.u = p; p += block;
    w.inv_sigma = p; p += block;
    w.e_logit = p; p += block;
    w.a = p; p += block;
    w.l_max = p; p += w.stride;
    w.l_sum = p; p += w.stride;
    w.l_lse = p; p += w.stride;
    w.a_max = p; p += w.stride;
    w.a_sum = p; p += w.stride;
    w.a_lse = p;
    return w;
}

#define AT(array, k, d) (array)[(k) * s + (d)]

/* Per z dimension d, over the k_count components of x ([k][d]): top = max, e = exp(x - top)
 * (e may be x itself), total = sum of e, lse = log-sum-exp. */
static void log_sum_exp(int64_t z_dim, int64_t k_count, int64_t s, const float *x, float *e,
                        float *restrict top, float *restrict total, float *restrict lse) {
    for (int64_t d = 0; d < z_dim; d++) top[d] = AT(x, 0, d);
    for (int64_t k = 1; k < k_count; k++)
        for (int64_t d = 0; d < z_dim; d++) top[d] = fmaxf(top[d], AT(x, k, d));
    for (int64_t d = 0; d < z_dim; d++) total[d] = 0.0f;
    for (int64_t k = 0; k < k_count; k++)
        for (int64_t d = 0; d < z_dim; d++) {
            AT(e, k, d) = expf(AT(x, k, d) - top[d]);
            total[d] += AT(e, k, d);
        }
    for (int64_t d = 0; d < z_dim; d++) lse[d] = top[d] + logf(total[d]);
}

static void row_loss(int64_t z_dim, int64_t k_count, const float *restrict y, const Work *w,
                     float *restrict nll) {
    const int64_t s = w->stride;
    float *restrict logit = w->logit, *restrict mean = w->mean, *restrict ls = w->log_sigma;
    float *restrict u_all = w->u, *restrict inv_all = w->inv_sigma, *restrict a = w->a;
    const float *restrict l_lse = w->l_lse;
    log_sum_exp(z_dim, k_count, s, logit, w->e_logit, w->l_max, w->l_sum, w->l_lse);
    for (int64_t k = 0; k < k_count; k++)
        for (int64_t d = 0; d < z_dim; d++) {
            const float inv = expf(-AT(ls, k, d));
            const float u = (y[d] - AT(mean, k, d)) * inv;
            AT(inv_all, k, d) = inv;
            AT(u_all, k, d) = u;
            AT(a, k, d) = (AT(logit, k, d) - l_lse[d]) - 0.5f * u * u - AT(ls, k, d) -
                          HALF_LOG_2PI;
        }
    /* a then holds exp(a - a_max), the posterior's numerators */
    log_sum_exp(z_dim, k_count, s, a, a, w->a_max, w->a_sum, w->a_lse);
    for (int64_t d = 0; d < z_dim; d++) nll[d] = -w->a_lse[d];
}

/* Returns sum over rows and dimensions of weight[row] * nll; writes d(scale * that sum)
 * into grad (same layout as params; only the mixture part of each row). weight may be
 * NULL (all ones). Returns -1 for sizes beyond MAX_Z or MAX_K (the caller checks first). */
double mixture_nll_rows(int64_t rows, int64_t z_dim, int64_t k_count, int64_t row_stride,
                        const float *params, const float *target, const float *weight,
                        float scale, float *grad) {
    if (z_dim > MAX_Z || k_count > MAX_K) return -1.0;
    static __thread float work_storage[WORK_FLOATS];  /* per thread: M's row groups */
    const Work w = make_work(work_storage, z_dim, k_count);
    const int64_t s = w.stride;
    float nll[MAX_Z];
    double total = 0.0;
    const int64_t width = 3 * k_count * z_dim;
    for (int64_t r = 0; r < rows; r++) {
        const float wr = weight ? weight[r] : 1.0f;
        const float *row = params + r * row_stride;
        float *g_row = grad + r * row_stride;
        if (wr == 0.0f) {  /* masked step: no loss, no gradient */
            memset(g_row, 0, (size_t)width * sizeof(float));
            continue;
        }
        for (int64_t d = 0; d < z_dim; d++) {
            const float *p = row + d * 3 * k_count;
            for (int64_t k = 0; k < k_count; k++) {
                AT(w.logit, k, d) = p[k];
                AT(w.mean, k, d) = p[k_count + k];
                AT(w.log_sigma, k, d) = p[2 * k_count + k];
            }
        }
        row_loss(z_dim, k_count, target + r * z_dim, &w, nll);
        double row_total = 0.0;
        for (int64_t d = 0; d < z_dim; d++) row_total += (double)nll[d];
        total += (double)wr * row_total;
        const float sc = wr * scale;
        for (int64_t d = 0; d < z_dim; d++) {
            w.l_sum[d] = 1.0f / w.l_sum[d];  /* now the reciprocals */
            w.a_sum[d] = 1.0f / w.a_sum[d];
        }
        /* gradients, component-major, into the transposed buffers (reused) */
        for (int64_t k = 0; k < k_count; k++)
            for (int64_t d = 0; d < z_dim; d++) {
                const float posterior = AT(w.a, k, d) * w.a_sum[d];  /* of k given y */
                const float prior = AT(w.e_logit, k, d) * w.l_sum[d];
                const float u = AT(w.u, k, d);
                AT(w.logit, k, d) = sc * (prior - posterior);
                AT(w.mean, k, d) = -sc * posterior * u * AT(w.inv_sigma, k, d);
                AT(w.log_sigma, k, d) = sc * posterior * (1.0f - u * u);
            }
        for (int64_t d = 0; d < z_dim; d++) {
            float *g = g_row + d * 3 * k_count;
            for (int64_t k = 0; k < k_count; k++) {
                g[k] = AT(w.logit, k, d);
                g[k_count + k] = AT(w.mean, k, d);
                g[2 * k_count + k] = AT(w.log_sigma, k, d);
            }
        }
    }
    return total;
}
