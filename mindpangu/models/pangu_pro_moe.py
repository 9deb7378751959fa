"""Pangu Pro MoE (72B, 16.5B active): GQA attention with q/k/v/o biases and RoPE over the full head, pre-norm,
and a Mixture of Grouped Experts on every layer (global softmax, top-K/M per contiguous group of experts,
x learned router_scale, no renormalisation) plus 4 shared experts merged into one SwiGLU.

Parameter names follow the Pangu Pro MoE Hugging Face checkpoint (``model.layers.N.self_attn.q_proj``,
``mlp.gate``, ``mlp.router_scale``, ``mlp.shared_expert`` ...), routed experts stacked as in Ultra MoE.
"""
from __future__ import annotations

import numpy as np
from mindspore import Tensor, nn, ops

from ..config.schema import ModelConfig
from ..kernels import make_gqa_decode, resolve_kernels
from ..layers import (CausalSoftmax, Linear, Rotary, attention_probs, cache_update, dynamic_range, positions_mask,
                      static_range)
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
        self.index_range = dynamic_range if cfg.dynamic_shapes else static_range
        self.causal_softmax = CausalSoftmax(self.scale, cfg.attention_backend, cfg.dynamic_shapes)

        self.cache_width = 2 * self.kv_heads * self.head_dim  # roped K then V, per token
        self.decode_kernel = resolve_kernels(cfg.decode_backend, "model.decode_backend") == "cpu_kernel"
        if self.decode_kernel:
            self.fused_decode = make_gqa_decode()
            self.decode_config = Tensor(np.array([self.n_heads, self.scale], np.float32))
            self.interleave = Tensor(np.array([float(cfg.rope_interleave)], np.float32))

    def project(self, x, positions):
        """-> q [B, kv, rep, S, d] (roped), k [B, kv, S, d] (roped), v [B, kv, S, d]."""
        b, s, _ = x.shape
        kv, d = self.kv_heads, self.head_dim
        q = self.rotary(self.q_proj(x).reshape(b, s, self.n_heads, d).transpose(0, 2, 1, 3), positions)
        k = self.rotary(self.k_proj(x).reshape(b, s, kv, d).transpose(0, 2, 1, 3), positions)
        v = self.v_proj(x).reshape(b, s, kv, d).transpose(0, 2, 1, 3)
        return q.reshape(b, kv, self.n_heads // kv, s, d), k, v  # query head i uses key/value head i // rep

    def attend(self, q, k, v, mask=None):
        """q [B, kv, rep, Q, d], k/v [B, kv, K, d], additive mask broadcasting to [B, kv, rep, Q, K] (None: causal)
        -> [B, Q, H]."""
        b, kv, _, q_len, d = q.shape
        scores = ops.matmul(q, k.expand_dims(2).transpose(0, 1, 2, 4, 3))
        probs = self.causal_softmax(scores) if mask is None else attention_probs(scores * self.scale, mask)
        out = ops.matmul(probs, v.expand_dims(2)).reshape(b, self.n_heads, q_len, d)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(b, q_len, self.n_heads * d))

    def construct(self, x):
        return self.prefill(x)[0]

    def prefill(self, x):
        """Causal attention over x [B, S, H] -> (output [B, S, H], cache entries [B, S, 2 * kv * d])."""
        b, s, _ = x.shape
        q, k, v = self.project(x, self.index_range(0, s))
        entries = ops.concat((k.transpose(0, 2, 1, 3).reshape(b, s, -1), v.transpose(0, 2, 1, 3).reshape(b, s, -1)), -1)
        return self.attend(q, k, v), entries

    def decode(self, x, positions, cache, index):
        """x [B, Q, H] at ``positions [B, Q]``; ``cache`` the K/V cache Parameter [B * M, 2 * kv * d], written in
        place at ``index`` (``layers.cache_index``) -> (output [B, Q, H], the cache). ``decode_backend``
        cpu_kernel runs RoPE and attention after the projections in one kernel (GqaDecode)."""
        b, q_len, _ = x.shape
        kv, d = self.kv_heads, self.head_dim
        if self.decode_kernel:
            out, entries = self.fused_decode(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.rotary.cos,
                                             self.rotary.sin, positions, cache, self.decode_config, self.interleave)
            return self.o_proj(out), cache_update(cache, entries, index)
        q, k, v = self.project(x, positions)
        entries = ops.concat((k.transpose(0, 2, 1, 3).reshape(b, q_len, -1),
                              v.transpose(0, 2, 1, 3).reshape(b, q_len, -1)), -1)
        cache = cache_update(cache, entries, index)
        m = cache.shape[0] // b
        k_all = cache[:, : kv * d].reshape(b, m, kv, d).transpose(0, 2, 1, 3)
        v_all = cache[:, kv * d:].reshape(b, m, kv, d).transpose(0, 2, 1, 3)
        mask = positions_mask(positions, m).reshape(b, 1, 1, q_len, m)
        return self.attend(q, k_all, v_all, mask), cache


class PanguProMoEForCausalLM(CausalLM):
    """Pangu Pro MoE causal LM (GQA attention; ``mlp.shared_expert`` naming)."""

    ATTENTION = GQAttention
    SHARED_EXPERT = "shared_expert"
