/* M's mixture loss and its gradient in one pass (wmlab.memory.model.mixture_nll_fused).
 *
 * Each row is one step's head output: for every z dimension, K mixture logits, K means and
 * K log sigmas, contiguous (the head's layout), then anything else (the done head), which
 * this kernel leaves alone. In PyTorch the loss is ~25 ops over (rows, z, K) tensors with
 * K = 5, each a pass over memory, and log_softmax over a last dimension of 5 is slow; here
 * the loss and all three gradients come from one read of the row. Compiled by wmlab.native.
 */
#include <math.h>
#include <stdint.h>

static const float HALF_LOG_2PI = 0.91893853320467274f;

/* Returns sum over rows and dimensions of weight[row] * nll; writes d(scale * that sum)
 * into grad (same layout as params; only the mixture part of each row). weight may be
 * NULL (all ones). */
double mixture_nll_rows(int64_t rows, int64_t z_dim, int64_t k_count, int64_t row_stride,
                        const float *params, const float *target, const float *weight,
                        float scale, float *grad) {
    double total = 0.0;
    float u[64], a[64], inv_sigma[64], e_logit[64], e_a[64];
    if (k_count > 64) return -1.0;  /* the caller checks K first */
    for (int64_t r = 0; r < rows; r++) {
        const float w = weight ? weight[r] : 1.0f;
        const float *row = params + r * row_stride;
        float *g_row = grad + r * row_stride;
        const float *y_row = target + r * z_dim;
        for (int64_t d = 0; d < z_dim; d++) {
            const float *logit = row + d * 3 * k_count;
            const float *mean = logit + k_count, *log_sigma = mean + k_count;
            float *g_logit = g_row + d * 3 * k_count;
            float *g_mean = g_logit + k_count, *g_sigma = g_mean + k_count;
            if (w == 0.0f) {  /* masked step: no loss, no gradient */
                for (int64_t k = 0; k < 3 * k_count; k++) g_logit[k] = 0.0f;
                continue;
            }
            const float y = y_row[d];
            float l_max = logit[0];
            for (int64_t k = 1; k < k_count; k++) l_max = fmaxf(l_max, logit[k]);
            float l_sum = 0.0f;
            for (int64_t k = 0; k < k_count; k++) {
                e_logit[k] = expf(logit[k] - l_max);
                l_sum += e_logit[k];
            }
            const float l_lse = l_max + logf(l_sum);
            for (int64_t k = 0; k < k_count; k++) {
                inv_sigma[k] = expf(-log_sigma[k]);
                u[k] = (y - mean[k]) * inv_sigma[k];
                a[k] = (logit[k] - l_lse) - 0.5f * u[k] * u[k] - log_sigma[k] - HALF_LOG_2PI;
            }
            float a_max = a[0];
            for (int64_t k = 1; k < k_count; k++) a_max = fmaxf(a_max, a[k]);
            float a_sum = 0.0f;
            for (int64_t k = 0; k < k_count; k++) {
                e_a[k] = expf(a[k] - a_max);
                a_sum += e_a[k];
            }
            const float a_lse = a_max + logf(a_sum);
            total += (double)w * (double)(-a_lse);
            const float s = w * scale, inv_l_sum = 1.0f / l_sum, inv_a_sum = 1.0f / a_sum;
            for (int64_t k = 0; k < k_count; k++) {
                const float posterior = e_a[k] * inv_a_sum;  /* of component k given y */
                const float prior = e_logit[k] * inv_l_sum;
                g_logit[k] = s * (prior - posterior);
                g_mean[k] = -s * posterior * u[k] * inv_sigma[k];
                g_sigma[k] = s * posterior * (1.0f - u[k] * u[k]);
            }
        }
    }
    return total;
}
