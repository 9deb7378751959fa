"""Real checkpoint layouts in and out: released model types, openPangu RoPE, every tensor used or reported, the
keys serving engines read, sharded / bf16 / fp16 / FP8 files, --hf without --config, atomic writes. References are
transformers (torch), torch's own dtype conversions and NumPy code written here."""
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
import mindspore as ms

import mindpangu as mp
import numpy_reference as ref
from conftest import ULTRA_TINY
from mindpangu.config import ConfigError
from mindpangu.convert import safetensors_io
from mindpangu.convert.hf import internal_to_hf, load_hf_directory, save_hf_directory

PRO_TINY = ULTRA_TINY.replace("pangu_ultra_moe", "pangu_pro_moe")


def _ids(vocab, shape=(2, 12), seed=1):
    return np.random.default_rng(seed).integers(0, vocab, shape)


def _ultra(layout="pre_ln", bias=False, seed=3, **extra):
    overrides = [f"model.norm_layout={layout}", "model.num_layers=2",
                 f"model.moe.balance_loss.expert_bias.enabled={str(bias).lower()}"]
    overrides += [f"model.{k}={v}" for k, v in extra.items()]
    cfg = mp.load_config(ULTRA_TINY, overrides=overrides).model
    model = mp.build_model(cfg, seed=seed)
    if bias:
        rng = np.random.default_rng(seed)
        for p in model.get_parameters():
            if p.name.endswith("e_score_correction_bias"):
                p.set_data(ms.Tensor(rng.normal(0, 0.05, p.shape).astype(np.float32)))
    return cfg, model


def _edit_config(path, **changes):
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as fh:
        hf = json.load(fh)
    for k, v in changes.items():
        if v is None:
            hf.pop(k, None)
        else:
            hf[k] = v
    with open(cfg_path, "w") as fh:
        json.dump(hf, fh)


# ---- 1. model types through one table -----------------------------------------------------------------------
def test_released_pro_moe_model_type_loads_as_pro_moe(tmp_path):
    cfg = mp.load_config(PRO_TINY, overrides=["model.num_layers=2"]).model
    model = mp.build_model(cfg, seed=2)
    save_hf_directory(model, cfg, str(tmp_path))
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["model_type"] == "PanguProMoE" and written["architectures"] == ["PanguProMoEForCausalLM"]
    ids = ms.Tensor(_ids(cfg.vocab_size), ms.int32)
    want = model(ids).asnumpy()
    for model_type in ("PanguProMoE", "PanGuMoE"):
        _edit_config(tmp_path, model_type=model_type)
        back = mp.from_pretrained(str(tmp_path))
        assert back.config.type == "pangu_pro_moe"
        np.testing.assert_allclose(back(ids).asnumpy(), want, atol=1e-6)
    _edit_config(tmp_path, model_type="qwen3_moe")
    with pytest.raises(ConfigError, match=r"model_type.*not a model type mindpangu reads.*PanguProMoE"):
        mp.from_pretrained(str(tmp_path))
    _edit_config(tmp_path, model_type=None)
    with pytest.raises(ConfigError, match=r"'model_type'.*missing"):
        mp.from_pretrained(str(tmp_path))


# ---- 2. openPangu RoPE default ------------------------------------------------------------------------------
def test_openpangu_directory_without_rope_interleave_rotates_pairs(tmp_path, rng):
    cfg, model = _ultra("sandwich", rope_interleave="true")
    save_hf_directory(model, cfg, str(tmp_path))
    _edit_config(tmp_path, rope_interleave=None)  # as the public openPangu config.json: no such key
    loaded = mp.from_pretrained(str(tmp_path))
    assert loaded.config.rope_interleave
    w = {k: v.astype(np.float64) for k, v in internal_to_hf({p.name: p for p in model.get_parameters()},
                                                            cfg).items()}
    c = dict(attention="mla", layout="sandwich", heads=cfg.num_attention_heads, nope=cfg.qk_nope_head_dim,
             rope=cfg.qk_rope_head_dim, v=cfg.v_head_dim, kv_rank=cfg.kv_lora_rank, eps=cfg.rms_norm_eps,
             theta=cfg.rope_theta, k=cfg.moe.num_experts_per_tok, norm_topk=True, scale=cfg.moe.routed_scaling_factor)
    h = rng.normal(size=(1, 12, cfg.hidden_size)).astype(np.float32)
    got = loaded.model.layers[0](ms.Tensor(h))[0].asnumpy()[0]
    pairs = ref.decoder_layer(w, 0, dict(c, interleave=True), h[0].astype(np.float64))
    halves = ref.decoder_layer(w, 0, dict(c, interleave=False), h[0].astype(np.float64))
    np.testing.assert_allclose(got, pairs, atol=1e-5, rtol=1e-5)
    assert np.abs(pairs - halves).max() > 1e-3  # the layouts differ on these weights


# ---- 3. every tensor used or reported -----------------------------------------------------------------------
def test_extra_missing_and_unknown_tensors_are_reported(tmp_path):
    cfg, model = _ultra()
    save_hf_directory(model, cfg, str(tmp_path / "hf"))
    shard = str(tmp_path / "hf" / "model.safetensors")
    from safetensors.numpy import load_file, save_file as save_np

    tensors = load_file(shard)
    expert = "model.layers.1.mlp.experts.0.gate_proj.weight"
    for change, message in [({"model.layers.1.mlp.experts.8.gate_proj.weight": tensors[expert]}, r"extra \[8\]"),
                            ({"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32)}, None),
                            ({"model.layers.0.mlp.extra.weight": np.ones(4, np.float32)},
                             r"unexpected \['model.layers.0.mlp.extra.weight'\]")]:
        save_np({**tensors, **change}, shard)
        if message is None:  # an allow-listed rotary cache: loaded without it
            mp.from_pretrained(str(tmp_path / "hf"))
        else:
            with pytest.raises(ValueError, match=message):
                mp.from_pretrained(str(tmp_path / "hf"))
    save_np({k: v for k, v in tensors.items() if k != expert}, shard)
    with pytest.raises(ValueError, match=r"missing \[0\]"):
        mp.from_pretrained(str(tmp_path / "hf"))


# ---- 4. what serving engines read; transformers serves our export --------------------------------------------
DEEPSEEK_V3_KEYS = {  # the public DeepSeek-V3 config.json, less tokens, auto_map, versions and quantization
    "architectures", "attention_bias", "attention_dropout", "aux_loss_alpha", "ep_size", "first_k_dense_replace",
    "hidden_act", "hidden_size", "initializer_range", "intermediate_size", "kv_lora_rank", "max_position_embeddings",
    "model_type", "moe_intermediate_size", "moe_layer_freq", "n_group", "n_routed_experts", "n_shared_experts",
    "norm_topk_prob", "num_attention_heads", "num_experts_per_tok", "num_hidden_layers", "num_key_value_heads",
    "num_nextn_predict_layers", "pretraining_tp", "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
    "rms_norm_eps", "rope_scaling", "rope_theta", "routed_scaling_factor", "scoring_func", "seq_aux",
    "tie_word_embeddings", "topk_group", "topk_method", "torch_dtype", "use_cache", "v_head_dim", "vocab_size"}


@pytest.mark.parametrize("bias", [True, False])
def test_transformers_serves_our_deepseek_v3_export(tmp_path, bias):
    cfg, model = _ultra("pre_ln", bias=bias)
    files = save_hf_directory(model, cfg, str(tmp_path), max_shard_size="200KB")
    assert len(files) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    written = json.loads((tmp_path / "config.json").read_text())
    assert DEEPSEEK_V3_KEYS <= set(written)
    assert written["scoring_func"] == "sigmoid" and written["topk_method"] == "noaux_tc"
    reader = safetensors_io.CheckpointReader(str(tmp_path))
    bias_keys = [n for n in reader.names() if n.endswith("e_score_correction_bias")]
    assert len(bias_keys) == 2  # the MoE layer and the MTP layer, zeros when the model has no bias
    assert any(np.any(reader.get(k) != 0) for k in bias_keys) == bias
    peer = DeepseekV3ForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager").float().eval()
    ids = _ids(cfg.vocab_size)
    with torch.no_grad():
        expected = peer(torch.tensor(ids)).logits.numpy()
    got = model(ms.Tensor(ids, ms.int32)).asnumpy()
    assert expected.std() > 0.05
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_openpangu_and_pro_configs_carry_the_serving_keys(tmp_path):
    cfg, model = _ultra("sandwich", bias=True)
    save_hf_directory(model, cfg, str(tmp_path / "op"))
    op = json.loads((tmp_path / "op" / "config.json").read_text())
    assert op["model_type"] == "pangu_ultra_moe" and op["router_enable_expert_bias"] is True
    assert op["rope_interleave"] is True and op["sandwich_norm"] is True
    # transformers' openPangu names and the DeepSeek names vLLM's openpangu.py reads, with the same values
    assert (op["num_routed_experts"], op["attention_q_lora_dim"], op["num_dense_layers"]) == \
        (op["n_routed_experts"], op["q_lora_rank"], op["first_k_dense_replace"])
    assert mp.from_pretrained(str(tmp_path / "op")).config.moe.balance_loss.expert_bias.enabled
    _edit_config(tmp_path / "op", q_lora_rank=op["q_lora_rank"] + 1)
    with pytest.raises(ConfigError, match="disagrees with"):
        load_hf_directory(str(tmp_path / "op"))


# ---- sharded, bf16 / fp16 / FP8 files ---------------------------------------------------------------------
def _peer(seed=0, **extra):
    cfg = DeepseekV3Config(
        vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2,
        n_group=1, topk_group=1, first_k_dense_replace=1, q_lora_rank=40, kv_lora_rank=16, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-6, **extra)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name else torch.randn_like(p) / np.sqrt(p.shape[-1]))
    return model


def _params(model):
    return {p.name: p.asnumpy() for p in model.get_parameters()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sharded_and_half_precision_files_load_exactly(tmp_path, dtype):
    peer = _peer()
    peer.to(dtype).save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    model = mp.from_pretrained(str(tmp_path))
    state = {k: v.float().numpy() for k, v in peer.state_dict().items()}
    ours = _params(model)
    # our stacked expert weights against the peer's per-expert tensors, exactly (a dtype widening is exact)
    for j in range(8):
        np.testing.assert_array_equal(ours["model.layers.1.mlp.experts.down_proj"][j],
                                      state[f"model.layers.1.mlp.experts.{j}.down_proj.weight"]
                                      if f"model.layers.1.mlp.experts.{j}.down_proj.weight" in state
                                      else state["model.layers.1.mlp.experts.down_proj"][j])
    np.testing.assert_array_equal(ours["model.layers.0.self_attn.q_a_proj.weight"],
                                  state["model.layers.0.self_attn.q_a_proj.weight"])


def test_bfloat16_export_rounds_as_torch_does(tmp_path):
    cfg, model = _ultra("pre_ln")
    save_hf_directory(model, cfg, str(tmp_path), dtype="bfloat16")
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    DeepseekV3ForCausalLM.from_pretrained(str(tmp_path), torch_dtype=torch.bfloat16)  # transformers reads it
    mine = internal_to_hf({p.name: p for p in model.get_parameters()}, cfg)
    reader = safetensors_io.CheckpointReader(str(tmp_path))
    assert set(reader.names()) == set(mine)
    for name in mine:  # every tensor on disk against torch's own round-to-nearest-even of our float32 value
        want = torch.tensor(mine[name]).to(torch.bfloat16).float().numpy()
        np.testing.assert_array_equal(reader.get(name), want, err_msg=name)
    assert len(mine) > 40


def test_malformed_safetensors_headers_are_refused(tmp_path):
    import struct

    for entry, message in [({"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}, "malformed"),
                           ({"dtype": "F8_E5M2", "shape": [2], "data_offsets": [0, 2]}, "not read"),
                           ("not an object", "malformed")]:
        header = json.dumps({"w": entry}).encode()
        (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
        with pytest.raises(ValueError, match=message):
            safetensors_io.CheckpointReader(str(tmp_path))


def test_e4m3_decoding_matches_torch():
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()
    np.testing.assert_array_equal(np.isnan(safetensors_io.E4M3), np.isnan(codes))
    ok = ~np.isnan(codes)
    np.testing.assert_array_equal(safetensors_io.E4M3[ok], codes[ok])


def test_deepseek_fp8_release_layout_is_dequantised(tmp_path):
    """DeepSeek-V3's FP8 files: linear weights float8_e4m3fn with a float32 ``weight_scale_inv`` per block (edge
    blocks partial); embeddings, norms, the router and the head stay unquantised."""
    block = 32
    peer = _peer()
    tensors, expected = {}, {}
    for name, p in peer.state_dict().items():
        w = p.detach().float()
        quantised = name.endswith("proj.weight") and w.dim() == 2
        if not quantised:
            tensors[name] = w.contiguous()
            continue
        rows, cols = w.shape
        br, bc = -(-rows // block), -(-cols // block)
        padded = torch.zeros(br * block, bc * block)
        padded[:rows, :cols] = w
        amax = padded.view(br, block, bc, block).abs().amax(dim=(1, 3)).clamp(min=1e-12)
        scale = amax / 448.0
        full = scale.repeat_interleave(block, 0).repeat_interleave(block, 1)[:rows, :cols]
        q = (w / full).to(torch.float8_e4m3fn)
        tensors[name], tensors[name + "_scale_inv"] = q.contiguous(), scale.contiguous()
        expected[name] = (q.float() * full).numpy()  # the dequantisation, written here
    save_file(tensors, str(tmp_path / "model.safetensors"))
    config = peer.config.to_dict()
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [block, block]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    reader = safetensors_io.CheckpointReader(str(tmp_path), (block, block))
    assert len(expected) > 10 and not [n for n in reader.names() if n.endswith("_scale_inv")]
    for name, want in expected.items():
        np.testing.assert_array_equal(reader.get(name), want)
    model = mp.from_pretrained(str(tmp_path))  # loads through the same reader, every tensor used
    np.testing.assert_array_equal(_params(model)["model.layers.0.self_attn.q_a_proj.weight"],
                                  expected["model.layers.0.self_attn.q_a_proj.weight"])


# ---- atomic writes, --hf without --config --------------------------------------------------------------------
def test_failed_conversion_leaves_no_output(tmp_path, monkeypatch):
    cfg, model = _ultra()
    calls = []

    def failing(value, dtype):
        calls.append(1)
        if len(calls) > 5:
            raise OSError("disk full")
        return original(value, dtype)

    original = safetensors_io.encode
    monkeypatch.setattr(safetensors_io, "encode", failing)
    with pytest.raises(OSError, match="disk full"):
        save_hf_directory(model, cfg, str(tmp_path / "out"), max_shard_size="100KB")
    assert os.listdir(tmp_path) == []


def test_export_takes_the_config_from_the_hf_directory(tmp_path, monkeypatch):
    from mindpangu import cli

    cfg, model = _ultra()
    save_hf_directory(model, cfg, str(tmp_path / "hf"))
    (tmp_path / "hf" / "tokenizer.json").write_text("{}")
    seen = {}

    def fake_export(model, out, max_len, tokenizer, source, batch_sizes):
        seen.update(type=model.config.type, layers=model.config.num_layers, tokenizer=tokenizer, source=source)
        return {"cache": {"kind": "mla", "layers": 2, "max_len": max_len, "D": 1, "bytes_per_token": 1,
                          "full_kv_bytes_per_token": 2}, "graphs": {"prefill": {"file": "prefill.mindir"}}}

    import mindpangu.export as export

    monkeypatch.setattr(export, "export_for_serving", fake_export)
    cli.export_main(["--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "out")])
    assert seen == {"type": "pangu_ultra_moe", "layers": 2, "tokenizer": str(tmp_path / "hf" / "tokenizer.json"),
                    "source": str(tmp_path / "hf")}
