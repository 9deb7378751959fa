"""The text ``tools/plan.py`` prints: mesh, layout, rank table, groups, stage map and memory per device."""
from __future__ import annotations

from typing import List

from ..config.schema import TrainConfig
from .memory import GB, stage_memory
from .distributed import msrun_command
from .mesh import Mesh
from .plan import check_layout, coordinates, groups, stage_plan


def _ranges(ranks: List[int]) -> str:
    if len(ranks) > 2 and all(b - a == ranks[1] - ranks[0] for a, b in zip(ranks, ranks[1:])):
        step = ranks[1] - ranks[0]
        return f"{ranks[0]}..{ranks[-1]}" + (f" step {step}" if step != 1 else "")
    return ",".join(map(str, ranks))


def plan_report(cfg: TrainConfig, mesh: Mesh, max_rows: int = 16, config_path: str = "CONFIG.yaml") -> str:
    layout = check_layout(cfg, mesh.devices)
    p = cfg.parallel_config
    lines = [f"mesh    {mesh.describe()}",
             f"layout  {layout.short()} ({layout.world} ranks; order {layout.order}; micro_batch_num "
             f"{p.micro_batch_num}, micro-batch {cfg.runner_config.batch_size} x {cfg.train_dataset.seq_length} "
             f"tokens{', sequence parallel' if p.use_seq_parallel else ''}"
             f"{', optimizer sharding' if p.optimizer_shard else ''})", ""]
    coords = coordinates(layout, mesh.devices_per_node)
    lines.append("rank  node   dp   tp   cp   ep   pp")
    shown = coords if len(coords) <= max_rows else coords[: max_rows // 2] + [None] + coords[-max_rows // 2:]
    for c in shown:
        lines.append("  ..." if c is None else f"{c.rank:>4} {c.node:>5} {c.dp:>4} {c.tp:>4} {c.cp:>4} {c.ep:>4} {c.pp:>4}")
    lines += ["", "group      size  count  inside one node  first group"]
    for name, gs in groups(layout, mesh.devices_per_node).items():
        inside = all(len({mesh.node_of(r) for r in g}) == 1 for g in gs)
        lines.append(f"{name:<10} {len(gs[0]):>4} {len(gs):>6}  {'yes' if inside else 'no':<15}  {_ranges(gs[0])}")
    plan = stage_plan(cfg, layout)
    lines += ["", f"pipeline: {layout.pp} stages x {layout.vpp} chunks (chunk c on stage c mod {layout.pp}); "
              "layers, no-op layers and relative cost per chunk"]
    top = max(plan.costs)
    for c, (ls, noop, cost) in enumerate(zip(plan.layers, plan.noop, plan.costs)):
        extra = (" + embedding" if c == 0 else "") + (" + head" + (" + MTP" if cfg.model.num_mtp_layers else "")
                                                      if c == len(plan.layers) - 1 else "")
        lines.append(f"  chunk {c:>3} stage {c % layout.pp:>3}: layers {ls[0]:>3}-{ls[-1]:<3}"
                     f"{f' + {noop} no-op' if noop else '':<10} cost {cost / top:5.2f}{extra}")
    lines.append(f"  mindformers offset: {plan.mindformers_offset()}")
    lines += ["", f"memory per device (GB of {mesh.hbm_gb:g}): weights  grads  optimizer  activations  total"]
    as_configured = [stage_memory(cfg, layout, plan, s) for s in range(layout.pp)]
    for mem in as_configured:
        lines.append(f"  stage {mem['stage']:>3} ({mem['layers']:>2} layers): {mem['weights'] / GB:7.2f} "
                     f"{mem['grads'] / GB:6.2f} {mem['optimizer'] / GB:10.2f} {mem['activations'] / GB:12.2f} "
                     f"{mem['total'] / GB:6.2f}")
    budget = 0.9 * mesh.hbm_gb * GB  # 10% for communication buffers, workspace and fragmentation
    variants = [("as configured", as_configured,
                 f"recompute {cfg.recompute_config.recompute}, optimizer_shard {p.optimizer_shard}")]
    if not (cfg.recompute_config.recompute is True and p.optimizer_shard):
        variants.append(("with full recompute + optimizer sharding",
                         [stage_memory(cfg, layout, plan, s, True, True) for s in range(layout.pp)], ""))
    for name, mems, how in variants:
        worst = max(mems, key=lambda m_: m_["total"])
        verdict = "fits" if worst["total"] <= budget else "does NOT fit"
        lines.append(f"  {name}{f' ({how})' if how else ''}: largest stage {worst['stage']} needs "
                     f"{worst['total'] / GB:.2f} GB ({worst['activations'] / GB:.2f} GB activations for "
                     f"{worst['inflight_microbatches']:.2f} micro-batches in flight): {verdict} in "
                     f"{mesh.hbm_gb:g} GB less 10% for buffers")
    local = min(layout.world, mesh.devices_per_node)
    multi = layout.world > local
    pure_dp = layout.world == layout.dp
    lines += ["", ("launch" + (f" (on every node; MASTER_ADDR = node 0's address, NODE_RANK = 0.."
                                f"{layout.world // local - 1})" if multi else "")
                   + ("" if pure_dp else "; tools/train.py runs pure data parallel today: this layout is checked "
                      "by tools/sim_compile.py, not run")), "  " + msrun_command(
                  layout.world, f"tools/train.py --config {config_path}", local_workers=local,
                  master_addr="$MASTER_ADDR" if multi else "127.0.0.1", node_rank="$NODE_RANK" if multi else "")]
    return "\n".join(lines)
