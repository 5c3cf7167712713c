"""Training: configuration, the two stages (auto-encoding, auto-decoding), checkpoints.

``cryospin.train.fit.fit(config, particles, run_dir)`` runs everything; ``build_config(preset,
overrides)`` makes the configuration (:mod:`cryospin.train.config`). Only the configuration,
which needs no torch, is re-exported here: importing it (as ``cryospin reconstruct --help``
does) must not import torch. The training modules are imported by name
(``cryospin.train.fit``, ``cryospin.train.autoencode``, ...).
"""

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
]
