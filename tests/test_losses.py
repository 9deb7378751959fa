"""Balance losses against an independent NumPy computation, and their invariances (SPEC: value and gradient must
not depend on how the same global batch is laid out)."""
import numpy as np
import pytest
import mindspore as ms

import mindpangu as mp
from mindpangu.train.losses import balance_loss, cross_entropy
from mindpangu.train.step import LossNet, MicroStep, RoutingStats
from conftest import ULTRA_TINY


def np_balance(scores, indices, n, k, sigmoid):
    """alpha-free Switch/Pangu loss on one pool of tokens: N/(K T) * sum_i count_i * mean_t S_it."""
    s = scores / scores.sum(-1, keepdims=True) if sigmoid else scores
    t = scores.shape[0]
    counts = np.bincount(indices.ravel(), minlength=n)
    return float((n / (k * t) * counts * s.mean(0)).sum())


def routing(rng, t, n, k, sigmoid):
    logits = rng.normal(size=(t, n))
    scores = 1 / (1 + np.exp(-logits)) if sigmoid else np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    indices = np.argsort(-(scores + rng.normal(0, 0.3, scores.shape)), -1)[:, :k]  # skewed, not exactly top-k
    return scores.astype(np.float32), indices.astype(np.int32)


def ms_balance(scores, indices, n, k, kind, g, sigmoid, pooled=None, pooled_tokens=None):
    return float(balance_loss(ms.Tensor(scores), ms.Tensor(indices), n, k, kind, g, sigmoid,
                              None if pooled is None else ms.Tensor(pooled, ms.float32),
                              None if pooled_tokens is None else ms.Tensor(pooled_tokens, ms.float32)).asnumpy())


@pytest.mark.parametrize("sigmoid", [True, False])
def test_micro_batch_and_ep_group_match_numpy(rng, sigmoid):
    n, k, t, g = 16, 4, 48, 4
    scores, indices = routing(rng, t, n, k, sigmoid)
    # micro_batch over g virtual ranks: each rank's own statistics, averaged
    want_micro = np.mean([np_balance(scores[r * 12:(r + 1) * 12], indices[r * 12:(r + 1) * 12], n, k, sigmoid)
                          for r in range(g)])
    assert ms_balance(scores, indices, n, k, "micro_batch", g, sigmoid) == pytest.approx(want_micro, rel=1e-5)
    # ep_group over g virtual ranks == micro_batch computed on the pooled g-rank batch (== NumPy on all tokens)
    pooled = np_balance(scores, indices, n, k, sigmoid)
    assert ms_balance(scores, indices, n, k, "ep_group", g, sigmoid) == pytest.approx(pooled, rel=1e-5)
    assert ms_balance(scores, indices, n, k, "micro_batch", 1, sigmoid) == pytest.approx(pooled, rel=1e-5)
    # ep_group with ep = 1 equals micro_batch
    assert ms_balance(scores, indices, n, k, "ep_group", 1, sigmoid) == \
        pytest.approx(ms_balance(scores, indices, n, k, "micro_batch", 1, sigmoid), rel=1e-6)
    assert abs(want_micro - pooled) > 1e-4  # the pooling level matters on skewed routing


@pytest.mark.parametrize("sigmoid", [True, False])
def test_ep_group_pools_each_group_of_ranks(rng, sigmoid):
    """A semi-auto parallel graph holds 4 DP ranks' tokens; EP groups of 2 ranks each pool their own statistics
    and the loss is the mean over the groups (not the pool of all 4 ranks)."""
    n, k, t = 16, 4, 48
    scores, indices = routing(rng, t, n, k, sigmoid)
    halves = [np_balance(scores[i:i + 24], indices[i:i + 24], n, k, sigmoid) for i in (0, 24)]
    got = float(balance_loss(ms.Tensor(scores), ms.Tensor(indices), n, k, "ep_group", 4, sigmoid,
                             ranks_per_group=2).asnumpy())
    assert got == pytest.approx(np.mean(halves), rel=1e-5)
    assert abs(got - np_balance(scores, indices, n, k, sigmoid)) > 1e-4  # the grouping matters here


def test_balance_gradients_match_numpy(rng):
    """d/dS of N/(K T) sum_i c_i mean_t S_it is N c_i / (K T^2) for softmax scores (counts carry no gradient)."""
    n, k, t = 8, 2, 20
    scores, indices = routing(rng, t, n, k, False)
    counts = np.bincount(indices.ravel(), minlength=n)
    want = np.broadcast_to(n * counts / (k * t * t), (t, n))
    for kind, g in (("ep_group", 4), ("micro_batch", 1), ("ep_group", 1)):
        grad = ms.grad(lambda s: balance_loss(s, ms.Tensor(indices), n, k, kind, g, False))(ms.Tensor(scores))
        np.testing.assert_allclose(grad.asnumpy(), want, rtol=1e-5, atol=1e-9)


def test_global_batch_matches_numpy(rng):
    n, k = 8, 2
    scores, indices = routing(rng, 40, n, k, True)
    counts = np.bincount(indices.ravel(), minlength=n).astype(np.float32)
    halves = [ms_balance(scores[i:i + 20], indices[i:i + 20], n, k, "global_batch", 1, True, counts, 40.0)
              for i in (0, 20)]
    assert np.mean(halves) == pytest.approx(np_balance(scores, indices, n, k, True), rel=1e-5)


def _accumulated(model, cfg, tokens, accum):
    """Total loss and summed gradients of one global batch split into ``accum`` micro-batches."""
    params = [p for p in model.get_parameters() if p.requires_grad]
    micro = MicroStep(LossNet(model, cfg), params)
    stats = RoutingStats(model, cfg.model.moe.num_experts)
    parts = np.split(tokens, accum)
    pooled = sum(stats(ms.Tensor(p)).asnumpy() for p in parts)
    total = 0.0
    for p in parts:
        loss, _ = micro(ms.Tensor(p), ms.Tensor(pooled), ms.Tensor(float(tokens.shape[0] * (tokens.shape[1] - 1)),
                                                                   ms.float32), ms.Tensor(1.0 / accum, ms.float32))
        total += float(loss.asnumpy())
    return total, {p.name: a.asnumpy().copy() for p, a in zip(params, micro.accum)}


def test_global_batch_is_invariant_to_accumulation_split(rng):
    cfg = mp.load_config(ULTRA_TINY, overrides=["model.num_layers=2", "model.hidden_size=64", "model.moe.balance_loss.type=global_batch",
                                                "model.moe.balance_loss.coeff=1.0"])
    model = mp.build_model(cfg.model, seed=4)
    tokens = rng.integers(0, cfg.model.vocab_size, (8, 17)).astype(np.int32)
    ref_loss, ref_grads = _accumulated(model, cfg, tokens, 1)
    for accum in (2, 4):
        loss, grads = _accumulated(model, cfg, tokens, accum)
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        for name, g in grads.items():
            np.testing.assert_allclose(g, ref_grads[name], rtol=2e-4, atol=1e-6, err_msg=name)
    # the router gradient carries the balance term: without it the gradients differ
    cfg.model.moe.balance_loss.type = "none"
    _, plain = _accumulated(model, cfg, tokens, 1)
    router = "model.layers.1.mlp.gate.weight"
    assert np.abs(plain[router] - ref_grads[router]).max() > 1e-6


def test_cross_entropy_matches_numpy(rng):
    logits = rng.normal(size=(2, 5, 11)).astype(np.float32)
    labels = rng.integers(0, 11, (2, 5)).astype(np.int32)
    lse = np.log(np.exp(logits).sum(-1))
    want = (lse - np.take_along_axis(logits, labels[..., None], -1)[..., 0]).mean()
    assert float(cross_entropy(ms.Tensor(logits), ms.Tensor(labels)).asnumpy()) == pytest.approx(want, rel=1e-5)


def test_z_loss_matches_numpy(rng):
    from mindpangu.train.losses import z_loss

    logits = rng.normal(0, 3, (13, 8)).astype(np.float32)
    want = (np.log(np.exp(logits.astype(np.float64)).sum(-1)) ** 2).mean()
    assert float(z_loss(ms.Tensor(logits)).asnumpy()) == pytest.approx(want, rel=1e-5)


def test_expert_bias_update_rule(rng):
    """Aux-loss-free control: b_i += rate * sign(mean load - load_i) after each applied step, not after a skip."""
    from mindpangu.train.optim import AdamW
    from mindpangu.train.step import UpdateStep

    w = ms.Parameter(ms.Tensor(np.ones((2, 2), np.float32)), name="w")
    bias = ms.Parameter(ms.Tensor(np.zeros(4, np.float32)), name="gate.e_score_correction_bias", requires_grad=False)
    accum = ms.ParameterTuple([w]).clone(prefix="accum", init="zeros")
    upd = UpdateStep(accum, AdamW([w]), 1.0, [bias], 0.01)
    counts = np.array([[5.0, 1.0, 3.0, 3.0]], np.float32)  # mean 3
    upd(ms.Tensor(0.1, ms.float32), ms.Tensor(1.0, ms.float32), ms.Tensor(counts))
    np.testing.assert_allclose(bias.asnumpy(), [-0.01, 0.01, 0.0, 0.0], atol=1e-7)
    accum[0].set_data(ms.Tensor(np.full((2, 2), np.nan, np.float32)))
    upd(ms.Tensor(0.1, ms.float32), ms.Tensor(1.0, ms.float32), ms.Tensor(counts))  # non-finite: skipped
    np.testing.assert_allclose(bias.asnumpy(), [-0.01, 0.01, 0.0, 0.0], atol=1e-7)


class _PooledLoss(ms.nn.Cell):
    """The reference: every MoE layer's router outputs from ``forward_train``, their balance and z terms pooled
    at the end of the graph (what ``LossNet`` computed before its terms moved to the layers' stages)."""

    def __init__(self, model, cfg):
        super().__init__(auto_prefix=False)
        from mindpangu.train.losses import RouteLosses

        self.model, self.route_losses = model, RouteLosses(cfg)
        b = cfg.model.moe.balance_loss
        self.coeff, self.z_coeff, self.mtp_weight = b.coeff, b.z_loss_coeff, cfg.model.mtp_loss_weight

    def construct(self, tokens, pooled_counts, pooled_tokens):
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        logits, mtp_logits, routes = self.model.forward_train(inputs)
        s = inputs.shape[1]
        mtp = sum(cross_entropy(head[:, : s - d - 1], labels[:, d + 1:]) for d, head in enumerate(mtp_logits))
        bal, zl = 0.0, 0.0
        for i, route in enumerate(routes):
            b, z = self.route_losses(route, pooled_counts[i], pooled_tokens)
            bal, zl = bal + b, zl + z
        return (cross_entropy(logits, labels) + self.mtp_weight * mtp / len(mtp_logits) + self.coeff * bal
                + self.z_coeff * zl)


@pytest.mark.parametrize("kind", ["micro_batch", "ep_group", "global_batch"])
def test_per_layer_terms_equal_pooled_loss(rng, kind):
    """LossNet adds each MoE layer's balance and z terms where the layer runs (on its pipeline stage): loss value,
    balance value and every gradient equal the pooled reference, for each balance-loss type (2 virtual EP ranks,
    z-loss on, an MoE MTP layer)."""
    cfg = mp.load_config(ULTRA_TINY, overrides=["model.num_layers=3", "model.hidden_size=64",
                                                f"model.moe.balance_loss.type={kind}", "model.moe.balance_loss.coeff=0.5",
                                                "model.moe.balance_loss.z_loss_coeff=0.01",
                                                "parallel_config.expert_parallel=2", "model.moe.dispatch_backend=reference"])
    model = mp.build_model(cfg.model, seed=5)
    tokens = ms.Tensor(rng.integers(0, cfg.model.vocab_size, (4, 17)).astype(np.int32))
    pooled = ms.Tensor(RoutingStats(model, cfg.model.moe.num_experts)(tokens).asnumpy() * 2)  # as if 2 micro-batches
    pooled_tokens = ms.Tensor(2.0 * 4 * 16, ms.float32)
    params = [p for p in model.get_parameters() if p.requires_grad]
    net = LossNet(model, cfg)
    (loss, aux), grads = ms.value_and_grad(net, None, params, has_aux=True)(tokens, pooled, pooled_tokens,
                                                                            ms.Tensor(1.0, ms.float32))
    ref = _PooledLoss(model, cfg)
    ref_loss, ref_grads = ms.value_and_grad(ref, None, params)(tokens, pooled, pooled_tokens)
    assert float(loss.asnumpy()) == pytest.approx(float(ref_loss.asnumpy()), rel=1e-5)
    routes = model.forward_train(tokens[:, :-1])[2]
    from mindpangu.train.losses import RouteLosses

    want_bal = np.mean([float(RouteLosses(cfg)(r, pooled[i], pooled_tokens)[0].asnumpy()) for i, r in enumerate(routes)])
    assert float(aux[2].asnumpy()) == pytest.approx(want_bal, rel=1e-5)  # the mean balance term LossNet reports
    assert want_bal > 0
    for p, g, want in zip(params, grads, ref_grads):
        np.testing.assert_allclose(g.asnumpy(), want.asnumpy(), rtol=1e-4, atol=1e-7, err_msg=p.name)
    router = "model.layers.2.mlp.gate.weight"
    assert np.abs(dict(zip([p.name for p in params], grads))[router].asnumpy()).max() > 0
