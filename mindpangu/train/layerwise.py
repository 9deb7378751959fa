"""The layer-wise training engine: every decoder layer kind is compiled once, whatever the depth.

GRAPH mode inlines a whole model into one graph, so compile time and compile memory grow with every layer
(about 10 s per layer here). This engine compiles one *template* cell per layer kind (dense, MoE) for the
forward pass and one for forward + backward, and runs every layer of that kind through the same compiled graph
by binding the template's Parameters to that layer's tensors before each call (``Parameter.set_data`` with a
Parameter shares its storage: no copy). The embedding and the head (final norm, LM head, cross-entropy, MTP)
are compiled once each. Only each layer's input is kept between the forward and the backward pass; the
backward recomputes the layer's forward inside its graph (per-layer full recompute, Megatron's
``recompute_granularity=full, recompute_method=uniform, recompute_num_layers=1``), so activation memory is
one residual stream per layer plus one layer's intermediates.

Each MoE layer adds its own balance and z-loss terms to the loss where it lives (the pooled statistics of
global_batch come in as inputs), so the total loss, its value and its gradient are those of ``LossNet``.
"""
from __future__ import annotations

import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import mindspore as ms
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

from ..config.schema import TrainConfig
from ..models.decoder import next_token_ids
from .losses import LayerLosses, cross_entropy


def relative_params(cell: nn.Cell) -> List[Parameter]:
    """The parameters of ``cell`` in a fixed order (by their names relative to the cell)."""
    return [p for _, p in sorted(cell.parameters_and_names(), key=lambda item: item[0])]


class Binding:
    """Points a template cell's parameters at the parameters of one of several cells of the same structure.

    ``bind(i)`` makes every template Parameter share the storage of the i-th cell's Parameter (no copy), so a
    graph compiled for the template computes with, and writes into, that cell's tensors.
    """

    def __init__(self, template: Sequence[Parameter], targets: Sequence[Sequence[Parameter]]):
        self.template = list(template)
        for i, target in enumerate(targets):
            if len(target) != len(self.template) or any(
                    tuple(a.shape) != tuple(b.shape) for a, b in zip(self.template, target)):
                raise ValueError(f"layer binding {i}: {len(target)} parameters do not match the template's "
                                 f"{len(self.template)} in order and shape")
        self.targets = [list(t) for t in targets]

    def bind(self, i: int) -> None:
        for t, p in zip(self.template, self.targets[i]):
            t.set_data(p)


class _Differentiable(nn.Cell):
    """The float outputs of ``LayerLosses`` (what the backward differentiates)."""

    def __init__(self, net):
        super().__init__(auto_prefix=False)
        self.net = net

    def construct(self, h, pooled_counts, pooled_tokens):
        y, bal, zl, _ = self.net(h, pooled_counts, pooled_tokens)
        return y, bal, zl


class LayerBackward(nn.Cell):
    """Recompute one layer and backpropagate: (h, dy, loss-term cotangents) -> dh; the parameter gradients are
    added into ``accum`` (bound, like the parameters, to the layer being run)."""

    def __init__(self, losses: LayerLosses, params: Sequence[Parameter], accum: Sequence[Parameter]):
        super().__init__(auto_prefix=False)
        self.net = _Differentiable(losses)
        self.params = ParameterTuple(params)
        self.accum = ParameterTuple(accum)
        self.grad = ops.GradOperation(get_all=True, get_by_list=True, sens_param=True)

    def construct(self, h, pooled_counts, pooled_tokens, dy, bal_sens, z_sens):
        d_inputs, d_params = self.grad(self.net, self.params)(h, pooled_counts, pooled_tokens, (dy, bal_sens, z_sens))
        for acc, g in zip(self.accum, d_params):
            ops.assign_add(acc, g)
        return d_inputs[0]


class _Head(nn.Cell):
    """The top of the model: final norm, LM head and cross-entropy, then the MTP layers with their heads and loss
    terms. (residual stream h_L [B, S, H], inputs [B, S], labels [B, S]) ->
    (lm, mtp (mean over depths), balance and z terms of the MTP MoE layers, their expert counts [n, E])."""

    def __init__(self, model, cfg: TrainConfig):
        super().__init__(auto_prefix=False)
        self.model = model
        # a plain list: a CellList would prefix the model's MTP parameter names with its indices
        self.mtp_layers = [LayerLosses(layer, cfg) for layer in (model.model.mtp_layers if model.model.num_mtp
                                                                   else ())]
        self.num_mtp = len(self.mtp_layers)
        self.num_experts = cfg.model.moe.num_experts

    def construct(self, h, inputs, labels, pooled_counts, pooled_tokens):
        s = inputs.shape[1]
        lm = cross_entropy(self.model.logits(self.model.model.norm(h)), labels)
        mtp = ops.zeros((), ms.float32)
        bal = ops.zeros((), ms.float32)
        zl = ops.zeros((), ms.float32)
        counts = ()
        ids = inputs
        depth = 0
        for losses in self.mtp_layers:
            ids = next_token_ids(ids)  # t_{i+j}, as in CausalLM.forward_train
            layer = losses.layer
            x = layer.input_projection(h, self.model.model.embed_tokens(ids))
            h, b, z, c = losses(x, pooled_counts[len(counts)], pooled_tokens)
            depth += 1
            head = self.model.logits(layer.shared_head(h))
            mtp = mtp + cross_entropy(head[:, : s - depth], labels[:, depth:])
            bal, zl = bal + b, zl + z
            if losses.is_moe:
                counts = counts + (c,)
        if self.num_mtp:
            mtp = mtp / self.num_mtp
        stacked = ops.stack(counts) if counts else ops.zeros((1, self.num_experts), ms.float32)
        return lm, mtp, bal, zl, stacked


class _HeadLoss(nn.Cell):
    """The head's weighted loss sum(weights * (lm, mtp, bal, z)) and, as aux, the terms and the MTP counts."""

    def __init__(self, head: _Head):
        super().__init__(auto_prefix=False)
        self.head = head

    def construct(self, h, inputs, labels, pooled_counts, pooled_tokens, weights):
        lm, mtp, bal, zl, counts = self.head(h, inputs, labels, pooled_counts, pooled_tokens)
        total = lm * weights[0] + mtp * weights[1] + bal * weights[2] + zl * weights[3]
        return total, (lm, mtp, bal, zl, counts)


class HeadBackward(nn.Cell):
    """Forward and backward of the head: -> ((lm, mtp, bal, z, counts), dh); parameter gradients are added into
    ``accum``. ``weights [4]`` are the loss coefficients times the loss scale."""

    def __init__(self, head: _Head, params, accum):
        super().__init__(auto_prefix=False)
        self.params, self.accum = ParameterTuple(params), ParameterTuple(accum)
        self.grad_fn = ms.value_and_grad(_HeadLoss(head), 0, self.params, has_aux=True)

    def construct(self, h, inputs, labels, pooled_counts, pooled_tokens, weights):
        (_, terms), (dh, d_params) = self.grad_fn(h, inputs, labels, pooled_counts, pooled_tokens, weights)
        for acc, g in zip(self.accum, d_params):
            ops.assign_add(acc, g)
        return terms, dh


class _Embed(nn.Cell):
    def __init__(self, embedding):
        super().__init__(auto_prefix=False)
        self.embedding = embedding

    def construct(self, ids):
        return self.embedding(ids)


class EmbedBackward(nn.Cell):
    """(ids, dh0) -> the embedding table's gradient, added into its accumulator; returns a scalar to wait on."""

    def __init__(self, embedding, accum: Parameter):
        super().__init__(auto_prefix=False)
        self.embed = _Embed(embedding)
        self.params = ParameterTuple([embedding.weight])
        self.accum = accum
        self.grad = ops.GradOperation(get_by_list=True, sens_param=True)

    def construct(self, ids, dh):
        g = self.grad(self.embed, self.params)(ids, dh)[0]
        ops.assign_add(self.accum, g)
        return dh.sum()


class _Kind:
    """The compiled cells of one layer kind and their bindings to the model's layers of that kind. The template is
    a fresh ``DecoderLayer`` built from the config (its own initial tensors are never used: it is always bound)."""

    def __init__(self, model, cfg: TrainConfig, members: List, first_index: int, accum_of: Dict[int, Parameter]):
        from ..models.decoder import DecoderLayer

        template = DecoderLayer(cfg.model, first_index, model.ATTENTION, model.SHARED_EXPERT)
        template.set_train(True)
        t_params = relative_params(template)
        trainable = [p for p in t_params if p.requires_grad]
        t_accum = ParameterTuple(trainable).clone(prefix="layerwise_accum", init="zeros")
        self.forward = LayerLosses(template, cfg)
        self.backward = LayerBackward(self.forward, trainable, t_accum)
        self.params = Binding(t_params, [relative_params(layer) for layer in members])
        self.accum = Binding(list(t_accum), [[accum_of[id(p)] for p in relative_params(layer) if p.requires_grad]
                                             for layer in members])


class PartTimer:
    """Opt-in wall time per part of a micro-step (tools/bench.py compare); ``timings`` is None until
    ``time_parts`` is called."""

    timings: Optional[Dict[str, float]] = None

    def time_parts(self) -> Dict[str, float]:
        """Start charging wall time per part (summed over calls) into the returned dict. Off by default: it waits
        for each part's outputs."""
        self.timings = {}
        return self.timings

    def _tick(self, part: str, start: float, out) -> float:
        """Charge the time since ``start`` to ``part`` once ``out`` exists; returns the new start."""
        if self.timings is None:
            return start
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, Tensor):
                t.asnumpy()
        now = time.perf_counter()
        self.timings[part] = self.timings.get(part, 0.0) + now - start
        return now


class LayerwiseMicroStep(PartTimer):
    """Forward + backward of one micro-batch layer by layer (see the module docstring); gradients are added into
    ``self.accum`` (aligned with ``params``). Also gives the routing statistics for global_batch pooling and the
    held-out loss, with the same compiled layers."""

    def __init__(self, model, cfg: TrainConfig, params: Sequence[Parameter]):
        self.accum = ParameterTuple(params).clone(prefix="accum", init="zeros")
        m = cfg.model
        b = m.moe.balance_loss
        self.coeff, self.z_coeff, self.mtp_weight = b.coeff, b.z_loss_coeff, m.mtp_loss_weight
        self.num_experts = m.moe.num_experts
        accum_of = {id(p): a for p, a in zip(params, self.accum)}
        layers = list(model.model.layers)
        self.kinds, self.order = {}, []
        for is_moe in (False, True):
            members = [layer for layer in layers if layer.is_moe == is_moe]
            if members:
                self.kinds[is_moe] = _Kind(model, cfg, members, layers.index(members[0]), accum_of)
        seen = {False: 0, True: 0}
        for layer in layers:
            self.order.append((layer.is_moe, seen[layer.is_moe]))
            seen[layer.is_moe] += 1
        self.num_main_moe = seen[True]
        in_layers = {id(p) for layer in layers for p in layer.get_parameters()}
        head_params = [p for p in params if id(p) not in in_layers]
        self.head = _Head(model, cfg)
        self.num_mtp_moe = sum(1 for losses in self.head.mtp_layers if losses.is_moe)
        self.head_backward = HeadBackward(self.head, head_params, [accum_of[id(p)] for p in head_params])
        embedding = model.model.embed_tokens
        self.embed = _Embed(embedding)
        self.embed_backward = EmbedBackward(embedding, accum_of[id(embedding.weight)])
        self.zero_row = Tensor(np.zeros((self.num_experts,), np.float32))
        self.one = Tensor(1.0, ms.float32)
        # the rows passed when nothing is pooled (routing statistics, eval)
        self.unpooled = self._rows(np.zeros((self.num_main_moe + self.num_mtp_moe, self.num_experts), np.float32))

    def _rows(self, pooled: np.ndarray):
        main = [Tensor(pooled[i]) for i in range(self.num_main_moe)]
        mtp = pooled[self.num_main_moe:self.num_main_moe + self.num_mtp_moe]
        return main, Tensor(mtp if len(mtp) else np.zeros((1, self.num_experts), np.float32))

    def _forward(self, inputs, rows, pooled_tokens):
        """-> (the input of every layer, the last residual stream, balance/z terms and counts of the MoE layers)."""
        h = self.embed(inputs)
        saved, terms = [], []
        for is_moe, j in self.order:
            kind = self.kinds[is_moe]
            kind.params.bind(j)
            saved.append(h)
            h, bal, zl, counts = kind.forward(h, rows[len(terms)] if is_moe else self.zero_row, pooled_tokens)
            if is_moe:
                terms.append((bal, zl, counts))
        return saved, h, terms

    def routing_counts(self, tokens: np.ndarray) -> np.ndarray:
        """Expert counts [MoE layers incl. MTP, E] of one micro-batch [B, S+1] (forward only)."""
        inputs, labels = Tensor(tokens[:, :-1]), Tensor(tokens[:, 1:])
        rows, mtp_rows = self.unpooled
        _, h, terms = self._forward(inputs, rows, self.one)
        out = [t[2].asnumpy() for t in terms]
        if self.num_mtp_moe:
            out += list(self.head(h, inputs, labels, mtp_rows, self.one)[4].asnumpy())
        return np.stack(out) if out else np.zeros((1, self.num_experts), np.float32)

    def __call__(self, tokens: np.ndarray, pooled: np.ndarray, pooled_tokens: float, scale: float):
        """tokens [B, S+1] int32 -> (scaled total loss, lm, mtp, mean balance, z, counts [routes, E]) as floats
        and an array, the same quantities as ``LossNet``."""
        inputs, labels = Tensor(tokens[:, :-1]), Tensor(tokens[:, 1:])
        rows, mtp_rows = self._rows(pooled)
        pt = Tensor(pooled_tokens, ms.float32)
        start = time.perf_counter()
        saved, h, terms = self._forward(inputs, rows, pt)
        start = self._tick("layers forward", start, h)
        weights = Tensor(np.array([scale, self.mtp_weight * scale, self.coeff * scale, self.z_coeff * scale],
                                  np.float32))
        (lm, mtp, bal_mtp, z_mtp, mtp_counts), dh = self.head_backward(h, inputs, labels, mtp_rows, pt, weights)
        start = self._tick("head (norm, LM head, loss, MTP) fwd+bwd", start, dh)
        bal_sens, z_sens = Tensor(self.coeff * scale, ms.float32), Tensor(self.z_coeff * scale, ms.float32)
        moe_i = len(terms)
        for i in range(len(self.order) - 1, -1, -1):
            is_moe, j = self.order[i]
            kind = self.kinds[is_moe]
            kind.params.bind(j)
            kind.accum.bind(j)
            if is_moe:
                moe_i -= 1
            dh = kind.backward(saved[i], rows[moe_i] if is_moe else self.zero_row, pt, dh, bal_sens, z_sens)
        start = self._tick("layers recompute+backward", start, dh)
        start = self._tick("embedding backward", start, self.embed_backward(inputs, dh))
        lm, mtp = float(lm.asnumpy()), float(mtp.asnumpy())
        bal = float(bal_mtp.asnumpy()) + sum(float(t[0].asnumpy()) for t in terms)
        zl = float(z_mtp.asnumpy()) + sum(float(t[1].asnumpy()) for t in terms)
        counts = [t[2].asnumpy() for t in terms]
        if self.num_mtp_moe:
            counts += list(mtp_counts.asnumpy())
        counts = np.stack(counts) if counts else np.zeros((1, self.num_experts), np.float32)
        total = (lm + self.mtp_weight * mtp + self.coeff * bal + self.z_coeff * zl) * scale
        num_moe = max(1, self.num_main_moe + self.num_mtp_moe)
        return total, lm, mtp, bal / num_moe, zl, counts

    def eval_loss(self, tokens: np.ndarray) -> float:
        """Held-out LM loss of one batch [B, S+1] (main head)."""
        inputs, labels = Tensor(tokens[:, :-1]), Tensor(tokens[:, 1:])
        rows, mtp_rows = self.unpooled
        _, h, _ = self._forward(inputs, rows, self.one)
        return float(self.head(h, inputs, labels, mtp_rows, self.one)[0].asnumpy())
