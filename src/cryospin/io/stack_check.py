"""The one check of the image stacks a particle file refers to (``.star``, ``.cs``, ``.txt``).

Every reader of particle metadata hands its stacks, and which image of which stack each row
names, to :func:`check_stacks`: each stack must open, hold particle images rather than a 3D map,
have the box the metadata (or the other stacks) give, and hold every image a row names. Where
the metadata gives no pixel size, the stacks' headers give it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from cryospin.errors import InputError
from cryospin.io.mrc import open_stack

__all__ = ["CheckedStacks", "check_stacks"]


class CheckedStacks(NamedTuple):
    """The particles' box (px) and pixel size (Å): the metadata's, else the stacks' (the
    pixel size is NaN when neither gives one)."""

    box_px: int
    pixel_size_angstrom: float


def check_stacks(
    stack_paths: Sequence[Path],
    stack_index: np.ndarray,
    image_index: np.ndarray,
    *,
    source: Path,
    box_field: str,
    metadata_box_px: int | None,
    metadata_pixel_size_angstrom: float = math.nan,
    fallback_box_px: int | None = None,
    open_stacks: bool = True,
    row_name: Callable[[int], str] = lambda row: str(row + 1),
) -> CheckedStacks:
    """Check the stacks of a particle file and return their box and header pixel size.

    Parameters
    ----------
    stack_paths : the stacks, resolved.
    stack_index : `(N,)` int64, which of ``stack_paths`` holds each row.
    image_index : `(N,)` int64, 0-based image of each row within its stack.
    source : the metadata file (named in the errors about rows).
    box_field : the metadata field giving the box (``rlnImageSize``, ``blob/shape``), named in
        the errors.
    metadata_box_px : the box the metadata gives (px), or None.
    metadata_pixel_size_angstrom : the pixel size the metadata gives (Å), NaN when none.
    fallback_box_px : the box when neither the metadata nor (unopened) stacks give it.
    open_stacks : False: open nothing (metadata only); the box must then be known.
    row_name : how the errors name row ``k`` (0-based), e.g. ``"3 (3@a.mrcs)"``.

    Raises
    ------
    InputError
        A stack that cannot be opened, that looks like a 3D map, whose box differs from the
        metadata's (or the other stacks'), or that has fewer images than a row names; stack
        headers with conflicting pixel sizes (when the metadata gives none); an unknown box.
    """
    box = metadata_box_px
    header_sizes: set[float] = set()
    if open_stacks:
        for s, path in enumerate(stack_paths):
            stack = open_stack(path)
            if stack.looks_like_3d_map():  # a map read as a stack would train on z-sections
                raise InputError(f"looks like a 3D map (space group {stack.space_group}, "
                                 f"{stack.box_px}³), not a particle stack; pass the particles' "
                                 ".mrcs/.star", stack.path)
            if box is None:
                box = stack.box_px
            elif stack.box_px != box and metadata_box_px is not None:
                raise InputError(f"images are {stack.box_px} px but {box_field} says {box} px",
                                 path)
            elif stack.box_px != box:
                raise InputError(f"stacks have different boxes {sorted({box, stack.box_px})} px "
                                 f"({path}: images are {stack.box_px} px but other stacks are "
                                 f"{box} px)", source)
            rows = np.flatnonzero(stack_index == s)
            if rows.size:
                worst = int(rows[np.argmax(image_index[rows])])
                if image_index[worst] >= len(stack):
                    raise InputError(f"row {row_name(worst)} points past the end of "
                                     f"{path.name}, which has {len(stack)} images", source)
            if stack.pixel_size_angstrom > 0:
                header_sizes.add(round(stack.pixel_size_angstrom, 4))
    pixel_size = metadata_pixel_size_angstrom
    if math.isnan(pixel_size) and len(header_sizes) > 1:
        raise InputError(f"conflicting pixel sizes in stack headers {sorted(header_sizes)} Å",
                         source)
    if box is None:
        box = fallback_box_px
    if box is None:
        raise InputError(f"box size unknown: no {box_field} and the image stacks were not read "
                         "(give the box, e.g. --box N)", source)
    if math.isnan(pixel_size) and header_sizes:
        pixel_size = header_sizes.pop()
    return CheckedStacks(int(box), float(pixel_size))
