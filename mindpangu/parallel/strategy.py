"""MindSpore semi-auto-parallel strategies for the Pangu models, from the YAML's ``parallel_config``.

``parallelize(model, cfg)`` annotates a built model in place (the model code is never edited per layout):
- embedding: the table replicated (``vocab_emb_dp``) or split over the vocabulary by TP; ids split by DP;
- linears by role: column-parallel (q_b/q/kv_b/k/v projections, SwiGLU gate/up, the LM head: output features
  over TP), row-parallel (o_proj, SwiGLU down: input features over TP, partial sums all-reduced, or
  reduce-scattered over tokens with sequence parallel), replicated (the MLA latent down-projections, eh_proj);
- RMSNorm over (DP, sequence / TP with sequence parallel); the router replicated over tokens split by DP;
- routed experts over EP on the expert axis and over ``Layout.expert_tp`` inside each expert, with one of two
  token dispatchers: expert-major (``moe.dispatch_backend: expert_major``, which ``auto`` resolves to under a
  semi-auto parallel context), where the redistribution between token-split and expert-split tensors is the
  dispatch; or the all-to-all dispatcher of the ``ascend`` backend, whose ``Morph`` gets a layout (every rank its
  own tokens, its experts' weights) and whose EP and expert-TP communication groups are created here;
- ``pipeline_stage`` per cell from ``stage_plan`` (with VPP, each layer's stage is its chunk's; MindSpore orders the
  chunks of a stage itself, as mindformers relies on).
Everything not named here (attention scores, RoPE, the routing arithmetic) keeps MindSpore's default strategy.

``parameter_splits`` / ``predicted_slices`` state what each parameter's shard is on a given rank, from the same
role table; the simulated Ascend compile (``sim_compile``) checks MindSpore's compiled layout against them.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Dict, Iterator, List, Tuple

from mindspore import nn
from mindspore.parallel.shard import Layout as DeviceLayout

from ..config.schema import TrainConfig
from ..layers import CausalSoftmax, Embedding, Linear, RMSNorm, SwiGLU
from ..moe import AlltoAllDispatcher, ExpertMajorDispatcher, GroupedExperts, MoELayer, Router
from .plan import Layout, ParallelConfigError, check_layout, stage_plan

COLUMN = {"q_b_proj", "q_proj", "kv_b_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "lm_head"}
ROW = {"o_proj", "down_proj"}  # any other Linear (q_a_proj, kv_a_proj_with_mqa, eh_proj) is replicated


@dataclass(frozen=True)
class Degrees:
    """The split factors strategies are made of."""
    dp: int
    tp: int
    ep: int
    etp: int
    seq_parallel: bool
    vocab_dp: bool

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> "Degrees":
        layout, p = Layout.from_config(cfg), cfg.parallel_config
        if layout.cp > 1:
            raise ParallelConfigError(
                ["context_parallel > 1 has no semi-auto strategy here (it needs ring attention over sequence "
                 "chunks); the plan, memory model and validation cover it, the MindSpore annotation does not"],
                [f"fold it into data_parallel: data_parallel={layout.dp * layout.cp} context_parallel=1"])
        return cls(layout.dp, layout.tp, layout.ep, layout.expert_tp, p.use_seq_parallel and layout.tp > 1,
                   p.vocab_emb_dp)

    @property
    def tokens(self) -> int:
        """Split of the token axis between sequence-parallel regions (norms, row-parallel outputs)."""
        return self.dp * self.tp if self.seq_parallel else self.dp


def linear_role(name: str) -> str:
    leaf = name.rsplit(".", 1)[-1]
    return "column" if leaf in COLUMN else "row" if leaf in ROW else "replicated"


# ---- what each parameter's shard is ----------------------------------------------------------------------------

def _cell_parameter_splits(name: str, cell: nn.Cell, d: Degrees) -> Dict[str, Tuple[int, ...]]:
    if isinstance(cell, Linear):
        role = linear_role(name)
        weight = {"column": (d.tp, 1), "row": (1, d.tp), "replicated": (1, 1)}[role]
        out = {"weight": weight}
        if cell.bias is not None:
            out["bias"] = (d.tp,) if role == "column" else (1,)
        return out
    if isinstance(cell, Embedding):
        return {"weight": (1, 1) if d.vocab_dp else (d.tp, 1)}
    if isinstance(cell, GroupedExperts):
        return {"gate_proj": (d.ep, d.etp, 1), "up_proj": (d.ep, d.etp, 1), "down_proj": (d.ep, 1, d.etp)}
    return {}


def parameter_splits(model: nn.Cell, cfg: TrainConfig) -> Dict[str, Tuple[int, ...]]:
    """Every parameter's split factor per axis (1 = whole) under ``cfg.parallel_config``."""
    d = Degrees.from_config(cfg)
    out = {}
    for cell_name, cell in model.cells_and_names():
        for leaf, split in _cell_parameter_splits(cell_name, cell, d).items():
            out[f"{cell_name}.{leaf}" if cell_name else leaf] = split
    for name, param in model.parameters_and_names():
        out.setdefault(name, (1,) * len(param.shape))
    return out


def parameter_stage(name: str, cfg: TrainConfig, layer_stage: Dict[int, int]) -> int:
    """The pipeline stage holding parameter ``name``: the embedding on the first, decoder layers by the stage plan,
    the final norm, LM head and MTP layers on the last."""
    if name.startswith("model.embed_tokens."):
        return 0
    if name.startswith("model.layers."):
        return layer_stage[int(name.split(".")[2])]
    return cfg.parallel_config.pipeline_stage - 1


def layer_stages(cfg: TrainConfig) -> Dict[int, Tuple[int, int]]:
    """Decoder layer -> (pipeline stage, VPP chunk index on that stage)."""
    layout = Layout.from_config(cfg)
    plan = stage_plan(cfg, layout)
    return {i: (c % layout.pp, c // layout.pp) for c, ls in enumerate(plan.layers) for i in ls}


def predicted_slices(model: nn.Cell, cfg: TrainConfig, rank: int) -> Dict[str, Tuple[int, ...]]:
    """Shape of every parameter held by ``rank`` (those of its pipeline stage), as the compile should slice it."""
    layout = Layout.from_config(cfg)
    stage = rank // layout.stage_size
    splits = parameter_splits(model, cfg)
    stages = {i: s for i, (s, _) in layer_stages(cfg).items()}
    out = {}
    for name, param in model.parameters_and_names():
        if parameter_stage(name, cfg, stages) == stage:
            out[name] = tuple(n // f for n, f in zip(param.shape, splits[name]))
    return out


# ---- annotating the model --------------------------------------------------------------------------------------

def _shard_linear(name: str, cell: Linear, d: Degrees):
    role = linear_role(name)
    if role == "column":
        cell.matmul.shard(((d.dp, 1), (d.tp, 1)))
        cell.add_bias.shard(((d.dp, d.tp), (d.tp,)))
    elif role == "row":
        if d.seq_parallel:  # partial sums reduce-scattered over tokens instead of all-reduced
            cell.matmul.shard(((d.dp, d.tp), (1, d.tp)), out_strategy=((d.dp * d.tp, 1),))
        else:
            cell.matmul.shard(((d.dp, d.tp), (1, d.tp)))
        cell.add_bias.shard(((d.tokens, 1), (1,)))
    else:
        cell.matmul.shard(((d.dp, 1), (1, 1)))
        cell.add_bias.shard(((d.dp, 1), (1,)))


def _shard_norm(name: str, cell: RMSNorm, d: Degrees):
    if cell.use_kernel:
        raise ValueError(f"parallelize: {name} was built with the C++ RMSNorm kernel; parallel layouts shard the "
                         "composite ops: set model.norm_backend to 'reference' (or 'auto' under a semi-auto parallel "
                         "context)")
    s = (d.dp, d.tp if d.seq_parallel else 1, 1)  # norms see [B, S, hidden]
    cell.square.shard((s,))
    cell.mean.shard((s,))
    cell.add_eps.shard((s, ()))
    cell.rsqrt.shard((s,))
    cell.normalise.shard((s, s))
    cell.scale.shard((s, (1,)))


def expert_parallel_ranks(layout: Layout, rank: int) -> Tuple[List[int], List[int]]:
    """(EP group, expert-TP group) of global ``rank`` for the all-to-all dispatcher: inside a pipeline stage,
    rank g has expert-TP coordinate g % etp and EP coordinate (g // etp) % ep, the device matrix
    (stage / (ep * etp), ep, etp) that :func:`_shard_alltoall` gives its ``Morph`` (last axis fastest, as
    MindSpore numbers devices). These are the plan's EP groups (``plan.groups``) when EP is carved right after the
    expert-TP ranks in ``rank_order`` (the default tp-cp-ep-dp-pp), which ``_shard_alltoall`` requires."""
    ep, etp = layout.ep, layout.expert_tp
    base = rank - rank % layout.stage_size
    g = rank % layout.stage_size
    block = base + g // (ep * etp) * ep * etp
    ep_ranks = [block + j * etp + g % etp for j in range(ep)]
    etp_ranks = [block + (g // etp) % ep * etp + t for t in range(etp)]
    return ep_ranks, etp_ranks


_GROUPS: Dict[Tuple[int, ...], str] = {}


def _communication_group(ranks: List[int]) -> str:
    """A MindSpore communication group of ``ranks`` (created once per process)."""
    if tuple(ranks) not in _GROUPS:
        from mindspore.communication import create_group

        # a bounded name, as mindformers hashes its EP groups' ranks
        name = "mindpangu_" + hashlib.sha256("-".join(map(str, ranks)).encode()).hexdigest()[:32]
        create_group(name, list(ranks))
        _GROUPS[tuple(ranks)] = name
    return _GROUPS[tuple(ranks)]


def _shard_alltoall(name: str, cell: MoELayer, layout: Layout, d: Degrees):
    """The ``ascend`` backend: the routed experts' ``Morph`` gets a layout over the stage's device matrix
    (stage / (ep * etp), ep, etp), tokens split over all of it (each rank its own rows: the dispatcher moves them),
    expert weights over (ep, etp); the dispatcher gets this rank's EP and expert-TP groups; Pro MoE's gating op
    gets the router's token split."""
    if layout.ep_stride() != d.etp:
        raise ValueError(f"parallelize: {name} uses the all-to-all dispatcher (moe.dispatch_backend 'ascend'), which "
                         f"needs EP carved right after the {d.etp} expert-TP ranks in rank_order; "
                         f"'{layout.order}' puts {layout.ep_stride()} ranks before it: use the default "
                         "tp-cp-ep-dp-pp, or moe.dispatch_backend 'expert_major'")
    if cell.routed_experts_op is None:
        raise ValueError(f"parallelize: {name} was built in PyNative mode, where the all-to-all dispatcher runs "
                         "without its Morph; build the model in GRAPH mode for semi-auto parallel")
    from mindspore.communication import get_rank

    stage = layout.stage_size
    mesh = DeviceLayout((stage // (d.ep * d.etp), d.ep, d.etp), ("expert_dp", "ep", "etp"))
    tokens = mesh(("expert_dp", "ep", "etp"), "None")
    gate_up, down = mesh("ep", "etp", "None"), mesh("ep", "None", "etp")
    cell.routed_experts_op.shard(in_strategy=(tokens, tokens, tokens, gate_up, gate_up, down),
                                 out_strategy=(tokens,))
    ep_ranks, etp_ranks = expert_parallel_ranks(layout, get_rank())
    cell.token_dispatcher.set_expert_parallel(d.ep, _communication_group(ep_ranks) if d.ep > 1 else None,
                                              d.etp, _communication_group(etp_ranks) if d.etp > 1 else None)
    if cell.gate.moge_gating is not None:  # a self-defined-shard op: a layout, not a strategy
        rows = DeviceLayout((d.tokens, stage // d.tokens), ("tokens", "rest"))
        cell.gate.moge_gating.shard(in_strategy=(rows("tokens", "None"), rows("None")),
                                    out_strategy=(rows("tokens", "None"), rows("tokens", "None")))


def _shard_dispatcher(name: str, cell: MoELayer, layout: Layout, d: Degrees):
    dispatcher = cell.token_dispatcher
    if not isinstance(dispatcher, (ExpertMajorDispatcher, AlltoAllDispatcher)):
        raise ValueError(f"parallelize: {name} was built with the '{cell.backend}' token dispatcher; parallel layouts "
                         "need moe.dispatch_backend 'expert_major' (or 'auto' under a semi-auto parallel context), "
                         "whose [experts, tokens, hidden] buffer is sharded over EP, or 'ascend' (all-to-all)")
    if cell.gate.capacity_factor is not None:
        raise ValueError(f"parallelize: {name} drops tokens (moe.capacity_factor {cell.gate.capacity_factor}); "
                         "the capacity is counted per process, not per EP group, so parallel layouts train "
                         "dropless: set moe.capacity_factor to null")
    if isinstance(dispatcher, AlltoAllDispatcher):
        _shard_alltoall(name, cell, layout, d)
        return
    _shard_experts(cell.experts, d)
    dispatcher.sort.shard(((1,),))
    dispatcher.dispatch_rows.shard(((1, 1), (d.ep, 1)))  # [T+1, H] by [E, T] -> [E, T, H], experts over EP
    dispatcher.dispatch_rows.add_prim_attr(*_COPIES_SLOWEST)
    dispatcher.combine_rows.shard(((1, 1), (d.dp,)))  # back to routed rows in token order, split by DP


# MindSpore puts the copies of an operator that uses fewer devices than the stage on the fastest-varying end of its
# device matrix unless told otherwise: the expert strategies (EP x expert-TP of a stage of DP x TP) would then keep
# their copies on neighbouring ranks and their EP / expert-TP groups strided across nodes, against the plan
# (``plan.groups``). With DP 48 x TP 8 x EP 4 the 12 copies also made a group of 12 ranks on two nodes, which the
# simulated Ascend compile refuses ("Create communication group failed": a group takes 1, 2, 4 or 8 devices of a
# node). Putting the copies on the slow end keeps expert TP on the TP ranks and EP just beyond them.
_COPIES_SLOWEST = ("repeated_num_in_dev_matrix_right_", False)


def _shard_experts(cell: GroupedExperts, d: Degrees):
    e, t = d.ep, d.etp
    for prim, strategy in ((cell.bmm_gate, ((e, 1, 1), (e, t, 1))), (cell.bmm_up, ((e, 1, 1), (e, t, 1))),
                           (cell.silu, ((e, 1, t),)), (cell.mul, ((e, 1, t), (e, 1, t))),
                           (cell.bmm_down, ((e, 1, t), (e, 1, t)))):
        prim.shard(strategy)
        prim.add_prim_attr(*_COPIES_SLOWEST)


def sharded_primitives(model: nn.Cell) -> Iterator[Tuple[str, object]]:
    """(cell path + attribute, primitive) of every primitive ``parallelize`` gives a strategy."""
    for name, cell in model.cells_and_names():
        attrs = {Linear: ("matmul", "add_bias") if getattr(cell, "bias", None) is not None else ("matmul",), RMSNorm: ("square", "mean", "add_eps", "rsqrt", "normalise", "scale"),
                 SwiGLU: ("silu", "mul"), Embedding: ("gather",), Router: ("matmul",),
                 ExpertMajorDispatcher: ("sort", "dispatch_rows", "combine_rows"),
                 GroupedExperts: ("bmm_gate", "bmm_up", "silu", "mul", "bmm_down")}.get(type(cell), ())
        for attr in attrs:
            yield f"{name}.{attr}", getattr(cell, attr)


def parallelize(model: nn.Cell, cfg: TrainConfig) -> nn.Cell:
    """Give ``model`` the shard strategies and pipeline stages of ``cfg.parallel_config`` (in place)."""
    layout = check_layout(cfg)
    d = Degrees.from_config(cfg)
    for name, cell in model.cells_and_names():
        if isinstance(cell, Linear):
            _shard_linear(name, cell, d)
        elif isinstance(cell, RMSNorm):
            _shard_norm(name, cell, d)
        elif isinstance(cell, CausalSoftmax) and cell.use_kernel:
            raise ValueError(f"parallelize: {name} was built with the C++ causal softmax kernel; parallel layouts "
                             "shard the composite ops: set model.attention_backend to 'reference' (or 'auto' under "
                             "a semi-auto parallel context)")
        elif isinstance(cell, SwiGLU):
            cell.silu.shard(((d.dp, 1, d.tp),))  # [B, S, intermediate]
            cell.mul.shard(((d.dp, 1, d.tp), (d.dp, 1, d.tp)))
        elif isinstance(cell, Embedding):
            cell.gather.shard(((1, 1) if d.vocab_dp else (d.tp, 1), (d.dp, 1)))
        elif isinstance(cell, Router):
            cell.matmul.shard(((d.tokens, 1), (1, 1)))
        elif isinstance(cell, MoELayer):
            _shard_dispatcher(name, cell, layout, d)

    if cfg.parallel_config.pipeline_stage > 1:
        assign_stages(model, cfg)
    return model


def assign_stages(model: nn.Cell, cfg: TrainConfig):
    """``pipeline_stage`` of the embedding, every decoder layer, the final norm, the LM head and the MTP layers.

    An MTP layer's input norms, projection and head norm are tagged too: ``train.step.LossNet`` calls them around
    the layer's block, and MindSpore places an untagged cell by its inputs (here the first stage's embeddings).
    Only those: tagging the router and experts inside a block breaks MindSpore 2.10's interleaved-pipeline
    compile ("The index out of range" on the router's outputs)."""
    last = cfg.parallel_config.pipeline_stage - 1
    inner = model.model
    inner.embed_tokens.pipeline_stage = 0
    for i, (stage, _) in layer_stages(cfg).items():
        inner.layers[i].pipeline_stage = stage
    inner.norm.pipeline_stage = last
    if hasattr(model, "lm_head"):
        model.lm_head.pipeline_stage = last
    if inner.num_mtp:
        for layer in inner.mtp_layers:
            for cell in (layer, layer.enorm, layer.hnorm, layer.eh_proj, layer.shared_head):
                cell.pipeline_stage = last


def auto_parallel_context(cfg: TrainConfig) -> dict:
    """Keyword arguments for ``mindspore.set_auto_parallel_context`` for this recipe."""
    layout, p = Layout.from_config(cfg), cfg.parallel_config
    ctx = {"parallel_mode": "semi_auto_parallel", "device_num": layout.world, "full_batch": True,
           "pipeline_stages": layout.pp, "enable_parallel_optimizer": p.optimizer_shard,
           "gradients_mean": True}
    if layout.vpp > 1:
        ctx["pipeline_config"] = {"pipeline_interleave": True, "pipeline_scheduler": "1f1b"}
    return ctx


def strategy_problems(strategy, shapes: List[Tuple[int, ...]], devices: int) -> List[str]:
    """Why a primitive's strategy does not fit its inputs: one tuple per input, one factor per axis, each factor
    dividing its axis, the product of the factors at most the devices of a stage."""
    out = []
    if len(strategy) != len(shapes):
        return [f"{len(strategy)} strategy tuples for {len(shapes)} inputs"]
    for i, (s, shape) in enumerate(zip(strategy, shapes)):
        if len(s) != len(shape):
            out.append(f"input {i}: strategy {s} has {len(s)} factors for a rank-{len(shape)} input {shape}")
            continue
        out += [f"input {i}: factor {f} does not divide axis {a} ({n})" for a, (f, n) in enumerate(zip(s, shape)) if n % f]
        if math.prod(s) > devices or devices % math.prod(s):
            out.append(f"input {i}: strategy {s} uses {math.prod(s)} devices; a stage has {devices}")
    return out
