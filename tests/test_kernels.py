"""The C++ MoE kernels (ops/cpu) against the reference composite path: forward, gradients, training losses."""
import numpy as np
import pytest
import mindspore as ms

import mindpangu as mp
from mindpangu.config import BalanceLossConfig, ExpertBiasConfig, MoEConfig
from mindpangu.layers import CausalSoftmax, RMSNorm
from mindpangu.moe import MoELayer, Router, kernel_library
from mindpangu.train.step import StepRunner
from conftest import ULTRA_TINY, ROOT

PRO_TINY = f"{ROOT}/yaml_configs/pangu_pro_moe/tiny.yaml"


def test_library_builds():
    assert kernel_library(required=True).endswith(".so")


GATING = [  # (tokens, experts, k, router, groups, score, normalise, scale, expert bias)
    (37, 16, 4, "topk", 1, "sigmoid", True, 2.5, False),
    (50, 8, 1, "topk", 1, "sigmoid", True, 1.0, True),       # k = 1, biased selection
    (29, 64, 8, "topk", 1, "softmax", False, 1.0, False),
    (33, 64, 8, "moge", 8, "softmax", False, 1.0, False),     # the published MoGE (N=64, M=8, K'=1)
    (7, 12, 6, "moge", 3, "softmax", False, 1.0, False),      # K' = 2
    (1, 256, 8, "topk", 1, "sigmoid", True, 2.5, False),      # one token, Ultra's 256 experts
]


@pytest.mark.parametrize("t,e,k,router,groups,score,normalise,scale,bias", GATING)
def test_gating_kernel_matches_reference(rng, t, e, k, router, groups, score, normalise, scale, bias):
    cfg = MoEConfig(num_experts=e, num_experts_per_tok=k, router=router, num_groups=groups, score_function=score,
                    norm_topk_prob=normalise, routed_scaling_factor=scale,
                    balance_loss=BalanceLossConfig(expert_bias=ExpertBiasConfig(enabled=bias)))
    ref, ker = Router(20, cfg, "reference"), Router(20, cfg, "cpu_kernel")
    weight = rng.normal(0, 1, (e, 20)).astype(np.float32)
    for r in (ref, ker):
        r.weight.set_data(ms.Tensor(weight))
        if bias:
            r.e_score_correction_bias.set_data(ms.Tensor(rng.normal(0, 0.1, e).astype(np.float32)
                                                         if r is ref else ref.e_score_correction_bias.asnumpy()))
    x = ms.Tensor(rng.normal(size=(t, 20)).astype(np.float32))
    a, b = ref(x), ker(x)
    np.testing.assert_array_equal(a[1].asnumpy(), b[1].asnumpy())  # indices, same order
    np.testing.assert_array_equal(a[4].asnumpy(), b[4].asnumpy())  # counts
    np.testing.assert_allclose(b[0].asnumpy(), a[0].asnumpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(b[2].asnumpy(), a[2].asnumpy(), rtol=1e-5, atol=1e-7)
    probe_w = ms.Tensor(rng.normal(size=(t, k)).astype(np.float32))
    probe_s = ms.Tensor(rng.normal(size=(t, e)).astype(np.float32))

    def loss(router):
        def f(xx):
            w, _, s, _, _ = router(xx)
            return (w * probe_w).sum() + (s * probe_s).sum()
        return ms.value_and_grad(f, grad_position=0, weights=router.trainable_params())(x)

    (la, (gxa, gwa)), (lb, (gxb, gwb)) = loss(ref), loss(ker)
    assert float(lb.asnumpy()) == pytest.approx(float(la.asnumpy()), rel=1e-5)
    # float32 sums over up to 256 experts in a different order: 1e-5 absolute on O(0.1-1) gradients
    np.testing.assert_allclose(gxb.asnumpy(), gxa.asnumpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(gwb[0].asnumpy(), gwa[0].asnumpy(), rtol=1e-4, atol=1e-5)


def _stable_top_k(values, k):
    """NumPy: the k largest along the last axis, largest first, equal values to the lower index."""
    return np.argsort(-values, axis=-1, kind="stable")[..., :k]


@pytest.mark.parametrize("router,groups,k", [("topk", 1, 2), ("topk", 1, 8), ("moge", 4, 4), ("moge", 2, 4)])
def test_exact_ties_go_to_the_lower_expert_index_on_every_backend(rng, router, groups, k):
    e, t = 16, 40
    cfg = MoEConfig(num_experts=e, num_experts_per_tok=k, router=router, num_groups=groups,
                    score_function="sigmoid" if router == "topk" else "softmax", norm_topk_prob=router == "topk")
    # logits on a coarse grid (as 16-bit logits are), so most rows hold exact ties; row 0 is all equal
    logits = rng.integers(-2, 3, (t, e)).astype(np.float32) * 0.5
    logits[0] = 0.25
    scores = 1 / (1 + np.exp(-logits)) if router == "topk" else np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    if router == "topk":
        want = _stable_top_k(scores, k)
    else:
        per = e // groups
        local = _stable_top_k(scores.reshape(t, groups, per), k // groups)
        want = (local + np.arange(groups).reshape(1, -1, 1) * per).reshape(t, k)
    for backend in ("reference", "cpu_kernel"):
        got = Router(20, cfg, backend).route(ms.Tensor(logits))[1].asnumpy()
        np.testing.assert_array_equal(got, want, err_msg=backend)
        assert all(len(set(row)) == k for row in got)  # distinct experts
    if router == "topk":
        assert list(want[0]) == list(range(k))


DISPATCH = [(37, 8, 2, True), (5, 16, 1, False), (64, 4, 4, False), (13, 64, 8, True), (100, 3, 1, True)]


@pytest.mark.parametrize("t,e,k,starve", DISPATCH)
def test_permute_unpermute_kernels_match_reference(rng, t, e, k, starve):
    ref, ker = (MoELayer(12, MoEConfig(num_experts=e, num_experts_per_tok=k, intermediate_size=10, num_shared_experts=0,
                                       dispatch_backend=backend)) for backend in ("reference", "cpu_kernel"))
    for name in ("gate_proj", "up_proj", "down_proj"):
        value = ms.Tensor(rng.normal(0, 0.3, getattr(ref.experts, name).shape).astype(np.float32))
        getattr(ref.experts, name).set_data(value)
        getattr(ker.experts, name).set_data(value)
    idx = np.stack([rng.choice(e, k, replace=False) for _ in range(t)]).astype(np.int32)
    if starve:  # expert 0 gets no token
        idx = np.where(idx == 0, (idx + 1) % e if k == 1 else idx, idx)
        if k > 1:
            idx = np.stack([rng.choice(np.arange(1, e), k, replace=False) for _ in range(t)]).astype(np.int32)
    x = ms.Tensor(rng.normal(size=(t, 12)).astype(np.float32))
    w = ms.Tensor(rng.uniform(0.1, 1, (t, k)).astype(np.float32))
    probe = ms.Tensor(rng.normal(size=(t, 12)).astype(np.float32))

    def run(layer):
        f = lambda xx, ww: (layer.routed_experts(xx, ww, ms.Tensor(idx)) * probe).sum()  # noqa: E731
        return ms.value_and_grad(f, grad_position=(0, 1), weights=layer.experts.trainable_params())(x, w)

    (la, (ga, gpa)), (lb, (gb, gpb)) = run(ref), run(ker)
    assert float(lb.asnumpy()) == pytest.approx(float(la.asnumpy()), rel=1e-5)
    for u, v in zip(ga + gpa, gb + gpb):
        np.testing.assert_allclose(v.asnumpy(), u.asnumpy(), rtol=1e-4, atol=1e-5)
    if starve:
        assert np.all(gpa[0].asnumpy()[0] == 0) and np.all(gpb[0].asnumpy()[0] == 0)


@pytest.mark.parametrize("recipe", [ULTRA_TINY, PRO_TINY], ids=["ultra", "pro"])
def test_training_losses_match_reference(rng, recipe):
    """Five optimizer steps of the tiny model (2 layers) on one batch give the same losses with the composite ops
    and with the C++ kernels (gating, dispatch, grouped experts, RMSNorm, causal softmax)."""
    losses = {}
    batches = [rng.integers(0, 1024, (4, 33)).astype(np.int32)] * 5
    for backend in ("reference", "cpu_kernel"):
        cfg = mp.load_config(recipe, overrides=["model.num_layers=2", f"model.moe.dispatch_backend={backend}",
                                                f"model.norm_backend={backend}", f"model.attention_backend={backend}"])
        model = mp.build_model(cfg.model, seed=3)
        runner = StepRunner(model, cfg)
        losses[backend] = [runner.run([b], 1e-3)["loss"] for b in batches]
    np.testing.assert_allclose(losses["cpu_kernel"], losses["reference"], rtol=1e-4)
    assert losses["reference"][-1] < losses["reference"][0]


def test_backend_choice_errors():
    with pytest.raises(ValueError, match="'ascend' runs MindSpore's fused Ascend MoE ops .* no CPU kernels"):
        mp.build_model(mp.load_config(ULTRA_TINY, overrides=["model.moe.dispatch_backend=ascend",
                                                             "context.device_target=Ascend"]).model)


def test_ops_of_different_configs_on_the_same_shapes_do_not_share_a_kernel(rng):
    """PyNative caches launched aot kernels by name and input shapes: a top-2 op must not reuse a top-4 kernel."""
    from mindpangu.moe.kernels import gating_config, make_gating, make_permute

    logits = ms.Tensor(rng.standard_normal((18, 8)).astype(np.float32))
    bias = ms.Tensor(np.zeros(8, np.float32))
    for k in (2, 4, 2):
        weights, indices, _, _ = make_gating(k)(logits, bias, gating_config(True, False, False, 1.0, k))
        expected = np.sort(np.argsort(-logits.asnumpy().reshape(18, k, 8 // k), -1)[..., 0] +
                           np.arange(k) * (8 // k), -1)
        np.testing.assert_array_equal(np.sort(indices.asnumpy(), -1), expected)
    x = ms.Tensor(rng.standard_normal((6, 4)).astype(np.float32))
    idx = ms.Tensor(np.zeros((6, 2), np.int32))
    for e in (4, 8):
        _, _, block_expert, counts = make_permute(e)(x, idx)
        assert counts.shape == (e,) and counts.asnumpy()[0] == 12


@pytest.mark.parametrize("shape", [(37, 16), (2, 9, 64), (3, 1, 5, 128)])
def test_rms_norm_kernel_matches_reference(rng, shape):
    """The C++ RMSNorm against a float64 NumPy RMSNorm (forward) and the composite cell (gradients of x and the
    weight under a random probe)."""
    h = shape[-1]
    ref, ker = RMSNorm(h, 1e-5, "reference"), RMSNorm(h, 1e-5, "cpu_kernel")
    assert ker.use_kernel and not ref.use_kernel
    weight = rng.normal(1.0, 0.3, h).astype(np.float32)
    for cell in (ref, ker):
        cell.weight.set_data(ms.Tensor(weight))
    x = rng.normal(0.0, 2.0, shape).astype(np.float32)
    x64 = x.astype(np.float64)
    expected = x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + 1e-5) * weight
    np.testing.assert_allclose(ker(ms.Tensor(x)).asnumpy(), expected, rtol=1e-5, atol=1e-6)
    probe = ms.Tensor(rng.normal(size=shape).astype(np.float32))

    def grads(cell):
        f = lambda xx: (cell(xx) * probe).sum()  # noqa: E731
        return ms.grad(f, grad_position=0, weights=cell.trainable_params())(ms.Tensor(x))

    (gx_ref, (gw_ref,)), (gx_ker, (gw_ker,)) = grads(ref), grads(ker)
    np.testing.assert_allclose(gx_ker.asnumpy(), gx_ref.asnumpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(gw_ker.asnumpy(), gw_ref.asnumpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(7, 7), (2, 3, 16, 16), (2, 2, 3, 5, 9), (1, 4, 1, 6)])
def test_causal_softmax_kernel_matches_numpy(rng, shape):
    """The C++ causal softmax against a float64 NumPy softmax with the causal mask written out (queries are the last
    Q of K keys: query i sees keys 0 .. K - Q + i), forward and d scores under a random probe (the analytic
    softmax Jacobian in NumPy), and the composite cell on the same inputs."""
    q, k = shape[-2:]
    scale = 0.37
    x = rng.normal(0.0, 3.0, shape).astype(np.float32)
    seen = np.arange(k)[None, :] <= (k - q + np.arange(q))[:, None]  # [Q, K]
    z = np.where(seen, x.astype(np.float64) * scale, -np.inf)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    probe = rng.normal(size=shape)
    d_scores = scale * p * (probe - (probe * p).sum(-1, keepdims=True))
    for backend in ("cpu_kernel", "reference"):
        cell = CausalSoftmax(scale, backend)
        assert cell.use_kernel == (backend == "cpu_kernel")
        np.testing.assert_allclose(cell(ms.Tensor(x)).asnumpy(), p, rtol=1e-5, atol=1e-7)
        assert not cell(ms.Tensor(x)).asnumpy()[..., ~seen].any()  # masked keys get exactly 0
        f = lambda xx: (cell(xx) * ms.Tensor(probe.astype(np.float32))).sum()  # noqa: E731
        np.testing.assert_allclose(ms.grad(f)(ms.Tensor(x)).asnumpy(), d_scores, rtol=1e-4, atol=1e-6)
