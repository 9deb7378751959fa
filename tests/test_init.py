"""DSSN gamma and TinyInit / baseline std, checked against the paper formulas (arXiv 2504.07866)."""
import math

import numpy as np
import pytest

import mindpangu as mp
from conftest import ULTRA_TINY

# Paper formulas, written out here independently of mindpangu.models.init.
def expected_std(kind, d, layers, method):
    if method == "tinyinit":
        return 0.5 if kind == "embedding" else math.sqrt(1 / (2 * d * layers))
    base = math.sqrt(2 / (5 * d))
    return base / math.sqrt(layers) if kind == "residual_out" else base


def kind_of(name):
    if name.endswith("embed_tokens.weight"):
        return "embedding"
    if "norm" in name:
        return "norm"
    if name.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj")):
        return "residual_out"
    return "matrix"


@pytest.mark.parametrize("method", ["tinyinit", "baseline"])
def test_weight_std_matches_formula(method):
    cfg = mp.load_config(ULTRA_TINY, overrides=[f"model.init_method={method}", "model.hidden_size=192"]).model
    model = mp.build_model(cfg, seed=3)
    d, layers = cfg.hidden_size, cfg.num_layers
    pooled = {}
    for p in model.get_parameters():
        kind = kind_of(p.name)
        if kind != "norm":
            pooled.setdefault(kind, []).append(p.asnumpy().ravel())
    assert set(pooled) == {"embedding", "matrix", "residual_out"}
    for kind, chunks in pooled.items():
        x = np.concatenate(chunks)
        want = expected_std(kind, d, layers, method)
        # std of a sample std is about sigma / sqrt(2n); allow 5 of those plus the mean check
        assert abs(x.std() - want) < 5 * want / math.sqrt(2 * x.size), (kind, x.std(), want)
        assert abs(x.mean()) < 5 * want / math.sqrt(x.size)


def test_dssn_post_norm_gamma_is_c_over_sqrt_depth():
    cfg = mp.load_config(ULTRA_TINY, overrides=["model.num_layers=9", "model.dssn_c_attn=0.283",
                                                 "model.dssn_c_mlp=0.432"]).model
    params = {p.name: p.asnumpy() for p in mp.build_model(cfg).get_parameters()}
    for i in range(9):
        np.testing.assert_allclose(params[f"model.layers.{i}.post_attention_layernorm.weight"], 0.283 / 3, rtol=1e-6)
        np.testing.assert_allclose(params[f"model.layers.{i}.post_mlp_layernorm.weight"], 0.432 / 3, rtol=1e-6)
        np.testing.assert_array_equal(params[f"model.layers.{i}.input_layernorm.weight"], 1.0)
        np.testing.assert_array_equal(params[f"model.layers.{i}.pre_mlp_layernorm.weight"], 1.0)


def test_plain_sandwich_post_norm_gamma_is_one():
    cfg = mp.load_config(ULTRA_TINY, overrides=["model.norm_layout=sandwich"]).model
    params = {p.name: p.asnumpy() for p in mp.build_model(cfg).get_parameters()}
    np.testing.assert_array_equal(params["model.layers.1.post_mlp_layernorm.weight"], 1.0)


def test_init_is_reproducible_from_seed():
    cfg = mp.load_config(ULTRA_TINY).model
    a = mp.build_model(cfg, seed=5).model.layers[1].mlp.experts.gate_proj.asnumpy()
    b = mp.build_model(cfg, seed=5).model.layers[1].mlp.experts.gate_proj.asnumpy()
    c = mp.build_model(cfg, seed=6).model.layers[1].mlp.experts.gate_proj.asnumpy()
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
