"""``cryospin postprocess``: :func:`main` runs it; its help and flags are in
:mod:`cryospin.cli.flags.postprocess`."""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

import torch

from cryospin.atomic import atomic_write_text
from cryospin.errors import InputError
from cryospin.evaluate.postprocess import (
    local_resolution_brief,
    postprocess_half_maps,
    postprocess_summary,
    write_postprocessed,
)
from cryospin.io.mrc import read_cubic_map
from cryospin.rundir import PostprocessFiles
from cryospin.runlock import check_output_folder, claim_output_folder, describe_command

log = logging.getLogger(__name__)

#: How far a given mask may stray outside [0, 1] (float32 rounding of a soft edge).
_MASK_SLACK = 1e-3


def _load(path: Path) -> tuple[torch.Tensor, float]:
    volume, apix = read_cubic_map(path)
    return torch.tensor(volume, dtype=torch.float64), apix


def _voxel_size(args: argparse.Namespace, apix_a: float, apix_b: float) -> float | None:
    """``--apix``, else HALF_A's header voxel (HALF_B's must agree); None: unknown."""
    if args.apix is not None:
        if not (math.isfinite(args.apix) and args.apix > 0):
            raise InputError(f"--apix must be a positive number of Å, got {args.apix}")
        return float(args.apix)
    if apix_a > 0 and apix_b > 0 and abs(apix_a - apix_b) > 0.01 * apix_a:
        raise InputError(f"voxel size {apix_b:g} Å differs from {args.half_a} ({apix_a:g} Å); "
                         "pass --apix to override", args.half_b)
    if apix_a > 0:
        return apix_a
    log.warning("no voxel size in %s: resolutions are in pixels and no B-factor is fitted "
                "(pass --apix)", args.half_a)
    return None


def _mask(path: Path, shape: tuple[int, ...]) -> torch.Tensor:
    mask, _ = _load(path)
    if tuple(mask.shape) != shape:
        raise InputError(f"mask box {tuple(mask.shape)} differs from the half maps' {shape}",
                         path)
    low, high = float(mask.min()), float(mask.max())
    if low < -_MASK_SLACK or high > 1 + _MASK_SLACK:
        raise InputError(f"mask values run from {low:.3g} to {high:.3g}; a mask lies in [0, 1]",
                         path)
    if high <= 0:
        raise InputError("the mask is empty (no value above 0)", path)
    return mask.clamp(0.0, 1.0)


def main(args: argparse.Namespace) -> int:
    """Read the half maps, post-process them, write the outputs and print the results."""
    if args.bfactor is not None and not math.isfinite(args.bfactor):
        raise InputError(f"--bfactor must be a number of Å², got {args.bfactor}")
    check_output_folder(args.outdir, force=args.force)  # before any work; again when writing
    a, apix_a = _load(args.half_a)
    b, apix_b = _load(args.half_b)
    if a.shape != b.shape:
        raise InputError(f"box {tuple(b.shape)} differs from {args.half_a}'s "
                         f"{tuple(a.shape)}", args.half_b)
    apix = _voxel_size(args, apix_a, apix_b)
    if torch.equal(a, b):
        raise InputError(f"the same map as {args.half_a}: give two independently "
                         "reconstructed half maps", args.half_b)
    mask = None if args.mask is None else _mask(args.mask, tuple(a.shape))
    done = postprocess_half_maps(a, b, pixel_size_angstrom=apix, seed=args.seed, mask=mask,
                                 bfactor_a2=args.bfactor)
    files = PostprocessFiles(args.outdir)
    summary = done.gold.to_dict()
    summary.update({
        "half_maps": [str(args.half_a), str(args.half_b)],
        "mask": (done.made_mask.to_dict() if done.made_mask is not None
                 else {"kind": "given", "path": str(args.mask)}),
        **postprocess_summary(done),
    })
    with claim_output_folder(files.dir, force=args.force,
                             command=describe_command(getattr(args, "argv", None))):
        write_postprocessed(files, done, apix or 1.0,
                            half_names=(str(args.half_a), str(args.half_b)))
        atomic_write_text(files.fsc_json, json.dumps(summary, indent=2) + "\n")
    gold, post = done.gold, done.post
    unit = "Å" if apix is not None else "px"

    def res(x: float) -> str:
        return f"{x:.2f} {unit}" if math.isfinite(x) else "–"

    print(f"FSC 0.143: unmasked {res(gold.unmasked.resolution(0.143))}, masked "
          f"{res(gold.masked.resolution(0.143))}, corrected {res(gold.final_resolution)} "
          f"(phases randomised beyond {res(gold.randomise_from_resolution)})")
    if post.fit is not None:
        print(f"B-factor {post.bfactor_a2:.0f} Å² (Guinier fit {post.fit.low_angstrom:g}–"
              f"{post.fit.high_angstrom:.2f} Å, correlation {post.fit.correlation:.3f})")
    elif args.bfactor is not None:
        print(f"B-factor {post.bfactor_a2:g} Å² (given)")
    else:
        print(f"not sharpened: {post.reason}")
    if done.local.points.shape[0]:
        print(local_resolution_brief(done.local, unit))
    print(f"wrote {files.postprocessed}, {files.postprocessed_masked.name}, {files.map.name}, "
          f"{files.mask.name}, {files.local_resolution.name}, {files.postprocess.name}, "
          f"{files.fsc_json.name}")
    return 0
