"""Pre-flight: each kind of bad input is refused as a kind (every float field, every cross-section rule), on the
command line with exit code 2 and one line, before any model is built or data is read."""
import dataclasses
import io
import os
import typing

import numpy as np
import pytest

from conftest import ROOT, ULTRA_TINY
from mindpangu.cli import train_main
from mindpangu.config import ConfigError, TrainConfig, load_config
from mindpangu.config.core import Section
from mindpangu.config.schema import CONSTRAINTS
from mindpangu.models import build_model
from mindpangu.progress import progress_bar
from mindpangu.train import preflight as pf


def _fields(cls, prefix=""):
    """(dotted path, type) of every leaf field under ``cls``."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, path = hints[f.name], f"{prefix}{f.name}"
        if isinstance(tp, type) and issubclass(tp, Section):
            yield from _fields(tp, path + ".")
        else:
            yield path, tp


def _float_depth(tp):
    """0 for a float field, 1 for a list of floats, 2 for a list of lists; None when no float is involved."""
    if tp is float:
        return 0
    for arg in typing.get_args(tp):
        d = _float_depth(arg)
        if d is not None:
            return d + (typing.get_origin(tp) in (list, tuple))
    return None


FLOAT_FIELDS = [(path, _float_depth(tp)) for path, tp in _fields(TrainConfig) if _float_depth(tp) is not None]


def test_the_walk_finds_the_float_fields():
    paths = dict(FLOAT_FIELDS)
    assert len(paths) >= 25
    assert paths["model.moe.balance_loss.coeff"] == 0 and paths["optimizer.betas"] == 1
    assert paths["lr_schedule.legs"] == 2 and paths["lr_schedule.warmup_ratio"] == 0


@pytest.mark.parametrize("path,depth", FLOAT_FIELDS)
@pytest.mark.parametrize("bad", [".nan", ".inf", "-.inf", "'nan'"])
def test_every_float_field_rejects_non_finite(path, depth, bad):
    value = "[" * depth + bad + "]" * depth
    with pytest.raises(ConfigError, match="must be finite") as e:
        load_config(ULTRA_TINY, [f"{path}={value}"])
    assert e.value.key == path


def test_non_finite_in_a_file_names_its_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"base_config: {ULTRA_TINY}\nmodel:\n  moe:\n    balance_loss: {{coeff: .inf}}\n")
    with pytest.raises(ConfigError, match=r"r.yaml:4\): must be finite"):
        load_config(str(recipe))


# one breaking case per rule, and the neighbouring value that keeps it
CROSS_SECTION_CASES = {
    "seq_within_positions": (["train_dataset.seq_length=513"], ["train_dataset.seq_length=512"]),
    "mtp_within_seq": (["train_dataset.seq_length=2", "model.num_mtp_layers=2"],
                       ["train_dataset.seq_length=3", "model.num_mtp_layers=2"]),
    "cpu_kernel_dispatch_on_cpu": (["model.moe.dispatch_backend=cpu_kernel", "context.device_target=Ascend"],
                                   ["model.moe.dispatch_backend=expert_major", "context.device_target=Ascend"]),
    "cpu_kernel_norm_on_cpu": (["model.norm_backend=cpu_kernel", "context.device_target=Ascend"],
                               ["model.norm_backend=reference", "context.device_target=Ascend"]),
    "cpu_kernel_attention_on_cpu": (["model.attention_backend=cpu_kernel", "context.device_target=Ascend"],
                                    ["model.attention_backend=reference", "context.device_target=Ascend"]),
    "cpu_kernel_decode_on_cpu": (["model.decode_backend=cpu_kernel", "context.device_target=Ascend"],
                                 ["model.decode_backend=reference", "context.device_target=Ascend"]),
    "ascend_dispatch_on_ascend": (["model.moe.dispatch_backend=ascend"],
                                  ["model.moe.dispatch_backend=ascend", "context.device_target=Ascend"]),
}


def test_every_cross_section_rule_is_enforced():
    assert [r.name for r in CONSTRAINTS] == list(CROSS_SECTION_CASES)  # a new rule needs a case here
    for rule in CONSTRAINTS:
        bad, good = CROSS_SECTION_CASES[rule.name]
        with pytest.raises(ConfigError) as e:
            load_config(ULTRA_TINY, bad)
        assert e.value.key == rule.key, (rule.name, str(e.value))
        load_config(ULTRA_TINY, good)


@pytest.fixture
def nothing_is_built(monkeypatch, tmp_path):
    """Fail the test if a run gets as far as its data or its model."""
    import mindpangu.train.trainer as trainer

    def refuse(*_, **__):
        raise AssertionError("pre-flight let a bad run through to its data or model")

    monkeypatch.setattr(trainer, "build_model", refuse)
    monkeypatch.setattr(trainer, "open_dataset", refuse)
    monkeypatch.setenv("MINDPANGU_CACHE", str(tmp_path / "cache"))
    return tmp_path


@pytest.mark.parametrize("overrides,key", [
    (["model.moe.balance_loss.coeff=.inf"], "model.moe.balance_loss.coeff"),
    (["train_dataset.seq_length=4096", "model.max_position_embeddings=512"], "train_dataset.seq_length"),
    (["parallel_config.model_parallel=3"], "parallel_config"),
    (["model.num_layers=1000000000"], "model"),
    (["model.compute_dtype=bfloat16"], "model.compute_dtype"),
    (["runner_config.batch_size=100000"], "runner_config.batch_size"),
    (["load_checkpoint=/nowhere"], "load_checkpoint"),
    (["parallel_config.expert_parallel=4", "parallel_config.data_parallel=4", "runner_config.batch_size=6"],
     "runner_config.batch_size"),
    (["parallel_config.expert_parallel=4"], "parallel_config"),  # EP ranks are carved from DP x TP x CP
])
def test_bad_runs_exit_2_with_one_line(nothing_is_built, capsys, overrides, key):
    with pytest.raises(SystemExit) as e:
        train_main(["--config", ULTRA_TINY, f"output_dir={nothing_is_built}/out", *overrides])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"error: config error at '{key}'") or err.startswith(f"error: {key}:"), err


def test_valid_layout_on_one_process_says_what_it_emulates_and_ignores(tmp_path):
    cfg = load_config(ULTRA_TINY, ["parallel_config.data_parallel=2", "parallel_config.model_parallel=2",
                                   "parallel_config.expert_parallel=2", f"output_dir={tmp_path}"])
    (note,) = pf.check_layout_for_run(cfg, 1)
    emulated, ignored = note.split("emulated: ")[1].split("; ignored")
    assert "expert_parallel=2" in emulated and "model_parallel=2" in ignored and "data_parallel=2" in ignored
    assert pf.check_layout_for_run(load_config(ULTRA_TINY), 1) == []


def test_memory_estimate_counts_the_built_parameters_and_refuses_what_cannot_fit(tmp_path):
    cfg = load_config(ULTRA_TINY, [f"output_dir={tmp_path}"])
    model = build_model(cfg.model, seed=0)
    built = sum(int(np.prod(p.shape)) for p in model.trainable_params())
    est = pf.estimate_memory(cfg, "whole_graph")
    assert est["states"] == 16 * built  # weights, gradients and two AdamW moments, fp32
    pf.check_memory(cfg, "whole_graph")  # the tiny recipe fits any machine this runs on
    with pytest.raises(ConfigError, match=r"needs at least .* GB .* has 0.0 GB"):
        pf.check_memory(cfg, "whole_graph", available=1 << 20)
    layerwise = pf.estimate_memory(load_config(ULTRA_TINY, ["model.num_layers=48"]), "layerwise")
    whole = pf.estimate_memory(load_config(ULTRA_TINY, ["model.num_layers=48"]), "whole_graph")
    assert layerwise["activations"] < whole["activations"] / 4  # one layer's tensors, not 48


def test_progress_bar_in_a_log_file_is_quiet():
    log = io.StringIO()
    bar = progress_bar(total=300, desc="train", file=log)
    for _ in range(300):
        bar.update(1)
    bar.close()
    assert log.getvalue().count("\r") <= 3 and "300/300" in log.getvalue()


def test_moge_gating_op_must_be_installed_for_the_ascend_dispatch(monkeypatch, tmp_path):
    """On Ascend, Pro MoE's 'ascend' dispatch routes with the Ascend C MogeGating op: refused until a package
    holding its aclnn header is on ASCEND_CUSTOM_OPP_PATH or under $ASCEND_OPP_PATH/vendors."""
    pro = os.path.join(ROOT, "yaml_configs", "pangu_pro_moe", "tiny.yaml")
    cfg = load_config(pro, ["model.moe.dispatch_backend=ascend", "context.device_target=Ascend"])
    monkeypatch.delenv("ASCEND_CUSTOM_OPP_PATH", raising=False)
    monkeypatch.setenv("ASCEND_OPP_PATH", str(tmp_path / "opp"))
    with pytest.raises(ConfigError, match="MogeGating op, which is not installed") as e:
        pf.check_device(cfg)
    assert e.value.key == "model.moe.dispatch_backend"
    pf.check_device(load_config(ULTRA_TINY, ["model.moe.dispatch_backend=ascend", "context.device_target=Ascend"]))
    pf.check_device(load_config(pro, ["model.moe.dispatch_backend=expert_major", "context.device_target=Ascend"]))
    header = tmp_path / "opp" / "vendors" / "mindpangu" / "op_api" / "include" / "aclnn_moge_gating.h"
    header.parent.mkdir(parents=True)
    header.write_text("aclnnStatus aclnnMogeGatingGetWorkspaceSize(...);\n")
    pf.check_device(cfg)  # installed under the vendors tree
    monkeypatch.setenv("ASCEND_OPP_PATH", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("ASCEND_CUSTOM_OPP_PATH", f"/nonexistent:{header.parents[2]}")
    pf.check_device(cfg)  # or on the custom path
