"""Pangu Ultra MoE against the independent NumPy reference: openPangu checkpoints, sandwich/DSSN layers, MTP."""
import json

import numpy as np
import pytest
import mindspore as ms
from safetensors.numpy import save_file

import mindpangu as mp
from mindpangu.convert.hf import internal_to_hf
from conftest import ULTRA_TINY
import numpy_reference as ref

DIMS = dict(V=96, H=48, L=3, dense=1, I=80, heads=3, q_rank=24, kv_rank=16, nope=8, rope=8, v=12, E=6, K=2, Ie=20)


def openpangu_weights(d, rng, mtp=1):
    """Random weights in the openPangu Ultra MoE HF layout (sandwich norms, per-expert tensors, MTP at layer L)."""
    w = {"model.embed_tokens.weight": rng.normal(0, 1, (d["V"], d["H"])),
         "model.norm.weight": 1 + 0.2 * rng.normal(size=d["H"]),
         "lm_head.weight": rng.normal(0, d["H"] ** -0.5, (d["V"], d["H"]))}

    def mat(out, inp):
        return rng.normal(0, inp ** -0.5, (out, inp))

    for i in range(d["L"] + mtp):
        p = f"model.layers.{i}"
        a = f"{p}.self_attn"
        w.update({f"{a}.q_a_proj.weight": mat(d["q_rank"], d["H"]), f"{a}.q_a_layernorm.weight": 1 + 0.2 * rng.normal(size=d["q_rank"]),
                  f"{a}.q_b_proj.weight": mat(d["heads"] * (d["nope"] + d["rope"]), d["q_rank"]),
                  f"{a}.kv_a_proj_with_mqa.weight": mat(d["kv_rank"] + d["rope"], d["H"]),
                  f"{a}.kv_a_layernorm.weight": 1 + 0.2 * rng.normal(size=d["kv_rank"]),
                  f"{a}.kv_b_proj.weight": mat(d["heads"] * (d["nope"] + d["v"]), d["kv_rank"]),
                  f"{a}.o_proj.weight": mat(d["H"], d["heads"] * d["v"])})
        for norm in ("input_layernorm", "post_attention_layernorm", "pre_mlp_layernorm", "post_mlp_layernorm"):
            w[f"{p}.{norm}.weight"] = 1 + 0.2 * rng.normal(size=d["H"])
        if i < d["dense"]:
            w.update({f"{p}.mlp.gate_proj.weight": mat(d["I"], d["H"]), f"{p}.mlp.up_proj.weight": mat(d["I"], d["H"]),
                      f"{p}.mlp.down_proj.weight": mat(d["H"], d["I"])})
        else:
            w[f"{p}.mlp.gate.weight"] = mat(d["E"], d["H"])
            for e in [*range(d["E"]), "shared"]:
                q = f"{p}.mlp.shared_experts" if e == "shared" else f"{p}.mlp.experts.{e}"
                w.update({f"{q}.gate_proj.weight": mat(d["Ie"], d["H"]), f"{q}.up_proj.weight": mat(d["Ie"], d["H"]),
                          f"{q}.down_proj.weight": mat(d["H"], d["Ie"])})
        if i >= d["L"]:
            w.update({f"{p}.enorm.weight": 1 + 0.2 * rng.normal(size=d["H"]), f"{p}.hnorm.weight": 1 + 0.2 * rng.normal(size=d["H"]),
                      f"{p}.eh_proj.weight": mat(d["H"], 2 * d["H"]),
                      f"{p}.shared_head.norm.weight": 1 + 0.2 * rng.normal(size=d["H"]),
                      f"{p}.embed_tokens.weight": w["model.embed_tokens.weight"], f"{p}.shared_head.head.weight": w["lm_head.weight"]})
    return {k: np.asarray(v, np.float32) for k, v in w.items()}


def openpangu_config(d, interleave):
    return {"architectures": ["PanguUltraMoEForCausalLM"], "model_type": "pangu_ultra_moe", "vocab_size": d["V"],
            "hidden_size": d["H"], "intermediate_size": d["I"], "moe_intermediate_size": d["Ie"],
            "num_hidden_layers": d["L"], "num_mtp_layers": 1, "num_attention_heads": d["heads"],
            "num_key_value_heads": d["heads"], "num_shared_experts": 1, "num_routed_experts": d["E"],
            "num_experts_per_tok": d["K"], "routed_scaling_factor": 2.5, "attention_kv_lora_dim": d["kv_rank"],
            "attention_q_lora_dim": d["q_rank"], "attention_qk_rope_dim": d["rope"], "attention_qk_dim": d["nope"],
            "attention_v_dim": d["v"], "num_dense_layers": d["dense"], "norm_topk_prob": True, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "max_position_embeddings": 64, "tie_word_embeddings": False,
            "sandwich_norm": True, "rope_interleave": interleave, "torch_dtype": "bfloat16"}


def ref_cfg(d, interleave, layout="sandwich"):
    return dict(attention="mla", layout=layout, layers=d["L"], heads=d["heads"], nope=d["nope"], rope=d["rope"],
                v=d["v"], kv_rank=d["kv_rank"], eps=1e-5, theta=10000.0, interleave=interleave, k=d["K"],
                norm_topk=True, scale=2.5)


@pytest.mark.parametrize("interleave", [True, False])
def test_openpangu_checkpoint_matches_numpy(tmp_path, interleave):
    w = openpangu_weights(DIMS, np.random.default_rng(3))
    save_file(w, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(openpangu_config(DIMS, interleave)))
    model = mp.from_pretrained(str(tmp_path))
    cfg = model.config
    assert (cfg.norm_layout, cfg.num_mtp_layers, cfg.first_k_dense_replace, cfg.moe.num_experts) == ("sandwich", 1, 1, 6)
    ids = np.random.default_rng(4).integers(0, DIMS["V"], (2, 10))
    logits, mtp, routes = model.forward_train(ms.Tensor(ids, ms.int32))
    expected = ref.causal_lm(w, ref_cfg(DIMS, interleave), ids)
    assert expected.std() > 0.5
    np.testing.assert_allclose(logits.asnumpy(), expected, atol=1e-4, rtol=0)
    # MTP depth 1: position i predicts t_{i+2}; the last position has no t_{i+1} and is not compared.
    np.testing.assert_allclose(mtp[0].asnumpy()[:, :-1], ref.mtp_logits(w, ref_cfg(DIMS, interleave), ids),
                               atol=1e-4, rtol=0)
    assert len(routes) == DIMS["L"] - DIMS["dense"] + 1  # MoE layers + the MTP layer


def test_dssn_layer_matches_numpy(rng):
    """One MoE layer of a DSSN + TinyInit model, as built (depth-scaled post-norm gamma), against NumPy."""
    cfg = mp.load_config(ULTRA_TINY).model
    model = mp.build_model(cfg, seed=7)
    layer = model.model.layers[2]
    h = rng.normal(size=(1, 12, cfg.hidden_size)).astype(np.float32)
    got, _ = layer(ms.Tensor(h))
    w = internal_to_hf({p.name: p.asnumpy() for p in model.get_parameters()}, cfg)
    w = {k: v.astype(np.float64) for k, v in w.items()}
    c = dict(attention="mla", layout="sandwich", heads=cfg.num_attention_heads, nope=cfg.qk_nope_head_dim,
             rope=cfg.qk_rope_head_dim, v=cfg.v_head_dim, kv_rank=cfg.kv_lora_rank, eps=cfg.rms_norm_eps,
             theta=cfg.rope_theta, interleave=cfg.rope_interleave, k=cfg.moe.num_experts_per_tok, norm_topk=True,
             scale=cfg.moe.routed_scaling_factor)
    expected = ref.decoder_layer(w, 2, c, h[0].astype(np.float64))
    assert np.abs(expected - h[0]).max() > 1e-3  # the layer changes its input
    np.testing.assert_allclose(got.asnumpy()[0], expected, atol=1e-5, rtol=1e-5)


def test_graph_mode_matches_pynative(rng):
    cfg = mp.load_config(ULTRA_TINY, overrides=["model.num_layers=2"]).model
    model = mp.build_model(cfg, seed=1)
    ids = ms.Tensor(rng.integers(0, cfg.vocab_size, (2, 16)), ms.int32)
    eager = model(ids).asnumpy()
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        compiled = model(ids).asnumpy()
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    np.testing.assert_allclose(compiled, eager, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["pre_ln", "sandwich", "dssn"])
def test_norm_layout_parameters(layout):
    cfg = mp.load_config(ULTRA_TINY, overrides=[f"model.norm_layout={layout}"]).model
    names = {p.name for p in mp.build_model(cfg).get_parameters()}
    has_sandwich = "model.layers.0.pre_mlp_layernorm.weight" in names
    assert has_sandwich == (layout != "pre_ln")
    assert "model.layers.0.post_attention_layernorm.weight" in names
