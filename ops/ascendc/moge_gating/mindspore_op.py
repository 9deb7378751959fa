"""MindSpore registration of the MogeGating Ascend C operator (``ops.Custom(func_type="aot")`` on Ascend).

Not built or run on hardware (no CANN/NPU on the development machines); the calls follow MindSpore's Ascend C
tutorial and its sample ``tests/st/graph_kernel/custom/custom_ascendc`` (``ops.Custom("AddCustom", out_shape,
out_dtype, func_type="aot", reg_info=CustomRegOp("AddCustom")...target("Ascend"))``). Build and install the
operator first (``build.sh``, then the ``.run`` package or ``ASCEND_CUSTOM_OPP_PATH``).

Names must match the OpDef in ``op_host/moge_gating.cpp`` exactly: op ``MogeGating``, inputs ``logits`` and
``router_scale``, outputs ``weights`` and ``indices``, attributes ``num_groups`` and ``top_k``. The attributes are
registered without a value, so MindSpore takes them from the call's trailing scalar arguments
(``CustomRegOp.attr``: a required attribute gets its value "either by setting a default value in the registration
information or providing an input value when calling the Custom operator").

Forward only (no bprop): it replaces ``Router.route`` + the layer's ``router_scale`` gather for inference. The
per-expert counts and the full score matrix [T, E] that the balance losses use are not produced; compute counts
with ``mindpangu.moe.router.expert_counts`` (or ``mindspore.ops.moe_init_routing_v2``'s expert-token counts).
"""
from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops
from mindspore.ops import CustomRegOp, DataType

OP_NAME = "MogeGating"


def moge_gating_reg_info():
    """Registration info: float32 logits [T, E] and router_scale [E] -> float32 weights, int32 indices [T, K]."""
    return (CustomRegOp(OP_NAME)
            .input(0, "logits", "required")
            .input(1, "router_scale", "required")
            .output(0, "weights", "required")
            .output(1, "indices", "required")
            .attr("num_groups", "required", "int")
            .attr("top_k", "required", "int")
            .dtype_format(DataType.F32_Default, DataType.F32_Default, DataType.F32_Default, DataType.I32_Default)
            .target("Ascend")
            .get_op_info())


class MogeGating(nn.Cell):
    """``weights, indices = MogeGating(M, K)(logits, router_scale)``.

    weights [T, K] = softmax(logits)[t, idx] * router_scale[idx], no renormalisation; indices [T, K] int32 are
    global expert ids, the M groups of E/M experts in order, descending score inside a group, ties to the lower id.
    """

    def __init__(self, num_groups: int, top_k: int):
        super().__init__()
        if top_k % num_groups:
            raise ValueError(f"top_k={top_k} must be divisible by num_groups={num_groups}")
        self.num_groups, self.top_k = num_groups, top_k
        self.op = ops.Custom(OP_NAME,
                             out_shape=lambda logits, *_: ((logits[0], top_k), (logits[0], top_k)),
                             out_dtype=(ms.float32, ms.int32),
                             func_type="aot", bprop=None, reg_info=moge_gating_reg_info())

    def construct(self, logits, router_scale):
        return self.op(logits, router_scale, self.num_groups, self.top_k)
