"""Typed run configuration: schema, validation, presets, loading and dumping."""
from .load import available_presets, dumps, dumps_toml, flatten, from_dict, load, to_dict
from .schema import (
    DataConfig,
    EngineConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    ScalingConfig,
    ServeConfig,
    TrackingConfig,
    TrainConfig,
)
from .validate import resolutions

__all__ = [
    "DataConfig", "EngineConfig", "LossConfig", "ModelConfig", "OptimConfig", "RunConfig",
    "ScalingConfig", "ServeConfig", "TrackingConfig", "TrainConfig",
    "available_presets", "dumps", "dumps_toml", "flatten", "from_dict", "load", "to_dict", "resolutions",
]
