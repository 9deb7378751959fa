"""Benchmarks, measured side by side in one process (these machines are noisy, so compare ratios)."""
from __future__ import annotations

import statistics
import time

import numpy as np
import mindspore as ms

from .config import MoEConfig, TrainConfig
from .models import build_model
from .moe.dispatch import GroupedExperts, block_size, permute_plan
from .moe.router import Router
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


class _Gating(ms.nn.Cell):
    """Router math on given logits (no matmul): forward outputs, or the gradient w.r.t. the logits."""

    def __init__(self, router, backward: bool):
        super().__init__()
        self.router, self.backward = router, backward
        self.grad = ms.ops.GradOperation(sens_param=True)

    def forward(self, logits):
        w, _, s, _, _ = self.router.route(logits)
        return w, s

    def construct(self, logits, dw, ds):
        if self.backward:
            return self.grad(self.forward)(logits, (dw, ds))
        return self.forward(logits)


class _Dispatch(ms.nn.Cell):
    """Permute + unpermute-combine around an identity expert: forward, or gradients w.r.t. x and the weights."""

    def __init__(self, num_experts: int, hidden: int, backend: str, backward: bool):
        super().__init__()
        self.e, self.backward = GroupedExperts(num_experts, hidden, 1, backend=backend), backward
        self.grad = ms.ops.GradOperation(get_all=True, sens_param=True)

    def forward(self, x, weights, indices):
        e, t, k = self.e, indices.shape[0], indices.shape[1]
        if e.use_kernel:
            xs, slot, _, _ = e.permute(x, indices)
            return e.unpermute(xs, slot, weights)
        slot, row_of_slot, _, _ = permute_plan(indices, e.num_experts, block_size(t * k, e.num_experts))
        xs = ms.ops.gather(ms.ops.concat((x, ms.ops.zeros((1, e.hidden), x.dtype)), 0), row_of_slot // k, 0)
        return (ms.ops.gather(xs, slot, 0).reshape(t, k, e.hidden) * weights.reshape(t, k, 1)).sum(1)

    def construct(self, x, weights, indices, dy):
        if self.backward:
            return self.grad(self.forward)(x, weights, indices, dy)
        return self.forward(x, weights, indices)


def _median_time(fn, repeats: int) -> float:
    fn()  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_ops(tokens=(1024, 8192, 32768), experts=(64, 256), k: int = 8, hidden: int = 1024, repeats: int = 3):
    """The C++ kernels against the composite reference, side by side in GRAPH mode, forward and backward."""
    ms.set_context(mode=ms.GRAPH_MODE)
    rng = np.random.default_rng(0)
    rows = []
    print(f"MoE ops, k={k}, hidden {hidden}, GRAPH mode, median of {repeats} (ms); ratio = reference / kernel")
    print(f"{'op':<22}{'T':>7}{'E':>5}{'pass':>6}{'reference':>11}{'kernel':>9}{'ratio':>8}")
    for e in experts:
        for t in tokens:
            logits = ms.Tensor(rng.normal(size=(t, e)).astype(np.float32))
            dw = ms.Tensor(rng.normal(size=(t, k)).astype(np.float32))
            ds = ms.Tensor(rng.normal(size=(t, e)).astype(np.float32))
            x = ms.Tensor(rng.normal(size=(t, hidden)).astype(np.float32))
            idx = ms.Tensor(np.argsort(rng.random((t, e)), -1)[:, :k].astype(np.int32))
            w = ms.Tensor(rng.uniform(size=(t, k)).astype(np.float32))
            dy = ms.Tensor(rng.normal(size=(t, hidden)).astype(np.float32))
            cfg = MoEConfig(num_experts=e, num_experts_per_tok=k, routed_scaling_factor=2.5)
            for backward in (False, True):
                pass_name = "bwd" if backward else "fwd"
                times = {}
                for backend in ("reference", "cpu_kernel"):
                    cell = _Gating(Router(8, cfg, backend), backward)
                    times[backend] = _median_time(lambda: _sync(cell(logits, dw, ds)), repeats)
                rows.append(("gating (sigmoid top-k)", t, e, pass_name, times["reference"], times["cpu_kernel"]))
                times = {}
                for backend in ("reference", "cpu_kernel"):
                    cell = _Dispatch(e, hidden, backend, backward)
                    times[backend] = _median_time(lambda: _sync(cell(x, w, idx, dy)), repeats)
                rows.append(("permute+unpermute", t, e, pass_name, times["reference"], times["cpu_kernel"]))
                for row in rows[-2:]:
                    print(f"{row[0]:<22}{row[1]:>7}{row[2]:>5}{row[3]:>6}{row[4] * 1e3:>11.2f}{row[5] * 1e3:>9.2f}"
                          f"{row[4] / row[5]:>8.1f}x")
    return rows


def _sync(out):
    """Block until the outputs exist (asnumpy on every tensor)."""
    for o in out if isinstance(out, (tuple, list)) else (out,):
        o.asnumpy()
