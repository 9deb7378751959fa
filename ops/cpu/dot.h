// Dot product of two float32 rows with 8 independent partial sums, so the compiler can vectorise it (a single
// running sum forces strict left-to-right order). Shared by the CPU kernels.
#pragma once
#include <cstdint>

namespace mindpangu {

inline float dot(const float *a, const float *b, int64_t n) {
  float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += a[i + j] * b[i + j];
  float total = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; i < n; ++i) total += a[i] * b[i];
  return total;
}

}  // namespace mindpangu
