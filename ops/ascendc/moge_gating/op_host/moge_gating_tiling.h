// Tiling data of MogeGating, passed from the host TilingFunc to the kernel (GET_TILING_DATA).
// Macros as in CANN's custom-op projects (register/tilingdata_base.h; e.g. the AddCustom sample in
// mindspore tests/st/graph_kernel/custom/custom_ascendc and Ascend/samples operator/ascendc/0_introduction).
#ifndef MOGE_GATING_TILING_H
#define MOGE_GATING_TILING_H
#include "register/tilingdata_base.h"

namespace optiling {
BEGIN_TILING_DATA_DEF(MogeGatingTilingData)
  TILING_DATA_FIELD_DEF(uint32_t, totalTokens);     // T
  TILING_DATA_FIELD_DEF(uint32_t, numExperts);      // E
  TILING_DATA_FIELD_DEF(uint32_t, topK);            // K
  TILING_DATA_FIELD_DEF(uint32_t, numGroups);       // M
  TILING_DATA_FIELD_DEF(uint32_t, groupSize);       // E / M
  TILING_DATA_FIELD_DEF(uint32_t, topKPerGroup);    // K / M
  TILING_DATA_FIELD_DEF(uint32_t, groupPad);        // alignUp(E / M, 8): group stride in a UB row
  TILING_DATA_FIELD_DEF(uint32_t, rowLen);          // M * groupPad: floats per token row in UB
  TILING_DATA_FIELD_DEF(uint32_t, topKPad);         // alignUp(K, 8): floats per output row in UB
  TILING_DATA_FIELD_DEF(uint32_t, blockDim);        // cores used
  TILING_DATA_FIELD_DEF(uint32_t, tokensPerCore);   // tokens of cores 0 .. blockDim - 2
  TILING_DATA_FIELD_DEF(uint32_t, lastCoreTokens);  // tokens of core blockDim - 1
  TILING_DATA_FIELD_DEF(uint32_t, tileRows);        // tokens per loop
  TILING_DATA_FIELD_DEF(uint32_t, workElems);       // floats of the ReduceMax/ReduceSum work buffer
END_TILING_DATA_DEF;

REGISTER_TILING_DATA_CLASS(MogeGating, MogeGatingTilingData)
}  // namespace optiling
#endif  // MOGE_GATING_TILING_H
