// Causal attention softmax for MindSpore ops.Custom aot on CPU: probs = softmax(scale * scores + causal mask) over
// the last axis, and its backward. The queries are the last Q of the K keys, so query i sees keys 0 .. K - Q + i
// (layers.causal_mask); the masked probabilities are exactly 0, as exp(-1e9 - max) is in float32 in the composite
// path (layers.attention_probs), and the composite's mask add, softmax and its backward (a ReduceSum, a Sub and a
// Mul over the whole [.., Q, K] tensor) become one kernel each way.
//
// ABI as in moe_kernels.cc.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "dot.h"
#include "parallel_for.h"

namespace {

typedef int32_t int8v __attribute__((vector_size(32)));
using mindpangu::float8;

// exp(x) for x <= 0, eight lanes, to about 2 ulp (Cephes expf: x = n ln2 + r, |r| <= ln2 / 2, a degree-6
// polynomial); underflows to 0 below -87. Vector extensions, because GCC keeps a float compare scalar unless
// -fno-trapping-math.
inline float8 exp8_nonpositive(float8 x) {
  x = x < -87.0f ? float8{} - 87.0f : x;
  const int8v ni = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, int8v);  // round(x / ln2), x <= 0
  const float8 n = __builtin_convertvector(ni, float8);
  const float8 r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float8 p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * (float8)((ni + 127) << 23);  // 2^n from its exponent bits (a same-size vector cast keeps the bits)
}

// p[j] = exp((s[j] - mx) * scale) for j < n
inline void exp_row(const float *s, float mx, float scale, int64_t n, float *p) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const float8 v = exp8_nonpositive((mindpangu::load8(s + j) - mx) * scale);
    std::memcpy(p + j, &v, sizeof(v));
  }
  if (j < n) {
    float tail[8] = {};
    for (int64_t i = j; i < n; ++i) tail[i - j] = (s[i] - mx) * scale;
    const float8 v = exp8_nonpositive(mindpangu::load8(tail));
    std::memcpy(p + j, &v, sizeof(float) * (n - j));
  }
}

// max of v[0..n), n >= 1, eight lanes at a time
inline float row_max(const float *v, int64_t n) {
  float mx = v[0];
  int64_t j = 0;
  if (n >= 8) {
    float8 acc = mindpangu::load8(v);
    for (j = 8; j + 8 <= n; j += 8) {
      const float8 x = mindpangu::load8(v + j);
      acc = acc > x ? acc : x;
    }
    for (int l = 0; l < 8; ++l) mx = std::max(mx, acc[l]);
  }
  for (; j < n; ++j) mx = std::max(mx, v[j]);
  return mx;
}

inline float row_sum(const float *v, int64_t n) {
  float8 acc = {};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) acc += mindpangu::load8(v + j);
  float total = mindpangu::sum8(acc);
  for (; j < n; ++j) total += v[j];
  return total;
}

}  // namespace

// inputs: scores [..., Q, K] f32, scale [1] f32 (> 0); output: probs [..., Q, K] f32.
extern "C" int CausalSoftmax(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                             void *extra) {
  if (nparam != 3) return 1;
  const float *scores = static_cast<const float *>(params[0]);
  const float scale = *static_cast<const float *>(params[1]);
  float *probs = static_cast<float *>(params[2]);
  const int nd = ndims[0];
  if (nd < 2) return 2;
  const int64_t Q = shapes[0][nd - 2], K = shapes[0][nd - 1];
  if (Q > K || !(scale > 0.0f)) return 2;
  int64_t rows = 1;
  for (int i = 0; i < nd - 1; ++i) rows *= shapes[0][i];
  mindpangu::parallel_for(rows, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const float *s = scores + r * K;
      float *p = probs + r * K;
      const int64_t seen = K - Q + r % Q + 1;
      const float mx = row_max(s, seen);  // scale > 0: the max of scale * s is scale * max(s)
      exp_row(s, mx, scale, seen, p);
      const float inv = 1.0f / row_sum(p, seen);
      for (int64_t j = 0; j < seen; ++j) p[j] *= inv;
      std::fill(p + seen, p + K, 0.0f);
    }
  });
  return 0;
}

// d scores = scale * p * (dp - sum_j dp_j p_j) per row (masked entries, where p = 0, get 0).
// inputs: dprobs [..., Q, K], probs [..., Q, K], scale [1]; output: dscores [..., Q, K].
extern "C" int CausalSoftmaxGrad(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                 void *stream, void *extra) {
  if (nparam != 4) return 1;
  const float *dprobs = static_cast<const float *>(params[0]);
  const float *probs = static_cast<const float *>(params[1]);
  const float scale = *static_cast<const float *>(params[2]);
  float *dscores = static_cast<float *>(params[3]);
  const int nd = ndims[0];
  if (nd < 2) return 2;
  const int64_t Q = shapes[0][nd - 2], K = shapes[0][nd - 1];
  int64_t rows = 1;
  for (int i = 0; i < nd - 1; ++i) rows *= shapes[0][i];
  mindpangu::parallel_for(rows, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const float *dp = dprobs + r * K, *p = probs + r * K;
      float *ds = dscores + r * K;
      const int64_t seen = K - Q + r % Q + 1;
      const float dot = mindpangu::dot(dp, p, seen);
      for (int64_t j = 0; j < seen; ++j) ds[j] = scale * p[j] * (dp[j] - dot);
      std::fill(ds + seen, ds + K, 0.0f);
    }
  });
  return 0;
}
