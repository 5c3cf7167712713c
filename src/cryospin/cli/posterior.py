"""``cryospin posterior``: :func:`main` runs it; its help and flags are in
:mod:`cryospin.cli.flags.posterior`."""

from __future__ import annotations

import argparse

import numpy as np

from cryospin.atomic import atomic_path
from cryospin.errors import InputError
from cryospin.healpix import healpix_vectors
from cryospin.io.particles import load_particles
from cryospin.plotting import plot_pose_posterior
from cryospin.posterior import run_posteriors
from cryospin.rundir import RunFiles
from cryospin.runlock import check_output_folder, claim_output_folder, describe_command
from cryospin.train.config import load_config

__all__ = ["main"]


def _parse_indices(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise InputError(f"--particles must be comma-separated integers, got {text!r}") from None
    if not values:
        raise InputError("--particles names no particle")
    return list(dict.fromkeys(values))


def main(args: argparse.Namespace) -> int:
    """Compute, plot and save the posteriors; print where they are."""
    indices = _parse_indices(args.particles)
    if args.nside < 1:
        raise InputError(f"--nside must be >= 1, got {args.nside}")
    run_dir = args.run_dir
    if not run_dir.is_dir():
        raise InputError("run folder not found", run_dir)
    out = args.output if args.output is not None else run_dir / "posterior"
    check_output_folder(out, force=args.force)  # before any work; again when writing
    config_path = RunFiles(run_dir).config
    config = load_config(config_path)
    if config.input.particles is None:
        raise InputError("the run's config.yaml names no particles", config_path)
    particles = load_particles(config.input.particles, ctf_pkl=config.input.ctf,
                               ind=config.input.ind, datadir=config.input.datadir,
                               no_ctf=config.data.no_ctf)
    results = run_posteriors(run_dir, particles, indices, nside=args.nside,
                             psi_steps=args.psi_steps, loss_radius_px=args.loss_radius)
    nan_rot = np.full((3, 3), np.nan)
    with claim_output_folder(out, force=args.force,
                             command=describe_command(getattr(args, "argv", None))):
        for r in results:
            plot_pose_posterior(r, args.nside, out / f"posterior_{r.particle}.png")
        with atomic_path(out / "posterior.npz") as tmp, open(tmp, "wb") as fh:
            np.savez(
                fh, nside=np.int64(args.nside), psi_steps=np.int64(args.psi_steps),
                particles=np.array([r.particle for r in results], np.int64),
                directions=healpix_vectors(args.nside),
                log_posterior=np.stack([r.log_posterior for r in results]),
                final_rotations=np.stack([nan_rot if r.final_rotation is None
                                          else r.final_rotation for r in results]),
                shifts_px=np.stack([r.shift_px for r in results]),
            )
    for r in results:
        best = int(np.argmax(r.log_posterior))
        print(f"particle {r.particle}: max posterior {np.exp(r.log_posterior[best]):.3g} "
              f"in pixel {best} of {r.log_posterior.size}")
    print(f"wrote {len(results)} figures and posterior.npz to {out}")
    return 0
