"""Pangu Ultra MoE (718B): MLA attention, sandwich / depth-scaled sandwich norm, top-k MoE with a shared expert,
dense leading layers, and a multi-token-prediction (MTP) module.

Parameter names follow the openPangu / DeepSeek-V3 Hugging Face checkpoints (``model.layers.N.self_attn.q_a_proj``
...), with routed experts stacked along a new first axis (``mlp.experts.gate_proj [E, I, H]``) and the MTP layers
under ``model.mtp_layers.J`` (``model.layers.{L+J}`` in HF checkpoints).
"""
from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops

from ..config.schema import ModelConfig
from ..layers import Embedding, Linear, RMSNorm, Rotary, SwiGLU, attention_probs, causal_mask
from ..moe import MoELayer


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


class DecoderLayer(nn.Cell):
    """One block. pre_ln: h += Attn(in_norm(h)); h += MLP(post_attention_layernorm(h)) (Llama/DeepSeek names).
    sandwich / dssn: h += post_attention_layernorm(Attn(input_layernorm(h)));
                     h += post_mlp_layernorm(MLP(pre_mlp_layernorm(h))) (openPangu names)."""

    def __init__(self, cfg: ModelConfig, layer_index: int):
        super().__init__()
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.sandwich = cfg.norm_layout in ("sandwich", "dssn")
        self.self_attn = MLAttention(cfg)
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)
        if self.sandwich:
            self.pre_mlp_layernorm = RMSNorm(h, eps)
            self.post_mlp_layernorm = RMSNorm(h, eps)
        self.is_moe = layer_index >= cfg.first_k_dense_replace
        if self.is_moe:
            self.mlp = MoELayer(h, cfg.moe, cfg.compute_dtype)
        else:
            self.mlp = SwiGLU(h, cfg.intermediate_size, cfg.compute_dtype)

    def block(self, h):
        """h [B, S, H] -> (h, router outputs or None)."""
        if self.sandwich:
            h = h + self.post_attention_layernorm(self.self_attn(self.input_layernorm(h)))
            x = self.pre_mlp_layernorm(h)
        else:
            h = h + self.self_attn(self.input_layernorm(h))
            x = self.post_attention_layernorm(h)
        route = None
        if self.is_moe:
            y, route = self.mlp(x)
        else:
            y = self.mlp(x)
        if self.sandwich:
            y = self.post_mlp_layernorm(y)
        return h + y, route

    def construct(self, h):
        return self.block(h)


class MTPHead(nn.Cell):
    """Final norm of an MTP layer (HF ``shared_head.norm``); the output matrix is the main LM head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def construct(self, h):
        return self.norm(h)


class MTPLayer(DecoderLayer):
    """DeepSeek-V3 multi-token prediction: h' = Block(eh_proj([enorm(Emb(t_{i+j})); hnorm(h_i)])).

    ``h`` is the previous depth's residual stream (the main model's before its final norm); the input embedding
    and the LM head are shared with the main model.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, cfg.num_layers)
        h = cfg.hidden_size
        self.enorm = RMSNorm(h, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(h, cfg.rms_norm_eps)
        self.eh_proj = Linear(2 * h, h, False, cfg.compute_dtype)
        self.shared_head = MTPHead(cfg)

    def construct(self, h, next_embeds):
        x = self.eh_proj(ops.concat((self.enorm(next_embeds), self.hnorm(h)), -1))
        out, route = self.block(x)
        return out, self.shared_head(out), route


class PanguUltraMoEModel(nn.Cell):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.CellList([DecoderLayer(cfg, i) for i in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.num_mtp = cfg.num_mtp_layers
        if self.num_mtp:
            self.mtp_layers = nn.CellList([MTPLayer(cfg) for _ in range(cfg.num_mtp_layers)])

    def construct(self, input_ids):
        """-> (final normed hidden [B,S,H], residual stream before the final norm, router outputs per MoE layer)."""
        h = self.embed_tokens(input_ids)
        routes = ()
        for layer in self.layers:
            h, route = layer(h)
            if route is not None:
                routes = routes + (route,)
        return self.norm(h), h, routes


class PanguUltraMoEForCausalLM(nn.Cell):
    """Causal LM: ``model(input_ids int32 [B, S]) -> logits float32 [B, S, V]`` (main head)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = PanguUltraMoEModel(cfg)
        self.tied = cfg.tie_word_embeddings
        if not self.tied:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, False, cfg.compute_dtype)

    def logits(self, h):
        if self.tied:
            b, s, d = h.shape
            return ops.matmul(h.reshape(b * s, d), self.model.embed_tokens.weight.T).reshape(b, s, -1)
        return self.lm_head(h)

    def construct(self, input_ids):
        normed, _, _ = self.model(input_ids)
        return self.logits(normed)

    def forward_train(self, input_ids):
        """-> (main logits, MTP logits per depth, router outputs of every MoE layer incl. MTP).

        MTP depth j (1-based) at position i sees the embedding of t_{i+j}; its logits predict t_{i+j+1}. The last
        j positions have no such token (their embedding is of a wrapped-around token) and must be masked.
        """
        normed, h, routes = self.model(input_ids)
        mtp_logits = ()
        if self.model.num_mtp:
            ids = input_ids
            for layer in self.model.mtp_layers:
                ids = ops.concat((ids[:, 1:], ids[:, :1]), 1)  # t_{i+j}
                h, head_in, route = layer(h, self.model.embed_tokens(ids))
                mtp_logits = mtp_logits + (self.logits(head_in),)
                if route is not None:
                    routes = routes + (route,)
        return self.logits(normed), mtp_logits, routes
