"""Serving: MindIR prefill / decode graphs against the Python model, cached decoding against full recomputation,
MTP drafting against the training-time MTP forward, speculative decoding against plain greedy, and bad input."""
import os

import numpy as np
import pytest
import mindspore as ms

import mindpangu as mp
from mindpangu.cli import export_main, generate_main
from mindpangu.convert.checkpoint import save_ms_checkpoint
from mindpangu.export import export_for_serving
from mindpangu.inference import steps
from mindpangu.inference.generate import MindIRRunner, ModelRunner, Sampler, SpeculativeDecoder, generate
from mindpangu.params import kv_cache_bytes_per_token
from conftest import ROOT, ULTRA_718B, ULTRA_TINY

PRO_TINY = os.path.join(ROOT, "yaml_configs", "pangu_pro_moe", "tiny.yaml")
PRO_72B = os.path.join(ROOT, "yaml_configs", "pangu_pro_moe", "72b.yaml")
MAX_LEN = 48


def tiny(path, *extra):
    cfg = mp.load_config(path, overrides=["model.num_layers=2", *extra]).model
    return mp.build_model(cfg, seed=5)


@pytest.fixture(scope="module", params=[ULTRA_TINY, PRO_TINY], ids=["ultra", "pro"])
def exported(request, tmp_path_factory):
    model = tiny(request.param)
    out = str(tmp_path_factory.mktemp("export") / "serve")
    manifest = export_for_serving(model, out, MAX_LEN)
    return model, out, manifest


def test_prefill_mindir_equals_python_at_two_lengths(exported):
    model, out, manifest = exported
    runner = MindIRRunner(out)
    rng = np.random.default_rng(0)
    for batch, seq in [(2, 7), (1, 19)]:  # one exported file, dynamic batch and sequence
        ids = rng.integers(0, model.config.vocab_size, (batch, seq)).astype(np.int32)
        logits, caches = runner.prefill(ids)
        full = model(ms.Tensor(ids)).asnumpy()
        np.testing.assert_allclose(logits.asnumpy(), full[:, -1], atol=1e-4)
        assert caches.shape == (manifest["cache"]["layers"], batch, seq, manifest["cache"]["D"])


def test_cached_decode_equals_full_recomputation_for_16_steps(exported):
    model, out, _ = exported
    ids = np.random.default_rng(1).integers(0, model.config.vocab_size, (2, 21)).astype(np.int32)
    full = model(ms.Tensor(ids)).asnumpy()  # position p predicts token p + 1 from tokens 0..p
    for runner in (MindIRRunner(out), ModelRunner(model, MAX_LEN)):
        _, caches = runner.prefill(ids[:, :5])
        caches = ms.Tensor(np.pad(caches.asnumpy(), ((0, 0), (0, 0), (0, MAX_LEN - 5), (0, 0))))
        for p in range(5, 21):
            logits, caches = runner.decode(ids[:, p:p + 1], np.full((2, 1), p, np.int32), caches)
            np.testing.assert_allclose(logits.asnumpy()[:, 0], full[:, p], atol=1e-4, err_msg=f"position {p}")


def test_greedy_from_mindir_equals_python(exported):
    model, out, _ = exported
    prompt = np.random.default_rng(2).integers(0, model.config.vocab_size, (2, 6)).astype(np.int32)
    a = generate(MindIRRunner(out), prompt, 12, Sampler())
    b = generate(ModelRunner(model, MAX_LEN), prompt, 12, Sampler())
    assert a["tokens"].shape == (2, 12)
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    # greedy from cached decoding is greedy from full recomputation
    seq = prompt
    for _ in range(12):
        seq = np.concatenate([seq, model(ms.Tensor(seq)).asnumpy()[:, -1].argmax(-1)[:, None].astype(np.int32)], 1)
    np.testing.assert_array_equal(b["tokens"], seq[:, 6:])


def test_mtp_draft_with_cache_equals_the_training_mtp_forward():
    model = tiny(ULTRA_TINY)
    ids = np.random.default_rng(3).integers(0, model.config.vocab_size, (2, 12)).astype(np.int32)
    _, mtp_logits, _ = model.forward_train(ms.Tensor(ids))
    _, h, _ = model.prefill(ms.Tensor(ids))
    cache = ms.Tensor(np.zeros((2, MAX_LEN, model.model.layers[0].self_attn.cache_width), np.float32))
    positions = ms.Tensor(np.tile(np.arange(11, dtype=np.int32), (2, 1)))
    logits, _ = model.draft(h[:, :11], ms.Tensor(ids[:, 1:]), positions, cache)
    np.testing.assert_allclose(logits.asnumpy(), mtp_logits[0].asnumpy()[:, :11], atol=1e-4)


def _oracle_drafter(sequence, wrong_every):
    """A DraftStep stand-in that drafts the true greedy token except at positions p with p % wrong_every == 0."""

    class Oracle:
        def __init__(self, model):
            self.vocab = model.config.vocab_size

        def __call__(self, h, next_ids, positions, cache):
            pos = positions.asnumpy()[0]
            logits = np.zeros((1, len(pos), self.vocab), np.float32)
            for j, p in enumerate(pos):
                token = sequence[p + 2] if p + 2 < len(sequence) else 0
                logits[0, j, (token + (p % wrong_every == 0)) % self.vocab] = 1.0
            return ms.Tensor(logits), cache

    return Oracle


@pytest.mark.parametrize("wrong_every", [1, 3, 10 ** 6], ids=["never-right", "mixed", "always-right"])
def test_speculative_equals_plain_greedy(monkeypatch, wrong_every):
    model = tiny(ULTRA_TINY)
    prompt = np.random.default_rng(4).integers(0, model.config.vocab_size, (1, 5)).astype(np.int32)
    plain = generate(ModelRunner(model, MAX_LEN), prompt, 14, Sampler())["tokens"]
    monkeypatch.setattr(steps, "DraftStep", _oracle_drafter(np.concatenate([prompt[0], plain[0]]), wrong_every))
    spec = SpeculativeDecoder(model, MAX_LEN)(prompt, 14)
    np.testing.assert_array_equal(spec["tokens"], plain)
    print({k: v for k, v in spec.items() if k != "tokens"})
    if wrong_every == 1:
        assert spec["accepted"] == 0 and spec["mean_accepted_length"] == 1.0
    elif wrong_every > 100:
        assert spec["acceptance_rate"] == 1.0 and spec["steps"] == 7  # 1 from prefill + 2 per step
    else:
        assert 0 < spec["acceptance_rate"] < 1


def test_speculative_with_the_real_mtp_layer_equals_plain_greedy():
    model = tiny(ULTRA_TINY)
    prompt = np.random.default_rng(6).integers(0, model.config.vocab_size, (1, 4)).astype(np.int32)
    names = [p.name for p in model.get_parameters()]
    spec = SpeculativeDecoder(model, MAX_LEN)(prompt, 10)
    assert [p.name for p in model.get_parameters()] == names  # wrapping the model renames nothing
    np.testing.assert_array_equal(spec["tokens"], generate(ModelRunner(model, MAX_LEN), prompt, 10, Sampler())["tokens"])


def test_sampler_top_p_keeps_the_nucleus():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    draws = np.array([Sampler(1.0, 0.7, seed)(logits)[0] for seed in range(300)])
    assert set(draws) == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3
    assert abs((draws == 0).mean() - 0.5 / 0.8) < 0.1
    assert Sampler()(logits)[0] == 0


def test_cache_bytes_per_token_by_hand():
    ultra = mp.load_config(ULTRA_718B).model  # 61 layers, kv_lora_rank 512 + rope 64; 128 heads x (128+64+128)
    assert kv_cache_bytes_per_token(ultra, 2) == {"cached": 61 * 576 * 2, "full_kv": 61 * 128 * 320 * 2}
    pro = mp.load_config(PRO_72B).model
    d = pro.head_dim or pro.hidden_size // pro.num_attention_heads
    assert kv_cache_bytes_per_token(pro, 2)["cached"] == pro.num_layers * 2 * pro.num_key_value_heads * d * 2


def _cli_error(capsys, main, argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_bad_input_gets_one_clear_error(tmp_path, capsys):
    err = _cli_error(capsys, export_main, ["--config", ULTRA_TINY, "--ckpt", str(tmp_path / "nope"),
                                           "--out", str(tmp_path / "o")])
    assert "does not exist" in err and "nope" in err
    model = tiny(ULTRA_TINY)
    save_ms_checkpoint(model, model.config, str(tmp_path / "m.ckpt"))
    err = _cli_error(capsys, export_main, ["--config", ULTRA_TINY, "--ckpt", str(tmp_path / "m.ckpt"),
                                           "--out", str(tmp_path / "o")])
    assert "another model" in err and "num_layers: 2 -> 4" in err
    err = _cli_error(capsys, export_main, ["--ckpt", str(tmp_path / "m.ckpt"), "--config", ULTRA_TINY,
                                           "model.num_layers=2", "--max-len", "100000", "--out", str(tmp_path / "o")])
    assert "--max-len" in err and "max_position_embeddings" in err
    err = _cli_error(capsys, generate_main, ["--ckpt", str(tmp_path / "m.ckpt"), "--hf", str(tmp_path)])
    assert "exactly one of --ckpt" in err
    pro = tiny(PRO_TINY)
    save_ms_checkpoint(pro, pro.config, str(tmp_path / "pro.ckpt"))
    err = _cli_error(capsys, generate_main, ["--ckpt", str(tmp_path / "pro.ckpt"), "--speculative"])
    assert "num_mtp_layers = 0" in err and "speculative" in err
    err = _cli_error(capsys, generate_main, ["--mindir", str(tmp_path)])
    assert "manifest.json" in err
    assert not os.path.exists(tmp_path / "o")  # nothing half-written
