/* The elementwise work of one dream step for a batch of dreams (wmlab.dream.BatchedDream):
 * the LSTM cell after its one matmul, then the next z drawn from the mixture and the end of
 * the dream drawn (or thresholded) from the done head. In PyTorch these are ~30 small ops
 * per step, a third of a dream step next to its two matmuls. Same formulas as the PyTorch
 * path in wmlab.dream and wmlab.memory.model.select_and_sample, in float32.
 * Compiled by wmlab.native.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

static inline float tanh_via_sigmoid(float x) { return 2.0f / (1.0f + expf(-2.0f * x)) - 1.0f; }

static inline uint16_t to_bf16(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float from_bf16(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float x;
    memcpy(&x, &u, sizeof x);
    return x;
}

static void to_float(const void *x, int bf16, int64_t n, float *restrict out) {
    if (bf16) {
        const uint16_t *v = (const uint16_t *)x;
        for (int64_t k = 0; k < n; k++) out[k] = from_bf16(v[k]);
    } else {
        memcpy(out, x, (size_t)n * sizeof(float));
    }
}

static void cell_row(int64_t hidden, const float *restrict z, const float *restrict c_prev,
                     float *restrict c_out, float *restrict h_out) {
    for (int64_t j = 0; j < hidden; j++) {
        const float i = sigmoid(z[j]);
        const float f = sigmoid(z[hidden + j]);
        const float g = tanh_via_sigmoid(z[2 * hidden + j]);
        const float o = sigmoid(z[3 * hidden + j]);
        const float c = f * c_prev[j] + i * g;
        c_out[j] = c;
        h_out[j] = o * tanh_via_sigmoid(c);
    }
}

/* gates (rows, 4 * hidden) in nn.LSTM's order, bias included; c_prev, c_out, h_out
 * (rows, hidden) float32; h_low (rows, hidden) the head's input in the low dtype (NULL:
 * not needed). scratch holds 4 * hidden floats. */
void dream_lstm_step(int64_t rows, int64_t hidden, const void *gates, int gates_bf16,
                     const float *c_prev, float *c_out, float *h_out, void *h_low,
                     int low_bf16, float *scratch) {
    const int64_t four = 4 * hidden;
    for (int64_t r = 0; r < rows; r++) {
        to_float((const char *)gates + r * four * (gates_bf16 ? 2 : 4), gates_bf16, four,
                 scratch);
        cell_row(hidden, scratch, c_prev + r * hidden, c_out + r * hidden,
                 h_out + r * hidden);
        if (h_low) {
            const float *h = h_out + r * hidden;
            if (low_bf16) {
                uint16_t *v = (uint16_t *)h_low + r * hidden;
                for (int64_t j = 0; j < hidden; j++) v[j] = to_bf16(h[j]);
            } else {
                memcpy((float *)h_low + r * hidden, h, (size_t)hidden * sizeof(float));
            }
        }
    }
}

/* For each of rows dreams, from its head output (row_stride values, bf16 or float32; per z
 * dimension K logits, K means, K log sigmas): z' per dimension by the inverse-CDF draw of a
 * component from softmax(logits / tau) with uniform, then mean + sigma * sqrt(tau) *
 * normal; the noise rows are flat[r] of the (rows_total, z_dim) noise arrays. If
 * done_column >= 0, died[r] = 1 when the dream ends: mode 0, logit + bias > 0; mode 1,
 * done_uniform[flat[r]] < sigmoid(logit - shift + bias). scratch holds row_stride floats. */
void dream_sample(int64_t rows, int64_t z_dim, int64_t k_count, int64_t row_stride,
                  const void *head, int head_bf16, float tau, const float *uniform,
                  const float *normal, const int64_t *flat, float *z_out,
                  int64_t done_column, int done_mode, float done_shift, float done_bias,
                  const float *done_uniform, uint8_t *died, float *scratch) {
    /* as PyTorch computes them: logits / tau, sqrt(tau) rounded from double, cumulative
     * sums accumulated in double */
    const float noise_scale = (float)sqrt((double)tau);
    for (int64_t r = 0; r < rows; r++) {
        float *p = scratch;
        to_float((const char *)head + r * row_stride * (head_bf16 ? 2 : 4), head_bf16,
                 row_stride, p);
        const float *u_row = uniform + flat[r] * z_dim, *n_row = normal + flat[r] * z_dim;
        float *z_row = z_out + r * z_dim;
        for (int64_t d = 0; d < z_dim; d++) {
            const float *logit = p + d * 3 * k_count;
            const float *mean = logit + k_count, *log_sigma = mean + k_count;
            float top = logit[0] / tau;
            for (int64_t k = 1; k < k_count; k++) top = fmaxf(top, logit[k] / tau);
            float cdf[64];
            double running = 0.0;
            for (int64_t k = 0; k < k_count; k++) {
                running += (double)expf(logit[k] / tau - top);
                cdf[k] = (float)running;
            }
            const float threshold = u_row[d] * cdf[k_count - 1];
            int64_t component = 0;
            for (int64_t k = 0; k < k_count; k++) component += threshold >= cdf[k];
            if (component > k_count - 1) component = k_count - 1;  /* u * total rounded up */
            z_row[d] = mean[component] + expf(log_sigma[component]) * noise_scale * n_row[d];
        }
        if (done_column >= 0) {
            const float logit = p[done_column];
            if (done_mode == 0)
                died[r] = logit + done_bias > 0.0f;
            else
                died[r] = done_uniform[flat[r]] < sigmoid(logit - done_shift + done_bias);
        }
    }
}
