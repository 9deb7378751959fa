"""The training loop: data -> micro-steps -> update -> logs, eval, checkpoints; resumable and fault-aware."""
from __future__ import annotations

import math
import os
import time
from typing import Dict, List, Optional

import numpy as np
import mindspore as ms
from tqdm import tqdm

from ..config import ConfigError, TrainConfig
from ..data.mindrecord import PackedDataset, Position, cached_dataset
from ..data.tokenizer import load_tokenizer
from ..fsutil import cache_root
from ..progress import progress_bar
from ..metrics import expert_load_stats, imbalance_from_counts
from ..models import build_model
from . import checkpoint as ckpt
from .logger import MetricsWriter, SpikeCounter
from .mfu import format_mfu, peak_flops, training_flops_per_token
from .optim import learning_rate
from .preflight import preflight
from .step import StepRunner, resolve_engine
from ..parallel.distributed import init_data_parallel


class TrainingStopped(RuntimeError):
    """Training cannot go on (e.g. too many non-finite steps in a row)."""


def open_dataset(cfg: TrainConfig, world: int = 1) -> PackedDataset:
    """The training data (checked by ``preflight.check_data`` first): a preprocessed directory, or a text/JSONL
    file preprocessed once into the cache. Raises ConfigError when the batch does not fit the training split."""
    d = cfg.train_dataset
    path = d.data_path
    if os.path.isfile(path):
        path = cached_dataset(path, load_tokenizer(d.tokenizer), d.seq_length, os.path.join(cache_root(), "data"))
    data = PackedDataset(path, d.eval_fraction)
    batch = cfg.runner_config.batch_size
    if len(data.train_indices) < batch * world:
        raise ConfigError("runner_config.batch_size", f"one step needs {batch * world} sequences, the training "
                          f"split of '{path}' has {len(data.train_indices)} ({data.num_samples} samples of "
                          f"{d.seq_length + 1} tokens, eval_fraction {d.eval_fraction})", value=batch,
                          allowed=f"<= {len(data.train_indices) // world}, or more data / a shorter seq_length")
    return data


def imbalance_devices(cfg: TrainConfig) -> int:
    """Devices the logged imbalance score spreads experts over: MoGE groups, else EP ranks, else up to 8."""
    m = cfg.model.moe
    if m.router == "moge":
        return m.num_groups
    if cfg.parallel_config.expert_parallel > 1:
        return cfg.parallel_config.expert_parallel
    return math.gcd(m.num_experts, 8)


class _Silent:
    """What the processes other than rank 0 write: nothing."""

    def write(self, *_):
        pass

    def close(self):
        pass


class Trainer:
    """Builds everything a run needs from a TrainConfig; ``run()`` trains and returns a summary dict."""

    def __init__(self, cfg: TrainConfig, resume: Optional[bool] = None, progress: bool = True,
                 max_steps_this_run: Optional[int] = None, memory_check: bool = True):
        """Checks the run (``preflight``: layout, memory, files) before opening the data and building the model.
        ``memory_check=False`` skips the memory estimate's refusal (``--skip-memory-check``)."""
        self.cfg = cfg
        self.max_steps_this_run = max_steps_this_run
        self.resume = cfg.resume_training if resume is None else resume
        self.progress = progress
        m = cfg.model
        ms.set_context(mode=ms.GRAPH_MODE if cfg.context.graph_mode else ms.PYNATIVE_MODE,
                       device_target=cfg.context.device_target)
        if cfg.context.jit_level:
            ms.set_context(jit_config={"jit_level": cfg.context.jit_level})
        if cfg.context.runtime_num_threads:
            ms.set_context(runtime_num_threads=cfg.context.runtime_num_threads)
        ms.set_seed(cfg.seed)
        self.rank, self.world = init_data_parallel()
        self.is_main = self.rank == 0  # writes logs, metrics and checkpoints
        self.progress = progress and self.is_main
        self.notes = preflight(cfg, self.world, resolve_engine(cfg), memory_check)
        self.data = open_dataset(cfg, self.world)
        self.model = build_model(m, seed=cfg.seed)
        self.runner = StepRunner(self.model, cfg, self.world)
        r = cfg.runner_config
        self.loss_scale = r.loss_scale if m.compute_dtype == "float16" else 1.0
        self.step = 0
        self.position = Position()
        self.skipped = self.consecutive = self.good = 0
        self.loss_spikes, self.grad_spikes = SpikeCounter(cfg.logging.spike_sigma), SpikeCounter(cfg.logging.spike_sigma)

    # ---- checkpoints -------------------------------------------------------------------------------------------
    @property
    def ckpt_root(self) -> str:
        return os.path.join(self.cfg.output_dir, "checkpoints")

    def state(self) -> Dict:
        return {"step": self.step, "epoch": self.position.epoch, "offset": self.position.offset,
                "loss_scale": self.loss_scale, "skipped": self.skipped, "consecutive": self.consecutive,
                "good": self.good, "loss_spikes": self.loss_spikes.state(), "grad_spikes": self.grad_spikes.state(),
                "seed": self.cfg.seed, "data": self.data.meta.get("fingerprint"), "model": self.cfg.model.to_dict()}

    def save(self) -> Optional[str]:
        if not self.is_main:
            return None
        return ckpt.save(self.ckpt_root, self.step, self.runner.state_params, self.state(),
                         self.cfg.checkpoint.keep_checkpoint_max)

    def restore(self) -> bool:
        found = ckpt.load_latest(self.ckpt_root)
        if found is None:
            return False
        path, state, arrays = found
        diff = ckpt.config_differences(state.get("model", {}), self.cfg.model.to_dict())
        if diff:
            raise ValueError(f"checkpoint '{path}' was written for another model config: " + "; ".join(diff[:6]))
        missing = [p.name for p in self.runner.state_params if p.name not in arrays]
        if missing:
            raise ValueError(f"checkpoint '{path}' lacks {len(missing)} tensors, e.g. {missing[:3]}")
        for p in self.runner.state_params:
            if tuple(arrays[p.name].shape) != tuple(p.shape):
                raise ValueError(f"checkpoint '{path}': '{p.name}' has shape {arrays[p.name].shape}, expected {p.shape}")
            p.set_data(ms.Tensor(arrays[p.name]))
        self.step, self.position = state["step"], Position(state["epoch"], state["offset"])
        self.loss_scale, self.skipped = state["loss_scale"], state["skipped"]
        self.consecutive, self.good = state["consecutive"], state["good"]
        self.loss_spikes.load(state["loss_spikes"])
        self.grad_spikes.load(state["grad_spikes"])
        if state.get("data") != self.data.meta.get("fingerprint"):
            print(f"warning: the training data differs from the data checkpoint '{path}' was trained on")
        return True

    # ---- one optimizer step --------------------------------------------------------------------------------------
    def train_step(self, micro_batches: List[np.ndarray]) -> Dict:
        lr = learning_rate(self.step, self.cfg.runner_config.train_steps, self.cfg.lr_schedule)
        return self.runner.run(micro_batches, lr, self.loss_scale)

    def after_step(self, out: Dict) -> None:
        """Skip accounting, float16 loss-scale control and spike counters."""
        r = self.cfg.runner_config
        if not out["finite"] or not math.isfinite(out["loss"]):
            self.skipped += 1
            self.consecutive += 1
            if self.cfg.model.compute_dtype == "float16":
                self.loss_scale = max(1.0, self.loss_scale / 2)
            return
        self.consecutive = 0
        self.good += 1
        if self.cfg.model.compute_dtype == "float16" and self.good % r.loss_scale_window == 0:
            self.loss_scale *= 2
        self.loss_spikes.update(out["loss"])
        self.grad_spikes.update(out["grad_norm"])

    def evaluate(self) -> Optional[float]:
        batches = self.data.eval_batches(self.cfg.runner_config.batch_size, self.cfg.logging.eval_batches)
        if not batches:
            return None
        return float(np.mean([self.runner.eval_loss(b) for b in batches]))

    def expert_load(self, counts: np.ndarray) -> Dict:
        """Per MoE layer: max/mean expert load and the device imbalance score."""
        tokens = counts.sum(1) / self.cfg.model.moe.num_experts_per_tok
        return {"load_max_over_mean": [round(expert_load_stats(c)["max_over_mean"], 4) for c in counts],
                "imbalance_score": [round(float(x), 4) for x in
                                    imbalance_from_counts(counts, np.maximum(tokens, 1), imbalance_devices(self.cfg))]}

    def _say(self, text: str) -> None:
        if self.is_main:
            tqdm.write(text)

    # ---- the loop ----------------------------------------------------------------------------------------------
    def run(self) -> Dict:
        cfg, r, log = self.cfg, self.cfg.runner_config, self.cfg.logging
        resumed = self.resume and self.restore()
        writer = MetricsWriter(cfg.output_dir, log.tensorboard) if self.is_main else _Silent()
        peak, peak_source = peak_flops(log.peak_tflops)
        for note in self.notes:
            self._say(note)
        self._say(f"engine {self.runner.engine}; MFU peak {peak / 1e9:,.0f} GFLOP/s ({peak_source})")
        flops_per_token = training_flops_per_token(cfg.model, cfg.train_dataset.seq_length)
        stream = self.data.batches(r.batch_size, self.position, cfg.seed, cfg.train_dataset.shuffle, self.rank,
                                   self.world)
        start_step = self.step
        stop_at = r.train_steps if not self.max_steps_this_run else min(r.train_steps, start_step + self.max_steps_this_run)
        bar = progress_bar(total=r.train_steps, initial=self.step, desc="train", unit="step",
                           disable=not self.progress)
        if resumed:
            self._say(f"resumed from step {self.step} (epoch {self.position.epoch}, sample {self.position.offset})")
        t_run = time.perf_counter()
        window_tokens, window_time, first_step_s, last_eval = 0, 0.0, None, None
        recent: List[tuple] = []
        try:
            while self.step < stop_at:
                micro = []
                for _ in range(r.gradient_accumulation_steps):
                    batch, self.position = next(stream)
                    micro.append(batch)
                t0 = time.perf_counter()
                out = self.train_step(micro)
                dt = time.perf_counter() - t0
                self.step += 1
                self.after_step(out)
                if first_step_s is None:
                    first_step_s = dt
                else:
                    window_tokens += out["tokens"]
                    window_time += dt
                recent.append((out["loss"], out["lm_loss"]))
                tps = window_tokens / window_time if window_time else out["tokens"] / dt
                record = {"kind": "train", "step": self.step, "loss": out["loss"], "lm_loss": out["lm_loss"],
                          "mtp_loss": out["mtp_loss"], "balance_loss": out["balance_loss"], "z_loss": out["z_loss"],
                          "grad_norm": out["grad_norm"], "lr": out["lr"], "tokens_per_s": tps,
                          "mfu": flops_per_token * tps / peak, "skipped": self.skipped,
                          "loss_spikes": self.loss_spikes.count, "grad_spikes": self.grad_spikes.count}
                if self.step % log.log_interval == 0 or self.step == r.train_steps:
                    record.update(self.expert_load(out["counts"]))
                    self._say(self._line(record))
                writer.write(record)
                if self.consecutive >= r.max_consecutive_skips:
                    raise TrainingStopped(
                        f"training stopped at step {self.step}: {self.consecutive} optimizer steps in a row had a "
                        f"non-finite loss or gradients (last loss {out['loss']}, grad norm {out['grad_norm']}); "
                        "lower lr_schedule.learning_rate, enable optimizer.grad_clip, or check the data")
                bar.set_postfix(loss=f"{out['loss']:.3f}", refresh=False)
                bar.update(1)
                if log.eval_interval and (self.step % log.eval_interval == 0 or self.step == r.train_steps):
                    last_eval = self.evaluate()
                    if last_eval is not None:
                        writer.write({"kind": "eval", "step": self.step, "eval_loss": last_eval})
                        self._say(f"step {self.step}: eval loss {last_eval:.4f}")
                if self.step % cfg.checkpoint.save_checkpoint_steps == 0 or self.step == stop_at:
                    self.save()
        finally:
            bar.close()
            writer.close()
        summary = {"steps": self.step, "steps_this_run": self.step - start_step,
                   "final_loss": float(np.mean([x[0] for x in recent[-10:]])) if recent else None,
                   "final_lm_loss": float(np.mean([x[1] for x in recent[-10:]])) if recent else None,
                   "eval_loss": last_eval,
                   "skipped": self.skipped, "loss_spikes": self.loss_spikes.count,
                   "grad_spikes": self.grad_spikes.count, "first_step_s": first_step_s,
                   "tokens_per_s": window_tokens / window_time if window_time else None,
                   "wall_s": time.perf_counter() - t_run, "output_dir": cfg.output_dir}
        self._say(self._summary(summary))
        return summary

    @staticmethod
    def _line(r: Dict) -> str:
        load = max(r["load_max_over_mean"]) if r.get("load_max_over_mean") else 0.0
        imb = max(r["imbalance_score"]) if r.get("imbalance_score") else 0.0
        return (f"step {r['step']}: loss {r['loss']:.4f} (lm {r['lm_loss']:.4f}, mtp {r['mtp_loss']:.4f}, "
                f"balance {r['balance_loss']:.4f}) | grad norm {r['grad_norm']:.3f} | lr {r['lr']:.2e} | "
                f"{r['tokens_per_s']:,.0f} tok/s | MFU {format_mfu(r['mfu'])} | expert load max/mean {load:.2f}, "
                f"IS {imb:.3f} (worst layer) | skipped {r['skipped']} | spikes loss {r['loss_spikes']} "
                f"grad {r['grad_spikes']}")

    @staticmethod
    def _summary(s: Dict) -> str:
        rows = [("steps", s["steps"]), ("train loss, total (last 10)", s["final_loss"]),
                ("train loss, LM (last 10)", s["final_lm_loss"]), ("eval loss (LM, held out)", s["eval_loss"]),
                ("steady tokens/s", s["tokens_per_s"]), ("first step (compile) s", s["first_step_s"]),
                ("wall s", s["wall_s"]), ("skipped steps", s["skipped"]),
                ("loss / grad spikes", f"{s['loss_spikes']} / {s['grad_spikes']}"), ("output", s["output_dir"])]
        fmt = lambda v: f"{v:,.4f}" if isinstance(v, float) else str(v)  # noqa: E731
        return "\n".join(["training summary"] + [f"  {k:<28}{fmt(v)}" for k, v in rows])
