"""MindSpore shard strategies from parallel_config: every strategy fits the inputs its primitive really gets,
parameter slices match a hand calculation, and annotating a model leaves its single-device numerics alone.
(The simulated Ascend compile in tests_sim/ checks the same strategies against MindSpore's parallel compiler.)"""
import numpy as np
import pytest
import mindspore as ms

import mindpangu as mp
from mindpangu.parallel.plan import Layout
from mindpangu.parallel.strategy import (auto_parallel_context, parallelize, parameter_splits, predicted_slices,
                                         sharded_primitives, strategy_problems)

TINY = {"ultra": "yaml_configs/pangu_ultra_moe/tiny.yaml", "pro": "yaml_configs/pangu_pro_moe/tiny.yaml"}
LAYOUTS = {
    "dp4_tp2": ["parallel_config.data_parallel=4", "parallel_config.model_parallel=2"],
    "dp4_tp2_ep4_sp": ["parallel_config.data_parallel=4", "parallel_config.model_parallel=2",
                       "parallel_config.expert_parallel=4", "parallel_config.use_seq_parallel=true"],
    "dp2_tp2_pp2": ["parallel_config.data_parallel=2", "parallel_config.model_parallel=2",
                    "parallel_config.pipeline_stage=2", "parallel_config.micro_batch_num=2"],
    "dp2_tp4_ep2_vocab_tp": ["parallel_config.data_parallel=2", "parallel_config.model_parallel=4",
                             "parallel_config.expert_parallel=2", "parallel_config.vocab_emb_dp=false"],
}
SMALL = ["model.num_layers=2", "runner_config.batch_size=2", "train_dataset.seq_length=16"]
PARALLEL = ["model.moe.dispatch_backend=expert_major", "model.norm_backend=reference",  # what parallelize shards
            "model.attention_backend=reference"]


def _config(model, layout):
    return mp.load_config(TINY[model], overrides=SMALL + PARALLEL + LAYOUTS[layout])


class _Recorder:
    """Stands in for a primitive: records the shapes of the operands it is called with (tensors, and Python floats
    as scalars; int arguments are axes, which strategies do not cover), then calls it."""

    def __init__(self, prim, calls):
        self.prim, self.calls = prim, calls

    def __call__(self, *args):
        self.calls.append([tuple(a.shape) if hasattr(a, "shape") else () for a in args
                           if hasattr(a, "shape") or isinstance(a, float)])
        return self.prim(*args)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("model", sorted(TINY))
def test_every_strategy_fits_the_inputs_it_gets(model, layout):
    cfg = _config(model, layout)
    net = parallelize(mp.build_model(cfg.model, seed=3), cfg)
    calls = {}
    for path, prim in list(sharded_primitives(net)):
        cell_path, attr = path.rsplit(".", 1)
        cell = net if not cell_path else dict(net.cells_and_names())[cell_path]
        calls[path] = []
        object.__setattr__(cell, attr, _Recorder(prim, calls[path]))
        assert prim.attrs.get("in_strategy") is not None, f"{path} has no strategy"
    ms.set_context(mode=ms.PYNATIVE_MODE)
    lay = Layout.from_config(cfg)
    batch = cfg.runner_config.batch_size * lay.dp  # one global micro-batch, as semi-auto parallel sees it
    ids = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (batch, cfg.train_dataset.seq_length))
    net.forward_train(ms.Tensor(ids.astype(np.int32)))
    problems, checked = [], 0
    for path, prim in sharded_primitives(net):
        strategy = prim.prim.attrs["in_strategy"]
        assert calls[path], f"{path} was never called"
        for shapes in calls[path]:
            checked += 1
            problems += [f"{path}: {p}" for p in strategy_problems(strategy, shapes, lay.stage_size)]
    assert not problems, "\n".join(problems)
    assert checked > 40


def test_strategy_check_catches_bad_strategies():
    assert strategy_problems(((2, 1), (2, 1)), [(8, 4)], 4)  # one tuple too many
    assert strategy_problems(((2, 1, 1),), [(8, 4)], 4)  # rank mismatch
    assert strategy_problems(((3, 1),), [(8, 4)], 4)  # 3 does not divide 8
    assert strategy_problems(((4, 2),), [(8, 4)], 4)  # 8 devices in a stage of 4
    assert not strategy_problems(((2, 2), ()), [(8, 4), ()], 4)


def test_parallelize_refuses_a_dispatcher_it_cannot_shard():
    cfg = mp.load_config(TINY["ultra"], overrides=SMALL + LAYOUTS["dp4_tp2_ep4_sp"] +
                         ["model.moe.dispatch_backend=reference", "model.norm_backend=reference",
                          "model.attention_backend=reference"])
    with pytest.raises(ValueError, match="model.layers.1.mlp was built with the 'reference' token dispatcher"):
        parallelize(mp.build_model(cfg.model, seed=3), cfg)
    cfg = mp.load_config(TINY["ultra"], overrides=SMALL + LAYOUTS["dp4_tp2_ep4_sp"] +
                         ["model.moe.dispatch_backend=expert_major", "model.norm_backend=cpu_kernel",
                          "model.attention_backend=reference"])
    with pytest.raises(ValueError, match="was built with the C\\+\\+ RMSNorm kernel"):
        parallelize(mp.build_model(cfg.model, seed=3), cfg)
    cfg = mp.load_config(TINY["ultra"], overrides=SMALL + LAYOUTS["dp4_tp2_ep4_sp"] + PARALLEL[:2] +
                         ["model.attention_backend=cpu_kernel"])
    with pytest.raises(ValueError, match="self_attn.causal_softmax was built with the C\\+\\+ causal softmax kernel"):
        parallelize(mp.build_model(cfg.model, seed=3), cfg)
    cfg = mp.load_config(TINY["ultra"], overrides=SMALL + LAYOUTS["dp4_tp2_ep4_sp"] +
                         PARALLEL + ["model.moe.capacity_factor=1.25"])
    with pytest.raises(ValueError, match="model.layers.1.mlp drops tokens"):
        parallelize(mp.build_model(cfg.model, seed=3), cfg)


def test_parameter_slices_by_hand():
    """DP4 x TP2 x EP4 on tiny Ultra MoE (hidden 128, 4 heads of nope 32 + rope 16, q_lora 64, kv_lora 32, v 32,
    8 experts of intermediate 64, one shared expert, vocab 1024)."""
    cfg = _config("ultra", "dp4_tp2_ep4_sp")
    net = mp.build_model(cfg.model, seed=3)
    got = predicted_slices(net, cfg, rank=5)
    assert got["model.layers.1.self_attn.q_b_proj.weight"] == (4 * 48 // 2, 64)  # heads over TP
    assert got["model.layers.1.self_attn.q_a_proj.weight"] == (64, 128)  # latent: replicated
    assert got["model.layers.1.self_attn.kv_b_proj.weight"] == (4 * 64 // 2, 32)
    assert got["model.layers.1.self_attn.o_proj.weight"] == (128, 4 * 32 // 2)  # row-parallel
    assert got["model.layers.0.mlp.gate_proj.weight"] == (256 // 2, 128)  # dense layer 0
    assert got["model.layers.1.mlp.experts.gate_proj"] == (8 // 4, 64 // 2, 128)  # EP4, expert TP 2
    assert got["model.layers.1.mlp.experts.down_proj"] == (8 // 4, 128, 64 // 2)
    assert got["model.layers.1.mlp.shared_experts.up_proj.weight"] == (64 // 2, 128)
    assert got["model.layers.1.mlp.gate.weight"] == (8, 128)
    assert got["model.embed_tokens.weight"] == (1024, 128)  # vocab_emb_dp (default): replicated
    assert got["lm_head.weight"] == (1024 // 2, 128)
    # EP 4 across TP 2 x DP 2 ranks (EP innermost): 4 ranks hold the experts, no room left to split each expert
    cfg2 = mp.load_config(TINY["ultra"], overrides=SMALL + ["parallel_config.data_parallel=2",
                                                            "parallel_config.model_parallel=2",
                                                            "parallel_config.expert_parallel=4",
                                                            "parallel_config.rank_order=ep-tp-cp-dp-pp"])
    assert predicted_slices(net, cfg2, 0)["model.layers.1.mlp.experts.up_proj"] == (2, 64, 128)


def test_pipeline_ranks_hold_their_stage_only():
    cfg = _config("ultra", "dp2_tp2_pp2")
    net = mp.build_model(cfg.model, seed=3)
    first, last = predicted_slices(net, cfg, 0), predicted_slices(net, cfg, 7)
    assert "model.embed_tokens.weight" in first and "model.embed_tokens.weight" not in last
    assert "lm_head.weight" in last and "model.mtp_layers.0.eh_proj.weight" in last and "lm_head.weight" not in first
    assert set(first) | set(last) == {n for n, _ in net.parameters_and_names()}
    assert not set(first) & set(last)


def test_parallelize_keeps_single_device_numerics():
    cfg = _config("ultra", "dp4_tp2_ep4_sp")
    plain = mp.build_model(mp.load_config(TINY["ultra"], overrides=SMALL).model, seed=3)  # default backends
    annotated = parallelize(mp.build_model(cfg.model, seed=3), cfg)  # same seed: same weights
    ms.set_context(mode=ms.PYNATIVE_MODE)
    ids = ms.Tensor(np.random.default_rng(1).integers(0, 1024, (2, 16)).astype(np.int32))
    a, b = plain.forward_train(ids), annotated.forward_train(ids)
    np.testing.assert_allclose(a[0].asnumpy(), b[0].asnumpy(), atol=1e-5)
    np.testing.assert_allclose(a[1][0].asnumpy(), b[1][0].asnumpy(), atol=1e-5)


def test_auto_parallel_context_from_yaml():
    cfg = _config("pro", "dp2_tp2_pp2")
    ctx = auto_parallel_context(cfg)
    assert ctx["parallel_mode"] == "semi_auto_parallel" and ctx["device_num"] == 8 and ctx["pipeline_stages"] == 2
    assert parameter_splits(mp.build_model(cfg.model, seed=3), cfg)["model.layers.0.self_attn.k_proj.bias"] == (2,)
