"""The config system: inheritance, aliases, overrides, mindformers' form, and one clear error per bad input."""
import os
import subprocess
import sys

import pytest

import mindpangu as mp
from mindpangu.config import ConfigError
from conftest import ROOT, ULTRA_TINY

BASE = f"base_config: {ULTRA_TINY}\n"

# (name, yaml text, overrides, key path in the message, bad value in the message, "allowed" text in the message)
BAD = [
    ("typo top-level key", "modle: {hidden_size: 64}\n", [], "modle", None, "did you mean 'model'"),
    ("typo nested key", BASE + "model: {hiden_size: 64}\n", [], "model.hiden_size", None, "did you mean 'hidden_size'"),
    ("string for int", BASE + "model: {hidden_size: big}\n", [], "model.hidden_size", "'big'", "integer"),
    ("string for bool", BASE + "model: {rope_interleave: 'yes'}\n", [], "model.rope_interleave", "'yes'", "boolean"),
    ("zero layers", BASE + "model: {num_layers: 0}\n", [], "model.num_layers", "0", ">= 1"),
    ("unknown norm layout", BASE + "model: {norm_layout: post_ln}\n", [], "model.norm_layout", "'post_ln'",
     "pre_ln | sandwich | dssn"),
    ("top-k above experts", BASE + "model: {moe: {num_experts_per_tok: 16}}\n", [], "model.moe.num_experts_per_tok",
     "16", "1..8"),
    ("MoGE groups do not divide experts", BASE + "model: {moe: {router: moge, num_groups: 3, num_experts_per_tok: 3}}\n",
     [], "model.moe.num_groups", "3", "divide num_experts"),
    ("MoGE K not a multiple of groups", BASE + "model: {moe: {router: moge, num_groups: 4}}\n", [],
     "model.moe.num_experts_per_tok", "2", "multiple of num_groups"),
    ("dense layers exceed layers", BASE + "model: {first_k_dense_replace: 9}\n", [], "model.first_k_dense_replace",
     "9", "0..4"),
    ("kv heads do not divide heads", BASE + "model: {num_key_value_heads: 3}\n", [], "model.num_key_value_heads", "3",
     "must divide num_attention_heads"),
    ("odd rope dim", BASE + "model: {qk_rope_head_dim: 15}\n", [], "model.qk_rope_head_dim", "15", "even"),
    ("missing base file", "base_config: does_not_exist.yaml\n", [], "base_config", "'does_not_exist.yaml'",
     "relative to the including file"),
    ("override without =", BASE, ["model.num_layers"], "<override>", "'model.num_layers'", "key.path=value"),
    ("override bad key path", BASE, ["model..x=1"], "<override>", "'model..x=1'", "dotted names"),
    ("override into a value", BASE, ["model.hidden_size.x=1"], "model.hidden_size", "128", "not a section"),
    ("override typo", BASE, ["model.num_layer=3"], "model.num_layer", None, "did you mean 'num_layers'"),
    ("duplicate yaml key", BASE + "model:\n  hidden_size: 64\n  hidden_size: 96\n", [], "model.hidden_size", None,
     "appears twice"),
    ("alias and canonical both", BASE + "model: {num_layers: 2, num_hidden_layers: 3}\n", [], "model.num_hidden_layers",
     None, "given twice"),
    ("invalid yaml", "model: {hidden_size: [1, 2\n", [], "<file>", None, "not valid YAML"),
    ("section is not a mapping", BASE + "model: 5\n", [], "model", "5", "mapping"),
    ("unknown balance loss", BASE + "model: {moe: {balance_loss: {type: sequence}}}\n", [],
     "model.moe.balance_loss.type", "'sequence'", "micro_batch | ep_group | global_batch | none"),
    ("betas of wrong length", BASE + "optimizer: {betas: [0.9]}\n", [], "optimizer.betas", "[0.9]", "two numbers"),
    ("bad context mode", BASE + "context: {mode: 3}\n", [], "context.mode", "3", "GRAPH_MODE"),
    ("negative learning rate", BASE + "lr_schedule: {learning_rate: -1}\n", [], "lr_schedule.learning_rate", "-1",
     "> 0.0"),
    ("group-limited top-k", BASE + "model: {moe: {num_groups: 8}}\n", [], "model.moe.num_groups", "8", "router: moge"),
    ("list for int", BASE + "runner_config: {batch_size: [8]}\n", [], "runner_config.batch_size", "[8]", "integer"),
    ("fixed block without the reference dispatcher", BASE + "model: {moe: {dispatch_block_size: 8}}\n", [],
     "model.moe.dispatch_block_size", "8", "0"),
    ("dynamic shapes without a fixed dispatch block", BASE + "model: {dynamic_shapes: true}\n", [],
     "model.dynamic_shapes", "True", "dispatch_block_size: 8"),
]


@pytest.mark.parametrize("name,text,overrides,key,value,allowed", BAD, ids=[b[0] for b in BAD])
def test_bad_config_raises_one_clear_error(tmp_path, name, text, overrides, key, value, allowed):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        mp.load_config(str(path), overrides=overrides)
    msg = str(info.value)
    assert f"'{key}'" in msg, msg
    if value is not None:
        assert value in msg, msg
    assert allowed in msg, msg


def test_error_points_at_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(BASE + "model:\n  hidden_size: 64\n  num_layers: -2\n")
    with pytest.raises(ConfigError) as info:
        mp.load_config(str(path))
    assert f"{path}:4" in str(info.value)


def test_inheritance_overrides_and_aliases(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text(BASE + "model:\n  num_hidden_layers: 6\n  n_routed_experts: 16\n  attention_q_lora_dim: 48\n"
                            "lr_schedule: {learning_rate: 1e-4}\n")
    cfg = mp.load_config(str(child), overrides=["model.num_experts_per_tok=4", "model.moe.intermediate_size=32"])
    m = cfg.model
    assert (m.num_layers, m.moe.num_experts, m.q_lora_rank, m.moe.num_experts_per_tok) == (6, 16, 48, 4)
    assert m.moe.intermediate_size == 32 and m.hidden_size == 128  # the rest comes from the base
    assert cfg.lr_schedule.learning_rate == pytest.approx(1e-4)  # YAML 1.1 reads 1e-4 as a string


def test_mindformers_model_config_form(tmp_path):
    path = tmp_path / "mf.yaml"
    path.write_text(BASE + "model:\n  arch: {type: PanguUltraMoEForCausalLM}\n  model_config:\n"
                           "    type: PanguUltraMoEConfig\n    num_layers: 3\n    num_nextn_predict_layers: 0\n")
    cfg = mp.load_config(str(path), overrides=["model.model_config.hidden_size=64"])
    assert (cfg.model.type, cfg.model.num_layers, cfg.model.num_mtp_layers, cfg.model.hidden_size) == \
        ("pangu_ultra_moe", 3, 0, 64)


def test_recipes_load():
    for sub in ("pangu_ultra_moe", "pangu_pro_moe"):
        for name in os.listdir(os.path.join(ROOT, "yaml_configs", sub)):
            mp.load_config(os.path.join(ROOT, "yaml_configs", sub, name))


def test_cli_prints_the_error_not_a_traceback(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(BASE + "model: {num_experts_per_tok: 99}\n")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "param_count.py"), "--config", str(path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "model.moe.num_experts_per_tok" in proc.stderr and "Traceback" not in proc.stderr
