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
