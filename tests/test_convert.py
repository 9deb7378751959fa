"""Checkpoint conversion both ways: HF directory <-> MindSpore checkpoint, through the CLI."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import mindspore as ms
from safetensors.numpy import load_file

import mindpangu as mp
from mindpangu.convert.hf import save_hf_directory
from conftest import ROOT, ULTRA_TINY

TOOL = os.path.join(ROOT, "tools", "convert_checkpoint.py")


def _run(*args):
    proc = subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.parametrize("layout", ["dssn", "pre_ln"])
def test_round_trip_hf_ms_hf(tmp_path, layout):
    cfg = mp.load_config(ULTRA_TINY, overrides=[f"model.norm_layout={layout}", "model.num_layers=2"]).model
    model = mp.build_model(cfg, seed=11)
    hf_dir = tmp_path / "hf"
    save_hf_directory(model, cfg, str(hf_dir))
    written = json.loads((hf_dir / "config.json").read_text())
    assert written["model_type"] == ("deepseek_v3" if layout == "pre_ln" else "pangu_ultra_moe")
    keys = load_file(str(hf_dir / "model.safetensors"))
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in keys  # per-expert on disk
    assert "model.layers.2.eh_proj.weight" in keys                  # MTP at layer L
    rc, out = _run("hf-to-ms", "--hf", str(hf_dir), "--out", str(tmp_path / "m.ckpt"))
    assert rc == 0, out
    rc, out = _run("ms-to-hf", "--ckpt", str(tmp_path / "m.ckpt"), "--out", str(tmp_path / "back"))
    assert rc == 0, out
    again = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert set(again) == set(keys)
    for k in keys:
        np.testing.assert_array_equal(again[k], keys[k])
    ids = ms.Tensor(np.arange(24).reshape(2, 12) % cfg.vocab_size, ms.int32)
    np.testing.assert_allclose(mp.from_pretrained(str(tmp_path / "back"))(ids).asnumpy(), model(ids).asnumpy(),
                               atol=1e-6)


def test_conversion_errors_are_one_line(tmp_path):
    rc, out = _run("hf-to-ms", "--hf", str(tmp_path), "--out", str(tmp_path / "x.ckpt"))
    assert rc == 2 and "no config.json" in out and "Traceback" not in out
    rc, out = _run("ms-to-hf", "--ckpt", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "o"))
    assert rc == 2 and "does not exist" in out and "Traceback" not in out


def test_shape_mismatch_names_the_tensor(tmp_path):
    cfg = mp.load_config(ULTRA_TINY, overrides=["model.num_layers=2"]).model
    hf_dir = tmp_path / "hf"
    save_hf_directory(mp.build_model(cfg), cfg, str(hf_dir))
    conf = json.loads((hf_dir / "config.json").read_text())
    conf["hidden_size"] = 96
    (hf_dir / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ValueError, match="has shape"):
        mp.from_pretrained(str(hf_dir))
