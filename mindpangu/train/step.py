"""The compiled pieces of a training step: the loss, a micro-step (forward, backward, accumulate) and the update
(unscale, global-norm clip, skip-if-non-finite AdamW, expert-bias update). The trainer calls them in order; each
is a Cell, so GRAPH mode compiles it once."""
from __future__ import annotations

import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import mindspore as ms
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

from ..config.schema import TrainConfig
from ..models.decoder import next_token_ids
from .losses import LayerLosses, cross_entropy
from .layerwise import Binding, LayerwiseMicroStep, PartTimer, relative_params
from .optim import AdamW, fused_adamw, fused_hyperparameters


def moe_layers(model):
    """The model's MoE cells in the order ``forward_train`` returns their router outputs (main, then MTP)."""
    layers = [layer for layer in model.model.layers if layer.is_moe]
    if model.model.num_mtp:
        layers += [layer for layer in model.model.mtp_layers if layer.is_moe]
    return [layer.mlp for layer in layers]


class _LayerStep(nn.Cell):
    """A decoder layer (or an MTP layer, :meth:`mtp_forward`) on its pipeline stage, adding its balance and z terms
    to the running sums: (h, balance sum, z sum, pooled counts [E], pooled tokens) -> (h', balance sum, z sum,
    counts [E])."""

    def __init__(self, layer, cfg: TrainConfig):
        super().__init__(auto_prefix=False)
        self.losses = LayerLosses(layer, cfg)
        self.is_moe = layer.is_moe
        stage = getattr(layer, "pipeline_stage", None)  # set by parallel.assign_stages (the property raises until)
        if stage is not None:
            self.pipeline_stage = stage

    def construct(self, h, bal, zl, pooled_counts, pooled_tokens):
        y, b, z, counts = self.losses(h, pooled_counts, pooled_tokens)
        return y, bal + b, zl + z, counts

    def mtp_forward(self, h, next_embeds, bal, zl, pooled_counts, pooled_tokens):
        """``MTPLayer.construct`` -> (residual out, head input, balance sum, z sum, counts [E])."""
        layer = self.losses.layer
        out, b, z, counts = self.losses(layer.input_projection(h, next_embeds), pooled_counts, pooled_tokens)
        return out, layer.shared_head(out), bal + b, zl + z, counts


class LossNet(nn.Cell):
    """tokens [B, S+1] -> (scaled total loss, (lm, mtp, balance, z, expert counts [layers, E])).

    ``CausalLM.forward_train`` with each MoE layer's balance and z terms computed where the layer runs (on its
    pipeline stage) and added into running sums that travel from layer to layer with the hidden states, as
    mindformers' ``extra_loss``: no router output crosses a pipeline stage (pooling every layer's router outputs
    at the end fails MindSpore's pipeline compiler). The sums are [B, 1, 1] tensors, every entry the same sum: a
    scalar passed between interleaved pipeline chunks fails MindSpore 2.10's compiler ("The pointer[fg_cnode] is
    null"), a tensor with the batch axis does not. Value and gradient are those of pooling the terms at the end
    (``tests/test_losses.py``).
    """

    def __init__(self, model, cfg: TrainConfig, fused_ce: bool = True):
        super().__init__(auto_prefix=False)
        self.model = model
        self.fused_ce = fused_ce  # False in semi-auto parallel graphs (see losses.cross_entropy)
        m = cfg.model
        self.mtp_weight = m.mtp_loss_weight
        self.num_mtp = m.num_mtp_layers
        b = m.moe.balance_loss
        self.coeff, self.z_coeff = b.coeff, b.z_loss_coeff
        self.num_experts = m.moe.num_experts
        inner = model.model
        # auto_prefix=False: the model's parameter names stay as they are
        self.layers = nn.CellList([_LayerStep(layer, cfg) for layer in inner.layers], auto_prefix=False)
        self.mtp_layers = nn.CellList([_LayerStep(layer, cfg) for layer in (inner.mtp_layers if inner.num_mtp
                                                                             else ())], auto_prefix=False)
        self.num_moe = len(moe_layers(model))

    def construct(self, tokens, pooled_counts, pooled_tokens, scale):
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        s = inputs.shape[1]
        inner = self.model.model
        h = inner.embed_tokens(inputs)
        # the MTP depths' input embeddings (of t_{i+j}) are looked up here, with the main one, on the first stage:
        # an embedding lookup after the last decoder layer makes MindSpore 2.10's interleaved-pipeline compile hang
        next_embeds = ()
        ids = inputs
        for _ in self.mtp_layers:
            ids = next_token_ids(ids)  # t_{i+j}
            next_embeds = next_embeds + (inner.embed_tokens(ids),)
        bal = ops.zeros_like(h[:, :1, :1])  # the running sums, [B, 1, 1]
        zl = bal
        counts = ()
        for layer in self.layers:
            h, bal, zl, c = layer(h, bal, zl, pooled_counts[len(counts)], pooled_tokens)
            if layer.is_moe:
                counts = counts + (c,)
        lm = cross_entropy(self.model.logits(inner.norm(h)), labels, self.fused_ce)
        mtp = ops.zeros((), ms.float32)
        depth = 0
        for layer in self.mtp_layers:
            h, head_in, bal, zl, c = layer.mtp_forward(h, next_embeds[depth], bal, zl, pooled_counts[len(counts)],
                                                       pooled_tokens)
            depth += 1
            mtp = mtp + cross_entropy(self.model.logits(head_in)[:, : s - depth], labels[:, depth:], self.fused_ce)
            if layer.is_moe:
                counts = counts + (c,)
        if self.num_mtp:
            mtp = mtp / self.num_mtp
        bal, zl = bal.mean(), zl.mean()
        total = lm + self.mtp_weight * mtp + self.coeff * bal + self.z_coeff * zl
        stacked = ops.stack(counts) if counts else ops.zeros((1, self.num_experts), ms.float32)
        mean_bal = bal / max(1, self.num_moe)
        return total * scale, (lm, mtp, mean_bal, zl, stacked)


class TotalLoss(nn.Cell):
    """tokens [B, S+1] -> the scalar training loss, for train steps built outside ``StepRunner`` (MindSpore's
    TrainOneStepCell under mindformers, the simulated parallel compile). The global_batch balance loss needs the
    counts of every accumulation micro-batch, which only ``StepRunner``'s routing pass gathers: in a semi-auto
    parallel graph it pools each micro-batch over all DP ranks instead (``RouteLosses``), elsewhere the counts
    passed are zero, so that term is 0. The cross-entropy is the unfused one, which semi-auto parallel can shard
    over the vocabulary."""

    def __init__(self, model, cfg: TrainConfig):
        super().__init__(auto_prefix=False)
        self.loss = LossNet(model, cfg, fused_ce=False)  # these steps are the semi-auto parallel ones
        self.pooled = ms.Tensor(np.zeros((max(1, self.loss.num_moe), cfg.model.moe.num_experts), np.float32))
        self.one = ms.Tensor(1.0, ms.float32)

    def construct(self, tokens):
        return self.loss(tokens, self.pooled, self.one, self.one)[0]


class RoutingStats(nn.Cell):
    """Forward only: expert counts [layers, E] of a micro-batch (for global_batch pooling before backward)."""

    def __init__(self, model, num_experts: int):
        super().__init__(auto_prefix=False)
        self.model, self.num_experts = model, num_experts

    def construct(self, tokens):
        _, _, routes = self.model.forward_train(tokens[:, :-1])
        counts = ()
        for route in routes:
            counts = counts + (route[4].astype(ms.float32),)
        return ops.stack(counts) if counts else ops.zeros((1, self.num_experts), ms.float32)


class MicroStep(nn.Cell):
    """Forward + backward of one micro-batch; gradients are added into the accumulators."""

    def __init__(self, loss_net: LossNet, params):
        super().__init__(auto_prefix=False)
        self.loss_net = loss_net
        self.params = ParameterTuple(params)
        self.accum = self.params.clone(prefix="accum", init="zeros")
        self.grad_fn = ms.value_and_grad(self.loss_net, None, self.params, has_aux=True)

    def construct(self, tokens, pooled_counts, pooled_tokens, scale):
        (loss, aux), grads = self.grad_fn(tokens, pooled_counts, pooled_tokens, scale)
        for acc, g in zip(self.accum, grads):
            ops.assign_add(acc, g)
        return loss, aux


_unscale = ops.MultitypeFuncGraph("unscale")
_square_sum = ops.MultitypeFuncGraph("square_sum")
_zero = ops.MultitypeFuncGraph("zero")


@_unscale.register("Tensor", "Tensor")
def _unscale_tensor(factor, acc):
    return acc * factor


@_square_sum.register("Tensor")
def _square_sum_tensor(acc):
    # large tensors: rows first, then the total. MindSpore's CPU ReduceSum over every axis of a large tensor runs
    # about 4x slower than the same sum over the last axis and then the rest (13 vs 3.4 ms for 2M floats); small
    # ones: one op (the step of a tiny model is mostly per-op overhead)
    sq = ops.square(acc)
    return sq.sum(-1).sum() if acc.ndim > 1 and acc.size >= 65536 else sq.sum()


@_zero.register("Tensor")
def _zero_tensor(acc):
    return ops.assign(acc, ops.zeros_like(acc))


class _GroupNorm(nn.Cell):
    """Sum of squares of a parameter group's accumulated gradients (after averaging them over data-parallel
    processes in place); the caller applies the loss-scale factor squared."""

    def __init__(self, accum, world: int):
        super().__init__(auto_prefix=False)
        self.accum, self.world = ParameterTuple(accum), world
        self.map = ops.HyperMap()
        if world > 1:
            self.all_reduce = ops.AllReduce()

    def construct(self):
        if self.world > 1:
            for acc in self.accum:
                ops.assign(acc, self.all_reduce(acc) / self.world)
        return ops.addn(self.map(_square_sum, self.accum))


class _GroupApply(nn.Cell):
    """AdamW on a parameter group from its accumulated gradients (unscaled, clipped) with MindSpore's fused
    AdamWeightDecay kernel (``optim.fused_hyperparameters``), then zero the accumulators."""

    def __init__(self, params, m, v, accum, wd, optimizer: AdamW):
        super().__init__(auto_prefix=False)
        self.params, self.m, self.v, self.accum = (ParameterTuple(x) for x in (params, m, v, accum))
        self.wd = tuple(Tensor(w, ms.float32) for w in wd)
        self.b1, self.b2 = Tensor(optimizer.b1, ms.float32), Tensor(optimizer.b2, ms.float32)
        self.map = ops.HyperMap()

    def construct(self, lr, eps, ratio, factor):
        grads = self.map(ops.partial(_unscale, factor), self.accum)
        self.map(ops.partial(fused_adamw, lr, self.b1, self.b2, eps, ratio), self.wd, self.params, self.m, self.v,
                 grads)
        self.map(_zero, self.accum)
        return lr


class _ZeroAccum(nn.Cell):
    """Zero a group's accumulators (a skipped step)."""

    def __init__(self, accum):
        super().__init__(auto_prefix=False)
        self.accum = ParameterTuple(accum)
        self.map = ops.HyperMap()

    def construct(self):
        self.map(_zero, self.accum)
        return ops.zeros((), ms.float32)


class _Finish(nn.Cell):
    """The step counter and the aux-loss-free expert-bias update (after an applied step)."""

    def __init__(self, optimizer: AdamW, expert_biases, bias_rate: float):
        super().__init__(auto_prefix=False)
        self.step = optimizer.step
        self.biases = ParameterTuple(expert_biases) if expert_biases else ()
        self.bias_rate = float(bias_rate)

    def construct(self, counts):
        ops.assign_add(self.step, ops.ones((), ms.float32))
        i = 0
        for bias in self.biases:
            load = counts[i]
            ops.assign_add(bias, self.bias_rate * ops.sign(load.mean() - load))
            i += 1
        return self.step


class UpdateStep:
    """Unscale the accumulated gradients, clip by global norm, AdamW if finite (nothing changes otherwise, not even
    the step count), zero the accumulators, and step the aux-loss-free expert biases:
    b_i += rate * sign(mean load - load_i).

    ``groups`` partitions the optimizer's parameters (lists of indices); groups with the same shapes in the same
    order (the decoder layers of one kind) share one compiled norm graph and one compiled AdamW graph, run for
    each group with its tensors bound (``layerwise.Binding``), so compile time does not grow with depth. Default:
    one group of everything. Called as ``update(lr, inv_scale, counts)`` -> (global grad norm, finite) tensors.
    """

    def __init__(self, accum, optimizer: AdamW, max_norm: float, expert_biases, bias_rate: float, world: int = 1,
                 groups: Optional[Sequence[Sequence[int]]] = None):
        accum = list(accum)
        params, m, v = list(optimizer.params), list(optimizer.m), list(optimizer.v)
        groups = [list(range(len(params)))] if groups is None else [list(g) for g in groups]
        if sorted(i for g in groups for i in g) != list(range(len(params))):
            raise ValueError("UpdateStep groups must partition the optimizer's parameters")
        self.optimizer = optimizer
        self.max_norm = float(max_norm)
        self.finish = _Finish(optimizer, expert_biases, bias_rate)
        by_shape: Dict[tuple, List[List[int]]] = {}
        for g in groups:
            by_shape.setdefault(tuple((tuple(params[i].shape), optimizer.decay[i]) for i in g), []).append(g)
        self.kinds = []
        for n, (key, members) in enumerate(by_shape.items()):
            first = members[0]
            if len(members) == 1:
                cells = [[x[i] for i in first] for x in (params, m, v, accum)]
                binding = None
            else:  # template tensors, bound to each member's tensors before a run
                cells = [[Parameter(Tensor(np.zeros(params[i].shape, np.float32)), name=f"update{n}.{role}.{j}",
                                    requires_grad=False) for j, i in enumerate(first)] for role in ("p", "m", "v", "g")]
                binding = Binding([t for role in cells for t in role],
                                  [[x[i] for x in (params, m, v, accum) for i in g] for g in members])
            self.kinds.append((binding, len(members), _GroupNorm(cells[3], world),
                               _GroupApply(*cells, [w for _, w in key], optimizer), _ZeroAccum(cells[3])))

    def _each(self):
        for binding, count, norm, apply, zero in self.kinds:
            for j in range(count):
                if binding is not None:
                    binding.bind(j)
                yield norm, apply, zero

    def __call__(self, lr, inv_scale, counts):
        sq = [cells[0]() for cells in self._each()]
        norm = ops.sqrt(ops.addn(sq) if len(sq) > 1 else sq[0]) * inv_scale
        finite = ops.isfinite(norm)
        if not bool(finite.asnumpy()):
            for _, _, zero in self._each():
                zero()
            return norm, finite
        clip = Tensor(1.0, ms.float32)
        if self.max_norm > 0:
            clip = ops.minimum(clip, self.max_norm / (norm + 1e-6))
        o = self.optimizer
        step = int(round(float(o.step.asnumpy()))) + 1
        lr_eff, eps_eff, ratio = (Tensor(x, ms.float32) for x in fused_hyperparameters(
            float(lr.asnumpy()), o.eps, (o.b1, o.b2), step))
        factor = inv_scale * clip  # unscale and clip in one multiply
        for _, apply, _ in self._each():
            apply(lr_eff, eps_eff, ratio, factor)
        self.finish(counts)
        return norm, finite


class GraphMicroStep(PartTimer):
    """The whole-graph engine: ``LossNet`` forward + backward compiled as one graph (``MicroStep``), with the same
    interface as ``layerwise.LayerwiseMicroStep``."""

    def __init__(self, model, cfg: TrainConfig, params):
        self.micro = MicroStep(LossNet(model, cfg), params)
        self.accum = self.micro.accum
        self.stats = RoutingStats(model, cfg.model.moe.num_experts)
        self.eval_net = EvalLoss(model)

    def __call__(self, tokens: np.ndarray, pooled: np.ndarray, pooled_tokens: float, scale: float):
        start = time.perf_counter()
        loss, (lm, mtp, bal, zl, c) = self.micro(ms.Tensor(tokens, ms.int32), ms.Tensor(pooled),
                                                  ms.Tensor(pooled_tokens, ms.float32), ms.Tensor(scale, ms.float32))
        self._tick("forward + backward (one graph)", start, loss)
        return (float(loss.asnumpy()), float(lm.asnumpy()), float(mtp.asnumpy()), float(bal.asnumpy()),
                float(zl.asnumpy()), c.asnumpy())

    def routing_counts(self, tokens: np.ndarray) -> np.ndarray:
        return self.stats(ms.Tensor(tokens, ms.int32)).asnumpy()

    def eval_loss(self, tokens: np.ndarray) -> float:
        return float(self.eval_net(ms.Tensor(tokens, ms.int32)).asnumpy())


class EvalLoss(nn.Cell):
    """Held-out LM loss of a batch [B, S+1]."""

    def __init__(self, model):
        super().__init__(auto_prefix=False)
        self.model = model

    def construct(self, tokens):
        return cross_entropy(self.model(tokens[:, :-1]), tokens[:, 1:])


# up to this depth the whole-graph step compiles in well under a minute and, without the recompute, runs 20-25 %
# faster than the layer-wise one (tiny Ultra MoE at 4 and 8 layers, tools/bench.py compare; README Benchmarks)
WHOLE_GRAPH_MAX_LAYERS = 8


def resolve_engine(cfg: TrainConfig) -> str:
    """``runner_config.engine`` with 'auto' resolved: 'whole_graph' up to ``WHOLE_GRAPH_MAX_LAYERS`` decoder layers,
    else 'layerwise'."""
    engine = cfg.runner_config.engine
    if engine == "auto":
        return "whole_graph" if cfg.model.num_layers <= WHOLE_GRAPH_MAX_LAYERS else "layerwise"
    return engine


def layer_groups(model, params) -> List[List[int]]:
    """Indices into ``params``: one group per decoder layer (same order and shapes within a layer kind), then one
    group of everything else (embedding, final norm, LM head, MTP)."""
    index_of = {id(p): i for i, p in enumerate(params)}
    groups = [[index_of[id(p)] for p in relative_params(layer) if id(p) in index_of] for layer in model.model.layers]
    grouped = {i for g in groups for i in g}
    rest = [i for i in range(len(params)) if i not in grouped]
    return groups + ([rest] if rest else [])


class StepRunner:
    """One optimizer step over a list of micro-batches: routing statistics (global_batch), micro-steps, update.

    Holds the model's optimizer and compiled cells (``engine``: ``runner_config.engine`` resolved); the trainer and the
    benchmark both drive it.
    """

    def __init__(self, model, cfg: TrainConfig, world: int = 1):
        """``world`` > 1: data-parallel processes (msrun); gradients, reported losses, expert counts and pooled
        routing statistics are reduced over them, so every process applies the same update."""
        self.cfg, self.world = cfg, world
        m, o = cfg.model, cfg.optimizer
        params = [p for p in model.get_parameters() if p.requires_grad]
        self.optimizer = AdamW(params, o.betas, o.eps, o.weight_decay)
        self.engine = resolve_engine(cfg)
        if self.engine == "layerwise":
            self.micro = LayerwiseMicroStep(model, cfg, params)
        else:
            self.micro = GraphMicroStep(model, cfg, params)
        layers = moe_layers(model)
        self.num_routes = max(1, len(layers))
        biases = [layer.gate.e_score_correction_bias for layer in layers if layer.gate.use_bias]
        # layer-wise: an update graph per layer kind, bound per layer (compile flat in depth); whole graph: one
        # update graph for all parameters (fewer graph launches)
        groups = layer_groups(model, params) if self.engine == "layerwise" else None
        self.update = UpdateStep(self.micro.accum, self.optimizer, o.grad_clip, biases,
                                 m.moe.balance_loss.expert_bias.update_rate, world, groups)
        if world > 1:
            from ..parallel.distributed import CrossRankSum

            self.cross_rank = CrossRankSum()
        self.state_params = list(model.get_parameters()) + list(self.optimizer.m) + list(self.optimizer.v) + \
            [self.optimizer.step]

    def run(self, micro_batches: List[np.ndarray], lr: float, loss_scale: float = 1.0) -> Dict:
        """Train on ``micro_batches`` ([B, S+1] int32 each) and return the step's losses and statistics: expert
        ``counts`` [routes, E] summed over the micro-batches (and data-parallel ranks), and this process's
        ``micro_counts``, one [routes, E] array per micro-batch."""
        accum = len(micro_batches)
        e = self.cfg.model.moe.num_experts
        batches = [np.asarray(b, np.int32) for b in micro_batches]
        tokens_per_micro = micro_batches[0].shape[0] * (micro_batches[0].shape[1] - 1)
        if self.cfg.model.moe.balance_loss.type == "global_batch":
            pooled = self._over_ranks(sum(self.micro.routing_counts(b) for b in batches))
            pooled_tokens = float(tokens_per_micro * accum * self.world)
        else:
            pooled, pooled_tokens = np.zeros((self.num_routes, e), np.float32), 1.0
        pooled = np.asarray(pooled, np.float32)
        scale = loss_scale / accum
        sums = np.zeros(5)
        counts = np.zeros((self.num_routes, e), np.float32)
        micro_counts = []
        for b in batches:
            loss, lm, mtp, bal, zl, c = self.micro(b, pooled, pooled_tokens, scale)
            sums += [loss / loss_scale, lm / accum, mtp / accum, bal / accum, zl / accum]
            counts += c
            micro_counts.append(c)
        if self.world > 1:
            sums = self._over_ranks(sums).astype(np.float64) / self.world
            counts = self._over_ranks(counts)
        start = time.perf_counter()
        norm, finite = self.update(ms.Tensor(lr, ms.float32), ms.Tensor(1.0 / loss_scale, ms.float32),
                                   ms.Tensor(counts))
        finite = bool(finite.asnumpy())
        timings = getattr(self.micro, "timings", None)
        if timings is not None:
            timings["optimizer (clip, AdamW)"] = timings.get("optimizer (clip, AdamW)", 0.0) + \
                time.perf_counter() - start
        sums = [float(x) for x in sums]
        return {"loss": sums[0], "lm_loss": sums[1], "mtp_loss": sums[2], "balance_loss": sums[3], "z_loss": sums[4],
                "grad_norm": float(norm.asnumpy()), "finite": finite, "lr": lr, "counts": counts,
                "micro_counts": micro_counts,
                "tokens": tokens_per_micro * accum * self.world}

    def eval_loss(self, tokens: np.ndarray) -> float:
        """Held-out LM loss of one batch [B, S+1] (main head only), with the training step's engine."""
        return self.micro.eval_loss(np.asarray(tokens, np.int32))

    def _over_ranks(self, values: np.ndarray) -> np.ndarray:
        if self.world == 1:
            return np.asarray(values)
        from ..parallel.distributed import sum_over_ranks

        return sum_over_ranks(values, self.cross_rank)
