"""Pangu Pro MoE: MoGE routing, the HF layout against NumPy, the published counts, the imbalance score."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import mindspore as ms
from safetensors.numpy import save_file

import mindpangu as mp
from mindpangu.config import MoEConfig
from mindpangu.convert.hf import save_hf_directory
from mindpangu.metrics import device_loads, expert_load_stats, imbalance_monte_carlo, imbalance_score
from mindpangu.moe import Router
from conftest import ROOT
import numpy_reference as ref

PRO_TINY = os.path.join(ROOT, "yaml_configs", "pangu_pro_moe", "tiny.yaml")
PRO_72B = os.path.join(ROOT, "yaml_configs", "pangu_pro_moe", "72b.yaml")


@pytest.mark.parametrize("experts,groups,k_local", [(64, 8, 1), (16, 4, 1), (12, 3, 2), (32, 4, 3), (8, 2, 4)])
def test_moge_router_matches_numpy(rng, experts, groups, k_local):
    cfg = MoEConfig(num_experts=experts, num_experts_per_tok=groups * k_local, router="moge", num_groups=groups,
                    score_function="softmax", norm_topk_prob=False, routed_scaling_factor=1.0)
    router = Router(24, cfg)
    router.weight.set_data(ms.Tensor(rng.normal(0, 1, (experts, 24)).astype(np.float32)))
    x = rng.normal(size=(29, 24)).astype(np.float32)
    weights, indices, scores, _, counts = (t.asnumpy() for t in router(ms.Tensor(x)))
    logits = x.astype(np.float64) @ router.weight.asnumpy().T.astype(np.float64)
    np.testing.assert_allclose(scores, ref.softmax(logits), atol=1e-6)  # the global softmax is exposed
    routes = ref.route_moge(logits, groups, k_local, np.ones(experts))
    per_group = experts // groups
    for t, chosen in enumerate(routes):
        want = dict(chosen)
        assert set(indices[t]) == set(want)
        for e, w in zip(indices[t], weights[t]):
            assert abs(w - want[e]) < 1e-6
        # exactly K' experts in every group, all distinct
        np.testing.assert_array_equal(np.bincount(indices[t] // per_group, minlength=groups), k_local)
    np.testing.assert_array_equal(counts, np.bincount(indices.ravel(), minlength=experts))
    assert (weights.sum(1) < 1.0 + 1e-6).all()  # no renormalisation: global-softmax probabilities


D = dict(V=80, H=40, L=2, heads=4, kv_heads=2, head_dim=10, E=8, K=4, Ie=12, shared=24)


def pro_weights(d, rng):
    def mat(out, inp):
        return rng.normal(0, inp ** -0.5, (out, inp))

    w = {"model.embed_tokens.weight": rng.normal(0, 1, (d["V"], d["H"])),
         "model.norm.weight": 1 + 0.2 * rng.normal(size=d["H"]), "lm_head.weight": mat(d["V"], d["H"])}
    q, kv = d["heads"] * d["head_dim"], d["kv_heads"] * d["head_dim"]
    for i in range(d["L"]):
        p = f"model.layers.{i}"
        for name, out, inp in (("q_proj", q, d["H"]), ("k_proj", kv, d["H"]), ("v_proj", kv, d["H"]),
                               ("o_proj", d["H"], q)):
            w[f"{p}.self_attn.{name}.weight"] = mat(out, inp)
            w[f"{p}.self_attn.{name}.bias"] = 0.3 * rng.normal(size=out)
        w[f"{p}.input_layernorm.weight"] = 1 + 0.2 * rng.normal(size=d["H"])
        w[f"{p}.post_attention_layernorm.weight"] = 1 + 0.2 * rng.normal(size=d["H"])
        w[f"{p}.mlp.gate.weight"] = mat(d["E"], d["H"]) * 3
        w[f"{p}.mlp.router_scale"] = rng.uniform(0.5, 1.5, (1, d["E"]))
        for e in range(d["E"]):
            w.update({f"{p}.mlp.experts.{e}.gate_proj.weight": mat(d["Ie"], d["H"]),
                      f"{p}.mlp.experts.{e}.up_proj.weight": mat(d["Ie"], d["H"]),
                      f"{p}.mlp.experts.{e}.down_proj.weight": mat(d["H"], d["Ie"])})
        w.update({f"{p}.mlp.shared_expert.gate_proj.weight": mat(d["shared"], d["H"]),
                  f"{p}.mlp.shared_expert.up_proj.weight": mat(d["shared"], d["H"]),
                  f"{p}.mlp.shared_expert.down_proj.weight": mat(d["H"], d["shared"])})
    return {k: np.asarray(v, np.float32) for k, v in w.items()}


def test_pro_checkpoint_matches_numpy(tmp_path):
    w = pro_weights(D, np.random.default_rng(5))
    save_file(w, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["PanguProMoEForCausalLM"], "model_type": "PanGuMoE", "vocab_size": D["V"],
        "hidden_size": D["H"], "num_hidden_layers": D["L"], "num_attention_heads": D["heads"],
        "num_key_value_heads": D["kv_heads"], "head_dim": D["head_dim"], "moe_intermediate_size": D["Ie"],
        "shared_expert_intermediate_size": D["shared"], "num_experts": D["E"], "num_experts_per_tok": D["K"],
        "rms_norm_eps": 1e-5, "rope_theta": 16000000.0, "max_position_embeddings": 64, "hidden_act": "silu",
        "router_aux_loss_coef": 0.001, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}))
    model = mp.from_pretrained(str(tmp_path))
    m = model.config.moe
    assert (model.config.type, m.router, m.num_groups, m.score_function, m.norm_topk_prob) == \
        ("pangu_pro_moe", "moge", 4, "softmax", False)
    ids = np.random.default_rng(6).integers(0, D["V"], (2, 9))
    c = dict(attention="gqa", layout="pre_ln", layers=D["L"], heads=D["heads"], kv_heads=D["kv_heads"],
             head_dim=D["head_dim"], eps=1e-5, theta=16000000.0, moge=True, groups=D["K"], k=D["K"],
             shared_name="shared_expert")
    expected = ref.causal_lm(w, c, ids)
    assert expected.std() > 0.5
    np.testing.assert_allclose(model(ms.Tensor(ids, ms.int32)).asnumpy(), expected, atol=1e-4, rtol=0)


def test_72b_counts_match_the_paper():
    counts = mp.count_parameters(mp.load_config(PRO_72B).model)
    assert f"{counts['total'] / 1e9:.2f}" == "71.99"  # arXiv 2505.21411 Table 1
    assert f"{counts['active'] / 1e9:.2f}" == "16.50"


@pytest.mark.parametrize("overrides", [[], ["model.num_key_value_heads=4"], ["model.moe.num_shared_experts=0"],
                                       ["model.attention_bias=false", "model.num_mtp_layers=1"]])
def test_tiny_count_equals_built_model(overrides):
    cfg = mp.load_config(PRO_TINY, overrides=overrides).model
    built = sum(int(np.prod(p.shape)) for p in mp.build_model(cfg, init=False).get_parameters())
    assert mp.count_parameters(cfg)["all"] == built


def test_pro_round_trip_and_graph_mode(tmp_path):
    cfg = mp.load_config(PRO_TINY, overrides=["model.num_layers=2"]).model
    model = mp.build_model(cfg, seed=2)
    save_hf_directory(model, cfg, str(tmp_path / "hf"))
    ids = ms.Tensor(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 16)), ms.int32)
    eager = model(ids).asnumpy()
    np.testing.assert_allclose(mp.from_pretrained(str(tmp_path / "hf"))(ids).asnumpy(), eager, atol=1e-6)
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        np.testing.assert_allclose(model(ids).asnumpy(), eager, atol=1e-5, rtol=1e-5)
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)


def test_imbalance_score_by_hand():
    # 3 tokens, 8 experts on 4 devices (experts 0-1 on device 0, 2-3 on 1, ...)
    idx = np.array([[0, 1], [2, 7], [1, 6]])
    np.testing.assert_array_equal(device_loads(idx, 8, 4), [3, 1, 0, 2])
    assert imbalance_score(idx, 8, 4) == pytest.approx((3 - 0) / 3)
    stats = expert_load_stats(np.array([4, 0, 2, 2]))
    assert stats["max_over_mean"] == pytest.approx(2.0)
    assert stats["cv"] == pytest.approx(np.std([4, 0, 2, 2]) / 2)
    assert stats["entropy"] == pytest.approx(-(0.5 * np.log(0.5) + 2 * 0.25 * np.log(0.25)) / np.log(4))
    assert expert_load_stats(np.ones(16))["entropy"] == pytest.approx(1.0)


def test_monte_carlo_reproduces_the_paper():
    topk = imbalance_monte_carlo(6000, tokens=16, num_experts=64, k=8, groups=8, moge=False, seed=1)
    moge = imbalance_monte_carlo(6000, tokens=16, num_experts=64, k=8, groups=8, moge=True, seed=2)
    assert abs(topk.mean() - 0.669) < 0.02 and (topk > 0).mean() > 0.99  # Pro MoE Fig. 2b: P(IS>0) ~ 1
    assert moge.max() == 0.0


def test_imbalance_tool_writes_png(tmp_path):
    png = tmp_path / "is.png"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "imbalance_mc.py"), "--trials", "500",
                           "--png", str(png)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "MoGE   mean IS 0.0000" in proc.stdout and png.stat().st_size > 1000


def test_imbalance_from_counts_matches_indices(rng):
    from mindpangu.metrics import imbalance_from_counts

    idx = np.stack([rng.choice(16, 4, replace=False) for _ in range(10)])
    counts = np.bincount(idx.ravel(), minlength=16)
    assert imbalance_from_counts(counts, 10, 4) == pytest.approx(imbalance_score(idx, 16, 4))
