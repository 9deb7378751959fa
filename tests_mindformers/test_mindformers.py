"""mindpangu inside mindformers 1.9 (run in the mindformers environment by its own CI step: `python -m pytest -q
tests_mindformers`): registration and builders, the converted YAML, mindformers' Trainer driving our model against
our own loop, and mindformers' LR schedule against ours."""
import os

import numpy as np
import pytest
import yaml
import mindspore as ms
import mindspore.dataset as ds
from mindspore.train import Callback

import mindpangu as mp
import mindpangu.integrations.mindformers as mfi
from mindpangu.integrations.mindformers_recipe import to_mindformers
from mindpangu.train.optim import learning_rate
from mindpangu.train.step import StepRunner
from mindformers import Trainer
from mindformers.core.lr import build_lr
from mindformers.models import build_network
from mindformers.tools.register import MindFormerConfig, MindFormerModuleType, MindFormerRegister

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"ultra": "yaml_configs/pangu_ultra_moe/tiny.yaml", "pro": "yaml_configs/pangu_pro_moe/tiny.yaml"}


def _recipe(model, overrides=()):
    return mp.load_config(os.path.join(ROOT, TINY[model]), ["model.num_layers=2", *overrides])


def test_models_and_configs_are_registered_under_stable_names():
    for name in ("PanguUltraMoEForCausalLM", "PanguProMoEForCausalLM"):
        assert MindFormerRegister.get_cls(MindFormerModuleType.MODELS, name).__module__ == mfi.__name__
    for name in ("PanguUltraMoEConfig", "PanguProMoEConfig"):
        assert MindFormerRegister.get_cls(MindFormerModuleType.CONFIG, name).__module__ == mfi.__name__


@pytest.mark.parametrize("model", sorted(TINY))
def test_mindformers_builder_forward_equals_direct_build(model, tmp_path):
    cfg = _recipe(model)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(to_mindformers(cfg)))
    net = build_network(MindFormerConfig(str(path)).model)
    assert type(net).__name__ == ("PanguUltraMoEForCausalLM" if model == "ultra" else "PanguProMoEForCausalLM")
    ours = mp.build_model(cfg.model, seed=7)
    not_loaded, _ = ms.load_param_into_net(net, {p.name: p for p in ours.get_parameters()}, strict_load=True)
    assert not not_loaded
    ms.set_context(mode=ms.PYNATIVE_MODE)
    ids = ms.Tensor(np.random.default_rng(0).integers(0, cfg.model.vocab_size, (2, 12)).astype(np.int32))
    np.testing.assert_allclose(net.logits(ids).asnumpy(), ours(ids).asnumpy(), atol=1e-6)


class _Losses(Callback):
    def __init__(self):
        self.losses = []

    def on_train_step_end(self, run_context):
        out = run_context.original_args().net_outputs
        self.losses.append(float((out[0] if isinstance(out, (tuple, list)) else out).asnumpy()))


def test_mindformers_trainer_matches_our_loop(tmp_path):
    """Six steps of mindformers' Trainer (its AdamW, its constant LR, our PanguTrainOneStepCell) against our
    StepRunner (our AdamW) on the same batches from the same initial weights. Weight decay and clipping are off:
    mindformers decays every parameter, we skip norms and biases; its plain step does not clip."""
    steps, batch = 6, 4
    cfg = _recipe("ultra", ["runner_config.batch_size=4", f"runner_config.train_steps={steps}",
                            "lr_schedule.type=constant", "lr_schedule.warmup_steps=0", "lr_schedule.learning_rate=1e-3",
                            "optimizer.weight_decay=0.0", "optimizer.grad_clip=0.0", "train_dataset.seq_length=32"])
    data = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (steps * batch, 33)).astype(np.int32)
    ms.set_context(mode=ms.GRAPH_MODE)
    mf = to_mindformers(cfg)
    mf.update(output_dir=str(tmp_path / "mf"), runner_wrapper={"type": "PanguTrainOneStepCell"},
              context={"mode": 0, "device_target": "CPU"})
    mf["runner_config"]["sink_mode"] = False
    mf["callbacks"] = [{"type": "MFLossMonitor"}]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(mf))
    losses = _Losses()
    trainer = Trainer(args=str(path), train_dataset=ds.NumpySlicesDataset({"input_ids": data}, shuffle=False)
                      .batch(batch), callbacks=[losses])
    trainer.train()
    assert len(losses.losses) == steps

    model = mp.build_model(cfg.model, seed=1234)  # what the registered network builds from
    runner = StepRunner(model, cfg)
    ours = [runner.run([data[i * batch:(i + 1) * batch]], learning_rate(i, steps, cfg.lr_schedule))["loss"]
            for i in range(steps)]
    print("mindformers Trainer:", np.round(losses.losses, 6), "our loop:", np.round(ours, 6))
    assert abs(losses.losses[0] - ours[0]) < 1e-5  # same weights, same batch: same loss before any update
    np.testing.assert_allclose(losses.losses, ours, atol=2e-3)
    assert ours[-1] != ours[0]  # the updates did something


def test_mindformers_cosine_schedule_matches_ours():
    cfg = _recipe("ultra", ["lr_schedule.type=cosine", "lr_schedule.warmup_steps=10", "lr_schedule.learning_rate=1e-3",
                            "lr_schedule.lr_end=1e-4"])
    total = 100
    lr = build_lr({"type": "CosineWithWarmUpLR", "learning_rate": 1e-3, "lr_end": 1e-4, "warmup_steps": 10,
                   "total_steps": total})
    theirs = [float(lr(ms.Tensor(s, ms.int32)).asnumpy()) for s in range(total)]
    ours = [learning_rate(s, total, cfg.lr_schedule) for s in range(total)]
    # after warmup both are the same cosine; during warmup mindformers starts at 0, we start at lr / warmup
    np.testing.assert_allclose(theirs[10:], ours[10:], rtol=1e-5)  # measured 3.7e-7
    np.testing.assert_allclose(theirs[1:10], ours[:9], rtol=1e-5)


def test_multi_cosine_schedule_as_a_mindformers_lr():
    """Pro MoE's schedule (our multi_cosine) through mindformers' build_lr: linear warmup to the peak ((s + 1) /
    warmup), then consecutive cosine legs over their fractions of the remaining steps, stated here from that
    definition."""
    legs = [[3e-4, 3e-5, 0.7], [3e-5, 1e-5, 0.2], [1e-5, 1e-7, 0.1]]
    total, warmup = 200, 20
    lr = build_lr({"type": "PanguMultiCosineLR", "learning_rate": 3e-4, "lr_end": 1e-7, "warmup_steps": warmup,
                   "total_steps": total, "legs": legs})
    theirs = np.array([float(lr(ms.Tensor(s, ms.int32)).asnumpy()) for s in range(total + 5)])
    expected = []
    for s in range(total + 5):
        if s < warmup:
            expected.append(3e-4 * (s + 1) / warmup)
            continue
        progress, start = min(1.0, (s - warmup) / (total - warmup)), 0.0
        for i, (a, b, frac) in enumerate(legs):
            if progress < start + frac or i == len(legs) - 1:
                local = min(1.0, (progress - start) / frac)
                expected.append(b + 0.5 * (a - b) * (1 + np.cos(np.pi * local)))
                break
            start += frac
    np.testing.assert_allclose(theirs, expected, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("shift", [False, True])
def test_pipeline_split_follows_the_recipes_offset_as_mindformers_models_do(shift):
    """Our network under mindformers puts each layer on the stage mindformers' own models would (its LayerSetting,
    from num_layers, offset and pp_interleave_num), for the 718B recipe's offset and for one a user edited."""
    from mindformers.modules.transformer.transformer import TransformerOpParallelConfig
    from mindformers.parallel_core.training_graph.transformer.utils import LayerSetting
    from mindpangu.parallel.strategy import layer_stages

    with open(os.path.join(ROOT, "yaml_configs", "mindformers", "pangu_ultra_moe_718b.yaml")) as f:
        recipe = yaml.safe_load(f)
    mc = dict(recipe["model"]["model_config"])
    offset = [list(row) for row in mc.pop("offset")]
    if shift:  # one layer moves from the first chunk of the second round to the first
        offset[0][0] += 1
        offset[1][0] -= 1
    parallel = TransformerOpParallelConfig(**recipe["parallel_config"])
    config = mfi.PanguUltraMoEConfig(**mc, offset=offset, parallel_config=parallel)
    ours = layer_stages(mfi.train_config(config))
    ms.set_auto_parallel_context(pipeline_config={"pipeline_interleave": True, "pipeline_scheduler": "1f1b"})
    try:
        theirs = LayerSetting(mc["num_layers"], offset, parallel, mc["pp_interleave_num"])
    finally:
        ms.reset_auto_parallel_context()
    assert [ours[i][0] for i in range(mc["num_layers"])] == [int(s) for s in theirs.pp_ids]
    if shift:
        assert ours[1][0] == 0  # the first chunk now holds two layers


# The simulated Ascend compile (tools/sim_compile.py --mindformers; stub CANN libraries built for this environment's
# MindSpore 2.9): the converted recipes through mindformers' own build_context and Trainer (its train-step wrapper
# and pipeline cell), our network laid out by parallelize; every compiled slice equals our prediction.
RECIPES = {"ultra": "yaml_configs/mindformers/pangu_ultra_moe_tiny_8card.yaml",
           "pro": "yaml_configs/mindformers/pangu_pro_moe_tiny_8card.yaml"}


@pytest.mark.parametrize("rank", [0, 7])
@pytest.mark.parametrize("model", sorted(RECIPES))
def test_tiny_recipes_compile_through_mindformers_trainer(model, rank, tmp_path):
    from mindpangu.train.sim_compile import compile_rank

    report = compile_rank(os.path.join(ROOT, RECIPES[model]), rank, str(tmp_path), ["runner_config.batch_size=1"],
                          mindformers=True)
    assert report.ok, "\n".join(report.mismatches)
    assert report.stage == rank // 4 and report.slices
    assert ("model.embed_tokens.weight" in report.slices) == (rank == 0)
    assert ("lm_head.weight" in report.slices) == (rank == 7)


# The published recipes, as written but for three things: the widths (hidden 64, head dims 8, expert FFNs 16,
# vocabulary 1,024: the 718B / 72B parameters cannot be held by one CPU process), float32 instead of bf16, and
# data_parallel 8 instead of 48 / 100 (README "Using mindpangu from mindformers": with a stage of 384 or 800 devices MindSpore's default strategy for
# ops it is given none keeps 3 copies of a 128-long axis on neighbouring ranks, and a group of 3 ranks of one node is
# refused). Layers, heads, experts, TP / EP / PP / VPP, offsets, no-op layers and the dispatch are the recipes'.
PUBLISHED = {
    "ultra": ("yaml_configs/mindformers/pangu_ultra_moe_718b.yaml",
              ["model.model_config.hidden_size=64", "model.model_config.intermediate_size=64",
               "model.model_config.q_lora_rank=16", "model.model_config.kv_lora_rank=16",
               "model.model_config.qk_nope_head_dim=8", "model.model_config.qk_rope_head_dim=8",
               "model.model_config.v_head_dim=8", "model.model_config.moe.intermediate_size=16"]),
    "pro": ("yaml_configs/mindformers/pangu_pro_moe_72b.yaml",
            ["model.model_config.hidden_size=64", "model.model_config.head_dim=8",
             "model.model_config.moe.intermediate_size=16",
             "model.model_config.moe.shared_expert_intermediate_size=64"]),
}
SMALL_WORLD = ["model.model_config.vocab_size=1024", "model.model_config.compute_dtype=float32",
               "parallel_config.data_parallel=8"]


@pytest.mark.parametrize("model", sorted(PUBLISHED))
def test_published_recipes_compile_through_mindformers_trainer(model, tmp_path):
    from mindpangu.train.sim_compile import compile_rank

    path, widths = PUBLISHED[model]
    report = compile_rank(os.path.join(ROOT, path), 0, str(tmp_path), widths + SMALL_WORLD, mindformers=True)
    assert report.ok, "\n".join(report.mismatches)
    assert report.layout == {"ultra": "DP8xTP8xEP4xPP16xVPP2", "pro": "DP8xTP8xEP2xPP5xVPP5"}[model]
    assert "model.embed_tokens.weight" in report.slices and "lm_head.weight" not in report.slices
    # the recipes' all-to-all dispatch (moe.dispatch_backend: ascend): one Morph per MoE layer of the stage; Pro MoE
    # routes with the Ascend C MogeGating op
    held = sorted({int(n.split(".")[2]) for n in report.slices if n.startswith("model.layers.")})
    dense = {"ultra": 3, "pro": 0}[model]
    morphs = sorted(int(op.split(".")[2]) for op in report.operators if op.startswith("Morph_model.layers."))
    assert morphs == [i for i in held if i >= dense] and morphs
    assert report.ascend_c_ops == (["MogeGating"] if model == "pro" else [])
    # Ultra MoE's ep_group balance loss is all-reduced over rank 0's EP group: TP 8 innermost, EP over the first
    # 4 DP ranks -> ranks 0, 8, 16, 24; Pro MoE's micro_batch loss pools nothing
    assert report.all_reduces.get("group_sum") == ([[0, 8, 16, 24]] if model == "ultra" else None)
