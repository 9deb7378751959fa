"""Training checkpoints: parameters, optimizer state, step, data position and counters, written atomically.

A checkpoint is a directory ``step_00000100/`` holding ``state.ckpt`` (model parameters, AdamW moments, step) and
``state.json`` (step, data position, loss scale, counters, the model config). It is written as
``step_00000100.tmp<pid>/`` and renamed into place, so a crash mid-save leaves the previous checkpoints intact;
only the newest ``keep`` are kept.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..fsutil import replace_dir, staging_dir

_NAME = re.compile(r"^step_(\d{8})$")
# Test hook: seconds to sleep after writing the files and before the rename (to kill a process mid-save).
FAULT_DELAY_ENV = "MINDPANGU_FAULT_SAVE_DELAY"


def checkpoint_dirs(root: str) -> List[Tuple[int, str]]:
    """Complete checkpoints under ``root`` as (step, path), oldest first."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _NAME.match(name)
        if m and os.path.isfile(os.path.join(root, name, "state.json")):
            found.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(found)


def save(root: str, step: int, params, state: Dict, keep: int) -> str:
    """Write checkpoint ``step`` (atomically) and delete all but the newest ``keep``."""
    import mindspore as ms

    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step_{step:08d}")
    tmp = staging_dir(final)
    ms.save_checkpoint([{"name": p.name, "data": p} for p in params], os.path.join(tmp, "state.ckpt"))
    with open(os.path.join(tmp, "state.json"), "w", encoding="utf-8") as fh:
        json.dump(state, fh, indent=1)
    delay = float(os.environ.get(FAULT_DELAY_ENV, "0") or 0)
    if delay:
        time.sleep(delay)
    replace_dir(tmp, final)
    for _, old in checkpoint_dirs(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for name in os.listdir(root):  # leftovers of saves that were killed
        if (".tmp" in name or ".old" in name) and not name.endswith((f".tmp{os.getpid()}", f".old{os.getpid()}")):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    return final


def load_latest(root: str) -> Optional[Tuple[str, Dict, Dict[str, np.ndarray]]]:
    """(path, state, {name: array}) of the newest checkpoint that reads back, or None if there is none."""
    import mindspore as ms

    for step, path in reversed(checkpoint_dirs(root)):
        try:
            with open(os.path.join(path, "state.json"), encoding="utf-8") as fh:
                state = json.load(fh)
            params = {k: v.asnumpy() for k, v in ms.load_checkpoint(os.path.join(path, "state.ckpt")).items()}
            return path, state, params
        except Exception as e:  # a corrupt checkpoint: say so and fall back to the one before
            print(f"warning: checkpoint '{path}' cannot be read ({str(e).splitlines()[0]}); trying an older one")
    return None


# how the MoE layers compute, not what the weights are: a checkpoint loads under any of them
IMPLEMENTATION_KEYS = ("model.moe.dispatch_backend", "model.moe.dispatch_block_size", "model.norm_backend",
                       "model.attention_backend", "model.decode_backend", "model.dynamic_shapes")


def config_differences(saved: Dict, current: Dict, prefix: str = "model") -> List[str]:
    """Keys whose values differ between two model-config dicts, as 'key: saved -> current' (the
    ``IMPLEMENTATION_KEYS`` aside)."""
    out = []
    for key in sorted(set(saved) | set(current)):
        if f"{prefix}.{key}" in IMPLEMENTATION_KEYS:
            continue
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}.{key}")
        elif a != b:
            out.append(f"{prefix}.{key}: {a!r} -> {b!r}")
    return out
