"""Plot the approximate pose posterior of chosen particles over view directions.

For each particle: log p(view direction | image) on a HEALPix grid of 12·nside² equal-area
pixels, marginalised over the in-plane angle (--psi-steps angles), under the training's image
model: the run's trained volume (checkpoint.pt), the particle's CTF and current shift, the
training noise variance and loss disc (or --loss-radius). Drawn on an equal-area (Mollweide)
map with, when the particle is in RUN_DIR/pose_track.npz, every encoder head's candidate at the
last auto-encoding epoch and the particle's path through the auto-decoding epochs; the current
(final) pose is marked. Writes OUT_DIR/posterior_<index>.png per particle and
OUT_DIR/posterior.npz (nside, psi_steps, particles, directions, log_posterior, ...);
OUT_DIR must be new or empty (--force writes into one that holds files).

Particles are 0-based indices in the run's particle order; pose_track.npz's `indices` lists
the tracked ones.

Example::

    cryospin posterior run/ --particles 0,5,17 -o run/posterior
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cryospin.cli._args import add_out_argument

__all__ = ["add_args", "main"]


def add_args(parser: argparse.ArgumentParser) -> None:
    """Register the flags of ``cryospin posterior``."""
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="run folder")
    parser.add_argument("--particles", required=True, metavar="I,J,...",
                        help="comma-separated 0-based particle indices")
    parser.add_argument("--nside", type=int, default=8,
                        help="HEALPix resolution: 12·nside² view directions (default 8)")
    parser.add_argument("--psi-steps", type=int, default=36, metavar="S",
                        help="in-plane angles marginalised over (default 36, i.e. 10°)")
    parser.add_argument("--loss-radius", type=float, default=None, metavar="PX",
                        help="score on the disc |k| <= PX (cycles per box) only "
                             "(default: the training disc)")
    add_out_argument(parser, dest="output", aliases=("--output",), type=Path, default=None,
                     metavar="OUT_DIR",
                     help="output folder, new or empty (default RUN_DIR/posterior)")
    parser.add_argument("--force", action="store_true",
                        help="write into a folder that already holds files (files of the same "
                             "names are replaced, others kept)")


def _parse_indices(text: str) -> list[int]:
    from cryospin.errors import InputError

    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise InputError(f"--particles must be comma-separated integers, got {text!r}") from None
    if not values:
        raise InputError("--particles names no particle")
    return list(dict.fromkeys(values))


def main(args: argparse.Namespace) -> int:
    """Compute, plot and save the posteriors; print where they are."""
    import numpy as np

    from cryospin.atomic import atomic_path
    from cryospin.errors import InputError
    from cryospin.evaluate.posterior import healpix_vectors, run_posteriors
    from cryospin.io.particles import load_particles
    from cryospin.plotting import plot_pose_posterior
    from cryospin.rundir import RunFiles
    from cryospin.runlock import check_output_folder, claim_output_folder, describe_command
    from cryospin.train.config import load_config

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
