"""Token dispatchers: routed rows in, groups of one expert's rows out, and back (dropless, static shapes).

A dispatcher sits between the router and the grouped experts, as in Megatron
(``megatron/core/transformer/moe/token_dispatcher.py``) and torchtitan (``models/common/token_dispatcher.py``)::

    xs, group_expert, slot_of_row, tokens_per_expert = dispatcher.dispatch(x [T, H], indices [T, K])  # [G, M, H]
    ys = experts(xs, group_expert, tokens_per_expert)                                              # [G, M, H]
    y = dispatcher.combine(ys, weights [T, K], slot_of_row)                                        # [T, H]

Four implementations, chosen by ``moe.dispatch_backend`` when the model is built (:func:`build_dispatcher`):

- ``reference`` (:class:`BlockPaddedDispatcher`): a counting sort places each (token, slot) row in its expert's
  segment; every segment is padded to a multiple of ``block`` rows, so the permuted buffer has the static size
  ``(ceil(R / block) + E) * block`` for R = T * K rows, whatever the routing. Each block (group) belongs to one
  expert. Composite MindSpore ops, any device.
- ``cpu_kernel`` (:class:`KernelDispatcher`): the same layout from the C++ aot kernels of ``ops/cpu``; the grouped
  experts then run each expert's rows in place and skip the padding (``MoeGroupedSwiGLU``).
- ``expert_major`` (:class:`ExpertMajorDispatcher`): an [E, T, H] buffer, one group per expert, so semi-auto
  parallel can shard the expert axis over EP and the redistribution is the dispatch (what ``parallelize``
  needs). It holds E / K times the routed rows.
- ``ascend`` (:class:`AlltoAllDispatcher`): Megatron's all-to-all dispatcher (``MoEAlltoAllTokenDispatcher``)
  from MindSpore's fused Ascend ops: ``moe_token_permute`` sorts the routed rows by expert, an all-to-all sends
  each EP rank the rows of its experts (``AlltoAllV``), an all-gather shares them inside the expert tensor parallel
  group (``AllGatherV``), a second permute groups them by local expert for ``GroupedMatmul`` (``experts.py``), and
  the way back is the reverse (``ReduceScatterV`` sums the expert-TP partial outputs). It moves the routed
  rows (plus one zero row per expert from each rank; no E / K buffer), with data-dependent shapes once EP or expert
  TP is on, and returns rows [R, H] rather than groups (``GroupedExperts.grouped_gemm``); the MoE layer runs it
  inside a ``Morph`` whose layout ``parallelize`` sets (mindformers' ``FFNGroupedGEMM``). Ascend only.
"""
from __future__ import annotations

import math

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from ..kernels import resolve_kernels, semi_auto_parallel
from ..layers import dynamic_range, ms_dtype, static_range
from .kernels import make_permute, make_unpermute
from .router import expert_counts


def block_size(rows: int, num_experts: int) -> int:
    """Rows per block: a power of two near half the mean rows per expert, in [8, 128]."""
    mean = max(1, rows // max(1, num_experts))
    return int(min(128, max(8, 2 ** int(math.log2(max(1, mean // 2))))))


def expert_ranks(indices, num_experts: int):
    """indices [T, K] int32 -> (expert of each routed row [R], rows per expert [E], position of each row inside
    its expert [R]), all int32, rows in token order."""
    flat = indices.reshape(-1)
    onehot = ops.one_hot(flat, num_experts, Tensor(1, ms.int32), Tensor(0, ms.int32))  # [R, E]
    counts = onehot.sum(0).astype(ms.int32)  # sums promote to int64, which Ascend's CumSum refuses
    rank = ((ops.cumsum(onehot, 0) - 1) * onehot).sum(1).astype(ms.int32)
    return flat, counts, rank


def permute_plan(indices, num_experts: int, block: int, index_range=static_range):
    """Where every routed row goes (``index_range``: ``layers.dynamic_range`` when T is known only at run time).

    indices [T, K] int32 -> (slot_of_row [R] int32, row_of_slot [S] int32 with R marking padding,
    block_expert [S / block] int32, counts [E] int32). Rows keep token order inside each expert (stable).
    """
    rows = indices.shape[0] * indices.shape[1]
    flat, counts, rank = expert_ranks(indices, num_experts)
    padded = (counts + (block - 1)) // block * block
    pad_end = ops.cumsum(padded, 0)
    pad_start = pad_end - padded
    slot_of_row = ops.gather(pad_start, flat, 0) + rank
    num_blocks = -(-rows // block) + num_experts
    slots = num_blocks * block
    row_of_slot = ops.scatter_nd(slot_of_row.reshape(rows, 1), index_range(-rows, 0), (slots,)) + rows
    block_start = index_range(0, slots, block, (num_blocks, 1))
    block_expert = (block_start >= pad_end.reshape(1, num_experts)).astype(ms.int32).sum(1)
    block_expert = ops.minimum(block_expert, num_experts - 1)
    return slot_of_row, row_of_slot, block_expert, counts


def token_positions(indices):
    """indices [T, K] int32 -> 0, 1, ..., T-1 [T] int32, as a running count over the tokens rather than a constant:
    in the expert-major plan under semi-auto parallel, a compile-time constant here (``layers.static_range``)
    still made MindSpore 2.10's interleaved-pipeline compiler fail ("no manager for this func graph")."""
    return ops.cumsum(ops.cast(indices[:, 0] >= 0, ms.int32), 0) - 1


def expert_major_plan(indices, num_experts: int, capacity: int, sort):
    """Where every routed row goes in an expert-major buffer [E, capacity] (no scatter: semi-auto parallel
    shards gathers and sorts, not ScatterNd).

    indices [T, K] int32 -> (row_of_slot [E, capacity] int32 with R marking an empty slot, slot_of_row [R] int32).
    Rows keep token order inside each expert; ``capacity = T`` never drops (a token picks an expert at most once).
    """
    rows = indices.shape[0] * indices.shape[1]
    flat, counts, rank = expert_ranks(indices, num_experts)
    slot_of_row = flat * capacity + rank
    start = ops.cumsum(counts, 0) - counts  # [E] where each expert's rows begin, grouped by expert
    # each row's place in that order is distinct, so sorting it keeps the rows of one expert in token order without
    # a row-id constant in the key (which failed the interleaved-pipeline compile, see token_positions)
    _, by_expert = sort(ops.gather(start, flat, 0) + rank)
    start = start.reshape(num_experts, 1)
    column = token_positions(indices)[:capacity].reshape(1, capacity)
    filled = column < counts.reshape(num_experts, 1)
    position = ops.minimum(start + column, rows - 1)
    row_of_slot = ops.gather(by_expert.astype(ms.int32), position, 0)
    return ops.masked_fill(row_of_slot, ops.logical_not(filled), rows), slot_of_row


def _gather_rows(x, row_of_slot, k: int, gather_rows=ops.gather):
    """x [T, H], row_of_slot [...] (routed row ids, T * K marking an empty slot) -> [..., H]; empty slots read a
    zero row appended to x."""
    x_ext = ops.concat((x, ops.zeros((1, x.shape[1]), x.dtype)), 0)
    return gather_rows(x_ext, row_of_slot // k, 0)


def _combine(ys, weights, slot_of_row, combine_rows=ops.gather):
    """ys [G, M, H] (or [S, H]), weights [T, K], slot_of_row [R] -> sum_k weights[t, k] * ys[slot of (t, k)]."""
    t, k = weights.shape
    hidden = ys.shape[-1]
    y_rows = combine_rows(ys.reshape(-1, hidden), slot_of_row, 0).reshape(t, k, hidden)
    return (y_rows * weights.reshape(t, k, 1)).sum(1)


class BlockPaddedDispatcher(nn.Cell):
    """Composite-op dispatch into expert-segment blocks of ``block`` rows (``block`` 0: :func:`block_size` of the
    routed rows; dynamic-shape graphs need a fixed size). Groups are blocks: xs [S / block, block, H]."""

    def __init__(self, num_experts: int, block: int = 0, dynamic: bool = False):
        super().__init__()
        self.num_experts, self.block = num_experts, block
        self.index_range = dynamic_range if dynamic else static_range

    def dispatch(self, x, indices):
        """x [T, H], indices [T, K] int32 -> (xs [B, block, H], block_expert [B] int32, slot_of_row [R] int32,
        tokens_per_expert [E] int32)."""
        t, k = indices.shape
        block = self.block if self.block else block_size(t * k, self.num_experts)
        slot_of_row, row_of_slot, block_expert, counts = permute_plan(indices, self.num_experts, block, self.index_range)
        xs = _gather_rows(x, row_of_slot, k)
        return xs.reshape(block_expert.shape[0], block, x.shape[1]), block_expert, slot_of_row, counts

    def combine(self, ys, weights, slot_of_row):
        """ys [B, block, H], weights [T, K] float32, slot_of_row [R] -> y [T, H]."""
        return _combine(ys, weights, slot_of_row)


class KernelDispatcher(nn.Cell):
    """The block-padded layout from the C++ kernels (``MoePermute`` / ``MoeUnpermute``, CPU, with bprops)."""

    def __init__(self, num_experts: int):
        super().__init__()
        self.num_experts = num_experts
        self.permute, self.unpermute = make_permute(num_experts), make_unpermute()

    def dispatch(self, x, indices):
        """As :meth:`BlockPaddedDispatcher.dispatch`, block size :func:`block_size` of the routed rows."""
        xs, slot_of_row, block_expert, counts = self.permute(x, indices)
        blocks = block_expert.shape[0]
        return xs.reshape(blocks, xs.shape[0] // blocks, x.shape[1]), block_expert, slot_of_row, counts

    def combine(self, ys, weights, slot_of_row):
        """ys [B, block, H], weights [T, K] float32, slot_of_row [R] -> y [T, H]."""
        return self.unpermute(ys.reshape(-1, ys.shape[-1]), slot_of_row, weights)


class ExpertMajorDispatcher(nn.Cell):
    """Dispatch into an expert-major buffer [E, T, H] (capacity T: never drops, a token picks an expert at most
    once). ``sort``, ``dispatch_rows`` and ``combine_rows`` are primitives so ``parallelize`` can shard them:
    gathers and sorts shard under semi-auto parallel, ScatterNd does not."""

    def __init__(self, num_experts: int):
        super().__init__()
        self.num_experts = num_experts
        self.dispatch_rows, self.combine_rows, self.sort = ops.Gather(), ops.Gather(), ops.Sort()

    def dispatch(self, x, indices):
        """x [T, H], indices [T, K] int32 -> (xs [E, T, H], None (group g is expert g), slot_of_row [R] int32, None)."""
        t, k = indices.shape
        row_of_slot, slot_of_row = expert_major_plan(indices, self.num_experts, t, self.sort)
        return _gather_rows(x, row_of_slot, k, self.dispatch_rows), None, slot_of_row, None

    def combine(self, ys, weights, slot_of_row):
        """ys [E, T, H], weights [T, K] float32, slot_of_row [R] -> y [T, H]."""
        return _combine(ys, weights, slot_of_row, self.combine_rows)


class AlltoAllDispatcher(nn.Cell):
    """All-to-all token dispatch over expert parallel (EP) and expert tensor parallel (ETP) ranks, from MindSpore's
    fused Ascend ops (module docstring; Megatron ``token_dispatcher.py: MoEAlltoAllTokenDispatcher``, mindformers
    ``parallel_core/training_graph/transformer/moe/token_dispatcher.py``).

    It works on one rank's tokens. With ``ep = etp = 1`` (the default) it is permute -> grouped experts ->
    unpermute on one device; :meth:`set_expert_parallel` (called by ``mindpangu.parallel.parallelize``) names the
    groups: the EP group holds the ``ep`` ranks whose ``E / ep`` local experts together make all experts, the ETP
    group the ``etp`` ranks that split each local expert's intermediate dimension.

    Unlike the other dispatchers it returns rows [R, H] (R data-dependent once EP or ETP is on), not groups, for
    ``GroupedExperts.grouped_gemm``. Rows travel in ``compute_dtype``; the weighted combine is in float32. Across
    ranks, every rank adds ceil(E / K) zero tokens of weight 0 that route one row to every expert (mindformers'
    ``use_pad_tokens``), so that no rank ever receives nothing: the ``*V`` collectives return a shape-() tensor for
    an empty result and ``GroupedMatmul`` takes no empty input. The fused ops (:meth:`permute`, :meth:`unpermute`)
    are methods and the collectives primitive attributes, so a CPU test stands in for exactly those over virtual
    ranks (``tests/test_ascend_dispatch.py``).
    """

    def __init__(self, num_experts: int, hidden: int, top_k: int, compute_dtype: str = "float32"):
        super().__init__()
        self.num_experts, self.hidden = num_experts, hidden
        self.dtype = ms_dtype(compute_dtype)
        self.ep, self.etp = 1, 1
        self.to_host = ops.MoveTo()
        # the zero tokens (Tensor attributes, not in-graph constants: see layers.static_range)
        pad = -(-num_experts // top_k)
        self.pad_indices = Tensor((np.arange(pad * top_k) % num_experts).reshape(pad, top_k).astype(np.int32))
        self.pad_rows = Tensor(np.zeros((pad, hidden), np.float32), self.dtype)
        self.pad_weights = Tensor(np.zeros((pad, top_k), np.float32))

    def set_expert_parallel(self, ep: int, ep_group: str, etp: int = 1, etp_group: str = None):
        """Dispatch over ``ep`` ranks (communication group ``ep_group``), each local expert split over ``etp``
        ranks (``etp_group``); the groups must exist (``mindspore.communication.create_group``)."""
        if self.num_experts % ep:
            raise ValueError(f"expert_parallel ({ep}) must divide the {self.num_experts} experts")
        self.ep, self.etp = ep, etp
        if ep > 1:
            self.all_to_all_op = ops.AlltoAll(split_count=ep, split_dim=0, concat_dim=0, group=ep_group)
            self.all_to_all_rows_op = ops.AlltoAllV(group=ep_group, block_size=self.hidden)  # counts in rows
            self.all_to_all_ids_op = ops.AlltoAllV(group=ep_group, block_size=1)
        if etp > 1:
            self.all_gather_op = ops.AllGather(group=etp_group)
            self.all_gather_v_op = ops.AllGatherV(group=etp_group)  # counts in elements
            self.reduce_scatter_v_op = ops.ReduceScatterV(group=etp_group)

    # ---- the fused ops ----

    def permute(self, rows, indices):
        """rows [N, H], indices [N, K] or [N] int32 -> (permuted [N * K, H] grouped by index, stable;
        sorted_indices [N * K] int32: where row (n, k) went). ``ops.moe_token_permute``."""
        return ops.moe_token_permute(rows, indices)

    def unpermute(self, permuted, sorted_indices, probs=None):
        """Inverse of :meth:`permute`: without ``probs`` -> [N * K, H] in the original order; with ``probs``
        [N, K] -> [N, H] = sum_k probs[n, k] * permuted[sorted_indices[n * K + k]]. ``ops.moe_token_unpermute``."""
        return ops.moe_token_unpermute(permuted, sorted_indices, probs)

    def host(self, counts):
        """Split sizes for the ``*V`` collectives, on the host (as mindformers moves them), int64."""
        return self.to_host(counts.astype(ms.int64), "CPU", True)

    # ---- dispatch and combine ----

    def dispatch(self, x, indices):
        """x [T, H], indices [T, K] int32 (global expert ids) -> (rows [R, H] grouped by local expert, None, state
        for :meth:`combine`, tokens_per_expert [E / ep] int32: the rows of each local expert)."""
        e, ep, etp = self.num_experts, self.ep, self.etp
        x = x.astype(self.dtype)
        send = recv = sizes = by_expert = None
        if ep == 1 and etp == 1:
            rows, sorted_indices = self.permute(x, indices)
            return rows, None, (sorted_indices, send, recv, sizes, by_expert), expert_counts(indices, e).astype(
                ms.int32)
        x = ops.concat((x, self.pad_rows), 0)
        indices = ops.concat((indices, self.pad_indices), 0)
        rows, sorted_indices = self.permute(x, indices)
        counts = expert_counts(indices, e).astype(ms.int32)
        # each row's expert id travels with it (float: exact below 2^24), to regroup by local expert on arrival
        expert_of_row = ops.sort(indices.reshape(-1).astype(ms.float32))[0]
        counts_in = counts.reshape(ep, e // ep)  # [ep, E/ep]: rows from each EP rank, per local expert
        if ep > 1:
            counts_in = self.all_to_all_op(counts_in)
            send = self.host(counts.reshape(ep, e // ep).sum(1))
            recv = self.host(counts_in.sum(1))
            rows = self.all_to_all_rows_op(rows.reshape(-1), send, recv).reshape(-1, self.hidden)
            expert_of_row = self.all_to_all_ids_op(expert_of_row, send, recv)
        if etp > 1:  # every ETP rank computes its slice of the intermediate dimension for all of the rows
            counts_in = self.all_gather_op(counts_in)  # [etp * ep, E/ep]
            per_rank = counts_in.reshape(etp, -1).sum(1)
            sizes = self.host(per_rank * self.hidden)
            rows = self.all_gather_v_op(rows.reshape(-1), sizes).reshape(-1, self.hidden)
            expert_of_row = self.all_gather_v_op(expert_of_row, self.host(per_rank))
        rows, by_expert = self.permute(rows, expert_of_row.astype(ms.int32))
        tokens_per_expert = counts_in.sum(0).astype(ms.int32)
        return rows, None, (sorted_indices, send, recv, sizes, by_expert), tokens_per_expert

    def combine(self, ys, weights, state):
        """ys [R, H] (as :meth:`dispatch` grouped them), weights [T, K] float32, state -> y [T, H] float32."""
        sorted_indices, send, recv, sizes, by_expert = state
        t = weights.shape[0]
        if self.ep > 1 or self.etp > 1:
            ys = self.unpermute(ys, by_expert)  # back to arrival order
            weights = ops.concat((weights, self.pad_weights), 0)
        if self.etp > 1:  # sum the partial outputs of the expert's intermediate slices
            ys = self.reduce_scatter_v_op(ys.reshape(-1), sizes).reshape(-1, self.hidden)
        if self.ep > 1:
            ys = self.all_to_all_rows_op(ys.reshape(-1), recv, send).reshape(-1, self.hidden)
        return self.unpermute(ys.astype(ms.float32), sorted_indices, weights.astype(ms.float32))[:t]


def resolve_backend(requested: str) -> str:
    """The dispatch implementation to build for ``moe.dispatch_backend``: 'reference', 'cpu_kernel',
    'expert_major' or 'ascend'.

    auto: expert_major under a semi-auto / auto parallel context (what ``parallelize`` shards); otherwise the C++
    kernels on CPU when they build (faster, see ``tools/bench.py ops``), else the reference path.
    Raises ValueError for 'ascend' off Ascend (MindSpore has no CPU or GPU kernels for its fused MoE ops) and for
    'cpu_kernel' off CPU.
    """
    if requested == "expert_major":
        return requested
    if requested == "ascend":
        target = ms.get_context("device_target")
        if target != "Ascend":
            raise ValueError(f"moe.dispatch_backend 'ascend' runs MindSpore's fused Ascend MoE ops (MoeTokenPermute, "
                             f"GroupedMatmul, MoeTokenUnpermute, AlltoAllV), which have no {target} kernels; use "
                             "'auto', 'reference' or 'expert_major' here")
        return requested
    if requested == "auto" and semi_auto_parallel():
        return "expert_major"
    return resolve_kernels(requested, "moe.dispatch_backend")


def build_dispatcher(backend: str, num_experts: int, block: int = 0, dynamic: bool = False, hidden: int = 0,
                     top_k: int = 1, compute_dtype: str = "float32"):
    """The dispatcher cell of a resolved ``backend`` (see :func:`resolve_backend`); ``block`` > 0 fixes the
    reference layout's block size (the config allows it with 'reference' only); ``dynamic``: token counts known
    only at run time (``model.dynamic_shapes``; the reference layout only); ``hidden`` (the token width),
    ``top_k`` and ``compute_dtype`` (the dtype rows travel in): the 'ascend' dispatcher's."""
    if backend == "ascend":
        return AlltoAllDispatcher(num_experts, hidden, top_k, compute_dtype)
    if backend == "cpu_kernel":
        return KernelDispatcher(num_experts)
    if backend == "expert_major":
        return ExpertMajorDispatcher(num_experts)
    return BlockPaddedDispatcher(num_experts, block, dynamic)
