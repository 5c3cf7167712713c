"""``cryospin simulate``: :func:`main` runs it; its help and flags are in
:mod:`cryospin.cli.flags.simulate`."""

from __future__ import annotations

import argparse
import time

from cryospin.errors import InputError
from cryospin.runlock import claim_output_folder, describe_command
from cryospin.simulate import simulate_dataset


def main(args: argparse.Namespace) -> int:
    """Run the simulation and print a summary."""
    if args.chunk < 1:
        raise InputError(f"--chunk must be >= 1, got {args.chunk}")
    t0 = time.perf_counter()
    # a folder that holds files is refused unless --force; one process writes it at a time
    with claim_output_folder(args.outdir, force=args.force,
                             command=describe_command(getattr(args, "argv", None))):
        ds = simulate_dataset(
            args.structure, args.outdir, n_particles=args.n_particles, box_px=args.box,
            pixel_size_angstrom=args.pixel_size, snr=args.snr, seed=args.seed,
            shift_std_px=args.shift_std_px, apply_ctf=not args.no_ctf,
            defocus_min_um=args.defocus_min_um, defocus_max_um=args.defocus_max_um,
            astigmatism_angstrom=args.astigmatism_angstrom, voltage_kv=args.voltage_kv,
            cs_mm=args.cs_mm, amplitude_contrast=args.amplitude_contrast,
            resolution_angstrom=args.resolution_angstrom, chunk_size=args.chunk,
            write_clean=args.write_clean, select=args.select, symmetry=args.symmetry,
            progress=not args.no_progress,
        )
    print(f"simulated {len(ds.particles)} particles of {ds.box_px} px at "
          f"{ds.pixel_size_angstrom:g} Å/px in {time.perf_counter() - t0:.1f} s")
    print(f"  SNR {ds.snr:g}: clean variance {ds.clean_variance:.6g}, "
          f"noise sigma {ds.noise_sigma:.6g}; seed {ds.seed}")
    for key, path in ds.paths.items():
        print(f"  {key:15s} {path}")
    return 0
