/* One LSTM step's elementwise work, forward and backward, each as a single pass over the
 * batch (wmlab.memory.scan), and a dream step's (wmlab.dream.BatchedDream): its cell, then
 * the next z drawn from the mixture and the dream's end drawn (or thresholded) from the
 * done head, with the formulas of the PyTorch path (select_and_sample, BatchedDream._died). In PyTorch each of these is ~15 small ops per step whose
 * overheads, not their arithmetic, cost more than the step's matmul.
 *
 * Layout: row-major (batch, 4 * hidden) gates in nn.LSTM's order (i, f, g, o) and
 * (batch, hidden) states; all math in float32. A "low" buffer is the next matmul's input,
 * bfloat16 (round to nearest even, as torch's .to(torch.bfloat16)) or float32.
 * Compiled on first use by wmlab.native; the Python scan is the reference and the fallback.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

/* Arguments clamped where the result is already 0, 1 or -1 in float32: -ffast-math assumes
 * finite values, and an expf that overflows to infinity then turns into NaN (a CarRacing
 * dream's cell state reached -60 after a hundred steps). */
static inline float sigmoid(float x) { return 1.0f / (1.0f + expf(-fmaxf(x, -80.0f))); }

/* tanh as 2 sigmoid(2x) - 1, the same formula as wmlab.memory.scan.tanh */
static inline float tanh_via_sigmoid(float x) {
    return 2.0f / (1.0f + expf(-2.0f * fminf(fmaxf(x, -40.0f), 40.0f))) - 1.0f;
}

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

/* x (n) as float32 into out: converting first keeps the main loops free of dtype tests,
 * which is what lets the compiler vectorise them */
static void to_float(const void *x, int bf16, int64_t n, float *restrict out) {
    if (bf16) {
        const uint16_t *v = (const uint16_t *)x;
        for (int64_t k = 0; k < n; k++) out[k] = from_bf16(v[k]);
    } else {
        memcpy(out, x, (size_t)n * sizeof(float));
    }
}

static void from_float(const float *restrict x, int64_t n, void *out, int bf16) {
    if (bf16) {
        uint16_t *v = (uint16_t *)out;
        for (int64_t k = 0; k < n; k++) v[k] = to_bf16(x[k]);
    } else {
        memcpy(out, x, (size_t)n * sizeof(float));
    }
}

/* The elementwise part of one row (one sequence), forward: its own function with restrict
 * arguments so that the compiler vectorises it (expf through the C library's vector
 * variants under -ffast-math). */
static void forward_row(int64_t hidden, const float *restrict z, const float *restrict cp,
                        float k, float kn, float *restrict a, float *restrict c_row,
                        float *restrict h_row, float *restrict masked) {
    for (int64_t j = 0; j < hidden; j++) {
        const float i = sigmoid(z[j]);
        const float f = sigmoid(z[hidden + j]);
        const float g = tanh_via_sigmoid(z[2 * hidden + j]);
        const float o = sigmoid(z[3 * hidden + j]);
        const float c = f * (cp[j] * k) + i * g;
        const float h = o * tanh_via_sigmoid(c);
        a[j] = i;
        a[hidden + j] = f;
        a[2 * hidden + j] = g;
        a[3 * hidden + j] = o;
        c_row[j] = c;
        h_row[j] = h;
        masked[j] = h * kn;
    }
}

static void backward_row(int64_t hidden, const float *restrict a, const float *restrict c_row,
                         const float *restrict cp, float k, const float *restrict dh,
                         float *restrict dc_row, float *restrict d) {
    for (int64_t j = 0; j < hidden; j++) {
        const float i = a[j], f = a[hidden + j], g = a[2 * hidden + j], o = a[3 * hidden + j];
        const float tc = tanh_via_sigmoid(c_row[j]);
        const float dcell = dc_row[j] + dh[j] * o * (1.0f - tc * tc);
        d[j] = dcell * g * i * (1.0f - i);
        d[hidden + j] = dcell * (cp[j] * k) * f * (1.0f - f);
        d[2 * hidden + j] = dcell * i * (1.0f - g * g);
        d[3 * hidden + j] = dh[j] * tc * o * (1.0f - o);
        dc_row[j] = dcell * f * k;
    }
}

/* Step t forward. gates = proj + rec; c = f * (c_prev * keep) + i * g; h = o * tanh(c).
 * keep (batch) zeroes the state entering this step (a restart); keep_next, if given,
 * multiplies h into h_low, the next step's matmul input (NULL: h_low = h). scratch holds
 * 5 * hidden floats. */
void lstm_forward_step(int64_t batch, int64_t hidden, const float *proj, const void *rec,
                       int rec_bf16, const float *c_prev, const float *keep,
                       const float *keep_next, float *acts, float *c_out, float *h_out,
                       void *h_low, int low_bf16, float *scratch) {
    const int64_t four = 4 * hidden;
    float *restrict z = scratch, *restrict masked = scratch + four;
    for (int64_t b = 0; b < batch; b++) {
        const int64_t row = b * four, state = b * hidden;
        const float *restrict p = proj + row;
        float *restrict a = acts + row;
        const float *restrict cp = c_prev + state;
        float *restrict c_row = c_out + state, *restrict h_row = h_out + state;
        const float k = keep[b];
        const float kn = keep_next ? keep_next[b] : 1.0f;
        to_float((const char *)rec + row * (rec_bf16 ? 2 : 4), rec_bf16, four, z);
        for (int64_t j = 0; j < four; j++) z[j] += p[j];
        forward_row(hidden, z, cp, k, kn, a, c_row, h_row, masked);
        from_float(masked, hidden, (char *)h_low + state * (low_bf16 ? 2 : 4), low_bf16);
    }
}

/* Step t backward. dh = dh_in * keep_in + d_out (the gradient reaching h_t from step t + 1's
 * matmul, masked by that step's restart, plus the output's own); dc (in/out) arrives as the
 * gradient of c_t from step t + 1 and leaves as that of c_{t-1}, masked by keep (this
 * step's restart). Writes the gradient of the gate pre-activations in float32 and, for the
 * next matmul, in the low dtype (NULL: not needed). keep_in and d_out may be NULL. scratch
 * holds hidden floats. */
void lstm_backward_step(int64_t batch, int64_t hidden, const void *dh_in, int dh_bf16,
                        const float *keep_in, const float *d_out, const float *acts,
                        const float *cell, const float *c_prev, const float *keep,
                        float *dc, float *d_gates, void *d_gates_low, int low_bf16,
                        float *scratch) {
    const int64_t four = 4 * hidden;
    float *restrict dh = scratch;
    for (int64_t b = 0; b < batch; b++) {
        const int64_t row = b * four, state = b * hidden;
        const float *restrict a = acts + row;
        float *restrict d = d_gates + row;
        const float *restrict c_row = cell + state, *restrict cp = c_prev + state;
        float *restrict dc_row = dc + state;
        const float kin = keep_in ? keep_in[b] : 1.0f;
        const float k = keep[b];
        to_float((const char *)dh_in + state * (dh_bf16 ? 2 : 4), dh_bf16, hidden, dh);
        if (d_out) {
            const float *restrict g_out = d_out + state;
            for (int64_t j = 0; j < hidden; j++) dh[j] = dh[j] * kin + g_out[j];
        } else {
            for (int64_t j = 0; j < hidden; j++) dh[j] *= kin;
        }
        backward_row(hidden, a, c_row, cp, k, dh, dc_row, d);
        if (d_gates_low)
            from_float(d, four, (char *)d_gates_low + row * (low_bf16 ? 2 : 4), low_bf16);
    }
}

/* A dream step's cell, for rows dreams at once: gates (rows, 4 * hidden) from the step's
 * one matmul ([x, h] @ [W_ih, W_hh]^T + b), in the low dtype or float32; c_prev, c_out,
 * h_out (rows, hidden) float32; h_low (rows, hidden) the head's input in the low dtype.
 * scratch holds 9 * hidden floats. */
void dream_lstm_step(int64_t rows, int64_t hidden, const void *gates, int gates_bf16,
                     const float *c_prev, float *c_out, float *h_out, void *h_low,
                     int low_bf16, float *scratch) {
    const int64_t four = 4 * hidden;
    float *z = scratch, *acts = scratch + four, *masked = scratch + 2 * four;
    for (int64_t r = 0; r < rows; r++) {
        to_float((const char *)gates + r * four * (gates_bf16 ? 2 : 4), gates_bf16, four, z);
        forward_row(hidden, z, c_prev + r * hidden, 1.0f, 1.0f, acts, c_out + r * hidden,
                    h_out + r * hidden, masked);
        from_float(masked, hidden, (char *)h_low + r * hidden * (low_bf16 ? 2 : 4),
                   low_bf16);
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
