"""Frozen run configuration: YAML file + dotted `key=value` overrides, validated up front.

`schema` holds the sections (frozen dataclasses, every key with a default), `load` reads and
coerces them, `checks` validates them before any process starts. Everything a caller needs is
re-exported here: `from loomtrain.config import load_config, Config`.
"""
from loomtrain.config.checks import check, resolve_degrees
from loomtrain.config.load import from_dict, load_config, parse_overrides, replace
from loomtrain.config.schema import (
    CheckpointConfig,
    Config,
    DataConfig,
    FaultConfig,
    KernelsConfig,
    ModelConfig,
    OffloadConfig,
    OptimConfig,
    ParallelConfig,
    ResilienceConfig,
    TrainConfig,
)

__all__ = ["CheckpointConfig", "Config", "DataConfig", "FaultConfig", "KernelsConfig", "ModelConfig", "OffloadConfig",
           "OptimConfig", "ParallelConfig", "ResilienceConfig", "TrainConfig", "check", "from_dict",
           "load_config", "parse_overrides", "replace", "resolve_degrees"]
