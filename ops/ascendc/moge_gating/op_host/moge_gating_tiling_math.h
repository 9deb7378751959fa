// Host-side tiling arithmetic of the MogeGating Ascend C operator, in plain C++ (no CANN headers), so that the
// op_host tiling function (moge_gating.cpp) and the g++ unit test (tests/test_ascendc_tiling.py) share it.
//
// Unified-buffer (UB) layout per AI core (all sizes are multiples of 32 bytes, every buffer starts 32B-aligned):
//   in queue      kBufferNum x tileRows x rowLen   float   logits, softmax computed in place
//   weights queue kBufferNum x tileRows x topKPad  float
//   indices queue kBufferNum x tileRows x topKPad  int32
//   work          workElems                        float   sharedTmpBuffer of ReduceMax/ReduceSum
//   reduce        8                                float   ReduceMax/ReduceSum result {value, index bits}
//   scale         alignUp(E, 8)                    float   router_scale, loaded once
// A token row is laid out group by group: group g occupies [g*groupPad, g*groupPad + groupSize), and the
// groupPad - groupSize tail slots hold kPadLogit. groupPad = alignUp(E/M, 8) makes every group start 32B-aligned,
// which the vector instructions require of their source address (ReduceMax: "LocalTensor的起始地址需要32字节对齐").
//
// The work-buffer size follows the CANN ReduceMax "sharedTmpBuffer" formula for calIndex = true
// (asc-devkit docs/api/context/ReduceMax.md), evaluated for the longest reduction (rowLen); it bounds the
// calIndex = false ReduceMax and the ReduceSum ("方式一") sizes of the same count as well.
#ifndef MOGE_GATING_TILING_MATH_H
#define MOGE_GATING_TILING_MATH_H

#include <cmath>
#include <cstdint>
#include <vector>

namespace moge {

constexpr int64_t kBlockBytes = 32;        // one UB data block
constexpr int64_t kFloatBytes = 4;         // float32 and int32
constexpr int64_t kFloatsPerBlock = kBlockBytes / kFloatBytes;
constexpr int64_t kFloatsPerRepeat = 256 / kFloatBytes;  // one vector repeat reads 256 bytes
constexpr int64_t kBufferNum = 2;          // double buffering; must equal BUFFER_NUM in op_kernel/moge_gating.cpp
constexpr int64_t kMaxBlockCount = 4095;   // DataCopyPad blockCount range [0, 4095]
constexpr int64_t kMaxTokens = 2147483647;  // tiling fields are uint32; keep every product in int32 range
constexpr int64_t kUbBytes910B = 192 * 1024;
constexpr int64_t kUbReservedBytes = 8 * 1024;  // safety margin for framework temporaries (not a CANN figure)
constexpr float kPadLogit = -1.0e30f;      // fills group padding: never the max, exp() underflows to 0
constexpr float kMaskScore = -1.0f;        // marks a chosen score; softmax scores are >= 0

enum MogeStatus : int32_t {
  kOk = 0,
  kBadShape = 1,             // T, E, K or M <= 0
  kExpertsNotDivisible = 2,  // E % M != 0
  kTopKNotDivisible = 3,     // K % M != 0
  kTopKPerGroupTooLarge = 4, // K / M > E / M
  kBadCoreNum = 5,           // coreNum <= 0
  kTooLarge = 6,             // T beyond the uint32 tiling fields
  kUbTooSmall = 7,           // not even one token row (plus fixed buffers) fits the UB budget
};

struct MogeTiling {
  int32_t status = kBadShape;
  // problem
  int64_t totalTokens = 0, numExperts = 0, topK = 0, numGroups = 0;
  int64_t groupSize = 0, topKPerGroup = 0, groupPad = 0, rowLen = 0, topKPad = 0;
  // split over cores and loops
  int64_t blockDim = 0, tokensPerCore = 0, lastCoreTokens = 0, tileRows = 0;
  // UB layout (bytes, per buffer of a queue; workElems in floats)
  int64_t workElems = 0;
  int64_t inBytes = 0, weightsBytes = 0, indicesBytes = 0, workBytes = 0, reduceBytes = 0, scaleBytes = 0;
  int64_t ubBudget = 0, ubBytesUsed = 0;
};

inline int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t AlignUp(int64_t a, int64_t b) { return CeilDiv(a, b) * b; }

// Minimum sharedTmpBuffer (in floats) of ReduceMax(dst, src, tmp, count, calIndex = true) for fp32, following the
// documented three-round formula; firstMaxRepeat is rounded up (the doc's count / elementsPerRepeat) for a count
// that is not a whole number of repeats.
inline int64_t ReduceMaxIndexWorkElems(int64_t count) {
  const int64_t firstMaxRepeat = CeilDiv(count, kFloatsPerRepeat);
  const int64_t iter1OutputCount = firstMaxRepeat * 2;
  const int64_t iter2AlignStart = AlignUp(iter1OutputCount, kFloatsPerBlock);
  const int64_t iter2OutputCount = CeilDiv(iter1OutputCount, kFloatsPerRepeat) * 2;
  const int64_t iter3AlignStart = AlignUp(iter2OutputCount, kFloatsPerBlock);
  const int64_t iter3OutputCount = CeilDiv(iter2OutputCount, kFloatsPerRepeat) * 2;
  const int64_t iter3AlignEnd = AlignUp(iter3OutputCount, kFloatsPerBlock);
  return iter2AlignStart + iter3AlignStart + iter3AlignEnd;
}

// Tiling for T tokens of E logits, top-K over M groups, on coreNum vector cores with ubBytes of UB each.
inline MogeTiling ComputeMogeTiling(int64_t T, int64_t E, int64_t K, int64_t M, int64_t coreNum, int64_t ubBytes) {
  MogeTiling t;
  t.totalTokens = T, t.numExperts = E, t.topK = K, t.numGroups = M;
  auto fail = [&t](MogeStatus status) {
    t.status = status;
    return t;
  };
  if (T <= 0 || E <= 0 || K <= 0 || M <= 0) return fail(kBadShape);
  if (coreNum <= 0) return fail(kBadCoreNum);
  if (E % M != 0) return fail(kExpertsNotDivisible);
  if (K % M != 0) return fail(kTopKNotDivisible);
  t.groupSize = E / M;
  t.topKPerGroup = K / M;
  if (t.topKPerGroup > t.groupSize) return fail(kTopKPerGroupTooLarge);
  if (T > kMaxTokens || E > kMaxTokens / kFloatsPerBlock) return fail(kTooLarge);

  t.groupPad = AlignUp(t.groupSize, kFloatsPerBlock);
  t.rowLen = M * t.groupPad;
  t.topKPad = AlignUp(K, kFloatsPerBlock);

  t.workElems = ReduceMaxIndexWorkElems(t.rowLen);
  t.workBytes = t.workElems * kFloatBytes;
  t.reduceBytes = kBlockBytes;
  t.scaleBytes = AlignUp(E, kFloatsPerBlock) * kFloatBytes;
  const int64_t fixedBytes = t.workBytes + t.reduceBytes + t.scaleBytes;
  const int64_t rowBytes = kBufferNum * (t.rowLen + 2 * t.topKPad) * kFloatBytes;  // one token in all queues
  t.ubBudget = ubBytes - kUbReservedBytes;
  if (t.ubBudget < fixedBytes + rowBytes) return fail(kUbTooSmall);

  // Tokens are split evenly over the cores; the last core takes the remainder (>= 1 token by construction).
  t.tokensPerCore = CeilDiv(T, coreNum);
  t.blockDim = CeilDiv(T, t.tokensPerCore);
  t.lastCoreTokens = T - (t.blockDim - 1) * t.tokensPerCore;

  // As many rows per loop as the UB holds, no more than a core owns, and within the DataCopyPad blockCount limit
  // (the logits of a tile are copied as tileRows * M blocks, the outputs as tileRows blocks).
  int64_t rows = (t.ubBudget - fixedBytes) / rowBytes;
  if (rows > t.tokensPerCore) rows = t.tokensPerCore;
  if (rows > kMaxBlockCount / M) rows = kMaxBlockCount / M;
  if (rows < 1) return fail(kUbTooSmall);  // M > 4095: one row already needs too many copy blocks
  t.tileRows = rows;

  t.inBytes = rows * t.rowLen * kFloatBytes;
  t.weightsBytes = rows * t.topKPad * kFloatBytes;
  t.indicesBytes = rows * t.topKPad * kFloatBytes;
  t.ubBytesUsed = kBufferNum * (t.inBytes + t.weightsBytes + t.indicesBytes) + fixedBytes;
  t.status = kOk;
  return t;
}

// The kernel's per-token gating math, sequenced as op_kernel/moge_gating.cpp does it (max over the padded row,
// x - max, exp, sum, multiply by 1/sum, then per group repeated first-max with masking), for host-side testing.
// Ties go to the lowest index, as CANN ReduceMax returns the first maximum ("如果存在多个最大值，返回第一个最大值的索引")
// and as topk_desc in ops/cpu/moe_kernels.cc orders them.
inline void MogeGateTokenReference(const float *logits, const float *routerScale, int64_t E, int64_t K, int64_t M,
                                   float *weights, int32_t *indices) {
  const int64_t G = E / M, kg = K / M, gPad = AlignUp(G, kFloatsPerBlock);
  std::vector<float> row(M * gPad, kPadLogit);
  for (int64_t g = 0; g < M; ++g)
    for (int64_t i = 0; i < G; ++i) row[g * gPad + i] = logits[g * G + i];
  float mx = row[0];
  for (float v : row) mx = v > mx ? v : mx;
  float sum = 0.0f;
  for (float &v : row) sum += (v = std::exp(v - mx));
  const float inv = 1.0f / sum;
  for (float &v : row) v *= inv;
  for (int64_t g = 0; g < M; ++g) {
    float *grp = row.data() + g * gPad;
    for (int64_t i = 0; i < kg; ++i) {
      int64_t best = 0;
      for (int64_t j = 1; j < G; ++j) best = grp[j] > grp[best] ? j : best;
      const int64_t e = g * G + best;
      weights[g * kg + i] = grp[best] * routerScale[e];
      indices[g * kg + i] = static_cast<int32_t>(e);
      grp[best] = kMaskScore;
    }
  }
}

}  // namespace moge

#endif  // MOGE_GATING_TILING_MATH_H
