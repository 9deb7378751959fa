"""Benchmarks, measured side by side in one process (these machines are noisy, so compare ratios)."""
from __future__ import annotations

import statistics
import time

import numpy as np
import mindspore as ms

from .config import TrainConfig
from .models import build_model
from .params import count_parameters, human


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


def bench_train(cfg: TrainConfig, steps: int = 10) -> dict:
    """Train-step throughput on random tokens in the recipe's mode: first step (compile) time, steady step time,
    tokens/s and MFU against the measured fp32 matmul peak (or logging.peak_tflops)."""
    from .train.mfu import measured_peak_flops, training_flops_per_token
    from .train.step import StepRunner

    ms.set_context(mode=ms.GRAPH_MODE if cfg.context.graph_mode else ms.PYNATIVE_MODE)
    r, seq = cfg.runner_config, cfg.train_dataset.seq_length
    model = build_model(cfg.model, seed=cfg.seed)
    runner = StepRunner(model, cfg)
    rng = np.random.default_rng(cfg.seed)

    def batches():
        return [rng.integers(0, cfg.model.vocab_size, (r.batch_size, seq + 1)).astype(np.int32)
                for _ in range(r.gradient_accumulation_steps)]

    start = time.perf_counter()
    runner.run(batches(), 1e-4)
    first = time.perf_counter() - start
    times = []
    for _ in range(steps):
        data = batches()
        start = time.perf_counter()
        out = runner.run(data, 1e-4)
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    tokens = out["tokens"]
    peak = cfg.logging.peak_tflops * 1e12 if cfg.logging.peak_tflops else measured_peak_flops()
    flops = training_flops_per_token(cfg.model, seq)
    result = {"params": count_parameters(cfg.model)["all"], "tokens_per_step": tokens, "first_step_s": first,
              "step_s": step_s, "tokens_per_s": tokens / step_s, "mfu": flops * tokens / step_s / peak,
              "peak_gflops": peak / 1e9, "flops_per_token": flops}
    print(f"train benchmark: {cfg.model.type}, {human(result['params'])} parameters, "
          f"{r.gradient_accumulation_steps} x {r.batch_size} x {seq} tokens per step, {steps} steps (median), "
          f"{'GRAPH' if cfg.context.graph_mode else 'PYNATIVE'} mode")
    print(f"  first step (compile + run) {first:8.2f} s")
    print(f"  steady step                {step_s * 1e3:8.1f} ms")
    print(f"  tokens/s                   {result['tokens_per_s']:8,.0f}")
    print(f"  MFU                        {100 * result['mfu']:8.1f} %  ({flops / 1e6:.1f} MFLOP/token, peak "
          f"{peak / 1e9:.0f} GFLOP/s {'set' if cfg.logging.peak_tflops else 'measured: NumPy fp32 matmul'})")
    return result
