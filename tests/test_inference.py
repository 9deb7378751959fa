"""Serving: MindIR prefill / decode graphs against the Python model, in-place cached decoding (both decode
backends) against full recomputation, mixed-length batches against one prompt at a time, MTP drafting against the
training-time MTP forward, speculative decoding (Python and MindIR) against plain greedy, and bad input."""
import os

import numpy as np
import pytest
import mindspore as ms

import mindpangu as mp
from mindpangu.cli import export_main, generate_main
from mindpangu.convert.checkpoint import save_ms_checkpoint
from mindpangu.export import export_for_serving
from mindpangu.inference import generate as gen_module, steps
from mindpangu.inference.generate import MindIRRunner, ModelRunner, Sampler, SpeculativeDecoder, generate, right_pad
from mindpangu.inference.steps import load_caches
from mindpangu.params import kv_cache_bytes_per_token
from conftest import ROOT, ULTRA_718B, ULTRA_TINY

PRO_TINY = os.path.join(ROOT, "yaml_configs", "pangu_pro_moe", "tiny.yaml")
PRO_72B = os.path.join(ROOT, "yaml_configs", "pangu_pro_moe", "72b.yaml")
MAX_LEN = 48


def tiny(path, *extra):
    cfg = mp.load_config(path, overrides=["model.num_layers=2", *extra]).model
    return mp.build_model(cfg, seed=5)


BATCH_SIZES = (1, 2, 4)


@pytest.fixture(scope="module", params=[ULTRA_TINY, PRO_TINY], ids=["ultra", "pro"])
def exported(request, tmp_path_factory):
    model = tiny(request.param)
    out = str(tmp_path_factory.mktemp("export") / "serve")
    manifest = export_for_serving(model, out, MAX_LEN, batch_sizes=BATCH_SIZES)
    return model, out, manifest


def greedy_by_recomputation(model, prompt, n):
    """Greedy tokens from the full forward pass over the whole sequence at every step (no cache)."""
    seq = np.asarray(prompt, np.int32)[None]
    for _ in range(n):
        nxt = model(ms.Tensor(seq)).asnumpy()[:, -1].argmax(-1)[:, None].astype(np.int32)
        seq = np.concatenate([seq, nxt], 1)
    return seq[0, len(prompt):]


def test_prefill_mindir_equals_python_at_mixed_lengths(exported):
    model, out, manifest = exported
    runner = MindIRRunner(out)
    rng = np.random.default_rng(0)
    for lengths in [(7, 7), (19,), (3, 11, 6)]:  # one exported file: dynamic batch, length and padding
        seqs = [rng.integers(0, model.config.vocab_size, n).astype(np.int32) for n in lengths]
        ids, lens = right_pad(seqs)
        logits, _, caches = runner.prefill(ids, lens)
        for row, seq in zip(logits, seqs):  # each prompt's last token, as if it ran alone
            np.testing.assert_allclose(row, model(ms.Tensor(seq[None])).asnumpy()[0, -1], atol=1e-4)
        assert caches.shape == (manifest["cache"]["layers"], len(lengths), max(lengths), manifest["cache"]["D"])


@pytest.mark.parametrize("backend", ["reference", "cpu_kernel"])
def test_in_place_cached_decode_equals_full_recomputation_for_16_steps(exported, backend):
    model, out, _ = exported
    ids = np.random.default_rng(1).integers(0, model.config.vocab_size, (2, 21)).astype(np.int32)
    full = model(ms.Tensor(ids)).asnumpy()  # position p predicts token p + 1 from tokens 0..p
    twin = tiny(ULTRA_TINY if model.config.type == "pangu_ultra_moe" else PRO_TINY,
                f"model.decode_backend={backend}")
    runners = [ModelRunner(twin, MAX_LEN)] + ([MindIRRunner(out)] if backend == "cpu_kernel" else [])
    for runner in runners:
        _, _, caches = runner.prefill(ids[:, :5], np.array([5, 5], np.int32))
        load_caches(runner.cache_params(2), caches, 2)
        for p in range(5, 21):
            logits = runner.decode(2, ids[:, p:p + 1], np.full((2, 1), p, np.int32))
            np.testing.assert_allclose(logits[:, 0], full[:, p], atol=1e-4, err_msg=f"{backend}, position {p}")


def test_greedy_from_mindir_equals_python(exported):
    model, out, _ = exported
    prompt = np.random.default_rng(2).integers(0, model.config.vocab_size, (2, 6)).astype(np.int32)
    a = generate(MindIRRunner(out), prompt, 12, Sampler())
    b = generate(ModelRunner(model, MAX_LEN), prompt, 12, Sampler())
    assert a["tokens"].shape == (2, 12)
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    for row, p in zip(b["tokens"], prompt):  # greedy from cached decoding is greedy from full recomputation
        np.testing.assert_array_equal(row, greedy_by_recomputation(model, p, 12))


def test_mixed_length_batch_equals_one_at_a_time(exported, monkeypatch):
    """Prompts of lengths 44, 41, 39 and 5 in one batch of 12 new tokens: the cache (48) holds 5, 8, 10 and 12 of
    them, so the batch shrinks from 4 to 2 to 1 live sequences and its caches move to the smaller decode graphs
    on the way. Every sequence's greedy tokens equal running it alone and full recomputation."""
    model, out, _ = exported
    rng = np.random.default_rng(7)
    seqs = [rng.integers(0, model.config.vocab_size, n).astype(np.int32) for n in (44, 41, 39, 5, 2)]
    with pytest.raises(ValueError, match="exceed the largest decode batch size 4"):
        generate(MindIRRunner(out), seqs, 12, Sampler())  # 5 sequences, batch sizes 1, 2, 4 exported
    moves = []
    real_move = gen_module._move
    monkeypatch.setattr(gen_module, "_move", lambda runner, src, dst, rows: (moves.append((src, dst, list(rows))),
                                                                              real_move(runner, src, dst, rows)))
    for runner in (ModelRunner(model, MAX_LEN), MindIRRunner(out)):
        moves.clear()
        batch = generate(runner, seqs[:4], 12, Sampler())
        np.testing.assert_array_equal(batch["lengths"], [5, 8, 10, 12])  # MAX_LEN - length + 1 tokens fit
        assert moves == [(4, 2, [2, 3]), (2, 1, [1])], moves  # rows of the live sequences in the old graph
        for row, n, seq in zip(batch["tokens"], batch["lengths"], seqs):
            alone = generate(runner, [seq], 12, Sampler())["tokens"][0]
            np.testing.assert_array_equal(row[:n], alone, err_msg=f"prompt of {len(seq)}")
            np.testing.assert_array_equal(row[n:], -1)
    for row, n, seq in list(zip(batch["tokens"], batch["lengths"], seqs))[2:4]:
        np.testing.assert_array_equal(row[:n], greedy_by_recomputation(model, seq, int(n)))


def test_a_sequence_stops_at_eos_and_leaves_the_batch(exported):
    model, out, _ = exported
    rng = np.random.default_rng(8)
    seqs = [rng.integers(0, model.config.vocab_size, n).astype(np.int32) for n in (4, 6)]
    runner = ModelRunner(model, MAX_LEN)
    free = generate(runner, seqs, 10, Sampler())["tokens"]
    eos = int(free[0, 3])  # the first sequence's fourth token
    stop = int(np.argmax(free[0] == eos))
    capped = generate(runner, seqs, 10, Sampler(), eos_id=eos)
    np.testing.assert_array_equal(capped["tokens"][0, : stop + 1], free[0, : stop + 1])
    np.testing.assert_array_equal(capped["tokens"][0, stop + 1:], -1)
    hit = np.flatnonzero(free[1] == eos)
    end = int(hit[0]) + 1 if len(hit) else 10
    np.testing.assert_array_equal(capped["tokens"][1, :end], free[1, :end])
    assert list(capped["lengths"]) == [stop + 1, end]


def test_mtp_draft_with_cache_equals_the_training_mtp_forward():
    model = tiny(ULTRA_TINY)
    ids = np.random.default_rng(3).integers(0, model.config.vocab_size, (2, 12)).astype(np.int32)
    _, mtp_logits, _ = model.forward_train(ms.Tensor(ids))
    expected = mtp_logits[0].asnumpy()[:, :11]  # position p: main residual at p, token p + 1
    _, h, _ = model.prefill(ms.Tensor(ids))
    logits, entries = steps.DraftPrefillStep(model)(h[:, :11], ms.Tensor(ids[:, 1:]))
    np.testing.assert_allclose(logits.asnumpy(), expected, atol=1e-4)
    # the in-place draft step over positions 7, 8 after a draft prefill of 0..6
    draft = steps.DraftStep(model, 2, MAX_LEN)
    load_caches([draft.cache], entries.asnumpy()[:, :7], 2)
    positions = ms.Tensor(np.tile(np.array([7, 8], np.int32), (2, 1)))
    step = draft(h[:, 7:9], ms.Tensor(ids[:, 8:10]), positions)
    np.testing.assert_allclose(step.asnumpy(), expected[:, 7:9], atol=1e-4)


def _oracle_drafters(sequence, wrong_every):
    """DraftPrefillStep / DraftStep stand-ins that draft the true greedy token except at positions p with
    p % wrong_every == 0."""

    def logits_at(positions, vocab):
        logits = np.zeros((1, len(positions), vocab), np.float32)
        for j, p in enumerate(positions):
            token = sequence[p + 2] if p + 2 < len(sequence) else 0
            logits[0, j, (token + (p % wrong_every == 0)) % vocab] = 1.0
        return ms.Tensor(logits)

    class OraclePrefill:
        def __init__(self, model):
            self.vocab, self.width = model.config.vocab_size, model.model.mtp_layers[0].self_attn.cache_width

        def set_inputs(self, *inputs):  # a cell's dynamic-shape declaration: nothing to declare here
            pass

        def __call__(self, h, next_ids):
            s = next_ids.shape[1]
            np.testing.assert_array_equal(next_ids.asnumpy()[0], sequence[1:s + 1])  # the token after each position
            return logits_at(range(s), self.vocab), ms.Tensor(np.zeros((1, s, self.width), np.float32))

    class Oracle:
        def __init__(self, model, batch, max_len):
            self.vocab = model.config.vocab_size
            width = model.model.mtp_layers[0].self_attn.cache_width
            self.cache = ms.Parameter(ms.Tensor(np.zeros((batch * max_len, width), np.float32)), name="oracle_cache")

        def __call__(self, h, next_ids, positions):
            p = positions.asnumpy()[0]
            # the speculative step hands over the true next token of p (accepted or not: column 0 is always real)
            assert int(next_ids.asnumpy()[0, 0]) == sequence[p[0] + 1], (p, next_ids)
            return logits_at(p, self.vocab)

    return OraclePrefill, Oracle


@pytest.mark.parametrize("wrong_every", [1, 3, 10 ** 6], ids=["never-right", "mixed", "always-right"])
def test_speculative_equals_plain_greedy(monkeypatch, wrong_every):
    model = tiny(ULTRA_TINY)
    prompt = np.random.default_rng(4).integers(0, model.config.vocab_size, (1, 5)).astype(np.int32)
    plain = generate(ModelRunner(model, MAX_LEN), prompt, 14, Sampler())["tokens"]
    prefill, draft = _oracle_drafters(np.concatenate([prompt[0], plain[0]]), wrong_every)
    monkeypatch.setattr(steps, "DraftPrefillStep", prefill)
    monkeypatch.setattr(steps, "DraftStep", draft)
    spec = SpeculativeDecoder(ModelRunner(model, MAX_LEN))(prompt, 14)
    np.testing.assert_array_equal(spec["tokens"], plain)
    print({k: v for k, v in spec.items() if k != "tokens"})
    if wrong_every == 1:
        assert spec["accepted"] == 0 and spec["mean_accepted_length"] == 1.0
    elif wrong_every > 100:
        assert spec["acceptance_rate"] == 1.0 and spec["steps"] == 7  # 1 from prefill + 2 per step
    else:
        assert 0 < spec["acceptance_rate"] < 1


def test_speculative_with_the_real_mtp_layer_equals_plain_greedy(exported):
    model, out, manifest = exported
    if not model.config.num_mtp_layers:
        assert "speculative" not in manifest["graphs"]
        with pytest.raises(ValueError, match="no speculative graphs"):
            SpeculativeDecoder(MindIRRunner(out))
        return
    prompt = np.random.default_rng(6).integers(0, model.config.vocab_size, (1, 4)).astype(np.int32)
    names = [p.name for p in model.get_parameters()]
    plain = generate(ModelRunner(model, MAX_LEN), prompt, 10, Sampler())["tokens"]
    for runner in (ModelRunner(model, MAX_LEN), MindIRRunner(out)):  # Python, and the exported draft graphs
        spec = SpeculativeDecoder(runner)(prompt, 10)
        np.testing.assert_array_equal(spec["tokens"], plain)
    # the composite decode path at Q = 2 (verify and draft without the C++ decode kernels)
    composite = tiny(ULTRA_TINY, "model.decode_backend=reference")
    spec = SpeculativeDecoder(ModelRunner(composite, MAX_LEN))(prompt, 10)
    np.testing.assert_array_equal(spec["tokens"], plain)
    assert [p.name for p in model.get_parameters()] == names  # wrapping the model renames nothing


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
