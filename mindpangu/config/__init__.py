"""Typed configuration: mindformers-dialect YAML sections, inheritance, overrides and validation."""
from .core import ConfigError, describe
from .loader import dump_config, load_config, model_config_from_dict, parse_override
from .schema import (BalanceLossConfig, CheckpointConfig, ContextConfig, DatasetConfig, ExpertBiasConfig,
                     LoggingConfig, LRScheduleConfig, ModelConfig, MoEConfig, OptimizerConfig, ParallelConfig,
                     RecomputeConfig, RunnerConfig, TrainConfig)

__all__ = ["ConfigError", "describe", "dump_config", "load_config", "model_config_from_dict", "parse_override",
           "BalanceLossConfig", "CheckpointConfig", "ContextConfig", "DatasetConfig", "ExpertBiasConfig",
           "LoggingConfig", "LRScheduleConfig", "ModelConfig", "MoEConfig", "OptimizerConfig", "ParallelConfig",
           "RecomputeConfig", "RunnerConfig", "TrainConfig"]
