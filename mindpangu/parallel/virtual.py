"""Single-process emulation of expert and tensor parallelism, with the communication written out as explicit
splits and concatenations per rank, so the distributed algorithms are checked numerically (values and gradients)
on one CPU against the single-device layers.

- EP: each of ``ep`` ranks routes its own slice of the tokens, sorts its (token, slot) rows by owning rank, and
  all-to-all sends them (split by send counts, concatenated per receiver); the receiver runs its E/ep local
  experts, sends the outputs back by the reverse all-to-all, and the source combines them with the routing
  weights. Inside each EP rank the experts' intermediate dimension is split over ``tp`` ranks (expert tensor
  parallel), whose partial outputs are all-reduced (summed).
- TP: column-parallel linears (output features split, all-gather) feeding row-parallel linears (input features
  split, all-reduce), as in the SwiGLU MLPs and the shared experts.
"""
from __future__ import annotations

from typing import List

import numpy as np
import mindspore as ms
from mindspore import ops


def all_to_all(chunks: List[List]) -> List[List]:
    """chunks[src][dst] -> received[dst][src] (the collective, as a transpose of the per-rank lists)."""
    return [[chunks[src][dst] for src in range(len(chunks))] for dst in range(len(chunks[0]))]


def column_parallel(x, weight, bias, tp: int, rank: int):
    """Rank ``rank``'s output features of ``x W^T + b`` (weight [out, in] split along out)."""
    w = ops.split(weight, weight.shape[0] // tp, 0)[rank]
    y = ops.matmul(x, w.T)
    return y + ops.split(bias, bias.shape[0] // tp, 0)[rank] if bias is not None else y


def row_parallel(x_shard, weight, tp: int, rank: int):
    """Rank ``rank``'s partial sum of ``x W^T`` from its input features (weight [out, in] split along in)."""
    return ops.matmul(x_shard, ops.split(weight, weight.shape[1] // tp, 1)[rank].T)


def tp_swiglu(mlp, x, tp: int):
    """SwiGLU over ``tp`` virtual ranks: gate/up column-parallel, down row-parallel, then the all-reduce (sum)."""
    partial = [row_parallel(ops.silu(column_parallel(x, mlp.gate_proj.weight, None, tp, r)) *
                            column_parallel(x, mlp.up_proj.weight, None, tp, r), mlp.down_proj.weight, tp, r)
               for r in range(tp)]
    return sum(partial[1:], partial[0])


def _local_experts(rows, local_ids, experts, first: int, count: int, tp: int):
    """Received rows [R, H] with local expert ids [R] -> outputs [R, H]; the intermediate dim split over tp."""
    ids = local_ids.asnumpy()
    order = np.argsort(ids, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(ids, minlength=count))])
    rows = ops.gather(rows, ms.Tensor(order.astype(np.int32)), 0)
    inter = experts.intermediate
    outs = []
    for e in range(count):
        x = rows[int(bounds[e]):int(bounds[e + 1])]
        if x.shape[0] == 0:
            continue
        y = None
        for t in range(tp):  # expert tensor parallel: each rank owns inter / tp columns, partial sums reduce
            cols = slice(t * inter // tp, (t + 1) * inter // tp)
            wg, wu = experts.gate_proj[first + e, cols], experts.up_proj[first + e, cols]
            wd = experts.down_proj[first + e, :, cols]
            part = ops.matmul(ops.silu(ops.matmul(x, wg.T)) * ops.matmul(x, wu.T), wd.T)
            y = part if y is None else y + part
        outs.append(y)
    inverse = np.argsort(order, kind="stable").astype(np.int32)
    return ops.gather(ops.concat(outs, 0), ms.Tensor(inverse), 0)


def ep_moe(layer, x, ep: int, tp: int = 1):
    """The MoE layer on tokens x [T, H] over ``ep`` x ``tp`` virtual ranks (T divisible by ep) -> y [T, H]."""
    e_total = layer.experts.num_experts
    per_rank = e_total // ep
    tokens = ops.split(x, x.shape[0] // ep, 0)
    sends, plans = [], []
    for src, xs in enumerate(tokens):
        weights, indices, _, _, _ = layer.route(xs)
        k = indices.shape[1]
        flat = indices.reshape(-1).asnumpy()
        order = np.argsort(flat // per_rank, kind="stable")  # rows grouped by owning rank, token order kept
        dest = flat[order] // per_rank
        counts = np.bincount(dest, minlength=ep)
        rows = ops.gather(xs, ms.Tensor((order // k).astype(np.int32)), 0)
        local = ms.Tensor((flat[order] % per_rank).astype(np.int32))
        bounds = [0] + np.cumsum(counts).tolist()
        sends.append([(rows[bounds[d]:bounds[d + 1]], local[bounds[d]:bounds[d + 1]]) if counts[d] else None
                      for d in range(ep)])  # nothing is sent for an empty chunk
        plans.append((order, bounds, weights, k))
    received = all_to_all(sends)
    replies = []
    for dst in range(ep):
        parts = received[dst]
        sizes = [0 if p is None else int(p[0].shape[0]) for p in parts]
        present = [p for p in parts if p is not None]
        if not present:
            replies.append([None] * ep)
            continue
        rows = ops.concat([p[0] for p in present], 0)
        out = _local_experts(rows, ops.concat([p[1] for p in present], 0), layer.experts, dst * per_rank, per_rank, tp)
        offsets = [0] + np.cumsum(sizes).tolist()
        replies.append([out[offsets[s]:offsets[s + 1]] if sizes[s] else None for s in range(ep)])
    returned = all_to_all(replies)  # returned[src][dst]: outputs of src's rows computed on dst
    outputs = []
    for src, xs in enumerate(tokens):
        order, bounds, weights, k = plans[src]
        rows_out = ops.concat([r for r in returned[src] if r is not None], 0)  # in the sorted order
        inverse = np.argsort(order, kind="stable").astype(np.int32)
        per_slot = ops.gather(rows_out, ms.Tensor(inverse), 0).reshape(xs.shape[0], k, xs.shape[1])
        y = (per_slot * weights.expand_dims(-1)).sum(1)
        if layer.has_shared:
            y = y + tp_swiglu(getattr(layer, layer.shared_name), xs, tp)
        outputs.append(y)
    return ops.concat(outputs, 0)
