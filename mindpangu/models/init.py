"""Parameter initialisation: TinyInit or the baseline small init, and DSSN's depth-scaled post-norm gamma.

Rules (Pangu Ultra, arXiv 2504.07866 §2.2 and eq. 1), d = hidden size, L = decoder layers:
- tinyinit: every matrix ~ N(0, 1/(2 d L)); embedding ~ N(0, 0.5^2).
- baseline: every matrix ~ N(0, 2/(5 d)); residual-output matrices (o_proj, down_proj) ~ N(0, 2/(5 d L));
  embedding ~ N(0, 2/(5 d)).
- norms: gamma = 1, except the post-sublayer norms of the dssn layout: c_attn / sqrt(L) and c_mlp / sqrt(L).
- biases 0; Pro MoE's router_scale 1; the aux-free expert bias 0.
"""
from __future__ import annotations

import math
from typing import Tuple

import numpy as np
from mindspore import Tensor, nn

from ..config.schema import ModelConfig

RESIDUAL_OUTPUTS = ("o_proj", "down_proj")


def init_rule(name: str, cfg: ModelConfig) -> Tuple[str, float]:
    """('normal', std) or ('const', value) for the parameter called ``name``."""
    d, layers = cfg.hidden_size, cfg.num_layers
    leaf = name.split(".")[-1]
    owner = name.split(".")[-2] if "." in name else ""
    if "norm" in owner or "norm" in leaf:
        if cfg.norm_layout == "dssn" and owner == "post_attention_layernorm":
            return "const", cfg.dssn_c_attn / math.sqrt(layers)
        if cfg.norm_layout == "dssn" and owner == "post_mlp_layernorm":
            return "const", cfg.dssn_c_mlp / math.sqrt(layers)
        return "const", 1.0
    if leaf == "bias" or leaf == "e_score_correction_bias":
        return "const", 0.0
    if leaf == "router_scale":
        return "const", 1.0
    if owner == "embed_tokens":
        if cfg.embedding_init_std is not None:
            return "normal", cfg.embedding_init_std
        return "normal", 0.5 if cfg.init_method == "tinyinit" else math.sqrt(2.0 / (5.0 * d))
    if cfg.init_method == "tinyinit":
        return "normal", math.sqrt(1.0 / (2.0 * d * layers))
    base = math.sqrt(2.0 / (5.0 * d))
    is_residual_out = owner in RESIDUAL_OUTPUTS or leaf in RESIDUAL_OUTPUTS
    return "normal", base / math.sqrt(layers) if is_residual_out else base


def initialise(model: nn.Cell, cfg: ModelConfig, seed: int = 0) -> None:
    """Set every parameter of ``model`` by :func:`init_rule`, reproducibly from ``seed``."""
    rng = np.random.default_rng(seed)
    for p in model.get_parameters():
        kind, value = init_rule(p.name, cfg)
        if kind == "const":
            data = np.full(p.shape, value, np.float32)
        else:
            data = rng.standard_normal(p.shape, dtype=np.float32) * np.float32(value)
        p.set_data(Tensor(data))
