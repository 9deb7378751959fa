"""The ``ascend`` dispatch backend's algorithm on CPU: MindSpore has no CPU kernels for its fused MoE ops nor for
AlltoAllV / AllGatherV / ReduceScatterV, so this test stands in for exactly those (written here from their
documented semantics) and runs every virtual rank of an EP x expert-TP group in its own thread, each calling the MoE
layer's per-rank function (``MoELayer.local_routed_experts``: our dispatch, grouped SwiGLU and combine) on its own
tokens and its own slice of the experts. Everything between the stand-ins is the code that runs on Ascend. The
outputs of all ranks together must equal the per-token NumPy loop over all tokens. (That the same code compiles
for Ascend, inside its Morph, on 8 simulated ranks is tests_sim/.)"""
import threading

import numpy as np
import pytest
import mindspore as ms
from mindspore import ops

from mindpangu.config import MoEConfig
from mindpangu.moe import AlltoAllDispatcher, MoELayer
from mindpangu.parallel.plan import Layout, groups
from mindpangu.parallel.strategy import expert_parallel_ranks
import numpy_reference as ref


class VirtualGroup:
    """Ranks 0..n-1 as threads, one running MindSpore at a time; every collective is a rendezvous of all ranks,
    each then reading what its own group sends it."""

    def __init__(self, n):
        self.n, self.box = n, {}
        self.lock, self.barrier = threading.Lock(), threading.Barrier(n)

    def exchange(self, rank, value):
        """Deposit ``value`` (NumPy), wait for every rank, return all ranks' values."""
        self.box[rank] = value
        self.lock.release()
        self.barrier.wait()
        out = dict(self.box)
        self.barrier.wait()  # nobody deposits the next value before everyone has read this one
        self.lock.acquire()
        return out

    def run(self, fn):
        """fn(rank) on every rank concurrently -> [result of rank 0, ...]; re-raises a rank's error."""
        results, errors = [None] * self.n, []

        def main(rank):
            self.lock.acquire()
            try:
                results[rank] = fn(rank)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)
                self.barrier.abort()
            finally:
                self.lock.release()

        threads = [threading.Thread(target=main, args=(r,)) for r in range(self.n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results


class CpuStandIns(AlltoAllDispatcher):
    """The all-to-all dispatcher with its Ascend-only pieces replaced by CPU stand-ins written from their documented
    semantics: the fused permute / unpermute, and the collective primitives (flat inputs, split sizes counted in
    ``block_size`` units for AlltoAllV and in elements for AllGatherV / ReduceScatterV, a shape-() result when empty);
    ``ep_ranks`` / ``etp_ranks``: this rank's groups (global ranks, in group order)."""

    def __init__(self, num_experts, hidden, top_k, world, rank, ep_ranks, etp_ranks):
        super().__init__(num_experts, hidden, top_k)
        self.world, self.rank, self.ep_ranks, self.etp_ranks = world, rank, ep_ranks, etp_ranks
        self.ep, self.etp = len(ep_ranks), len(etp_ranks)  # what set_expert_parallel sets, without real groups
        self.to_host = lambda x, where, blocking: x
        self.all_to_all_op = self._all_to_all
        self.all_to_all_rows_op = lambda x, send, recv: self._all_to_all_v(x, send, recv, hidden)
        self.all_to_all_ids_op = lambda x, send, recv: self._all_to_all_v(x, send, recv, 1)
        self.all_gather_op = lambda x: ms.Tensor(np.concatenate(self._gather(x, self.etp_ranks)))
        self.all_gather_v_op = self._all_gather_v
        self.reduce_scatter_v_op = self._reduce_scatter_v

    # ops.moe_token_permute / moe_token_unpermute (MindSpore docstrings: stable grouping by index; sorted_indices
    # is where each (token, k) row went; unpermute with probs sums each token's K rows weighted)
    def permute(self, rows, indices):
        flat = indices.asnumpy().reshape(-1)
        k = flat.size // rows.shape[0]
        order = np.argsort(flat, kind="stable")
        where = np.empty_like(order)
        where[order] = np.arange(order.size)
        return ops.gather(rows, ms.Tensor((order // k).astype(np.int32)), 0), ms.Tensor(where.astype(np.int32))

    def unpermute(self, permuted, sorted_indices, probs=None):
        rows = ops.gather(permuted, sorted_indices, 0)
        if probs is None:
            return rows
        t, k = probs.shape
        return (rows.reshape(t, k, -1) * probs.reshape(t, k, 1)).sum(1)

    # the collectives, over the virtual group
    def _gather(self, x, members):
        got = self.world.exchange(self.rank, x.asnumpy())
        return [got[r] for r in members]

    @staticmethod
    def _result(parts):
        out = np.concatenate(parts)
        return ms.Tensor(out if out.size else np.zeros((), out.dtype))

    def _all_to_all(self, x):  # AlltoAll(split_count=ep, split_dim=0, concat_dim=0)
        mine = self.ep_ranks.index(self.rank)
        return ms.Tensor(np.concatenate([np.split(chunks, self.ep)[mine] for chunks in self._gather(x, self.ep_ranks)]))

    def _all_to_all_v(self, x, send, recv, block):
        assert x.ndim == 1 and send.dtype == ms.int64 and recv.dtype == ms.int64
        mine = self.ep_ranks.index(self.rank)
        packed = np.concatenate([send.asnumpy().astype(x.asnumpy().dtype), x.asnumpy()])
        parts = []
        for src in self._gather(ms.Tensor(packed), self.ep_ranks):
            counts, data = src[:self.ep].astype(np.int64) * block, src[self.ep:]
            start = counts[:mine].sum()
            parts.append(data[start:start + counts[mine]])
        np.testing.assert_array_equal([len(p) for p in parts], recv.asnumpy() * block)  # the receiver agrees
        return self._result(parts)

    def _all_gather_v(self, x, sizes):
        assert x.ndim == 1 and sizes.dtype == ms.int64
        parts = self._gather(x, self.etp_ranks)
        np.testing.assert_array_equal([len(p) for p in parts], sizes.asnumpy())
        return self._result(parts)

    def _reduce_scatter_v(self, x, sizes):
        assert x.ndim == 1 and sizes.dtype == ms.int64
        mine = self.etp_ranks.index(self.rank)
        bounds = np.concatenate([[0], np.cumsum(sizes.asnumpy())])
        return self._result([sum(p[bounds[mine]:bounds[mine + 1]] for p in self._gather(x, self.etp_ranks))])


def cpu_grouped_matmul(x, weight, group_list):
    """GroupedMatmul (split_item 3, group_type 0): rows group_list[g-1]:group_list[g] times weight[g]."""
    bounds = [0] + [int(b) for b in group_list.asnumpy()]
    parts = [ops.matmul(x[bounds[g]:bounds[g + 1]], weight[g]) for g in range(weight.shape[0])
             if bounds[g + 1] > bounds[g]]
    return ops.concat(parts, 0)


def _layer(e, k, hidden, inter):
    cfg = MoEConfig(num_experts=e, num_experts_per_tok=k, intermediate_size=inter, num_shared_experts=0,
                    dispatch_backend="reference")
    layer = MoELayer(hidden, cfg)
    layer.experts.grouped_matmul = cpu_grouped_matmul
    return layer


def _routing(rng, tokens, e, k, skip=None):
    choices = [x for x in range(e) if x != skip]
    idx = np.stack([rng.choice(choices, k, replace=False) for _ in range(tokens)]).astype(np.int32)
    return idx, rng.uniform(0.1, 1.0, (tokens, k)).astype(np.float32)


@pytest.mark.parametrize("ep,etp,skewed", [(1, 1, False), (2, 1, False), (4, 1, False), (1, 2, False),
                                           (2, 2, False), (2, 2, True)])
def test_all_to_all_dispatch_over_virtual_ranks_matches_per_token_loop(rng, ep, etp, skewed):
    """skewed: every token picks experts of the first EP rank, so without the dispatcher's zero tokens the other
    ranks would receive nothing (a shape-() result from the collectives)."""
    e, k, hidden, inter, per_rank = 8, 3, 12, 10, 11
    n = ep * etp
    tokens = n * per_rank
    x = rng.normal(size=(tokens, hidden)).astype(np.float32)
    idx, wts = _routing(rng, tokens, e, k, skip=5)  # expert 5 gets no row anywhere
    if skewed:
        idx = np.stack([rng.choice(e // ep, k, replace=False) for _ in range(tokens)]).astype(np.int32)
    gate, up = (rng.normal(0, 0.3, (e, inter, hidden)).astype(np.float32) for _ in range(2))
    down = rng.normal(0, 0.3, (e, hidden, inter)).astype(np.float32)
    layout = Layout(dp=n, ep=ep, tp=etp)  # expert TP = TP (EP carved from the DP ranks)
    assert layout.expert_tp == etp
    world = VirtualGroup(n)
    layers = [_layer(e, k, hidden, inter) for _ in range(n)]
    for rank, layer in enumerate(layers):
        ep_ranks, etp_ranks = expert_parallel_ranks(layout, rank)
        layer.token_dispatcher = CpuStandIns(e, hidden, k, world, rank, ep_ranks, etp_ranks)

    def rank_output(rank):
        ep_rank, etp_rank = (rank // etp) % ep, rank % etp
        experts = slice(ep_rank * e // ep, (ep_rank + 1) * e // ep)
        cols = slice(etp_rank * inter // etp, (etp_rank + 1) * inter // etp)
        mine = slice(rank * per_rank, (rank + 1) * per_rank)
        return layers[rank].local_routed_experts(
            ms.Tensor(x[mine]), ms.Tensor(wts[mine]), ms.Tensor(idx[mine]), ms.Tensor(gate[experts, cols]),
            ms.Tensor(up[experts, cols]), ms.Tensor(down[experts][:, :, cols])).asnumpy()

    got = np.concatenate(world.run(rank_output))
    np.testing.assert_allclose(got, ref.routed_experts(gate, up, down, x, wts, idx), atol=1e-5, rtol=1e-5)


def test_single_rank_gradients_match_the_reference_dispatcher(rng):
    """EP = expert TP = 1 (no collectives): the gradients of the permute -> grouped SwiGLU -> weighted unpermute
    path w.r.t. tokens, routing weights and the three expert weights equal the reference dispatcher's."""
    e, k, hidden, inter, tokens = 6, 2, 8, 5, 17
    layer = _layer(e, k, hidden, inter)
    ge = layer.experts
    for p in (ge.gate_proj, ge.up_proj, ge.down_proj):
        p.set_data(ms.Tensor(rng.normal(0, 0.3, p.shape).astype(np.float32)))
    x = ms.Tensor(rng.normal(size=(tokens, hidden)).astype(np.float32))
    idx, wts = _routing(rng, tokens, e, k)
    idx, wts = ms.Tensor(idx), ms.Tensor(wts)
    cotangent = ms.Tensor(rng.normal(size=(tokens, hidden)).astype(np.float32))
    reference_grads = ms.grad(lambda xx, ww: (layer.routed_experts(xx, ww, idx) * cotangent).sum(),
                              grad_position=(0, 1), weights=[ge.gate_proj, ge.up_proj, ge.down_proj])(x, wts)
    layer.token_dispatcher = CpuStandIns(e, hidden, k, None, 0, [0], [0])
    grads = ms.grad(lambda xx, ww, g, u, d: (layer.local_routed_experts(xx, ww, idx, g, u, d) * cotangent).sum(),
                    grad_position=(0, 1, 2, 3, 4))(x, wts, ge.gate_proj.value(), ge.up_proj.value(),
                                                   ge.down_proj.value())
    expected = list(reference_grads[0]) + list(reference_grads[1])
    for got, want in zip(grads, expected):
        np.testing.assert_allclose(got.asnumpy(), want.asnumpy(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dp,tp,ep", [(4, 2, 4), (2, 2, 2), (8, 1, 4), (4, 4, 2)])
def test_expert_parallel_ranks_are_the_plans_groups(dp, tp, ep):
    """The groups the dispatcher communicates in are the plan's EP groups (default rank order), and each expert-TP
    group is a TP group, on every stage."""
    layout = Layout(dp=dp, tp=tp, ep=ep, pp=2)
    plan = groups(layout)
    for rank in range(layout.world):
        ep_ranks, etp_ranks = expert_parallel_ranks(layout, rank)
        assert ep_ranks in plan["ep"] and rank in ep_ranks
        assert etp_ranks in plan["tp"] and rank in etp_ranks
