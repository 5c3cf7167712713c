"""Forward-model throughput and memory against box size and batch: CTF, slicing, encoder step.

For each box size ``L`` and batch ``B`` (``M`` pose hypotheses per image, default 7 as in
stage 1), one fresh process times (median of ``--repeats``):

* **CTF**: ``compute_ctf`` of ``B`` particles on the loss disc (the trainer computes it once
  per particle at load time; shown for scale);
* **decoder step**: the stage-1 loss path without the encoder: ``B·M`` central slices of the
  ``mantissa·exp(exponent)`` Hartley volume in one call, times the CTF, shifted, Gaussian NLL
  on the disc, winner-take-all over the ``M`` hypotheses, backward to the volume, the
  rotations and the shifts;
* **encoder step**: a training step of the multi-head encoder (forward, backward, Adam) at
  ``--width`` (bf16 autocast + ``channels_last`` on CPU, the trainer's settings).

Baselines, side by side (skip with ``--no-baseline``): the decoder step with one ``render``
call *per image* (each slicing its ``M`` hypotheses from the volume) instead of one call for
all ``B·M`` slices, and the encoder step in float32 without ``channels_last``. The ratio
columns are cryospin's throughput over the baseline's.

Throughput is images/s (``B`` over the step time). Memory is the increase of the process's
peak resident set (``ru_maxrss``) over its value after setting up the inputs, i.e. the
transient memory of one step.

    python benchmarks/bench_forward.py                 # L = 32, 64, 128; B = 16, 64, 256
    python benchmarks/bench_forward.py --quick         # L = 32, 64; B = 16, 64
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_line  # noqa: E402


def _time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up (allocations, kernel selection)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _ctf_fn(L: int, B: int) -> Callable[[], object]:
    from cryospin.forward.ctf import CTFParams, compute_ctf
    from cryospin.forward.lattice import disc_frequencies

    freqs = disc_frequencies(L)
    g = torch.Generator().manual_seed(0)
    params = CTFParams(
        defocus_u_angstrom=10000 + 15000 * torch.rand(B, generator=g),
        defocus_v_angstrom=10000 + 15000 * torch.rand(B, generator=g),
        defocus_angle_deg=360 * torch.rand(B, generator=g),
        voltage_kv=torch.full((B,), 300.0), cs_mm=torch.full((B,), 2.7),
        amplitude_contrast=torch.full((B,), 0.1), phase_shift_deg=torch.zeros(B),
        bfactor_a2=torch.zeros(B),
    )
    return lambda: compute_ctf(params, L, 3.4 * 64 / L, frequencies=freqs)


def _decoder_fn(L: int, B: int, M: int, *, per_image: bool = False) -> Callable[[], None]:
    from cryospin.forward.lattice import disc_frequencies, negation_permutation
    from cryospin.forward.model import render
    from cryospin.losses import gaussian_nll, winner_take_all
    from cryospin.rotations import random_rotations
    from cryospin.volume import HartleyVolume

    g = torch.Generator().manual_seed(0)
    freqs = disc_frequencies(L)
    neg = negation_permutation(freqs, L)
    P = int(freqs.shape[0])
    volume = HartleyVolume(L)
    rot = random_rotations(B * M, generator=g).reshape(B, M, 3, 3).requires_grad_()
    shifts = (2 * torch.randn(B, M, 2, generator=g)).requires_grad_()
    ctf = torch.randn(B, 1, P, generator=g)
    observed = torch.randn(B, P, generator=g)

    def step() -> None:
        volume.zero_grad(set_to_none=True)
        rot.grad = shifts.grad = None
        vol = volume()
        if per_image:  # baseline: one call per image
            pred = torch.stack([render(vol, rot[b], shifts[b], ctf[b], frequencies=freqs,
                                       negation_index=neg) for b in range(B)])
        else:
            pred = render(vol, rot, shifts, ctf, frequencies=freqs, negation_index=neg)
        loss_bm = gaussian_nll(pred, observed, 1.0)  # (B, M)
        loss, _ = winner_take_all(loss_bm)
        loss.backward()

    return step


def _encoder_fn(L: int, B: int, M: int, width: float, *, bf16: bool = True
                ) -> Callable[[], None]:
    from cryospin.encoder import MultiHeadPoseEncoder
    from cryospin.losses import winner_take_all

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    enc = MultiHeadPoseEncoder(L, M, width_multiplier=width, predict_shifts=True,
                               max_shift_px=4.0,
                               autocast_dtype=torch.bfloat16 if bf16 else None)
    opt = torch.optim.Adam(enc.parameters(), lr=1e-4)
    images = torch.randn(B, L, L, generator=g)
    target = torch.linalg.qr(torch.randn(B, 3, 3, generator=g)).Q

    def step() -> None:
        out = enc(images)
        loss_bm = (out.rotations - target[:, None]).square().sum((-2, -1))
        loss, _ = winner_take_all(loss_bm + out.shifts_px.square().sum(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _one(kind: str, L: int, B: int, M: int, width: float, repeats: int) -> dict:
    """Time and measure one configuration (run in a fresh process)."""
    if kind == "ctf":
        fn = _ctf_fn(L, B)
    elif kind in ("decoder", "decoder_per_image"):
        fn = _decoder_fn(L, B, M, per_image=kind == "decoder_per_image")
    else:
        fn = _encoder_fn(L, B, M, width, bf16=kind == "encoder")
    base = _peak_mb()
    t = _time(fn, repeats)
    return {"kind": kind, "L": L, "B": B, "seconds": t, "images_per_s": B / t,
            "step_mb": max(_peak_mb() - base, 0.0)}


def _child(kind: str, L: int, B: int, args: argparse.Namespace) -> dict:
    argv = [sys.executable, __file__, "--child", kind, str(L), str(B), "--heads", str(args.heads),
            "--width", str(args.width), "--repeats", str(args.repeats)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    out = subprocess.run(argv, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.exit(f"{kind} L={L} B={B} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _ips(r: dict[str, dict], kind: str, fmt: str = ",.0f") -> str:
    return format(r[kind]["images_per_s"], fmt)


def _ratio(r: dict[str, dict], kind: str, baseline: str) -> str:
    return f"{r[kind]['images_per_s'] / r[baseline]['images_per_s']:.2f}×"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--boxes", default="32,64,128")
    p.add_argument("--batches", default="16,64,256")
    p.add_argument("--heads", type=int, default=7)
    p.add_argument("--width", type=float, default=0.5, help="encoder width multiplier")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip the baselines (per-image decoder calls, fp32 encoder)")
    p.add_argument("--child", nargs=3, metavar=("KIND", "L", "B"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        torch.set_num_threads(args.threads if "OMP_NUM_THREADS" not in os.environ
                              else int(os.environ["OMP_NUM_THREADS"]))
        kind, L, B = args.child[0], int(args.child[1]), int(args.child[2])
        print(json.dumps(_one(kind, L, B, args.heads, args.width, args.repeats)))
        return
    if args.quick:
        args.boxes, args.batches, args.repeats = "32,64", "16,64", 3
    boxes = [int(x) for x in args.boxes.split(",")]
    batches = [int(x) for x in args.batches.split(",")]
    print(f"M = {args.heads} hypotheses per image, encoder width {args.width:g} (bf16 + "
          f"channels_last), median of {args.repeats}; {machine_line()}\n")
    base = not args.no_baseline
    kinds = ["ctf", "decoder", "encoder"]
    header = ["L", "B", "CTF (img/s)", "decoder step (img/s)"]
    if base:
        kinds += ["decoder_per_image", "encoder_fp32"]
        header += ["per-image calls (img/s)", "ratio"]
    header += ["decoder step memory (MB)", "encoder step bf16 (img/s)"]
    if base:
        header += ["fp32 (img/s)", "ratio"]
    header += ["encoder step memory (MB)"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---:|" * len(header))
    for L in boxes:
        for B in batches:
            r = {k: _child(k, L, B, args) for k in kinds}
            row = [str(L), str(B), _ips(r, "ctf"), _ips(r, "decoder")]
            if base:
                row += [_ips(r, "decoder_per_image"), _ratio(r, "decoder", "decoder_per_image")]
            row += [f"{r['decoder']['step_mb']:,.0f}", _ips(r, "encoder", ",.1f")]
            if base:
                row += [_ips(r, "encoder_fp32", ",.1f"), _ratio(r, "encoder", "encoder_fp32")]
            row += [f"{r['encoder']['step_mb']:,.0f}"]
            print("| " + " | ".join(row) + " |", flush=True)
    print(f"\n    python {' '.join(sys.argv)}")


if __name__ == "__main__":
    main()
