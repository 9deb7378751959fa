// Dot products of float32 rows for the CPU kernels, written with GCC / Clang vector extensions (8 floats: one AVX
// register, two SSE ones) so each keeps independent FMA chains in flight whatever -march allows; a plain running
// sum would force strict left-to-right order and run scalar.
#pragma once
#include <cstdint>
#include <cstring>

// Built without AVX (no -march), GCC notes that passing an 8-float vector by value changes the ABI; these helpers
// are inline and never cross a library boundary, so the note does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace mindpangu {

typedef float float8 __attribute__((vector_size(32)));

inline float8 load8(const float *p) {
  float8 v;
  std::memcpy(&v, p, sizeof(v));  // unaligned load
  return v;
}

inline float sum8(const float8 &v) { return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7])); }

inline float dot(const float *a, const float *b, int64_t n) {
  float8 acc = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc += load8(a + i) * load8(b + i);
  float total = sum8(acc);
  for (; i < n; ++i) total += a[i] * b[i];
  return total;
}

// out[r] = dot(w + r * stride, x, n) for r = 0..3: four rows of a row-major matrix against one vector at once.
inline void dot4(const float *w, int64_t stride, const float *x, int64_t n, float *out) {
  float8 a0 = {}, a1 = {}, a2 = {}, a3 = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const float8 xv = load8(x + i);
    a0 += load8(w + i) * xv;
    a1 += load8(w + stride + i) * xv;
    a2 += load8(w + 2 * stride + i) * xv;
    a3 += load8(w + 3 * stride + i) * xv;
  }
  out[0] = sum8(a0), out[1] = sum8(a1), out[2] = sum8(a2), out[3] = sum8(a3);
  for (; i < n; ++i)
    for (int r = 0; r < 4; ++r) out[r] += w[r * stride + i] * x[i];
}

// y[r] = dot(w + r * stride, x, n) for r = 0..rows-1 (a matrix-vector product), four rows at a time.
inline void matvec(const float *w, int64_t stride, int64_t rows, const float *x, int64_t n, float *y) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) dot4(w + r * stride, stride, x, n, y + r);
  for (; r < rows; ++r) y[r] = dot(w + r * stride, x, n);
}

}  // namespace mindpangu
