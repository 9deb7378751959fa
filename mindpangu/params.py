"""Analytic parameter counts (no allocation), per component, with each paper's headline convention.

Conventions for the headline ``total`` / ``active``:
- pangu_ultra_moe: the 718B / 39B of arXiv 2505.04519 counts ONE embedding table (the output head) and leaves out
  the MTP layer (papers.md 1.16): total = all - input embedding - MTP; active = attention + dense FFNs +
  per MoE layer (router + K routed experts + shared experts) + norms + output head.
- pangu_pro_moe: the 71.99B / 16.50B of arXiv 2505.21411 counts BOTH embedding tables (and there is no MTP).
``all`` is every stored parameter (both tables and MTP included): what the built model holds.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

from .config.schema import ModelConfig


def attention_parameters(cfg: ModelConfig) -> Tuple[int, int]:
    """(replicated, tensor-parallel) parameters of one attention block. GQA splits q/k/v/o (biases included) over
    TP; MLA splits q_b_proj (or q_proj), kv_b_proj and o_proj and replicates the latent down-projections, their
    norms and o_proj's bias."""
    h, n = cfg.hidden_size, cfg.num_attention_heads
    bias = cfg.attention_bias
    if cfg.type == "pangu_pro_moe":
        hd = cfg.head_dim or h // n
        kv = cfg.num_key_value_heads or n
        return 0, (h * n * hd + h * 2 * kv * hd + n * hd * h) + (bias * (n * hd + 2 * kv * hd + h))
    q_dim = n * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
    latent = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    replicated = h * latent + bias * latent + cfg.kv_lora_rank + bias * h
    if cfg.q_lora_rank:
        replicated += h * cfg.q_lora_rank + bias * cfg.q_lora_rank + cfg.q_lora_rank
    split = (cfg.q_lora_rank or h) * q_dim + cfg.kv_lora_rank * n * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    return replicated, split + n * cfg.v_head_dim * h


def attention_head_dims(cfg: ModelConfig) -> Tuple[int, int]:
    """(query/key width, value width) per attention head."""
    if cfg.type == "pangu_pro_moe":
        head = cfg.head_dim or cfg.hidden_size // cfg.num_attention_heads
        return head, head
    return cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim


def norms_per_layer(cfg: ModelConfig) -> int:
    return (4 if cfg.norm_layout in ("sandwich", "dssn") else 2) * cfg.hidden_size


def moe_parts(cfg: ModelConfig) -> Tuple[int, int, int, int]:
    """(router incl. router_scale / expert bias, one routed expert, shared experts, routed experts total)."""
    m, h = cfg.moe, cfg.hidden_size
    router = m.num_experts * h + (m.router_scale + m.balance_loss.expert_bias.enabled) * m.num_experts
    expert = 3 * h * m.intermediate_size
    shared_i = m.shared_expert_intermediate_size or m.num_shared_experts * m.intermediate_size
    shared = 3 * h * shared_i if m.num_shared_experts else 0
    return router, expert, shared, m.num_experts * expert


def count_parameters(cfg: ModelConfig) -> Dict[str, object]:
    """{'total', 'active', 'all', 'convention', 'components': [(name, count, active count), ...]}."""
    h, v = cfg.hidden_size, cfg.vocab_size
    attn = sum(attention_parameters(cfg))
    norms = norms_per_layer(cfg)
    router, expert, shared, routed = moe_parts(cfg)
    k = cfg.moe.num_experts_per_tok
    dense_layers = cfg.first_k_dense_replace
    moe_layers = cfg.num_layers - dense_layers
    dense_ffn = 3 * h * cfg.intermediate_size
    moe_layer = attn + norms + router + routed + shared
    moe_layer_active = attn + norms + router + k * expert + shared
    comps: List[Tuple[str, int, int]] = [
        ("input embedding", v * h, v * h),
        (f"attention x{cfg.num_layers}", cfg.num_layers * attn, cfg.num_layers * attn),
        (f"norms x{cfg.num_layers}", cfg.num_layers * norms, cfg.num_layers * norms),
    ]
    if dense_layers:
        comps.append((f"dense FFN x{dense_layers}", dense_layers * dense_ffn, dense_layers * dense_ffn))
    comps += [
        (f"routers x{moe_layers}", moe_layers * router, moe_layers * router),
        (f"routed experts x{moe_layers} ({cfg.moe.num_experts} each, {k} active)", moe_layers * routed,
         moe_layers * k * expert),
        (f"shared experts x{moe_layers}", moe_layers * shared, moe_layers * shared),
        ("final norm", h, h),
    ]
    head = 0 if cfg.tie_word_embeddings else v * h
    comps.append(("output head" + (" (tied)" if cfg.tie_word_embeddings else ""), head, head))
    mtp = mtp_active = 0
    if cfg.num_mtp_layers:
        mtp = cfg.num_mtp_layers * (2 * h + 2 * h * h + h + moe_layer)
        mtp_active = cfg.num_mtp_layers * (2 * h + 2 * h * h + h + moe_layer_active)
        comps.append((f"MTP x{cfg.num_mtp_layers}", mtp, mtp_active))
    everything = sum(c[1] for c in comps)
    everything_active = sum(c[2] for c in comps)
    if cfg.type == "pangu_ultra_moe":
        total = everything - v * h - mtp
        active = everything_active - v * h - mtp_active
        convention = "one embedding table (output head) counted, MTP excluded (Pangu Ultra MoE's 718B/39B)"
    else:
        total, active = everything, everything_active
        convention = "both embedding tables counted (Pangu Pro MoE's 71.99B/16.50B)"
    return {"total": total, "active": active, "all": everything, "convention": convention, "components": comps}


def human(n: int) -> str:
    """1.5e9 -> '1.50B', 2.3e6 -> '2.30M'."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def format_table(counts: Dict[str, object]) -> str:
    """A human-readable per-component table."""
    rows = [f"{'component':<58}{'parameters':>18}{'active':>18}"]
    for name, n, a in counts["components"]:
        rows.append(f"{name:<58}{n:>18,}{a:>18,}")
    rows.append("-" * 94)
    rows.append(f"{'all stored parameters':<58}{counts['all']:>18,}")
    rows.append(f"{'headline total / active':<58}{counts['total']:>18,}{counts['active']:>18,}")
    rows.append(f"  = {human(counts['total'])} total, {human(counts['active'])} active; convention: "
                f"{counts['convention']}")
    return "\n".join(rows)


def kv_cache_bytes_per_token(cfg: ModelConfig, bytes_per_value: int = 2) -> Dict[str, int]:
    """Attention-cache bytes per token over the main layers: ``cached`` (what mindpangu's decode keeps: the MLA
    latent kv_lora_rank + qk_rope_head_dim, or GQA's K and V) and ``full_kv`` (per-head K and V, what a
    multi-head cache without MLA's compression would hold)."""
    n, layers = cfg.num_attention_heads, cfg.num_layers
    qk, v = attention_head_dims(cfg)
    if cfg.type == "pangu_pro_moe":
        cached = (cfg.num_key_value_heads or n) * (qk + v)
    else:
        cached = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    full = n * (qk + v)
    return {"cached": layers * cached * bytes_per_value, "full_kv": layers * full * bytes_per_value}
