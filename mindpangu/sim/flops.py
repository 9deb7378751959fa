"""FLOP counts per token and per step, component by component (a multiply-add is 2 FLOPs).

Conventions, stated because published MFU figures differ in them:
- Forward FLOPs per token of every matmul; training = forward + backward = 3 x forward (backward computes the
  input and the weight gradients); activation recompute adds one more forward of the recomputed layers (hardware
  FLOPs, not model FLOPs).
- Attention scores and the value product per token are ``heads x seq x head_dim`` multiply-adds each. Megatron's
  model-FLOPs formula counts the full ``seq x seq`` square (``causal=False``); the causal mask halves the work a
  kernel that skips masked blocks does (``causal=True``, used for time).
- MoE layers count the router, the top-k routed experts each token visits and the shared experts (6N-style
  "active" FLOPs). Elementwise ops, norms and softmax are not counted (they are a few percent and memory-bound).
Megatron's formula (Narayanan et al. 2021, appendix; Korthikanti et al. 2022):
``F = 72 B s l h^2 (1 + s / (6 h) + V / (12 l h))`` for GPT with MHA, a 4h GELU MLP and an untied head.
"""
from __future__ import annotations

from typing import Dict

from .shape import ModelShape


def _attention_macs(s: ModelShape, seq: int, causal: bool) -> Dict[str, float]:
    dqk, dv = s.head_dims()
    keys = (seq + 1) / 2 if causal else seq  # keys each query attends to, on average
    return {"attention projections": float(s.attention_weights()),
            "attention scores and values": s.heads * keys * (dqk + dv)}


def _mlp_macs(s: ModelShape, ffn: int) -> float:
    return (3 if s.mlp == "swiglu" else 2) * s.hidden * ffn


def forward_flops_per_token(s: ModelShape, seq: int, causal: bool = True) -> Dict[str, float]:
    """Forward FLOPs per token of the whole model, by component (dense MLP, MoE parts, LM head, MTP)."""
    attn = _attention_macs(s, seq, causal)
    out = {k: 2 * v * s.layers for k, v in attn.items()}
    out["dense MLP"] = 2 * _mlp_macs(s, s.ffn) * s.num_dense
    moe_layer = {"router": s.hidden * s.experts, "routed experts": s.top_k * _mlp_macs(s, s.expert_ffn),
                 "shared experts": _mlp_macs(s, s.shared_ffn) if s.shared_ffn else 0.0}
    for k, v in moe_layer.items():
        out[k] = 2 * v * s.num_moe
    out["LM head"] = 2.0 * s.hidden * s.vocab
    if s.mtp_layers:  # each MTP depth: eh_proj [2h -> h], one (MoE if any) decoder layer, the shared head
        layer = sum(attn.values()) + (sum(moe_layer.values()) if s.experts else _mlp_macs(s, s.ffn))
        out["MTP"] = 2.0 * s.mtp_layers * (2 * s.hidden * s.hidden + layer + s.hidden * s.vocab)
    return out


def training_flops(s: ModelShape, tokens: float, seq: int, causal: bool = True, recompute: str = "none") -> float:
    """FLOPs of one training step over ``tokens`` tokens: 3 x forward, plus one forward of the decoder layers
    under ``recompute='full'`` (hardware FLOPs; model FLOPs use 'none'). Selective recompute (attention scores
    only) adds the scores and values product once more."""
    f = forward_flops_per_token(s, seq, causal)
    total = 3 * sum(f.values())
    if recompute == "full":
        total += sum(v for k, v in f.items() if k not in ("LM head", "MTP"))
    elif recompute == "selective":
        total += f["attention scores and values"]
    elif recompute != "none":
        raise ValueError(f"recompute must be none | selective | full, got {recompute!r}")
    return total * tokens

