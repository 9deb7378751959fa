"""MindIR export: the plain forward pass (``export_mindir``) and the serving pair of prefill and cached decode
graphs with a manifest (``export_for_serving``), choosing the MoE backend by the shapes asked.

aot custom ops survive MindIR only with static shapes, and the file stores the kernel library's absolute path
(``$MINDPANGU_CACHE/kernels/<hash>/libmindpangu_kernels.so``): the library must be at that path when the file is
loaded. So a static-shape export keeps the C++ kernels, and a dynamic-shape request uses the composite reference
path with a fixed dispatch block size (the layout otherwise depends on the token count), which needs no library.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
from typing import Dict, List, Optional

import numpy as np
import mindspore as ms
from mindspore import nn

from ..fsutil import replace_dir, staging_dir
from ..kernels import kernel_library
from ..moe import resolve_backend

DYNAMIC_BLOCK = 8  # dispatch rows per expert block in dynamic-shape graphs: the least padding for decode batches


def with_backend(model, backend: str, fixed_block: int = 0):
    """The same model (same weights) rebuilt with ``moe.dispatch_backend = backend`` and
    ``moe.dispatch_block_size = fixed_block`` (> 0: a fixed dispatch block size, which dynamic shapes need);
    backend 'reference' also sets ``norm_backend`` to 'reference', so the graph holds no C++ kernel."""
    from ..convert.hf import assign
    from ..models import build_model

    cfg = copy.deepcopy(model.config)
    cfg.moe.dispatch_backend, cfg.moe.dispatch_block_size = backend, fixed_block
    if backend == "reference":
        cfg.norm_backend = "reference"
    twin = build_model(cfg, init=False)
    assign(twin, {p.name: p.asnumpy() for p in model.get_parameters()}, "the exported model")
    return twin


def export_mindir(model, path: str, batch: Optional[int] = None, seq: Optional[int] = None) -> Dict:
    """Export ``model(input_ids [batch, seq]) -> logits`` to ``path`` (.mindir); None means a dynamic axis.

    Static shapes keep the model's backends (C++ kernels on CPU, whose library path the result names); a dynamic
    axis switches to the reference path.
    """
    dynamic = batch is None or seq is None
    backend = resolve_backend(model.config.moe.dispatch_backend)
    if dynamic:
        model, backend = with_backend(model, "reference", DYNAMIC_BLOCK), "reference"
        example = ms.Tensor(shape=[batch, seq], dtype=ms.int32)
    else:
        example = ms.Tensor(np.zeros((batch, seq), np.int32))
    base = path[: -len(".mindir")] if path.endswith(".mindir") else path
    os.makedirs(os.path.dirname(os.path.abspath(base)), exist_ok=True)
    _export(model, [example], base)
    uses_kernels = any(getattr(cell, "use_kernel", False) for _, cell in model.cells_and_names())
    return {"path": base + ".mindir", "dispatch_backend": backend, "input_shape": [batch, seq],
            "kernel_library": kernel_library() if uses_kernels else None}


def _export(cell, inputs, base: str) -> None:
    """ms.export in GRAPH mode (the mode export compiles in), restoring the caller's mode."""
    mode = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        ms.export(cell, *inputs, file_name=base, file_format="MINDIR")
    finally:
        ms.set_context(mode=mode)


def _spec(name: str, shape, dtype: str, doc: str) -> Dict:
    return {"name": name, "shape": list(shape), "dtype": dtype, "doc": doc}


def serving_cells(model, max_len: int, dynamic_decode: bool = True):
    """(prefill, decode) cells of ``model`` with dynamic batch and prompt length and a ``max_len`` decode cache:
    the reference dispatch path with a fixed block size (dynamic shapes), same weights. ``dynamic_decode=False``
    leaves the decode batch static (one compile per batch size, ~4x faster per token on CPU than dynamic)."""
    from ..inference.steps import DecodeStep, PrefillStep

    twin = with_backend(model, "reference", DYNAMIC_BLOCK)
    layers, width = model.config.num_layers, twin.model.layers[0].self_attn.cache_width
    prefill, decode = PrefillStep(twin), DecodeStep(twin)
    prefill.set_inputs(ms.Tensor(shape=[None, None], dtype=ms.int32))
    if dynamic_decode:
        decode.set_inputs(ms.Tensor(shape=[None, 1], dtype=ms.int32), ms.Tensor(shape=[None, 1], dtype=ms.int32),
                          ms.Tensor(shape=[layers, None, max_len, width], dtype=ms.float32))
    return prefill, decode


def export_for_serving(model, out_dir: str, max_len: int, tokenizer: str = "", source: str = "") -> Dict:
    """Write ``prefill.mindir``, ``decode.mindir`` and ``manifest.json`` (plus the tokenizer, if given) to
    ``out_dir``, atomically (built aside, then swapped in). Batch and prompt length are dynamic; the decode
    cache has the fixed length ``max_len``. -> the manifest.
    """
    from ..params import kv_cache_bytes_per_token

    cfg = model.config
    if not 1 <= max_len <= cfg.max_position_embeddings:
        raise ValueError(f"--max-len must be in [1, max_position_embeddings = {cfg.max_position_embeddings}], "
                         f"got {max_len}")
    prefill, decode = serving_cells(model, max_len)
    layers, _, _, width = decode.get_inputs()[2].shape
    final = os.path.abspath(out_dir)
    tmp = staging_dir(final)
    _export(prefill, prefill.get_inputs(), os.path.join(tmp, "prefill"))
    _export(decode, decode.get_inputs(), os.path.join(tmp, "decode"))
    cache_kind = "mla_latent" if cfg.type == "pangu_ultra_moe" else "gqa_kv"
    sizes = kv_cache_bytes_per_token(cfg, 4)
    caches: List = ["L", "batch", "max_len", "D"]
    manifest = {
        "format": "mindpangu-mindir/1",
        "model_type": cfg.type,
        "source": source,
        "dispatch_backend": "reference",
        "graphs": {
            "prefill": {"file": "prefill.mindir",
                        "inputs": [_spec("input_ids", ["batch", "seq"], "int32", "prompt tokens, equal lengths")],
                        "outputs": [_spec("logits", ["batch", cfg.vocab_size], "float32", "last position"),
                                    _spec("caches", ["L", "batch", "seq", "D"], "float32",
                                          "per-layer cache of the prompt; pad axis 2 with zeros to max_len")]},
            "decode": {"file": "decode.mindir",
                       "inputs": [_spec("input_ids", ["batch", 1], "int32", "the newest token"),
                                  _spec("positions", ["batch", 1], "int32", "its position (= tokens before it)"),
                                  _spec("caches", caches, "float32", "from prefill or the previous step")],
                       "outputs": [_spec("logits", ["batch", 1, cfg.vocab_size], "float32", "next-token logits"),
                                   _spec("caches", caches, "float32", "with the new token written")]},
        },
        "cache": {"kind": cache_kind, "layers": layers, "D": width, "max_len": max_len, "dtype": "float32",
                  "bytes_per_token": sizes["cached"], "full_kv_bytes_per_token": sizes["full_kv"]},
        "tokenizer": None,
        "config": {"model": cfg.to_dict()},
    }
    if tokenizer:
        shutil.copyfile(tokenizer, os.path.join(tmp, "tokenizer.json"))
        manifest["tokenizer"] = "tokenizer.json"
    with open(os.path.join(tmp, "manifest.json"), "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=1)
    replace_dir(tmp, final)
    return manifest


def load_mindir(path: str) -> nn.GraphCell:
    """Load an exported file; allows the kernel cache for aot ops (MS_CUSTOM_AOT_WHITE_LIST) first."""
    kernel_library()
    return nn.GraphCell(ms.load(path))
