"""Fourier-crop a particle stack to a smaller box (coarser pixels), streamed in chunks.

Reads PARTICLES (.star, .cs, .txt or .mrcs), crops every image's centred Fourier transform to
--box pixels (pixel values kept: a constant image stays constant), writes OUT.mrcs and, with
--out-star, a RELION 3.1 star with pixel size × L_old/L_new, carrying every column of the input
(image names point at OUT.mrcs, relative to the star's folder or --relative-to). Shifts are kept
in Å (their pixel values scale by L_new/L_old); CTF and poses are unchanged.

Example::

    cryospin downsample particles.star -o particles.64.mrcs --box 64 --out-star particles.64.star
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from cryospin.errors import InputError, OutputError

if TYPE_CHECKING:  # imported where used: `cryospin --help` does not load torch
    from cryospin.io.particles import ParticleSet


def add_args(parser: argparse.ArgumentParser) -> None:
    """Register the flags of ``cryospin downsample``."""
    parser.add_argument("particles", type=Path, help=".star, .cs, .txt or .mrcs")
    parser.add_argument("-o", "--out", type=Path, required=True, help="output .mrcs")
    parser.add_argument("--box", type=int, required=True, help="new box size, px")
    parser.add_argument("--out-star", type=Path, default=None, help="output RELION 3.1 star")
    parser.add_argument("--relative-to", type=Path, default=None, metavar="DIR",
                        help="image paths in --out-star relative to DIR (default: to the "
                             "star's folder)")
    parser.add_argument("--chunk", type=int, default=1000, help="images per block (default 1000)")
    parser.add_argument("--datadir", type=Path, default=None, help="folder holding the stacks")
    parser.add_argument("--optics-group", default=None, metavar="N|NAME",
                        help="only this optics group of a .star (rlnOpticsGroup number or name)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def downsample_particles(
    particles: ParticleSet,
    new_box: int,
    out_mrcs: Path,
    *,
    chunk: int = 1000,
    progress: bool = False,
) -> ParticleSet:
    """Fourier-crop every image to ``new_box`` into ``out_mrcs``; return the new particle set.

    Images are cropped in float64 and written as float32; the new pixel size is
    ``pixel_size · L / new_box`` and ``shifts_px`` scale by ``new_box / L`` (same Å).
    """
    import numpy as np
    import torch
    from tqdm import tqdm

    from cryospin.forward.resample import fourier_crop_2d
    from cryospin.io.mrc import StackWriter

    L, n = particles.box_px, len(particles)
    with StackWriter(out_mrcs, n, new_box, particles.pixel_size_angstrom * L / new_box) as w, \
            tqdm(total=n, unit="img", desc="downsampling", disable=not progress,
                 file=sys.stderr) as bar:
        for s in range(0, n, chunk):
            idx = np.arange(s, min(s + chunk, n))
            imgs = torch.from_numpy(particles.images_numpy(idx)).double()  # (b, L, L)
            if not torch.isfinite(imgs).all():
                raise InputError(f"NaN/Inf pixels among images {s}..{idx[-1]}", particles.source)
            w.write(fourier_crop_2d(imgs, new_box).float())
            bar.update(idx.size)
    factor = new_box / L
    return dataclasses.replace(
        particles,
        stack_paths=(Path(out_mrcs).resolve(),),
        stack_index=np.zeros(n, dtype=np.int64),
        image_index=np.arange(n, dtype=np.int64),
        box_px=int(new_box),
        pixel_size_angstrom=particles.pixel_size_angstrom / factor,
        shifts_px=None if particles.shifts_px is None else particles.shifts_px * factor,
        names=None,
    )


@contextlib.contextmanager
def _parent_folders(*paths: Path | None) -> Iterator[None]:
    """Create the missing folders above ``paths``; remove those it created (when still empty)
    if that or the body fails, so that a failed command leaves nothing behind."""
    created: list[Path] = []
    try:
        for path in paths:
            if path is None:
                continue
            folder = path.absolute().parent
            created += [d for d in (folder, *folder.parents) if not d.exists()]
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                reason = "a file is in the way" if isinstance(exc, FileExistsError) else (
                    exc.strerror or type(exc).__name__)
                raise OutputError(f"cannot create the folder {path.parent} ({reason})",
                                  path) from None
        yield
    except BaseException:
        for folder in sorted(created, key=lambda d: len(d.parts), reverse=True):
            with contextlib.suppress(OSError):  # not there, or something else is in it
                folder.rmdir()
        raise


def main(args: argparse.Namespace) -> int:
    """Downsample and print where the outputs are."""
    from cryospin.io.particles import load_particles
    from cryospin.io.star import write_relion_star

    if args.chunk < 1:
        raise InputError(f"--chunk must be >= 1, got {args.chunk}")
    has_metadata = args.particles.suffix.lower() in (".star", ".cs")
    try:  # keep the CTF when the metadata has one
        ps = load_particles(args.particles, datadir=args.datadir, no_ctf=not has_metadata,
                            check_finite=False, optics_group=args.optics_group)
    except InputError as exc:
        if not has_metadata or "CTF" not in str(exc).upper():
            raise
        ps = load_particles(args.particles, datadir=args.datadir, no_ctf=True,
                            check_finite=False, optics_group=args.optics_group)
    if not 1 <= args.box <= ps.box_px:
        raise InputError(f"--box must be between 1 and the current box {ps.box_px} px, "
                         f"got {args.box}", args.particles)
    if args.out.suffix.lower() not in (".mrcs", ".mrc"):
        raise InputError("output stack must end in .mrcs", args.out)
    if ps.pixel_size_angstrom <= 0 and args.out_star is not None:
        raise InputError("no pixel size known (header and metadata): cannot write a star",
                         args.particles)
    with _parent_folders(args.out, args.out_star):
        new = downsample_particles(ps, args.box, args.out, chunk=args.chunk,
                                   progress=not args.no_progress)
        if args.out_star is not None:
            write_relion_star(args.out_star,
                              dataclasses.replace(new, source=args.out_star.resolve()),
                              relative_to=args.relative_to)
    print(f"downsampled {len(new)} images {ps.box_px} -> {new.box_px} px, pixel size "
          f"{ps.pixel_size_angstrom:g} -> {new.pixel_size_angstrom:g} Å: {args.out}")
    if args.out_star is not None:
        print(f"  star: {args.out_star}")
    return 0
