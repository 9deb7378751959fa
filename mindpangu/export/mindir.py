"""MindIR export: the plain forward pass (``export_mindir``) and the serving graphs with a manifest
(``export_for_serving``: prefill, cached decode per batch size, MTP speculative graphs), choosing the MoE backend
by the shapes asked.

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
from typing import Dict, Optional, Sequence

import numpy as np
import mindspore as ms
from mindspore import nn

from ..fsutil import replace_dir, staging_dir
from ..kernels import kernel_library, resolve_kernels
from ..moe import resolve_backend

DYNAMIC_BLOCK = 8  # dispatch rows per expert block in dynamic-shape graphs (prefill): little padding for short prompts


def with_backend(model, backend: str, dynamic: bool = False):
    """The same model (same weights) rebuilt with ``moe.dispatch_backend = backend``; backend 'reference' also sets
    ``norm_backend``, ``attention_backend`` and ``decode_backend`` to 'reference', so the graph holds no C++
    kernel. ``dynamic``: for inputs of dynamic batch and length (``model.dynamic_shapes``, with the fixed dispatch
    block ``DYNAMIC_BLOCK``)."""
    from ..convert.hf import assign
    from ..models import build_model

    cfg = copy.deepcopy(model.config)
    cfg.moe.dispatch_backend = backend
    cfg.moe.dispatch_block_size = DYNAMIC_BLOCK if dynamic else 0
    cfg.dynamic_shapes = dynamic
    if backend == "reference":
        cfg.norm_backend = cfg.attention_backend = cfg.decode_backend = "reference"
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
        model, backend = with_backend(model, "reference", dynamic=True), "reference"
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


def serving_cells(model, max_len: int, batch_sizes: Sequence[int] = (1,)):
    """(prefill, {batch: decode}) cells of ``model`` (same weights). Prefill has dynamic batch and prompt length,
    so it runs the reference path with a fixed dispatch block size; each decode cell has a static batch, its
    caches inside as Parameters of length ``max_len``, and the model's own backends (C++ kernels on CPU)."""
    from ..inference.steps import DecodeStep, PrefillStep

    prefill = PrefillStep(with_backend(model, "reference", dynamic=True))
    prefill.set_inputs(ms.Tensor(shape=[None, None], dtype=ms.int32), ms.Tensor(shape=[None], dtype=ms.int32))
    return prefill, {b: DecodeStep(model, b, max_len) for b in batch_sizes}


def draft_prefill_cell(prefill):
    """The first MTP layer over a prompt (``DraftPrefillStep``) with a dynamic prompt length, batch 1, on the
    model that ``prefill`` (from :func:`serving_cells`) already runs: the reference path with a fixed dispatch
    block size, so the weights are not copied a second time."""
    from ..inference.steps import DraftPrefillStep

    model = prefill.model
    cell = DraftPrefillStep(model)
    cell.set_inputs(ms.Tensor(shape=[1, None, model.config.hidden_size], dtype=ms.float32),
                    ms.Tensor(shape=[1, None], dtype=ms.int32))
    return cell


def _step_inputs(batch: int, queries: int):
    zeros = np.zeros((batch, queries), np.int32)
    return [ms.Tensor(zeros), ms.Tensor(zeros)]


def export_for_serving(model, out_dir: str, max_len: int, tokenizer: str = "", source: str = "",
                       batch_sizes: Sequence[int] = (1, 4, 16)) -> Dict:
    """Write the serving graphs and ``manifest.json`` (plus the tokenizer, if given) to ``out_dir``, atomically
    (built aside, then swapped in): ``prefill.mindir`` (dynamic batch and prompt length), one
    ``decode_b<B>.mindir`` per batch size in ``batch_sizes`` (caches of length ``max_len`` inside, updated in
    place), and for a model with MTP layers ``draft_prefill.mindir`` and ``speculative.mindir`` (verify + draft
    in one graph, batch 1). Each file holds its own copy of the weights. -> the manifest.
    Raises ValueError for a ``max_len`` outside [1, max_position_embeddings] or a batch size < 1.
    """
    from ..inference.generate import FORMAT
    from ..inference.steps import CACHE_PREFIX, MTP_CACHE, SpeculativeStep
    from ..params import kv_cache_bytes_per_token

    cfg = model.config
    if not 1 <= max_len <= cfg.max_position_embeddings:
        raise ValueError(f"--max-len must be in [1, max_position_embeddings = {cfg.max_position_embeddings}], "
                         f"got {max_len}")
    sizes = sorted(set(int(b) for b in batch_sizes))
    if not sizes or sizes[0] < 1:
        raise ValueError(f"decode batch sizes must be >= 1, got {list(batch_sizes)}")
    prefill, decodes = serving_cells(model, max_len, sizes)
    layers, width = cfg.num_layers, model.model.layers[0].self_attn.cache_width
    final = os.path.abspath(out_dir)
    tmp = staging_dir(final)
    _export(prefill, prefill.get_inputs(), os.path.join(tmp, "prefill"))
    ids = _spec("input_ids", ["batch", "Q"], "int32", "the newest token of each sequence (Q = 1)")
    positions = _spec("positions", ["batch", "Q"], "int32", "its position (= tokens before it); < max_len")
    logits = _spec("logits", ["batch", "Q", cfg.vocab_size], "float32", "next-token logits")
    caches = {"parameters": [f"{CACHE_PREFIX}{i}" for i in range(layers)], "shape": ["batch * max_len", "D"],
              "doc": "one Parameter per layer, row b * max_len + p = sequence b's position p, written in place "
                     "each step; fill from prefill with set_data"}
    graphs = {
        "prefill": {"file": "prefill.mindir",
                    "inputs": [_spec("input_ids", ["batch", "seq"], "int32", "prompts, right-padded with any id"),
                               _spec("lengths", ["batch"], "int32", "each prompt's length")],
                    "outputs": [_spec("logits", ["batch", cfg.vocab_size], "float32", "each prompt's last token"),
                                _spec("hidden", ["batch", "seq", cfg.hidden_size], "float32",
                                      "residual stream before the final norm (MTP drafting)"),
                                _spec("caches", ["L", "batch", "seq", "D"], "float32",
                                      "the prompts' cache entries; copy into a decode graph's cache Parameters")]},
    }
    for b, cell in decodes.items():
        name = f"decode_b{b}"
        _export(cell, _step_inputs(b, 1), os.path.join(tmp, name))
        graphs[name] = {"file": f"{name}.mindir", "batch": b, "inputs": [ids, positions], "outputs": [logits],
                        "caches": caches}
    if cfg.num_mtp_layers:
        draft_prefill = draft_prefill_cell(prefill)
        _export(draft_prefill, draft_prefill.get_inputs(), os.path.join(tmp, "draft_prefill"))
        _export(SpeculativeStep(model, max_len), _step_inputs(1, 2), os.path.join(tmp, "speculative"))
        graphs["draft_prefill"] = {"file": "draft_prefill.mindir", "doc": "first MTP layer over the prompt: "
                                   "(hidden [1, S, H], next tokens [1, S]) -> (logits [1, S, V], cache entries "
                                   "[1, S, D]); copy the entries into the speculative graph's mtp_cache"}
        graphs["speculative"] = {
            "file": "speculative.mindir", "batch": 1,
            "inputs": [_spec("input_ids", [1, 2], "int32", "[newest token, draft]"),
                       _spec("positions", [1, 2], "int32", "[p, p + 1]")],
            "outputs": [_spec("tokens", [3], "int32", "greedy token after the newest, after the draft, next draft")],
            "caches": {"parameters": caches["parameters"] + [MTP_CACHE], "shape": ["max_len", "D"],
                       "doc": "main-model caches, then the MTP layer's; fill from prefill and draft_prefill"}}
    cache_kind = "mla_latent" if cfg.type == "pangu_ultra_moe" else "gqa_kv"
    bytes_per = kv_cache_bytes_per_token(cfg, 4)
    backend = resolve_backend(cfg.moe.dispatch_backend)
    uses_kernels = "cpu_kernel" in (resolve_kernels(cfg.norm_backend, "model.norm_backend"), backend,
                                    resolve_kernels(cfg.attention_backend, "model.attention_backend"),
                                    resolve_kernels(cfg.decode_backend, "model.decode_backend"))
    manifest = {
        "format": FORMAT,
        "model_type": cfg.type,
        "source": source,
        "prefill_dispatch_backend": "reference",
        "decode_dispatch_backend": backend,
        "kernel_library": kernel_library() if uses_kernels else None,
        "decode_batch_sizes": sizes,
        "graphs": graphs,
        "cache": {"kind": cache_kind, "layers": layers, "D": width, "max_len": max_len, "dtype": "float32",
                  "bytes_per_token": bytes_per["cached"], "full_kv_bytes_per_token": bytes_per["full_kv"]},
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
