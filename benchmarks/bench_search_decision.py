"""The global search's decision under the true map: which pose would it choose, and on which
disc can a pseudo-symmetric particle's copies be told apart at all?

On a `cryospin simulate` set (true poses known) the oracle map is the CTF-corrected
backprojection from the true poses (`cryospin.train.outputs.final_backprojection`), in the
training's own units (noise whitened as the `default` preset does, unless `--no-whiten`).
The pseudo-symmetry `--group` is placed in it (`cryospin.train.relax.place_copies`).

1. Per disc radius (cycles/box): the share of the particles for which one of the copies
   `R g` of the true pose `R` fits better than `R` itself — the most any decision taken on
   that disc can get right.
2. The search's choice for every particle from scratch (its pose unknown): the best grid pose
   on the search's disc (today's decision, `optim.search_candidates: 1`), against its K best
   grid poses polished (`polish_rotations`) and chosen on a wider disc (`search_candidates:
   K`): the share on another copy (> 20° off, < 10° modulo the group), the share lost (> 10°
   modulo the group) and the median error, with the time per image.
3. The margin rule (`CANDIDATE_MARGIN_NATS`): the NLL on the search's disc of the best grid
   pose in another basin (> 20° away) minus that of the current pose, when the current pose
   is the true one (a large margin: nothing to decide) and when it is a wrong copy (the
   true basin must come within the margin to be weighed).

    python benchmarks/bench_search_decision.py --data SPIKE_64_COL --group C3 \
        --images 1024 --candidates 8 --sweeps 2 --radii 10,16,full
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_line  # noqa: E402

from cryospin.io.particles import load_particles  # noqa: E402
from cryospin.report.inputs import read_poses  # noqa: E402
from cryospin.rotations import geodesic_distance_deg  # noqa: E402
from cryospin.train.autodecode import (  # noqa: E402
    CANDIDATE_MARGIN_NATS,
    JUMP_THRESHOLD_DEG,
    RotationSearch,
    polish_rotations,
    pose_nll,
    search_top_poses,
)
from cryospin.train.config import build_config  # noqa: E402
from cryospin.train.data import prepare_data, sub_disc  # noqa: E402
from cryospin.train.outputs import final_backprojection  # noqa: E402
from cryospin.train.relax import place_copies  # noqa: E402
from cryospin.volume import HartleyVolume  # noqa: E402


def _radius(text: str) -> float:
    return math.inf if text == "full" else float(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, required=True,
                   help="a `cryospin simulate` folder (particles.star with the true poses)")
    p.add_argument("--group", default="C3", help="the particle's pseudo-symmetry (cyclic)")
    p.add_argument("--images", type=int, default=1024, help="the first N particles")
    p.add_argument("--candidates", type=int, default=None,
                   help="K of the polished decision (default: the default preset's)")
    p.add_argument("--sweeps", type=int, default=None,
                   help="sweeps of the pattern search (default: the default preset's)")
    p.add_argument("--radii", default="10,16,full",
                   help="decision discs, cycles per box ('full': the training disc)")
    p.add_argument("--no-whiten", action="store_true", help="white-noise likelihoods")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    config = build_config("default")
    o = config.optim
    candidates = args.candidates or max(2, o.search_candidates)
    sweeps = args.sweeps or o.search_polish_sweeps
    particles = load_particles(args.data / "particles.star")
    data = prepare_data(particles, dataclasses.replace(
        config.data, max_preload_gb=1e9, whiten_noise=not args.no_whiten))
    truth_all, _ = read_poses(args.data / "particles.star", None)
    truth_all = torch.as_tensor(np.asarray(truth_all), dtype=torch.float32)
    oracle = HartleyVolume.from_real_space(
        final_backprojection(particles, data, truth_all, None).double()).float()
    frame = place_copies(oracle, args.group)
    if frame.copies is None:
        raise SystemExit(f"{args.group}: nothing to compare (not a cyclic group other than C1)")
    group = torch.cat([torch.eye(3)[None], frame.copies.rotations.cpu()])  # (G, 3, 3)
    volume = oracle().detach()
    radii = [_radius(r) for r in args.radii.split(",")]
    print(f"{args.data}: {args.images} of {len(data)} particles, box {data.box_px} px, "
          f"whitened: {data.noise_spectrum is not None}; {args.group} placed in the oracle map, "
          f"score {float(frame.step.score):.3f}; {machine_line()}\n")

    idx = torch.arange(min(args.images, len(data)))
    search = RotationSearch.build(data, o.search_rotations, o.search_radius_px)
    discs = {r: sub_disc(data.frequencies, data.box_px, r)
             for r in [o.search_radius_px, *radii]}
    margins: dict[float, list[torch.Tensor]] = {r: [] for r in discs}
    other_basin: dict[str, list[torch.Tensor]] = {"the true pose": [], "a wrong copy": []}
    choices: dict[str, list[torch.Tensor]] = {}
    seconds: dict[str, float] = {}
    with torch.no_grad():
        for chunk in idx.split(128):
            batch = data.batch(chunk)
            truth = truth_all[chunk]
            copies = truth[:, None] @ group[1:][None]  # (B, G - 1, 3, 3)
            for r, disc in discs.items():
                sub = batch.restrict(disc)
                at_truth = pose_nll(volume, truth, None, sub, data, disc)
                at_copy = torch.stack([pose_nll(volume, copies[:, k], None, sub, data, disc)
                                       for k in range(copies.shape[1])], dim=1)
                margins[r].append(at_copy.min(dim=1).values - at_truth)
            t0 = time.perf_counter()
            grid_rot, _, _ = search_top_poses(volume, search, batch, data,
                                              top_k=candidates)  # (B, K, 3, 3)
            t_search = time.perf_counter() - t0
            coarse = batch.restrict(search.disc)
            rot8, nll8, _ = search_top_poses(volume, search, batch, data, top_k=8)
            for label, current in (("the true pose", truth), ("a wrong copy", copies[:, 0])):
                far = geodesic_distance_deg(rot8, current[:, None]) > JUMP_THRESHOLD_DEG
                best_far = torch.where(far, nll8, torch.inf).min(dim=1).values  # (B,)
                here = pose_nll(volume, current, None, coarse, data, search.disc)
                other_basin[label].append(best_far - here)
            name = f"best grid pose on {o.search_radius_px:g} cycles/box (search_candidates 1)"
            choices.setdefault(name, []).append(grid_rot[:, 0])
            seconds[name] = seconds.get(name, 0.0) + t_search
            for r in radii:
                disc = discs[r]
                sub = batch.restrict(disc)
                t0 = time.perf_counter()
                polished, nll = polish_rotations(volume, grid_rot, None, sub, data, disc,
                                                 step_deg=search.polish_step, sweeps=sweeps)
                pick = nll.argmin(dim=1)
                chosen = polished[torch.arange(len(pick)), pick]
                plural = "s" if sweeps > 1 else ""
                name = (f"{candidates} best polished ({sweeps} sweep{plural}), chosen on "
                        f"{'the training disc' if math.isinf(r) else f'{r:g} cycles/box'}")
                choices.setdefault(name, []).append(chosen)
                seconds[name] = seconds.get(name, 0.0) + t_search + time.perf_counter() - t0

    n = len(idx)
    print("| disc (cycles/box) | a copy fits better than the true pose | median margin (nats) |")
    print("|---|---:|---:|")
    for r, parts in margins.items():
        m = torch.cat(parts)
        label = "training disc" if math.isinf(r) else f"{r:g}"
        print(f"| {label} | {100 * float((m < 0).float().mean()):.1f} % | "
              f"{float(m.median()):.2f} |")
    print(f"\n| the search's choice ({n} particles) | median error | modulo {args.group} | "
          f"on another copy | lost (> 10° mod {args.group}) | ms per image |")
    print("|---|---:|---:|---:|---:|---:|")
    truth = truth_all[idx]
    for name, parts in choices.items():
        chosen = torch.cat(parts)
        err = geodesic_distance_deg(chosen, truth)
        err_mod = torch.stack([geodesic_distance_deg(chosen, truth @ g) for g in group],
                              dim=1).min(dim=1).values
        other = (err > 20) & (err_mod < 10)
        print(f"| {name} | {float(err.median()):.2f}° | {float(err_mod.median()):.2f}° | "
              f"{100 * float(other.float().mean()):.1f} % | "
              f"{100 * float((err_mod > 10).float().mean()):.1f} % | "
              f"{1000 * seconds[name] / n:.2f} |")

    print(f"\n| current pose ({n} particles) | no other basin among the 8 best | other basin "
          f"within {CANDIDATE_MARGIN_NATS:g} nats | median | 99th percentile (nats) |")
    print("|---|---:|---:|---:|---:|")
    for label, parts in other_basin.items():
        m = torch.cat(parts)
        finite = m[torch.isfinite(m)]
        print(f"| {label} | {100 * float((~torch.isfinite(m)).float().mean()):.1f} % | "
              f"{100 * float((m <= CANDIDATE_MARGIN_NATS).float().mean()):.1f} % | "
              f"{float(finite.median()):.1f} | {float(torch.quantile(finite, 0.99)):.1f} |")


if __name__ == "__main__":
    main()
