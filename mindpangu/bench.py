"""Benchmarks, measured side by side in one process (these machines are noisy, so compare ratios)."""
from __future__ import annotations

import statistics
import time

import numpy as np
import mindspore as ms

from .config import TrainConfig
from .models import build_model


def _ids(cfg: TrainConfig, batch: int, seq: int):
    rng = np.random.default_rng(cfg.seed)
    return ms.Tensor(rng.integers(0, cfg.model.vocab_size, (batch, seq)), ms.int32)


def forward_once(cfg: TrainConfig) -> None:
    """Build the model, run one forward pass on random tokens, print shape and time."""
    model = build_model(cfg.model, seed=cfg.seed)
    ids = _ids(cfg, cfg.runner_config.batch_size, cfg.train_dataset.seq_length)
    start = time.perf_counter()
    logits = model(ids)
    print(f"forward: input {tuple(ids.shape)} -> logits {tuple(logits.shape)} {logits.dtype}, "
          f"{time.perf_counter() - start:.2f} s (PyNative, first call)")


def bench_forward(cfg: TrainConfig, batch=None, seq=None, repeats: int = 10) -> dict:
    """Forward tokens/s in GRAPH and PYNATIVE mode on the same model and input; prints a table."""
    batch = batch or cfg.runner_config.batch_size
    seq = seq or cfg.train_dataset.seq_length
    model = build_model(cfg.model, seed=cfg.seed)
    model.set_train(False)
    ids = _ids(cfg, batch, seq)
    results = {}
    for name, mode in (("GRAPH", ms.GRAPH_MODE), ("PYNATIVE", ms.PYNATIVE_MODE)):
        ms.set_context(mode=mode)
        start = time.perf_counter()
        model(ids).asnumpy()
        first = time.perf_counter() - start
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(ids).asnumpy()
            times.append(time.perf_counter() - start)
        med = statistics.median(times)
        results[name] = {"first_s": first, "median_s": med, "tokens_per_s": batch * seq / med}
    print(f"forward benchmark: {cfg.model.type}, batch {batch} x seq {seq}, {repeats} repeats (median)")
    print(f"{'mode':<10}{'first call s':>14}{'step ms':>10}{'tokens/s':>12}")
    for name, r in results.items():
        print(f"{name:<10}{r['first_s']:>14.2f}{r['median_s'] * 1e3:>10.1f}{r['tokens_per_s']:>12,.0f}")
    ratio = results["GRAPH"]["tokens_per_s"] / results["PYNATIVE"]["tokens_per_s"]
    print(f"GRAPH / PYNATIVE throughput: {ratio:.2f}x")
    return results
