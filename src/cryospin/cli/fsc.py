"""``cryospin fsc``: :func:`main` runs it; its help and flags are in
:mod:`cryospin.cli.flags.fsc`."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from cryospin.errors import InputError
from cryospin.evaluate.align import align_maps
from cryospin.evaluate.fsc import fsc, write_fsc_json
from cryospin.io.mrc import read_cubic_map, write_map
from cryospin.plotting import plot_fsc

log = logging.getLogger(__name__)


def _load(path: Path) -> tuple[torch.Tensor, float]:
    volume, apix = read_cubic_map(path)
    return torch.from_numpy(volume), apix


def main(args: argparse.Namespace) -> int:
    """Compute (and align, plot, write) the FSC; print the resolutions."""
    a, apix_a = _load(args.map_a)
    b, apix_b = _load(args.map_b)
    if a.shape != b.shape:
        raise InputError(f"box {tuple(b.shape)} differs from {args.map_a} {tuple(a.shape)}",
                         args.map_b)
    apix = args.apix if args.apix is not None else apix_a
    if args.apix is None and apix_a > 0 and apix_b > 0 and abs(apix_a - apix_b) > 0.01 * apix_a:
        raise InputError(f"voxel size {apix_b:g} Å differs from {args.map_a} ({apix_a:g} Å); "
                         f"pass --apix to override", args.map_b)
    if not apix or apix <= 0:
        log.warning("no voxel size in %s: resolutions are in pixels", args.map_a)
        apix = None
    mask = None
    if args.mask is not None:
        mask, _ = _load(args.mask)
        if mask.shape != a.shape:
            raise InputError(f"mask box {tuple(mask.shape)} differs from the maps' "
                             f"{tuple(a.shape)}", args.mask)
    extra: dict = {"map_a": str(args.map_a), "map_b": str(args.map_b),
                   "mask": None if args.mask is None else str(args.mask)}
    if args.align:
        res = align_maps(a, b, search_hand=not args.no_flip)
        b = res.aligned
        extra["alignment"] = {
            "rotation": res.rotation.tolist(), "translation_px": res.translation_px.tolist(),
            "flipped": res.flipped, "correlation": res.correlation,
        }
        print(f"aligned {args.map_b.name} onto {args.map_a.name}: "
              f"{'mirrored hand, ' if res.flipped else ''}correlation {res.correlation:.3f}")
        if args.write_aligned is not None:
            write_map(args.write_aligned, b.float().numpy(), apix or 1.0)
    result = fsc(a, b, mask=mask, pixel_size_angstrom=apix)
    unit = "Å" if apix else "px"
    r05, r0143 = result.resolution(0.5), result.resolution(0.143)
    print(f"FSC {args.map_a.name} vs {args.map_b.name}: resolution {r05:.2f} {unit} at 0.5, "
          f"{r0143:.2f} {unit} at 0.143")
    if args.output is not None:
        write_fsc_json(result, args.output, **extra)
    if args.plot is not None:
        plot_fsc([(f"{args.map_a.name} vs {args.map_b.name}", result)], args.plot)
    return 0
