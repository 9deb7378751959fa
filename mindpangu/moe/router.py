"""Routers: top-k over all experts (Pangu Ultra MoE) and Mixture of Grouped Experts (Pangu Pro MoE).

Both compute scores in float32 and return what the balance losses and metrics need:
``weights [T, K]``, ``indices [T, K]`` (int32), ``scores [T, E]`` (sigmoid or global softmax, before top-k),
``logits [T, E]`` (for the z-loss) and ``counts [E]`` (tokens per expert, before any capacity drop).
"""
from __future__ import annotations

import math

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from ..config.schema import MoEConfig


def expert_counts(indices, num_experts: int):
    """Tokens routed to each expert: [T, K] int -> [E] int32."""
    onehot = ops.one_hot(indices.reshape(-1), num_experts, Tensor(1, ms.int32), Tensor(0, ms.int32))
    return onehot.sum(0)


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Megatron's per-expert capacity (``moe_utils.get_capacity``): ceil(T * K * capacity_factor / E), at most
    T (a token picks an expert at most once)."""
    return min(num_tokens, math.ceil(num_tokens * top_k * capacity_factor / num_experts))


def capacity_keep(weights, indices, num_experts: int, capacity: int):
    """Drop-and-pad: which routed (token, expert) pairs each expert keeps under ``capacity``.

    weights [T, K] float32 (the priority: Megatron's ``probs`` drop policy keeps the largest routing weights),
    indices [T, K] int32 -> keep [T, K] float32 (1 kept, 0 dropped). An expert with at most ``capacity`` pairs
    keeps them all; otherwise it keeps the ``capacity`` largest (pairs of exactly equal weight at the threshold
    are all kept). Weights must be >= 0 (sigmoid / softmax scores are)."""
    t, k = indices.shape
    onehot = ops.one_hot(indices.reshape(-1), num_experts, Tensor(1.0, ms.float32), Tensor(0.0, ms.float32))
    # [E, T*K]: each pair's weight in its expert's row, -1 elsewhere
    key = (onehot * (ops.stop_gradient(weights).reshape(-1, 1) + 1.0) - 1.0).transpose(1, 0)
    threshold = ops.topk(key, capacity)[0][:, capacity - 1]  # [E]: the capacity-th largest of each expert
    kept = key >= threshold.reshape(-1, 1)
    return (ops.cast(kept, ms.float32) * onehot.transpose(1, 0)).sum(0).reshape(t, k)


class Router(nn.Cell):
    """Gate ``weight [E, hidden]`` (HF name ``mlp.gate.weight``) plus the routing rule of ``cfg.router``.

    topk: scores = sigmoid|softmax(logits); top-K over scores (+ expert bias for selection only); weights are
    the chosen scores, optionally renormalised to sum 1, times routed_scaling_factor.
    moge: scores = softmax over all E experts; view [T, M, E/M]; top-K/M per group; weights = chosen scores,
    no renormalisation (the MoE layer then multiplies Pro MoE's learned router_scale[expert]).

    ``backend`` (the resolved ``moe.dispatch_backend``): 'cpu_kernel' routes in one C++ kernel; 'ascend' picks the
    experts with one ``TopK`` (ties in the kernel's own order, not the lowest index) or, for MoGE without an expert
    bias, with the Ascend C ``MogeGating`` op (``moe/kernels.py``; MindSpore ships no fused gating with MoGE's
    per-group top-k, nor with sigmoid scores and renormalisation); the weights stay differentiable gathers of the
    scores. Otherwise composite ops.
    """

    def __init__(self, hidden: int, cfg: MoEConfig, backend: str = "reference"):
        super().__init__()
        self.cfg = cfg
        self.num_experts, self.top_k = cfg.num_experts, cfg.num_experts_per_tok
        self.weight = Parameter(Tensor(np.zeros((cfg.num_experts, hidden), np.float32)), name="weight")
        self.matmul = ops.MatMul(transpose_b=True)  # a primitive, so mindpangu.parallel can shard it
        self.use_bias = cfg.balance_loss.expert_bias.enabled
        if self.use_bias:
            self.e_score_correction_bias = Parameter(Tensor(np.zeros((cfg.num_experts,), np.float32)),
                                                     name="e_score_correction_bias", requires_grad=False)
        self.moge = cfg.router == "moge"
        self.groups = cfg.num_groups
        self.per_group = cfg.num_experts // cfg.num_groups
        self.k_per_group = cfg.num_experts_per_tok // cfg.num_groups
        self.softmax_scores = cfg.score_function == "softmax"
        self.normalise = cfg.norm_topk_prob
        self.scaling = cfg.routed_scaling_factor
        if self.moge:
            offsets = np.arange(cfg.num_groups, dtype=np.int32).reshape(1, -1, 1) * self.per_group
            self.group_offsets = Tensor(offsets)
        self.capacity_factor = cfg.capacity_factor
        self.argmax = ops.Argmax(-1, ms.int32)
        self.on, self.off = Tensor(1, ms.int32), Tensor(0, ms.int32)
        self.topk = ops.TopK(sorted=True) if backend == "ascend" else None
        self.moge_gating = None
        if backend == "ascend" and cfg.uses_moge_gating_op:
            from .kernels import make_moge_gating

            self.moge_gating = make_moge_gating(self.top_k)
            self.unit_scale = Tensor(np.ones((cfg.num_experts,), np.float32))  # the layer applies router_scale
        self.use_kernel = backend == "cpu_kernel"
        if self.use_kernel:
            from .kernels import gating_config, make_gating

            self.kernel = make_gating(self.top_k)
            self.kernel_config = gating_config(self.moge, not self.softmax_scores, self.normalise, self.scaling,
                                               self.groups)
            self.no_bias = Tensor(np.zeros((cfg.num_experts,), np.float32))

    def construct(self, x):
        logits = self.matmul(x.astype(ms.float32), self.weight.astype(ms.float32))  # [T, E]
        return self.route(logits)

    def top_k_indices(self, values, k: int):
        """Indices [..., k] int32 of the k largest of ``values`` [..., n] along the last axis, largest first, equal
        values to the lower index: the rule of the C++ gating kernel (ops/cpu/moe_kernels.cc: topk_desc) and of
        fused serving kernels. k rounds of argmax (the first maximum) masking each pick, because TopK's order among
        ties is unspecified (MindSpore's CPU TopK picked experts 6 and 5 of 8 equal scores)."""
        picks = []
        for _ in range(k):
            pick = self.argmax(values)  # [...] int32
            picks.append(ops.expand_dims(pick, -1))
            taken = ops.one_hot(pick, values.shape[-1], self.on, self.off) > 0
            values = ops.masked_fill(values, taken, float("-inf"))
        return ops.concat(picks, -1)  # (Stack of 1-D picks fails semi-auto parallel's operator init on Ascend)

    def route(self, logits):
        """Router logits [T, E] -> (weights, indices, scores, logits, counts); under ``capacity_factor`` the
        weights of dropped pairs are 0 (``capacity_keep``)."""
        weights, indices, scores, counts = self.select(logits)
        if self.capacity_factor is not None:
            capacity = expert_capacity(logits.shape[0], self.top_k, self.num_experts, self.capacity_factor)
            weights = weights * capacity_keep(weights, indices, self.num_experts, capacity)
        return weights, indices, scores, logits, counts

    def select(self, logits):
        """Router logits [T, E] -> (weights, indices, scores, counts): the routing rule, without capacity."""
        if self.use_kernel:
            bias = self.e_score_correction_bias if self.use_bias else self.no_bias
            return self.kernel(logits, bias, self.kernel_config)
        scores = ops.softmax(logits, -1) if self.softmax_scores else ops.sigmoid(logits)
        choice = scores
        if self.use_bias:
            choice = scores + self.e_score_correction_bias
        choice = ops.stop_gradient(choice)
        if self.moge_gating is not None:  # softmax is monotone: the op's per-group top-k of it is the logits'
            indices = self.moge_gating(ops.stop_gradient(logits), self.unit_scale, self.groups, self.top_k)[1]
        elif self.moge and self.topk is not None:
            t = logits.shape[0]
            local = self.topk(choice.reshape(t, self.groups, self.per_group), self.k_per_group)[1]
            indices = (local.astype(ms.int32) + self.group_offsets).reshape(t, self.top_k)
        elif self.moge:
            t = logits.shape[0]
            grouped = choice.reshape(t, self.groups, self.per_group)
            local = self.top_k_indices(grouped, self.k_per_group)
            indices = (local + self.group_offsets).reshape(t, self.top_k)
        elif self.topk is not None:
            indices = self.topk(choice, self.top_k)[1].astype(ms.int32)
        else:
            indices = self.top_k_indices(choice, self.top_k)
        weights = ops.gather_elements(scores, 1, indices)
        if self.normalise:
            weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
        if self.scaling != 1.0:
            weights = weights * self.scaling
        return weights, indices, scores, expert_counts(indices, self.num_experts)
