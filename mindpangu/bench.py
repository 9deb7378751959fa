"""Benchmarks, measured side by side in one process (these machines are noisy, so compare ratios)."""
from __future__ import annotations

import os
import statistics
import time

import numpy as np
import mindspore as ms

from .config import MoEConfig, TrainConfig
from .models import build_model
from .moe import build_dispatcher
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
    from .train.mfu import format_mfu, peak_flops, training_flops_per_token
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
    peak, peak_source = peak_flops(cfg.logging.peak_tflops)
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
    print(f"  MFU                        {format_mfu(result['mfu']):>8}  ({flops / 1e6:.1f} MFLOP/token, peak "
          f"{peak / 1e9:.0f} GFLOP/s; {peak_source})")
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
    """A token dispatcher's dispatch + combine around an identity expert: forward, or gradients w.r.t. x and the
    weights."""

    def __init__(self, num_experts: int, backend: str, backward: bool):
        super().__init__()
        self.dispatcher, self.backward = build_dispatcher(backend, num_experts), backward
        self.grad = ms.ops.GradOperation(get_all=True, sens_param=True)

    def forward(self, x, weights, indices):
        xs, _, slot_of_row, _ = self.dispatcher.dispatch(x, indices)
        return self.dispatcher.combine(xs, weights, slot_of_row)

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
                    cell = _Dispatch(e, backend, backward)
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


_RECIPES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "yaml_configs")
PEER_RECIPE = os.path.join(_RECIPES, "bench", "deepseek_v3_peer.yaml")
DEPTH_RECIPE = os.path.join(_RECIPES, "pangu_ultra_moe", "tiny.yaml")


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _random_batches(cfg: TrainConfig, rng):
    r, seq = cfg.runner_config, cfg.train_dataset.seq_length
    return [rng.integers(0, cfg.model.vocab_size, (r.batch_size, seq + 1)).astype(np.int32)
            for _ in range(r.gradient_accumulation_steps)]


def train_worker(side: str, config: str, overrides, steps: int) -> dict:
    """One timed training run in this process: ``side`` 'mindpangu' (our engine, GRAPH mode) or 'peer'
    (transformers' DeepseekV3ForCausalLM with torch.optim.AdamW, eager, at the recipe's shape). Random tokens;
    returns the first-step time, the median steady step, tokens/s, peak RSS and (mindpangu) a per-part split."""
    from .config import load_config

    cfg = load_config(config, list(overrides))
    rng = np.random.default_rng(cfg.seed)
    tokens = cfg.runner_config.batch_size * cfg.train_dataset.seq_length * cfg.runner_config.gradient_accumulation_steps
    parts, engine = {}, "eager"
    if side == "peer":
        step = _peer_step(cfg)
    else:
        from .train.step import StepRunner

        ms.set_context(mode=ms.GRAPH_MODE)
        runner = StepRunner(build_model(cfg.model, seed=cfg.seed), cfg)
        engine = runner.engine
        step = lambda batches: runner.run(batches, 1e-4)  # noqa: E731
        if hasattr(runner.micro, "time_parts"):
            parts = runner.micro.time_parts()
    start = time.perf_counter()
    step(_random_batches(cfg, rng))
    first = time.perf_counter() - start
    if parts:
        parts.clear()
    times = []
    for _ in range(steps):
        data = _random_batches(cfg, rng)
        start = time.perf_counter()
        step(data)
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    split = {k: v / steps for k, v in parts.items()}
    return {"side": side, "engine": engine, "first_step_s": first, "step_s": step_s, "tokens_per_s": tokens / step_s,
            "peak_rss_mb": _peak_rss_mb(), "parts_s": split, "layers": cfg.model.num_layers}


def _peer_step(cfg: TrainConfig):
    model = _peer_model(cfg).train()
    import torch
    o = cfg.optimizer
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)

    def step(batches):
        for b in batches:
            ids = torch.from_numpy(b.astype(np.int64))
            out = model(ids[:, :-1], labels=ids[:, :-1])  # transformers shifts the labels itself
            (out.loss / len(batches)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        opt.zero_grad()

    return step


def _in_fresh_process(worker: str, args: list) -> dict:
    """``mindpangu.bench.<worker>(*args)`` in a fresh Python process (so first-step time and peak RSS are that
    run's own); returns its result dict."""
    import json
    import subprocess
    import sys

    code = (f"import json, sys; from mindpangu.bench import {worker}; "
            f"print('RESULT ' + json.dumps({worker}(*json.loads(sys.argv[1]))))")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise SystemExit(f"benchmark worker {worker}{tuple(args)} failed:\n{proc.stderr[-3000:]}")


def _run_worker(side: str, config: str, overrides, steps: int) -> dict:
    return _in_fresh_process("train_worker", [side, config, list(overrides), steps])


def bench_compare(config: str = PEER_RECIPE, rounds: int = 3, steps: int = 8, depths=(4, 16, 48),
                  depth_config: str = DEPTH_RECIPE, overrides=()) -> dict:
    """mindpangu against transformers' DeepseekV3ForCausalLM on the same shape, alternating fresh processes
    (``rounds`` of each), then a depth sweep of our engine on a narrow model. Prints every run, the medians and
    the ratio; returns them."""
    runs = []
    print(f"compare: {config} {' '.join(overrides)}, {rounds} rounds x {steps} steps, alternating processes")
    print(f"{'run':<5}{'side':<11}{'engine':<13}{'first step s':>13}{'step ms':>9}{'tokens/s':>10}{'peak RSS MB':>13}")
    for r in range(rounds):
        for side in ("mindpangu", "peer"):
            out = _run_worker(side, config, overrides, steps)
            runs.append(out)
            print(f"{r + 1:<5}{side:<11}{out['engine']:<13}{out['first_step_s']:>13.1f}{out['step_s'] * 1e3:>9.0f}"
                  f"{out['tokens_per_s']:>10,.0f}{out['peak_rss_mb']:>13,.0f}", flush=True)
    med = {side: statistics.median(x["tokens_per_s"] for x in runs if x["side"] == side)
           for side in ("mindpangu", "peer")}
    ratios = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(runs[0::2], runs[1::2])]
    print(f"median tokens/s: mindpangu {med['mindpangu']:,.0f}, peer {med['peer']:,.0f}; ratio of medians "
          f"{med['mindpangu'] / med['peer']:.2f}x; per round {', '.join(f'{x:.2f}x' for x in ratios)}")
    ours = [x for x in runs if x["side"] == "mindpangu"]
    parts = ours[-1]["parts_s"]
    if parts:
        total = ours[-1]["step_s"]
        print("mindpangu step split (last run, per step): " + ", ".join(
            f"{k} {v * 1e3:.0f} ms ({100 * v / total:.0f}%)" for k, v in parts.items()))
    sweep = []
    if depths:
        print(f"depth sweep: {depth_config}, layer-wise engine, {steps} steps each")
        print(f"{'layers':<8}{'first step s':>13}{'step ms':>9}{'peak RSS MB':>13}")
        for depth in depths:
            out = _run_worker("mindpangu", depth_config, [f"model.num_layers={depth}", "runner_config.engine=layerwise"],
                              steps)
            sweep.append(out)
            print(f"{depth:<8}{out['first_step_s']:>13.1f}{out['step_s'] * 1e3:>9.0f}{out['peak_rss_mb']:>13,.0f}",
                  flush=True)
        a, b = sweep[0], sweep[-1]
        print(f"{b['layers']} vs {a['layers']} layers: first step {b['first_step_s'] / a['first_step_s']:.2f}x, "
              f"peak RSS {b['peak_rss_mb'] / a['peak_rss_mb']:.2f}x, step {b['step_s'] / a['step_s']:.2f}x")
    return {"runs": runs, "median_tokens_per_s": med, "ratios": ratios, "sweep": sweep}


# ---- serving -----------------------------------------------------------------------------------------------------
SERVE_RECIPE = os.path.join(_RECIPES, "pangu_ultra_moe", "tiny.yaml")


def serve_worker(side: str, config: str, overrides, batches, prompt_len: int, new_tokens: int, workdir: str) -> dict:
    """One side of ``bench serve`` in this process, on random weights and random prompts of ``prompt_len``
    tokens: side 'mindir' (export_for_serving, then the exported graphs), 'python' (ModelRunner) or 'peer'
    (transformers' DeepseekV3ForCausalLM.generate, greedy, its own KV cache). Each batch size is warmed up
    (graphs compiled) before it is timed. -> {"side", "batches": {b: {ttft_s, prefill_tokens_per_s,
    decode_tokens_per_s}}}. Decode tokens/s counts tokens after the first (which prefill produces)."""
    from .config import load_config

    cfg = load_config(config, list(overrides))
    rng = np.random.default_rng(cfg.seed)
    prompts = rng.integers(0, cfg.model.vocab_size, (max(batches), prompt_len)).astype(np.int32)
    results = {}
    if side == "peer":
        import torch

        model = _peer_model(cfg).eval()

        def run(b: int, n: int) -> float:
            ids = torch.from_numpy(prompts[:b].astype(np.int64))
            start = time.perf_counter()
            with torch.no_grad():
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, pad_token_id=0)
            return time.perf_counter() - start

        for b in batches:
            run(b, 3)
            first = min(run(b, 1) for _ in range(3))
            total = run(b, new_tokens)
            results[b] = {"ttft_s": first, "prefill_tokens_per_s": b * prompt_len / first,
                          "decode_tokens_per_s": b * (new_tokens - 1) / max(total - first, 1e-9)}
        return {"side": side, "batches": results}
    from .export import export_for_serving
    from .inference.generate import MindIRRunner, ModelRunner, Sampler, generate

    ms.set_context(mode=ms.GRAPH_MODE)
    if cfg.context.runtime_num_threads:
        ms.set_context(runtime_num_threads=cfg.context.runtime_num_threads)
    model = build_model(cfg.model, seed=cfg.seed)
    max_len = prompt_len + new_tokens + 1
    if side == "mindir":
        export_for_serving(model, workdir, max_len, batch_sizes=list(batches))
        runner = MindIRRunner(workdir)
    else:
        runner = ModelRunner(model, max_len)
    for b in batches:
        runner.warmup(b)
        generate(runner, prompts[:b], 3, Sampler())
        first = min(generate(runner, prompts[:b], 1, Sampler())["ttft_s"] for _ in range(3))
        out = generate(runner, prompts[:b], new_tokens, Sampler())
        results[b] = {"ttft_s": first, "prefill_tokens_per_s": b * prompt_len / first,
                      "decode_tokens_per_s": out["decode_tokens_per_s"]}
    return {"side": side, "batches": results}


def _peer_model(cfg: TrainConfig):
    """transformers' DeepseekV3ForCausalLM with ``cfg.model``'s shape (random weights, eager attention, float32,
    all cores). Raises SystemExit naming the bench extra when torch or transformers is missing."""
    try:
        import torch
        from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    except ImportError as e:
        raise SystemExit(f"the transformers peer needs torch and transformers ({e}); install them with: "
                         "pip install -e '.[bench]'")
    from .convert.hf import config_to_hf

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(cfg.seed)
    hf = {k: v for k, v in config_to_hf(cfg.model).items() if k not in ("architectures", "model_type", "torch_dtype")}
    peer_cfg = DeepseekV3Config(**hf)
    peer_cfg._attn_implementation = "eager"
    return DeepseekV3ForCausalLM(peer_cfg).float()


def bench_serve(config: str = SERVE_RECIPE, rounds: int = 2, batches=(1, 16), prompt_len: int = 16,
                new_tokens: int = 48, overrides=()) -> dict:
    """Serving speed of the exported MindIR graphs, the Python path and transformers' generate (Ultra MoE shapes
    only: the peer is DeepseekV3) on the same shape, each side in a fresh process, sides alternating for
    ``rounds`` rounds. Prints every run and the medians: time to first token, prefill and decode tokens/s per
    batch size, MindIR / peer decode ratios and MindIR's batch-16 / batch-1 scaling."""
    import tempfile

    from .config import load_config

    cfg = load_config(config, list(overrides))
    sides = ["mindir", "python"] + (["peer"] if cfg.model.type == "pangu_ultra_moe" else [])
    print(f"serve: {config} {' '.join(overrides)}, prompts of {prompt_len} tokens, {new_tokens} new tokens, "
          f"batch sizes {list(batches)}, {rounds} rounds, sides alternating in fresh processes"
          + ("" if "peer" in sides else " (no transformers peer for this model type)"))
    print(f"{'run':<5}{'side':<8}{'batch':>6}{'TTFT ms':>9}{'prefill tok/s':>15}{'decode tok/s':>14}")
    runs = []
    with tempfile.TemporaryDirectory() as work:
        for r in range(rounds):
            for side in sides:
                out = _in_fresh_process("serve_worker", [side, config, list(overrides), list(batches), prompt_len,
                                                         new_tokens, os.path.join(work, f"export{r}")])
                runs.append(out)
                for b, x in out["batches"].items():
                    print(f"{r + 1:<5}{side:<8}{b:>6}{x['ttft_s'] * 1e3:>9.1f}{x['prefill_tokens_per_s']:>15,.0f}"
                          f"{x['decode_tokens_per_s']:>14,.1f}", flush=True)
    med = {side: {str(b): {k: statistics.median(x["batches"][str(b)][k] for x in runs if x["side"] == side)
                           for k in ("ttft_s", "prefill_tokens_per_s", "decode_tokens_per_s")}
                  for b in batches} for side in sides}
    print("medians: " + "; ".join(f"{side} " + ", ".join(
        f"b{b} decode {med[side][str(b)]['decode_tokens_per_s']:,.1f} tok/s TTFT "
        f"{med[side][str(b)]['ttft_s'] * 1e3:.1f} ms" for b in batches) for side in sides))
    lo, hi = str(min(batches)), str(max(batches))
    summary = {"mindir_batch_scaling": med["mindir"][hi]["decode_tokens_per_s"] / med["mindir"][lo]["decode_tokens_per_s"]}
    line = f"MindIR batch {hi} / batch {lo} decode: {summary['mindir_batch_scaling']:.1f}x"
    if "peer" in sides:
        for b in batches:
            ratios = [a["batches"][str(b)]["decode_tokens_per_s"] / p["batches"][str(b)]["decode_tokens_per_s"]
                      for a, p in zip(runs[0::3], runs[2::3])]
            summary[f"mindir_over_peer_b{b}"] = ratios
            line += f"; MindIR / peer decode at batch {b}: per round {', '.join(f'{x:.2f}x' for x in ratios)}"
    print(line)
    return {"runs": runs, "medians": med, "summary": summary}


# ---- preprocessing ------------------------------------------------------------------------------------------------
BUNDLED_TOKENIZER = os.path.join(os.path.dirname(_RECIPES), "data", "shakespeare", "tokenizer.json")
BUNDLED_CORPUS = os.path.join(os.path.dirname(_RECIPES), "data", "shakespeare", "plays.txt")


def synthetic_corpus(directory: str, size_mb: float, file_mb: float = 256, seed: int = 0) -> list:
    """Write about ``size_mb`` MiB of JSONL documents (1-60 consecutive paragraphs of the bundled plays from a
    seeded random start) into files of ``file_mb`` MiB; returns their paths. Streams; holds one document."""
    import json

    paragraphs = open(BUNDLED_CORPUS, encoding="utf-8").read().split("\n\n")
    rng = np.random.default_rng(seed)
    paths, written, fh = [], 0, None
    while written < size_mb * (1 << 20):
        if fh is None or fh.tell() >= file_mb * (1 << 20):
            if fh:
                fh.close()
            paths.append(os.path.join(directory, f"part-{len(paths):04d}.jsonl"))
            fh = open(paths[-1], "w", encoding="utf-8")
        start, count = int(rng.integers(0, len(paragraphs) - 60)), int(rng.integers(1, 61))
        line = json.dumps({"text": "\n\n".join(paragraphs[start:start + count])}) + "\n"
        fh.write(line)
        written += len(line.encode("utf-8"))
    fh.close()
    return paths


def preprocess_worker(mode: str, inputs: list, tokenizer: str, seq_length: int, out: str) -> dict:
    """One timed preprocessing run in this process: ``streaming`` (``mindpangu.data.mindrecord.preprocess``) or
    ``one_document`` (the previous algorithm, kept here as the baseline: each file read whole as one document,
    encoded on one core into a Python list of ids, packed and written at the end)."""
    import resource

    from .data.mindrecord import preprocess
    from .data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer)
    size = sum(os.path.getsize(p) for p in inputs)
    t0 = time.perf_counter()
    if mode == "streaming":
        meta = preprocess(inputs, tok, seq_length, out, progress=False)
        tokens = meta["tokens"] + meta["dropped_tail_tokens"]
    else:
        from mindspore.mindrecord import FileWriter

        ids = []
        for path in inputs:
            with open(path, encoding="utf-8") as fh:
                ids.extend(tok.encode(fh.read()))
            ids.append(tok.eos_id)
        width = seq_length + 1
        n = len(ids) // width
        samples = np.asarray(ids[: n * width], np.int32).reshape(n, width)
        os.makedirs(out, exist_ok=True)
        writer = FileWriter(os.path.join(out, "data.mindrecord"), shard_num=1, overwrite=True)
        writer.add_schema({"input_ids": {"type": "int32", "shape": [-1]}}, "packed token ids")
        for start in range(0, n, 4096):
            writer.write_raw_data([{"input_ids": row} for row in samples[start:start + 4096]])
        writer.commit()
        tokens = len(ids)
    wall = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return {"mode": mode, "input_mb": size / (1 << 20), "wall_s": wall, "mb_per_s": size / (1 << 20) / wall,
            "tokens": tokens, "peak_rss_mb": rss}


def bench_preprocess(size_mb: float = 1024, baseline_mb: float = 20, tokenizer: str = BUNDLED_TOKENIZER,
                     seq_length: int = 1024, rounds: int = 1, workdir: str = "") -> dict:
    """Streaming preprocessing of a ``size_mb`` MiB synthetic JSONL corpus against the one-document baseline on
    its first ``baseline_mb`` MiB (as one plain-text file), each in a fresh process, alternating ``rounds`` times.
    Prints every run: MB/s, peak RSS, RSS per input MB; returns them. Nothing is kept (a temporary directory)."""
    import shutil
    import tempfile

    root = tempfile.mkdtemp(prefix="mindpangu-bench-", dir=workdir or None)
    try:
        t0 = time.perf_counter()
        corpus = synthetic_corpus(root, size_mb)
        print(f"synthetic corpus: {len(corpus)} JSONL files, {size_mb:,.0f} MiB, {time.perf_counter() - t0:.0f} s "
              f"to generate; tokenizer {tokenizer}, seq_length {seq_length}")
        small = os.path.join(root, "baseline.txt")
        with open(corpus[0], encoding="utf-8") as src, open(small, "w", encoding="utf-8") as dst:
            import json

            for line in src:
                dst.write(json.loads(line)["text"] + "\n\n")
                if dst.tell() >= baseline_mb * (1 << 20):
                    break
        runs = []
        print(f"{'run':<5}{'path':<14}{'input MiB':>10}{'wall s':>9}{'MiB/s':>8}{'peak RSS MiB':>14}"
              f"{'RSS bytes/token':>17}")
        for r in range(rounds):
            for mode, inputs in (("one_document", [small]), ("streaming", corpus)):
                out = _in_fresh_process("preprocess_worker", [mode, inputs, tokenizer, seq_length,
                                                              os.path.join(root, f"ds-{mode}-{r}")])
                shutil.rmtree(os.path.join(root, f"ds-{mode}-{r}"), ignore_errors=True)
                runs.append(out)
                print(f"{r + 1:<5}{mode:<14}{out['input_mb']:>10,.0f}{out['wall_s']:>9.1f}{out['mb_per_s']:>8.2f}"
                      f"{out['peak_rss_mb']:>14,.0f}{out['peak_rss_mb'] * (1 << 20) / out['tokens']:>17.1f}",
                      flush=True)
        ratio = [b["mb_per_s"] / a["mb_per_s"] for a, b in zip(runs[0::2], runs[1::2])]
        print(f"streaming / one-document throughput: {', '.join(f'{x:.2f}x' for x in ratio)}")
        return {"runs": runs, "ratios": ratio}
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ---- checkpoint conversion ------------------------------------------------------------------------------------
CONVERT_SHAPE = ["model.norm_layout=pre_ln", "model.hidden_size=1024", "model.num_layers=6", "model.moe.num_experts=64",
                 "model.moe.intermediate_size=1024", "model.intermediate_size=4096", "model.vocab_size=32000",
                 "model.num_attention_heads=8", "model.q_lora_rank=512", "model.kv_lora_rank=256",
                 "model.qk_nope_head_dim=64", "model.v_head_dim=64"]


def synthetic_hf_checkpoint(out: str, overrides=(), dtype: str = "bfloat16", shard: str = "500MB") -> dict:
    """A DeepSeek-V3-layout directory of random weights at the shape ``CONVERT_SHAPE`` (+ ``overrides``), written
    tensor by tensor in ``dtype`` shards (the model is built without initialisation only to learn its names)."""
    import json

    from .config import load_config
    from .convert.hf import config_to_hf, internal_to_hf
    from .convert.safetensors_io import parse_size, save_sharded

    cfg = load_config(DEPTH_RECIPE, list(CONVERT_SHAPE) + list(overrides)).model
    model = build_model(cfg, init=False)
    shapes = {p.name: tuple(p.shape) for p in model.get_parameters()}
    del model

    class _Shape:
        def __init__(self, shape):
            self.shape = shape

    hf = internal_to_hf({n: _Shape(s) for n, s in shapes.items()}, cfg)
    rng = np.random.default_rng(0)

    def get(name):
        shape = hf.shapes[name]
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)

    os.makedirs(out, exist_ok=True)
    files = save_sharded([(n, hf.shapes[n]) for n in hf], get, out, dtype, parse_size(shard))
    with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as fh:
        json.dump(config_to_hf(cfg, dtype), fh, indent=2)
    size = sum(os.path.getsize(os.path.join(out, f)) for f in files)
    return {"parameters": sum(int(np.prod(s)) for s in shapes.values()), "files": len(files), "bytes": size}


def convert_worker(mode: str, source: str, out: str) -> dict:
    """One conversion in this process, timed, with its peak RSS: ``hf-to-ms`` / ``ms-to-hf`` (bf16) through the
    CLI code, or ``eager-hf-to-ms``: every tensor read into memory as float32 first, then the model built and
    assigned (how conversion worked before streaming), as the baseline."""
    import resource

    from .cli import convert_main

    t0 = time.perf_counter()
    if mode == "hf-to-ms":
        convert_main(["hf-to-ms", "--hf", source, "--out", out])
    elif mode == "ms-to-hf":
        convert_main(["ms-to-hf", "--ckpt", source, "--out", out, "--dtype", "bfloat16", "--max-shard-size", "500MB"])
    else:
        from .convert.hf import assign, load_hf_directory

        cfg, lazy = load_hf_directory(source)
        params = {k: lazy[k] for k in lazy}  # all of it, float32
        model = build_model(cfg, init=False)
        assign(model, params, source)
    return {"mode": mode, "wall_s": time.perf_counter() - t0,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}


def bench_convert(overrides=(), workdir: str = "") -> dict:
    """Convert a synthetic multi-GB sharded bf16 checkpoint HF -> MindSpore -> HF (bf16), each step in a fresh
    process, and the eager baseline; prints wall time and peak RSS beside the model's float32 size."""
    import shutil
    import tempfile

    root = tempfile.mkdtemp(prefix="mindpangu-convert-", dir=workdir or None)
    try:
        t0 = time.perf_counter()
        made = _in_fresh_process("synthetic_hf_checkpoint", [os.path.join(root, "hf"), list(overrides)])
        fp32_mb = made["parameters"] * 4 / 2 ** 20
        print(f"synthetic DeepSeek-V3-layout checkpoint: {made['parameters'] / 1e9:.2f}B parameters, "
              f"{made['files']} bf16 shards, {made['bytes'] / 2 ** 30:.2f} GiB ({time.perf_counter() - t0:.0f} s); "
              f"the model in float32: {fp32_mb / 1024:.2f} GiB")
        print(f"{'conversion':<16}{'wall s':>8}{'peak RSS MiB':>14}{'/ model fp32':>14}")
        runs = []
        for mode, src, out in (("hf-to-ms", "hf", "m.ckpt"), ("ms-to-hf", "m.ckpt", "back"),
                               ("eager-hf-to-ms", "hf", "")):
            r = _in_fresh_process("convert_worker", [mode, os.path.join(root, src), os.path.join(root, out)])
            runs.append(r)
            print(f"{mode:<16}{r['wall_s']:>8.1f}{r['peak_rss_mb']:>14,.0f}{r['peak_rss_mb'] / fp32_mb:>14.2f}",
                  flush=True)
        return {"checkpoint": made, "runs": runs}
    finally:
        shutil.rmtree(root, ignore_errors=True)
