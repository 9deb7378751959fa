"""The decoder skeleton both Pangu models share: norm layouts, dense or MoE feed-forward, MTP, the causal LM.

A model supplies its attention cell (MLA for Ultra MoE, GQA for Pro MoE); everything else is here.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops

from ..config.schema import ModelConfig
from ..layers import Embedding, Linear, RMSNorm, SwiGLU, cache_index
from ..moe import MoELayer

class DecoderLayer(nn.Cell):
    """One block. pre_ln: h += Attn(in_norm(h)); h += MLP(post_attention_layernorm(h)) (Llama/DeepSeek names).
    sandwich / dssn: h += post_attention_layernorm(Attn(input_layernorm(h)));
                     h += post_mlp_layernorm(MLP(pre_mlp_layernorm(h))) (openPangu names)."""

    def __init__(self, cfg: ModelConfig, layer_index: int, attention: type, shared_name: str):
        super().__init__()
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.sandwich = cfg.norm_layout in ("sandwich", "dssn")
        self.self_attn = attention(cfg)
        self.input_layernorm = RMSNorm(h, eps, cfg.norm_backend)
        self.post_attention_layernorm = RMSNorm(h, eps, cfg.norm_backend)
        if self.sandwich:
            self.pre_mlp_layernorm = RMSNorm(h, eps, cfg.norm_backend)
            self.post_mlp_layernorm = RMSNorm(h, eps, cfg.norm_backend)
        self.is_moe = layer_index >= cfg.first_k_dense_replace
        if self.is_moe:
            self.mlp = MoELayer(h, cfg.moe, cfg.compute_dtype, shared_name, cfg.decode_backend, cfg.dynamic_shapes)
        else:
            self.mlp = SwiGLU(h, cfg.intermediate_size, cfg.compute_dtype)

    def block(self, h, positions=None, cache=None, index=None):
        """h [B, S, H] -> (h, router outputs or None, attention cache).

        Without a cache: causal attention over h, and the cache is this layer's entries for h [B, S, D]
        (prefill). With ``cache`` (a Parameter [B * M, D]): h is S new tokens at ``positions [B, S]``, written
        into the cache in place at ``index`` (``layers.cache_index``) and attending to everything cached up to
        their position (decode; router outputs None).
        """
        x = self.input_layernorm(h)
        decoding = cache is not None
        if decoding:
            a, cache = self.self_attn.decode(x, positions, cache, index)
        else:
            a, cache = self.self_attn.prefill(x)
        if self.sandwich:
            h = h + self.post_attention_layernorm(a)
            x = self.pre_mlp_layernorm(h)
        else:
            h = h + a
            x = self.post_attention_layernorm(h)
        route = None
        if not self.is_moe:
            y = self.mlp(x)
        elif decoding:
            y = self.mlp.decode(x)
        else:
            y, route = self.mlp(x)
        if self.sandwich:
            y = self.post_mlp_layernorm(y)
        return h + y, route, cache

    def construct(self, h):
        h, route, _ = self.block(h)
        return h, route


class MTPHead(nn.Cell):
    """Final norm of an MTP layer (HF ``shared_head.norm``); the output matrix is the main LM head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_backend)

    def construct(self, h):
        return self.norm(h)


def next_token_ids(ids):
    """ids [B, S] -> t_{i+1} at position i [B, S] (the last position wraps around: MTP masks it)."""
    return ops.concat((ids[:, 1:], ids[:, :1]), 1)


class MTPLayer(DecoderLayer):
    """DeepSeek-V3 multi-token prediction: h' = Block(eh_proj([enorm(Emb(t_{i+j})); hnorm(h_i)])).

    ``h`` is the previous depth's residual stream (the main model's before its final norm); the input embedding
    and the LM head are shared with the main model.
    """

    def __init__(self, cfg: ModelConfig, attention: type, shared_name: str):
        super().__init__(cfg, cfg.num_layers, attention, shared_name)
        h = cfg.hidden_size
        self.enorm = RMSNorm(h, cfg.rms_norm_eps, cfg.norm_backend)
        self.hnorm = RMSNorm(h, cfg.rms_norm_eps, cfg.norm_backend)
        self.eh_proj = Linear(2 * h, h, False, cfg.compute_dtype)
        self.shared_head = MTPHead(cfg)

    def input_projection(self, h, next_embeds):
        """eh_proj([enorm(next_embeds); hnorm(h)]): the block's input [B, S, H]."""
        return self.eh_proj(ops.concat((self.enorm(next_embeds), self.hnorm(h)), -1))

    def construct(self, h, next_embeds, positions=None, cache=None, index=None):
        """-> (residual out, normed head input, router outputs or None, attention cache); see ``block``."""
        out, route, cache = self.block(self.input_projection(h, next_embeds), positions, cache, index)
        return out, self.shared_head(out), route, cache


class DecoderModel(nn.Cell):
    """Embedding -> decoder layers -> final norm (HF ``model.*``), plus the MTP layers."""

    def __init__(self, cfg: ModelConfig, attention: type, shared_name: str):
        super().__init__()
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.CellList([DecoderLayer(cfg, i, attention, shared_name) for i in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_backend)
        self.num_mtp = cfg.num_mtp_layers
        if self.num_mtp:
            self.mtp_layers = nn.CellList([MTPLayer(cfg, attention, shared_name) for _ in range(cfg.num_mtp_layers)])

    def construct(self, input_ids):
        """-> (final normed hidden [B,S,H], residual stream before the final norm, router outputs per MoE layer)."""
        h = self.embed_tokens(input_ids)
        routes = ()
        for layer in self.layers:
            h, route = layer(h)
            if route is not None:
                routes = routes + (route,)
        return self.norm(h), h, routes

    def cached(self, input_ids, positions=None, caches=None):
        """Inference with an attention cache per layer.

        No caches: prefill of input_ids [B, S] -> (normed [B,S,H], residual [B,S,H], caches [L, B, S, D]).
        With ``caches`` (one Parameter [B * M, D] per layer): decode of S new tokens at ``positions [B, S]``,
        written into the caches in place -> (normed, residual, caches).
        """
        h = self.embed_tokens(input_ids)
        if caches is None:
            new_caches = ()
            for layer in self.layers:
                h, _, cache = layer.block(h)
                new_caches = new_caches + (cache,)
            return self.norm(h), h, ops.stack(new_caches)
        positions = positions.astype(ms.int32)  # the decode kernels read int32
        index = cache_index(positions, caches[0])
        i = 0
        for layer in self.layers:
            h, _, _ = layer.block(h, positions, caches[i], index)
            i += 1
        return self.norm(h), h, caches


class CausalLM(nn.Cell):
    """Causal LM: ``model(input_ids int32 [B, S]) -> logits float32 [B, S, V]`` (main head).

    Subclasses set ``ATTENTION`` (the attention cell) and ``SHARED_EXPERT`` (the shared expert's HF name).
    """

    ATTENTION: type = None
    SHARED_EXPERT = "shared_experts"

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = DecoderModel(cfg, self.ATTENTION, self.SHARED_EXPERT)
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
                ids = next_token_ids(ids)  # t_{i+j}
                h, head_in, route, _ = layer(h, self.model.embed_tokens(ids))
                mtp_logits = mtp_logits + (self.logits(head_in),)
                if route is not None:
                    routes = routes + (route,)
        return self.logits(normed), mtp_logits, routes

    def prefill(self, input_ids):
        """input_ids [B, S] -> (logits [B, S, V], residual stream [B, S, H], caches [L, B, S, D])."""
        normed, h, caches = self.model.cached(input_ids)
        return self.logits(normed), h, caches

    def decode(self, input_ids, positions, caches):
        """input_ids [B, Q] at ``positions [B, Q]`` with ``caches`` (a Parameter [B * M, D] per layer, updated in
        place) -> (logits [B, Q, V], residual [B, Q, H], caches)."""
        normed, h, caches = self.model.cached(input_ids, positions, caches)
        return self.logits(normed), h, caches

    def draft(self, h, next_ids, positions=None, cache=None):
        """The first MTP layer at positions whose main residual ``h [B, Q, H]`` and next token ``next_ids [B, Q]``
        are known -> (logits [B, Q, V] for the token after next, its cache). No cache: prefill over the Q
        positions 0..Q-1, the cache is their entries [B, Q, D]; with ``cache`` (a Parameter [B * M, D]) the entries
        are written into it in place at ``positions [B, Q]``."""
        if cache is not None:
            positions = positions.astype(ms.int32)  # the decode kernels read int32
        index = None if cache is None else cache_index(positions, cache)
        _, head_in, _, cache = self.model.mtp_layers[0](h, self.model.embed_tokens(next_ids), positions, cache, index)
        return self.logits(head_in), cache
