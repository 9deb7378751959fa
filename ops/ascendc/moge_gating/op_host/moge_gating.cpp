// MogeGating host side: operator definition (OpDef), shape/dtype inference and tiling.
//
// Layout and registration calls follow CANN's Ascend C custom-op project as used by MindSpore's sample
// (mindspore tests/st/graph_kernel/custom/custom_ascendc/op_host/add_custom.cpp: OpDef, SetInferShape,
// AICore().SetTiling / AddConfig, OP_ADD, TilingData SaveToBuffer / SetDataSize, GetWorkspaceSizes), attributes as
// in CANN's MoeGatingTopKSoftmaxV2 definition (this->Attr("k").AttrType(REQUIRED).Int()), attribute reads in tiling
// as GetAttrs()->GetAttrPointer<int64_t>(i), and platform queries via platform_ascendc::PlatformAscendC
// (GetCoreNumAiv, GetCoreMemSize(CoreMemType::UB, ...), GetLibApiWorkSpaceSize).
//
// Inputs:  logits [T, E] float32, router_scale [E] float32.
// Attrs:   num_groups (M), top_k (K), K % M == 0, E % M == 0, K / M <= E / M.
// Outputs: weights [T, K] float32 = softmax(logits)[idx] * router_scale[idx] (no renormalisation),
//          indices [T, K] int32, groups in order, descending score inside a group, ties to the lower index.
#include "moge_gating_tiling.h"
#include "moge_gating_tiling_math.h"
#include "register/op_def_registry.h"
#include "tiling/platform/platform_ascendc.h"

namespace {
constexpr size_t kAttrNumGroups = 0;  // attribute indices follow the Attr() declaration order below
constexpr size_t kAttrTopK = 1;
}  // namespace

namespace optiling {
static ge::graphStatus TilingFunc(gert::TilingContext *context) {
  const gert::StorageShape *logitsShape = context->GetInputShape(0);
  const gert::StorageShape *scaleShape = context->GetInputShape(1);
  const gert::RuntimeAttrs *attrs = context->GetAttrs();
  if (logitsShape == nullptr || scaleShape == nullptr || attrs == nullptr) return ge::GRAPH_FAILED;
  const gert::Shape &shape = logitsShape->GetStorageShape();
  if (shape.GetDimNum() != 2) return ge::GRAPH_FAILED;
  const int64_t T = shape.GetDim(0), E = shape.GetDim(1);
  if (scaleShape->GetStorageShape().GetShapeSize() != E) return ge::GRAPH_FAILED;
  const int64_t *numGroups = attrs->GetAttrPointer<int64_t>(kAttrNumGroups);
  const int64_t *topK = attrs->GetAttrPointer<int64_t>(kAttrTopK);
  if (numGroups == nullptr || topK == nullptr) return ge::GRAPH_FAILED;

  auto platform = platform_ascendc::PlatformAscendC(context->GetPlatformInfo());
  uint64_t ubBytes = 0;
  platform.GetCoreMemSize(platform_ascendc::CoreMemType::UB, ubBytes);
  const int64_t coreNum = static_cast<int64_t>(platform.GetCoreNumAiv());  // a vector-only kernel
  const moge::MogeTiling t =
      moge::ComputeMogeTiling(T, E, *topK, *numGroups, coreNum, static_cast<int64_t>(ubBytes));
  if (t.status != moge::kOk) return ge::GRAPH_FAILED;

  MogeGatingTilingData tiling;
  tiling.set_totalTokens(static_cast<uint32_t>(t.totalTokens));
  tiling.set_numExperts(static_cast<uint32_t>(t.numExperts));
  tiling.set_topK(static_cast<uint32_t>(t.topK));
  tiling.set_numGroups(static_cast<uint32_t>(t.numGroups));
  tiling.set_groupSize(static_cast<uint32_t>(t.groupSize));
  tiling.set_topKPerGroup(static_cast<uint32_t>(t.topKPerGroup));
  tiling.set_groupPad(static_cast<uint32_t>(t.groupPad));
  tiling.set_rowLen(static_cast<uint32_t>(t.rowLen));
  tiling.set_topKPad(static_cast<uint32_t>(t.topKPad));
  tiling.set_blockDim(static_cast<uint32_t>(t.blockDim));
  tiling.set_tokensPerCore(static_cast<uint32_t>(t.tokensPerCore));
  tiling.set_lastCoreTokens(static_cast<uint32_t>(t.lastCoreTokens));
  tiling.set_tileRows(static_cast<uint32_t>(t.tileRows));
  tiling.set_workElems(static_cast<uint32_t>(t.workElems));

  context->SetBlockDim(static_cast<uint32_t>(t.blockDim));
  tiling.SaveToBuffer(context->GetRawTilingData()->GetData(), context->GetRawTilingData()->GetCapacity());
  context->GetRawTilingData()->SetDataSize(tiling.GetDataSize());
  size_t *workspace = context->GetWorkspaceSizes(1);
  workspace[0] = platform.GetLibApiWorkSpaceSize();  // system workspace only; the kernel uses none of its own
  return ge::GRAPH_SUCCESS;
}
}  // namespace optiling

namespace ge {
static ge::graphStatus InferShape(gert::InferShapeContext *context) {
  const gert::Shape *logits = context->GetInputShape(0);
  const gert::RuntimeAttrs *attrs = context->GetAttrs();
  if (logits == nullptr || attrs == nullptr || logits->GetDimNum() != 2) return GRAPH_FAILED;
  const int64_t *topK = attrs->GetAttrPointer<int64_t>(kAttrTopK);
  if (topK == nullptr) return GRAPH_FAILED;
  for (size_t i = 0; i < 2; ++i) {  // weights and indices: [T, K]
    gert::Shape *out = context->GetOutputShape(i);
    out->SetDimNum(2);
    out->SetDim(0, logits->GetDim(0));
    out->SetDim(1, *topK);
  }
  return GRAPH_SUCCESS;
}

static ge::graphStatus InferDataType(gert::InferDataTypeContext *context) {
  context->SetOutputDataType(0, ge::DT_FLOAT);
  context->SetOutputDataType(1, ge::DT_INT32);
  return GRAPH_SUCCESS;
}
}  // namespace ge

namespace ops {
class MogeGating : public OpDef {
 public:
  explicit MogeGating(const char *name) : OpDef(name) {
    this->Input("logits")
        .ParamType(REQUIRED)
        .DataType({ge::DT_FLOAT})
        .Format({ge::FORMAT_ND})
        .UnknownShapeFormat({ge::FORMAT_ND});
    this->Input("router_scale")
        .ParamType(REQUIRED)
        .DataType({ge::DT_FLOAT})
        .Format({ge::FORMAT_ND})
        .UnknownShapeFormat({ge::FORMAT_ND});
    this->Output("weights")
        .ParamType(REQUIRED)
        .DataType({ge::DT_FLOAT})
        .Format({ge::FORMAT_ND})
        .UnknownShapeFormat({ge::FORMAT_ND});
    this->Output("indices")
        .ParamType(REQUIRED)
        .DataType({ge::DT_INT32})
        .Format({ge::FORMAT_ND})
        .UnknownShapeFormat({ge::FORMAT_ND});
    this->Attr("num_groups").AttrType(REQUIRED).Int();
    this->Attr("top_k").AttrType(REQUIRED).Int();

    this->SetInferShape(ge::InferShape).SetInferDataType(ge::InferDataType);
    this->AICore().SetTiling(optiling::TilingFunc);
    this->AICore().AddConfig("ascend910b");  // Atlas A2 (910B), the target of the UB budget in the tiling math
  }
};

OP_ADD(MogeGating);
}  // namespace ops
