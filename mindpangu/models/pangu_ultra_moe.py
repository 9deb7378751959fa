"""Pangu Ultra MoE (718B): MLA attention, sandwich / depth-scaled sandwich norm, top-k MoE with a shared expert,
dense leading layers, and a multi-token-prediction (MTP) module.

Parameter names follow the openPangu / DeepSeek-V3 Hugging Face checkpoints (``model.layers.N.self_attn.q_a_proj``
...), with routed experts stacked along a new first axis (``mlp.experts.gate_proj [E, I, H]``) and the MTP layers
under ``model.mtp_layers.J`` (``model.layers.{L+J}`` in HF checkpoints).
"""
from __future__ import annotations

import numpy as np
from mindspore import Tensor, nn, ops

from ..config.schema import ModelConfig
from ..kernels import make_mla_decode, resolve_kernels
from ..layers import (CausalSoftmax, Linear, RMSNorm, Rotary, attention_probs, cache_update, dynamic_range,
                      positions_mask, static_range)
from .decoder import CausalLM


class MLAttention(nn.Cell):
    """Multi-head latent attention (DeepSeek-V2/V3): low-rank q and kv latents with RMSNorm, RoPE on a separate
    qk_rope_head_dim part whose key is shared across heads, softmax scale (nope + rope)^-0.5."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, n, dt = cfg.hidden_size, cfg.num_attention_heads, cfg.compute_dtype
        self.n_heads, self.nope, self.rope_dim, self.v_dim = n, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_rank = cfg.kv_lora_rank
        q_dim = n * (self.nope + self.rope_dim)
        self.use_q_lora = cfg.q_lora_rank is not None
        if self.use_q_lora:
            self.q_a_proj = Linear(h, cfg.q_lora_rank, cfg.attention_bias, dt)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps, cfg.norm_backend)
            self.q_b_proj = Linear(cfg.q_lora_rank, q_dim, False, dt)
        else:
            self.q_proj = Linear(h, q_dim, False, dt)
        self.kv_a_proj_with_mqa = Linear(h, cfg.kv_lora_rank + self.rope_dim, cfg.attention_bias, dt)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps, cfg.norm_backend)
        self.kv_b_proj = Linear(cfg.kv_lora_rank, n * (self.nope + self.v_dim), False, dt)
        self.o_proj = Linear(n * self.v_dim, h, cfg.attention_bias, dt)
        self.rotary = Rotary(self.rope_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_interleave)
        self.scale = (self.nope + self.rope_dim) ** -0.5
        self.index_range = dynamic_range if cfg.dynamic_shapes else static_range
        self.causal_softmax = CausalSoftmax(self.scale, cfg.attention_backend, cfg.dynamic_shapes)

        self.cache_width = self.kv_rank + self.rope_dim  # the latent cache: kv_lora_rank + rope dims per token
        self.decode_kernel = resolve_kernels(cfg.decode_backend, "model.decode_backend") == "cpu_kernel"
        if self.decode_kernel:
            self.fused_decode = make_mla_decode(n * self.v_dim)
            self.decode_config = Tensor(np.array([n, self.nope, cfg.rms_norm_eps, self.scale], np.float32))
            self.interleave = Tensor(np.array([float(cfg.rope_interleave)], np.float32))

    def queries(self, x):
        """x [B, S, H] -> q [B, S, n * (nope + rope)], before RoPE."""
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.use_q_lora else self.q_proj(x)

    def project(self, x, positions):
        """-> q_nope [B,n,S,nope], roped q_pe [B,n,S,rope], normed latent c [B,S,kv_rank], roped k_pe [B,1,S,rope]."""
        b, s, _ = x.shape
        q = self.queries(x).reshape(b, s, self.n_heads, self.nope + self.rope_dim).transpose(0, 2, 1, 3)
        q_nope, q_pe = q[..., : self.nope], self.rotary(q[..., self.nope:], positions)
        latent = self.kv_a_proj_with_mqa(x)  # [B, S, kv_rank + rope]
        c = self.kv_a_layernorm(latent[..., : self.kv_rank])
        k_pe = self.rotary(latent[..., self.kv_rank:].reshape(b, 1, s, self.rope_dim), positions)  # one key head
        return q_nope, q_pe, c, k_pe

    def construct(self, x):
        return self.prefill(x)[0]

    def prefill(self, x):
        """Causal attention over x [B, S, H] -> (output [B, S, H], cache entries [B, S, kv_rank + rope])."""
        b, s, _ = x.shape
        n = self.n_heads
        positions = self.index_range(0, s)
        q_nope, q_pe, c, k_pe = self.project(x, positions)
        kv = self.kv_b_proj(c).reshape(b, s, n, self.nope + self.v_dim).transpose(0, 2, 1, 3)
        k_nope, v = kv[..., : self.nope], kv[..., self.nope:]
        scores = ops.matmul(q_nope, k_nope.transpose(0, 1, 3, 2)) + ops.matmul(q_pe, k_pe.transpose(0, 1, 3, 2))
        probs = self.causal_softmax(scores)
        out = ops.matmul(probs, v).transpose(0, 2, 1, 3).reshape(b, s, n * self.v_dim)
        return self.o_proj(out), ops.concat((c, k_pe.reshape(b, s, self.rope_dim)), -1)

    def decode(self, x, positions, cache, index):
        """x [B, Q, H] at ``positions [B, Q]``; ``cache`` the latent cache Parameter [B * M, kv_rank + rope],
        written in place at ``index`` (``layers.cache_index``) -> (output [B, Q, H], the cache).

        Attention runs on the latent with kv_b_proj absorbed (DeepSeek-V2 §2.1.2): q_nope W_UK scores against the
        cached c directly, and W_UV maps the attended latent to values, so no per-head K/V is ever materialised.
        ``decode_backend`` cpu_kernel does all of it after the projections in one kernel (MlaDecode).
        """
        b, q_len, _ = x.shape
        n, r = self.n_heads, self.kv_rank
        if self.decode_kernel:
            out, entries = self.fused_decode(self.queries(x), self.kv_a_proj_with_mqa(x), self.kv_a_layernorm.weight,
                                             self.kv_b_proj.weight, self.rotary.cos, self.rotary.sin, positions,
                                             cache, self.decode_config, self.interleave)
            return self.o_proj(out), cache_update(cache, entries, index)
        q_nope, q_pe, c, k_pe = self.project(x, positions)
        cache = cache_update(cache, ops.concat((c, k_pe.reshape(b, q_len, self.rope_dim)), -1), index)
        m = cache.shape[0] // b
        c_all = cache[:, :r].reshape(b, 1, m, r)
        pe_all = cache[:, r:].reshape(b, 1, m, self.rope_dim)
        w = self.kv_b_proj.weight.reshape(n, self.nope + self.v_dim, r)
        q_latent = ops.matmul(q_nope, w[:, : self.nope])  # [B, n, Q, r]
        scores = ops.matmul(q_latent, c_all.transpose(0, 1, 3, 2)) + ops.matmul(q_pe, pe_all.transpose(0, 1, 3, 2))
        probs = attention_probs(scores * self.scale, positions_mask(positions, m).expand_dims(1))
        out = ops.matmul(ops.matmul(probs, c_all), w[:, self.nope:].transpose(0, 2, 1))  # [B, n, Q, v]
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(b, q_len, n * self.v_dim)), cache


class PanguUltraMoEForCausalLM(CausalLM):
    """Pangu Ultra MoE causal LM (MLA attention; DeepSeek / openPangu parameter names)."""

    ATTENTION = MLAttention
    SHARED_EXPERT = "shared_experts"
