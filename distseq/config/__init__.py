"""Typed, strict configuration dataclasses and the YAML loader; no torch import here."""

from distseq.config.loader import ConfigError, dump_yaml, from_dict, load_yaml, parse_overrides, to_dict
from distseq.config.model import ModelConfig
from distseq.config.run import (
    CheckpointConfig,
    DataConfig,
    MetricsConfig,
    OptimConfig,
    ParallelConfig,
    RunConfig,
    SyntheticConfig,
    TrainConfig,
)

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "MetricsConfig",
    "ModelConfig",
    "OptimConfig",
    "ParallelConfig",
    "RunConfig",
    "SyntheticConfig",
    "TrainConfig",
    "dump_yaml",
    "from_dict",
    "load_yaml",
    "parse_overrides",
    "to_dict",
]
