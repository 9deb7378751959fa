"""MindIR export of a model's forward pass, choosing the MoE backend by the shapes asked.

aot custom ops survive MindIR only with static shapes, and the file stores the kernel library's absolute path
(``$MINDPANGU_CACHE/kernels/<hash>/libmindpangu_moe.so``): the library must be at that path when the file is
loaded. So a static-shape export keeps the C++ kernels, and a dynamic-shape request uses the composite reference
path, which needs no library.
"""
from __future__ import annotations

import copy
import os
from typing import Dict, Optional

import numpy as np
import mindspore as ms
from mindspore import nn

from ..moe.kernels import kernel_library, resolve_backend


def with_backend(model, backend: str):
    """The same model (same weights) rebuilt with ``moe.dispatch_backend = backend``."""
    from ..convert.hf import assign
    from ..models import build_model

    cfg = copy.deepcopy(model.config)
    cfg.moe.dispatch_backend = backend
    twin = build_model(cfg, init=False)
    assign(twin, {p.name: p.asnumpy() for p in model.get_parameters()}, "the exported model")
    return twin


def export_mindir(model, path: str, batch: Optional[int] = None, seq: Optional[int] = None) -> Dict:
    """Export ``model(input_ids [batch, seq]) -> logits`` to ``path`` (.mindir); None means a dynamic axis.

    Static shapes keep the model's backend (C++ kernels on CPU); a dynamic axis switches to the reference path.
    """
    dynamic = batch is None or seq is None
    backend = resolve_backend(model.config.moe.dispatch_backend)
    if dynamic and backend == "cpu_kernel":
        model, backend = with_backend(model, "reference"), "reference"
    if dynamic:
        example = ms.Tensor(shape=[batch, seq], dtype=ms.int32)
    else:
        example = ms.Tensor(np.zeros((batch, seq), np.int32))
    base = path[: -len(".mindir")] if path.endswith(".mindir") else path
    os.makedirs(os.path.dirname(os.path.abspath(base)), exist_ok=True)
    ms.export(model, example, file_name=base, file_format="MINDIR")
    return {"path": base + ".mindir", "dispatch_backend": backend, "input_shape": [batch, seq],
            "kernel_library": kernel_library() if backend == "cpu_kernel" else None}


def load_mindir(path: str) -> nn.GraphCell:
    """Load an exported file; allows the kernel cache for aot ops (MS_CUSTOM_AOT_WHITE_LIST) first."""
    kernel_library()
    return nn.GraphCell(ms.load(path))
