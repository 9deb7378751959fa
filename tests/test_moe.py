"""Router and dropless dispatch against NumPy: weights, indices, counts, outputs and gradients."""
import numpy as np
import pytest
import mindspore as ms

from mindpangu.config import MoEConfig
from mindpangu.moe import MoELayer, Router, block_size, permute_plan
import numpy_reference as ref


def _experts(rng, e, k, h, i, backend):
    """An MoE layer's routed experts (its token dispatcher and grouped experts), random weights."""
    cfg = MoEConfig(num_experts=e, num_experts_per_tok=k, intermediate_size=i, num_shared_experts=0,
                    dispatch_backend=backend)
    layer = MoELayer(h, cfg)
    ge = layer.experts
    for p in (ge.gate_proj, ge.up_proj, ge.down_proj):
        p.set_data(ms.Tensor(rng.normal(0, 0.3, p.shape).astype(np.float32)))
    return layer


def _numpy_experts(ge, x, weights, indices):
    return ref.routed_experts(ge.gate_proj.asnumpy(), ge.up_proj.asnumpy(), ge.down_proj.asnumpy(), x, weights,
                              indices)


@pytest.mark.parametrize("backend", ["reference", "expert_major", "cpu_kernel"])
@pytest.mark.parametrize("tokens,experts,k", [(37, 8, 2), (5, 16, 1), (64, 4, 4), (13, 64, 8)])
def test_dropless_experts_match_per_token_loop(rng, tokens, experts, k, backend):
    """Every dispatcher with its grouped experts (cpu_kernel: C++ permute, grouped SwiGLU, unpermute)."""
    expert_major = backend == "expert_major"
    layer = _experts(rng, experts, k, 12, 10, backend)
    assert (layer.experts.grouped is not None) == (backend == "cpu_kernel")
    x = rng.normal(size=(tokens, 12)).astype(np.float32)
    choices = [e for e in range(experts) if e != 3] if experts >= 8 else range(experts)  # expert 3 gets no token
    idx = np.stack([rng.choice(choices, k, replace=False) for _ in range(tokens)]).astype(np.int32)
    if experts >= 8 and not expert_major:
        # the block layout even takes a token repeating an expert (the expert-major buffer holds one row per token
        # and expert, as every router gives)
        idx[:, -1] = np.where(idx[:, 0] == 2, 2, idx[:, -1])
    wts = rng.uniform(0.1, 1.0, (tokens, k)).astype(np.float32)
    got = layer.routed_experts(ms.Tensor(x), ms.Tensor(wts), ms.Tensor(idx)).asnumpy()
    np.testing.assert_allclose(got, _numpy_experts(layer.experts, x, wts, idx), atol=1e-5, rtol=1e-5)


def test_permute_plan_is_a_stable_counting_sort(rng):
    idx = rng.integers(0, 5, (23, 3)).astype(np.int32)
    block = 4
    slot, row_of_slot, block_expert, counts = (t.asnumpy() for t in permute_plan(ms.Tensor(idx), 5, block))
    flat = idx.reshape(-1)
    np.testing.assert_array_equal(counts, np.bincount(flat, minlength=5))
    order = np.argsort(flat, kind="stable")
    used = row_of_slot[row_of_slot < flat.size]
    np.testing.assert_array_equal(used, order)  # rows in expert order, token order kept inside an expert
    np.testing.assert_array_equal(row_of_slot[slot], np.arange(flat.size))
    for r, s in enumerate(slot):
        assert block_expert[s // block] == flat[r]


@pytest.mark.parametrize("backend", ["reference", "cpu_kernel"])
def test_expert_gradients_match_finite_differences(rng, backend):
    layer = _experts(rng, 4, 2, 6, 5, backend)
    ge = layer.experts
    x = rng.normal(size=(9, 6)).astype(np.float32)
    idx = rng.integers(0, 4, (9, 2)).astype(np.int32)
    wts = rng.uniform(0.2, 1.0, (9, 2)).astype(np.float32)

    def loss(xx, ww):
        return (layer.routed_experts(xx, ww, ms.Tensor(idx)) ** 2).sum()

    gx, gw = ms.grad(loss, grad_position=(0, 1))(ms.Tensor(x), ms.Tensor(wts))
    params = [ge.gate_proj, ge.up_proj, ge.down_proj]
    g_params = ms.grad(loss, grad_position=None, weights=params)(ms.Tensor(x), ms.Tensor(wts))

    def np_loss(xx, ww, param=None, value=None):
        if param is not None:
            old = param.asnumpy().copy()
            param.set_data(ms.Tensor(value))
        val = (_numpy_experts(ge, xx, ww, idx) ** 2).sum()
        if param is not None:
            param.set_data(ms.Tensor(old))
        return val

    eps = 1e-3
    for (t, j) in [(0, 0), (4, 3), (8, 5)]:
        d = np.zeros_like(x); d[t, j] = eps
        fd = (np_loss(x + d, wts) - np_loss(x - d, wts)) / (2 * eps)
        assert abs(gx.asnumpy()[t, j] - fd) < 2e-2 * max(1.0, abs(fd))
    d = np.zeros_like(wts); d[3, 1] = eps
    fd = (np_loss(x, wts + d) - np_loss(x, wts - d)) / (2 * eps)
    assert abs(gw.asnumpy()[3, 1] - fd) < 2e-2 * max(1.0, abs(fd))
    unused = sorted(set(range(4)) - set(idx.reshape(-1).tolist()))
    for param, grad in zip(params, g_params):
        value = param.asnumpy()
        for at in [(idx[2, 0], 1, 2), (idx[7, 1], 4, 0)]:
            d = np.zeros_like(value); d[at] = eps
            fd = (np_loss(x, wts, param, value + d) - np_loss(x, wts, param, value - d)) / (2 * eps)
            assert abs(grad.asnumpy()[at] - fd) < 2e-2 * max(1.0, abs(fd)), (param.name, at)
        for e in unused:  # an expert no token chose gets a zero gradient
            assert not grad.asnumpy()[e].any()


@pytest.mark.parametrize("normalise,scale", [(True, 2.5), (False, 1.0)])
def test_sigmoid_topk_router_matches_numpy(rng, normalise, scale):
    cfg = MoEConfig(num_experts=16, num_experts_per_tok=4, norm_topk_prob=normalise, routed_scaling_factor=scale)
    router = Router(20, cfg)
    router.weight.set_data(ms.Tensor(rng.normal(0, 1, (16, 20)).astype(np.float32)))
    x = rng.normal(size=(31, 20)).astype(np.float32)
    weights, indices, scores, logits, counts = (t.asnumpy() for t in router(ms.Tensor(x)))
    routes = ref.route_topk(x.astype(np.float64) @ router.weight.asnumpy().T.astype(np.float64), 4, normalise, scale)
    for t, chosen in enumerate(routes):
        want = dict(chosen)
        assert set(indices[t]) == set(want)
        for e, w in zip(indices[t], weights[t]):
            assert abs(w - want[e]) < 1e-5
    np.testing.assert_array_equal(counts, np.bincount(indices.ravel(), minlength=16))
    np.testing.assert_allclose(scores, 1 / (1 + np.exp(-logits.astype(np.float64))), atol=1e-6, rtol=1e-5)


def test_block_size_bounds():
    assert block_size(16, 64) == 8 and block_size(10 ** 6, 8) == 128
