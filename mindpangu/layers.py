"""Building blocks shared by both Pangu models: linear, RMSNorm, RoPE, SwiGLU, causal attention core.

Plain MindSpore ops, static shapes, so every cell runs in GRAPH and PYNATIVE mode on CPU and Ascend (RMSNorm can
be one C++ kernel on CPU instead, ``model.norm_backend``).
"""
from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.ops.auto_generate import SiLU

from .kernels import eps_tensor, make_causal_softmax, make_rms_norm, resolve_kernels

_DTYPES = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}


def ms_dtype(name: str):
    return _DTYPES[name]


class Linear(nn.Cell):
    """y = x W^T (+ b), weight stored [out, in] like torch/HF so checkpoints map one to one."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, compute_dtype: str = "float32"):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = Parameter(Tensor(np.zeros((out_features, in_features), np.float32)), name="weight")
        self.bias = Parameter(Tensor(np.zeros((out_features,), np.float32)), name="bias") if bias else None
        self.dtype = ms_dtype(compute_dtype)
        self.cast_needed = compute_dtype != "float32"
        # primitives, not functional ops, so mindpangu.parallel can give them shard strategies
        self.matmul = ops.MatMul(transpose_b=True)
        self.add_bias = ops.Add()

    def construct(self, x):
        w = self.weight
        if self.cast_needed:
            x, w = x.astype(self.dtype), w.astype(self.dtype)
        shape = x.shape
        y = self.matmul(x.reshape(-1, shape[-1]), w)
        if self.cast_needed:
            y = y.astype(ms.float32)
        if self.bias is not None:
            y = self.add_bias(y, self.bias)
        return y.reshape(shape[:-1] + (self.out_features,))


class RMSNorm(nn.Cell):
    """x / sqrt(mean(x^2) + eps) * gamma over the last axis, computed in float32 -> float32.

    ``backend`` (``model.norm_backend``): 'reference' is six primitives (what ``parallelize`` shards); 'cpu_kernel'
    one C++ kernel each way (``ops/cpu/norm_kernels.cc``), which on CPU saves the dozen small ops autodiff makes
    of the six (about a fifth of the tiny model's step, README "MoE kernels"); 'auto' resolves as
    ``kernels.resolve_kernels`` says. Raises ValueError for 'cpu_kernel' off CPU.
    """

    def __init__(self, dim: int, eps: float = 1e-5, backend: str = "reference"):
        super().__init__()
        self.weight = Parameter(Tensor(np.ones((dim,), np.float32)), name="weight")
        self.eps = eps
        self.square, self.mean, self.rsqrt = ops.Square(), ops.ReduceMean(keep_dims=True), ops.Rsqrt()
        self.add_eps, self.normalise, self.scale = ops.Add(), ops.Mul(), ops.Mul()
        self.use_kernel = resolve_kernels(backend, "model.norm_backend") == "cpu_kernel"
        if self.use_kernel:
            self.kernel, self.eps_input = make_rms_norm(), eps_tensor(eps)

    def construct(self, x):
        x = x.astype(ms.float32)
        if self.use_kernel:
            return self.kernel(x, self.weight, self.eps_input)[0]
        var = self.mean(self.square(x), -1)
        return self.scale(self.normalise(x, self.rsqrt(self.add_eps(var, self.eps))), self.weight)


class Embedding(nn.Cell):
    """Token embedding table [vocab, hidden]."""

    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.weight = Parameter(Tensor(np.zeros((vocab_size, hidden_size), np.float32)), name="weight")
        self.gather = ops.Gather()

    def construct(self, ids):
        return self.gather(self.weight, ids, 0)


def rope_tables(dim: int, max_len: int, theta: float):
    """cos/sin tables [max_len, dim/2] (float32), angles computed in float64 for accuracy."""
    inv_freq = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
    angles = np.outer(np.arange(max_len, dtype=np.float32), inv_freq.astype(np.float32))
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


class Rotary(nn.Cell):
    """Rotary position embedding on the last axis of x [..., S, dim].

    interleave=True rotates pairs (x0, x1), (x2, x3), ... (GPT-J / DeepSeek's layout) and returns the rotated
    even parts followed by the rotated odd parts; interleave=False rotates halves (Llama's rotate_half).
    Both place q and k identically, so attention scores are the same as the in-place rotation.
    """

    def __init__(self, dim: int, max_len: int, theta: float, interleave: bool):
        super().__init__()
        cos, sin = rope_tables(dim, max_len, theta)
        self.cos, self.sin = Tensor(cos), Tensor(sin)
        self.interleave, self.half = interleave, dim // 2

    def construct(self, x, positions):
        """x [..., S, dim]; positions [S] (shared by the batch) or [B, S] (per sequence, x [B, heads, S, dim])."""
        # constant tables: stop_gradient keeps autodiff from scattering gradients into them
        cos = ops.stop_gradient(ops.gather(self.cos, positions, 0))  # [S, dim/2] or [B, S, dim/2]
        sin = ops.stop_gradient(ops.gather(self.sin, positions, 0))
        if positions.ndim == 2:
            cos, sin = cos.expand_dims(1), sin.expand_dims(1)
        if self.interleave:
            x1, x2 = x[..., 0::2], x[..., 1::2]
        else:
            x1, x2 = x[..., : self.half], x[..., self.half:]
        return ops.concat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1)


class SwiGLU(nn.Cell):
    """down(silu(gate(x)) * up(x)): the dense FFN and the shared expert."""

    def __init__(self, hidden: int, intermediate: int, compute_dtype: str = "float32"):
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate, compute_dtype=compute_dtype)
        self.up_proj = Linear(hidden, intermediate, compute_dtype=compute_dtype)
        self.down_proj = Linear(intermediate, hidden, compute_dtype=compute_dtype)
        self.silu, self.mul = SiLU(), ops.Mul()

    def construct(self, x):
        return self.down_proj(self.mul(self.silu(self.gate_proj(x)), self.up_proj(x)))


# Index constants (positions, the causal mask, dispatch offsets). With static shapes they are made with NumPy while
# compiling (``ops.constexpr``): MindSpore 2.10's interleaved-pipeline compiler (``pipeline_interleave`` with
# ``lazy_inline``) fails with "BUG: no manager for this func graph" on a pipelined layer holding an op whose inputs
# are all constants made in the graph (ops.arange, ``ops.ones(n) * 2``, a comparison of two aranges). A graph with
# dynamic shapes (``model.dynamic_shapes``, the MindIR prefill) computes them with ops. Cells pick the function when
# they are built (an ``if`` inside the graph would be control flow, which lazy_inline cells may not hold).


@ops.constexpr
def _static_range(start: int, end: int, step: int, shape: tuple):
    return Tensor(np.arange(start, end, step, dtype=np.int32).reshape(shape))


def static_range(start: int, end: int, step: int = 1, shape: tuple = (-1,)):
    """int32 [start, start + step, ... < end] reshaped to ``shape``, a compile-time constant."""
    return _static_range(start, end, step, shape)  # (a constexpr takes positional arguments only)


def dynamic_range(start, end, step: int = 1, shape: tuple = (-1,)):
    """:func:`static_range` for bounds known only at run time (ops)."""
    return ops.arange(start, end, step).astype(ms.int32).reshape(shape)


@ops.constexpr
def static_causal_mask(q_len: int, k_len: int):
    """Additive mask [q_len, k_len] float32: 0 where key j <= query i (the queries are the last q_len keys), -1e9
    above; a compile-time constant."""
    q = np.arange(k_len - q_len, k_len).reshape(q_len, 1)
    return Tensor(np.where(np.arange(k_len).reshape(1, k_len) > q, -1e9, 0.0).astype(np.float32))


def dynamic_causal_mask(q_len, k_len):
    """:func:`static_causal_mask` for lengths known only at run time (ops)."""
    q = ops.arange(k_len - q_len, k_len).reshape(q_len, 1)
    k = ops.arange(0, k_len).reshape(1, k_len)
    return ops.cast(k > q, ms.float32) * -1e9


def positions_mask(positions, cache_len: int):
    """Additive mask [B, Q, cache_len] for queries at absolute ``positions [B, Q]``: key j is seen iff j <= position."""
    keys = ops.arange(0, cache_len).astype(ms.int32).reshape(1, 1, cache_len)
    return ops.cast(keys > positions.expand_dims(-1), ms.float32) * -1e9


def cache_index(positions, cache):
    """positions [B, Q] int32 and a cache [B * M, D] -> its rows [B*Q] int32 (b * M + position), for
    :func:`cache_update`."""
    b, q = positions.shape
    m = cache.shape[0] // b
    return (ops.arange(0, b).astype(ms.int32).reshape(b, 1) * m + positions).reshape(b * q)


def cache_update(cache, entries, index):
    """Write ``entries [B, Q, D]`` into ``cache`` (a Parameter [B * M, D]: sequence b's position p is row
    b * M + p) in place at the rows ``index`` (:func:`cache_index`), with one ScatterUpdate: the step writes Q rows
    per sequence and copies nothing else (MindSpore's CPU ScatterNdUpdate copies the whole Parameter, so the
    cache is kept 2-D), and a rejected speculative token is simply overwritten by the next write. -> the updated
    cache (read it from here, after the write)."""
    return ops.scatter_update(cache, index, entries.reshape(-1, entries.shape[-1]).astype(ms.float32))


def attention_probs(scores, mask):
    """Softmax over keys of (scores + mask) in float32."""
    return ops.softmax(scores.astype(ms.float32) + mask, -1)


class CausalSoftmax(nn.Cell):
    """Causal attention probabilities: scores [..., Q, K] (the queries are the last Q keys) ->
    softmax(scale * scores + static_causal_mask(Q, K)) over the last axis, float32.

    ``backend`` (``model.attention_backend``): 'reference' is the composite (:func:`attention_probs` with
    :func:`static_causal_mask`); 'cpu_kernel' one C++ kernel each way (``ops/cpu/softmax_kernels.cc``), which skips the
    masked keys and replaces MindSpore's softmax backward (a ReduceSum, a Sub and a Mul over the whole tensor);
    'auto' resolves as ``kernels.resolve_kernels`` says. ``dynamic``: Q and K are only known at run time
    (``model.dynamic_shapes``). Raises ValueError for 'cpu_kernel' off CPU.
    """

    def __init__(self, scale: float, backend: str = "reference", dynamic: bool = False):
        super().__init__()
        self.scale = scale
        self.causal_mask = dynamic_causal_mask if dynamic else static_causal_mask
        self.use_kernel = resolve_kernels(backend, "model.attention_backend") == "cpu_kernel"
        if self.use_kernel:
            self.kernel, self.scale_input = make_causal_softmax(), Tensor(np.array([scale], np.float32))

    def construct(self, scores):
        scores = scores.astype(ms.float32)
        if self.use_kernel:
            return self.kernel(scores, self.scale_input)
        q_len, k_len = scores.shape[-2:]
        return attention_probs(scores * self.scale, self.causal_mask(q_len, k_len))
