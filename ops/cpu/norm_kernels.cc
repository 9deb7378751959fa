// RMSNorm forward and backward for MindSpore ops.Custom(func_type="aot") on CPU (same ABI as moe_kernels.cc).
//
// y = x * rstd * w with rstd = 1 / sqrt(mean(x^2) + eps) over the last axis, in float32, as the composite
// mindpangu.layers.RMSNorm computes it; one kernel replaces the six forward primitives and the dozen backward ones
// autodiff makes of them. Rows are split across threads.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <thread>
#include <vector>

#include "parallel_for.h"

namespace {

// At least 128K elements per thread: a thread start costs tens of microseconds, about what a tiny model's whole
// norm takes on one core.
int64_t min_rows(int64_t H) { return std::max<int64_t>(1, (int64_t{1} << 17) / std::max<int64_t>(1, H)); }

int64_t leading(int ndim, const int64_t *shape) {
  int64_t n = 1;
  for (int i = 0; i + 1 < ndim; ++i) n *= shape[i];
  return n;
}

}  // namespace

// inputs: x [..., H] f32, weight [H] f32, eps [1] f32; outputs: y [..., H] f32, rstd [...] f32 (rows of x).
extern "C" int RmsNorm(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                       void *extra) {
  if (nparam != 5) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *w = static_cast<const float *>(params[1]);
  const float eps = static_cast<const float *>(params[2])[0];
  float *y = static_cast<float *>(params[3]);
  float *rstd = static_cast<float *>(params[4]);
  const int64_t H = shapes[0][ndims[0] - 1], N = leading(ndims[0], shapes[0]);
  mindpangu::parallel_chunks(N, min_rows(H), [&](int64_t, int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const float *xr = x + r * H;
      float sq = 0.0f;
      for (int64_t h = 0; h < H; ++h) sq += xr[h] * xr[h];
      const float s = 1.0f / std::sqrt(sq / static_cast<float>(H) + eps);
      rstd[r] = s;
      float *yr = y + r * H;
      for (int64_t h = 0; h < H; ++h) yr[h] = (xr[h] * s) * w[h];
    }
  });
  return 0;
}

// inputs: dy [..., H], x [..., H], weight [H], rstd [...]; outputs: dx [..., H], dweight [H].
// xhat = x * rstd; g = dy * w; dx = rstd * (g - xhat * mean(g * xhat)); dweight = sum over rows of dy * xhat.
extern "C" int RmsNormGrad(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                           void *stream, void *extra) {
  if (nparam != 6) return 1;
  const float *dy = static_cast<const float *>(params[0]);
  const float *x = static_cast<const float *>(params[1]);
  const float *w = static_cast<const float *>(params[2]);
  const float *rstd = static_cast<const float *>(params[3]);
  float *dx = static_cast<float *>(params[4]);
  float *dw = static_cast<float *>(params[5]);
  const int64_t H = shapes[0][ndims[0] - 1], N = leading(ndims[0], shapes[0]);
  const int64_t hw = mindpangu::hardware_threads();
  std::vector<float> partial(static_cast<size_t>(hw * H), 0.0f);  // per-thread dweight, summed below
  mindpangu::parallel_chunks(N, min_rows(H), [&](int64_t worker, int64_t lo, int64_t hi) {
    float *acc = partial.data() + worker * H;
    for (int64_t r = lo; r < hi; ++r) {
      const float *xr = x + r * H, *gr = dy + r * H;
      const float s = rstd[r];
      float dot = 0.0f;
      for (int64_t h = 0; h < H; ++h) {
        const float xhat = xr[h] * s;
        dot += gr[h] * w[h] * xhat;
        acc[h] += gr[h] * xhat;
      }
      const float m = dot / static_cast<float>(H);
      float *dxr = dx + r * H;
      for (int64_t h = 0; h < H; ++h) dxr[h] = s * (gr[h] * w[h] - xr[h] * s * m);
    }
  });
  for (int64_t h = 0; h < H; ++h) {
    float total = 0.0f;
    for (int64_t t = 0; t < hw; ++t) total += partial[t * H + h];
    dw[h] = total;
  }
  return 0;
}
