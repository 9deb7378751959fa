"""Training losses: token cross-entropy, MTP, load-balancing (micro_batch / ep_group / global_batch), z-loss.

Balance loss (Switch / Pangu): alpha * sum_i f_i * p_i with
    f_i = N / (K * T) * #{(t, k): token t routed to expert i}     (no gradient)
    p_i = 1 / T * sum_t S_{i,t}                                  (S: router probabilities; sigmoid scores are
                                                                  normalised to sum 1 per token)
The three types differ only in which tokens the statistics pool over:
- micro_batch: each of the ``virtual_ranks`` slices of the micro-batch on its own; the losses are averaged.
- ep_group: all virtual ranks of the expert-parallel group together (Pangu Ultra MoE). On one device the group
  is emulated by splitting the batch into ``virtual_ranks`` = expert_parallel slices; on a cluster it is an
  all-reduce over the real EP group. With one virtual rank it equals micro_batch.
- global_batch: f_i over the whole global batch (all gradient-accumulation micro-batches), passed in as
  ``pooled_counts``; p_i per micro-batch, so the accumulated (averaged) loss is exactly the pooled one, whatever
  the split into micro-batches.
MoGE with ``balance_loss.moge_probs: group`` renormalises p_i within each of the M expert groups and averages the
M per-group losses (each sum_{i in g} f_i * p_i^g; 1 at perfect balance, like the global loss).
"""
from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops

from ..config.schema import TrainConfig


_SPARSE_CE = ops.SparseSoftmaxCrossEntropyWithLogits()


def cross_entropy(logits, labels, fused: bool = True):
    """Mean token cross-entropy; logits [B, S, V] (any float dtype, computed in float32), labels [B, S] int32.

    fused: MindSpore's SparseSoftmaxCrossEntropyWithLogits (CPU and Ascend kernels); on CPU its forward + backward
    is about 6x faster than log_softmax + gather at a vocabulary of 8192. Semi-auto parallel gives that op only a
    batch-parallel strategy, which vocabulary-parallel logits refuse, so sharded graphs use ``fused=False``
    (log_softmax + gather, which MindSpore shards over the vocabulary).
    """
    if not fused:
        logp = ops.log_softmax(logits.astype(ms.float32), -1)
        return -ops.gather_elements(logp, 2, labels.reshape(labels.shape + (1,))).mean()
    v = logits.shape[-1]
    return _SPARSE_CE(logits.reshape(-1, v).astype(ms.float32), labels.reshape(-1).astype(ms.int32))


def router_probabilities(scores, sigmoid: bool):
    """The S_{i,t} the balance loss uses: softmax scores as they are, sigmoid scores normalised per token."""
    if sigmoid:
        return scores / (scores.sum(-1, keepdims=True) + 1e-20)
    return scores


def routed_counts(indices, num_experts: int):
    """[T, K] int -> [T, E] float32 count of how often each token chose each expert."""
    return ops.one_hot(indices, num_experts, ms.Tensor(1.0, ms.float32), ms.Tensor(0.0, ms.float32)).sum(1)


def balance_loss(scores, indices, num_experts: int, top_k: int, kind: str, virtual_ranks: int, sigmoid: bool,
                 pooled_counts=None, pooled_tokens=None, prob_groups: int = 1):
    """sum_i f_i * p_i for one MoE layer (unweighted; multiply by alpha outside). See the module docstring.
    ``prob_groups`` > 1: p_i renormalised within that many contiguous expert groups, the loss averaged over them."""
    t = scores.shape[0]
    probs = router_probabilities(scores, sigmoid)
    if prob_groups > 1:
        grouped = probs.reshape(t, prob_groups, num_experts // prob_groups)
        probs = (grouped / (grouped.sum(-1, keepdims=True) + 1e-20)).reshape(t, num_experts) / prob_groups
    counts = ops.stop_gradient(routed_counts(indices, num_experts))
    if kind == "global_batch":
        f = pooled_counts * (num_experts / (top_k * pooled_tokens))
        return (f * probs.mean(0)).sum()
    g = virtual_ranks
    per_rank_counts = counts.reshape(g, t // g, num_experts).sum(1)  # [g, E]
    per_rank_p = probs.reshape(g, t // g, num_experts).mean(1)       # [g, E]
    if kind == "micro_batch":
        f = per_rank_counts * (num_experts / (top_k * (t // g)))
        return (f * per_rank_p).sum(-1).mean()
    # ep_group: pool the statistics over the g ranks of the group
    f = per_rank_counts.sum(0) * (num_experts / (top_k * t))
    return (f * per_rank_p.mean(0)).sum()


def z_loss(logits):
    """Router z-loss: mean_t logsumexp(logits_t)^2."""
    lse = ops.logsumexp(logits.astype(ms.float32), -1)
    return (lse * lse).mean()


class RouteLosses(nn.Cell):
    """One MoE layer's unweighted balance and z-loss terms from its router outputs, as configured:
    (route (weights, indices, scores, logits, counts), pooled_counts [E], pooled_tokens) -> (balance, z), each 0
    when switched off. Shared by the whole-model loss and the layer-wise engine."""

    def __init__(self, cfg: TrainConfig):
        super().__init__(auto_prefix=False)
        m = cfg.model
        b = m.moe.balance_loss
        self.kind, self.z_on = b.type, b.z_loss_coeff > 0
        self.num_experts, self.top_k = m.moe.num_experts, m.moe.num_experts_per_tok
        self.sigmoid = m.moe.score_function == "sigmoid"
        self.virtual_ranks = cfg.parallel_config.expert_parallel
        self.prob_groups = m.moe.num_groups if b.moge_probs == "group" else 1

    def construct(self, route, pooled_counts, pooled_tokens):
        _, indices, scores, logits, _ = route
        bal = ops.zeros((), ms.float32)
        zl = ops.zeros((), ms.float32)
        if self.kind != "none":
            bal = balance_loss(scores, indices, self.num_experts, self.top_k, self.kind, self.virtual_ranks,
                               self.sigmoid, pooled_counts, pooled_tokens, self.prob_groups)
        if self.z_on:
            zl = z_loss(logits)
        return bal, zl


class LayerLosses(nn.Cell):
    """One decoder layer with the loss terms that live in it: h -> (h', balance term, z term, expert counts [E])
    (the terms 0 for a dense layer). The router outputs stay inside this cell's graph. Used by the layer-wise
    engine and by ``LossNet``."""

    def __init__(self, layer, cfg: TrainConfig):
        super().__init__(auto_prefix=False)
        self.layer = layer
        self.is_moe = layer.is_moe
        self.route_losses = RouteLosses(cfg)
        self.num_experts = cfg.model.moe.num_experts

    def construct(self, h, pooled_counts, pooled_tokens):
        y, route, _ = self.layer.block(h)
        bal = ops.zeros((), ms.float32)
        zl = ops.zeros((), ms.float32)
        counts = ops.zeros((self.num_experts,), ms.float32)
        if self.is_moe:
            bal, zl = self.route_losses(route, pooled_counts, pooled_tokens)
            counts = route[4].astype(ms.float32)
        return y, bal, zl, counts

