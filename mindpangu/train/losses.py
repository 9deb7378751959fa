"""Training losses: token cross-entropy, MTP, load-balancing (micro_batch / ep_group / global_batch), z-loss.

Balance loss (Switch / Pangu): alpha * sum_i f_i * p_i with
    f_i = N / (K * T) * #{(t, k): token t routed to expert i}     (no gradient)
    p_i = 1 / T * sum_t S_{i,t}                                  (S: router probabilities; sigmoid scores are
                                                                  normalised to sum 1 per token)
The three types differ only in which tokens the statistics pool over:
- micro_batch: each rank's tokens on their own; the losses are averaged over the ranks.
- ep_group: the tokens of all ranks of an expert-parallel group together (Pangu Ultra MoE); the losses are
  averaged over the groups. With one rank per group it equals micro_batch.
- global_batch: f_i over the whole global batch (all gradient-accumulation micro-batches), passed in as
  ``pooled_counts``; p_i per micro-batch, so the accumulated (averaged) loss is exactly the pooled one, whatever
  the split into micro-batches.
The token axis holds ``ranks`` contiguous slices, one per rank, and an EP group ``ranks_per_group`` consecutive
ones. On one process the ranks are emulated: the micro-batch is split into expert_parallel virtual ranks, one
group. In a semi-auto parallel graph (global view) they are the DP ranks and the groups the plan's EP groups
(``parallel.plan.balance_groups``): pooling a group's statistics is then a reduction over the EP group's ranks.
MoGE with ``balance_loss.moge_probs: group`` renormalises p_i within each of the M expert groups and averages the
M per-group losses (each sum_{i in g} f_i * p_i^g; 1 at perfect balance, like the global loss).
"""
from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops

from ..config.schema import TrainConfig
from ..parallel.plan import Layout, balance_groups


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


def balance_loss(scores, indices, num_experts: int, top_k: int, kind: str, ranks: int, sigmoid: bool,
                 pooled_counts=None, pooled_tokens=None, prob_groups: int = 1, ranks_per_group: int = None,
                 group_sum=None):
    """sum_i f_i * p_i for one MoE layer (unweighted; multiply by alpha outside). See the module docstring.

    scores [T, E] float32 router scores, indices [T, K] int chosen experts; T a multiple of ``ranks``.
    ``ranks_per_group`` (ep_group): consecutive ranks pooled together, all ``ranks`` when None; ``group_sum``: the
    ReduceSum primitive that pools [groups, ranks_per_group, E] over its middle axis (a sharded one in parallel
    graphs, see :class:`RouteLosses`).
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
    g = ranks
    per_rank_counts = counts.reshape(g, t // g, num_experts).sum(1)  # [g, E]
    per_rank_p = probs.reshape(g, t // g, num_experts).mean(1)       # [g, E]
    if kind == "micro_batch":
        f = per_rank_counts * (num_experts / (top_k * (t // g)))
        return (f * per_rank_p).sum(-1).mean()
    # ep_group: pool the statistics over the m ranks of each of the g // m groups
    m = g if ranks_per_group is None else ranks_per_group
    group_sum = ops.ReduceSum() if group_sum is None else group_sum
    f = group_sum(per_rank_counts.reshape(g // m, m, num_experts), 1) * (num_experts / (top_k * (t // g) * m))
    p = group_sum(per_rank_p.reshape(g // m, m, num_experts), 1) / m
    return (f * p).sum(-1).mean()


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
        self.group_sum = ops.ReduceSum()
        # the ranks the token axis holds and the EP groups over them: on one process (or one of a data-parallel job,
        # whose expert_parallel is 1) expert_parallel virtual ranks in one group; in a semi-auto parallel graph the
        # DP ranks of the global batch and the plan's EP groups over them
        ep = cfg.parallel_config.expert_parallel
        self.ranks, self.ranks_per_group = ep, ep
        if ms.get_auto_parallel_context("parallel_mode") in ("semi_auto_parallel", "auto_parallel"):
            self.ranks, self.ranks_per_group = balance_groups(Layout.from_config(cfg))
            if self.kind == "global_batch":
                # a semi-auto parallel step (TotalLoss) runs no routing pass over its micro-batches first, so f_i
                # pools the micro-batch over every DP rank, one group of all ranks (Megatron's global_aux_loss
                # all-reduces the counts over DP too, and also sums them over the step's micro-batches)
                self.kind, self.ranks_per_group = "ep_group", self.ranks
            # the statistics [groups, ranks_per_group, E] split over the DP ranks as the token axis is: the pooling
            # sum is an all-reduce over each group's ranks (the tensor-parallel copies on MindSpore's fastest
            # axis, as the TP ranks are numbered), i.e. over the plan's EP group
            self.group_sum.shard(((self.ranks // self.ranks_per_group, self.ranks_per_group, 1),))
        self.prob_groups = m.moe.num_groups if b.moge_probs == "group" else 1

    def construct(self, route, pooled_counts, pooled_tokens):
        _, indices, scores, logits, _ = route
        bal = ops.zeros((), ms.float32)
        zl = ops.zeros((), ms.float32)
        if self.kind != "none":
            bal = balance_loss(scores, indices, self.num_experts, self.top_k, self.kind, self.ranks,
                               self.sigmoid, pooled_counts, pooled_tokens, self.prob_groups, self.ranks_per_group,
                               self.group_sum)
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

