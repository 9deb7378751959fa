"""Dropless token dispatch with static shapes (the reference path).

A counting sort places each (token, slot) row in its expert's segment; every segment is padded to a multiple of
``block`` rows, so the permuted buffer has the static size ``(ceil(R / block) + E) * block`` for R = T * K rows,
whatever the routing. Each block belongs to one expert, and the experts run as one batched matmul over blocks
with the block's expert weights gathered. No token is dropped and there is no Python loop over tokens.
"""
from __future__ import annotations

import math

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.ops.auto_generate import SiLU

from ..layers import ms_dtype


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


def permute_plan(indices, num_experts: int, block: int):
    """Where every routed row goes.

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
    row_ids = ops.arange(0, rows).astype(ms.int32)
    row_of_slot = ops.scatter_nd(slot_of_row.reshape(rows, 1), row_ids - rows, (slots,)) + rows
    block_start = (ops.arange(0, num_blocks) * block).astype(ms.int32).reshape(num_blocks, 1)
    block_expert = (block_start >= pad_end.reshape(1, num_experts)).astype(ms.int32).sum(1)
    block_expert = ops.minimum(block_expert, num_experts - 1)
    return slot_of_row, row_of_slot, block_expert, counts


def expert_major_plan(indices, num_experts: int, capacity: int, sort):
    """Where every routed row goes in an expert-major buffer [E, capacity] (no scatter: semi-auto parallel
    shards gathers and sorts, not ScatterNd).

    indices [T, K] int32 -> (row_of_slot [E, capacity] int32 with R marking an empty slot, slot_of_row [R] int32).
    Rows keep token order inside each expert; ``capacity = T`` never drops (a token picks an expert at most once).
    """
    rows = indices.shape[0] * indices.shape[1]
    flat, counts, rank = expert_ranks(indices, num_experts)
    slot_of_row = flat * capacity + rank
    row_ids = ops.arange(0, rows).astype(ms.int32)
    _, by_expert = sort(flat * rows + row_ids)  # rows grouped by expert, token order inside each
    start = (ops.cumsum(counts, 0) - counts).reshape(num_experts, 1)
    column = ops.arange(0, capacity).astype(ms.int32).reshape(1, capacity)
    filled = column < counts.reshape(num_experts, 1)
    position = ops.minimum(start + column, rows - 1)
    row_of_slot = ops.gather(by_expert.astype(ms.int32), position, 0)
    return ops.select(filled, row_of_slot, ops.full_like(row_of_slot, rows)), slot_of_row


class GroupedExperts(nn.Cell):
    """Routed SwiGLU experts with stacked weights: gate_proj/up_proj [E, I, H], down_proj [E, H, I].

    The stacking is the HF per-expert ``experts.J.{gate,up,down}_proj.weight`` along a new first axis.
    """

    def __init__(self, num_experts: int, hidden: int, intermediate: int, compute_dtype: str = "float32",
                 backend: str = "reference"):
        super().__init__()
        self.num_experts, self.hidden, self.intermediate = num_experts, hidden, intermediate
        self.gate_proj = Parameter(Tensor(np.zeros((num_experts, intermediate, hidden), np.float32)),
                                   name="gate_proj")
        self.up_proj = Parameter(Tensor(np.zeros((num_experts, intermediate, hidden), np.float32)), name="up_proj")
        self.down_proj = Parameter(Tensor(np.zeros((num_experts, hidden, intermediate), np.float32)),
                                   name="down_proj")
        # primitives, so mindpangu.parallel can shard them (experts over EP, the expert FFN over TP)
        self.bmm_gate, self.bmm_up, self.bmm_down = (ops.BatchMatMul(transpose_b=True) for _ in range(3))
        self.silu, self.mul = SiLU(), ops.Mul()
        self.dispatch_rows, self.combine_rows, self.sort = ops.Gather(), ops.Gather(), ops.Sort()
        self.expert_major = False  # True: dispatch into [E, T, H] per expert (semi-auto parallel); see construct
        self.cast_needed = compute_dtype != "float32"
        self.dtype = ms_dtype(compute_dtype)
        self.fixed_block = 0  # > 0: this block size whatever the shapes (dynamic-shape graphs); 0: by shape
        self.use_kernel = backend == "cpu_kernel"
        if self.use_kernel:
            from .kernels import make_permute, make_unpermute

            self.permute, self.unpermute = make_permute(num_experts), make_unpermute()

    def construct(self, x, weights, indices):
        """x [T, H], weights [T, K] float32, indices [T, K] int32 -> [T, H].

        Default: a block-padded permuted buffer, experts run per block with their weights gathered (compact on
        one device). ``expert_major``: rows go to an [E, T, H] buffer, so the expert axis can be sharded over EP
        by semi-auto parallel (the redistribution is the dispatch); it holds E / K times the routed rows.
        """
        t, k = indices.shape
        if self.expert_major:
            row_of_slot, slot_of_row = expert_major_plan(indices, self.num_experts, t, self.sort)
            x_ext = ops.concat((x, ops.zeros((1, self.hidden), x.dtype)), 0)
            xs = self.dispatch_rows(x_ext, row_of_slot // k, 0)  # [E, T, H]; empty slots read the zero row
            ys = self.expert_ffn(xs, self.gate_proj, self.up_proj, self.down_proj).reshape(-1, self.hidden)
            ys = ops.concat((ys, ops.zeros((1, self.hidden), ys.dtype)), 0)
            y_rows = self.combine_rows(ys, slot_of_row, 0).reshape(t, k, self.hidden)
            return (y_rows * weights.reshape(t, k, 1)).sum(1)
        block = self.fixed_block if self.fixed_block else block_size(t * k, self.num_experts)
        if self.use_kernel:
            xs, slot_of_row, block_expert, _ = self.permute(x, indices)
        else:
            slot_of_row, row_of_slot, block_expert, _ = permute_plan(indices, self.num_experts, block)
            x_ext = ops.concat((x, ops.zeros((1, self.hidden), x.dtype)), 0)
            xs = ops.gather(x_ext, row_of_slot // k, 0)  # padding rows (== rows) map to the zero row t
        ys = self.run_experts(xs, block_expert, block)
        if self.use_kernel:
            return self.unpermute(ys, slot_of_row, weights)
        y_rows = ops.gather(ys, slot_of_row, 0).reshape(t, k, self.hidden)
        return (y_rows * weights.reshape(t, k, 1)).sum(1)

    def run_experts(self, xs, block_expert, block: int):
        """Permuted rows [S, H] in blocks of one expert each -> expert outputs [S, H] (one batched matmul)."""
        num_blocks = block_expert.shape[0]
        xs = xs.reshape(num_blocks, block, self.hidden)
        wg = ops.gather(self.gate_proj, block_expert, 0)
        wu = ops.gather(self.up_proj, block_expert, 0)
        wd = ops.gather(self.down_proj, block_expert, 0)
        return self.expert_ffn(xs, wg, wu, wd).reshape(num_blocks * block, self.hidden)

    def expert_ffn(self, xs, wg, wu, wd):
        """SwiGLU per batch entry: xs [N, M, H] with weights [N, I, H], [N, I, H], [N, H, I] -> [N, M, H] float32."""
        if self.cast_needed:
            xs, wg, wu, wd = xs.astype(self.dtype), wg.astype(self.dtype), wu.astype(self.dtype), wd.astype(self.dtype)
        h = self.mul(self.silu(self.bmm_gate(xs, wg)), self.bmm_up(xs, wu))
        return self.bmm_down(h, wd).astype(ms.float32)
