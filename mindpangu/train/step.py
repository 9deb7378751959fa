"""The compiled pieces of a training step: the loss, a micro-step (forward, backward, accumulate) and the update
(unscale, global-norm clip, skip-if-non-finite AdamW, expert-bias update). The trainer calls them in order; each
is a Cell, so GRAPH mode compiles it once."""
from __future__ import annotations

from typing import Dict, List

import numpy as np
import mindspore as ms
from mindspore import ParameterTuple, Tensor, nn, ops

from ..config.schema import TrainConfig
from .losses import balance_loss, cross_entropy, z_loss
from .optim import AdamW


def moe_layers(model):
    """The model's MoE cells in the order ``forward_train`` returns their router outputs (main, then MTP)."""
    layers = [layer for layer in model.model.layers if layer.is_moe]
    if model.model.num_mtp:
        layers += [layer for layer in model.model.mtp_layers if layer.is_moe]
    return [layer.mlp for layer in layers]


class LossNet(nn.Cell):
    """tokens [B, S+1] -> (scaled total loss, (lm, mtp, balance, z, expert counts [layers, E]))."""

    def __init__(self, model, cfg: TrainConfig):
        super().__init__(auto_prefix=False)
        self.model = model
        m = cfg.model
        self.mtp_weight = m.mtp_loss_weight
        self.num_mtp = m.num_mtp_layers
        b = m.moe.balance_loss
        self.kind, self.coeff, self.z_coeff = b.type, b.coeff, b.z_loss_coeff
        self.num_experts, self.top_k = m.moe.num_experts, m.moe.num_experts_per_tok
        self.sigmoid = m.moe.score_function == "sigmoid"
        self.virtual_ranks = cfg.parallel_config.expert_parallel
        self.num_moe = len(moe_layers(model))

    def construct(self, tokens, pooled_counts, pooled_tokens, scale):
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        s = inputs.shape[1]
        logits, mtp_logits, routes = self.model.forward_train(inputs)
        lm = cross_entropy(logits, labels)
        mtp = ops.zeros((), ms.float32)
        depth = 0
        for head in mtp_logits:
            depth += 1
            mtp = mtp + cross_entropy(head[:, : s - depth], labels[:, depth:])
        if self.num_mtp:
            mtp = mtp / self.num_mtp
        bal = ops.zeros((), ms.float32)
        zl = ops.zeros((), ms.float32)
        counts = ()
        i = 0
        for _, indices, scores, router_logits, layer_counts in routes:
            if self.kind != "none":
                bal = bal + balance_loss(scores, indices, self.num_experts, self.top_k, self.kind,
                                         self.virtual_ranks, self.sigmoid, pooled_counts[i], pooled_tokens)
            if self.z_coeff > 0:
                zl = zl + z_loss(router_logits)
            counts = counts + (layer_counts.astype(ms.float32),)
            i += 1
        total = lm + self.mtp_weight * mtp + self.coeff * bal + self.z_coeff * zl
        stacked = ops.stack(counts) if counts else ops.zeros((1, self.num_experts), ms.float32)
        mean_bal = bal / max(1, self.num_moe)
        return total * scale, (lm, mtp, mean_bal, zl, stacked)


class TotalLoss(nn.Cell):
    """tokens [B, S+1] -> the scalar training loss, for train steps built outside ``StepRunner`` (MindSpore's
    TrainOneStepCell under mindformers, the simulated parallel compile). The global_batch balance loss needs the
    global batch's pooled counts, which only ``StepRunner`` gathers: here they are zero, so that term is 0."""

    def __init__(self, model, cfg: TrainConfig):
        super().__init__(auto_prefix=False)
        self.loss = LossNet(model, cfg)
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


class UpdateStep(nn.Cell):
    """Unscale the accumulated gradients, clip by global norm, AdamW if finite, zero the accumulators, and step
    the aux-loss-free expert biases: b_i += rate * sign(mean load - load_i)."""

    def __init__(self, accum, optimizer: AdamW, max_norm: float, expert_biases, bias_rate: float, world: int = 1):
        super().__init__(auto_prefix=False)
        self.accum = accum
        self.world = world  # data-parallel processes: gradients are averaged over them first
        if world > 1:
            self.all_reduce = ops.AllReduce()
        self.optimizer = optimizer
        self.max_norm = float(max_norm)
        self.biases = ParameterTuple(expert_biases) if expert_biases else ()
        self.bias_rate = float(bias_rate)

    def construct(self, lr, inv_scale, counts):
        grads = ()
        sq = ops.zeros((), ms.float32)
        for acc in self.accum:
            g = acc * inv_scale
            if self.world > 1:
                g = self.all_reduce(g) / self.world
            grads = grads + (g,)
            sq = sq + (g * g).sum()
        norm = ops.sqrt(sq)
        finite = ops.isfinite(norm)
        if self.max_norm > 0:
            clip = ops.minimum(Tensor(1.0, ms.float32), self.max_norm / (norm + 1e-6))
            grads = tuple(g * clip for g in grads)
        self.optimizer(grads, lr, finite)
        for acc in self.accum:
            ops.assign(acc, ops.zeros_like(acc))
        i = 0
        for bias in self.biases:
            load = counts[i]
            step = self.bias_rate * ops.sign(load.mean() - load)
            ops.assign(bias, ops.select(finite, bias + step, bias))
            i += 1
        return norm, finite


class StepRunner:
    """One optimizer step over a list of micro-batches: routing statistics (global_batch), micro-steps, update.

    Holds the model's optimizer and compiled cells; the trainer and the benchmark both drive it.
    """

    def __init__(self, model, cfg: TrainConfig, world: int = 1):
        """``world`` > 1: data-parallel processes (msrun); gradients, reported losses, expert counts and pooled
        routing statistics are reduced over them, so every process applies the same update."""
        self.cfg, self.world = cfg, world
        m, o = cfg.model, cfg.optimizer
        params = [p for p in model.get_parameters() if p.requires_grad]
        self.optimizer = AdamW(params, o.betas, o.eps, o.weight_decay)
        self.micro = MicroStep(LossNet(model, cfg), params)
        layers = moe_layers(model)
        self.num_routes = max(1, len(layers))
        biases = [layer.gate.e_score_correction_bias for layer in layers if layer.gate.use_bias]
        self.update = UpdateStep(self.micro.accum, self.optimizer, o.grad_clip, biases,
                                 m.moe.balance_loss.expert_bias.update_rate, world)
        if world > 1:
            from ..parallel.distributed import CrossRankSum

            self.cross_rank = CrossRankSum()
        self.stats = RoutingStats(model, m.moe.num_experts)
        self.state_params = list(model.get_parameters()) + list(self.optimizer.m) + list(self.optimizer.v) + \
            [self.optimizer.step]

    def run(self, micro_batches: List[np.ndarray], lr: float, loss_scale: float = 1.0) -> Dict:
        """Train on ``micro_batches`` ([B, S+1] int32 each) and return the step's losses and statistics."""
        accum = len(micro_batches)
        e = self.cfg.model.moe.num_experts
        batches = [ms.Tensor(b, ms.int32) for b in micro_batches]
        tokens_per_micro = micro_batches[0].shape[0] * (micro_batches[0].shape[1] - 1)
        if self.cfg.model.moe.balance_loss.type == "global_batch":
            pooled = self._over_ranks(sum(self.stats(b).asnumpy() for b in batches))
            pooled_tokens = float(tokens_per_micro * accum * self.world)
        else:
            pooled, pooled_tokens = np.zeros((self.num_routes, e), np.float32), 1.0
        pooled_t = ms.Tensor(np.asarray(pooled, np.float32))
        scale = ms.Tensor(loss_scale / accum, ms.float32)
        sums = np.zeros(5)
        counts = np.zeros((self.num_routes, e), np.float32)
        for b in batches:
            loss, (lm, mtp, bal, zl, c) = self.micro(b, pooled_t, ms.Tensor(pooled_tokens, ms.float32), scale)
            sums += [float(loss.asnumpy()) / loss_scale, float(lm.asnumpy()) / accum, float(mtp.asnumpy()) / accum,
                     float(bal.asnumpy()) / accum, float(zl.asnumpy()) / accum]
            counts += c.asnumpy()
        if self.world > 1:
            sums = self._over_ranks(sums).astype(np.float64) / self.world
            counts = self._over_ranks(counts)
        norm, finite = self.update(ms.Tensor(lr, ms.float32), ms.Tensor(1.0 / loss_scale, ms.float32),
                                   ms.Tensor(counts))
        sums = [float(x) for x in sums]
        return {"loss": sums[0], "lm_loss": sums[1], "mtp_loss": sums[2], "balance_loss": sums[3], "z_loss": sums[4],
                "grad_norm": float(norm.asnumpy()), "finite": bool(finite.asnumpy()), "lr": lr, "counts": counts,
                "tokens": tokens_per_micro * accum * self.world}

    def _over_ranks(self, values: np.ndarray) -> np.ndarray:
        if self.world == 1:
            return np.asarray(values)
        from ..parallel.distributed import sum_over_ranks

        return sum_over_ranks(values, self.cross_rank)
