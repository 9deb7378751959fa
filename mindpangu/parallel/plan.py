"""The parallel plan of a recipe: validation, every rank's coordinates, the communication groups, and the
layers of each pipeline stage (with VPP chunks, uneven splits and no-op padding layers).

Ranks are numbered by ``parallel_config.rank_order`` (fastest-varying first, pp last). Dense layers use the
(tp, cp, dp) coordinates of that order without ep. Experts are sharded over ``ep`` ranks carved from the same
group: a rank's EP coordinate is ``(g // s) % ep`` where g is its index inside its pipeline stage and s the
product of the dims listed before ``ep`` (tp x cp for the default "tp-cp-ep-dp-pp", so EP groups span DP
replicas and TP stays innermost, inside a node).
"""
from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from ..config import ConfigError
from ..config.schema import ModelConfig, TrainConfig

DIMS = ("tp", "cp", "ep", "dp", "pp")
FIELD = {"dp": "data_parallel", "tp": "model_parallel", "cp": "context_parallel", "ep": "expert_parallel",
         "pp": "pipeline_stage", "vpp": "pp_interleave_num"}


class ParallelConfigError(ConfigError):
    """A layout that cannot run, with the fields involved and the nearest layouts that can."""

    def __init__(self, problems: List[str], suggestions: List[str]):
        self.problems, self.suggestions = problems, suggestions
        text = "; ".join(problems)
        if suggestions:
            text += ". Nearest valid layouts: " + " | ".join(suggestions)
        ValueError.__init__(self, f"parallel_config: {text}")


@dataclass(frozen=True)
class Layout:
    dp: int = 1
    tp: int = 1
    cp: int = 1
    ep: int = 1
    pp: int = 1
    vpp: int = 1
    order: str = "tp-cp-ep-dp-pp"

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> "Layout":
        p = cfg.parallel_config
        return cls(p.data_parallel, p.model_parallel, p.context_parallel, p.expert_parallel, p.pipeline_stage,
                   p.pp_interleave_num, p.rank_order)

    @property
    def world(self) -> int:
        return self.dp * self.tp * self.cp * self.pp

    @property
    def stage_size(self) -> int:
        return self.dp * self.tp * self.cp

    def size(self, dim: str) -> int:
        return getattr(self, dim)

    @property
    def expert_tp(self) -> int:
        """Tensor parallelism inside each expert: TP where EP x TP fits the stage, less when EP spans TP ranks."""
        return math.gcd(self.tp, self.stage_size // self.ep)

    def ep_stride(self) -> int:
        """Product of the dims listed before ep in the order (ep's stride inside a stage)."""
        dims = self.order.split("-")
        return math.prod(self.size(d) for d in dims[: dims.index("ep")] if d != "pp")

    def short(self) -> str:
        parts = [f"{d.upper()}{self.size(d)}" for d in ("dp", "tp", "cp", "ep", "pp") if self.size(d) > 1]
        if self.vpp > 1:
            parts.append(f"VPP{self.vpp}")
        return "x".join(parts) or "single device"

    def fields(self) -> str:
        return " ".join(f"{FIELD[d]}={self.size(d)}" for d in ("dp", "tp", "cp", "ep", "pp", "vpp"))


# ---- validation ----------------------------------------------------------------------------------------------

def layout_problems(layout: Layout, cfg: TrainConfig, devices: Optional[int] = None) -> List[str]:
    """Every reason ``layout`` cannot run ``cfg`` (on ``devices`` devices, if given); empty when it can."""
    m, p, r = cfg.model, cfg.parallel_config, cfg.runner_config
    seq = cfg.train_dataset.seq_length
    out = []
    if devices is not None and layout.world != devices:
        out.append(f"data_parallel x model_parallel x context_parallel x pipeline_stage = {layout.dp} x "
                   f"{layout.tp} x {layout.cp} x {layout.pp} = {layout.world}, but the mesh has {devices} devices")
    s = layout.ep_stride()
    if layout.stage_size % (s * layout.ep):
        rest = layout.stage_size // s
        out.append(f"expert_parallel ({layout.ep}) must divide the {rest} ranks it is carved from (the dims after "
                   f"'ep' in rank_order '{layout.order}' within data_parallel x model_parallel x context_parallel)")
    if m.moe.num_experts % layout.ep:
        out.append(f"expert_parallel ({layout.ep}) must divide model.moe.num_experts ({m.moe.num_experts})")
    if m.moe.router == "moge" and m.moe.num_groups % layout.ep:
        out.append(f"MoGE groups (model.moe.num_groups = {m.moe.num_groups}) must align with EP ranks: "
                   f"expert_parallel ({layout.ep}) must divide them, so that every rank holds whole groups and "
                   "gets the same number of tokens")
    if m.num_attention_heads % layout.tp:
        out.append(f"model_parallel ({layout.tp}) must divide model.num_attention_heads ({m.num_attention_heads})")
    if m.type == "pangu_pro_moe":
        kv = m.num_key_value_heads or m.num_attention_heads
        if kv % layout.tp and layout.tp % kv:
            out.append(f"model_parallel ({layout.tp}) and model.num_key_value_heads ({kv}) must divide one another")
    if m.vocab_size % layout.tp:
        out.append(f"model_parallel ({layout.tp}) must divide model.vocab_size ({m.vocab_size}) for the "
                   "vocabulary-parallel LM head")
    if layout.pp > 1 and p.micro_batch_num < layout.pp:
        out.append(f"parallel_config.micro_batch_num ({p.micro_batch_num}) must be >= pipeline_stage "
                   f"({layout.pp}) to fill the pipeline")
    if layout.vpp > 1 and layout.pp == 1:
        out.append("pp_interleave_num > 1 needs pipeline_stage > 1")
    if layout.vpp > 1 and p.micro_batch_num % layout.pp:
        out.append(f"with pp_interleave_num > 1, micro_batch_num ({p.micro_batch_num}) must be a multiple of "
                   f"pipeline_stage ({layout.pp})")
    split = 1
    if p.use_seq_parallel:
        split *= layout.tp
    split *= layout.cp * (2 if layout.cp > 1 else 1)  # load-balanced CP: two chunks per rank
    if seq % split:
        out.append(f"train_dataset.seq_length ({seq}) must be divisible by {split} (use_seq_parallel x "
                   f"model_parallel x 2 x context_parallel)")
    chunks = layout.pp * layout.vpp
    layers = m.num_layers + p.noop_layers
    if p.pipeline_layers is not None:
        if len(p.pipeline_layers) != chunks:
            out.append(f"parallel_config.pipeline_layers has {len(p.pipeline_layers)} entries; pipeline_stage x "
                       f"pp_interleave_num = {chunks}")
        elif sum(p.pipeline_layers) != m.num_layers or min(p.pipeline_layers) < 1:
            out.append(f"parallel_config.pipeline_layers {p.pipeline_layers} must give every chunk >= 1 layer "
                       f"and sum to model.num_layers ({m.num_layers})")
        if p.noop_layers:
            out.append("give either parallel_config.pipeline_layers (explicit split) or noop_layers (padding)")
    elif layers < chunks:
        out.append(f"model.num_layers + noop_layers ({layers}) < pipeline_stage x pp_interleave_num ({chunks}): "
                   "every chunk needs a layer")
    if p.noop_layers and p.pipeline_layers is None and layers % chunks:
        out.append(f"noop_layers pad the layers to a multiple of the chunks: {m.num_layers} + {p.noop_layers} is "
                   f"not a multiple of {chunks}")
    if r.gradient_accumulation_steps > 1 and layout.pp > 1:
        out.append("runner_config.gradient_accumulation_steps > 1 with pipeline_stage > 1: use micro_batch_num")
    return out


def nearest_layouts(layout: Layout, cfg: TrainConfig, devices: int, count: int = 3) -> List[Layout]:
    """Valid layouts on ``devices`` devices closest to ``layout`` (log-distance over the degrees)."""
    def divisors(n):
        return [d for d in range(1, n + 1) if n % d == 0]

    found = []
    for tp, pp in itertools.product(divisors(devices), repeat=2):
        if devices % (tp * pp):
            continue
        for cp in divisors(devices // (tp * pp)):
            dp = devices // (tp * pp * cp)
            for ep in divisors(dp * tp * cp):
                for vpp in sorted({1, layout.vpp}):
                    cand = Layout(dp, tp, cp, ep, pp, vpp, layout.order)
                    if not layout_problems(cand, cfg, devices):
                        dist = sum(abs(math.log2(cand.size(d) / layout.size(d))) for d in ("dp", "tp", "cp", "ep", "pp"))
                        found.append((dist, cand.short(), cand))
    return [c for _, _, c in sorted(found, key=lambda x: (x[0], x[1]))[:count]]


def check_layout(cfg: TrainConfig, devices: Optional[int] = None) -> Layout:
    """The layout of ``cfg``, or a ParallelConfigError naming every problem and the nearest valid layouts."""
    layout = Layout.from_config(cfg)
    problems = layout_problems(layout, cfg, devices)
    if problems:
        p = cfg.parallel_config
        if p.pipeline_layers is not None and (p.noop_layers or len(p.pipeline_layers) != layout.pp * layout.vpp
                                              or sum(p.pipeline_layers) != cfg.model.num_layers):
            costs, first, last = layer_costs(cfg.model, cfg.train_dataset.seq_length)
            chunks = layout.pp * layout.vpp
            fix = split_layers(costs, chunks, first, last) if len(costs) >= chunks else None
            raise ParallelConfigError(problems, [f"noop_layers=0 pipeline_layers={fix}" if fix else
                                                 "pipeline_layers=null"])
        near = nearest_layouts(layout, cfg, devices or layout.world)
        raise ParallelConfigError(problems, [c.fields() for c in near])
    return layout


# ---- ranks and groups ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RankCoord:
    rank: int
    dp: int
    tp: int
    cp: int
    ep: int
    pp: int
    node: int


def coordinates(layout: Layout, devices_per_node: int = 8) -> List[RankCoord]:
    """Every rank's (dp, tp, cp, ep, pp) coordinates under ``layout.order``."""
    dense = [d for d in layout.order.split("-") if d != "ep"]
    s = layout.ep_stride()
    out = []
    for rank in range(layout.world):
        coord, rest = {}, rank
        for d in dense:
            coord[d] = rest % layout.size(d)
            rest //= layout.size(d)
        g = rank % layout.stage_size
        out.append(RankCoord(rank, coord["dp"], coord["tp"], coord["cp"], (g // s) % layout.ep, coord["pp"],
                             rank // devices_per_node))
    return out


def groups(layout: Layout, devices_per_node: int = 8) -> Dict[str, List[List[int]]]:
    """Communication groups: ranks sharing every coordinate but the group's own (per dim), plus the expert
    data-parallel group (same stage and EP rank: they hold the same experts)."""
    coords = coordinates(layout, devices_per_node)

    def by(key):
        out: Dict[tuple, List[int]] = {}
        for c in coords:
            out.setdefault(key(c), []).append(c.rank)
        return sorted(out.values())

    return {
        "tp": by(lambda c: (c.dp, c.cp, c.pp)),
        "cp": by(lambda c: (c.dp, c.tp, c.pp)),
        "dp": by(lambda c: (c.tp, c.cp, c.pp)),
        "pp": by(lambda c: (c.dp, c.tp, c.cp)),
        "ep": by(lambda c: (c.pp, (c.rank % layout.stage_size) % layout.ep_stride(),
                            (c.rank % layout.stage_size) // (layout.ep_stride() * layout.ep))),
        "expert_dp": by(lambda c: (c.pp, c.ep, (c.rank % layout.stage_size) % layout.ep_stride())),
    }


@functools.lru_cache(maxsize=None)  # asked once per MoE layer; 43 ms for the 6,144 ranks of the 718B layout
def balance_groups(layout: Layout) -> Tuple[int, int]:
    """(ranks, ranks_per_group) of the ``ep_group`` balance loss in a semi-auto parallel graph, whose token axis
    holds the global micro-batch as ``layout.dp`` contiguous slices (DP rank d holds the d-th): the ranks of one EP
    group (``groups(layout)["ep"]``) hold ``ranks_per_group`` distinct consecutive slices, whose routing
    statistics the loss pools (Pangu Ultra MoE, sec. 3.2; Megatron's tokens_per_expert all-reduced over the EP
    group). That is ``ep`` for the default rank_order (EP carved from DP replicas), fewer where EP spans TP ranks
    (those hold the same tokens). Raises ValueError for context_parallel > 1 (a DP rank's tokens are then split
    over CP ranks; semi-auto parallel refuses it anyway) or an order whose EP groups do not hold whole blocks of
    consecutive slices."""
    if layout.cp > 1:
        raise ValueError(f"balance_groups: context_parallel {layout.cp} splits each DP rank's tokens over CP ranks; "
                         "the semi-auto parallel graph supports context_parallel 1 only")
    coords = coordinates(layout)
    blocks = sorted({tuple(sorted({coords[r].dp for r in group})) for group in groups(layout)["ep"]
                     if group[0] < layout.stage_size})
    size = len(blocks[0])
    if blocks != [tuple(range(i, i + size)) for i in range(0, layout.dp, size)]:
        raise ValueError(f"balance_groups: rank_order '{layout.order}' gives EP groups over the DP slices {blocks}, "
                         "not consecutive blocks of one size")
    return layout.dp, size


# ---- pipeline stages -----------------------------------------------------------------------------------------

def layer_costs(m: ModelConfig, seq: int) -> Tuple[List[float], float, float]:
    """(forward FLOPs per token of each decoder layer, embedding chunk extra, last chunk extra: final norm, LM head
    and the MTP layers) -- what balancing pipeline chunks weighs."""
    from ..params import attention_head_dims, attention_parameters, moe_parts

    n = m.num_layers
    attn = sum(attention_parameters(m))
    qk, v = attention_head_dims(m)
    attn_core = m.num_attention_heads * (qk + v) * seq / 2  # causal scores and context, per token
    router, expert, shared, _ = moe_parts(m)
    moe = router + m.moe.num_experts_per_tok * expert + shared
    dense = 3 * m.hidden_size * m.intermediate_size
    costs = [2 * (attn + (dense if i < m.first_k_dense_replace else moe)) + 2 * attn_core for i in range(n)]
    head = 2 * m.hidden_size * m.vocab_size
    mtp = m.num_mtp_layers * (costs[-1] + 2 * 2 * m.hidden_size ** 2 + head)
    return costs, 0.0, head + mtp


def split_layers(costs: List[float], chunks: int, first_extra: float, last_extra: float,
                 slots: Optional[int] = None) -> List[int]:
    """Real layers per chunk: contiguous, at least one each, at most ``slots`` (no-op padding fills the rest),
    minimising the most expensive chunk (chunk 0 also embeds, the last also runs the head and MTP)."""
    n = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    cap = slots or n
    inf = (float("inf"), float("inf"))
    # best[c][i]: (max chunk cost, sum of squared chunk costs) placing the first i layers into chunks 0..c-1;
    # the max decides, the sum of squares spreads the rest evenly
    best = [[inf] * (n + 1) for _ in range(chunks + 1)]
    take = [[0] * (n + 1) for _ in range(chunks + 1)]
    best[0][0] = (0.0, 0.0)
    for c in range(1, chunks + 1):
        extra = (first_extra if c == 1 else 0.0) + (last_extra if c == chunks else 0.0)
        for i in range(1, n + 1):
            for k in range(1, min(cap, i) + 1):
                prev = best[c - 1][i - k]
                cost = prefix[i] - prefix[i - k] + extra
                val = (max(prev[0], cost), prev[1] + cost * cost)
                if val[0] < best[c][i][0] * (1 - 1e-9) or (val[0] <= best[c][i][0] * (1 + 1e-9) and val[1] < best[c][i][1]):
                    best[c][i], take[c][i] = val, k
    if best[chunks][n] == inf:
        raise ValueError(f"{n} layers do not fit {chunks} chunks of at most {cap}")
    out, i = [], n
    for c in range(chunks, 0, -1):
        out.append(take[c][i])
        i -= take[c][i]
    return out[::-1]


@dataclass
class StagePlan:
    """Chunk c (= virtual index v * pp + stage s) runs ``layers[c]`` (decoder layer indices) on stage c mod pp;
    ``noop[c]`` identity layers pad it."""
    pp: int
    vpp: int
    layers: List[List[int]]
    noop: List[int]
    costs: List[float] = field(default_factory=list)

    def stage_layers(self, stage: int) -> List[int]:
        return [i for c, ls in enumerate(self.layers) if c % self.pp == stage for i in ls]

    def mindformers_offset(self):
        """mindformers' ``offset``: each chunk's layer count (no-op layers included) minus the even share, as
        [pp] (vpp = 1) or [vpp][pp]."""
        total = sum(len(ls) + n for ls, n in zip(self.layers, self.noop))
        even = total // (self.pp * self.vpp)
        rows = [[len(self.layers[v * self.pp + s]) + self.noop[v * self.pp + s] - even for s in range(self.pp)]
                for v in range(self.vpp)]
        return rows[0] if self.vpp == 1 else rows


def stage_plan(cfg: TrainConfig, layout: Layout) -> StagePlan:
    m, p = cfg.model, cfg.parallel_config
    chunks = layout.pp * layout.vpp
    costs, first, last = layer_costs(m, cfg.train_dataset.seq_length)
    if p.pipeline_layers is not None:
        real, slots = list(p.pipeline_layers), None
    else:
        slots = (m.num_layers + p.noop_layers) // chunks if p.noop_layers else None
        real = split_layers(costs, chunks, first, last, slots)
    layers, start = [], 0
    for k in real:
        layers.append(list(range(start, start + k)))
        start += k
    noop = [(slots - k) if slots else 0 for k in real]
    chunk_costs = [sum(costs[i] for i in ls) + (first if c == 0 else 0) + (last if c == chunks - 1 else 0)
                   for c, ls in enumerate(layers)]
    return StagePlan(layout.pp, layout.vpp, layers, noop, chunk_costs)
