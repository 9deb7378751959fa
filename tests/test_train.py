"""Training end to end: learning on the bundled corpus, exact resume, kill safety, faults, schedules, AdamW."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import mindspore as ms

import mindpangu as mp
from mindpangu.config import ConfigError, LRScheduleConfig
from mindpangu.data.mindrecord import PackedDataset, preprocess
from mindpangu.data.tokenizer import ByteTokenizer
from mindpangu.train import checkpoint as ckpt
from mindpangu.train.optim import AdamW, learning_rate
from mindpangu.train.preflight import check_data
from mindpangu.train.trainer import Trainer
from conftest import ROOT, ULTRA_TINY

PRO_TINY = os.path.join(ROOT, "yaml_configs", "pangu_pro_moe", "tiny.yaml")
CORPUS = os.path.join(ROOT, "data", "shakespeare", "plays.txt")
TOKENIZER = os.path.join(ROOT, "data", "shakespeare", "tokenizer.json")
SMALL = ["model.num_layers=2", "model.hidden_size=64", "model.intermediate_size=128", "train_dataset.seq_length=32",
         "runner_config.batch_size=4", "logging.eval_interval=0", "logging.tensorboard=false"]


def unigram_entropy_nats() -> float:
    """Entropy of the corpus's token unigram distribution, tokenised here with `tokenizers` directly."""
    from tokenizers import Tokenizer

    ids = np.array(Tokenizer.from_file(TOKENIZER).encode(open(CORPUS, encoding="utf-8").read()).ids)
    p = np.bincount(ids) / len(ids)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def records(output_dir, kind="train"):
    rows = [json.loads(line) for line in open(os.path.join(output_dir, "metrics.jsonl"), encoding="utf-8")]
    return [r for r in rows if r["kind"] == kind]


def run_cli(args, env=None, **kw):
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "train.py"), *args], capture_output=True,
                          text=True, env=full_env, **kw)


@pytest.mark.parametrize("recipe", [ULTRA_TINY, PRO_TINY], ids=["ultra", "pro"])
def test_recipe_learns_the_corpus(tmp_path, recipe):
    """The README's main job: the tiny recipe as shipped, on the bundled corpus, ends well below unigram entropy."""
    proc = run_cli(["--config", recipe, "--no-progress", f"output_dir={tmp_path}"],
                   env={"MINDPANGU_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    evals = records(tmp_path, "eval")
    entropy = unigram_entropy_nats()
    assert entropy > 5.0
    assert evals[-1]["eval_loss"] < entropy - 1.0, (evals[-1], entropy)
    train = records(tmp_path)
    assert all(k in train[-1] for k in ("lm_loss", "mtp_loss", "balance_loss", "grad_norm", "lr", "tokens_per_s",
                                        "mfu", "load_max_over_mean", "imbalance_score", "loss_spikes"))
    assert "training summary" in proc.stdout
    assert os.listdir(tmp_path / "tensorboard")
    if recipe == ULTRA_TINY:  # the trained MTP layer drafts tokens the main model accepts
        gen = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "generate.py"), "--config", recipe,
                              "--ckpt", str(tmp_path), "--prompt", "ROMEO:", "--max-new-tokens", "32",
                              "--speculative"], capture_output=True, text=True)
        assert gen.returncode == 0, gen.stderr[-3000:]
        rate = float(gen.stdout.split("acceptance ")[1].split("%")[0]) / 100
        print(gen.stdout)
        assert rate > 0.3 and "identical to greedy: True" in gen.stdout


def _small_cfg(tmp_path, *extra):
    return mp.load_config(ULTRA_TINY, overrides=SMALL + [f"output_dir={tmp_path}", *extra])


def test_resume_is_bit_exact(tmp_path, monkeypatch):
    monkeypatch.setenv("MINDPANGU_CACHE", str(tmp_path / "cache"))
    common = ["runner_config.train_steps=12", "checkpoint.save_checkpoint_steps=6", "runner_config.gradient_accumulation_steps=2"]
    Trainer(_small_cfg(tmp_path / "straight", *common), progress=False).run()
    Trainer(_small_cfg(tmp_path / "split", *common), progress=False, max_steps_this_run=6).run()
    assert [s for s, _ in ckpt.checkpoint_dirs(str(tmp_path / "split" / "checkpoints"))] == [6]
    Trainer(_small_cfg(tmp_path / "split", *common), resume=True, progress=False).run()
    straight = {r["step"]: r["loss"] for r in records(tmp_path / "straight")}
    split = {r["step"]: r["loss"] for r in records(tmp_path / "split")}
    assert sorted(split) == list(range(1, 13))
    assert [split[s] for s in range(1, 13)] == [straight[s] for s in range(1, 13)]  # bit for bit


def test_kill_during_checkpoint_save_keeps_previous(tmp_path):
    out = tmp_path / "run"
    args = ["--config", ULTRA_TINY, "--no-progress", *SMALL, f"output_dir={out}", "runner_config.train_steps=6",
            "checkpoint.save_checkpoint_steps=2"]
    env = dict(os.environ, MINDPANGU_CACHE=str(tmp_path / "cache"), MINDPANGU_FAULT_SAVE_DELAY="3")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tools", "train.py"), *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    root = out / "checkpoints"
    deadline = time.time() + 240
    killed = False
    while time.time() < deadline and proc.poll() is None:
        done = [s for s, _ in ckpt.checkpoint_dirs(str(root))]
        if done and root.exists() and any(".tmp" in n for n in os.listdir(root)):
            proc.send_signal(signal.SIGKILL)  # mid-save of the next checkpoint: files written, not yet renamed
            killed = True
            break
        time.sleep(0.05)
    proc.wait()
    assert killed, "never caught a save in progress"
    path, state, arrays = ckpt.load_latest(str(root))
    assert state["step"] == 2 and "model.embed_tokens.weight" in arrays
    cfg = mp.load_config(ULTRA_TINY, overrides=SMALL + [f"output_dir={out}", "runner_config.train_steps=6",
                                                        "checkpoint.save_checkpoint_steps=2"])
    os.environ["MINDPANGU_CACHE"] = str(tmp_path / "cache")
    summary = Trainer(cfg, resume=True, progress=False).run()
    assert summary["steps"] == 6 and summary["steps_this_run"] == 4
    assert not any(".tmp" in n for n in os.listdir(root))


def test_non_finite_steps_are_skipped_then_training_stops(tmp_path):
    proc = run_cli(["--config", ULTRA_TINY, "--no-progress", *SMALL, f"output_dir={tmp_path}",
                    "lr_schedule.learning_rate=1e30", "lr_schedule.warmup_steps=0", "runner_config.train_steps=20",
                    "runner_config.max_consecutive_skips=3"], env={"MINDPANGU_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "3 optimizer steps in a row had a non-finite loss or gradients" in proc.stderr
    assert "Traceback" not in proc.stderr
    rows = records(tmp_path)
    assert rows[-1]["skipped"] == 3 and len(rows) < 20


def test_bad_inputs_get_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MINDPANGU_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_data(_small_cfg(tmp_path, f"train_dataset.data_path={tmp_path}/missing.txt"))
    bad = tmp_path / "bad_ds"
    bad.mkdir()
    (bad / "metadata.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        check_data(_small_cfg(tmp_path, f"train_dataset.data_path={bad}"))
    with pytest.raises(ConfigError, match="vocab_size"):
        check_data(_small_cfg(tmp_path, "train_dataset.tokenizer=byte", "model.vocab_size=100"))
    afile = tmp_path / "a_file"
    afile.write_text("x")
    with pytest.raises(ValueError, match="not writable"):
        Trainer(_small_cfg(tmp_path, f"output_dir={afile}/out"), progress=False)
    with pytest.raises(ConfigError, match="bfloat16"):
        Trainer(_small_cfg(tmp_path, "model.compute_dtype=bfloat16"), progress=False)


def test_checkpoint_from_another_config_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("MINDPANGU_CACHE", str(tmp_path / "cache"))
    Trainer(_small_cfg(tmp_path), progress=False).save()
    other = Trainer(_small_cfg(tmp_path, "model.hidden_size=96"), progress=False)
    with pytest.raises(ValueError, match=r"model.hidden_size: 64 -> 96"):
        other.restore()


def test_corrupt_mindrecord_shard_is_reported(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("to be or not to be, that is the question. " * 50)
    preprocess([str(text)], ByteTokenizer(), 16, str(tmp_path / "ds"), progress=False)
    ds = PackedDataset(str(tmp_path / "ds"))
    assert ds.read([0, 1]).shape == (2, 17)
    shard = ds.files[0]
    with open(shard, "r+b") as fh:
        fh.truncate(os.path.getsize(shard) // 3)
    with pytest.raises((ValueError, RuntimeError)):
        PackedDataset(str(tmp_path / "ds")).read(list(range(ds.num_samples)))


def test_data_order_is_seeded_sharded_and_resumable(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(" ".join(str(i) for i in range(3000)))
    preprocess([str(text)], ByteTokenizer(), 8, str(tmp_path / "ds"), progress=False)
    ds = PackedDataset(str(tmp_path / "ds"), eval_fraction=0.1)
    from mindpangu.data.mindrecord import Position
    stream = ds.batches(4, Position(), seed=7)
    first = [next(stream) for _ in range(5)]
    again = ds.batches(4, first[2][1], seed=7)  # resume after the third batch
    np.testing.assert_array_equal(next(again)[0], first[3][0])
    np.testing.assert_array_equal(next(again)[0], first[4][0])
    ranks = [ds.epoch_order(0, 7, True, 4, r, 2) for r in range(2)]
    assert not set(ranks[0]) & set(ranks[1])  # data-parallel ranks see disjoint samples
    single = ds.epoch_order(0, 7, True, 8)  # and together each step's batch of the single process
    np.testing.assert_array_equal(np.concatenate([ranks[0][:4], ranks[1][:4]]), single[:8])
    assert not set(ds.eval_indices) & set(ds.epoch_order(0, 7, True))  # the held-out split is never trained on


def test_learning_rate_schedules():
    cos = LRScheduleConfig(type="cosine", learning_rate=1.0, lr_end=0.1, warmup_steps=10)
    assert learning_rate(0, 110, cos) == pytest.approx(0.1)  # linear warmup, step 0 -> lr / warmup
    assert learning_rate(9, 110, cos) == pytest.approx(1.0)
    assert learning_rate(60, 110, cos) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert learning_rate(110, 110, cos) == pytest.approx(0.1)
    assert learning_rate(50, 110, LRScheduleConfig(type="constant", learning_rate=0.5, warmup_steps=10)) == 0.5
    legs = LRScheduleConfig(type="multi_cosine", learning_rate=3e-4, warmup_steps=0,
                            legs=[[3e-4, 3e-5, 0.5], [3e-5, 1e-5, 0.25], [1e-5, 1e-7, 0.25]])
    assert learning_rate(0, 100, legs) == pytest.approx(3e-4)
    assert learning_rate(50, 100, legs) == pytest.approx(3e-5)   # second leg starts where the first ended
    assert learning_rate(75, 100, legs) == pytest.approx(1e-5)
    assert learning_rate(99, 100, legs) == pytest.approx(1e-7 + 0.5 * (1e-5 - 1e-7) * (1 + math.cos(math.pi * 0.96)))
    assert learning_rate(100, 100, legs) == pytest.approx(1e-7)


def test_adamw_matches_numpy_and_skips_non_finite():
    rng = np.random.default_rng(0)
    w = ms.Parameter(ms.Tensor(rng.normal(size=(3, 4)).astype(np.float32)), name="layer.weight")
    g_norm = ms.Parameter(ms.Tensor(np.ones(4, np.float32)), name="layer.input_layernorm.weight")
    opt = AdamW([w, g_norm], (0.9, 0.95), 1e-8, 0.1)
    p_np = [w.asnumpy().astype(np.float64), g_norm.asnumpy().astype(np.float64)]
    m = [np.zeros_like(p) for p in p_np]
    v = [np.zeros_like(p) for p in p_np]
    for t in range(1, 4):
        grads = [rng.normal(size=p.shape) for p in p_np]
        opt(tuple(ms.Tensor(g.astype(np.float32)) for g in grads), ms.Tensor(0.01, ms.float32), ms.Tensor(True))
        for i, (decay) in enumerate((0.1, 0.0)):  # the norm gain gets no weight decay
            m[i] = 0.9 * m[i] + 0.1 * grads[i]
            v[i] = 0.95 * v[i] + 0.05 * grads[i] ** 2
            p_np[i] = p_np[i] * (1 - 0.01 * decay) - 0.01 * (m[i] / (1 - 0.9 ** t)) / (np.sqrt(v[i] / (1 - 0.95 ** t)) + 1e-8)
    np.testing.assert_allclose(w.asnumpy(), p_np[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g_norm.asnumpy(), p_np[1], rtol=1e-5, atol=1e-6)
    before = w.asnumpy().copy()
    nan = tuple(ms.Tensor(np.full(p.shape, np.nan, np.float32)) for p in (w, g_norm))
    opt(nan, ms.Tensor(0.01, ms.float32), ms.Tensor(False))
    np.testing.assert_array_equal(w.asnumpy(), before)
    assert float(opt.step.asnumpy()) == 3.0


def test_float16_compute_trains_with_loss_scaling(tmp_path, monkeypatch):
    """float16 matmuls with float32 master weights run on CPU; the loss scale is applied and undone."""
    monkeypatch.setenv("MINDPANGU_CACHE", str(tmp_path / "cache"))
    cfg = _small_cfg(tmp_path, "model.compute_dtype=float16", "runner_config.loss_scale=1024",
                     "runner_config.train_steps=4", "context.mode=1")
    trainer = Trainer(cfg, progress=False)
    summary = trainer.run()
    rows = records(tmp_path)
    assert all(math.isfinite(r["loss"]) for r in rows) and summary["skipped"] == 0
    assert 3.0 < rows[0]["lm_loss"] < 9.0  # an unscaled loss (log 1024 = 6.9 at init), not 1024 x that
    assert trainer.loss_scale == 1024
    assert trainer.model.model.embed_tokens.weight.dtype == ms.float32


def test_ep_split_must_divide_the_batch(tmp_path):
    with pytest.raises(ConfigError, match="runner_config.batch_size"):
        Trainer(_small_cfg(tmp_path, "parallel_config.expert_parallel=4", "parallel_config.data_parallel=4",
                           "runner_config.batch_size=6"), progress=False)


def test_mfu_peak_source_and_no_mfu_above_100_percent():
    """A set peak wins and is named; a measured peak names both measurements; an MFU above 100 % is never printed."""
    from mindpangu.train.mfu import format_mfu, peak_flops

    assert peak_flops(2.5) == (2.5e12, "set: logging.peak_tflops 2.5 TFLOP/s")
    peak, source = peak_flops(None, size=128, repeats=3)
    assert peak > 1e8 and "NumPy" in source and "MindSpore GRAPH" in source and "best:" in source
    assert format_mfu(0.4132) == "41.3 %"
    assert "peak is wrong" in format_mfu(1.039) and "%" not in format_mfu(1.039).split("(")[0]
    assert "peak is wrong" in format_mfu(float("nan"))
