"""A real multi-process run: msrun data parallel over 2 CPU processes equals one process on the same global batch."""
import json
import os
import shutil
import subprocess
import sys

import pytest

import mindpangu as mp
from mindpangu.parallel.distributed import msrun_command
from mindpangu.train.trainer import Trainer
from conftest import ROOT, ULTRA_TINY

SMALL = ["model.num_layers=2", "model.hidden_size=64", "model.intermediate_size=128", "train_dataset.seq_length=32",
         "logging.eval_interval=0", "logging.tensorboard=false", "logging.log_interval=1", "runner_config.train_steps=6",
         "model.moe.balance_loss.type=micro_batch", "checkpoint.save_checkpoint_steps=100"]


def losses(out_dir):
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"), encoding="utf-8")]
    return [(r["step"], r["loss"], r["lm_loss"], r["balance_loss"], r["grad_norm"]) for r in rows if r["kind"] == "train"]


@pytest.mark.skipif(shutil.which("msrun", path=os.path.dirname(sys.executable)) is None, reason="msrun not installed")
def test_msrun_data_parallel_equals_single_process(tmp_path, monkeypatch):
    monkeypatch.setenv("MINDPANGU_CACHE", str(tmp_path / "cache"))
    # one process, global batch 8; the balance loss of each 4-sequence half on its own (2 virtual EP ranks), which
    # is what each of the 2 data-parallel processes computes on its half (data_parallel=2 makes the EP=2 layout
    # valid; on one process it is reported as ignored)
    single = mp.load_config(ULTRA_TINY, overrides=SMALL + ["runner_config.batch_size=8", "parallel_config.expert_parallel=2",
                                                           "parallel_config.data_parallel=2",
                                                           f"output_dir={tmp_path / 'single'}"])
    Trainer(single, progress=False).run()
    args = " ".join([os.path.join(ROOT, "tools", "train.py"), "--config", ULTRA_TINY, "--no-progress", *SMALL,
                     "runner_config.batch_size=4", "parallel_config.data_parallel=2", f"output_dir={tmp_path / 'dp'}"])
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    proc = subprocess.run(msrun_command(2, args, port=8150, log_dir=str(tmp_path / "log")), shell=True, env=env,
                          capture_output=True, text=True, timeout=600)
    logs = "".join(open(os.path.join(tmp_path / "log", f), errors="replace").read()[-1500:]
                   for f in sorted(os.listdir(tmp_path / "log")))
    assert proc.returncode == 0, proc.stderr[-2000:] + logs
    a, b = losses(tmp_path / "single"), losses(tmp_path / "dp")
    assert [r[0] for r in b] == list(range(1, 7))
    for x, y in zip(a, b):
        for u, v in zip(x[1:], y[1:]):
            assert v == pytest.approx(u, rel=2e-4, abs=1e-6), (x, y)
    assert a[-1][2] < a[0][2]  # it trains
