"""``cryospin downsample``: :func:`main` runs it; its help and flags are in
:mod:`cryospin.cli.flags.downsample`."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cryospin.errors import InputError, OutputError
from cryospin.forward.resample import fourier_crop_2d
from cryospin.io.mrc import StackWriter
from cryospin.io.particles import ParticleSet, load_particles
from cryospin.io.star_write import write_relion_star


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
