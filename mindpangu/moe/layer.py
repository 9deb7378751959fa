"""The MoE feed-forward block: router -> dropless routed experts -> + shared expert."""
from __future__ import annotations

from mindspore import nn

from ..config.schema import MoEConfig
from ..layers import SwiGLU
from .dispatch import GroupedExperts
from .router import Router


class MoELayer(nn.Cell):
    """out = sum_k w_k * expert_k(x) + shared(x). Parameter names follow HF: gate, experts, shared_experts.

    ``shared_name`` is the attribute holding the shared expert: ``shared_experts`` (DeepSeek / openPangu Ultra
    MoE) or ``shared_expert`` (Pangu Pro MoE).
    """

    def __init__(self, hidden: int, cfg: MoEConfig, compute_dtype: str = "float32",
                 shared_name: str = "shared_experts"):
        super().__init__()
        self.hidden = hidden
        self.gate = Router(hidden, cfg)
        self.experts = GroupedExperts(cfg.num_experts, hidden, cfg.intermediate_size, compute_dtype)
        shared = cfg.shared_expert_intermediate_size or cfg.num_shared_experts * cfg.intermediate_size
        self.has_shared = cfg.num_shared_experts > 0
        self.shared_name = shared_name
        if self.has_shared:
            setattr(self, shared_name, SwiGLU(hidden, shared, compute_dtype))

    def construct(self, x):
        """x [B, S, H] -> (y [B, S, H], (weights, indices, scores, logits, counts))."""
        b, s, h = x.shape
        flat = x.reshape(b * s, h)
        weights, indices, scores, logits, counts = self.gate(flat)
        y = self.experts(flat, weights, indices)
        if self.has_shared:
            y = y + getattr(self, self.shared_name)(flat)
        return y.reshape(b, s, h), (weights, indices, scores, logits, counts)
