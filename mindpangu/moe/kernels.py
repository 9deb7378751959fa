"""C++ MoE kernels (``ops/cpu/moe_kernels.cc``) as ``mindspore.ops.Custom(func_type="aot")`` ops, with bprops.

The shared library is built on first use with g++ into ``$MINDPANGU_CACHE/kernels/<source hash>/`` (default
``~/.cache/mindpangu``); MindSpore loads aot kernels only from ``MS_CUSTOM_AOT_WHITE_LIST``, which is set to that
cache unless the user set it. Without a compiler (or the source), :func:`kernel_library` returns None with a
warning and the models use the reference path.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import warnings
from typing import Optional

import numpy as np
import mindspore as ms
from mindspore import Tensor, ops

from ..fsutil import cache_root

SOURCE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "ops", "cpu",
                      "moe_kernels.cc")
FLAGS = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-pthread", "-D_GLIBCXX_USE_CXX11_ABI=0"]
_LIBRARY: dict = {}


def build_library(source: str = SOURCE, compiler: str = "g++") -> str:
    """Compile ``source`` into the kernel cache (once per source hash and flags) and return the .so path."""
    with open(source, "rb") as fh:
        digest = hashlib.sha256(fh.read() + " ".join(FLAGS).encode()).hexdigest()[:16]
    out_dir = os.path.join(cache_root(), "kernels", digest)
    lib = os.path.join(out_dir, "libmindpangu_moe.so")
    if not os.path.isfile(lib):
        os.makedirs(out_dir, exist_ok=True)
        tmp = f"{lib}.tmp{os.getpid()}"
        proc = subprocess.run([compiler, *FLAGS, source, "-o", tmp], capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"building {source} failed:\n{proc.stderr[-2000:]}")
        os.replace(tmp, lib)
    return lib


def kernel_library(required: bool = False) -> Optional[str]:
    """The kernel .so (built if needed), or None with a warning when it cannot be built and is not required."""
    if "path" in _LIBRARY:
        return _LIBRARY["path"]
    try:
        if not os.path.isfile(SOURCE):
            raise RuntimeError(f"kernel source {SOURCE} is not installed")
        if shutil.which("g++") is None:
            raise RuntimeError("no C++ compiler (g++) on PATH")
        path = build_library()
        root = os.path.realpath(os.path.join(cache_root(), "kernels"))
        allowed = os.environ.setdefault("MS_CUSTOM_AOT_WHITE_LIST", root)
        if not os.path.realpath(path).startswith(os.path.realpath(allowed)):
            raise RuntimeError(f"MS_CUSTOM_AOT_WHITE_LIST={allowed} does not include the kernel cache {root}")
    except RuntimeError as e:
        if required:
            raise
        warnings.warn(f"MoE CPU kernels unavailable, using the reference path: {e}")
        path = None
    _LIBRARY["path"] = path
    return path


def _custom(name: str, out_shape, out_dtype, bprop=None, **attrs):
    """An aot op. ``attrs`` must name everything besides the input shapes that ``out_shape`` depends on: PyNative
    caches a launched kernel by op name, input shapes and attributes, and would reuse a kernel built for another
    output shape (e.g. another top-k) otherwise."""
    op = ops.Custom(f"{kernel_library(required=True)}:{name}", out_shape=out_shape, out_dtype=out_dtype,
                    func_type="aot", bprop=bprop)
    for key, value in attrs.items():
        op.add_prim_attr(key, value)
    return op


def gating_config(moge: bool, sigmoid: bool, normalise: bool, scale: float, groups: int) -> Tensor:
    """The kernel's config vector {moge, sigmoid, normalise, scale, groups}."""
    return Tensor(np.array([moge, sigmoid, normalise, scale, groups], np.float32))


def make_gating(top_k: int):
    """(logits [T,E], bias [E], config [5]) -> (weights [T,K], indices [T,K] i32, scores [T,E], counts [E] i32)."""
    grad = _custom("MoeGatingGrad", lambda s, i, dw, ds, c: s, ms.float32)

    def bprop(logits, bias, config, out, dout):
        d_logits = grad(out[2], out[1], dout[0], dout[2], config)
        return d_logits, ops.zeros_like(bias), ops.zeros_like(config)

    return _custom("MoeGating", lambda x, b, c: ((x[0], top_k), (x[0], top_k), x, (x[1],)),
                   (ms.float32, ms.int32, ms.float32, ms.int32), bprop, top_k=top_k)


def make_permute(num_experts: int):
    """(x [T,H], indices [T,K]) -> (permuted [S,H], slot_of_row [R] i32, block_expert [B] i32, counts [E] i32).

    The layout is the reference ``permute_plan``'s: segments padded to ``block_size(R, E)`` rows, S = B * block.
    """
    from .token_dispatcher import block_size

    def shapes(x, i):
        rows = i[0] * i[1]
        block = block_size(rows, num_experts)
        blocks = -(-rows // block) + num_experts
        return (blocks * block, x[1]), (rows,), (blocks,), (num_experts,)

    grad = _custom("MoePermuteGrad", lambda d, s, x: x, ms.float32)

    def bprop(x, indices, out, dout):
        return grad(dout[0], out[1], x), ops.zeros_like(indices)

    return _custom("MoePermute", shapes, (ms.float32, ms.int32, ms.int32, ms.int32), bprop, num_experts=num_experts)


def make_unpermute():
    """(expert outputs [S,H], slot_of_row [R] i32, weights [T,K]) -> y [T,H] = sum_k weights * outputs[slot]."""
    grad = _custom("MoeUnpermuteGrad", lambda dy, ys, s, w: (ys, w), (ms.float32, ms.float32))

    def bprop(ys, slot, weights, out, dout):
        d_ys, d_weights = grad(dout, ys, slot, weights)
        return d_ys, ops.zeros_like(slot), d_weights

    return _custom("MoeUnpermute", lambda ys, s, w: (w[0], ys[1]), ms.float32, bprop)
