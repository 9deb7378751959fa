"""Layout search: every TP x PP x VPP x CP x EP x DP x micro-batch x recompute layout of a recipe on N devices,
kept if it is valid (``parallel/plan.py: layout_problems``) and fits (``parallel/memory.py``, 90 % of HBM), ranked
by predicted tokens/s at the recipe's global batch (tokens per step held fixed).

Optimizer sharding is always on where DP > 1: in this model it costs nothing extra (the DP term already counts
a reduce-scatter + all-gather) and only saves memory. Selective recompute is not enumerated: the memory model does
not tell it from no recompute, so it would only add time.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Tuple

from ..config.schema import TrainConfig
from ..parallel.memory import GB, stage_memory
from ..parallel.mesh import Mesh
from ..parallel.plan import Layout, layout_problems, stage_plan
from .report import run_of, stages_of
from .shape import ModelShape
from .step import simulate_step


@dataclass(frozen=True)
class Candidate:
    layout: Layout
    micro_batch: int
    recompute: bool
    step: Dict
    memory_gb: float

    def overrides(self) -> List[str]:
        """key=value overrides that turn the recipe into this layout."""
        lay = self.layout
        m = self.step["micro_batches"]
        return [f"parallel_config.data_parallel={lay.dp}", f"parallel_config.model_parallel={lay.tp}",
                f"parallel_config.context_parallel={lay.cp}", f"parallel_config.expert_parallel={lay.ep}",
                f"parallel_config.pipeline_stage={lay.pp}", f"parallel_config.pp_interleave_num={lay.vpp}",
                f"parallel_config.micro_batch_num={m if lay.pp > 1 else 1}",
                f"runner_config.gradient_accumulation_steps={1 if lay.pp > 1 else m}",
                f"runner_config.batch_size={self.micro_batch}", f"recompute_config.recompute={str(self.recompute).lower()}",
                f"parallel_config.optimizer_shard={str(lay.dp > 1).lower()}"]


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def search(cfg: TrainConfig, mesh: Mesh, devices: int, imbalance: float = 1.0,
           ep_a2a: str = "flat") -> Tuple[List[Candidate], int]:
    """(layouts that fit, fastest first; number of valid layouts tried)."""
    m = cfg.model
    base = run_of(cfg)
    global_batch = base.global_batch
    shape = ModelShape.from_config(m)
    plans: Dict[Tuple[int, int], object] = {}
    stages: Dict[Tuple[int, int], list] = {}
    fits: List[Candidate] = []
    tried = 0
    for tp in [t for t in (1, 2, 4, 8, 16) if t <= mesh.devices_per_node and devices % t == 0]:
        for pp in [p for p in _divisors(devices // tp) if p <= m.num_layers]:
            for cp in [c for c in (1, 2, 4, 8) if (devices // (tp * pp)) % c == 0]:
                dp = devices // (tp * pp * cp)
                for ep in [e for e in _divisors(dp * tp * cp) if m.moe.num_experts % e == 0]:
                    for vpp in ((1, 2, 4) if pp > 1 else (1,)):
                        for mbs in (1, 2, 4):
                            if global_batch % (dp * mbs):
                                continue
                            micro = global_batch // (dp * mbs)
                            layout = Layout(dp, tp, cp, ep, pp, vpp, cfg.parallel_config.rank_order)
                            variant = _variant(cfg, layout, mbs, micro, False)
                            if layout_problems(layout, variant, devices):
                                continue
                            if (pp, vpp) not in plans:
                                plans[(pp, vpp)] = stage_plan(variant, layout)
                                stages[(pp, vpp)] = stages_of(variant, plans[(pp, vpp)])
                            for recompute in (False, True):
                                tried += 1
                                variant = _variant(cfg, layout, mbs, micro, recompute)
                                mem = max(stage_memory(variant, layout, plans[(pp, vpp)], s)["total"]
                                          for s in {0, pp - 1})
                                if mem > 0.9 * mesh.hbm_gb * GB:
                                    continue
                                run = replace(base, micro_batch=mbs, recompute="full" if recompute else "none",
                                              sequence_parallel=tp > 1, imbalance=imbalance, ep_a2a=ep_a2a)
                                step = simulate_step(shape, layout, mesh, run, stages[(pp, vpp)])
                                fits.append(Candidate(layout, mbs, recompute, step, mem / GB))
    fits.sort(key=lambda c: -c.step["tokens_per_s"])
    return fits, tried


def _variant(cfg: TrainConfig, layout: Layout, mbs: int, micro: int, recompute: bool) -> TrainConfig:
    p = replace(cfg.parallel_config, data_parallel=layout.dp, model_parallel=layout.tp,
                context_parallel=layout.cp, expert_parallel=layout.ep, pipeline_stage=layout.pp,
                pp_interleave_num=layout.vpp, micro_batch_num=micro if layout.pp > 1 else 1,
                use_seq_parallel=layout.tp > 1, optimizer_shard=layout.dp > 1, pipeline_layers=None)
    return replace(cfg, parallel_config=p, runner_config=replace(cfg.runner_config, batch_size=mbs,
                                                                  gradient_accumulation_steps=1),
                   recompute_config=replace(cfg.recompute_config, recompute=recompute))


def rank_of(fits: List[Candidate], layout: Layout) -> Optional[int]:
    """1-based rank of the fastest fitting candidate with ``layout`` (any micro-batch / recompute), or None."""
    for i, c in enumerate(fits, 1):
        if c.layout == layout:
            return i
    return None


def format_search(fits: List[Candidate], tried: int, own: Layout, mesh: Mesh, devices: int, top: int) -> str:
    lines = [f"search: {tried} valid layouts on {devices} x {mesh.name}, {len(fits)} fit in 90 % of "
             f"{mesh.hbm_gb:g} GB; the fastest {min(top, len(fits))}:",
             f"{'rank':>4}  {'layout':<28}{'mbs':>4}{'recompute':>10}{'step s':>9}{'tokens/s':>13}{'MFU %':>7}"
             f"{'GB':>7}"]
    for i, c in enumerate(fits[:top], 1):
        lines.append(f"{i:>4}  {c.layout.short():<28}{c.micro_batch:>4}{'full' if c.recompute else 'none':>10}"
                     f"{c.step['step_s']:>9.2f}{c.step['tokens_per_s']:>13,.0f}{100 * c.step['mfu']:>7.1f}"
                     f"{c.memory_gb:>7.1f}")
    rank = rank_of(fits, own)
    if own.world != devices:
        verdict = f"uses {own.world} device(s), not {devices}"
    elif rank:
        verdict = f"rank {rank} of {len(fits)} (top {100 * rank / len(fits):.0f} %)"
    else:
        verdict = "does not fit in memory, or is not valid"
    lines.append(f"the recipe's own layout {own.short()}: {verdict}")
    return "\n".join(lines)


def write_winner(best: Candidate, config: str, overrides: List[str], path: str, mindformers: str) -> List[str]:
    """The winner as a recipe (``base_config`` + its parallel overrides, validated by loading it) and / or a
    mindformers YAML through the existing converter; returns the paths written."""
    import os

    import yaml

    from ..config import load_config
    from ..fsutil import write_text_atomic
    from ..integrations.mindformers_recipe import to_mindformers

    cfg = load_config(config, list(overrides) + best.overrides())  # validates the winner
    written = []
    if path:
        data: Dict = {"base_config": os.path.relpath(os.path.abspath(config), os.path.dirname(os.path.abspath(path)))}
        for item in list(overrides) + best.overrides():
            key, value = item.split("=", 1)
            holder = data
            *parents, leaf = key.split(".")
            for part in parents:
                holder = holder.setdefault(part, {})
            holder[leaf] = yaml.safe_load(value)
        write_text_atomic(path, "# written by mindpangu-simulate --search\n" + yaml.safe_dump(data, sort_keys=False))
        written.append(path)
    if mindformers:
        write_text_atomic(mindformers, yaml.safe_dump(to_mindformers(cfg), sort_keys=False))
        written.append(mindformers)
    return written
