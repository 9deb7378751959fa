"""AdamW with decoupled weight decay, and the learning-rate schedules."""
from __future__ import annotations

import math

import mindspore as ms
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

from ..config.schema import LRScheduleConfig


def decays(name: str) -> bool:
    """Weight decay applies to matrices and embeddings, not to norm gains, biases or Pro MoE's router_scale."""
    parts = name.split(".")
    leaf, owner = parts[-1], parts[-2] if len(parts) > 1 else ""
    return not ("norm" in owner or leaf in ("bias", "router_scale", "e_score_correction_bias"))


def learning_rate(step: int, total: int, cfg: LRScheduleConfig) -> float:
    """LR at optimizer step ``step`` (0-based) of ``total``: linear warmup, then cosine / constant / multi_cosine."""
    warmup = int(round(cfg.warmup_ratio * total)) if cfg.warmup_ratio is not None else cfg.warmup_steps
    if step < warmup:
        return cfg.learning_rate * (step + 1) / warmup
    if cfg.type == "constant":
        return cfg.learning_rate
    progress = (step - warmup) / max(1, total - warmup)
    if cfg.type == "cosine":
        return cfg.lr_end + 0.5 * (cfg.learning_rate - cfg.lr_end) * (1 + math.cos(math.pi * min(1.0, progress)))
    start = 0.0  # multi_cosine: consecutive legs [lr_start, lr_end, fraction of the post-warmup steps]
    for lr0, lr1, frac in cfg.legs:
        if progress < start + frac or (lr0, lr1, frac) == tuple(cfg.legs[-1]):
            local = min(1.0, (progress - start) / frac) if frac > 0 else 1.0
            return lr1 + 0.5 * (lr0 - lr1) * (1 + math.cos(math.pi * local))
        start += frac
    return cfg.lr_end


adamw_step = ops.MultitypeFuncGraph("adamw_step")


@adamw_step.register("Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor",
                 "Tensor", "Tensor")
def _adamw_tensor(b1, b2, eps, c1, c2, lr, apply, wd, p, m, v, g):
    """One tensor's AdamW step (bias-corrected moments, decoupled decay), applied only where ``apply``."""
    m_new = b1 * m + (1.0 - b1) * g
    v_new = b2 * v + (1.0 - b2) * g * g
    update = (m_new / c1) / (ops.sqrt(v_new / c2) + eps)
    p_new = p * (1.0 - lr * wd) - lr * update
    ops.assign(m, ops.select(apply, m_new, m))
    ops.assign(v, ops.select(apply, v_new, v))
    return ops.assign(p, ops.select(apply, p_new, p))


fused_adamw = ops.MultitypeFuncGraph("fused_adamw")
_ADAM_WEIGHT_DECAY = ops.AdamWeightDecay()


@fused_adamw.register("Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor",
                      "Tensor")
def _fused_adamw_tensor(lr, b1, b2, eps, ratio, wd, p, m, v, g):
    """The same step through MindSpore's fused AdamWeightDecay kernel (one pass over p, m, v), with the bias
    corrections folded in by ``fused_hyperparameters``; the decay is ``wd * ratio``."""
    return _ADAM_WEIGHT_DECAY(p, m, v, lr, b1, b2, eps, wd * ratio, g)


def fused_hyperparameters(lr: float, eps: float, betas, step: int):
    """(lr', eps', ratio) such that MindSpore's AdamWeightDecay (no bias correction: p -= lr' * (m / (sqrt(v) +
    eps') + d * p)) takes exactly the AdamW step above at 1-based ``step``:
    m_hat / (sqrt(v_hat) + eps) = (sqrt(c2) / c1) * m / (sqrt(v) + eps * sqrt(c2)), so lr' = lr * sqrt(c2) / c1,
    eps' = eps * sqrt(c2), and the decoupled decay lr * wd = lr' * d gives d = wd * c1 / sqrt(c2) = wd * ratio.
    Computed in float64 on the host."""
    c1 = 1.0 - float(betas[0]) ** step
    root_c2 = math.sqrt(1.0 - float(betas[1]) ** step)
    return lr * root_c2 / c1, eps * root_c2, c1 / root_c2


class AdamW(nn.Cell):
    """AdamW (Loshchilov & Hutter; PyTorch's form): p <- p * (1 - lr * wd) - lr * m_hat / (sqrt(v_hat) + eps).

    ``construct(grads, lr, apply)``: when ``apply`` is False (non-finite gradients) nothing changes, not even the
    step count. Moments are Parameters named ``adam_m.<param>`` / ``adam_v.<param>`` so checkpoints hold them.
    """

    def __init__(self, params, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1):
        super().__init__()
        self.params = ParameterTuple(params)
        self.m = self.params.clone(prefix="adam_m", init="zeros")
        self.v = self.params.clone(prefix="adam_v", init="zeros")
        self.step = Parameter(Tensor(0.0, ms.float32), name="adam_step", requires_grad=False)
        self.b1, self.b2, self.eps = float(betas[0]), float(betas[1]), float(eps)
        self.decay = [float(weight_decay) if decays(p.name) else 0.0 for p in self.params]
        self.wd = tuple(Tensor(d, ms.float32) for d in self.decay)
        self.map = ops.HyperMap()

    def construct(self, grads, lr, apply):
        t = self.step + ops.cast(apply, ms.float32)
        ops.assign(self.step, t)
        b1, b2 = Tensor(self.b1, ms.float32), Tensor(self.b2, ms.float32)
        c1 = 1.0 - ops.pow(b1, t)
        c2 = 1.0 - ops.pow(b2, t)
        self.map(ops.partial(adamw_step, b1, b2, Tensor(self.eps, ms.float32), c1, c2, lr, apply), self.wd, self.params,
                 self.m, self.v, grads)
        return t
