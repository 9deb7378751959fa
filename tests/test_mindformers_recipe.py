"""Our recipes <-> mindformers YAML (tools/to_mindformers.py): exact round trips, the published layouts' offsets,
and the committed yaml_configs/mindformers/ recipes are what the converter writes today."""
import os

import pytest
import yaml

import mindpangu as mp
from mindpangu.cli import to_mindformers_main
from mindpangu.config.core import build_section
from mindpangu.config.schema import TrainConfig
from mindpangu.integrations.mindformers_recipe import from_mindformers, to_mindformers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EIGHT = ["parallel_config.data_parallel=2", "parallel_config.model_parallel=2", "parallel_config.pipeline_stage=2",
         "parallel_config.micro_batch_num=2", "parallel_config.expert_parallel=2"]
COMMITTED = {"pangu_ultra_moe_tiny_8card.yaml": ("pangu_ultra_moe/tiny.yaml", EIGHT),
             "pangu_pro_moe_tiny_8card.yaml": ("pangu_pro_moe/tiny.yaml", EIGHT),
             "pangu_ultra_moe_718b.yaml": ("pangu_ultra_moe/718b.yaml", []),
             "pangu_pro_moe_72b.yaml": ("pangu_pro_moe/72b.yaml", [])}


def _plain(cfg):
    d = cfg.to_dict()
    d.pop("source", None)
    return d


@pytest.mark.parametrize("name", sorted(COMMITTED))
def test_round_trip_is_exact(name):
    src, overrides = COMMITTED[name]
    cfg = mp.load_config(os.path.join(ROOT, "yaml_configs", src), overrides)
    mf = yaml.safe_load(yaml.safe_dump(to_mindformers(cfg)))
    assert _plain(build_section(TrainConfig, from_mindformers(mf), "", {})) == _plain(cfg)


def test_published_layouts_in_mindformers_terms():
    ultra = to_mindformers(mp.load_config(os.path.join(ROOT, "yaml_configs/pangu_ultra_moe/718b.yaml")))
    assert ultra["model"]["arch"]["type"] == "PanguUltraMoEForCausalLM"
    p = ultra["parallel_config"]
    assert (p["model_parallel"], p["pipeline_stage"], p["expert_parallel"]) == (8, 16, 4)
    offset = ultra["model"]["model_config"]["offset"]
    assert ultra["model"]["model_config"]["pp_interleave_num"] == 2 and len(offset) == 2 and len(offset[0]) == 16
    # mindformers' rule: the offsets sum to num_layers minus the even share (61 layers over 32 chunks: 61 - 32)
    assert sum(map(sum, offset)) == 61 - 32
    assert ultra["parallel"]["pipeline_config"]["pipeline_interleave"] is True
    pro = to_mindformers(mp.load_config(os.path.join(ROOT, "yaml_configs/pangu_pro_moe/72b.yaml")))
    assert pro["model"]["model_config"]["moe"]["router"] == "moge" and pro["model"]["model_config"]["noop_layers"] == 2
    assert pro["lr_schedule"]["type"] == "PanguMultiCosineLR" and len(pro["lr_schedule"]["legs"]) == 3
    offset = pro["model"]["model_config"]["offset"]  # 48 + 2 no-op layers over 25 chunks: 2 each, no offset
    assert sum(map(sum, offset)) == 0 and pro["parallel_config"]["expert_parallel"] == 2


@pytest.mark.parametrize("name", sorted(COMMITTED))
def test_committed_recipes_are_current(name, tmp_path):
    src, overrides = COMMITTED[name]
    out = tmp_path / name
    # written beside the committed file's directory depth so relative data paths compare equal
    target = os.path.join(ROOT, "yaml_configs", "mindformers", name)
    to_mindformers_main(["--config", os.path.join(ROOT, "yaml_configs", src), *overrides, "--out", str(out)])
    fresh = out.read_text().replace(os.path.relpath(os.path.join(ROOT, "data"), tmp_path), "../../data")
    with open(target) as f:
        assert yaml.safe_load(fresh) == yaml.safe_load(f), f"regenerate {target} with tools/to_mindformers.py"


def test_reverse_conversion_rejects_foreign_models():
    with pytest.raises(ValueError, match="not a mindpangu model"):
        from_mindformers({"model": {"arch": {"type": "LlamaForCausalLM"}, "model_config": {}}})
