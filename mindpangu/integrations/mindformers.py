"""Our models inside MindSpore Transformers (mindformers 1.9): importing this module registers

- configs ``PanguUltraMoEConfig`` / ``PanguProMoEConfig`` (MindFormerModuleType.CONFIG): any of our model keys
  (with their HF / Megatron / openPangu aliases), validated by our schema;
- models ``PanguUltraMoEForCausalLM`` / ``PanguProMoEForCausalLM`` (MindFormerModuleType.MODELS): our model
  under the same parameter names, whose ``construct(input_ids)`` returns our full training loss (LM + MTP +
  balance + z-loss) for mindformers' trainers, where input_ids carry seq_length + 1 tokens; ``logits(ids)``
  gives the logits. Under mindformers' semi-auto parallel context (``build_context`` with ``use_parallel``) the
  network lays itself out with ``mindpangu.parallel.parallelize`` from the ``parallel_config`` mindformers hands
  it (degrees, micro-batches, sequence parallel), ``pp_interleave_num`` and the model config's ``seq_length``,
  ``rank_order``, ``noop_layers`` and ``pipeline_layers`` (``to_mindformers`` writes them); its ``__init__`` is
  ``lazy_inline`` as mindformers' own models are (not on one card, nor with ``disable_lazy_inline``);
- the LR schedule ``PanguMultiCosineLR`` (MindFormerModuleType.LR): our ``multi_cosine`` (Pro MoE), which
  mindformers lacks.

so a mindformers YAML can say ``model: {arch: {type: PanguUltraMoEForCausalLM}, model_config: {type:
PanguUltraMoEConfig, ...}}`` (``tools/to_mindformers.py`` writes such YAML from our recipes). Needs the extra:
``pip install "mindpangu[mindformers]"`` (mindformers 1.9.0, which pins mindspore 2.9.x).
"""
from __future__ import annotations

import logging

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops
from mindspore.nn.learning_rate_schedule import LearningRateSchedule

try:
    from mindformers.models.utils import lazy_inline
    from mindformers.tools.register import MindFormerModuleType, MindFormerRegister
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("mindpangu.integrations.mindformers needs mindformers: pip install 'mindpangu[mindformers]' "
                      "(mindformers 1.9.0 pins mindspore 2.9.x; use a separate environment)") from e

from ..config import ConfigError
from ..config.loader import model_config_from_dict
from ..config.schema import LRScheduleConfig, TrainConfig
from ..kernels import semi_auto_parallel
from ..models import build_model
from ..parallel.strategy import parallelize
from ..parallel.plan import check_layout
from ..train.optim import learning_rate as schedule
from ..train.step import TotalLoss
from .mindformers_recipe import MODEL_PARALLEL

# keys mindformers puts into a model config that are not model hyper-parameters (its trainer passes
# parallel_config ... batch_size; seq_length is its sequence length key), and our parallel keys (MODEL_PARALLEL)
MINDFORMERS_KEYS = ("offset", "pp_interleave_num", "checkpoint_name_or_path", "pet_config", "quantization_config",
                    "parallel_config", "moe_config", "dataset_config", "calculate_per_token_loss", "batch_size",
                    "seq_length", "disable_lazy_inline") + MODEL_PARALLEL
# mindformers' parallel_config attributes that are ours under the same name
PARALLEL_DEGREES = ("data_parallel", "model_parallel", "context_parallel", "expert_parallel", "pipeline_stage",
                    "micro_batch_num", "use_seq_parallel", "vocab_emb_dp")


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


def train_config(config: _PanguConfig) -> TrainConfig:
    """Our TrainConfig for a network built by mindformers: the model, and the parallel layout from what mindformers
    passes (``config.parallel_config``, ``pp_interleave_num``, ``batch_size``) and our keys in the model config.

    The pipeline split follows mindformers' ``offset`` as its own models do (chunk (v, s) holds
    num_layers // (pp * vpp) + offset[v][s] layers; ``parallel_core/training_graph/transformer/utils.py``) unless
    the model config names ``pipeline_layers``. With ``noop_layers`` (which mindformers has not) every chunk holds
    the same number of layer slots, so the offset must be all zeros and our stage plan places the no-op layers.
    Raises ConfigError when the layout cannot run or the offset does not fit it."""
    cfg = TrainConfig()
    cfg.model = config.model
    p = cfg.parallel_config
    if config.parallel_config is not None:
        for key in PARALLEL_DEGREES:
            setattr(p, key, getattr(config.parallel_config, key, getattr(p, key)))
        p.optimizer_shard = bool(getattr(config.parallel_config, "optimizer_shard", False))
    p.pp_interleave_num = config.pp_interleave_num or 1
    for key in MODEL_PARALLEL:
        if getattr(config, key) is not None:
            setattr(p, key, getattr(config, key))
    if config.seq_length:
        cfg.train_dataset.seq_length = config.seq_length
    if config.batch_size:
        cfg.runner_config.batch_size = config.batch_size
    pp, vpp = p.pipeline_stage, p.pp_interleave_num
    if config.offset is not None and pp > 1 and p.pipeline_layers is None:
        try:  # an int, [pp] or [vpp][pp], as mindformers' LayerSetting takes it
            rows = np.broadcast_to(np.array(config.offset, np.int64), (vpp, pp))
        except ValueError:
            raise ConfigError("model.model_config.offset", f"does not fit pipeline_stage {pp} x pp_interleave_num "
                              f"{vpp}", value=config.offset, allowed=f"an int, [{pp} ints] or [{vpp}][{pp}] ints")
        if p.noop_layers and rows.any():
            raise ConfigError("model.model_config.offset", f"with noop_layers ({p.noop_layers}) every chunk holds "
                              "the same number of layer slots, so the offset is all zeros", value=config.offset,
                              allowed="all zeros, or pipeline_layers (layers per chunk) without noop_layers")
        if not p.noop_layers:
            p.pipeline_layers = [int(n) for n in (cfg.model.num_layers // (pp * vpp) + rows).reshape(-1)]
    check_layout(cfg)
    return cfg


class _PanguForCausalLM(nn.Cell):
    """Our causal LM as a mindformers network (parameter names unchanged: ``model.*``, ``lm_head.weight``), laid out
    by ``parallelize`` under a semi-auto parallel context."""

    @lazy_inline
    def __init__(self, config: _PanguConfig, seed: int = 1234, **_):
        super().__init__(auto_prefix=False)
        self.config = config
        self.network = build_model(config.model, seed=seed)
        try:  # mindformers re-raises as type(e)(message), which ConfigError's signature refuses
            cfg = train_config(config)
        except ConfigError as e:
            raise ValueError(str(e)) from None
        if semi_auto_parallel():
            parallelize(self.network, cfg)
        self.loss = TotalLoss(self.network, cfg)

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


@MindFormerRegister.register(MindFormerModuleType.LR)
class PanguMultiCosineLR(LearningRateSchedule):
    """Our ``multi_cosine`` schedule (Pro MoE's consecutive cosine legs after a linear warmup) as a mindformers LR
    (``lr_schedule: {type: PanguMultiCosineLR, learning_rate, lr_end, warmup_steps, total_steps, legs,
    warmup_ratio}``; mindformers has no multi-leg schedule). The LR of every step is ``train.optim.learning_rate``'s,
    tabulated once: step -> float32; from ``total_steps`` on, the last leg's end."""

    def __init__(self, learning_rate, lr_end, warmup_steps, total_steps, legs, warmup_ratio=None, **_):
        super().__init__()
        cfg = LRScheduleConfig(type="multi_cosine", learning_rate=learning_rate, lr_end=lr_end,
                               warmup_steps=warmup_steps, warmup_ratio=warmup_ratio, legs=[list(x) for x in legs])
        cfg.validate("lr_schedule", {})
        self.total = int(total_steps)
        self.table = Tensor(np.array([schedule(i, self.total, cfg) for i in range(self.total + 1)], np.float32))

    def construct(self, global_step):
        step = ops.minimum(global_step.astype(ms.int32), self.total)
        return ops.gather(self.table, step.reshape(-1), 0).reshape(global_step.shape)


@MindFormerRegister.register(MindFormerModuleType.WRAPPER)
class PanguTrainOneStepCell(nn.TrainOneStepCell):
    """MindSpore's plain train step (loss, gradients, optimizer) for CPU runs under mindformers' Trainer
    (``runner_wrapper: {type: PanguTrainOneStepCell}``): mindformers' own MFTrainOneStepCell checks for overflow
    with NPUGetFloatStatusV2, an Ascend-only kernel. The keyword arguments mindformers adds are ignored."""

    def __init__(self, network, optimizer, **_):
        super().__init__(network, optimizer)
