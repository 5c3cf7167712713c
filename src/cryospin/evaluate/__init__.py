"""Evaluation: FSC, masks, map alignment (rotation, shift, hand) and pose error.

Conventions: ``docs/conventions.md``. Modules: :mod:`~cryospin.evaluate.fsc`,
:mod:`~cryospin.evaluate.masks`, :mod:`~cryospin.evaluate.align`,
:mod:`~cryospin.evaluate.pose_error`. Point-group detection is a model-layer module
(:mod:`cryospin.symmetry_search`, training imposes the group it finds); the map resampling
``transform_map`` is :mod:`cryospin.forward.rigid`.
"""

from cryospin.evaluate.align import AlignResult, align_maps, mirror_map
from cryospin.evaluate.fsc import FSCResult, fsc, resolution_at, write_fsc_json
from cryospin.evaluate.masks import auto_mask, spherical_mask
from cryospin.evaluate.pose_error import (
    HAND_FLIP,
    PoseErrorResult,
    align_rotations,
    flip_hand,
    pose_error,
    write_pose_error_json,
)

__all__ = [
    "AlignResult",
    "align_maps",
    "mirror_map",
    "FSCResult",
    "fsc",
    "resolution_at",
    "write_fsc_json",
    "auto_mask",
    "spherical_mask",
    "HAND_FLIP",
    "PoseErrorResult",
    "align_rotations",
    "flip_hand",
    "pose_error",
    "write_pose_error_json",
]
