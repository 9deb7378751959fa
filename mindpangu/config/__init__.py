"""Typed configuration: mindformers-dialect YAML sections, inheritance, overrides and validation."""
from .core import ConfigError
from .loader import load_config, model_config_from_dict, parse_override
from .schema import (BalanceLossConfig, CheckpointConfig, ContextConfig, DatasetConfig, ExpertBiasConfig,
                     LoggingConfig, LRScheduleConfig, MeshConfig, ModelConfig, MoEConfig, OptimizerConfig, ParallelConfig,
                     RecomputeConfig, RunnerConfig, TrainConfig)

__all__ = ["ConfigError", "load_config", "model_config_from_dict", "parse_override",
           "BalanceLossConfig", "CheckpointConfig", "ContextConfig", "DatasetConfig", "ExpertBiasConfig",
           "LoggingConfig", "LRScheduleConfig", "MeshConfig", "ModelConfig", "MoEConfig", "OptimizerConfig", "ParallelConfig",
           "RecomputeConfig", "RunnerConfig", "TrainConfig"]
