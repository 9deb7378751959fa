"""What an ablation run measures besides the training log: forward probes on held-out data, read-outs of the
parameters, and per-step routing statistics. Every function returns plain floats and lists (for result.json).

Probes run the model cell by cell in PyNative mode (one batch at a time, no compile), so they see every layer's
residual stream and router choice whatever engine trained the model.
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence

import numpy as np
import mindspore as ms

from ..metrics import expert_load_stats, imbalance_from_counts, kl_from_uniform, max_violation


def _rms(x) -> float:
    a = x.asnumpy().astype(np.float64)
    return float(np.sqrt((a * a).mean()))


def forward_probe(model, batches: Sequence[np.ndarray], domain_ids: Sequence[np.ndarray], num_domains: int,
                  num_experts: int) -> Dict:
    """Held-out statistics of ``model`` over ``batches`` ([B, S+1] int32, with per-token domain indices of the
    same shape, or empty arrays when the data has no domains).

    The loop repeats ``DecoderModel.construct`` layer by layer because the probe needs every layer's output.
    Returns ``act_rms [L + 1]`` (RMS of the residual stream entering each layer and leaving the last),
    ``token_loss_sum`` / ``token_count`` per domain (LM cross-entropy of the main head, nats), and
    ``domain_counts [MoE layers, domains, E]``: routed tokens per expert, by the domain of the token, and
    ``first_moe_indices [tokens, K]``: the first MoE layer's choices, in token order."""
    inner = model.model
    act = None
    moe_counts = None
    loss_sum = np.zeros(max(1, num_domains))
    tok = np.zeros(max(1, num_domains))
    first = []
    for batch, dom in zip(batches, domain_ids):
        ids = ms.Tensor(batch[:, :-1].astype(np.int32))
        labels = batch[:, 1:]
        d = dom[:, 1:].reshape(-1) if num_domains else np.zeros(labels.size, np.int64)
        h = inner.embed_tokens(ids)
        rms = [_rms(h)]
        routed = []
        for layer in inner.layers:
            h, route = layer(h)
            rms.append(_rms(h))
            if route is not None:
                routed.append(route[1].asnumpy())  # [T, K]
        logits = model.logits(inner.norm(h)).asnumpy().astype(np.float64)
        logits = logits.reshape(-1, logits.shape[-1])
        top = logits.max(-1, keepdims=True)
        lse = np.log(np.exp(logits - top).sum(-1)) + top[:, 0]
        nll = lse - logits[np.arange(len(logits)), labels.reshape(-1)]
        np.add.at(loss_sum, d, nll)
        np.add.at(tok, d, 1)
        act = np.array(rms) if act is None else act + rms
        if routed:
            first.append(routed[0])
            counts = np.zeros((len(routed), max(1, num_domains), num_experts))
            for i, idx in enumerate(routed):
                for k in range(idx.shape[1]):
                    np.add.at(counts[i], (d, idx[:, k]), 1)
            moe_counts = counts if moe_counts is None else moe_counts + counts
    out = {"act_rms": (act / len(batches)).tolist(), "token_loss_sum": loss_sum.tolist(), "token_count": tok.tolist()}
    if moe_counts is not None:
        out["domain_counts"] = moe_counts.tolist()
        out["first_moe_indices"] = np.concatenate(first)
    return out


def norm_weights(model) -> Dict[str, List[List[float]]]:
    """Per decoder layer, [mean, std] of each RMSNorm gamma: input_layernorm, post_attention_layernorm and, in
    the sandwich layouts, pre_mlp_layernorm and post_mlp_layernorm (S-ULTRA Fig. 10's statistics)."""
    out: Dict[str, List[List[float]]] = {}
    for layer in model.model.layers:
        for name in ("input_layernorm", "post_attention_layernorm", "pre_mlp_layernorm", "post_mlp_layernorm"):
            cell = getattr(layer, name, None)
            if cell is not None:
                g = cell.weight.asnumpy().astype(np.float64)
                out.setdefault(name, []).append([float(g.mean()), float(g.std())])
    return out


def param_rms(model) -> List[float]:
    """RMS over each decoder layer's matrices (2-D and larger parameters: projections and experts)."""
    out = []
    for layer in model.model.layers:
        sq = n = 0.0
        for p in layer.get_parameters():
            if len(p.shape) >= 2:
                a = p.asnumpy().astype(np.float64)
                sq += float((a * a).sum())
                n += a.size
        out.append(math.sqrt(sq / n) if n else 0.0)
    return out


class RoutingLog:
    """Routing statistics of training, one micro-batch at a time. On one process a micro-batch is what one EP group
    routes at once (its virtual EP ranks together), so per micro-batch: MaxVio_batch (Wang et al.'s MaxVio of one
    batch, averaged over MoE layers), the imbalance score over ``devices`` contiguous expert blocks (the EP ranks)
    and the per-expert load CV; ``total`` sums the counts over the run (MaxVio_global of training)."""

    def __init__(self, devices: int):
        self.devices = devices
        self.max_vio: List[float] = []
        self.imbalance: List[float] = []
        self.cv: List[float] = []
        self.total = None

    def add(self, counts: np.ndarray, tokens: int) -> None:
        """One micro-batch: per-expert counts [MoE layers, E] of its ``tokens`` tokens."""
        c = np.asarray(counts, np.float64)
        self.max_vio.append(float(max_violation(c).mean()))
        self.imbalance.append(float(imbalance_from_counts(c, tokens, self.devices).mean()))
        self.cv.append(float(np.mean([expert_load_stats(row)["cv"] for row in c])))
        self.total = c if self.total is None else self.total + c


def imbalance_by_batch(indices: np.ndarray, num_experts: int, devices: int,
                       sizes: Sequence[int] = (16, 64, 256, 1024, 4096)) -> Dict[str, List[float]]:
    """Imbalance scores of consecutive batches of each size (tokens) cut from routing choices [T, K] (a size
    larger than T is left out): Pro MoE's IS (eq. 3) over ``devices`` contiguous expert blocks."""
    from ..metrics import imbalance_score

    out = {}
    for size in sizes:
        n = len(indices) // size
        if n:
            out[str(size)] = [round(float(x), 6) for x in
                              imbalance_score(indices[: n * size].reshape(n, size, -1), num_experts, devices)]
    return out


def specialisation(domain_counts: np.ndarray) -> Dict[str, float]:
    """From held-out counts [layers, domains, E]: mean over layers and domains of each domain's KL from uniform,
    the largest per-domain expert frequency (Qwen's 0.15 / 0.2 thresholds), and MaxVio_global (all domains)."""
    c = np.asarray(domain_counts, np.float64)
    freq = c / np.maximum(c.sum(-1, keepdims=True), 1)
    return {"kl_specialisation": float(kl_from_uniform(c).mean()), "max_domain_expert_share": float(freq.max()),
            "max_vio_global": float(max_violation(c.sum(1)).mean())}
