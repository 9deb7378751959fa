"""The Pro MoE paper's Monte Carlo of the imbalance score (random top-K vs MoGE), with a histogram PNG."""
from __future__ import annotations

import os

import numpy as np

from .metrics import imbalance_monte_carlo


def run(trials: int, tokens: int, num_experts: int, k: int, groups: int, seed: int, png: str = "") -> dict:
    """Simulate both routers; return their IS samples' summary and write a histogram if ``png`` is given."""
    topk = imbalance_monte_carlo(trials, tokens, num_experts, k, groups, moge=False, seed=seed)
    moge = imbalance_monte_carlo(trials, tokens, num_experts, k, groups, moge=True, seed=seed + 1)
    summary = {name: {"mean": float(x.mean()), "median": float(np.median(x)), "p_positive": float((x > 0).mean()),
                      "max": float(x.max())} for name, x in (("top-k", topk), ("MoGE", moge))}
    if png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        step = 1.0 / tokens
        bins = np.arange(-step / 2, max(topk.max(), step) + step, step)
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.hist(topk, bins=bins, density=False, weights=np.full(topk.size, 1 / topk.size), alpha=0.7,
                label=f"random top-{k} (mean IS {topk.mean():.3f})")
        ax.hist(moge, bins=bins, weights=np.full(moge.size, 1 / moge.size), alpha=0.7,
                label=f"MoGE, top-{k // groups} per group (mean IS {moge.mean():.3f})")
        ax.set_xlabel("imbalance score IS = (max - min device load) / tokens")
        ax.set_ylabel("probability")
        ax.set_title(f"N={num_experts} experts, K={k}, M={groups} devices, |X|={tokens} tokens, {trials} trials")
        ax.legend()
        fig.tight_layout()
        tmp = png + ".tmp.png"
        fig.savefig(tmp, dpi=120)
        plt.close(fig)
        os.replace(tmp, png)
    return summary
