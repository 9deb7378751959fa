"""C++ CPU kernels (``ops/cpu/*.cc``) as ``mindspore.ops.Custom(func_type="aot")`` ops, with bprops: the build,
the op wrapper, the choice between them and the composite reference ops, and the RMSNorm op (the MoE ops are in
``moe/kernels.py``).

The shared library is built on first use with g++ into ``$MINDPANGU_CACHE/kernels/<source hash>/`` (default
``~/.cache/mindpangu``); MindSpore loads aot kernels only from ``MS_CUSTOM_AOT_WHITE_LIST``, which is set to that
cache unless the user set it. Without a compiler (or the sources), :func:`kernel_library` returns None with a
warning and the models use the reference path.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import warnings
from typing import Optional, Sequence

import numpy as np
import mindspore as ms
from mindspore import Tensor, ops

from .fsutil import cache_root

_OPS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ops", "cpu")
SOURCES = tuple(os.path.join(_OPS, name)
                for name in ("moe_kernels.cc", "expert_kernels.cc", "norm_kernels.cc", "softmax_kernels.cc",
                             "decode_kernels.cc"))
HEADERS = (os.path.join(_OPS, "parallel_for.h"), os.path.join(_OPS, "dot.h"))
# the grouped expert kernels call dnnl_sgemm from the oneDNN that MindSpore's CPU backend ships (and loads)
_MS_LIB = os.path.join(os.path.dirname(os.path.abspath(ms.__file__)), "lib")
DNNL = os.path.join(_MS_LIB, "libdnnl.so.3")
FLAGS = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-pthread", "-D_GLIBCXX_USE_CXX11_ABI=0"]
LINK = [f"-L{_MS_LIB}", "-l:libdnnl.so.3", f"-Wl,-rpath,{_MS_LIB}"]
_LIBRARY: dict = {}


def build_library(sources: Sequence[str] = SOURCES, compiler: str = "g++") -> str:
    """Compile ``sources`` into one library in the kernel cache (once per source hash and flags); -> the .so path.
    Raises RuntimeError with the compiler's message when the build fails."""
    digest = hashlib.sha256(" ".join(FLAGS + LINK).encode())
    for source in (*sources, *HEADERS):
        with open(source, "rb") as fh:
            digest.update(fh.read())
    out_dir = os.path.join(cache_root(), "kernels", digest.hexdigest()[:16])
    lib = os.path.join(out_dir, "libmindpangu_kernels.so")
    if not os.path.isfile(lib):
        os.makedirs(out_dir, exist_ok=True)
        tmp = f"{lib}.tmp{os.getpid()}"
        proc = subprocess.run([compiler, *FLAGS, *sources, "-o", tmp, *LINK], capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"building {' '.join(sources)} failed:\n{proc.stderr[-2000:]}")
        os.replace(tmp, lib)
    return lib


def kernel_library(required: bool = False) -> Optional[str]:
    """The kernel .so (built if needed), or None with a warning when it cannot be built and is not required."""
    if "path" in _LIBRARY:
        return _LIBRARY["path"]
    try:
        missing = [s for s in (*SOURCES, *HEADERS) if not os.path.isfile(s)]
        if missing:
            raise RuntimeError(f"kernel source {missing[0]} is not installed")
        if not os.path.isfile(DNNL):
            raise RuntimeError(f"MindSpore's oneDNN library {DNNL} is missing (this MindSpore build has no CPU backend?)")
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
        warnings.warn(f"C++ CPU kernels unavailable, using the reference path: {e}")
        path = None
    _LIBRARY["path"] = path
    return path


def custom_op(name: str, out_shape, out_dtype, bprop=None, **attrs):
    """An aot op. ``attrs`` must name everything besides the input shapes that ``out_shape`` depends on: PyNative
    caches a launched kernel by op name, input shapes and attributes, and would reuse a kernel built for another
    output shape (e.g. another top-k) otherwise."""
    op = ops.Custom(f"{kernel_library(required=True)}:{name}", out_shape=out_shape, out_dtype=out_dtype,
                    func_type="aot", bprop=bprop)
    for key, value in attrs.items():
        op.add_prim_attr(key, value)
    return op


def semi_auto_parallel() -> bool:
    """Whether MindSpore's parallel context is semi-auto or auto parallel (layouts shard the composite ops)."""
    return ms.get_auto_parallel_context("parallel_mode") in ("semi_auto_parallel", "auto_parallel")


def resolve_kernels(requested: str, key: str) -> str:
    """'reference' or 'cpu_kernel' for a ``*_backend`` option named ``key``. auto: the C++ kernels on CPU when
    they build and no semi-auto parallel context is set (parallel layouts shard the composite ops), else the
    reference path. Raises ValueError for 'cpu_kernel' off CPU."""
    target = ms.get_context("device_target")
    if requested == "reference":
        return "reference"
    if requested == "cpu_kernel":
        if target != "CPU":
            raise ValueError(f"{key} 'cpu_kernel' runs on CPU only (device_target is {target})")
        kernel_library(required=True)
        return "cpu_kernel"
    if semi_auto_parallel():
        return "reference"
    return "cpu_kernel" if target == "CPU" and kernel_library() else "reference"


def make_rms_norm():
    """(x [..., H] f32, weight [H] f32, eps [1] f32) -> (y [..., H] f32, rstd [...] f32), RMSNorm in one kernel
    (``ops/cpu/norm_kernels.cc``); the bprop gives d x and d weight from ``RmsNormGrad``."""
    grad = custom_op("RmsNormGrad", lambda dy, x, w, r: (x, w), (ms.float32, ms.float32))

    def bprop(x, weight, eps, out, dout):
        dx, dw = grad(dout[0], x, weight, out[1])
        return dx, dw, ops.zeros_like(eps)

    return custom_op("RmsNorm", lambda x, w, e: (x, x[:-1]), (ms.float32, ms.float32), bprop)


def make_causal_softmax():
    """(scores [..., Q, K] f32, scale [1] f32) -> probs [..., Q, K] f32 = softmax(scale * scores + causal mask) over
    the last axis, query i seeing keys 0 .. K - Q + i (``ops/cpu/softmax_kernels.cc``); the bprop
    (``CausalSoftmaxGrad``) gives d scores from the probabilities."""
    grad = custom_op("CausalSoftmaxGrad", lambda dp, p, s: p, ms.float32)

    def bprop(scores, scale, out, dout):
        return grad(dout, out, scale), ops.zeros_like(scale)

    return custom_op("CausalSoftmax", lambda s, scale: s, ms.float32, bprop)


def eps_tensor(eps: float) -> Tensor:
    """The RMSNorm kernel's eps input [1] float32."""
    return Tensor(np.array([eps], np.float32))



def make_mla_decode(out_width: int):
    """MLA cached decode in one kernel (``ops/cpu/decode_kernels.cc`` MlaDecode, forward only; ``out_width`` =
    heads * v_head_dim): (q [B,Q,n*(nope+rope)], kv [B,Q,r+rope], kv_norm_weight [r], kv_b_weight [n*(nope+v), r],
    cos [P, rope/2], sin [P, rope/2], positions [B,Q] i32, cache [B*M,r+rope], config [4] {n, nope, eps, scale},
    interleave [1]) -> (out [B, Q, n*v], entries [B, Q, r+rope])."""
    return custom_op("MlaDecode", lambda q, kv, *rest: ((q[0], q[1], out_width), kv), (ms.float32, ms.float32),
                     out_width=out_width)


def make_gqa_decode():
    """GQA cached decode in one kernel (``ops/cpu/decode_kernels.cc`` GqaDecode, forward only): (q [B,Q,n*d],
    k [B,Q,kv*d], v [B,Q,kv*d], cos [P, d/2], sin [P, d/2], positions [B,Q] i32, cache [B*M,2*kv*d],
    config [2] {n, scale}, interleave [1]) -> (out [B, Q, n*d], entries [B, Q, 2*kv*d])."""
    return custom_op("GqaDecode", lambda q, k, v, *rest: (q, (k[0], k[1], 2 * k[2])), (ms.float32, ms.float32))
