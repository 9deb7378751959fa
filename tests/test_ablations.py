"""mindpangu-ablate: each metric against a hand-computed value on a small hand-made input, the capacity-factor
dispatch and the per-group MoGE balance loss against NumPy references written from their definitions, the
verdict rule, and the suite files (every bundled suite loads; bad ones fail naming the key). The suites
themselves run at --scale smoke in tests_ablations/."""
import math
import os

import numpy as np
import pytest
import mindspore as ms

from mindpangu.ablate.report import arm_table, results_table, verdict
from mindpangu.ablate.suite import SuiteError, available_suites, load_suite
from mindpangu.config import MoEConfig
from mindpangu.metrics import drop_rate, kl_from_uniform, lr_sensitivity, max_violation, spike_score
from mindpangu.moe import MoELayer
from mindpangu.train.losses import balance_loss
import numpy_reference as ref


# ---- metrics -------------------------------------------------------------------------------------------------

def test_spike_score_by_hand():
    values = [1, 2] * 5 + [20] + [1, 2] * 4 + [1]  # 20 values; index 10 is the spike
    # judged: indices 2..17 (10 %-90 %), each against the previous 4 values; only index 10 is >= 7 sigma away
    assert spike_score(values, sigma=7, window=4) == pytest.approx(1 / 16)
    assert spike_score([1.0] * 20, window=4) == 0.0  # equal to a zero-variance mean: not a spike
    with_nan = [1, 2] * 5 + [float("nan")] + [1, 2] * 4 + [1]
    assert spike_score(with_nan, sigma=7, window=4) == pytest.approx(1 / 16)


def test_lr_sensitivity_by_hand():
    # clipped at the init loss 5: [3, 2.5, 2, 5 (diverged), 5] -> mean 3.5, best 2 -> 1.5
    assert lr_sensitivity([3.0, 2.5, 2.0, float("nan"), 6.0], 5.0) == pytest.approx(1.5)
    assert lr_sensitivity([2.0, 2.0], 5.0) == 0.0


def test_max_violation_kl_and_drop_rate_by_hand():
    np.testing.assert_allclose(max_violation([[10, 10, 10, 10], [40, 0, 0, 0], [0, 0, 0, 0]]), [0.0, 3.0, 0.0])
    np.testing.assert_allclose(kl_from_uniform([[1, 1, 1, 1], [4, 0, 0, 0], [2, 2, 0, 0]]),
                               [0.0, math.log(4), math.log(2)])
    # 8 tokens x top-2 = 16 pairs; capacity 5 drops 10 - 5 = 5 of expert 0's pairs
    assert drop_rate([[10, 2, 2, 2]], 8, 2, 5)[0] == pytest.approx(5 / 16)


# ---- capacity factor ---------------------------------------------------------------------------------------------

def _numpy_capacity(weights, indices, num_experts, capacity):
    """Megatron's drop-and-pad, probs policy, written out: each expert keeps its `capacity` largest weights."""
    keep = np.zeros(indices.shape)
    for e in range(num_experts):
        pairs = sorted(((weights[t, k], t, k) for t in range(indices.shape[0]) for k in range(indices.shape[1])
                        if indices[t, k] == e), reverse=True)
        for _, t, k in pairs[:capacity]:
            keep[t, k] = 1
    return keep


@pytest.mark.parametrize("backend", ["reference", "cpu_kernel"])
@pytest.mark.parametrize("factor", [1.0, 1.25, 2.0])
def test_capacity_factor_drops_like_numpy(rng, backend, factor):
    e, k, h, t = 8, 2, 12, 48
    cfg = MoEConfig(num_experts=e, num_experts_per_tok=k, intermediate_size=10, num_shared_experts=0,
                    routed_scaling_factor=2.5, capacity_factor=factor, dispatch_backend=backend)
    layer = MoELayer(h, cfg)
    gate = rng.normal(0, 1, (e, h))
    gate[0] += 2.0  # skew the router so that expert 0 overflows
    layer.gate.weight.set_data(ms.Tensor(gate.astype(np.float32)))
    w = {"m.gate.weight": gate}
    for name in ("gate_proj", "up_proj", "down_proj"):
        p = getattr(layer.experts, name)
        p.set_data(ms.Tensor(rng.normal(0, 0.3, p.shape).astype(np.float32)))
        for j in range(e):
            w[f"m.experts.{j}.{name}.weight"] = p.asnumpy()[j].astype(np.float64)
    x = np.abs(rng.normal(size=(1, t, h))).astype(np.float32)
    y, (weights, indices, _, _, counts) = layer(ms.Tensor(x))
    routes = ref.route_topk(x[0].astype(np.float64) @ gate.T, k, True, 2.5)
    want_idx = np.array([[int(i) for i, _ in r] for r in routes])
    want_w = np.array([[wt for _, wt in r] for r in routes])
    capacity = math.ceil(t * k * factor / e)
    keep = _numpy_capacity(want_w, want_idx, e, capacity)
    indices, weights = indices.asnumpy(), weights.asnumpy()
    order = np.argsort(indices, 1)
    np.testing.assert_array_equal(np.take_along_axis(indices, order, 1), np.sort(want_idx, 1))
    got_keep = np.take_along_axis(weights, order, 1) != 0
    want_order = np.argsort(want_idx, 1)
    np.testing.assert_array_equal(got_keep, np.take_along_axis(keep, want_order, 1) == 1)
    assert (keep == 0).sum() == pytest.approx(drop_rate(counts.asnumpy()[None], t, k, capacity)[0] * t * k)
    if factor == 1.0:
        assert (keep == 0).sum() > 0  # the skewed router does overflow expert 0
    y_ref = np.zeros((t, h))
    for tok in range(t):
        for j in range(k):
            if keep[tok, j]:
                y_ref[tok] += want_w[tok, j] * ref.swiglu(w, f"m.experts.{want_idx[tok, j]}",
                                                          x[0, tok:tok + 1].astype(np.float64))[0]
    np.testing.assert_allclose(y.asnumpy()[0], y_ref, atol=2e-5, rtol=1e-4)


# ---- MoGE balance loss per group -----------------------------------------------------------------------------------

def test_moge_group_balance_loss_matches_numpy(rng):
    t, e, groups, k = 32, 16, 4, 4
    logits = rng.normal(size=(t, e))
    scores = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    size = e // groups
    indices = np.stack([[g * size + int(np.argmax(scores[i, g * size:(g + 1) * size])) for g in range(groups)]
                        for i in range(t)]).astype(np.int32)
    # per group g: (E/M experts, K/M picks per token) Switch loss N_g * sum_{i in g} f_i * P_i, averaged over groups
    want = 0.0
    for g in range(groups):
        local = scores[:, g * size:(g + 1) * size]
        local = local / local.sum(-1, keepdims=True)
        f = np.array([(indices == g * size + j).sum() / ((k // groups) * t) for j in range(size)])
        want += size * (f * local.mean(0)).sum() / groups
    got = balance_loss(ms.Tensor(scores.astype(np.float32)), ms.Tensor(indices), e, k, "micro_batch", 1, False,
                       prob_groups=groups)
    assert float(got.asnumpy()) == pytest.approx(want, rel=1e-5)
    glob = balance_loss(ms.Tensor(scores.astype(np.float32)), ms.Tensor(indices), e, k, "micro_batch", 1, False)
    f = np.bincount(indices.ravel(), minlength=e) / (k * t)
    assert float(glob.asnumpy()) == pytest.approx(e * (f * scores.mean(0)).sum(), rel=1e-5)


# ---- verdicts, tables, suites ----------------------------------------------------------------------------------

def test_verdict_rule():
    assert verdict([-1.0, -1.1, -0.9], "lower")[0] == "agrees"
    assert verdict([1.0, 1.1, 0.9], "lower")[0] == "disagrees"
    assert verdict([1.0, 1.1, 0.9], "positive")[0] == "agrees"
    assert verdict([-1.0, 1.0], "lower")[0] == "inconclusive"
    assert verdict([0.0, 0.0], "lower") == ("inconclusive", "no difference at this scale")
    assert verdict([-1.0], "lower")[0] == "inconclusive"
    # two standard errors would call this; Student's t at n = 2 (12.7 standard errors) does not
    assert verdict([-1.0, -0.5], "lower")[0] == "inconclusive"
    assert verdict([-0.5, -0.5, -0.5], "lower")[0] == "agrees"  # the same nonzero effect every time
    assert verdict([float("nan")], "lower")[0] == "inconclusive"


def test_arm_table_lr_sensitivity_and_columns():
    suite = load_suite("stability", "smoke")
    results = []
    for arm in suite.arms:
        for lr, loss in zip(suite.learning_rates, (3.0, 7.0)):
            results.append({"run": f"{arm}/{lr}", "arm": arm, "lr": lr, "seed_index": 0, "seed": 1, "heldout_loss": loss,
                            "initial_loss": 5.0, "diverged": int(loss > 5), "train_wall_s": 1.0})
    rows = arm_table(suite, results)
    assert len(rows) == len(suite.arms)
    # [3, min(7, 5)] -> mean 4 - best 3 = 1
    assert all(r["lr_sensitivity"] == pytest.approx(1.0) and r["divergences"] == 1 for r in rows)
    cols, _ = results_table(results)
    assert cols[:5] == ["run", "arm", "lr", "seed_index", "seed"] and cols[-1] == "train_wall_s"


def test_every_bundled_suite_loads_at_every_scale():
    assert set(available_suites()) >= {"stability", "balance", "moge", "granularity", "dropless", "mtp"}
    from mindpangu.ablate.runner import run_spec
    from mindpangu.config import load_config

    for name in available_suites():
        for scale in ("smoke", "default", "full"):
            suite = load_suite(name, scale)
            assert suite.runs and suite.claims
            spec = run_spec(suite, suite.runs[-1], "/tmp/x", "/tmp/data")
            load_config(spec["base"], spec["overrides"])  # every run's config is valid


def _suite_file(tmp_path, text):
    path = tmp_path / "mysuite.yaml"
    base = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "yaml_configs",
                        "pangu_ultra_moe", "tiny.yaml")
    path.write_text(f"suite: mysuite\nbase: {base}\ndata: shakespeare\n" + text)
    return str(path)


@pytest.mark.parametrize("text,key", [
    ("arms: {a: {}}\nbogus: 1\n", "bogus"),
    ("arms: {}\n", "arms"),
    ("arms: {a: {}}\nlearning_rates: [-1]\n", "learning_rates"),
    ("arms: {a: {}}\nseeds: 0\n", "seeds"),
    ("arms: {a: {}}\nanalysis: [nope]\n", "analysis"),
    ("arms: {a: {}}\nclaims: [{id: X, source: s, paper: p, metric: m, baseline: a, treatment: b, expect: lower}]\n",
     "claims[0].treatment"),
    ("arms: {a: {}}\nclaims: [{id: X, source: s, paper: p, metric: m, arm: a, expect: sideways}]\n",
     "claims[0].expect"),
    ("arms: {a: {}}\nscales: {huge: {}}\n", "scales.huge"),
])
def test_bad_suite_files_name_the_key(tmp_path, text, key):
    with pytest.raises(SuiteError, match=f"{key.replace('[', '.').replace(']', '.')}"):
        load_suite(_suite_file(tmp_path, text))
