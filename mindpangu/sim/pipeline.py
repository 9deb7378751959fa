"""Pipeline bubbles of 1F1B and interleaved (VPP) schedules, under both definitions in use.

- Megatron (Narayanan et al. 2021 §2.2): bubble time / ideal time = ``(p - 1) / (v m)``.
- Pangu Ultra report §4.2: bubble time / total time = ``(p - 1) / (p - 1 + v m)`` (the report writes
  ``(p - 1) / (p - 1 + n)`` for 1F1B; with v chunks the bubble shrinks v-fold against the same work).
``p`` stages, ``m`` micro-batches per step per data-parallel rank, ``v`` model chunks per stage. Both describe
equal stage times; a slower stage stretches every slot (the simulator's critical stage).
"""
from __future__ import annotations

from typing import Dict


def bubble_fractions(p: int, m: int, v: int = 1) -> Dict[str, float]:
    """{'bubble_over_ideal', 'bubble_over_total'} for ``p`` stages, ``m`` micro-batches, ``v`` chunks.
    Raises ValueError for non-positive counts, or interleaving with m not a multiple of p (Megatron's rule)."""
    if p < 1 or m < 1 or v < 1:
        raise ValueError(f"stages, micro-batches and chunks must be >= 1, got p={p}, m={m}, v={v}")
    if v > 1 and m % p:
        raise ValueError(f"interleaved pipelines need micro-batches ({m}) to be a multiple of the stages ({p})")
    ideal = v * m  # in units of one chunk's forward + backward
    return {"bubble_over_ideal": (p - 1) / ideal, "bubble_over_total": (p - 1) / (p - 1 + ideal)}
