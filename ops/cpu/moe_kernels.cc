// MoE routing and dispatch kernels for MindSpore ops.Custom(func_type="aot") on CPU.
//
// ABI (MindSpore 2.9/2.10 CPU aot): int Kernel(int nparam, void **params, int *ndims, int64_t **shapes,
// const char **dtypes, void *stream, void *extra); params = inputs, then outputs; return 0 on success.
// Every kernel matches the composite reference path in mindpangu/moe (router.py, token_dispatcher.py) exactly in
// layout: indices sorted by descending score (per group for MoGE, groups in order), rows stable within an expert,
// segments padded to whole blocks. Loops are split over tokens (or rows) across threads.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#include "dot.h"
#include "parallel_for.h"

namespace {

using mindpangu::parallel_for;

// Pick the k largest of v[0..n) (ties: lower index first), written in descending order.
inline void topk_desc(const float *v, int n, int k, int32_t *out, int offset) {
  std::vector<int> order(n);
  for (int i = 0; i < n; ++i) order[i] = i;
  std::partial_sort(order.begin(), order.begin() + k, order.end(), [v](int a, int b) {
    return v[a] > v[b] || (v[a] == v[b] && a < b);
  });
  for (int j = 0; j < k; ++j) out[j] = order[j] + offset;
}

struct GatingConfig {
  bool moge, sigmoid, normalise;
  float scale;
  int groups;
};

GatingConfig read_config(const float *c) {
  return {c[0] > 0.5f, c[1] > 0.5f, c[2] > 0.5f, c[3], std::max(1, static_cast<int>(c[4] + 0.5f))};
}

}  // namespace

// inputs: logits [T, E] f32, bias [E] f32 (selection only), config [5] f32 = {moge, sigmoid, normalise, scale,
// groups}; outputs: weights [T, K] f32, indices [T, K] i32, scores [T, E] f32, counts [E] i32.
extern "C" int MoeGating(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                         void *extra) {
  if (nparam != 7) return 1;
  const float *logits = static_cast<const float *>(params[0]);
  const float *bias = static_cast<const float *>(params[1]);
  const GatingConfig cfg = read_config(static_cast<const float *>(params[2]));
  float *weights = static_cast<float *>(params[3]);
  int32_t *indices = static_cast<int32_t *>(params[4]);
  float *scores = static_cast<float *>(params[5]);
  int32_t *counts = static_cast<int32_t *>(params[6]);
  const int64_t T = shapes[0][0];
  const int E = static_cast<int>(shapes[0][1]);
  const int K = static_cast<int>(shapes[3][1]);
  if (cfg.moge && (E % cfg.groups || K % cfg.groups)) return 2;
  parallel_for(T, 64, [&](int64_t lo, int64_t hi) {
    std::vector<float> choice(E);
    for (int64_t t = lo; t < hi; ++t) {
      const float *x = logits + t * E;
      float *s = scores + t * E;
      if (cfg.sigmoid) {
        for (int e = 0; e < E; ++e) s[e] = 1.0f / (1.0f + std::exp(-x[e]));
      } else {
        float m = *std::max_element(x, x + E), sum = 0.0f;
        for (int e = 0; e < E; ++e) sum += (s[e] = std::exp(x[e] - m));
        for (int e = 0; e < E; ++e) s[e] /= sum;
      }
      for (int e = 0; e < E; ++e) choice[e] = s[e] + bias[e];
      int32_t *idx = indices + t * K;
      if (cfg.moge) {
        const int size = E / cfg.groups, kg = K / cfg.groups;
        for (int g = 0; g < cfg.groups; ++g) topk_desc(choice.data() + g * size, size, kg, idx + g * kg, g * size);
      } else {
        topk_desc(choice.data(), E, K, idx, 0);
      }
      float *w = weights + t * K, total = 0.0f;
      for (int j = 0; j < K; ++j) total += (w[j] = s[idx[j]]);
      const float norm = cfg.normalise ? cfg.scale / (total + 1e-20f) : cfg.scale;
      for (int j = 0; j < K; ++j) w[j] *= norm;
    }
  });
  std::memset(counts, 0, sizeof(int32_t) * E);
  for (int64_t i = 0; i < T * K; ++i) ++counts[indices[i]];
  return 0;
}

// inputs: scores [T, E], indices [T, K] i32, d_weights [T, K], d_scores [T, E], config [5];
// output: d_logits [T, E].
extern "C" int MoeGatingGrad(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                             void *stream, void *extra) {
  if (nparam != 6) return 1;
  const float *scores = static_cast<const float *>(params[0]);
  const int32_t *indices = static_cast<const int32_t *>(params[1]);
  const float *dw = static_cast<const float *>(params[2]);
  const float *dscores = static_cast<const float *>(params[3]);
  const GatingConfig cfg = read_config(static_cast<const float *>(params[4]));
  float *dlogits = static_cast<float *>(params[5]);
  const int64_t T = shapes[0][0];
  const int E = static_cast<int>(shapes[0][1]);
  const int K = static_cast<int>(shapes[1][1]);
  parallel_for(T, 64, [&](int64_t lo, int64_t hi) {
    std::vector<float> ds(E);
    for (int64_t t = lo; t < hi; ++t) {
      const float *s = scores + t * E;
      const int32_t *idx = indices + t * K;
      const float *g = dw + t * K;
      std::copy(dscores + t * E, dscores + (t + 1) * E, ds.begin());
      if (cfg.normalise) {  // w_j = c * s_j / (sum_i s_i + eps)
        float total = 1e-20f, dot = 0.0f;
        for (int j = 0; j < K; ++j) total += s[idx[j]];
        for (int j = 0; j < K; ++j) dot += g[j] * s[idx[j]];
        for (int j = 0; j < K; ++j) ds[idx[j]] += cfg.scale * (g[j] / total - dot / (total * total));
      } else {
        for (int j = 0; j < K; ++j) ds[idx[j]] += cfg.scale * g[j];
      }
      float *out = dlogits + t * E;
      if (cfg.sigmoid) {
        for (int e = 0; e < E; ++e) out[e] = ds[e] * s[e] * (1.0f - s[e]);
      } else {
        float dot = 0.0f;
        for (int e = 0; e < E; ++e) dot += ds[e] * s[e];
        for (int e = 0; e < E; ++e) out[e] = s[e] * (ds[e] - dot);
      }
    }
  });
  return 0;
}

// inputs: x [T, H] f32, indices [T, K] i32; outputs: permuted [S, H] f32 (S = blocks * block),
// slot_of_row [T*K] i32, block_expert [blocks] i32, counts [E] i32.
extern "C" int MoePermute(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                          void *extra) {
  if (nparam != 6) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const int32_t *indices = static_cast<const int32_t *>(params[1]);
  float *permuted = static_cast<float *>(params[2]);
  int32_t *slot_of_row = static_cast<int32_t *>(params[3]);
  int32_t *block_expert = static_cast<int32_t *>(params[4]);
  int32_t *counts = static_cast<int32_t *>(params[5]);
  const int64_t T = shapes[0][0], H = shapes[0][1], K = shapes[1][1], S = shapes[2][0];
  const int64_t blocks = shapes[4][0], E = shapes[5][0], R = T * K;
  const int64_t block = S / blocks;
  std::memset(counts, 0, sizeof(int32_t) * E);
  for (int64_t r = 0; r < R; ++r) {
    if (indices[r] < 0 || indices[r] >= E) return 3;
    ++counts[indices[r]];
  }
  std::vector<int64_t> start(E), end(E), next(E);
  int64_t acc = 0;
  for (int64_t e = 0; e < E; ++e) {
    start[e] = next[e] = acc;
    acc += (counts[e] + block - 1) / block * block;
    end[e] = acc;
  }
  if (acc > S) return 4;
  std::vector<int64_t> row_of_slot(S, -1);
  for (int64_t r = 0; r < R; ++r) {  // stable counting sort
    int64_t s = next[indices[r]]++;
    slot_of_row[r] = static_cast<int32_t>(s);
    row_of_slot[s] = r;
  }
  for (int64_t j = 0; j < blocks; ++j) {
    int64_t e = 0;
    while (e < E && end[e] <= j * block) ++e;
    block_expert[j] = static_cast<int32_t>(std::min<int64_t>(e, E - 1));
  }
  parallel_for(S, 256, [&](int64_t lo, int64_t hi) {
    for (int64_t s = lo; s < hi; ++s) {
      float *dst = permuted + s * H;
      if (row_of_slot[s] < 0) {
        std::memset(dst, 0, sizeof(float) * H);
      } else {
        std::memcpy(dst, x + (row_of_slot[s] / K) * H, sizeof(float) * H);
      }
    }
  });
  return 0;
}

// inputs: d_permuted [S, H], slot_of_row [T*K] i32, x [T, H] (shape only); output: dx [T, H] (sum over the K rows).
extern "C" int MoePermuteGrad(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                              void *stream, void *extra) {
  if (nparam != 4) return 1;
  const float *dperm = static_cast<const float *>(params[0]);
  const int32_t *slot = static_cast<const int32_t *>(params[1]);
  float *dx = static_cast<float *>(params[3]);
  const int64_t H = shapes[0][1], R = shapes[1][0], T = shapes[2][0], K = R / T;
  parallel_for(T, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      float *out = dx + t * H;
      std::memcpy(out, dperm + static_cast<int64_t>(slot[t * K]) * H, sizeof(float) * H);
      for (int64_t k = 1; k < K; ++k) {
        const float *src = dperm + static_cast<int64_t>(slot[t * K + k]) * H;
        for (int64_t h = 0; h < H; ++h) out[h] += src[h];
      }
    }
  });
  return 0;
}

// inputs: expert outputs ys [S, H], slot_of_row [T*K] i32, weights [T, K]; output: y [T, H] = sum_k w * ys[slot].
extern "C" int MoeUnpermute(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                            void *stream, void *extra) {
  if (nparam != 4) return 1;
  const float *ys = static_cast<const float *>(params[0]);
  const int32_t *slot = static_cast<const int32_t *>(params[1]);
  const float *w = static_cast<const float *>(params[2]);
  float *y = static_cast<float *>(params[3]);
  const int64_t H = shapes[0][1], T = shapes[2][0], K = shapes[2][1];
  parallel_for(T, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      float *out = y + t * H;
      std::fill(out, out + H, 0.0f);
      for (int64_t k = 0; k < K; ++k) {
        const float wk = w[t * K + k];
        const float *src = ys + static_cast<int64_t>(slot[t * K + k]) * H;
        for (int64_t h = 0; h < H; ++h) out[h] += wk * src[h];
      }
    }
  });
  return 0;
}

// inputs: dy [T, H], ys [S, H], slot_of_row [T*K] i32, weights [T, K];
// outputs: d_ys [S, H] (w * dy at each routed slot, 0 in padding), d_weights [T, K] = <ys[slot], dy>.
extern "C" int MoeUnpermuteGrad(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                void *stream, void *extra) {
  if (nparam != 6) return 1;
  const float *dy = static_cast<const float *>(params[0]);
  const float *ys = static_cast<const float *>(params[1]);
  const int32_t *slot = static_cast<const int32_t *>(params[2]);
  const float *w = static_cast<const float *>(params[3]);
  float *dys = static_cast<float *>(params[4]);
  float *dw = static_cast<float *>(params[5]);
  const int64_t T = shapes[0][0], H = shapes[0][1], S = shapes[1][0], K = shapes[3][1];
  std::memset(dys, 0, sizeof(float) * S * H);
  parallel_for(T, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const float *g = dy + t * H;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t s = slot[t * K + k];
        const float wk = w[t * K + k];
        const float *src = ys + s * H;
        float *dst = dys + s * H;  // each slot belongs to exactly one (t, k): no write conflicts
        float dot = 0.0f;
        for (int64_t h = 0; h < H; ++h) {
          dst[h] = wk * g[h];
          dot += src[h] * g[h];
        }
        dw[t * K + k] = dot;
      }
    }
  });
  return 0;
}

namespace {

// One SwiGLU expert on one row, accumulated: y += scale * down (silu(gate x) * (up x)); g, u are scratch [I] and
// o scratch [H].
void swiglu_row(const float *x, const float *gate, const float *up, const float *down, int64_t H, int64_t I,
                float scale, float *g, float *u, float *o, float *y) {
  mindpangu::matvec(gate, H, I, x, H, g);
  mindpangu::matvec(up, H, I, x, H, u);
  for (int64_t a = 0; a < I; ++a) g[a] = g[a] / (1.0f + std::exp(-g[a])) * u[a];  // silu(gate) * up
  mindpangu::matvec(down, I, H, g, I, o);
  for (int64_t c = 0; c < H; ++c) y[c] += scale * o[c];
}

}  // namespace

// Routed experts for a handful of rows (cached decode; forward only), without a dispatch:
// y[t] = sum_k w[t,k] * SwiGLU_e(x[t]) with e = indices[t,k] (+ the shared expert's SwiGLU(x[t]) when its weights
// are given), reading each expert's weights in place (no permuted buffer, no gathered copies of expert weights).
// inputs: x [T, H], weights [T, K], indices [T, K] i32, gate [E, I, H], up [E, I, H], down [E, H, I]
// [, shared gate [S, H], shared up [S, H], shared down [H, S]]; output: y [T, H].
extern "C" int MoeRowExperts(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                             void *stream, void *extra) {
  if (nparam != 7 && nparam != 10) return 1;
  const bool shared = nparam == 10;
  const float *x = static_cast<const float *>(params[0]);
  const float *w = static_cast<const float *>(params[1]);
  const int32_t *idx = static_cast<const int32_t *>(params[2]);
  const float *gate = static_cast<const float *>(params[3]);
  const float *up = static_cast<const float *>(params[4]);
  const float *down = static_cast<const float *>(params[5]);
  float *y = static_cast<float *>(params[nparam - 1]);
  const int64_t T = shapes[0][0], H = shapes[0][1], K = shapes[1][1], I = shapes[3][1];
  const int64_t S = shared ? shapes[6][0] : 0;
  // chunks of at least 2^21 multiply-adds (about 0.2 ms): starting a thread costs tens of microseconds
  const int64_t min_rows = std::max<int64_t>(1, (int64_t{1} << 21) / std::max<int64_t>(1, 3 * (K * I + S) * H));
  parallel_for(T, min_rows, [&](int64_t lo, int64_t hi) {
    const int64_t width = std::max(I, S);
    std::vector<float> g(width), u(width), o(H);
    for (int64_t t = lo; t < hi; ++t) {
      const float *xr = x + t * H;
      float *yr = y + t * H;
      std::fill(yr, yr + H, 0.0f);
      for (int64_t j = 0; j < K; ++j) {
        const int64_t e = idx[t * K + j];
        swiglu_row(xr, gate + e * I * H, up + e * I * H, down + e * H * I, H, I, w[t * K + j], g.data(), u.data(),
                   o.data(), yr);
      }
      if (shared)
        swiglu_row(xr, static_cast<const float *>(params[6]), static_cast<const float *>(params[7]),
                   static_cast<const float *>(params[8]), H, S, 1.0f, g.data(), u.data(), o.data(), yr);
    }
  });
  return 0;
}
