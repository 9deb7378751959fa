"""A recipe's predicted step on a mesh: what ``mindpangu-simulate`` prints."""
from __future__ import annotations

from typing import Dict, List

from ..config.schema import TrainConfig
from ..parallel.memory import GB, stage_memory
from ..parallel.mesh import Mesh
from ..parallel.plan import StagePlan, check_layout, stage_plan
from .memory import state_bytes_per_parameter
from .pipeline import bubble_fractions
from .shape import ModelShape
from .step import Run, Stage, simulate_step


def run_of(cfg: TrainConfig) -> Run:
    """The step a recipe trains: micro-batches of runner_config.batch_size, micro_batch_num of them per DP rank
    under pipelining (else gradient_accumulation_steps), recompute and sequence parallelism as configured."""
    p, r = cfg.parallel_config, cfg.runner_config
    per_rank = p.micro_batch_num if p.pipeline_stage > 1 else r.gradient_accumulation_steps
    rc = cfg.recompute_config
    recompute = "full" if rc.recompute is True else "selective" if rc.select_recompute else "none"
    return Run(seq=cfg.train_dataset.seq_length, global_batch=r.batch_size * per_rank * p.data_parallel,
               micro_batch=r.batch_size, recompute=recompute, sequence_parallel=p.use_seq_parallel)


def stages_of(cfg: TrainConfig, plan: StagePlan) -> List[Stage]:
    """The stage plan's layers per stage (parallel/plan.py balances them by cost, head and MTP included)."""
    k = cfg.model.first_k_dense_replace
    out = []
    for s in range(plan.pp):
        layers = plan.stage_layers(s)
        dense = sum(1 for i in layers if i < k)
        out.append(Stage(dense, len(layers) - dense, s == plan.pp - 1))
    return out


def simulate_config(cfg: TrainConfig, mesh: Mesh, imbalance: float = 1.0, ep_a2a: str = "flat",
                    devices: int = 0) -> Dict:
    """Step prediction, memory per stage and whether it fits, for the recipe's own layout on ``devices`` of
    ``mesh`` (default: all of them; a run may use fewer devices than whole nodes hold)."""
    from dataclasses import replace

    layout = check_layout(cfg, devices or mesh.devices)
    run = replace(run_of(cfg), imbalance=imbalance, ep_a2a=ep_a2a)
    plan = stage_plan(cfg, layout)
    step = simulate_step(ModelShape.from_config(cfg.model), layout, mesh, run, stages_of(cfg, plan))
    memory = [stage_memory(cfg, layout, plan, s) for s in range(layout.pp)]
    worst = max(memory, key=lambda m: m["total"])
    m = step["micro_batches"]
    bubbles = bubble_fractions(layout.pp, m, layout.vpp) if layout.vpp == 1 or m % layout.pp == 0 else {}
    dense, experts = ModelShape.from_config(cfg.model).parameters()
    per_device = dense / (layout.tp * layout.pp) + experts / (layout.ep * layout.expert_tp * layout.pp)
    megatron = per_device * state_bytes_per_parameter(layout.dp * layout.cp, cfg.parallel_config.optimizer_shard)
    return {"layout": layout, "run": run, "step": step, "memory": memory, "worst_stage": worst["stage"],
            "fits": worst["total"] <= 0.9 * mesh.hbm_gb * GB, "bubbles": bubbles, "megatron_states_gb": megatron / GB}


def format_report(result: Dict, mesh: Mesh) -> str:
    s, run, lay = result["step"], result["run"], result["layout"]
    lines = [f"mesh    {mesh.describe()}",
             f"layout  {lay.short()}; {s['micro_batches']} micro-batches of {run.micro_batch} x {run.seq} tokens per "
             f"DP rank (global batch {run.global_batch}), recompute {run.recompute}"
             f"{', sequence parallel' if run.sequence_parallel else ''}", "",
             f"step    {s['step_s']:.3f} s (critical stage {s['critical_stage']}): " + ", ".join(
                 f"{k[:-2].replace('_', ' ')} {s[k]:.3f}" for k in ("compute_s", "tp_comm_s", "ep_comm_s",
                                                                   "cp_comm_s", "pp_comm_s", "dp_comm_s",
                                                                   "bubble_s") if s[k]),
             f"        {s['tokens_per_s']:,.0f} tokens/s, MFU {100 * s['mfu']:.1f} % (model FLOPs, full attention "
             f"square; peak {mesh.peak_tflops:g} TFLOP/s per device)"]
    if result["bubbles"]:
        b = result["bubbles"]
        lines.append(f"bubble  {100 * b['bubble_over_total']:.2f} % of the step (Pangu Ultra's definition), "
                     f"{100 * b['bubble_over_ideal']:.2f} % of the ideal time (Megatron's)")
    worst = result["memory"][result["worst_stage"]]
    lines.append(f"memory  {worst['total'] / GB:.1f} GB on stage {result['worst_stage']} (the fullest) of "
                 f"{mesh.hbm_gb:g} GB: {'fits' if result['fits'] else 'does NOT fit'} (90 % budget); weights, "
                 f"gradients and optimizer {(worst['weights'] + worst['grads'] + worst['optimizer']) / GB:.1f} GB, "
                 f"Megatron's convention {result['megatron_states_gb']:.1f} GB")
    return "\n".join(lines)
