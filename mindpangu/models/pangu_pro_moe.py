"""Pangu Pro MoE (72B, 16.5B active): GQA attention with q/k/v/o biases and RoPE over the full head, pre-norm,
and a Mixture of Grouped Experts on every layer (global softmax, top-K/M per contiguous group of experts,
x learned router_scale, no renormalisation) plus 4 shared experts merged into one SwiGLU.

Parameter names follow the Pangu Pro MoE Hugging Face checkpoint (``model.layers.N.self_attn.q_proj``,
``mlp.gate``, ``mlp.router_scale``, ``mlp.shared_expert`` ...), routed experts stacked as in Ultra MoE.
"""
from __future__ import annotations

from mindspore import nn, ops

from ..config.schema import ModelConfig
from ..layers import Linear, Rotary, attention_probs, causal_mask
from .decoder import CausalLM


class GQAttention(nn.Cell):
    """Grouped-query attention: num_attention_heads query heads share num_key_value_heads key/value heads."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, dt, bias = cfg.hidden_size, cfg.compute_dtype, cfg.attention_bias
        self.n_heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads or cfg.num_attention_heads
        self.head_dim = cfg.head_dim or h // cfg.num_attention_heads
        self.q_proj = Linear(h, self.n_heads * self.head_dim, bias, dt)
        self.k_proj = Linear(h, self.kv_heads * self.head_dim, bias, dt)
        self.v_proj = Linear(h, self.kv_heads * self.head_dim, bias, dt)
        self.o_proj = Linear(self.n_heads * self.head_dim, h, bias, dt)
        self.rotary = Rotary(self.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_interleave)
        self.scale = self.head_dim ** -0.5

    def construct(self, x):
        b, s, _ = x.shape
        kv, rep, d = self.kv_heads, self.n_heads // self.kv_heads, self.head_dim
        positions = ops.arange(0, s)
        q = self.rotary(self.q_proj(x).reshape(b, s, self.n_heads, d).transpose(0, 2, 1, 3), positions)
        k = self.rotary(self.k_proj(x).reshape(b, s, kv, d).transpose(0, 2, 1, 3), positions)
        v = self.v_proj(x).reshape(b, s, kv, d).transpose(0, 2, 1, 3)
        q = q.reshape(b, kv, rep, s, d)  # query head i uses key/value head i // rep
        scores = ops.matmul(q, k.reshape(b, kv, 1, s, d).transpose(0, 1, 2, 4, 3)) * self.scale
        probs = attention_probs(scores, causal_mask(s, s))
        out = ops.matmul(probs, v.reshape(b, kv, 1, s, d)).reshape(b, self.n_heads, s, d)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(b, s, self.n_heads * d))


class PanguProMoEForCausalLM(CausalLM):
    """Pangu Pro MoE causal LM (GQA attention; ``mlp.shared_expert`` naming)."""

    ATTENTION = GQAttention
    SHARED_EXPERT = "shared_expert"
