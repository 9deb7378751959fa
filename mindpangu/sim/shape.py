"""The shape of a decoder-only transformer as the simulator sees it: enough to count FLOPs, bytes and messages.

Covers the two Pangu models (MLA or GQA attention, dense then MoE layers with shared experts, MTP) and plain
dense transformers (MHA or GQA, a SwiGLU or 4h-GELU MLP) such as the Megatron GPT runs used for validation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

from ..config.schema import ModelConfig


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    heads: int
    vocab: int
    kv_heads: Optional[int] = None        # GQA; None = heads (MHA)
    head_dim: Optional[int] = None        # default hidden / heads
    attention: str = "mha"                # mha (GQA included) | mla
    q_lora_rank: Optional[int] = None     # MLA
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    mlp: str = "swiglu"                   # swiglu (3 matrices) | gelu (2 matrices)
    ffn_hidden: int = 0                   # dense-layer intermediate size; default 4 x hidden
    dense_layers: Optional[int] = None    # leading dense layers; None = all dense (no MoE)
    experts: int = 0
    top_k: int = 0
    expert_ffn: int = 0
    shared_ffn: int = 0                   # merged shared experts' intermediate size
    grouped_routing: bool = False         # MoGE: one group of experts per device, K / groups chosen in each
    mtp_layers: int = 0
    tied_embeddings: bool = False

    @property
    def ffn(self) -> int:
        return self.ffn_hidden or 4 * self.hidden

    @property
    def num_dense(self) -> int:
        return self.layers if self.dense_layers is None or not self.experts else min(self.dense_layers, self.layers)

    @property
    def num_moe(self) -> int:
        return self.layers - self.num_dense

    def groups_per_token(self, groups: int) -> float:
        """Of ``groups`` equal groups of EP ranks (e.g. nodes), how many hold at least one of a token's experts."""
        if groups <= 1:
            return 1.0
        if self.grouped_routing:
            return float(min(self.top_k, groups))
        return groups * (1 - (1 - 1 / groups) ** self.top_k)

    def devices_per_token(self, ep: int) -> float:
        """EP ranks a token's k experts sit on (its all-to-all copies, one per rank as dispatchers that
        deduplicate send): MoGE with groups spread over the ranks reaches min(k, ep) exactly; top-k over all
        experts reaches ep (1 - (1 - 1/ep)^k) on average for uniformly random experts."""
        return self.groups_per_token(ep)

    def head_dims(self) -> Tuple[int, int]:
        """(query/key size, value size) per head."""
        if self.attention == "mla":
            return self.qk_nope_head_dim + self.qk_rope_head_dim, self.v_head_dim
        d = self.head_dim or self.hidden // self.heads
        return d, d

    def attention_weights(self) -> int:
        """Weights of one layer's attention projections (each a token's multiply-adds through them)."""
        h, n = self.hidden, self.heads
        dqk, dv = self.head_dims()
        if self.attention == "mla":
            q = h * self.q_lora_rank + self.q_lora_rank * n * dqk if self.q_lora_rank else h * n * dqk
            return q + h * (self.kv_lora_rank + self.qk_rope_head_dim) \
                + self.kv_lora_rank * n * (self.qk_nope_head_dim + dv) + n * dv * h
        return h * n * dqk + 2 * h * (self.kv_heads or n) * dqk + n * dv * h

    def parameters(self) -> Tuple[float, float]:
        """(parameters outside the routed experts, routed-expert parameters), embedding and head included."""
        h = self.hidden
        mats = 3 if self.mlp == "swiglu" else 2
        dense = self.layers * self.attention_weights() + self.num_dense * mats * h * self.ffn
        dense += self.num_moe * (h * self.experts + mats * h * self.shared_ffn)
        dense += self.vocab * h * (1 if self.tied_embeddings else 2)
        experts = self.num_moe * self.experts * mats * h * self.expert_ffn
        return float(dense), float(experts)

    @classmethod
    def dense_gpt(cls, layers: int, hidden: int, heads: int, vocab: int, mlp: str = "gelu",
                  ffn_hidden: int = 0, kv_heads: Optional[int] = None) -> "ModelShape":
        """A GPT-style dense transformer (Megatron's GPT: MHA, a 4h GELU MLP, untied head)."""
        return cls(layers=layers, hidden=hidden, heads=heads, vocab=vocab, kv_heads=kv_heads, mlp=mlp,
                   ffn_hidden=ffn_hidden)

    @classmethod
    def from_config(cls, m: ModelConfig) -> "ModelShape":
        """The shape of a mindpangu model (Ultra MoE: MLA; Pro MoE: GQA)."""
        e = m.moe
        shared = (e.shared_expert_intermediate_size or e.num_shared_experts * e.intermediate_size) \
            if e.num_shared_experts else 0
        common = dict(layers=m.num_layers, hidden=m.hidden_size, heads=m.num_attention_heads, vocab=m.vocab_size,
                      mlp="swiglu", ffn_hidden=m.intermediate_size, dense_layers=m.first_k_dense_replace,
                      experts=e.num_experts, top_k=e.num_experts_per_tok, expert_ffn=e.intermediate_size,
                      shared_ffn=shared, mtp_layers=m.num_mtp_layers, tied_embeddings=m.tie_word_embeddings,
                      grouped_routing=e.router == "moge")
        if m.type == "pangu_pro_moe":
            return cls(attention="mha", kv_heads=m.num_key_value_heads or m.num_attention_heads,
                       head_dim=m.head_dim or m.hidden_size // m.num_attention_heads, **common)
        return cls(attention="mla", q_lora_rank=m.q_lora_rank, kv_lora_rank=m.kv_lora_rank,
                   qk_nope_head_dim=m.qk_nope_head_dim, qk_rope_head_dim=m.qk_rope_head_dim,
                   v_head_dim=m.v_head_dim, **common)
