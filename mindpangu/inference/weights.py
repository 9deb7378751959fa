"""Build a model and load trained or converted weights, checking they were made for the config asked."""
from __future__ import annotations

import json
import os
from typing import Optional

from ..config import ModelConfig


def _training_checkpoint(path: str) -> Optional[str]:
    """The newest ``step_*`` directory for a training output dir, its checkpoints dir, or a step dir itself."""
    from ..train.checkpoint import checkpoint_dirs

    if os.path.isfile(os.path.join(path, "state.json")):
        return path
    for root in (path, os.path.join(path, "checkpoints")):
        found = checkpoint_dirs(root)
        if found:
            return found[-1][1]
    return None


def _check_same_model(saved: dict, cfg: ModelConfig, source: str) -> None:
    from ..train.checkpoint import config_differences

    diff = config_differences(saved, cfg.to_dict())
    if diff:
        raise ValueError(f"'{source}' holds weights for another model than the config: {'; '.join(diff[:6])}"
                         f"{' ...' if len(diff) > 6 else ''} (checkpoint -> config)")


def load_model(cfg: Optional[ModelConfig], ckpt: str = "", hf: str = ""):
    """The model of ``cfg`` with weights from ``ckpt`` (a training output dir, a ``step_*`` dir, or a .ckpt with
    its .yaml) or ``hf`` (a Hugging Face directory). With ``cfg`` None the checkpoint's own config is used."""
    import mindspore as ms

    from ..convert.checkpoint import OPTIMIZER_STATE, load_ms_checkpoint
    from ..convert.hf import assign, load_hf_directory
    from ..models import build_model

    if bool(ckpt) == bool(hf):
        raise ValueError("give exactly one of --ckpt (MindSpore checkpoint or training output dir) and --hf "
                         "(Hugging Face directory)")
    source = ckpt or hf
    if not os.path.exists(source):
        raise FileNotFoundError(f"checkpoint '{source}' does not exist")
    if hf:
        saved_cfg, params = load_hf_directory(hf)
    elif os.path.isdir(ckpt):
        step_dir = _training_checkpoint(ckpt)
        if step_dir is None:
            raise FileNotFoundError(f"no checkpoint in '{ckpt}' (expected step_XXXXXXXX/ with state.json and "
                                    "state.ckpt, as mindpangu-train writes)")
        with open(os.path.join(step_dir, "state.json"), encoding="utf-8") as fh:
            state = json.load(fh)
        from ..config.loader import model_config_from_dict

        saved_cfg = model_config_from_dict(state["model"])
        try:
            params = {k: v.asnumpy() for k, v in ms.load_checkpoint(
                os.path.join(step_dir, "state.ckpt"), choice_func=lambda n: not n.startswith(OPTIMIZER_STATE)).items()}
        except Exception as e:
            raise ValueError(f"cannot read checkpoint '{step_dir}': {str(e).splitlines()[0]}") from None
        source = step_dir
    else:
        saved_cfg, params = load_ms_checkpoint(ckpt)
    if cfg is None:
        cfg = saved_cfg
    else:
        _check_same_model(saved_cfg.to_dict(), cfg, source)
    model = build_model(cfg, init=False)
    assign(model, params, source)
    return model
