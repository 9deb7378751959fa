"""The MoE feed-forward block: router -> token dispatcher -> grouped experts -> combine, + shared expert."""
from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.ops.operations import Morph

from ..config.schema import MoEConfig
from ..kernels import resolve_kernels
from ..layers import SwiGLU
from .experts import GroupedExperts
from .router import Router
from .token_dispatcher import build_dispatcher, resolve_backend


def _tokens_shape(*shapes):
    """``Morph``'s shape inference for the routed experts: the output is shaped like the tokens [T, H]."""
    return shapes[0]


def _float32(*dtypes):
    """``Morph``'s dtype inference for the routed experts: the combine is float32."""
    return ms.float32


class MoELayer(nn.Cell):
    """out = sum_k w_k * expert_k(x) + shared(x). Parameter names follow HF: gate, experts, shared_experts,
    and Pro MoE's ``router_scale [1, E]`` (initialised to 1), which multiplies the chosen weights. The token
    dispatcher (no parameters) is the one ``cfg.dispatch_backend`` resolves to (``token_dispatcher.py``).

    ``shared_name`` is the attribute holding the shared expert: ``shared_experts`` (DeepSeek / openPangu Ultra
    MoE) or ``shared_expert`` (Pangu Pro MoE). ``decode_backend`` (``model.decode_backend``) picks how
    :meth:`decode` runs the routed experts. ``dynamic``: token counts known only at run time
    (``model.dynamic_shapes``).

    With the ``ascend`` dispatch backend the dispatch, the grouped experts and the combine run as one function of
    one rank's tokens (:meth:`local_routed_experts`), wrapped in GRAPH mode in a ``Morph`` primitive
    (``routed_experts_op``) whose layout ``parallelize`` sets: semi-auto parallel then hands each rank its tokens
    and its experts' weights and leaves the all-to-all inside to the dispatcher (mindformers' ``FFNGroupedGEMM``).
    """

    def __init__(self, hidden: int, cfg: MoEConfig, compute_dtype: str = "float32",
                 shared_name: str = "shared_experts", decode_backend: str = "reference", dynamic: bool = False):
        super().__init__()
        self.hidden = hidden
        self.backend = resolve_backend(cfg.dispatch_backend)
        self.gate = Router(hidden, cfg, self.backend)
        self.use_router_scale = cfg.router_scale
        if self.use_router_scale:
            self.router_scale = Parameter(Tensor(np.ones((1, cfg.num_experts), np.float32)), name="router_scale")
        self.token_dispatcher = build_dispatcher(self.backend, cfg.num_experts, cfg.dispatch_block_size, dynamic,
                                                 hidden, cfg.num_experts_per_tok, compute_dtype)
        self.experts = GroupedExperts(cfg.num_experts, hidden, cfg.intermediate_size, compute_dtype,
                                      grouped_kernel=self.backend == "cpu_kernel")
        self.routed_experts_op = None
        if self.backend == "ascend" and ms.get_context("mode") == ms.GRAPH_MODE:  # Morph runs in GRAPH mode only
            self.routed_experts_op = Morph(self.local_routed_experts, _tokens_shape, _float32).add_prim_attr(
                "self_define_shard", True)
        self.row_experts = None
        if resolve_kernels(decode_backend, "model.decode_backend") == "cpu_kernel" and compute_dtype == "float32":
            from .kernels import make_row_experts

            self.row_experts = make_row_experts()
        shared = cfg.shared_expert_intermediate_size or cfg.num_shared_experts * cfg.intermediate_size
        self.has_shared = cfg.num_shared_experts > 0
        self.shared_name = shared_name
        if self.has_shared:
            setattr(self, shared_name, SwiGLU(hidden, shared, compute_dtype))

    def route(self, flat):
        """Tokens [T, H] -> (weights [T, K] (x router_scale), indices [T, K], scores, logits, counts)."""
        weights, indices, scores, logits, counts = self.gate(flat)
        if self.use_router_scale:
            weights = weights * ops.gather(self.router_scale.reshape(-1), indices, 0)
        return weights, indices, scores, logits, counts

    def routed_experts(self, flat, weights, indices):
        """Tokens [T, H], weights [T, K] float32, indices [T, K] int32 -> sum_k weights * expert_k(token) [T, H]."""
        if self.backend == "ascend":
            e = self.experts
            if self.routed_experts_op is not None:
                return self.routed_experts_op(flat, weights, indices, e.gate_proj, e.up_proj, e.down_proj)
            return self.local_routed_experts(flat, weights, indices, e.gate_proj, e.up_proj, e.down_proj)
        xs, group_expert, slot_of_row, tokens_per_expert = self.token_dispatcher.dispatch(flat, indices)
        ys = self.experts(xs, group_expert, tokens_per_expert)
        return self.token_dispatcher.combine(ys, weights, slot_of_row)

    def local_routed_experts(self, flat, weights, indices, gate_proj, up_proj, down_proj):
        """:meth:`routed_experts` on one rank (the ``ascend`` backend): its tokens [T, H] float32, weights [T, K]
        float32 and indices [T, K] int32, and its experts' weights (gate/up [E / ep, I / etp, H], down
        [E / ep, H, I / etp]) -> [T, H] float32; the all-to-all is inside ``token_dispatcher``."""
        xs, _, state, tokens_per_expert = self.token_dispatcher.dispatch(flat, indices)
        ys = self.experts.grouped_gemm(xs, tokens_per_expert, gate_proj, up_proj, down_proj)
        return self.token_dispatcher.combine(ys, weights, state)

    def construct(self, x):
        """x [B, S, H] -> (y [B, S, H], (weights, indices, scores, logits, counts))."""
        b, s, h = x.shape
        flat = x.reshape(b * s, h)
        weights, indices, scores, logits, counts = self.route(flat)
        y = self.routed_experts(flat, weights, indices).reshape(b, s, h)
        if self.has_shared:
            y = y + getattr(self, self.shared_name)(x)
        return y, (weights, indices, scores, logits, counts)

    def decode(self, x):
        """x [B, Q, H] (a decode step's few tokens) -> y [B, Q, H], the same function as :meth:`construct`
        without the router outputs. With the row-experts kernel each (token,
        expert) pair reads its expert's weights in place instead of being dispatched into padded blocks, and the shared
        expert runs in the same kernel."""
        if self.row_experts is None:
            return self.construct(x)[0]
        b, s, h = x.shape
        flat = x.reshape(b * s, h)
        weights, indices, _, _, _ = self.route(flat)
        e = self.experts
        if not self.has_shared:
            return self.row_experts(flat, weights, indices, e.gate_proj, e.up_proj, e.down_proj).reshape(b, s, h)
        shared = getattr(self, self.shared_name)  # in the same kernel, as one more expert of weight 1
        return self.row_experts(flat, weights, indices, e.gate_proj, e.up_proj, e.down_proj, shared.gate_proj.weight,
                                shared.up_proj.weight, shared.down_proj.weight).reshape(b, s, h)
