// MogeGating AI Core kernel (Ascend C, vector only): MoGE routing of Pangu Pro MoE.
//
// Per token: softmax over all E experts in fp32 (ReduceMax, Adds(-max), Exp, ReduceSum, Muls(1/sum)); then in each
// of the M contiguous groups of E/M experts, top-(K/M) by repeated ReduceMax(calIndex = true), reading value and
// index after a V->S sync and masking the chosen score; weights = score * router_scale[expert], indices = expert.
// Same selection and order as MoeGating in ops/cpu/moe_kernels.cc for MoGE (softmax, no bias, no renormalisation,
// scale 1): groups in order, descending inside a group, ties to the lower index (CANN ReduceMax returns the first
// maximum). router_scale is fused here; the CPU path applies it in mindpangu/moe/layer.py instead.
//
// Structure (CopyIn / Compute / CopyOut over TQue with BUFFER_NUM = 2) follows the AddCustom sample
// (mindspore tests/st/graph_kernel/custom/custom_ascendc/op_kernel/add_custom.cpp). API usage checked against the
// CANN Ascend C reference: ReduceMax/ReduceSum (count form, sharedTmpBuffer, calIndex; index read with
// reinterpret_cast<uint32_t *>), DataCopyPad with DataCopyExtParams / DataCopyPadExtParams (GM side in bytes,
// UB blocks 32B-aligned), SetFlag/WaitFlag with FetchEventID (V_S, S_V, S_MTE3, MTE2_S).
// Not compiled here: no CANN toolkit on the development machines (see ops/ascendc/README.md).
#include "kernel_operator.h"

using namespace AscendC;

namespace {
constexpr int32_t BUFFER_NUM = 2;       // == moge::kBufferNum (op_host/moge_gating_tiling_math.h)
constexpr float PAD_LOGIT = -1.0e30f;  // == moge::kPadLogit: group padding, exp() gives 0
constexpr float MASK_SCORE = -1.0f;    // == moge::kMaskScore: below every softmax score
constexpr uint32_t FLOAT_BYTES = 4;
constexpr uint32_t REDUCE_ELEMS = 8;   // one 32-byte block for {value, index bits}

__aicore__ inline uint32_t AlignUp8(uint32_t n) { return (n + 7) / 8 * 8; }
}  // namespace

class KernelMogeGating {
 public:
  __aicore__ inline KernelMogeGating() {}

  __aicore__ inline void Init(GM_ADDR logits, GM_ADDR routerScale, GM_ADDR weights, GM_ADDR indices,
                              const MogeGatingTilingData &t) {
    E = t.numExperts;
    K = t.topK;
    M = t.numGroups;
    G = t.groupSize;
    kg = t.topKPerGroup;
    gPad = t.groupPad;
    rowLen = t.rowLen;
    kPad = t.topKPad;
    tileRows = t.tileRows;
    const uint32_t core = static_cast<uint32_t>(GetBlockIdx());
    const uint64_t first = static_cast<uint64_t>(core) * t.tokensPerCore;
    coreTokens = (core + 1 == t.blockDim) ? t.lastCoreTokens : t.tokensPerCore;

    logitsGm.SetGlobalBuffer((__gm__ float *)logits + first * E, static_cast<uint64_t>(coreTokens) * E);
    scaleGm.SetGlobalBuffer((__gm__ float *)routerScale, E);
    weightsGm.SetGlobalBuffer((__gm__ float *)weights + first * K, static_cast<uint64_t>(coreTokens) * K);
    indicesGm.SetGlobalBuffer((__gm__ int32_t *)indices + first * K, static_cast<uint64_t>(coreTokens) * K);

    // Sizes as in moge::ComputeMogeTiling, which checked that they fit the UB together.
    pipe.InitBuffer(inQueue, BUFFER_NUM, tileRows * rowLen * FLOAT_BYTES);
    pipe.InitBuffer(weightsQueue, BUFFER_NUM, tileRows * kPad * FLOAT_BYTES);
    pipe.InitBuffer(indicesQueue, BUFFER_NUM, tileRows * kPad * FLOAT_BYTES);
    pipe.InitBuffer(workBuf, t.workElems * FLOAT_BYTES);
    pipe.InitBuffer(reduceBuf, REDUCE_ELEMS * FLOAT_BYTES);
    pipe.InitBuffer(scaleBuf, AlignUp8(E) * FLOAT_BYTES);
  }

  __aicore__ inline void Process() {
    LoadScale();
    const uint32_t loops = (coreTokens + tileRows - 1) / tileRows;
    for (uint32_t i = 0; i < loops; ++i) {
      const uint32_t row0 = i * tileRows;
      const uint32_t rows = (coreTokens - row0 < tileRows) ? coreTokens - row0 : tileRows;
      CopyIn(row0, rows);
      Compute(rows);
      CopyOut(row0, rows);
    }
  }

 private:
  // router_scale is read by the scalar unit, so wait for the MTE2 copy before GetValue.
  __aicore__ inline void LoadScale() {
    LocalTensor<float> scale = scaleBuf.Get<float>();
    DataCopyExtParams copy{1, E * FLOAT_BYTES, 0, 0, 0};
    DataCopyPadExtParams<float> pad{false, 0, 0, 0.0f};
    DataCopyPad(scale, scaleGm, copy, pad);
    event_t ev = static_cast<event_t>(GetTPipePtr()->FetchEventID(HardEvent::MTE2_S));
    SetFlag<HardEvent::MTE2_S>(ev);
    WaitFlag<HardEvent::MTE2_S>(ev);
  }

  __aicore__ inline void CopyIn(uint32_t row0, uint32_t rows) {
    LocalTensor<float> x = inQueue.AllocTensor<float>();
    if (gPad == G) {  // groups already 32B-aligned: the tile is one contiguous block in GM and UB
      DataCopyExtParams copy{1, rows * E * FLOAT_BYTES, 0, 0, 0};
      DataCopyPadExtParams<float> pad{false, 0, 0, 0.0f};
      DataCopyPad(x, logitsGm[static_cast<uint64_t>(row0) * E], copy, pad);
    } else {  // one block per (token, group), contiguous in GM; in UB each block starts 32B-aligned and its
              // gPad - G tail slots (< 32 bytes) are filled with PAD_LOGIT
      DataCopyExtParams copy{static_cast<uint16_t>(rows * M), G * FLOAT_BYTES, 0, 0, 0};
      DataCopyPadExtParams<float> pad{true, 0, static_cast<uint8_t>(gPad - G), PAD_LOGIT};
      DataCopyPad(x, logitsGm[static_cast<uint64_t>(row0) * E], copy, pad);
    }
    inQueue.EnQue(x);
  }

  __aicore__ inline void Compute(uint32_t rows) {
    LocalTensor<float> x = inQueue.DeQue<float>();
    LocalTensor<float> w = weightsQueue.AllocTensor<float>();
    LocalTensor<int32_t> idx = indicesQueue.AllocTensor<int32_t>();
    LocalTensor<float> work = workBuf.Get<float>();
    LocalTensor<float> red = reduceBuf.Get<float>();
    LocalTensor<float> scale = scaleBuf.Get<float>();
    // Vector writes first, so that the queue's MTE3 -> V ordering also covers the scalar SetValue below
    // (every SetValue follows a V -> S sync); this also zeroes the row padding.
    Duplicate(w, 0.0f, static_cast<int32_t>(rows * kPad));
    Duplicate(idx, static_cast<int32_t>(0), static_cast<int32_t>(rows * kPad));
    const int32_t n = static_cast<int32_t>(rowLen);

    for (uint32_t r = 0; r < rows; ++r) {
      LocalTensor<float> row = x[r * rowLen];
      // softmax over the whole (padded) row, in place
      ReduceMax<float>(red, row, work, n, false);
      SyncVToS();
      const float rowMax = red.GetValue(0);
      Adds(row, row, -rowMax, n);
      PipeBarrier<PIPE_V>();
      Exp(row, row, n);
      PipeBarrier<PIPE_V>();
      ReduceSum<float>(red, row, work, n);
      SyncVToS();
      const float inv = 1.0f / red.GetValue(0);
      Muls(row, row, inv, n);
      PipeBarrier<PIPE_V>();

      for (uint32_t g = 0; g < M; ++g) {
        LocalTensor<float> grp = row[g * gPad];  // 32B-aligned: gPad is a multiple of 8 floats
        for (uint32_t i = 0; i < kg; ++i) {
          ReduceMax<float>(red, grp, work, static_cast<int32_t>(G), true);
          SyncVToS();
          const float score = red.GetValue(0);
          float indexBits = red.GetValue(1);  // the index is stored in the bits of a float
          const uint32_t local = *reinterpret_cast<uint32_t *>(&indexBits);
          const uint32_t expert = g * G + local;
          const uint32_t slot = r * kPad + g * kg + i;
          w.SetValue(slot, score * scale.GetValue(expert));
          idx.SetValue(slot, static_cast<int32_t>(expert));
          if (i + 1 < kg) {
            grp.SetValue(local, MASK_SCORE);
            SyncSToV();  // the next ReduceMax reads the masked score
          }
        }
      }
    }
    weightsQueue.EnQue(w);
    indicesQueue.EnQue(idx);
    inQueue.FreeTensor(x);
  }

  __aicore__ inline void CopyOut(uint32_t row0, uint32_t rows) {
    LocalTensor<float> w = weightsQueue.DeQue<float>();
    LocalTensor<int32_t> idx = indicesQueue.DeQue<int32_t>();
    SyncSToMte3();  // the outputs were written by SetValue; the queue only orders V -> MTE3
    // UB rows are topKPad floats apart; a burst reads a 32B-rounded length from UB, so with K % 8 != 0 each row is
    // one block with srcStride 0.
    DataCopyExtParams copy = (kPad == K) ? DataCopyExtParams{1, rows * K * FLOAT_BYTES, 0, 0, 0}
                                         : DataCopyExtParams{static_cast<uint16_t>(rows), K * FLOAT_BYTES, 0, 0, 0};
    DataCopyPad(weightsGm[static_cast<uint64_t>(row0) * K], w, copy);
    DataCopyPad(indicesGm[static_cast<uint64_t>(row0) * K], idx, copy);
    weightsQueue.FreeTensor(w);
    indicesQueue.FreeTensor(idx);
  }

  __aicore__ inline void SyncVToS() {
    event_t ev = static_cast<event_t>(GetTPipePtr()->FetchEventID(HardEvent::V_S));
    SetFlag<HardEvent::V_S>(ev);
    WaitFlag<HardEvent::V_S>(ev);
  }

  __aicore__ inline void SyncSToV() {
    event_t ev = static_cast<event_t>(GetTPipePtr()->FetchEventID(HardEvent::S_V));
    SetFlag<HardEvent::S_V>(ev);
    WaitFlag<HardEvent::S_V>(ev);
  }

  __aicore__ inline void SyncSToMte3() {
    event_t ev = static_cast<event_t>(GetTPipePtr()->FetchEventID(HardEvent::S_MTE3));
    SetFlag<HardEvent::S_MTE3>(ev);
    WaitFlag<HardEvent::S_MTE3>(ev);
  }

  TPipe pipe;
  TQue<QuePosition::VECIN, BUFFER_NUM> inQueue;
  TQue<QuePosition::VECOUT, BUFFER_NUM> weightsQueue, indicesQueue;
  TBuf<QuePosition::VECCALC> workBuf, reduceBuf, scaleBuf;
  GlobalTensor<float> logitsGm, scaleGm, weightsGm;
  GlobalTensor<int32_t> indicesGm;
  uint32_t E = 0, K = 0, M = 0, G = 0, kg = 0, gPad = 0, rowLen = 0, kPad = 0, tileRows = 0, coreTokens = 0;
};

// Parameter order: inputs, outputs, workspace, tiling (kernel name = snake_case of the OpDef type MogeGating).
extern "C" __global__ __aicore__ void moge_gating(GM_ADDR logits, GM_ADDR router_scale, GM_ADDR weights,
                                                  GM_ADDR indices, GM_ADDR workspace, GM_ADDR tiling) {
  GET_TILING_DATA(tilingData, tiling);
  if (GetBlockIdx() >= tilingData.blockDim) return;
  KernelMogeGating op;
  op.Init(logits, router_scale, weights, indices, tilingData);
  op.Process();
}
