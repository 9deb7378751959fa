"""One ablation run, in its own process: ``python -m mindpangu.ablate.worker RUN_DIR/spec.json``.

Trains with the run's config (the trainer's metrics.jsonl, log and final checkpoint go to RUN_DIR), adds the
suite's probes (``probes.py``) and writes ``RUN_DIR/result.json`` atomically last: a run directory without it is
unfinished and is redone from scratch by the next ``mindpangu-ablate`` with the same arguments.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Dict, List

import numpy as np

from ..fsutil import write_text_atomic

RESULT = "result.json"
SPEC = "spec.json"
PROBE_BATCH = 8  # held-out sequences per probe batch, whatever the arm's batch size (same data for every arm)


def read_series(path: str) -> Dict[str, List[float]]:
    """A run's metrics.jsonl -> per-step train ``lm_loss`` and ``grad_norm`` (before clipping), and ``eval_loss``."""
    loss, grad, evals = [], [], []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            r = json.loads(line)
            if r.get("kind") == "train":
                loss.append(float(r["lm_loss"]))
                grad.append(float(r["grad_norm"]))
            elif r.get("kind") == "eval":
                evals.append(float(r["eval_loss"]))
    return {"lm_loss": loss, "grad_norm": grad, "eval_loss": evals}


def tokens_to_target(losses, target: float, tokens_per_step: int, window: int = 10) -> float:
    """Training tokens (steps x ``tokens_per_step``) until the mean of the last ``window`` per-step train losses
    (nats per token) first reaches ``target``, the window's steps included; NaN when it never does."""
    for i in range(window, len(losses) + 1):
        if np.mean(losses[i - window:i]) <= target:
            return float(i * tokens_per_step)
    return float("nan")


def gamma_trends(gammas: List[Dict], norm_layout: str) -> Dict[str, float]:
    """S-ULTRA Fig. 10's two trends from per-layer [mean, std] gamma read-outs (``probes.norm_weights``, first at
    init, last at the end): ``gamma_depth_slope``, the least-squares slope over layer index of the post-norm gamma
    mean at the end (post_attention_layernorm and post_mlp_layernorm averaged; sandwich layouts only), and
    ``gamma_change``, the mean over all norms and layers of the end mean minus the init mean (< 0: shrank)."""
    first, last = gammas[0], gammas[-1]
    out: Dict[str, float] = {}
    if norm_layout != "pre_ln" and len(last.get("post_mlp_layernorm", [])) > 1:
        post = (np.array(last["post_attention_layernorm"])[:, 0] + np.array(last["post_mlp_layernorm"])[:, 0]) / 2
        out["gamma_depth_slope"] = float(np.polyfit(np.arange(len(post)), post, 1)[0])
    names = [k for k in last if k != "step"]
    out["gamma_change"] = float(np.mean([np.array(last[k])[:, 0].mean() - np.array(first[k])[:, 0].mean()
                                         for k in names]))
    return out


def _finite_mean(xs) -> float:
    xs = [x for x in xs if math.isfinite(x)]
    return float(np.mean(xs)) if xs else float("nan")


def run(spec: Dict) -> Dict:
    """Train and probe one run described by ``spec`` (written by ``runner.py``); returns the result dict."""
    t_start = time.perf_counter()
    import mindspore as ms

    from ..config import load_config
    from ..metrics import drop_rate, max_violation, spike_score
    from ..moe.router import expert_capacity
    from ..train.trainer import Trainer, TrainingStopped, imbalance_devices
    from . import probes

    cfg = load_config(spec["base"], spec["overrides"])
    m = cfg.model
    analysis = set(spec["analysis"])
    out_dir = cfg.output_dir
    routing = probes.RoutingLog(imbalance_devices(cfg))
    capacity = None
    tokens = cfg.runner_config.batch_size * cfg.train_dataset.seq_length
    if m.moe.capacity_factor is not None:
        if cfg.runner_config.gradient_accumulation_steps != 1:
            raise ValueError("the drop rate is counted per micro-batch: a capacity_factor run needs "
                             "runner_config.gradient_accumulation_steps: 1")
        capacity = expert_capacity(tokens, m.moe.num_experts_per_tok, m.moe.num_experts, m.moe.capacity_factor)
    drops: List[List[float]] = []
    gammas: List[Dict] = []
    steps = cfg.runner_config.train_steps
    marks = sorted({0, steps // 4, steps // 2, 3 * steps // 4, steps})

    class AblationTrainer(Trainer):
        def after_step(self, out):
            super().after_step(out)
            for c in out["micro_counts"]:  # one micro-batch (one EP group) at a time
                c = np.asarray(c, np.float64)
                if c.sum() > 0:
                    routing.add(c, tokens)
                    if capacity is not None:
                        drops.append(drop_rate(c, tokens, m.moe.num_experts_per_tok, capacity).tolist())
            if "stability" in analysis and self.step in marks:
                gammas.append({"step": self.step, **probes.norm_weights(self.model)})

    trainer = AblationTrainer(cfg, resume=False, progress=False)
    data = trainer.data  # the held-out split the trainer opened
    probe_batches = data.eval_batches(PROBE_BATCH, cfg.logging.eval_batches)
    probe_domains = [np.zeros(0)] * len(probe_batches)
    if data.domains and probe_batches:
        rows = data.read(data.eval_indices[:sum(len(b) for b in probe_batches)], "domain_ids")
        size = len(probe_batches[0])
        probe_domains = [rows[i * size:(i + 1) * size] for i in range(len(probe_batches))]
    result: Dict = {"run": spec["key"], "arm": spec["arm"], "lr": spec["lr"], "seed": cfg.seed,
                    "seed_index": spec["seed_index"]}
    graph = ms.get_context("mode")
    if "stability" in analysis:
        ms.set_context(mode=ms.PYNATIVE_MODE)
        init = probes.forward_probe(trainer.model, probe_batches[:1], probe_domains[:1], len(data.domains),
                                    m.moe.num_experts)
        result["act_rms_init"] = init["act_rms"]
        result["param_rms_init"] = probes.param_rms(trainer.model)
        gammas.append({"step": 0, **probes.norm_weights(trainer.model)})
        ms.set_context(mode=graph)
    start = time.perf_counter()
    stopped = ""
    try:
        summary = trainer.run()
    except TrainingStopped as e:
        stopped = str(e)
        summary = {"first_step_s": None, "tokens_per_s": None}
    result["train_wall_s"] = time.perf_counter() - start
    result["first_step_s"] = summary.get("first_step_s")
    result["tokens_per_s"] = summary.get("tokens_per_s")
    if "stability" in analysis and gammas[-1]["step"] != trainer.step:  # stopped early: the weights it ended with
        gammas.append({"step": trainer.step, **probes.norm_weights(trainer.model)})
    series = read_series(os.path.join(out_dir, "metrics.jsonl"))
    loss, grad = series["lm_loss"], series["grad_norm"]
    window = max(10, len(loss) // 10)
    result.update({
        "steps": len(loss), "stopped": stopped,
        "initial_loss": loss[0] if loss else float("nan"),
        "final_train_loss": _finite_mean(loss[-10:]),
        "loss_spike_score": spike_score(loss, window=window), "grad_spike_score": spike_score(grad, window=window),
        "spike_window": window,
        "max_grad_norm": max((g for g in grad if math.isfinite(g)), default=float("nan")),
        "nonfinite_steps": sum(1 for x in loss if not math.isfinite(x)),
    })
    if spec.get("target_loss") is not None:
        result["tokens_to_target"] = tokens_to_target(loss, spec["target_loss"], tokens
                                                      * cfg.runner_config.gradient_accumulation_steps)
    if series["eval_loss"]:
        result["eval_loss"] = series["eval_loss"][-1]
    result["diverged"] = int(bool(stopped) or not math.isfinite(result["final_train_loss"])
                             or result["final_train_loss"] >= result["initial_loss"])
    if routing.max_vio:
        result["max_vio_batch"] = _finite_mean(routing.max_vio)
        result["imbalance_score_ep"] = _finite_mean(routing.imbalance)
        result["expert_cv"] = _finite_mean(routing.cv)
        result["train_max_vio_global"] = float(max_violation(routing.total).mean())
    if drops:
        per_layer = np.mean(np.asarray(drops), 0)
        result["drop_rate"] = float(per_layer.mean())
        result["drop_rate_per_layer"] = per_layer.tolist()
    ms.set_context(mode=ms.PYNATIVE_MODE)
    probe = probes.forward_probe(trainer.model, probe_batches, probe_domains, len(data.domains), m.moe.num_experts)
    ms.set_context(mode=graph)
    names = data.domains or ["all"]
    counts = np.asarray(probe["token_count"])
    sums = np.asarray(probe["token_loss_sum"])
    result["heldout_loss"] = float(sums.sum() / max(1, counts.sum()))
    for i, name in enumerate(names):
        result[f"heldout_loss_{name}"] = float(sums[i] / counts[i]) if counts[i] else float("nan")
    if "domain_counts" in probe:
        result.update(probes.specialisation(probe["domain_counts"]))
        result["domain_counts"] = probe["domain_counts"]
        result["domains"] = names
    if "routing" in analysis and "first_moe_indices" in probe:
        from ..metrics import imbalance_monte_carlo

        devices = imbalance_devices(cfg)
        by_batch = probes.imbalance_by_batch(probe["first_moe_indices"], m.moe.num_experts, devices)
        result["imbalance_by_batch"] = by_batch
        for size, values in by_batch.items():
            result[f"imbalance_score_{size}"] = float(np.mean(values))
        share = np.bincount(probe["first_moe_indices"].reshape(-1), minlength=m.moe.num_experts)
        result["max_over_mean_expert_share"] = float(share.max() / share.mean())
        result["random_routing_is"] = float(imbalance_monte_carlo(
            2000, 16, m.moe.num_experts, m.moe.num_experts_per_tok, devices, m.moe.router == "moge",
            seed=0).mean())
        result["routing_shape"] = [m.moe.num_experts, m.moe.num_experts_per_tok, devices, int(m.moe.router == "moge")]
    if "stability" in analysis:
        result["act_rms_end"] = probe["act_rms"]
        result["param_rms_end"] = probes.param_rms(trainer.model)
        result["gamma"] = gammas
        end = np.asarray(result["act_rms_end"])
        result["act_rms_spread_end"] = float(end.std() / end.mean()) if end.mean() else float("nan")
        init = np.asarray(result["act_rms_init"])
        result["act_rms_spread_init"] = float(init.std() / init.mean()) if init.mean() else float("nan")
        result.update(gamma_trends(gammas, m.norm_layout))
    if "mtp" in analysis and m.num_mtp_layers and probe_batches:
        result.update(_speculative(trainer.model, probe_batches))
    result["run_wall_s"] = time.perf_counter() - t_start
    return result


def _speculative(model, batches, prompt_len: int = 16, new_tokens: int = 32) -> Dict:
    """MTP draft acceptance on held-out prompts (greedy): acceptance rate and mean accepted length (tokens per
    verify step, 1..2) are exact; the speed-up of speculative over plain cached greedy decoding is timing."""
    from ..inference.generate import ModelRunner, Sampler, SpeculativeDecoder, generate

    prompts = [b[i:i + 1, :prompt_len] for b in batches[:2] for i in range(min(2, len(b)))]
    max_len = prompt_len + new_tokens + 2
    plain = ModelRunner(model, max_len)
    spec = SpeculativeDecoder(plain)
    sampler = Sampler(temperature=0.0)
    acc = steps = emitted = 0
    spec_s = plain_s = 0.0
    same = True
    spec(prompts[0], 4)  # compile both paths before timing
    generate(plain, prompts[0], 4, sampler)
    for p in prompts:
        r = spec(p, new_tokens)
        acc, steps, spec_s = acc + r["accepted"], steps + r["steps"], spec_s + r["decode_s"]
        emitted += r["steps"] + r["accepted"]  # each verify step emits 1 token, 2 when the draft is accepted
        g = generate(plain, p, new_tokens, sampler)
        plain_s += g["decode_s"]
        same = same and np.array_equal(g["tokens"], r["tokens"])
    return {"mtp_acceptance_rate": acc / steps if steps else float("nan"),
            "mtp_mean_accepted_length": emitted / steps if steps else float("nan"),
            "mtp_speedup": plain_s / spec_s if spec_s else float("nan"), "mtp_equals_greedy": int(same)}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0], encoding="utf-8") as fh:
        spec = json.load(fh)
    result = run(spec)
    write_text_atomic(os.path.join(os.path.dirname(os.path.abspath(argv[0])), RESULT),
                      json.dumps(result, indent=1, allow_nan=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
