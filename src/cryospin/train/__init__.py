"""Training: configuration, the two stages (auto-encoding, auto-decoding), checkpoints.

``cryospin.train.fit.fit(config, particles, run_dir)`` runs everything (the function is not
re-exported here, so that ``cryospin.train.fit`` stays the module); ``build_config(preset,
overrides)`` makes the configuration (:mod:`cryospin.train.config`).
"""

from cryospin.train.autodecode import autodecode_epoch, refine_poses
from cryospin.train.autoencode import BestPoses, EpochStats, autoencode_epoch, infer_best_poses
from cryospin.train.checkpoint import load_checkpoint, save_checkpoint
from cryospin.train.config import (
    Config,
    DataConfig,
    InputConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    ScheduleConfig,
    build_config,
    load_config,
    save_config,
)
from cryospin.train.data import TrainingData, prepare_data
from cryospin.train.fit import FitResult, TrainingInterrupted, resolve_device
from cryospin.train.metrics import NonFiniteGradientError, NonFiniteLossError, read_metrics

__all__ = [
    "Config",
    "ModelConfig",
    "OptimConfig",
    "ScheduleConfig",
    "DataConfig",
    "RunConfig",
    "InputConfig",
    "build_config",
    "load_config",
    "save_config",
    "TrainingData",
    "prepare_data",
    "EpochStats",
    "BestPoses",
    "autoencode_epoch",
    "infer_best_poses",
    "autodecode_epoch",
    "refine_poses",
    "save_checkpoint",
    "load_checkpoint",
    "FitResult",
    "TrainingInterrupted",
    "resolve_device",
    "NonFiniteGradientError",
    "NonFiniteLossError",
    "read_metrics",
]
