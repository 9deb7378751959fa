"""Model FLOPs per token and a measured device peak, for the MFU estimate."""
from __future__ import annotations

import time
from typing import Optional, Tuple

from ..config.schema import ModelConfig
from ..params import attention_head_dims, count_parameters

_PEAK_CACHE = {}


def training_flops_per_token(cfg: ModelConfig, seq_length: int) -> float:
    """6 x (active matmul parameters) + causal attention (scores and context), forward and backward.

    Active matmul parameters are everything a token touches except the input embedding lookup and the norm gains
    (routers, the K chosen experts, shared experts, the LM head and the MTP layers included). Attention adds, per
    layer, 2 * heads * (qk_dim + v_dim) * seq/2 forward FLOPs per token (causal: half the keys on average).
    """
    counts = count_parameters(cfg)
    matmul = sum(active for name, _, active in counts["components"]
                 if not name.startswith(("input embedding", "norms", "final norm")))
    qk, v = attention_head_dims(cfg)
    layers = cfg.num_layers + cfg.num_mtp_layers
    attention = 2 * cfg.num_attention_heads * (qk + v) * (seq_length / 2) * layers
    return 3.0 * (2.0 * matmul + attention)


def _median_rate(run, inputs, flops: float) -> float:
    import statistics

    run(inputs[0])  # warm up (and compile)
    times = []
    for x in inputs[1:]:
        start = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - start)
    return flops / statistics.median(times)


def _numpy_rate(size: int, repeats: int) -> float:
    import numpy as np

    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal((size, size), np.float32) for _ in range(repeats + 1)]
    return _median_rate(lambda a: a @ a, inputs, 2.0 * size ** 3)


def _mindspore_rate(size: int, repeats: int, chain: int = 8) -> float:
    """GRAPH-mode rate of ``chain`` dependent fp32 matmuls in one compiled graph (one launch, fresh inputs)."""
    import numpy as np
    import mindspore as ms
    from mindspore import nn, ops

    class Chain(nn.Cell):
        def construct(self, a, b):
            for _ in range(chain):
                a = ops.matmul(a, b) * 0.03  # keeps the values finite along the chain
            return a

    cell = Chain()
    rng = np.random.default_rng(0)
    inputs = [(ms.Tensor(rng.standard_normal((size, size), np.float32)),
               ms.Tensor(rng.standard_normal((size, size), np.float32))) for _ in range(repeats + 1)]
    mode = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        return _median_rate(lambda ab: cell(*ab).asnumpy(), inputs, 2.0 * size ** 3 * chain)
    finally:
        ms.set_context(mode=mode)


def peak_flops(peak_tflops: Optional[float] = None, size: int = 1024, repeats: int = 5) -> Tuple[float, str]:
    """The MFU denominator in FLOP/s and where it comes from.

    ``peak_tflops`` (``logging.peak_tflops``) wins when set. Otherwise the best of the measured dense fp32 matmul
    rates of this machine: NumPy's BLAS and MindSpore GRAPH mode (chained matmuls in one graph), each the
    median of ``repeats`` runs on fresh inputs. Taking the best keeps MFU an underestimate rather than an
    overestimate when one library is slow on a given CPU.
    """
    if peak_tflops:
        return peak_tflops * 1e12, f"set: logging.peak_tflops {peak_tflops:g} TFLOP/s"
    key = (size, repeats)
    if key not in _PEAK_CACHE:
        rates = {"NumPy": _numpy_rate(size, repeats), "MindSpore GRAPH": _mindspore_rate(size, repeats)}
        best = max(rates, key=rates.get)
        text = ", ".join(f"{name} {rate / 1e9:.0f}" for name, rate in rates.items())
        _PEAK_CACHE[key] = (rates[best], f"measured fp32 matmul GFLOP/s: {text}; best: {best}")
    return _PEAK_CACHE[key]


def format_mfu(mfu: float) -> str:
    """'41.3 %', or a warning when the value cannot be right (above 100 %: the peak is too low)."""
    if not mfu <= 1.0:
        return "n/a (above 100 %: the peak is wrong; set logging.peak_tflops)"
    return f"{100 * mfu:.1f} %"
