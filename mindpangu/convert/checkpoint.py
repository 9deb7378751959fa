"""MindSpore checkpoints with their model config beside them, written atomically."""
from __future__ import annotations

import os
from typing import Dict, Tuple

import numpy as np
import yaml

from ..config import ModelConfig, load_config


OPTIMIZER_STATE = ("adam_m.", "adam_v.", "adam_step")  # what a training checkpoint holds beside the weights


def config_path_for(ckpt: str) -> str:
    """The YAML that describes a checkpoint's model: ``x.ckpt`` -> ``x.yaml``."""
    return os.path.splitext(ckpt)[0] + ".yaml"


def save_ms_checkpoint(model, cfg: ModelConfig, path: str) -> None:
    """Write ``path`` (MindSpore .ckpt) and its model YAML; each goes to a temp file first and is renamed."""
    import mindspore as ms

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}.ckpt"
    ms.save_checkpoint(model, tmp)
    yml = config_path_for(path)
    tmp_yml = f"{yml}.tmp{os.getpid()}"
    with open(tmp_yml, "w", encoding="utf-8") as fh:
        yaml.safe_dump({"model": cfg.to_dict()}, fh, sort_keys=False)
    os.replace(tmp_yml, yml)
    os.replace(tmp, path)


def checkpoint_config(path: str, config: str = "") -> ModelConfig:
    """The model config of a .ckpt: ``config`` or the YAML beside it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint '{path}' does not exist")
    config = config or config_path_for(path)
    if not os.path.isfile(config):
        raise FileNotFoundError(f"no model config for '{path}': pass --config or keep '{config}' beside it")
    return load_config(config).model


def load_ms_checkpoint(path: str, config: str = "") -> Tuple[ModelConfig, Dict[str, np.ndarray]]:
    """(model config, {name: array}) from a .ckpt and its YAML (``config`` or the one beside it); a training
    checkpoint's optimizer states are not read."""
    import mindspore as ms

    cfg = checkpoint_config(path, config)
    try:
        params = ms.load_checkpoint(path, choice_func=lambda name: not name.startswith(OPTIMIZER_STATE))
    except Exception as e:  # MindSpore raises ValueError/RuntimeError on a corrupt file
        raise ValueError(f"cannot read checkpoint '{path}': {e}") from None
    return cfg, {k: v.asnumpy() for k, v in params.items()}
