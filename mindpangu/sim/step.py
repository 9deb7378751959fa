"""Step time of a layout: compute, exposed communication and pipeline bubble, per micro-batch on the critical
(last) stage, turned into a step by the pipeline schedule.

Model (every assumption here is also in docs/simulator.md):
- **Compute.** Each component's training FLOPs (``flops.forward_flops_per_token`` x 3, plus recompute) on one
  device, at the mesh's GEMM efficiency for that component's GEMM size (``Mesh.gemm_efficiency``). TP divides
  attention heads, the dense MLP, the shared experts and the vocabulary; EP spreads the routed experts, whose
  GEMMs hold ``tokens x k x ep / E`` rows; an ``imbalance`` multiplier (1 + the imbalance score, or MaxVio)
  stretches the expert compute and all-to-all, because the busiest device sets the pace.
- **Communication**, alpha-beta: each message step costs the tier's latency, each byte ``1 / (bandwidth x
  efficiency)`` of the tier the group spans (inside a node if the group's devices fit in one); rings of n take
  n - 1 steps:
  - TP with sequence parallelism: 4 all-gathers + 4 reduce-scatters of the layer's activations per micro-batch
    (forward and backward); without SP 4 all-reduces, the same volume;
  - EP: 4 all-to-alls (dispatch and combine, forward and backward), one copy of a token per EP rank its experts
    sit on (``ModelShape.devices_per_token``, as deduplicating dispatchers send); flat over the group's tier, or
    hierarchical (``Run.ep_a2a``: once per destination node over the network, then fanned out inside the node);
  - CP: the key/value ring (forward and backward); PP: one send forward and one backward per chunk boundary;
  - DP: the gradient reduce-scatter and parameter all-gather once per step, overlapped with the backward pass
    except ``dp_exposed`` of it.
  Nothing else overlaps (Megatron 2022 behaviour).
- **Pipeline.** ``step = t_mb x (m + (p - 1) / v)`` for m micro-batches per DP rank, p stages, v chunks
  (1F1B / interleaved 1F1B), plus the exposed DP traffic.
- **MFU** uses model FLOPs with the full attention square (Megatron's convention, so published MFUs compare).
Not modelled: the optimizer step, kernel launch gaps, stragglers, and overlap of TP/EP communication with compute.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from ..parallel.mesh import Mesh
from ..parallel.plan import Layout
from .flops import forward_flops_per_token, training_flops
from .shape import ModelShape

BYTES = 2  # bf16 activations and gradients on the wire


@dataclass(frozen=True)
class Run:
    """What a step trains: ``global_batch`` sequences of ``seq`` tokens in micro-batches of ``micro_batch``."""
    seq: int
    global_batch: int
    micro_batch: int = 1
    recompute: str = "selective"      # none | selective | full
    sequence_parallel: bool = True
    imbalance: float = 1.0            # expert load multiplier on the busiest device (1 = balanced)
    ep_a2a: str = "flat"              # flat | hierarchical (across nodes once per node, then inside the node)
    dp_exposed: float = 0.1           # share of the DP gradient / parameter traffic not hidden behind backward


@dataclass(frozen=True)
class _Link:
    gbps: float      # effective bandwidth (beta = 1 / gbps)
    latency: float   # seconds per message step (alpha)

    def send(self, bytes_: float, steps: int = 1) -> float:
        """alpha-beta time of ``steps`` message steps moving ``bytes_`` in total."""
        return steps * self.latency + bytes_ / (self.gbps * 1e9)


def _ring(bytes_: float, n: int, link: _Link) -> float:
    """Seconds of a ring all-gather or reduce-scatter of ``bytes_`` (the full tensor) over ``n`` devices."""
    return 0.0 if n <= 1 else link.send((n - 1) / n * bytes_, n - 1)


def _tier(mesh: Mesh, span: int) -> _Link:
    """The link of a group whose devices span ``span`` consecutive ranks: inside a node or between nodes."""
    if span <= mesh.devices_per_node:
        return _Link(mesh.intra_node_gbps * mesh.intra_eff, mesh.intra_latency_us * 1e-6)
    return _Link(mesh.inter_node_gbps * mesh.inter_eff, mesh.inter_latency_us * 1e-6)


@dataclass(frozen=True)
class Stage:
    """What one pipeline stage runs per micro-batch: its decoder layers by kind, and whether it is the last (LM
    head and MTP layers)."""
    dense_layers: float
    moe_layers: float
    last: bool


def even_stages(shape: ModelShape, pp: int) -> List[Stage]:
    """Layers split evenly over ``pp`` stages (dense layers first), the head on the last."""
    out, start = [], 0
    for s in range(pp):
        n = shape.layers // pp + (1 if s < shape.layers % pp else 0)
        dense = max(0, min(start + n, shape.num_dense) - start)
        out.append(Stage(dense, n - dense, s == pp - 1))
        start += n
    return out


def simulate_step(shape: ModelShape, layout: Layout, mesh: Mesh, run: Run,
                  stages: Optional[Sequence[Stage]] = None) -> Dict[str, float]:
    """Seconds per step and its split for ``shape`` under ``layout`` on ``mesh``: compute, tp / ep / cp / pp / dp
    communication, bubble, step, tokens_per_s, mfu; plus the critical stage and the micro-batch count.
    ``stages`` (one per pipeline stage, all chunks of a stage together) default to an even split; the slowest
    stage sets the pace of the pipeline. Raises ValueError when the batch does not divide into micro-batches over
    the DP ranks."""
    tp, pp, v, cp, ep, dp = layout.tp, layout.pp, layout.vpp, layout.cp, layout.ep, layout.dp
    per_rank = run.global_batch / dp
    m = int(per_rank // run.micro_batch)
    if m < 1 or per_rank % run.micro_batch:
        raise ValueError(f"global batch {run.global_batch} over {dp} DP ranks is not a whole number of "
                         f"micro-batches of {run.micro_batch}")
    stages = list(stages or even_stages(shape, pp))
    per_token = forward_flops_per_token(shape, run.seq, causal=True)
    times = [_stage_time(shape, layout, mesh, run, st, per_token) for st in stages]
    critical = max(range(len(stages)), key=lambda i: sum(times[i].values()))
    parts = times[critical]
    t_mb = sum(parts.values())
    bubble = t_mb * (pp - 1) / v if pp > 1 else 0.0
    dense_params, expert_params = shape.parameters()
    expert_dp = dp * tp * cp // ep
    dp_comm = run.dp_exposed * 2 * (_ring(dense_params / (tp * pp) * BYTES, dp * cp, _tier(mesh, tp * cp * dp))
                                    + _ring(expert_params / (ep * pp) * BYTES, expert_dp, _tier(mesh, layout.world)))
    step = t_mb * m + bubble + dp_comm
    model_flops = training_flops(shape, run.global_batch * run.seq, run.seq, causal=False)
    out = {f"{k}_s": val * m for k, val in parts.items()}
    out.update(dp_comm_s=dp_comm, bubble_s=bubble, step_s=step, tokens_per_s=run.global_batch * run.seq / step,
               mfu=model_flops / (step * layout.world * mesh.peak_tflops * 1e12), micro_batches=m,
               critical_stage=critical, bubble_over_total=bubble / step)
    return out


def _stage_time(shape: ModelShape, layout: Layout, mesh: Mesh, run: Run, stage: Stage,
                per_token: Dict[str, float]) -> Dict[str, float]:
    """Seconds of one micro-batch through ``stage`` (all its chunks): compute and each communication.
    ``per_token``: the model's forward FLOPs per token by component (``forward_flops_per_token``, causal)."""
    tp, cp, ep, dp, v = layout.tp, layout.cp, layout.ep, layout.dp, layout.vpp
    tokens = run.micro_batch * run.seq / cp  # per device per micro-batch, before TP
    layers = stage.dense_layers + stage.moe_layers
    h = shape.hidden
    d_attn = shape.heads * (shape.head_dim or h // shape.heads)
    peak = mesh.peak_tflops * 1e12
    # (forward FLOPs per token of one layer, GEMM size for its efficiency, TP split, layers running it)
    parts = [(per_token["attention projections"] / shape.layers, 2 * tokens * h * d_attn / tp, tp, layers, False),
             (per_token["attention scores and values"] / shape.layers, 2 * tokens * run.seq * d_attn / tp, tp,
              layers, True)]
    if shape.num_dense:
        parts.append((per_token["dense MLP"] / shape.num_dense, 2 * tokens * h * shape.ffn / tp, tp,
                      stage.dense_layers, False))
    if shape.experts and shape.num_moe:
        rows = tokens * shape.top_k * ep / shape.experts
        parts.append((per_token["router"] / shape.num_moe, 2 * tokens * h * shape.experts, 1, stage.moe_layers, False))
        parts.append((per_token["routed experts"] / shape.num_moe * run.imbalance, 2 * rows * h * shape.expert_ffn, tp,
                      stage.moe_layers, False))
        if shape.shared_ffn:
            parts.append((per_token["shared experts"] / shape.num_moe, 2 * tokens * h * shape.shared_ffn / tp, tp,
                          stage.moe_layers, False))
    factor = {"none": 3.0, "selective": 3.0, "full": 4.0}[run.recompute]
    compute = 0.0
    for flops, gemm, split, count, core in parts:
        extra = 1.0 if run.recompute == "selective" and core else 0.0
        compute += (factor + extra) * flops * tokens * count / split / (peak * mesh.gemm_efficiency(gemm))
    if stage.last:  # the LM head, and the MTP layers (their own decoder layer and the head once more)
        compute += 6.0 * h * shape.vocab * tokens / tp / (peak * mesh.gemm_efficiency(2 * tokens * h * shape.vocab / tp))
        if shape.mtp_layers:
            compute += 3 * per_token["MTP"] * tokens / tp / (peak * mesh.gemm_efficiency(2 * tokens * h * shape.ffn / tp))
    act = tokens * h * BYTES
    passes = 3 if run.recompute == "full" else 2  # forward and backward (and the recomputed forward)
    # two places per layer (attention, MLP) per pass; each an all-reduce, or with SP an all-gather + a
    # reduce-scatter: the same ring volume (Korthikanti et al. 2022 section 4.2.2)
    tp_comm = passes * 2 * 2 * _ring(act, tp, _tier(mesh, tp)) * layers
    span_ep = tp * ep if layout.order.index("ep") > layout.order.index("tp") else ep
    moe_layers = stage.moe_layers + (shape.mtp_layers if stage.last and shape.experts else 0)
    ep_comm = 0.0
    if ep > 1 and moe_layers:
        token_bytes = tokens * h * BYTES / tp
        nodes = max(1, span_ep // mesh.devices_per_node)
        if run.ep_a2a == "hierarchical" and nodes > 1:
            # one copy per destination node over the network, then fanned out to the ranks inside the node
            per_node = ep // nodes
            inter = token_bytes * shape.groups_per_token(nodes) * (nodes - 1) / nodes
            intra = token_bytes * shape.devices_per_token(ep) * (per_node - 1) / per_node if per_node > 1 else 0.0
            one = _tier(mesh, span_ep).send(inter, nodes - 1) + _tier(mesh, 1).send(intra, per_node - 1)
        else:
            one = _tier(mesh, span_ep).send(token_bytes * shape.devices_per_token(ep) * (ep - 1) / ep, ep - 1)
        ep_comm = 4 * one * moe_layers * run.imbalance
    cp_comm = 0.0
    if cp > 1:
        kv = 2 * tokens * d_attn * BYTES / tp
        cp_comm = 3 * _tier(mesh, tp * cp).send((cp - 1) * kv, cp - 1) * layers
    pp_comm = 2 * v * _tier(mesh, tp * cp * dp * 2).send(act / (tp if run.sequence_parallel else 1)) \
        if layout.pp > 1 else 0.0
    return {"compute": compute, "tp_comm": tp_comm, "ep_comm": ep_comm, "cp_comm": cp_comm, "pp_comm": pp_comm}
