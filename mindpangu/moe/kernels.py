"""The MoE kernels as MindSpore ops: the gating and dispatch C++ kernels (``ops/cpu/moe_kernels.cc``) as aot ops
with bprops (the library build and the op wrapper are in ``mindpangu/kernels.py``), and the Ascend C MoGE gating
operator (``ops/ascendc/moge_gating``, built and installed on a CANN host)."""
from __future__ import annotations

import glob
import os
from typing import Optional

import numpy as np
import mindspore as ms
from mindspore import Tensor, ops
from mindspore.ops import CustomRegOp, DataType

from ..kernels import custom_op as _custom


def gating_config(moge: bool, sigmoid: bool, normalise: bool, scale: float, groups: int) -> Tensor:
    """The kernel's config vector {moge, sigmoid, normalise, scale, groups}."""
    return Tensor(np.array([moge, sigmoid, normalise, scale, groups], np.float32))


def make_gating(top_k: int):
    """(logits [T,E], bias [E], config [5]) -> (weights [T,K], indices [T,K] i32, scores [T,E], counts [E] i32)."""
    grad = _custom("MoeGatingGrad", lambda s, i, dw, ds, c: s, ms.float32)

    def bprop(logits, bias, config, out, dout):
        d_logits = grad(out[2], out[1], dout[0], dout[2], config)
        return d_logits, ops.zeros_like(bias), ops.zeros_like(config)

    return _custom("MoeGating", lambda x, b, c: ((x[0], top_k), (x[0], top_k), x, (x[1],)),
                   (ms.float32, ms.int32, ms.float32, ms.int32), bprop, top_k=top_k)


def make_permute(num_experts: int):
    """(x [T,H], indices [T,K]) -> (permuted [S,H], slot_of_row [R] i32, block_expert [B] i32, counts [E] i32).

    The layout is the reference ``permute_plan``'s: segments padded to ``block_size(R, E)`` rows, S = B * block.
    """
    from .token_dispatcher import block_size

    def shapes(x, i):
        rows = i[0] * i[1]
        block = block_size(rows, num_experts)
        blocks = -(-rows // block) + num_experts
        return (blocks * block, x[1]), (rows,), (blocks,), (num_experts,)

    grad = _custom("MoePermuteGrad", lambda d, s, x: x, ms.float32)

    def bprop(x, indices, out, dout):
        return grad(dout[0], out[1], x), ops.zeros_like(indices)

    return _custom("MoePermute", shapes, (ms.float32, ms.int32, ms.int32, ms.int32), bprop, num_experts=num_experts)


def make_unpermute():
    """(expert outputs [S,H], slot_of_row [R] i32, weights [T,K]) -> y [T,H] = sum_k weights * outputs[slot]."""
    grad = _custom("MoeUnpermuteGrad", lambda dy, ys, s, w: (ys, w), (ms.float32, ms.float32))

    def bprop(ys, slot, weights, out, dout):
        d_ys, d_weights = grad(dout, ys, slot, weights)
        return d_ys, ops.zeros_like(slot), d_weights

    return _custom("MoeUnpermute", lambda ys, s, w: (w[0], ys[1]), ms.float32, bprop)


def make_row_experts():
    """(x [T,H], weights [T,K], indices [T,K] i32, gate [E,I,H], up [E,I,H], down [E,H,I] [, shared gate [S,H],
    up [S,H], down [H,S]]) -> y [T,H]: the routed SwiGLU experts row by row, reading expert weights in place, plus
    the shared expert when its weights are given (``MoeRowExperts``; cached decode, forward only)."""
    return _custom("MoeRowExperts", lambda x, *rest: x, ms.float32)


def make_grouped_swiglu():
    """(xs [S,H] block-padded rows, block_expert [B] i32, tokens_per_expert [E] i32, gate [E,I,H], up [E,I,H],
    down [E,H,I]) -> (y [S,H], gate(x) [S,I], up(x) [S,I]): the routed SwiGLU experts over ``MoePermute``'s layout,
    each expert's rows against its weights in place, padding rows skipped (zero) (``MoeGroupedSwiGLU``,
    ``ops/cpu/expert_kernels.cc``). The bprop (``MoeGroupedSwiGLUGrad``) gives d xs and the three weight
    gradients from the saved gate(x) and up(x)."""
    grad = _custom("MoeGroupedSwiGLUGrad", lambda dy, xs, be, c, wg, wu, wd, g, u: (xs, wg, wu, wd),
                   (ms.float32, ms.float32, ms.float32, ms.float32))

    def bprop(xs, block_expert, counts, wg, wu, wd, out, dout):
        dxs, dwg, dwu, dwd = grad(dout[0], xs, block_expert, counts, wg, wu, wd, out[1], out[2])
        return dxs, ops.zeros_like(block_expert), ops.zeros_like(counts), dwg, dwu, dwd

    return _custom("MoeGroupedSwiGLU", lambda xs, be, c, wg, wu, wd: (xs, (xs[0], wg[1]), (xs[0], wg[1])),
                   (ms.float32, ms.float32, ms.float32), bprop)


MOGE_GATING = "MogeGating"


def moge_gating_reg_info():
    """Registration of the Ascend C ``MogeGating`` op; the names match its OpDef (``op_host/moge_gating.cpp``)
    exactly: inputs logits [T, E] and router_scale [E] float32, outputs weights [T, K] float32 and indices [T, K]
    int32, attributes num_groups and top_k (given as call-time scalars: no default value is registered)."""
    return (CustomRegOp(MOGE_GATING)
            .input(0, "logits", "required")
            .input(1, "router_scale", "required")
            .output(0, "weights", "required")
            .output(1, "indices", "required")
            .attr("num_groups", "required", "int")
            .attr("top_k", "required", "int")
            .dtype_format(DataType.F32_Default, DataType.F32_Default, DataType.F32_Default, DataType.I32_Default)
            .target("Ascend")
            .get_op_info())


def make_moge_gating(top_k: int):
    """The Ascend C MoGE gating op (``ops/ascendc/moge_gating``; Ascend only, built and installed first):
    ``op(logits [T, E], router_scale [E], num_groups, top_k) -> (weights [T, K] float32, indices [T, K] int32)``.

    weights = softmax(logits)[t, idx] * router_scale[idx] without renormalisation; indices are global expert ids,
    the M groups of E/M experts in order, descending score inside a group, ties to the lower id (the CPU kernel's
    rule). Forward only: its bprop is zero, so in training it picks the experts and the differentiable weights come
    from the scores (``Router.select``). ``Custom(func_type="aot")`` on Ascend reads the op's ``aclnnMogeGating``
    signature from the installed package (``ASCEND_CUSTOM_OPP_PATH``); without it, from the registration above.
    Under semi-auto parallel it is a self-defined-shard op: ``parallelize`` gives it a layout.
    """

    def no_gradient(logits, router_scale, num_groups, k, out, dout):
        return ops.zeros_like(logits), ops.zeros_like(router_scale), 0, 0

    return ops.Custom(MOGE_GATING, out_shape=lambda logits, *_: ((logits[0], top_k), (logits[0], top_k)),
                      out_dtype=(ms.float32, ms.int32), func_type="aot", bprop=no_gradient,
                      reg_info=moge_gating_reg_info())


def moge_gating_header() -> Optional[str]:
    """The installed ``MogeGating`` package's ``aclnn_moge_gating.h``, looked up where MindSpore's Custom op looks
    (``ASCEND_CUSTOM_OPP_PATH`` entries, then ``$ASCEND_OPP_PATH/vendors/*``, each under ``op_api/include``), or
    None when the op is not installed."""
    roots = [p for p in os.environ.get("ASCEND_CUSTOM_OPP_PATH", "").split(":") if p]
    if os.environ.get("ASCEND_OPP_PATH"):
        roots += sorted(glob.glob(os.path.join(os.environ["ASCEND_OPP_PATH"], "vendors", "*")))
    for root in roots:
        header = os.path.join(root, "op_api", "include", "aclnn_moge_gating.h")
        if os.path.isfile(header):
            return header
    return None
