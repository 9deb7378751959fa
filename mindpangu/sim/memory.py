"""Megatron's memory conventions, as a cross-check of ``mindpangu/parallel/memory.py`` (which models the Pangu
recipes layer by layer).

- Activations (Korthikanti et al. 2022, section 4 and Table 2), bytes per transformer layer with fp16/bf16
  activations, for a GPT layer (MHA, 4h MLP):
  ``s b h (34 + 5 a s / h)`` without parallelism; with tensor parallelism t (no sequence parallelism)
  ``s b h (10 + 24 / t + 5 a s / (h t))``; with sequence parallelism ``s b h (34 / t + 5 a s / (h t))``; selective
  recompute drops the ``5 a s / (h t)`` term; full recompute keeps ``2 s b h / t`` (the layer input). The first
  pipeline stage holds ``p`` micro-batches of ``L / p`` layers, x ``(1 + (p - 1) / (p v))`` when interleaved.
- Weights, gradients and optimizer: 18 bytes per parameter (fp16 weights and gradients, fp32 master and two
  moments) without a distributed optimizer, 6 + 12 / DP with it (Megatron's theoretical_memory_usage.py).
"""
from __future__ import annotations


def activation_bytes(seq: int, micro_batch: int, hidden: int, heads: int, layers: int, tp: int = 1, pp: int = 1,
                     vpp: int = 1, sequence_parallel: bool = False, recompute: str = "none") -> float:
    """Activation bytes on the first pipeline stage (the fullest) per Korthikanti et al. 2022."""
    sbh = seq * micro_batch * hidden
    attention = 5 * heads * seq / (hidden * tp)
    if recompute == "full":
        per_layer = 2 * sbh / (tp if sequence_parallel else 1)
    else:
        per_layer = sbh * ((34 / tp) if sequence_parallel else (10 + 24 / tp))
        if recompute == "none":
            per_layer += sbh * attention
        elif recompute != "selective":
            raise ValueError(f"recompute must be none | selective | full, got {recompute!r}")
    interleave = 1 + (pp - 1) / (pp * vpp) if vpp > 1 else 1.0
    return per_layer * (layers / pp) * pp * interleave


def state_bytes_per_parameter(dp: int, distributed_optimizer: bool) -> float:
    """Weights, gradients and optimizer states per parameter: 18, or 6 + 12 / DP with a distributed optimizer."""
    return 6 + 12 / dp if distributed_optimizer else 18.0
