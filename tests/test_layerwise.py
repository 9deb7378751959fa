"""The layer-wise engine (one compiled graph per layer kind, parameters bound per layer) against the whole-graph
engine (``LossNet`` differentiated as one graph by MindSpore's autodiff): same losses, same gradients, same update.
"""
import numpy as np
import pytest
import mindspore as ms
from mindspore import ParameterTuple

import mindpangu as mp
from mindpangu.models import build_model
from mindpangu.train.layerwise import Binding, LayerwiseMicroStep
from mindpangu.train.step import GraphMicroStep, StepRunner

from conftest import ROOT

ULTRA = f"{ROOT}/yaml_configs/pangu_ultra_moe/tiny.yaml"
PRO = f"{ROOT}/yaml_configs/pangu_pro_moe/tiny.yaml"


@pytest.fixture(autouse=True)
def graph_mode():
    ms.set_context(mode=ms.GRAPH_MODE)
    yield
    ms.set_context(mode=ms.PYNATIVE_MODE)


def _tokens(cfg, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, cfg.model.vocab_size, (4, 33)).astype(np.int32)


CASES = {
    # Ultra: dense + MoE kinds, DSSN, MTP (its own MoE layer in the head), EP-group loss over 2 virtual ranks, z-loss
    "ultra_ep_group_z": (ULTRA, ["parallel_config.expert_parallel=2", "model.moe.balance_loss.z_loss_coeff=1e-3"]),
    # global_batch: pooled counts come in as inputs; expert bias on
    "ultra_global_bias": (ULTRA, ["model.moe.balance_loss.type=global_batch",
                                  "model.moe.balance_loss.expert_bias.enabled=true"]),
    # Pro MoE: MoGE with router_scale, every layer MoE, GQA with biases, no MTP
    "pro_micro_batch": (PRO, ["model.moe.balance_loss.type=micro_batch"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_layerwise_equals_whole_graph(case):
    recipe, overrides = CASES[case]
    cfg = mp.load_config(recipe, overrides=overrides + ["model.num_layers=3", "train_dataset.seq_length=32"])
    model = build_model(cfg.model, seed=3)
    names = [p.name for p in model.get_parameters()]
    params = [p for p in model.get_parameters() if p.requires_grad]
    whole = GraphMicroStep(model, cfg, params)
    layerwise = LayerwiseMicroStep(model, cfg, params)
    assert [p.name for p in model.get_parameters()] == names  # checkpoints keep the HF names
    tokens = _tokens(cfg)
    pooled_want = whole.routing_counts(tokens)
    pooled_got = layerwise.routing_counts(tokens)
    np.testing.assert_array_equal(pooled_got, pooled_want)
    pooled, pooled_tokens = (pooled_want, float(tokens.shape[0] * (tokens.shape[1] - 1))) \
        if "global" in case else (np.zeros_like(pooled_want), 1.0)
    want = whole(tokens, pooled, pooled_tokens, 0.5)
    got = layerwise(tokens, pooled, pooled_tokens, 0.5)
    assert want[2] > 0 or cfg.model.num_mtp_layers == 0
    np.testing.assert_allclose(got[:5], want[:5], rtol=1e-5, atol=1e-6)  # total, lm, mtp, balance, z
    np.testing.assert_array_equal(got[5], want[5])  # expert counts per MoE layer (MTP last)
    for p, a, b in zip(params, layerwise.accum, whole.accum):
        g_want, g_got = b.asnumpy(), a.asnumpy()
        scale = np.abs(g_want).max()
        assert scale > 0 or "e_score" in p.name or "router_scale" in p.name, p.name
        np.testing.assert_allclose(g_got, g_want, rtol=0, atol=1e-5 * max(scale, 1e-12), err_msg=p.name)
    assert layerwise.eval_loss(tokens) == pytest.approx(whole.eval_loss(tokens), rel=1e-5)


def test_binding_shares_storage():
    """A bound template parameter reads and writes the target's tensor (no copy)."""
    tmpl = ms.Parameter(ms.Tensor(np.zeros((2, 3), np.float32)), name="t")
    a = ms.Parameter(ms.Tensor(np.ones((2, 3), np.float32)), name="a")
    b = ms.Parameter(ms.Tensor(np.full((2, 3), 2.0, np.float32)), name="b")
    binding = Binding([tmpl], [[a], [b]])
    binding.bind(0)
    np.testing.assert_array_equal(tmpl.asnumpy(), a.asnumpy())
    binding.bind(1)  # rebinding moves the template; it must not copy b's values into a
    np.testing.assert_array_equal(a.asnumpy(), np.ones((2, 3)))
    np.testing.assert_array_equal(tmpl.asnumpy(), b.asnumpy())
    ms.ops.assign(tmpl, ms.Tensor(np.full((2, 3), 7.0, np.float32)))
    np.testing.assert_array_equal(b.asnumpy(), np.full((2, 3), 7.0))
    np.testing.assert_array_equal(a.asnumpy(), np.ones((2, 3)))
    with pytest.raises(ValueError, match="do not match"):
        Binding([tmpl], [[ms.Parameter(ms.Tensor(np.zeros((3, 2), np.float32)), name="c")]])


def test_steps_equal_across_engines():
    """Three optimizer steps (2 micro-batches each; the update grouped per layer kind) give the same parameters
    and AdamW moments with either engine."""
    states = {}
    for engine in ("whole_graph", "layerwise"):
        cfg = mp.load_config(ULTRA, overrides=["model.num_layers=3", "train_dataset.seq_length=32",
                                               f"runner_config.engine={engine}",
                                               "model.moe.balance_loss.expert_bias.enabled=true"])
        model = build_model(cfg.model, seed=5)
        runner = StepRunner(model, cfg)
        outs = [runner.run([_tokens(cfg, 2 * i), _tokens(cfg, 2 * i + 1)], 3e-3) for i in range(3)]
        states[engine] = ([o["loss"] for o in outs], [o["grad_norm"] for o in outs],
                          {p.name: p.asnumpy().copy() for p in runner.state_params})
    (loss_a, norm_a, a), (loss_b, norm_b, b) = states["whole_graph"], states["layerwise"]
    np.testing.assert_allclose(loss_b, loss_a, rtol=1e-5)
    np.testing.assert_allclose(norm_b, norm_a, rtol=1e-4)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=1e-4, atol=1e-5, err_msg=name)


def test_update_step_matches_numpy_adamw():
    """The grouped, fused update (bias corrections folded into MindSpore's AdamWeightDecay) against AdamW written
    in NumPy from the paper, with global-norm clipping, two groups sharing one compiled graph, and a skipped step."""
    from mindpangu.train.optim import AdamW
    from mindpangu.train.step import UpdateStep

    rng = np.random.default_rng(0)
    shapes = [(3, 4), (4,), (3, 4), (4,), (5,)]
    names = ["a.weight", "a.norm.weight", "b.weight", "b.norm.weight", "c.bias"]
    params = [ms.Parameter(ms.Tensor(rng.normal(size=s).astype(np.float32)), name=n) for s, n in zip(shapes, names)]
    opt = AdamW(params, (0.9, 0.95), 1e-8, 0.1)
    accum = ParameterTuple(params).clone(prefix="accum", init="zeros")
    update = UpdateStep(accum, opt, 1.0, [], 0.0, groups=[[0, 1], [2, 3], [4]])
    assert [k[1] for k in update.kinds] == [2, 1]  # a and b share the compiled cells
    p_np = [p.asnumpy().astype(np.float64) for p in params]
    m = [np.zeros_like(p) for p in p_np]
    v = [np.zeros_like(p) for p in p_np]
    decay = [0.1, 0.0, 0.1, 0.0, 0.0]
    t = 0
    for step in range(4):
        grads = [rng.normal(size=s) * 3 for s in shapes]
        if step == 2:
            grads[1] = grads[1] * np.nan
        for a, g in zip(accum, grads):
            a.set_data(ms.Tensor((g * 2).astype(np.float32)))  # accumulated at loss scale 2
        norm, finite = update(ms.Tensor(0.01, ms.float32), ms.Tensor(0.5, ms.float32), ms.Tensor(np.zeros((1, 1),
                                                                                                         np.float32)))
        total = np.sqrt(sum((g ** 2).sum() for g in grads))
        if step == 2:
            assert not bool(finite.asnumpy())
        else:
            assert float(norm.asnumpy()) == pytest.approx(total, rel=1e-5)
            clip = min(1.0, 1.0 / (total + 1e-6))
            t += 1
            for i, g in enumerate(grads):
                g = g * clip
                m[i] = 0.9 * m[i] + 0.1 * g
                v[i] = 0.95 * v[i] + 0.05 * g * g
                p_np[i] = p_np[i] * (1 - 0.01 * decay[i]) - 0.01 * (m[i] / (1 - 0.9 ** t)) / (
                    np.sqrt(v[i] / (1 - 0.95 ** t)) + 1e-8)
        for a in accum:
            np.testing.assert_array_equal(a.asnumpy(), 0)
        for i, p in enumerate(params):
            np.testing.assert_allclose(p.asnumpy(), p_np[i], rtol=1e-5, atol=1e-6, err_msg=names[i])
    assert float(opt.step.asnumpy()) == t == 3
