"""Model FLOPs per token and a measured device peak, for the MFU estimate."""
from __future__ import annotations

import time

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


def measured_peak_flops(size: int = 1024, repeats: int = 7) -> float:
    """Median fp32 matmul FLOP/s of this machine (NumPy's BLAS, fresh inputs): the CPU default MFU denominator.

    MindSpore's own CPU matmul reaches 75-100% of it; timing MindSpore's eager ops directly proved unreliable
    after graph runs (readings above the cores' physical peak).
    """
    if size in _PEAK_CACHE:
        return _PEAK_CACHE[size]
    import statistics

    import numpy as np

    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal((size, size), np.float32) for _ in range(repeats + 1)]
    inputs[0] @ inputs[0]
    times = []
    for a in inputs[1:]:
        start = time.perf_counter()
        a @ a
        times.append(time.perf_counter() - start)
    _PEAK_CACHE[size] = 2.0 * size ** 3 / statistics.median(times)
    return _PEAK_CACHE[size]
