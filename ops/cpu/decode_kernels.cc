// Cached-decode kernels for serving, for MindSpore ops.Custom(func_type="aot") on CPU (same ABI as
// moe_kernels.cc). Forward only: decode is never differentiated.
//
// A decode step attends Q new tokens per sequence (Q = 1 for plain decoding, 2 for an MTP verify step) to the
// attention cache. Each kernel replaces the 30-40 small primitives the composite path
// (mindpangu/models/pangu_ultra_moe.py MLAttention.decode, pangu_pro_moe.py GQAttention.decode) launches per
// layer and token, and computes exactly what they compute:
//   - the cache entries of the new tokens (MLA: RMSNorm'd latent + roped shared key; GQA: roped K, then V);
//   - attention of each new token at position p over keys 0..p, where a key at one of this step's positions is
//     the new entry and every other key is read from the cache. The caller writes the entries into the cache
//     afterwards (ScatterUpdate on the cache Parameter), so the cache input is read-only here.
// Keys after p are skipped (the composite path adds -1e9 to them, whose exp is exactly 0 in float32), so the work
// is O(p), not O(max_len). RoPE uses the model's cos/sin tables and layout (mindpangu/layers.py Rotary): the
// rotated first halves, then the rotated second halves, from even/odd pairs (interleave) or halves. A position
// outside the cache or the RoPE table makes the kernel fail (return 2).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "dot.h"
#include "parallel_for.h"

namespace {

// out[0..half) = x1 cos - x2 sin, out[half..2 half) = x2 cos + x1 sin (Rotary.construct).
inline void rope(const float *x, int64_t dim, const float *cos, const float *sin, bool interleave, float *out) {
  const int64_t half = dim / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = interleave ? x[2 * i] : x[i];
    const float x2 = interleave ? x[2 * i + 1] : x[half + i];
    out[i] = x1 * cos[i] - x2 * sin[i];
    out[half + i] = x2 * cos[i] + x1 * sin[i];
  }
}

// The key row for position j of sequence b: this step's entry when j is one of its positions, else the cache's.
inline const float *key_row(const float *cache, const float *entries, const int32_t *pos, int64_t b, int64_t j,
                            int64_t Q, int64_t M, int64_t D) {
  for (int64_t i = Q - 1; i >= 0; --i)
    if (pos[b * Q + i] == j) return entries + (b * Q + i) * D;
  return cache + (b * M + j) * D;
}

// Every position inside [0, limit): the cache length and the RoPE table (an error, not a read past either).
inline bool positions_valid(const int32_t *pos, int64_t n, int64_t limit) {
  for (int64_t i = 0; i < n; ++i)
    if (pos[i] < 0 || pos[i] >= limit) return false;
  return true;
}

// Softmax in place over p[0..n), float32, max subtracted.
inline void softmax(float *p, int64_t n) {
  float m = p[0];
  for (int64_t j = 1; j < n; ++j) m = std::max(m, p[j]);
  float total = 0.0f;
  for (int64_t j = 0; j < n; ++j) total += (p[j] = std::exp(p[j] - m));
  const float inv = 1.0f / total;
  for (int64_t j = 0; j < n; ++j) p[j] *= inv;
}

// Starting a thread costs tens of microseconds: split only into chunks of at least this many multiply-adds
// (about 0.2 ms).
constexpr int64_t kMinWork = int64_t{1} << 21;

int64_t min_chunk(int64_t work_per_item) { return std::max<int64_t>(1, kMinWork / std::max<int64_t>(1, work_per_item)); }

}  // namespace

// Multi-head latent attention decode with kv_b_proj absorbed (DeepSeek-V2 §2.1.2).
// inputs: q [B, Q, n*(nope+rope)] (q_b_proj / q_proj output, before RoPE), kv [B, Q, r+rope] (kv_a_proj_with_mqa
// output), kv_norm_weight [r], kv_b_weight [n*(nope+v), r], cos [P, rope/2], sin [P, rope/2], positions [B, Q] i32,
// cache [B*M, r+rope] (row b*M + p: sequence b, position p), config [4] = {n_heads, nope, eps, scale},
// interleave [1] (1 = pairs, 0 = halves);
// outputs: out [B, Q, n*v] (per-head values, before o_proj), entries [B, Q, r+rope] (normed latent, roped key).
extern "C" int MlaDecode(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                         void *extra) {
  if (nparam != 12) return 1;
  const float *q = static_cast<const float *>(params[0]);
  const float *kv = static_cast<const float *>(params[1]);
  const float *norm_w = static_cast<const float *>(params[2]);
  const float *wkv = static_cast<const float *>(params[3]);
  const float *cos_t = static_cast<const float *>(params[4]);
  const float *sin_t = static_cast<const float *>(params[5]);
  const int32_t *pos = static_cast<const int32_t *>(params[6]);
  const float *cache = static_cast<const float *>(params[7]);
  const float *cfg = static_cast<const float *>(params[8]);
  const bool interleave = static_cast<const float *>(params[9])[0] > 0.5f;
  float *out = static_cast<float *>(params[10]);
  float *entries = static_cast<float *>(params[11]);
  const int64_t B = shapes[0][0], Q = shapes[0][1], M = shapes[7][0] / B, D = shapes[7][1];
  const int64_t n = static_cast<int64_t>(cfg[0] + 0.5f), nope = static_cast<int64_t>(cfg[1] + 0.5f);
  const float eps = cfg[2], scale = cfg[3];
  const int64_t r = shapes[2][0], rope_dim = D - r, half = rope_dim / 2;
  const int64_t qk = nope + rope_dim, v = shapes[3][0] / n - nope;
  if (!positions_valid(pos, B * Q, std::min<int64_t>(M, shapes[4][0]))) return 2;
  // 1. the new entries: RMSNorm of the latent (in float32, as RMSNorm does), RoPE of the shared key
  for (int64_t t = 0; t < B * Q; ++t) {
    const float *src = kv + t * D;
    float *dst = entries + t * D;
    const float sq = mindpangu::dot(src, src, r);
    const float rstd = 1.0f / std::sqrt(sq / static_cast<float>(r) + eps);
    for (int64_t i = 0; i < r; ++i) dst[i] = (src[i] * rstd) * norm_w[i];
    const int64_t p = pos[t];
    rope(src + r, rope_dim, cos_t + p * half, sin_t + p * half, interleave, dst + r);
  }
  // 2. per (sequence, head, new token): absorbed query, scores over keys 0..p, attended latent, values
  const int64_t items = B * n * Q;
  const int64_t work = qk * r + (M / 2 + 1) * (2 * r + rope_dim) + v * r;
  mindpangu::parallel_for(items, min_chunk(work), [&](int64_t lo, int64_t hi) {
    std::vector<float> q_lat(r), q_pe(rope_dim), probs(M), o_lat(r);
    for (int64_t it = lo; it < hi; ++it) {
      const int64_t b = it / (n * Q), h = (it / Q) % n, i = it % Q;
      const int64_t p = pos[b * Q + i];
      const float *qr = q + ((b * Q + i) * n + h) * qk;
      rope(qr + nope, rope_dim, cos_t + p * half, sin_t + p * half, interleave, q_pe.data());
      const float *w_uk = wkv + h * (nope + v) * r;  // [nope, r] rows of head h
      std::fill(q_lat.begin(), q_lat.end(), 0.0f);
      for (int64_t d = 0; d < nope; ++d) {
        const float qd = qr[d];
        const float *row = w_uk + d * r;
        for (int64_t c = 0; c < r; ++c) q_lat[c] += qd * row[c];
      }
      const int64_t keys = std::min<int64_t>(p + 1, M);
      for (int64_t j = 0; j < keys; ++j) {
        const float *kr = key_row(cache, entries, pos, b, j, Q, M, D);
        probs[j] = (mindpangu::dot(q_lat.data(), kr, r) + mindpangu::dot(q_pe.data(), kr + r, rope_dim)) * scale;
      }
      softmax(probs.data(), keys);
      std::fill(o_lat.begin(), o_lat.end(), 0.0f);
      for (int64_t j = 0; j < keys; ++j) {
        const float *kr = key_row(cache, entries, pos, b, j, Q, M, D);
        const float pj = probs[j];
        for (int64_t c = 0; c < r; ++c) o_lat[c] += pj * kr[c];
      }
      const float *w_uv = w_uk + nope * r;  // [v, r] rows of head h
      float *dst = out + ((b * Q + i) * n + h) * v;
      mindpangu::matvec(w_uv, r, v, o_lat.data(), r, dst);
    }
  });
  return 0;
}

// Grouped-query attention decode. inputs: q [B, Q, n*d], k [B, Q, kv*d], v [B, Q, kv*d] (projections with their
// biases, before RoPE), cos [P, d/2], sin [P, d/2], positions [B, Q] i32, cache [B*M, 2*kv*d] (roped K, then V),
// config [2] = {n_heads, scale}, interleave [1]; outputs: out [B, Q, n*d] (before o_proj), entries [B, Q, 2*kv*d].
extern "C" int GqaDecode(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                         void *extra) {
  if (nparam != 11) return 1;
  const float *q = static_cast<const float *>(params[0]);
  const float *k = static_cast<const float *>(params[1]);
  const float *vin = static_cast<const float *>(params[2]);
  const float *cos_t = static_cast<const float *>(params[3]);
  const float *sin_t = static_cast<const float *>(params[4]);
  const int32_t *pos = static_cast<const int32_t *>(params[5]);
  const float *cache = static_cast<const float *>(params[6]);
  const float *cfg = static_cast<const float *>(params[7]);
  const bool interleave = static_cast<const float *>(params[8])[0] > 0.5f;
  float *out = static_cast<float *>(params[9]);
  float *entries = static_cast<float *>(params[10]);
  const int64_t B = shapes[0][0], Q = shapes[0][1], M = shapes[6][0] / B, D = shapes[6][1];
  const int64_t n = static_cast<int64_t>(cfg[0] + 0.5f);
  const float scale = cfg[1];
  const int64_t kvd = shapes[1][2], d = shapes[0][2] / n, kvh = kvd / d, rep = n / kvh, half = d / 2;
  if (!positions_valid(pos, B * Q, std::min<int64_t>(M, shapes[3][0]))) return 2;
  for (int64_t t = 0; t < B * Q; ++t) {
    const int64_t p = pos[t];
    float *dst = entries + t * D;
    for (int64_t g = 0; g < kvh; ++g) rope(k + t * kvd + g * d, d, cos_t + p * half, sin_t + p * half, interleave,
                                           dst + g * d);
    std::memcpy(dst + kvd, vin + t * kvd, sizeof(float) * kvd);
  }
  const int64_t items = B * n * Q;
  mindpangu::parallel_for(items, min_chunk((M / 2 + 1) * 2 * d), [&](int64_t lo, int64_t hi) {
    std::vector<float> qr(d), probs(M);
    for (int64_t it = lo; it < hi; ++it) {
      const int64_t b = it / (n * Q), h = (it / Q) % n, i = it % Q;
      const int64_t p = pos[b * Q + i], g = h / rep;  // query head h reads key/value head h / rep
      rope(q + ((b * Q + i) * n + h) * d, d, cos_t + p * half, sin_t + p * half, interleave, qr.data());
      const int64_t keys = std::min<int64_t>(p + 1, M);
      for (int64_t j = 0; j < keys; ++j) {
        probs[j] = mindpangu::dot(qr.data(), key_row(cache, entries, pos, b, j, Q, M, D) + g * d, d) * scale;
      }
      softmax(probs.data(), keys);
      float *dst = out + ((b * Q + i) * n + h) * d;
      std::fill(dst, dst + d, 0.0f);
      for (int64_t j = 0; j < keys; ++j) {
        const float *vr = key_row(cache, entries, pos, b, j, Q, M, D) + kvd + g * d;
        const float pj = probs[j];
        for (int64_t c = 0; c < d; ++c) dst[c] += pj * vr[c];
      }
    }
  });
  return 0;
}
