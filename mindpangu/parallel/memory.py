"""Analytic device memory per pipeline stage: parameters, gradients, optimizer states and activations.

Conventions (mixed precision as mindformers / Megatron train these models):
- weights in bf16 (2 B), gradients accumulated in fp32 (4 B), AdamW keeps an fp32 master copy and two fp32
  moments (12 B); ``optimizer_shard`` divides the 12 B (and the gradients) over the ranks holding the same slice
  (dp x cp for dense weights, the expert data-parallel group for experts).
- TP shards attention heads (MLA: q_b_proj, kv_b_proj, o_proj; the latent down-projections are replicated), the
  dense FFN, the shared experts and the vocabulary of the LM head; routed experts are sharded over EP and, inside
  each expert, over TP where EP x TP fits the stage (``Layout.expert_tp``; Megatron's default expert tensor
  parallel = TP: TP8 x EP4 spreads every layer's experts over 32 devices, the "EP 32" some summaries of the 718B
  run give).
- Activations are bf16, with flash attention (no S x S scores kept). Each micro-batch keeps, per layer and token,
  the tensors backward needs (listed in ``activation_elements``); sequence parallel divides the hidden-sized ones
  by TP, context parallel divides tokens by CP. Full recompute keeps only each layer's input. Stage 0 of 1F1B holds
  ``pp`` micro-batches in flight, x (1 + (pp - 1) / (pp x vpp)) when interleaved (Narayanan et al. 2021).
- Not modelled: communication buffers, the framework's workspace and fragmentation (budget ~10% of HBM for them).
"""
from __future__ import annotations

from typing import Dict, Optional

from ..config.schema import TrainConfig
from ..params import attention_parameters, moe_parts, norms_per_layer
from .plan import Layout, StagePlan

GB = 1024 ** 3


def layer_parameters(cfg: TrainConfig, layer: int) -> Dict[str, int]:
    """Parameters of decoder layer ``layer`` by how they are sharded: 'replicated', 'tp', 'experts'."""
    m = cfg.model
    rep, tp = attention_parameters(m)
    rep += norms_per_layer(m)
    experts = 0
    if layer < m.first_k_dense_replace:
        tp += 3 * m.hidden_size * m.intermediate_size
    else:
        router, _, shared, experts = moe_parts(m)
        rep += router
        tp += shared
    return {"replicated": rep, "tp": tp, "experts": experts}


def activation_elements(cfg: TrainConfig, layer: int, layout: Layout) -> float:
    """Activation elements kept per token for backward in decoder layer ``layer`` (this rank's share)."""
    m, tp = cfg.model, layout.tp
    sp = tp if cfg.parallel_config.use_seq_parallel else 1
    h, n = m.hidden_size, m.num_attention_heads
    hidden = (norms_per_layer(m) // h + 2) * h / sp  # every norm input, plus the attention and MLP inputs after their norm
    if m.type == "pangu_pro_moe":
        d = m.head_dim or h // n
        kv = m.num_key_value_heads or n
        attn = (2 * n * d + 2 * kv * d) / tp  # q, attention output, k, v
    else:
        q = m.q_lora_rank or 0
        dq = m.qk_nope_head_dim + m.qk_rope_head_dim
        attn = 2 * q + (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank  # latents (replicated)
        attn += (n * dq + n * (m.qk_nope_head_dim + m.v_head_dim) + n * m.v_head_dim) / tp
    if layer < m.first_k_dense_replace:
        mlp = 3 * m.intermediate_size / tp
    else:
        e = m.moe
        shared = e.shared_expert_intermediate_size or e.num_shared_experts * e.intermediate_size
        k = e.num_experts_per_tok
        # router logits and scores (fp32 = 2 bf16 elements each); K dispatched copies in and out and 3 x I per copy,
        # split over the TP group (sequence-parallel tokens, expert-tensor-parallel columns)
        mlp = 4 * e.num_experts + (2 * k * h + 3 * k * e.intermediate_size + 3 * shared) / tp
    return hidden + attn + mlp


def stage_memory(cfg: TrainConfig, layout: Layout, plan: StagePlan, stage: int,
                 recompute: Optional[bool] = None, optimizer_shard: Optional[bool] = None) -> Dict[str, float]:
    """Bytes per device of pipeline stage ``stage``: weights, grads, optimizer, activations, total (recompute and
    optimizer sharding as configured unless given)."""
    m, p = cfg.model, cfg.parallel_config
    h, v = m.hidden_size, m.vocab_size
    layers = plan.stage_layers(stage)
    dense_shard = layout.dp * layout.cp
    expert_shard = layout.stage_size // (layout.ep * layout.expert_tp)
    rep = tp = experts = 0.0
    for i in layers:
        part = layer_parameters(cfg, i)
        rep, tp, experts = rep + part["replicated"], tp + part["tp"], experts + part["experts"]
    if stage == 0:
        rep, tp = (rep + v * h, tp) if p.vocab_emb_dp else (rep, tp + v * h)
    if stage == layout.pp - 1:
        rep += h
        tp += 0 if m.tie_word_embeddings else v * h
        for _ in range(m.num_mtp_layers):
            part = layer_parameters(cfg, m.num_layers)
            rep += part["replicated"] + 3 * h
            tp += part["tp"] + 2 * h * h
            experts += part["experts"]
    dense_params = rep + tp / layout.tp
    expert_params = experts / (layout.ep * layout.expert_tp)
    shard = p.optimizer_shard if optimizer_shard is None else optimizer_shard
    opt_div = (dense_shard, expert_shard) if shard else (1, 1)
    weights = 2 * (dense_params + expert_params)
    grads = 4 * (dense_params / opt_div[0] + expert_params / opt_div[1])
    optimizer = 12 * (dense_params / opt_div[0] + expert_params / opt_div[1])
    tokens = cfg.runner_config.batch_size * cfg.train_dataset.seq_length / layout.cp
    if recompute is None:
        recompute = cfg.recompute_config.recompute is True
    sp = layout.tp if p.use_seq_parallel else 1
    per_mb = sum((h / sp if recompute else activation_elements(cfg, i, layout)) * tokens * 2 for i in layers)
    inflight = min(p.micro_batch_num, layout.pp - stage) if layout.pp > 1 else 1
    if layout.vpp > 1:
        inflight *= 1 + (layout.pp - 1) / (layout.pp * layout.vpp)
    activations = per_mb * inflight
    if recompute and layers:  # the layer being recomputed holds its full activations, one at a time
        activations += max(activation_elements(cfg, i, layout) for i in layers) * tokens * 2
    if stage == layout.pp - 1:
        activations += tokens * (v / layout.tp) * 4 * (1 + m.num_mtp_layers)  # fp32 logits, one micro-batch
    total = weights + grads + optimizer + activations
    return {"stage": stage, "layers": len(layers), "weights": weights, "grads": grads, "optimizer": optimizer,
            "activations": activations, "total": total, "inflight_microbatches": inflight}
