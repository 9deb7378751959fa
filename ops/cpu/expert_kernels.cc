// Grouped SwiGLU experts over a block-padded dispatch (MoePermute's layout), for MindSpore ops.Custom aot on CPU.
//
// Expert e owns the rows [start_e, start_e + counts[e]) of the permuted buffer, start_e being the sum of the
// earlier experts' counts rounded up to whole blocks; the padding rows after them are skipped (their outputs are
// zero), and each expert's rows are multiplied by its weights in place. The composite path instead computes every
// block, padding included, against a gathered copy of its expert's weights (mindpangu/moe/experts.py).
//
// The matrix products call oneDNN's row-major dnnl_sgemm from the libdnnl that MindSpore's CPU backend ships and
// has already loaded; its threadpool build runs a call on the calling thread, so the experts are split over the
// hardware threads here, balanced by rows.
//
// ABI as in moe_kernels.cc: int Kernel(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
// void *stream, void *extra); params = inputs, then outputs; 0 on success.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "parallel_for.h"

extern "C" int dnnl_sgemm(char transa, char transb, int64_t M, int64_t N, int64_t K, float alpha, const float *A,
                          int64_t lda, const float *B, int64_t ldb, float beta, float *C, int64_t ldc);

namespace {

// C [M, N] = alpha * op(A) op(B) + beta * C, row-major, op(X) = X or X^T as ta / tb say.
inline void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const float *A, const float *B, float beta,
                 float *C) {
  dnnl_sgemm(ta ? 'T' : 'N', tb ? 'T' : 'N', M, N, K, 1.0f, A, ta ? M : K, B, tb ? K : N, beta, C, N);
}

struct Segments {
  std::vector<int64_t> start, rows;
};

// The experts' row ranges in the block-padded buffer of S rows in `blocks` blocks; false if they overflow it.
bool segments(const int32_t *counts, int64_t E, int64_t S, int64_t blocks, Segments *seg) {
  const int64_t block = S / blocks;
  seg->start.resize(E);
  seg->rows.resize(E);
  int64_t acc = 0;
  for (int64_t e = 0; e < E; ++e) {
    if (counts[e] < 0) return false;
    seg->start[e] = acc;
    seg->rows[e] = counts[e];
    acc += (counts[e] + block - 1) / block * block;
  }
  return acc <= S;
}

// Runs fn(e) for every expert, the experts split into contiguous runs of about equal rows, one per thread.
template <typename F>
void for_each_expert(const Segments &seg, F fn) {
  const int64_t E = static_cast<int64_t>(seg.rows.size());
  int64_t total = 0;
  for (int64_t r : seg.rows) total += r;
  // at least 64 rows per thread: starting one costs tens of microseconds
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(mindpangu::hardware_threads(), total / 64));
  std::vector<int64_t> bound(workers + 1, E);
  bound[0] = 0;
  int64_t acc = 0, w = 1;
  for (int64_t e = 0; e < E && w < workers; ++e) {
    acc += seg.rows[e];
    while (w < workers && acc * workers >= total * w) bound[w++] = e + 1;
  }
  mindpangu::parallel_chunks(workers, 1, [&](int64_t, int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i)
      for (int64_t e = bound[i]; e < bound[i + 1]; ++e)
        if (seg.rows[e] > 0) fn(e);
  });
}

inline float sigmoid(float v) { return 1.0f / (1.0f + std::exp(-v)); }

// Zero every row of buf [S, width] outside the experts' segments.
void zero_padding(const Segments &seg, int64_t S, int64_t width, float *buf) {
  int64_t next = 0;
  for (size_t e = 0; e < seg.rows.size(); ++e) {
    if (seg.start[e] > next) std::memset(buf + next * width, 0, sizeof(float) * (seg.start[e] - next) * width);
    next = std::max(next, seg.start[e] + seg.rows[e]);
  }
  if (S > next) std::memset(buf + next * width, 0, sizeof(float) * (S - next) * width);
}

}  // namespace

// y = down(silu(gate(x)) * up(x)) per expert segment.
// inputs: xs [S, H] f32 (block-padded rows), block_expert [B] i32 (B blocks: the block size is S / B), counts [E] i32,
// gate [E, I, H], up [E, I, H], down [E, H, I]; outputs: y [S, H], g = gate(x) [S, I], u = up(x) [S, I] (saved for
// the backward). Padding rows of every output are zero.
extern "C" int MoeGroupedSwiGLU(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                void *stream, void *extra) {
  if (nparam != 9) return 1;
  const float *xs = static_cast<const float *>(params[0]);
  const int32_t *counts = static_cast<const int32_t *>(params[2]);
  const float *wg = static_cast<const float *>(params[3]);
  const float *wu = static_cast<const float *>(params[4]);
  const float *wd = static_cast<const float *>(params[5]);
  float *y = static_cast<float *>(params[6]);
  float *g = static_cast<float *>(params[7]);
  float *u = static_cast<float *>(params[8]);
  const int64_t S = shapes[0][0], H = shapes[0][1], B = shapes[1][0], E = shapes[2][0], I = shapes[3][1];
  Segments seg;
  if (B <= 0 || S % B || !segments(counts, E, S, B, &seg)) return 3;
  for_each_expert(seg, [&](int64_t e) {
    const int64_t n = seg.rows[e], r0 = seg.start[e];
    const float *x = xs + r0 * H;
    float *ge = g + r0 * I, *ue = u + r0 * I;
    gemm(false, true, n, I, H, x, wg + e * I * H, 0.0f, ge);
    gemm(false, true, n, I, H, x, wu + e * I * H, 0.0f, ue);
    std::vector<float> h(n * I);
    for (int64_t j = 0; j < n * I; ++j) h[j] = ge[j] * sigmoid(ge[j]) * ue[j];
    gemm(false, true, n, H, I, h.data(), wd + e * H * I, 0.0f, y + r0 * H);
  });
  zero_padding(seg, S, H, y);
  zero_padding(seg, S, I, g);
  zero_padding(seg, S, I, u);
  return 0;
}

// The backward of MoeGroupedSwiGLU. With a = silu(g), h = a * u, y = h down^T:
// d down = dy^T h, dh = dy down, du = dh * a, dg = dh * u * silu'(g), silu'(g) = s (1 + g (1 - s)), s = sigmoid(g),
// d gate = dg^T x, d up = du^T x, dx = dg gate + du up.
// inputs: dy [S, H], xs [S, H], block_expert [B] i32, counts [E] i32, gate, up, down, g [S, I], u [S, I];
// outputs: dxs [S, H] (padding rows zero), d gate [E, I, H], d up [E, I, H], d down [E, H, I] (zero for an expert
// with no rows).
extern "C" int MoeGroupedSwiGLUGrad(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                    void *stream, void *extra) {
  if (nparam != 13) return 1;
  const float *dy = static_cast<const float *>(params[0]);
  const float *xs = static_cast<const float *>(params[1]);
  const int32_t *counts = static_cast<const int32_t *>(params[3]);
  const float *wg = static_cast<const float *>(params[4]);
  const float *wu = static_cast<const float *>(params[5]);
  const float *wd = static_cast<const float *>(params[6]);
  const float *g = static_cast<const float *>(params[7]);
  const float *u = static_cast<const float *>(params[8]);
  float *dxs = static_cast<float *>(params[9]);
  float *dwg = static_cast<float *>(params[10]);
  float *dwu = static_cast<float *>(params[11]);
  float *dwd = static_cast<float *>(params[12]);
  const int64_t S = shapes[0][0], H = shapes[0][1], B = shapes[2][0], E = shapes[3][0], I = shapes[4][1];
  Segments seg;
  if (B <= 0 || S % B || !segments(counts, E, S, B, &seg)) return 3;
  for (int64_t e = 0; e < E; ++e) {
    if (seg.rows[e] > 0) continue;
    std::memset(dwg + e * I * H, 0, sizeof(float) * I * H);
    std::memset(dwu + e * I * H, 0, sizeof(float) * I * H);
    std::memset(dwd + e * H * I, 0, sizeof(float) * H * I);
  }
  for_each_expert(seg, [&](int64_t e) {
    const int64_t n = seg.rows[e], r0 = seg.start[e];
    const float *x = xs + r0 * H, *dye = dy + r0 * H, *ge = g + r0 * I, *ue = u + r0 * I;
    std::vector<float> h(n * I), dh(n * I), dg(n * I), du(n * I);
    for (int64_t j = 0; j < n * I; ++j) h[j] = ge[j] * sigmoid(ge[j]) * ue[j];
    gemm(true, false, H, I, n, dye, h.data(), 0.0f, dwd + e * H * I);
    gemm(false, false, n, I, H, dye, wd + e * H * I, 0.0f, dh.data());
    for (int64_t j = 0; j < n * I; ++j) {
      const float s = sigmoid(ge[j]), a = ge[j] * s;
      du[j] = dh[j] * a;
      dg[j] = dh[j] * ue[j] * s * (1.0f + ge[j] * (1.0f - s));
    }
    gemm(true, false, I, H, n, dg.data(), x, 0.0f, dwg + e * I * H);
    gemm(true, false, I, H, n, du.data(), x, 0.0f, dwu + e * I * H);
    float *dx = dxs + r0 * H;
    gemm(false, false, n, H, I, dg.data(), wg + e * I * H, 0.0f, dx);
    gemm(false, false, n, H, I, du.data(), wu + e * I * H, 1.0f, dx);
  });
  zero_padding(seg, S, H, dxs);
  return 0;
}
