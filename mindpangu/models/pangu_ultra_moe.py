"""Pangu Ultra MoE (718B): MLA attention, sandwich / depth-scaled sandwich norm, top-k MoE with a shared expert,
dense leading layers, and a multi-token-prediction (MTP) module.

Parameter names follow the openPangu / DeepSeek-V3 Hugging Face checkpoints (``model.layers.N.self_attn.q_a_proj``
...), with routed experts stacked along a new first axis (``mlp.experts.gate_proj [E, I, H]``) and the MTP layers
under ``model.mtp_layers.J`` (``model.layers.{L+J}`` in HF checkpoints).
"""
from __future__ import annotations

from mindspore import nn, ops

from ..config.schema import ModelConfig
from ..layers import Linear, RMSNorm, Rotary, attention_probs, causal_mask
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
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = Linear(cfg.q_lora_rank, q_dim, False, dt)
        else:
            self.q_proj = Linear(h, q_dim, False, dt)
        self.kv_a_proj_with_mqa = Linear(h, cfg.kv_lora_rank + self.rope_dim, cfg.attention_bias, dt)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = Linear(cfg.kv_lora_rank, n * (self.nope + self.v_dim), False, dt)
        self.o_proj = Linear(n * self.v_dim, h, cfg.attention_bias, dt)
        self.rotary = Rotary(self.rope_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_interleave)
        self.scale = (self.nope + self.rope_dim) ** -0.5

    def construct(self, x):
        b, s, _ = x.shape
        n = self.n_heads
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.use_q_lora else self.q_proj(x)
        q = q.reshape(b, s, n, self.nope + self.rope_dim).transpose(0, 2, 1, 3)  # [B, n, S, dq]
        q_nope, q_pe = q[..., : self.nope], q[..., self.nope:]
        latent = self.kv_a_proj_with_mqa(x)  # [B, S, kv_rank + rope]
        kv_nope, k_pe = latent[..., : self.kv_rank], latent[..., self.kv_rank:]
        kv = self.kv_b_proj(self.kv_a_layernorm(kv_nope)).reshape(b, s, n, self.nope + self.v_dim)
        kv = kv.transpose(0, 2, 1, 3)
        k_nope, v = kv[..., : self.nope], kv[..., self.nope:]
        positions = ops.arange(0, s)
        q_pe = self.rotary(q_pe, positions)
        k_pe = self.rotary(k_pe.reshape(b, 1, s, self.rope_dim), positions)  # one key head shared by all
        scores = ops.matmul(q_nope, k_nope.transpose(0, 1, 3, 2)) + ops.matmul(q_pe, k_pe.transpose(0, 1, 3, 2))
        probs = attention_probs(scores * self.scale, causal_mask(s, s))
        out = ops.matmul(probs, v).transpose(0, 2, 1, 3).reshape(b, s, n * self.v_dim)
        return self.o_proj(out)


class PanguUltraMoEForCausalLM(CausalLM):
    """Pangu Ultra MoE causal LM (MLA attention; DeepSeek / openPangu parameter names)."""

    ATTENTION = MLAttention
    SHARED_EXPERT = "shared_experts"
