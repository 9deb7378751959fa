"""Model builders. ``build_model(model_cfg)`` returns an initialised ``mindspore.nn.Cell``."""
from __future__ import annotations

from ..config.schema import ModelConfig
from .init import init_rule, initialise
from .pangu_pro_moe import PanguProMoEForCausalLM
from .pangu_ultra_moe import PanguUltraMoEForCausalLM

MODEL_CLASSES = {"pangu_ultra_moe": PanguUltraMoEForCausalLM, "pangu_pro_moe": PanguProMoEForCausalLM}


def build_model(cfg: ModelConfig, seed: int = 0, init: bool = True):
    """Build the causal LM for ``cfg.type`` and initialise it by ``cfg.init_method`` (seeded)."""
    if cfg.type not in MODEL_CLASSES:
        raise ValueError(f"model.type '{cfg.type}' has no implementation; available: {', '.join(MODEL_CLASSES)}")
    model = MODEL_CLASSES[cfg.type](cfg)
    if init:
        initialise(model, cfg, seed)
    return model


__all__ = ["MODEL_CLASSES", "build_model", "init_rule", "initialise", "PanguProMoEForCausalLM",
           "PanguUltraMoEForCausalLM"]
