// Split [0, n) into contiguous chunks over std::threads (at most one per hardware thread, each at least
// min_chunk long); fn(worker, lo, hi) runs once per chunk, worker in [0, hardware threads). Shared by the CPU kernels.
#pragma once
#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

namespace mindpangu {

inline int64_t hardware_threads() { return std::max<int64_t>(1, std::thread::hardware_concurrency()); }

template <typename F>
void parallel_chunks(int64_t n, int64_t min_chunk, F fn) {
  int64_t workers = std::min<int64_t>(hardware_threads(), std::max<int64_t>(1, n / std::max<int64_t>(1, min_chunk)));
  if (workers <= 1) {
    fn(0, 0, n);
    return;
  }
  std::vector<std::thread> pool;
  int64_t step = (n + workers - 1) / workers;
  for (int64_t w = 0; w < workers; ++w) {
    int64_t lo = w * step, hi = std::min(n, lo + step);
    if (lo < hi) pool.emplace_back(fn, w, lo, hi);
  }
  for (auto &t : pool) t.join();
}

// The same without the worker index: fn(lo, hi).
template <typename F>
void parallel_for(int64_t n, int64_t min_chunk, F fn) {
  parallel_chunks(n, min_chunk, [&fn](int64_t, int64_t lo, int64_t hi) { fn(lo, hi); });
}

}  // namespace mindpangu
