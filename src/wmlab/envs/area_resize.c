/* Area (box-average) downscaling of uint8 frames, as OpenCV's INTER_AREA computes it
 * (wmlab.envs.frames decides when the bytes are provably the same and calls this).
 *
 * Rows first: output row o is the weighted sum of input rows ys[o] .. ys[o] + yt - 1
 * (weights yw[o * yt ..], zero where a window is shorter), over the whole row of W * C
 * values at once (vectorised). Then columns: output value j of that row (OW * C of them) is
 * sum_t xw[j * xt + t] * row[xi[j] + t * C]. Every weight is an exact area fraction, so the
 * sums differ from the true box averages by float rounding only, and the caller only uses
 * this where no true average lies within that rounding of a half.
 */
#include <stdint.h>

/* One row's columns; the window lengths the screens have get their own loops, which the
 * compiler vectorises over j (a loop over t inside keeps it scalar, ~3x slower). */
static void columns(const float *restrict row, uint8_t *restrict line, int64_t values,
                    const int32_t *restrict xi, const float *restrict xw, int64_t xt,
                    int64_t c) {
  /* sums are in [0, 255 + rounding]: + 0.5 and truncation round them */
  if (xt == 2) {
    for (int64_t j = 0; j < values; j++) {
      const float *w = xw + 2 * j, *r = row + xi[j];
      line[j] = (uint8_t)(int)(w[0] * r[0] + w[1] * r[c] + 0.5f);
    }
  } else if (xt == 3) {
    for (int64_t j = 0; j < values; j++) {
      const float *w = xw + 3 * j, *r = row + xi[j];
      line[j] = (uint8_t)(int)(w[0] * r[0] + w[1] * r[c] + w[2] * r[2 * c] + 0.5f);
    }
  } else {
    for (int64_t j = 0; j < values; j++) {
      const float *w = xw + xt * j, *r = row + xi[j];
      float sum = 0.0f;
      for (int64_t t = 0; t < xt; t++) sum += w[t] * r[t * c];
      line[j] = (uint8_t)(int)(sum + 0.5f);
    }
  }
}

void area_resize(const uint8_t *src, int64_t frame_stride, int64_t row_stride, int64_t frames,
                 int64_t row_values, uint8_t *restrict dst, int64_t out_rows,
                 int64_t out_row_values, const int32_t *ys, const float *yw, int64_t yt,
                 const int32_t *restrict xi, const float *restrict xw, int64_t xt,
                 int64_t channels, float *restrict row) {
  for (int64_t f = 0; f < frames; f++) {
    const uint8_t *frame = src + f * frame_stride;
    uint8_t *out = dst + f * out_rows * out_row_values;
    for (int64_t o = 0; o < out_rows; o++) {
      const float *w = yw + o * yt;
      const uint8_t *first = frame + (int64_t)ys[o] * row_stride;
      for (int64_t i = 0; i < row_values; i++) row[i] = w[0] * first[i];
      for (int64_t t = 1; t < yt; t++) {
        const uint8_t *next = first + t * row_stride;
        const float wt = w[t];
        for (int64_t i = 0; i < row_values; i++) row[i] += wt * next[i];
      }
      columns(row, out + o * out_row_values, out_row_values, xi, xw, xt, channels);
    }
  }
}
