"""Load-balance metrics for any router: device imbalance score and per-expert load statistics.

Imbalance score (Pangu Pro MoE, arXiv 2505.21411 eq. 3): for a batch X whose routed (token, expert) pairs land on
M devices, IS(X) = (max_i T_i - min_i T_i) / |X|, T_i = expert computations on device i, |X| = tokens.
Devices hold contiguous blocks of E/M experts: MoGE groups, or expert-parallel ranks.
"""
from __future__ import annotations

from typing import Dict

import numpy as np


def loads_per_device(expert_counts: np.ndarray, num_devices: int) -> np.ndarray:
    """T_i from per-expert counts [..., E]: experts split into equal contiguous blocks over devices -> [..., M]."""
    c = np.asarray(expert_counts)
    e = c.shape[-1]
    if e % num_devices:
        raise ValueError(f"{num_devices} devices cannot hold {e} experts in equal contiguous blocks")
    return c.reshape(*c.shape[:-1], num_devices, e // num_devices).sum(-1)


def imbalance_from_counts(expert_counts: np.ndarray, tokens, num_devices: int) -> np.ndarray:
    """IS = (max_i T_i - min_i T_i) / |X| from per-expert counts [..., E] of a batch of ``tokens`` tokens."""
    loads = loads_per_device(expert_counts, num_devices)
    return (loads.max(-1) - loads.min(-1)) / np.asarray(tokens)


def device_loads(indices: np.ndarray, num_experts: int, num_devices: int) -> np.ndarray:
    """T_i: routed pairs per device. indices [..., T, K] -> [..., M] (experts split contiguously over devices)."""
    idx = np.asarray(indices)
    flat = idx.reshape(-1, idx.shape[-2] * idx.shape[-1])
    counts = np.stack([np.bincount(row, minlength=num_experts) for row in flat])
    return loads_per_device(counts.reshape(*idx.shape[:-2], num_experts), num_devices)


def imbalance_score(indices: np.ndarray, num_experts: int, num_devices: int) -> np.ndarray:
    """IS(X) = (max_i T_i - min_i T_i) / |X| for indices [..., T, K] (a scalar per leading index)."""
    loads = device_loads(indices, num_experts, num_devices)
    return (loads.max(-1) - loads.min(-1)) / np.asarray(indices).shape[-2]


def expert_load_stats(counts: np.ndarray) -> Dict[str, float]:
    """Per-expert load: max/mean, coefficient of variation, and entropy normalised to 1 for a uniform load."""
    c = np.asarray(counts, np.float64)
    mean = c.mean()
    if mean == 0:
        return {"max_over_mean": 0.0, "cv": 0.0, "entropy": 0.0}
    p = c / c.sum()
    nz = p[p > 0]
    entropy = float(-(nz * np.log(nz)).sum() / np.log(len(c))) if len(c) > 1 else 1.0
    return {"max_over_mean": float(c.max() / mean), "cv": float(c.std() / mean), "entropy": entropy}


def random_routing(trials: int, tokens: int, num_experts: int, k: int, groups: int, moge: bool,
                   rng: np.random.Generator) -> np.ndarray:
    """Uniformly random routing, indices [trials, tokens, k]: k distinct experts of all, or k/groups per group."""
    if moge:
        per_group, k_local = num_experts // groups, k // groups
        picks = np.argsort(rng.random((trials, tokens, groups, per_group)), -1)[..., :k_local]
        picks = picks + (np.arange(groups) * per_group)[None, None, :, None]
        return picks.reshape(trials, tokens, k)
    return np.argsort(rng.random((trials, tokens, num_experts)), -1)[..., :k]


def imbalance_monte_carlo(trials: int, tokens: int = 16, num_experts: int = 64, k: int = 8, groups: int = 8,
                          moge: bool = False, seed: int = 0, chunk: int = 2000) -> np.ndarray:
    """IS of ``trials`` random batches (Pro MoE paper eq. 4, Fig. 2b); groups doubles as the device count."""
    rng = np.random.default_rng(seed)
    out = []
    for start in range(0, trials, chunk):
        n = min(chunk, trials - start)
        out.append(imbalance_score(random_routing(n, tokens, num_experts, k, groups, moge, rng), num_experts, groups))
    return np.concatenate(out)
