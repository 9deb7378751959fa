"""Routed experts: SwiGLU FFNs with stacked weights, run as one batched matmul over groups of dispatched rows."""
from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.ops.auto_generate import GroupedMatmul, SiLU

from ..layers import ms_dtype


class GroupedExperts(nn.Cell):
    """Routed SwiGLU experts with stacked weights: gate_proj/up_proj [E, I, H], down_proj [E, H, I].

    The stacking is the HF per-expert ``experts.J.{gate,up,down}_proj.weight`` along a new first axis. The input
    comes from a token dispatcher (``token_dispatcher.py``) in groups of rows that each belong to one expert
    (Megatron's ``GroupedMLP`` / torchtitan's ``GroupedExperts``, with groups instead of ragged segments so that
    every shape is static).

    ``grouped_kernel`` (float32 only; the ``cpu_kernel`` dispatch backend): the C++ ``MoeGroupedSwiGLU`` op runs
    each expert's rows of the block-padded layout against its weights in place and skips the padding rows, instead
    of a batched matmul over every block against gathered copies of the weights. The ``ascend`` dispatch backend
    calls :meth:`grouped_gemm` instead (MindSpore's ``GroupedMatmul`` over ragged expert segments).
    """

    def __init__(self, num_experts: int, hidden: int, intermediate: int, compute_dtype: str = "float32",
                 grouped_kernel: bool = False):
        super().__init__()
        self.num_experts, self.hidden, self.intermediate = num_experts, hidden, intermediate
        self.gate_proj = Parameter(Tensor(np.zeros((num_experts, intermediate, hidden), np.float32)),
                                   name="gate_proj")
        self.up_proj = Parameter(Tensor(np.zeros((num_experts, intermediate, hidden), np.float32)), name="up_proj")
        self.down_proj = Parameter(Tensor(np.zeros((num_experts, hidden, intermediate), np.float32)),
                                   name="down_proj")
        # primitives, so mindpangu.parallel can shard them (experts over EP, the expert FFN over TP)
        self.bmm_gate, self.bmm_up, self.bmm_down = (ops.BatchMatMul(transpose_b=True) for _ in range(3))
        self.silu, self.mul = SiLU(), ops.Mul()
        self.cast_needed = compute_dtype != "float32"
        self.dtype = ms_dtype(compute_dtype)
        self.grouped = None
        if grouped_kernel and not self.cast_needed:
            from .kernels import make_grouped_swiglu

            self.grouped = make_grouped_swiglu()

    def construct(self, xs, group_expert=None, tokens_per_expert=None):
        """xs [G, M, H] float32, group_expert [G] int32 (the expert of each group), tokens_per_expert [E] int32
        (the real rows of each expert's segment; the grouped kernel needs them) -> [G, M, H] float32.

        ``group_expert`` None: group g is expert g (G = E, the expert-major layout), the weights are used as
        they are, so the expert axis can be sharded.
        """
        if group_expert is None:
            return self.expert_ffn(xs, self.gate_proj, self.up_proj, self.down_proj)
        if self.grouped is not None and tokens_per_expert is not None:
            g, m, h = xs.shape
            ys = self.grouped(xs.reshape(g * m, h), group_expert, tokens_per_expert, self.gate_proj, self.up_proj,
                              self.down_proj)[0]
            return ys.reshape(g, m, h)
        wg = ops.gather(self.gate_proj, group_expert, 0)
        wu = ops.gather(self.up_proj, group_expert, 0)
        wd = ops.gather(self.down_proj, group_expert, 0)
        return self.expert_ffn(xs, wg, wu, wd)

    def grouped_matmul(self, x, weight, group_list):
        """x [R, N], weight [G, N, M], group_list [G] int64 (cumulative rows: group g is rows
        group_list[g-1]:group_list[g]) -> [R, M], each group's rows times its weight. ``GroupedMatmul``
        (split_item 3, group_type 0: the form with a backward), Ascend."""
        return GroupedMatmul(split_item=3, group_type=0)([x], [weight], None, None, None, None, None, group_list)[0]

    def grouped_gemm(self, xs, tokens_per_expert, wg, wu, wd):
        """SwiGLU experts over ragged segments (the ``ascend`` dispatch; Megatron's ``GroupedMLP``).

        xs [R, H] rows grouped by expert (``compute_dtype``), tokens_per_expert [G] int32 rows of each of the G
        experts, weights gate/up [G, I', H], down [G, H, I'] (this rank's experts, I' = its slice of the
        intermediate dimension) -> [R, H] in xs's dtype (partial sums when I' < I). Gate and up run as one
        grouped matmul. The weights are stored as HF stacks them ([out, in] per expert), so they are transposed
        here: ``GroupedMatmul`` refuses ``transpose_b`` in MindSpore 2.10.
        """
        inter = wg.shape[1]
        group_list = ops.cumsum(tokens_per_expert, 0).astype(ms.int64)
        w_in = ops.concat((wg, wu), 1).astype(xs.dtype).transpose(0, 2, 1)  # [G, H, 2I']
        gate_up = self.grouped_matmul(xs, w_in, group_list)
        h = ops.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        return self.grouped_matmul(h, wd.astype(xs.dtype).transpose(0, 2, 1), group_list)

    def expert_ffn(self, xs, wg, wu, wd):
        """SwiGLU per batch entry: xs [N, M, H] with weights [N, I, H], [N, I, H], [N, H, I] -> [N, M, H] float32."""
        if self.cast_needed:
            xs, wg, wu, wd = xs.astype(self.dtype), wg.astype(self.dtype), wu.astype(self.dtype), wd.astype(self.dtype)
        h = self.mul(self.silu(self.bmm_gate(xs, wg)), self.bmm_up(xs, wu))
        return self.bmm_down(h, wd).astype(ms.float32)
