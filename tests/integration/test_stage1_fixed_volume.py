"""Stage 1's encoder learns poses against a fixed volume (issue 14's tiny fixed-volume run).

The encoder (reference heads, Gaussian pyramid input, pools adapted to the box: the paper
presets' design) is trained with stage 1's winner-take-all Gaussian NLL against a *fixed*
volume, the Wiener backprojection of the training images from their true poses (the oracle of
``benchmarks/bench_amortized.py --mode fixed-wta``). With the volume fixed, the truth's frame
is the volume's, so the winner's error needs no alignment. At 24 px, SNR 10, 2,000 particles,
400 steps of 32 (measured: winner median 96.7 deg at step 0, 77.7 deg at 300, 64.1 deg at
400; random rotations give about 126 deg), the error must fall by at least 15 deg.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from tests._synthetic import make_dataset

from cryospin.encoder import MultiHeadPoseEncoder
from cryospin.io.particles import load_particles
from cryospin.rotations import geodesic_distance_deg
from cryospin.train.autoencode import winner_nll
from cryospin.train.config import build_config
from cryospin.train.data import TrainingData, prepare_data
from cryospin.train.outputs import final_backprojection
from cryospin.volume import HartleyVolume

BOX_PX, N_PARTICLES, SNR, STEPS, BATCH = 24, 2000, 10.0, 400, 32


def _winner_median_deg(encoder: MultiHeadPoseEncoder, volume_ht: torch.Tensor,
                       data: TrainingData, gt: torch.Tensor, idx: torch.Tensor) -> float:
    """Median geodesic error (deg) of the lowest-NLL head on the particles ``idx``."""
    encoder.eval()
    with torch.no_grad():
        won = winner_nll(encoder, volume_ht, data.batch(idx), data)
    encoder.train()
    return float(geodesic_distance_deg(won.rotations.double(), gt[idx].double()).median())


def test_winner_take_all_against_a_fixed_volume_reduces_the_winner_error(tmp_path: Path) -> None:
    truth = make_dataset(tmp_path / "data", box_px=BOX_PX, n=N_PARTICLES, seed=3, snr=SNR)
    particles = load_particles(truth.folder / "particles.mrcs",
                               ctf_pkl=truth.folder / "ctf.pkl")
    config = build_config("default")
    data = prepare_data(particles, dataclasses.replace(config.data, max_preload_gb=1e9))
    gt = truth.rotations.float()  # (N, 3, 3)
    oracle = final_backprojection(particles, data, gt, None).double()  # (L, L, L)
    volume_ht = HartleyVolume.from_real_space(oracle).float()().detach()

    torch.manual_seed(0)
    encoder = MultiHeadPoseEncoder(BOX_PX, 7, width_multiplier=0.25, head_hidden=64,
                                   head="reference", input_channels="pyramid",
                                   pooling="adaptive")
    optimizer = torch.optim.Adam(encoder.parameters(), lr=1e-3)
    eval_idx = torch.arange(256)
    before = _winner_median_deg(encoder, volume_ht, data, gt, eval_idx)

    order = torch.Generator().manual_seed(1)
    step = 0
    while step < STEPS:
        for idx in torch.randperm(N_PARTICLES, generator=order).split(BATCH):
            loss = winner_nll(encoder, volume_ht, data.batch(idx), data).nll.mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if step == STEPS:
                break
    after = _winner_median_deg(encoder, volume_ht, data, gt, eval_idx)

    assert before > 80.0, f"the untrained encoder is already near the truth ({before:.1f} deg)"
    assert after < before - 15.0, (
        f"winner median {before:.1f} deg -> {after:.1f} deg after {STEPS} steps")
