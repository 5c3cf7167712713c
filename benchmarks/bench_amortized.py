"""Can the stage-1 encoder learn poses? Winner error against optimizer steps, per encoder design.

Modes (one process, one variant at a time; the same data, seed and batch order for every variant):

* ``fixed-supervised`` — the bound: the encoder alone, trained on the true rotations (for each
  image the head closest to the truth in chordal distance ``‖R − R_gt‖²`` is trained,
  winner-take-all on the truth); no rendering.
* ``fixed-wta`` — the encoder against a *fixed* volume, the oracle backprojection of the
  training images from their true poses, with stage 1's winner-take-all Gaussian NLL.
* ``joint`` — stage 1 as the trainer runs it: encoder and volume (ab initio) trained together
  with :func:`cryospin.train.autoencode.winner_nll`.

Variants (``--variants``): ``spread`` (cryospin <= 0.2: fixed spread head rotations, one
channel, 5 max-pools), ``reference`` (BatchNorm MLP heads, pools adapted to the box),
``reference+pyramid`` (and the 5-channel Gaussian pyramid); in ``joint`` mode a suffix
``@LR`` sets the stage-1 volume learning rate (e.g. ``reference+pyramid@0.005``; default
``--decoder-lr``).

Every ``--eval-every`` steps, on ``--eval-images`` particles: the median rotation error of the
winning head (lowest NLL against the current volume; in ``fixed-supervised`` the lowest NLL
against the oracle volume), of the best head (closest to the truth: the bound of the switch),
its view-direction and in-plane parts, the share within 20°, the same modulo ``--symmetry``,
and the median spread of each head's rotations across the images. Errors of the fixed modes
are in the truth's frame (no alignment: the volume fixes it); ``joint`` errors are after the
best global alignment (and hand), as ``cryospin pose-error``. A markdown table on stdout and
the curves as JSON (``--json``).

``--encoder-lr-final F`` decays the encoder's learning rate linearly to ``F`` over the steps
after ``--encoder-lr-decay-start`` (a fraction of ``--steps``): does a stage 1 that anneals
at its end give a better switch?

``--ema D [D ...]`` also scores moving averages of the encoder's weights and BatchNorm
statistics (Polyak averaging, decay ``min(D, (1 + t) / (10 + t))`` after step ``t``, so every D
above ~0.99 follows the same warm-up memory of ~t/9 steps until ``(1 + t) / (10 + t)`` reaches
it) on the same trajectory: does the switch gain from reading an average instead of the last
step's weights? (benchmarks/RESULTS.md: it does not.)

    python benchmarks/bench_amortized.py --data DATA --mode fixed-wta --steps 3000 \\
        --variants spread reference reference+pyramid --json out.json
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_line  # noqa: E402

from cryospin.encoder import MultiHeadPoseEncoder  # noqa: E402
from cryospin.evaluate.pose_error import pose_error  # noqa: E402
from cryospin.forward.model import render  # noqa: E402
from cryospin.io.particles import load_particles  # noqa: E402
from cryospin.losses import gaussian_nll, head_spread_deg  # noqa: E402
from cryospin.report.inputs import read_poses  # noqa: E402
from cryospin.rotations import geodesic_distance_deg  # noqa: E402
from cryospin.train.autoencode import winner_nll  # noqa: E402
from cryospin.train.config import build_config  # noqa: E402
from cryospin.train.data import prepare_data, sub_disc  # noqa: E402
from cryospin.train.optimizer import adam  # noqa: E402
from cryospin.train.outputs import final_backprojection  # noqa: E402
from cryospin.train.precision import autocast_dtype  # noqa: E402
from cryospin.train.schedule import stage1_encoder_lr  # noqa: E402
from cryospin.volume import HartleyVolume  # noqa: E402

VARIANTS = {
    "spread": dict(head="spread", input_channels="image", pooling="vgg16"),
    "reference": dict(head="reference", input_channels="image", pooling="adaptive"),
    "reference+pyramid": dict(head="reference", input_channels="pyramid", pooling="adaptive"),
}


def _parse_variant(name: str, default_lr: float) -> tuple[str, dict, float]:
    base, _, lr = name.partition("@")
    if base not in VARIANTS:
        raise SystemExit(f"--variants: unknown {base!r} (choose from {', '.join(VARIANTS)})")
    return base, VARIANTS[base], float(lr) if lr else default_lr


def _scores(volume_ht: torch.Tensor, rotations: torch.Tensor, batch, data, disc) -> torch.Tensor:
    """NLL `(B, M)` of every head (no autograd), on ``disc`` (None: the training disc)."""
    freqs, neg = data.frequencies, data.negation_index
    if disc is not None:
        batch = batch.restrict(disc)
        freqs, neg = disc.frequencies, disc.negation_index
    ctf = None if batch.ctf is None else batch.ctf[:, None, :]
    with torch.no_grad():
        pred = render(volume_ht, rotations, None, ctf, frequencies=freqs, negation_index=neg)
        return gaussian_nll(pred, batch.hartley, data.noise_variance)


def _evaluate(encoder, volume_ht, data, eval_idx, gt_eval, *, aligned: bool,
              symmetry: str | None, disc) -> dict:
    was = encoder.training
    encoder.eval()
    rots, nlls = [], []
    with torch.no_grad():
        for chunk in eval_idx.split(256):
            batch = data.batch(chunk)
            r = encoder(batch.images).rotations  # (b, M, 3, 3)
            rots.append(r)
            nlls.append(_scores(volume_ht, r, batch, data, disc))
    encoder.train(was)
    rot = torch.cat(rots).double()  # (N, M, 3, 3)
    nll = torch.cat(nlls)
    n, m = rot.shape[:2]
    rows = torch.arange(n)
    winner = rot[rows, nll.argmin(dim=1)]  # (N, 3, 3)
    gt = gt_eval.double()
    out: dict = {}
    if aligned:
        res = pose_error(winner, gt)
        err, view, inplane = res.rotation_error_deg, res.view_direction_error_deg, \
            res.in_plane_error_deg
        A = torch.as_tensor(res.alignment)
        gt_f = gt if not res.flipped else torch.diag(torch.tensor([1.0, 1, -1], dtype=gt.dtype)) \
            @ gt @ torch.diag(torch.tensor([1.0, 1, -1], dtype=gt.dtype))
        heads_aligned = rot @ A.T  # (N, M, 3, 3)
        best_err = geodesic_distance_deg(heads_aligned, gt_f[:, None].expand_as(rot)).min(1).values
    else:
        res = pose_error(winner, gt, allow_flip=False)
        err = geodesic_distance_deg(winner, gt).numpy()
        view, inplane = res.view_direction_error_deg, res.in_plane_error_deg  # after alignment
        best_err = geodesic_distance_deg(rot, gt[:, None].expand_as(rot)).min(1).values
    out["winner_median_deg"] = float(np.median(err))
    out["winner_within_20"] = float(np.mean(np.asarray(err) < 20))
    out["view_median_deg"] = float(np.median(view))
    out["inplane_median_deg"] = float(np.median(inplane))
    out["best_head_median_deg"] = float(best_err.median())
    if symmetry:
        sym = pose_error(winner, gt, symmetry=symmetry, allow_flip=aligned)
        out[f"winner_median_mod_{symmetry}_deg"] = float(np.median(sym.rotation_error_deg))
    out["head_spread_median_deg"] = float(head_spread_deg(rot).median())
    usage = torch.bincount(nll.argmin(dim=1), minlength=m).double() / n
    out["head_usage_max"] = float(usage.max())
    return out


def _update_emas(emas: dict, encoder, step: int) -> None:
    """Move each average towards ``encoder``'s weights and float buffers: decay
    ``min(d, (1 + step) / (10 + step))`` (short memory at first, as TensorFlow's
    ExponentialMovingAverage); integer buffers (BatchNorm's batch count) are copied."""
    if not emas:
        return
    src = list(encoder.parameters()) + [b for b in encoder.buffers() if b.is_floating_point()]
    with torch.no_grad():
        for d, ema in emas.items():
            dst = list(ema.parameters()) + [b for b in ema.buffers() if b.is_floating_point()]
            torch._foreach_lerp_(dst, src, 1.0 - min(d, (1 + step) / (10 + step)))
            for b_dst, b_src in zip(ema.buffers(), encoder.buffers(), strict=True):
                if not b_dst.is_floating_point():
                    b_dst.copy_(b_src)


def _print_row(label: str, step: int, t_train: float, r: dict, symmetry: str | None) -> None:
    print(f"  {label} step {step}: winner {r['winner_median_deg']:.1f} deg "
          f"(best head {r['best_head_median_deg']:.1f}, view {r['view_median_deg']:.1f}"
          f", in-plane {r['inplane_median_deg']:.1f}, within 20: "
          f"{100 * r['winner_within_20']:.0f} %"
          + (f", mod {symmetry} {r[f'winner_median_mod_{symmetry}_deg']:.1f}" if symmetry else "")
          + f"), spread {r['head_spread_median_deg']:.0f} deg, max usage "
          f"{r['head_usage_max']:.2f}; {t_train:.0f} s", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", type=Path, required=True,
                   help="a `cryospin simulate` folder (particles.star, gt_poses.pkl)")
    p.add_argument("--mode", choices=["fixed-supervised", "fixed-wta", "joint"], required=True)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS))
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--eval-images", type=int, default=1024)
    p.add_argument("--heads", type=int, default=7)
    p.add_argument("--width", type=float, default=0.5)
    p.add_argument("--encoder-box", type=int, default=32)
    p.add_argument("--encoder-lr", type=float, default=1e-4)
    p.add_argument("--encoder-lr-final", type=float, default=None,
                   help="decay the encoder's learning rate linearly to this by the last step, "
                        "from step --encoder-lr-decay-start x --steps on (default: constant)")
    p.add_argument("--encoder-lr-decay-start", type=float, default=0.5,
                   help="fraction of --steps after which that decay starts")
    p.add_argument("--decoder-lr", type=float, default=0.05)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--loss-radius", type=float, default=None,
                   help="loss (and winner choice) on the disc of this radius, cycles per box "
                        "(default: the training disc)")
    p.add_argument("--symmetry", default=None, help="also score modulo this group (e.g. C3)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ema", type=float, nargs="*", default=[],
                   help="also evaluate exponential moving averages of the encoder's weights "
                        "(and BatchNorm statistics) with these decays per step, e.g. 0.999: "
                        "each is reported as variant+emaDECAY (the same trajectory, paired)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    config = build_config("default")
    particles = load_particles(args.data / "particles.star")
    data = prepare_data(particles, dataclasses.replace(config.data, max_preload_gb=1e9))
    gt_all, _ = read_poses(args.data / "particles.star", None)
    gt_all = torch.as_tensor(np.asarray(gt_all), dtype=torch.float32)
    n = len(data)
    eval_idx = torch.randperm(n, generator=torch.Generator().manual_seed(123))[:args.eval_images]
    print(f"{args.data}: {n} particles, box {data.box_px} px; mode {args.mode}; batch "
          f"{args.batch}, {args.heads} heads, width {args.width}, encoder box "
          f"{args.encoder_box}, {args.precision}; {machine_line()}\n", flush=True)
    disc = (None if args.loss_radius is None
            else sub_disc(data.frequencies, data.box_px, args.loss_radius))
    oracle = None
    if args.mode != "joint":
        t0 = time.perf_counter()
        oracle = HartleyVolume.from_real_space(
            final_backprojection(particles, data, gt_all, None).double()).float()
        print(f"oracle backprojection: {time.perf_counter() - t0:.0f} s", flush=True)
    curves: dict[str, list[dict]] = {}
    for name in args.variants:
        _, kwargs, lr = _parse_variant(name, args.decoder_lr)
        torch.manual_seed(args.seed)
        enc = MultiHeadPoseEncoder(
            data.box_px, args.heads, width_multiplier=args.width, head_hidden=256,
            input_box_px=min(args.encoder_box, data.box_px),
            autocast_dtype=autocast_dtype(args.precision), **kwargs)
        enc_opt = adam(enc.parameters(), args.encoder_lr)
        emas = {d: copy.deepcopy(enc) for d in args.ema}
        if args.mode == "joint":
            gen = torch.Generator().manual_seed(args.seed + 1)
            volume = HartleyVolume.ab_initio(data.box_px, data.radial_amplitude.cpu(),
                                             generator=gen)
            vol_opt = adam(volume.parameters(), lr)
        else:
            volume, vol_opt = oracle, None
        order = torch.Generator().manual_seed(args.seed + 2)
        t_train = 0.0
        step = 0

        def record(step: int, t_train: float, enc=enc, volume=volume, name=name,
                   emas=emas) -> None:
            with torch.no_grad():
                vol_ht = volume()
            for label, model in [(name, enc)] + [(f"{name}+ema{d:g}", e) for d, e in emas.items()]:
                r = _evaluate(model, vol_ht, data, eval_idx, gt_all[eval_idx],
                              aligned=args.mode == "joint", symmetry=args.symmetry, disc=disc)
                r.update(step=step, train_s=round(t_train, 1))
                curves.setdefault(label, []).append(r)
                _print_row(label, step, t_train, r, args.symmetry)

        record(0, 0.0)
        while step < args.steps:
            perm = torch.randperm(n, generator=order)
            for idx in perm.split(args.batch):
                if step >= args.steps:
                    break
                t0 = time.perf_counter()
                if args.encoder_lr_final is not None:
                    for group in enc_opt.param_groups:
                        group["lr"] = stage1_encoder_lr(step, args.steps, args.encoder_lr,
                                                        args.encoder_lr_final,
                                                        args.encoder_lr_decay_start)
                batch = data.batch(idx)
                if args.mode == "fixed-supervised":
                    rot = enc(batch.images).rotations  # (B, M, 3, 3)
                    gt = gt_all[idx][:, None].expand_as(rot)
                    loss = ((rot - gt) ** 2).sum(dim=(-2, -1)).min(dim=1).values.mean()
                else:
                    vol_ht = volume() if vol_opt is not None else volume().detach()
                    loss = winner_nll(enc, vol_ht, batch, data, disc)[0].mean()
                enc_opt.zero_grad(set_to_none=True)
                if vol_opt is not None:
                    vol_opt.zero_grad(set_to_none=True)
                loss.backward()
                enc_opt.step()
                if vol_opt is not None:
                    vol_opt.step()
                step += 1
                t_train += time.perf_counter() - t0
                _update_emas(emas, enc, step)
                if step % args.eval_every == 0 or step == args.steps:
                    record(step, t_train)
        if args.json is not None:
            args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                             "machine": machine_line(), "curves": curves},
                                            indent=1))
    sym = f" mod {args.symmetry}" if args.symmetry else ""
    print(f"\n| variant | step | train s | winner median (°) | best head (°) | view (°) | "
          f"in-plane (°) | within 20° |{' winner' + sym + ' (°) |' if sym else ''} "
          "head spread (°) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if sym else "") + "---:|")
    for name, rows in curves.items():
        for r in rows:
            extra = (f" {r[f'winner_median_mod_{args.symmetry}_deg']:.1f} |" if sym else "")
            print(f"| {name} | {r['step']} | {r['train_s']:.0f} | {r['winner_median_deg']:.1f} | "
                  f"{r['best_head_median_deg']:.1f} | {r['view_median_deg']:.1f} | "
                  f"{r['inplane_median_deg']:.1f} | {100 * r['winner_within_20']:.0f} % |"
                  f"{extra} {r['head_spread_median_deg']:.0f} |")
    print(f"\n    python {' '.join(sys.argv)}")


if __name__ == "__main__":
    main()
