"""Pre-flight: what a training run can be refused for, checked before any model is built or data is read.

Loading the recipe already checked every key on its own (type, range, finite numbers, choices) and the rules
between sections (``mindpangu.config.schema.CONSTRAINTS``). This adds what depends on the run, the machine and
the files, in this order:

1. the device: bfloat16 matmul does not run on MindSpore's CPU backend; on Ascend the ``ascend`` dispatch of a MoGE
   router needs the MogeGating Ascend C op installed;
2. the parallel layout (``mindpangu.parallel.plan.check_layout``): one that cannot run anywhere is refused on any
   number of processes; on one process a valid multi-device layout is reported once, saying which degrees are
   emulated and which ignored; across msrun processes on CPU only data parallel runs;
3. memory: an analytic estimate of this process's peak (``estimate_memory``) against the machine's memory;
4. files: output_dir writable, no load_checkpoint (this trainer does not read it), the training data present and of a known kind, the
   tokenizer's vocabulary within model.vocab_size, a preprocessed dataset's seq_length and vocabulary (read from its
   metadata.json, not its samples).

Every refusal is one ConfigError (or FileNotFoundError) naming the key, its value and what is allowed.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional

from ..config import ConfigError, TrainConfig
from ..data.corpus import JSONL_SUFFIXES, TEXT_SUFFIXES
from ..data.mindrecord import METADATA
from ..data.tokenizer import load_tokenizer
from ..moe.kernels import moge_gating_header
from ..params import count_parameters
from ..parallel.memory import activation_elements
from ..parallel.plan import Layout, check_layout

GB = 1024 ** 3
STATE_BYTES_PER_PARAM = 16  # fp32 weights, gradients and AdamW's two moments: 4 + 4 + 8


def machine_memory() -> int:
    """Physical memory of this machine in bytes (MemTotal of /proc/meminfo, else sysconf)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def estimate_memory(cfg: TrainConfig, engine: str) -> Dict[str, float]:
    """Bytes this single process needs at least: ``states`` (every parameter with its gradient and AdamW moments,
    fp32), ``activations`` (what backward keeps for one micro-batch: every layer's tensors under ``whole_graph``;
    under ``layerwise`` each layer's input plus one layer's tensors during its recompute), ``logits`` (fp32 logits
    and their gradient, main head and MTP) and ``total``.

    Per-token activation elements come from ``mindpangu.parallel.memory.activation_elements``; MindSpore's CPU
    attention also keeps the [batch, heads, seq, seq] probabilities and their gradient. Not counted: the framework
    (about 0.5 GB), compile workspace, allocator slack, so the real peak is higher. Costs O(1) in depth (one
    evaluation per layer kind), so absurd depths are refused at once.
    """
    m, r = cfg.model, cfg.runner_config
    seq = cfg.train_dataset.seq_length
    tokens = r.batch_size * seq
    layout = Layout()
    dense = min(m.first_k_dense_replace, m.num_layers)
    moe = m.num_layers - dense
    scores = 2 * r.batch_size * m.num_attention_heads * seq * seq  # attention probabilities and their gradient
    per_layer = {kind: (activation_elements(cfg, layer, layout) * tokens + scores) * 4
                 for kind, layer in (("dense", 0), ("moe", m.num_layers)) if (dense if kind == "dense" else moe)}
    mtp = m.num_mtp_layers * (activation_elements(cfg, m.num_layers, layout) * tokens + scores) * 4
    if engine == "whole_graph":
        activations = dense * per_layer.get("dense", 0) + moe * per_layer.get("moe", 0) + mtp
    else:
        activations = m.num_layers * tokens * m.hidden_size * 4 + max(per_layer.values(), default=0) + mtp
    states = STATE_BYTES_PER_PARAM * count_parameters(m)["all"]
    logits = 2 * tokens * m.vocab_size * 4 * (1 + m.num_mtp_layers)
    return {"states": float(states), "activations": float(activations), "logits": float(logits),
            "total": float(states + activations + logits)}


def check_memory(cfg: TrainConfig, engine: str, available: Optional[int] = None) -> Dict[str, float]:
    """``estimate_memory``, or a ConfigError when it exceeds the machine's memory (``available`` bytes)."""
    est = estimate_memory(cfg, engine)
    available = machine_memory() if available is None else available
    if est["total"] > available:
        params = count_parameters(cfg.model)["all"]
        big = "runner_config.batch_size" if est["activations"] + est["logits"] > est["states"] else "model"
        value = cfg.runner_config.batch_size if big == "runner_config.batch_size" else f"{params:,} parameters"
        raise ConfigError(big, f"the run needs at least {est['total'] / GB:,.1f} GB (parameters, gradients and "
                          f"AdamW states {est['states'] / GB:,.1f} GB, activations {est['activations'] / GB:,.1f} "
                          f"GB, logits {est['logits'] / GB:,.1f} GB; {engine} engine) but this machine has "
                          f"{available / GB:,.1f} GB", value=value,
                          allowed="a smaller model or batch, or --skip-memory-check to try anyway")
    return est


def layout_note(cfg: TrainConfig, layout: Layout) -> str:
    """On one process: which degrees of a (valid) multi-device layout are emulated and which ignored; '' if none."""
    p, r = cfg.parallel_config, cfg.runner_config
    emulated, ignored = [], []
    if layout.ep > 1:
        emulated.append(f"expert_parallel={layout.ep} (the balance loss and the imbalance score split each "
                        f"micro-batch over {layout.ep} virtual EP ranks)")
    if layout.dp > 1:
        ignored.append(f"data_parallel={layout.dp} (this process trains batch_size {r.batch_size} alone, not a "
                       f"global batch of {r.batch_size * layout.dp})")
    for name, value in (("model_parallel", layout.tp), ("context_parallel", layout.cp),
                        ("pipeline_stage", layout.pp), ("pp_interleave_num", layout.vpp)):
        if value > 1:
            ignored.append(f"{name}={value}")
    for name in ("use_seq_parallel", "optimizer_shard"):
        if getattr(p, name):
            ignored.append(f"{name}=true")
    if not emulated and not ignored:
        return ""
    text = "parallel_config on one process: the layout is valid (mindpangu-plan shows it on its devices)"
    if emulated:
        text += "; emulated: " + ", ".join(emulated)
    if ignored:
        text += "; ignored (one process holds and runs the whole model): " + ", ".join(ignored)
    return text


def check_layout_for_run(cfg: TrainConfig, world: int) -> List[str]:
    """The layout checks of a run on ``world`` processes; returns notes to print once (possibly none)."""
    if world == 1:
        layout = check_layout(cfg)
        batch = cfg.runner_config.batch_size
        if cfg.model.moe.balance_loss.type in ("micro_batch", "ep_group") and batch % layout.ep:
            raise ConfigError("runner_config.batch_size", f"must be a multiple of parallel_config.expert_parallel "
                              f"({layout.ep}) on one process: the balance loss splits each micro-batch into "
                              f"{layout.ep} virtual EP ranks", value=batch, allowed=f"a multiple of {layout.ep}")
        return [note for note in [layout_note(cfg, layout)] if note]
    check_layout(cfg, world)
    if cfg.parallel_config.data_parallel != world or Layout.from_config(cfg).world != world:
        raise ConfigError("parallel_config.data_parallel", f"the job has {world} processes; on CPU only data "
                          "parallel runs across processes", value=cfg.parallel_config.data_parallel,
                          allowed=f"data_parallel={world} with every other degree 1")
    return []


def writable_dir(path: str) -> None:
    """Create ``path`` if needed and prove it is writable, or raise ValueError."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write_probe{os.getpid()}")
        with open(probe, "w") as fh:
            fh.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"output_dir '{path}' is not writable: {e.strerror}") from None


def check_data(cfg: TrainConfig) -> None:
    """The training data is there and fits the model: path and kind, tokenizer vocabulary, and for a preprocessed
    directory its metadata (seq_length, vocabulary). Reads no samples."""
    d, vocab = cfg.train_dataset, cfg.model.vocab_size
    if not d.data_path:
        raise ConfigError("train_dataset.data_path", "no training data given",
                          allowed="a preprocessed directory or a .txt / .jsonl file")
    if not os.path.exists(d.data_path):
        raise FileNotFoundError(f"train_dataset.data_path '{d.data_path}' does not exist")
    name = d.data_path[:-3] if d.data_path.endswith(".gz") else d.data_path
    if os.path.isfile(d.data_path) and not name.endswith(TEXT_SUFFIXES + JSONL_SUFFIXES):
        raise ConfigError("train_dataset.data_path", "a file, but not text or JSONL", value=d.data_path,
                          allowed=f"a preprocessed directory, or a file ending in "
                                  f"{' '.join(TEXT_SUFFIXES + JSONL_SUFFIXES)} (optionally .gz)")
    tokenizer = load_tokenizer(d.tokenizer)
    if tokenizer.vocab_size > vocab:
        raise ConfigError("model.vocab_size", f"smaller than the tokenizer's {tokenizer.vocab_size} ids",
                          value=vocab, allowed=f">= {tokenizer.vocab_size}")
    meta_path = os.path.join(d.data_path, METADATA)
    if os.path.isdir(d.data_path) and os.path.isfile(meta_path):
        try:
            with open(meta_path, encoding="utf-8") as fh:
                meta = json.load(fh)
            packed, data_vocab = int(meta["seq_length"]), int(meta.get("vocab_size", 0))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise ValueError(f"'{meta_path}' is corrupt") from None
        if packed != d.seq_length:
            raise ConfigError("train_dataset.seq_length", f"the dataset in '{d.data_path}' was packed for {packed}",
                              value=d.seq_length, allowed=str(packed))
        if data_vocab > vocab:
            raise ConfigError("model.vocab_size", f"smaller than the dataset's tokenizer ({data_vocab})",
                              value=vocab, allowed=f">= {data_vocab}")


def check_device(cfg: TrainConfig) -> None:
    """What the device cannot run: bfloat16 on CPU; the MoGE gating op on Ascend when it is not installed."""
    if cfg.context.device_target == "CPU" and cfg.model.compute_dtype == "bfloat16":
        raise ConfigError("model.compute_dtype", "bfloat16 matmul does not run on MindSpore's CPU backend",
                          value="bfloat16", allowed="float32 | float16")
    if (cfg.context.device_target == "Ascend" and cfg.model.moe.uses_moge_gating_op
            and moge_gating_header() is None):
        raise ConfigError("model.moe.dispatch_backend", "'ascend' routes MoGE with the Ascend C MogeGating op, which "
                          "is not installed (no op_api/include/aclnn_moge_gating.h under ASCEND_CUSTOM_OPP_PATH or "
                          "$ASCEND_OPP_PATH/vendors/*)", value="ascend",
                          allowed="build and install it first (bash ops/ascendc/moge_gating/build.sh, then its .run "
                                  "package or ASCEND_CUSTOM_OPP_PATH; ops/ascendc/README.md), or expert_major")


def preflight(cfg: TrainConfig, world: int, engine: str, memory_check: bool = True) -> List[str]:
    """Every check above, in order; returns the notes to print once (e.g. the emulated parallel degrees)."""
    check_device(cfg)
    notes = check_layout_for_run(cfg, world)
    if memory_check:
        check_memory(cfg, engine)
    writable_dir(cfg.output_dir)
    if cfg.load_checkpoint:  # a mindformers key, kept for its recipes; this trainer would silently ignore it
        raise ConfigError("load_checkpoint", "mindpangu-train does not initialise from it (mindformers' Trainer "
                          "does, through the integration)", value=cfg.load_checkpoint,
                          allowed="null; continue a run with --resume (or resume_training: true) from output_dir")
    check_data(cfg)
    return notes
