"""Our recipes <-> mindformers-style YAML, both ways, without importing mindformers.

``to_mindformers`` writes the sections mindformers reads (``model: {arch, model_config}``, ``parallel_config``,
``parallel`` for MindSpore's auto-parallel context, ``runner_config``, ``optimizer``, ``lr_schedule``, ``context``,
``callbacks``), with the pipeline ``offset`` and ``pp_interleave_num`` taken from our stage plan. The model config
also carries what our network needs to lay itself out under mindformers' parallel context (mindformers hands a
model only its ``model_config`` and ``parallel_config``): ``seq_length`` (a mindformers model key) and our
``rank_order``, ``noop_layers`` and ``pipeline_layers``. mindformers has no no-op layers: the ``offset`` counts ours
(Pro MoE's 48 + 2 over 25 chunks: 2 each, offset 0), and it is what our stage plan gives, which the network
checks. Everything else mindformers has no key for (our data pipeline, logging, mesh...) goes under a
``mindpangu:`` section, so ``from_mindformers(to_mindformers(cfg))`` gives the recipe back exactly.
"""
from __future__ import annotations

import copy
from typing import Any, Dict

from ..config.schema import TrainConfig

ARCH = {"pangu_ultra_moe": ("PanguUltraMoEForCausalLM", "PanguUltraMoEConfig"),
        "pangu_pro_moe": ("PanguProMoEForCausalLM", "PanguProMoEConfig")}
MF_PARALLEL = ("data_parallel", "model_parallel", "context_parallel", "expert_parallel", "pipeline_stage",
               "micro_batch_num", "use_seq_parallel", "vocab_emb_dp", "optimizer_shard", "gradient_aggregation_group")
MF_RUNNER = ("epochs", "batch_size", "sink_mode", "sink_size", "gradient_accumulation_steps")
MF_OPTIMIZER = ("betas", "eps", "weight_decay")
MF_LR = ("learning_rate", "lr_end", "warmup_steps")
GENERAL = ("seed", "output_dir", "run_mode", "resume_training", "load_checkpoint")  # same keys in both dialects
MODEL_PARALLEL = ("rank_order", "noop_layers", "pipeline_layers")  # our parallel_config keys the network reads
# our schedule types -> mindformers LR classes (PanguMultiCosineLR is registered by integrations.mindformers)
LR_TYPES = {"cosine": "CosineWithWarmUpLR", "constant": "ConstantWarmUpLR", "multi_cosine": "PanguMultiCosineLR"}
MULTI_COSINE_KEYS = ("warmup_ratio", "legs")  # what PanguMultiCosineLR takes beyond MF_LR


def to_mindformers(cfg: TrainConfig) -> Dict[str, Any]:
    """A mindformers-style recipe dict for ``cfg`` (validated: the layout must be valid)."""
    from ..parallel.plan import check_layout, stage_plan

    layout = check_layout(cfg)
    plan = stage_plan(cfg, layout)
    ours = copy.deepcopy(cfg.to_dict())
    ours.pop("source", None)
    model = ours.pop("model")
    arch, config_type = ARCH[model.pop("type")]
    par = ours.pop("parallel_config")
    runner = ours.pop("runner_config")
    opt = ours.pop("optimizer")
    lr = ours.pop("lr_schedule")
    recompute = ours.pop("recompute_config")
    model_config = {"type": config_type, **model, "seq_length": ours["train_dataset"].pop("seq_length"),
                    "pp_interleave_num": par.pop("pp_interleave_num"), **{k: par.pop(k) for k in MODEL_PARALLEL}}
    if layout.pp > 1:
        model_config["offset"] = plan.mindformers_offset()
    parallel = {"parallel_mode": 1 if layout.world > 1 else 0, "gradients_mean": False, "full_batch": True,
                "enable_parallel_optimizer": par["optimizer_shard"],
                "strategy_ckpt_config": {"save_file": "./ckpt_strategy.ckpt", "only_trainable_params": False}}
    if layout.vpp > 1:
        parallel["pipeline_config"] = {"pipeline_interleave": True, "pipeline_scheduler": "1f1b"}
    extra: Dict[str, Any] = {k: ours.pop(k) for k in list(ours) if k not in GENERAL}  # data, logging, mesh, ...
    if any(k not in MF_PARALLEL for k in par):
        extra["parallel_config"] = {k: v for k, v in par.items() if k not in MF_PARALLEL}
    extra["runner_config"] = {k: v for k, v in runner.items() if k not in MF_RUNNER}
    extra["optimizer"] = {k: v for k, v in opt.items() if k not in MF_OPTIMIZER}
    mf_lr = MF_LR + (MULTI_COSINE_KEYS if lr["type"] == "multi_cosine" else ())
    extra["lr_schedule"] = {k: v for k, v in lr.items() if k not in mf_lr}
    ckpt = extra["checkpoint"]
    out = {k: ours[k] for k in GENERAL}
    out["use_parallel"] = layout.world > 1
    out.update({
        "trainer": {"type": "CausalLanguageModelingTrainer", "model_name": arch},
        "model": {"arch": {"type": arch}, "model_config": model_config},
        "parallel_config": {k: par[k] for k in MF_PARALLEL},
        "parallel": parallel,
        "runner_config": {k: runner[k] for k in MF_RUNNER},
        "recompute_config": recompute,
        "optimizer": {"type": "AdamW", **{k: opt[k] for k in MF_OPTIMIZER}},
        "lr_schedule": {"type": LR_TYPES[lr["type"]], **{k: lr[k] for k in mf_lr},
                        "total_steps": runner["train_steps"]},
        "context": {"mode": 0, "device_target": "Ascend", "max_device_memory": "58GB",
                    "jit_config": {"jit_level": "O1"}},
        "callbacks": [{"type": "MFLossMonitor"},
                      {"type": "CheckpointMonitor", "prefix": arch, "save_checkpoint_steps": ckpt["save_checkpoint_steps"],
                       "keep_checkpoint_max": ckpt["keep_checkpoint_max"]}],
        "mindpangu": extra,
    })
    return out


def from_mindformers(mf: Dict[str, Any]) -> Dict[str, Any]:
    """Our recipe dict from a mindformers-style one (inverse of ``to_mindformers``; a plain mindformers recipe
    without the ``mindpangu:`` section takes our defaults for what mindformers does not say)."""
    mf = copy.deepcopy(mf)
    extra = mf.pop("mindpangu", {}) or {}
    model_config = dict(mf["model"]["model_config"])
    arch = mf["model"]["arch"]["type"] if isinstance(mf["model"].get("arch"), dict) else mf["model"].get("arch")
    types = {a: t for t, (a, _) in ARCH.items()}
    if arch not in types:
        raise ValueError(f"model.arch.type: {arch!r} is not a mindpangu model; allowed: {sorted(types)}")
    model_config.pop("type", None)
    model_config.pop("offset", None)  # recomputed from the stage plan
    vpp = model_config.pop("pp_interleave_num", 1)
    ours_parallel = {k: model_config.pop(k) for k in MODEL_PARALLEL if k in model_config}
    seq_length = model_config.pop("seq_length", None)
    out: Dict[str, Any] = {k: mf[k] for k in GENERAL + ("use_parallel",) if k in mf}
    out["model"] = {"type": types[arch], **model_config}
    if "recompute_config" in mf:
        out["recompute_config"] = mf["recompute_config"]
    out["parallel_config"] = {**mf.get("parallel_config", {}), "pp_interleave_num": vpp, **ours_parallel,
                              **extra.pop("parallel_config", {})}
    if seq_length is not None:
        extra["train_dataset"] = {**extra.get("train_dataset", {}), "seq_length": seq_length}
    lr = mf.get("lr_schedule", {})
    back = {v: k for k, v in LR_TYPES.items()}
    runner = {**mf.get("runner_config", {}), **extra.pop("runner_config", {})}
    if "total_steps" in lr and "train_steps" not in runner:
        runner["train_steps"] = lr["total_steps"]
    out["runner_config"] = runner
    opt = mf.get("optimizer", {})
    out["optimizer"] = {**{k: opt[k] for k in MF_OPTIMIZER if k in opt},
                        **extra.pop("optimizer", {"type": "AdamW"})}
    out["lr_schedule"] = {**{k: lr[k] for k in MF_LR + MULTI_COSINE_KEYS if k in lr},
                          **extra.pop("lr_schedule", {"type": back.get(lr.get("type"), "cosine")})}
    out.update(extra)
    return out
