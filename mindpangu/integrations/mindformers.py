"""Our models inside MindSpore Transformers (mindformers 1.9): importing this module registers

- configs ``PanguUltraMoEConfig`` / ``PanguProMoEConfig`` (MindFormerModuleType.CONFIG): any of our model keys
  (with their HF / Megatron / openPangu aliases), validated by our schema;
- models ``PanguUltraMoEForCausalLM`` / ``PanguProMoEForCausalLM`` (MindFormerModuleType.MODELS): our model
  under the same parameter names, whose ``construct(input_ids)`` returns our full training loss (LM + MTP +
  balance + z-loss) for mindformers' trainers, where input_ids carry seq_length + 1 tokens; ``logits(ids)``
  gives the logits.

so a mindformers YAML can say ``model: {arch: {type: PanguUltraMoEForCausalLM}, model_config: {type:
PanguUltraMoEConfig, ...}}`` (``tools/to_mindformers.py`` writes such YAML from our recipes). Needs the extra:
``pip install "mindpangu[mindformers]"`` (mindformers 1.9.0, which pins mindspore 2.9.x).
"""
from __future__ import annotations

import logging

from mindspore import nn

try:
    from mindformers.tools.register import MindFormerModuleType, MindFormerRegister
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("mindpangu.integrations.mindformers needs mindformers: pip install 'mindpangu[mindformers]' "
                      "(mindformers 1.9.0 pins mindspore 2.9.x; use a separate environment)") from e

from ..config import ConfigError
from ..config.loader import model_config_from_dict
from ..config.schema import TrainConfig
from ..models import build_model
from ..train.step import TotalLoss

# keys mindformers puts into a model config that are not model hyper-parameters (its trainer passes the last five)
MINDFORMERS_KEYS = ("offset", "pp_interleave_num", "checkpoint_name_or_path", "pet_config", "quantization_config",
                    "parallel_config", "moe_config", "dataset_config", "calculate_per_token_loss", "batch_size")


class _PanguConfig:
    """A mindformers model config holding our validated ``ModelConfig`` (``.model``); the keys mindformers adds
    (offset, pp_interleave_num, parallel_config, ...) are kept as attributes."""

    MODEL_TYPE = ""

    def __init__(self, **kwargs):
        kwargs.pop("type", None)
        for key in MINDFORMERS_KEYS:
            setattr(self, key, kwargs.pop(key, None))
        ignored: list = []
        try:  # non-strict: mindformers injects its own switches (disable_lazy_inline, ...) into model configs
            self.model = model_config_from_dict({"type": self.MODEL_TYPE, **kwargs}, strict=False, ignored=ignored)
        except ConfigError as e:  # mindformers re-raises as type(e)(message): give it a plain ValueError
            raise ValueError(str(e)) from None
        self.ignored = ignored
        if ignored:
            logging.getLogger("mindpangu").warning("%s: not mindpangu model keys, ignored: %s", type(self).__name__,
                                                   ", ".join(map(str, ignored)))

    def to_dict(self):
        return {"type": type(self).__name__, **self.model.to_dict()}


@MindFormerRegister.register(MindFormerModuleType.CONFIG)
class PanguUltraMoEConfig(_PanguConfig):
    MODEL_TYPE = "pangu_ultra_moe"


@MindFormerRegister.register(MindFormerModuleType.CONFIG)
class PanguProMoEConfig(_PanguConfig):
    MODEL_TYPE = "pangu_pro_moe"


class _PanguForCausalLM(nn.Cell):
    """Our causal LM as a mindformers network (parameter names unchanged: ``model.*``, ``lm_head.weight``)."""

    def __init__(self, config: _PanguConfig, seed: int = 1234, **_):
        super().__init__(auto_prefix=False)
        self.config = config
        self.network = build_model(config.model, seed=seed)
        train_cfg = TrainConfig()
        train_cfg.model = config.model
        self.loss = TotalLoss(self.network, train_cfg)

    def can_generate(self):
        return False

    def get_model_parameters(self, only_trainable=True):
        """The parameters mindformers' trainer lists and optimises."""
        return set(self.trainable_params() if only_trainable else self.get_parameters())

    def logits(self, input_ids):
        return self.network(input_ids)

    def construct(self, input_ids):
        """input_ids [B, S + 1] -> training loss over predicting tokens 1..S."""
        return self.loss(input_ids)


@MindFormerRegister.register(MindFormerModuleType.MODELS)
class PanguUltraMoEForCausalLM(_PanguForCausalLM):
    """Pangu Ultra MoE (mindpangu) for mindformers."""


@MindFormerRegister.register(MindFormerModuleType.MODELS)
class PanguProMoEForCausalLM(_PanguForCausalLM):
    """Pangu Pro MoE (mindpangu) for mindformers."""


@MindFormerRegister.register(MindFormerModuleType.WRAPPER)
class PanguTrainOneStepCell(nn.TrainOneStepCell):
    """MindSpore's plain train step (loss, gradients, optimizer) for CPU runs under mindformers' Trainer
    (``runner_wrapper: {type: PanguTrainOneStepCell}``): mindformers' own MFTrainOneStepCell checks for overflow
    with NPUGetFloatStatusV2, an Ascend-only kernel. The keyword arguments mindformers adds are ignored."""

    def __init__(self, network, optimizer, **_):
        super().__init__(network, optimizer)
