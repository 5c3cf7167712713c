"""Peer row: cryoDRGN's homogeneous ab initio reconstruction on a cryospin-simulated dataset.

cryoDRGN is GPL-3, so it is never imported here: it is installed into its own virtual environment
(``--venv``, created on first use with ``python3.11 -m venv`` and ``pip install
cryodrgn==4.3.1 torch==2.13.0``) and run only as a separate program (subprocess). Its outputs
are then evaluated with cryospin's own tools (``cryospin fsc --align``, ``cryospin pose-error``),
exactly as ``bench_reconstruct.py`` evaluates cryospin.

Command. In cryoDRGN 4.x homogeneous ab initio is ``cryodrgn abinit --zdim 0`` (cryoDRGN-AI:
pretraining on random poses, ``--epochs-pose-search`` epochs (default 3) of hierarchical pose
search, then the remaining epochs autodecode a pose table by SGD; the log says "Homogeneous
reconstruction"). The 3.x ``abinit_homo`` survives as ``abinit_homo_old`` and is not used.
``--epochs`` is passed as ``-n`` (total epochs, pose search included); the default, 12, is the
epoch count of cryospin's ``default`` preset. Every other setting is cryoDRGN's own default
(implicit neural volume, 10,000 pretraining images, ...) except:

* ``--no-trans`` when ``simulation.json`` says ``shift_std_px == 0`` (cryospin's default preset
  does not predict shifts either; ``--search-shifts`` overrides);
* ``--no-amp`` (AMP is CUDA-only; on a CPU it would only warn), ``--no-analysis`` (cryoDRGN's
  post-hoc plots, not part of the reconstruction), ``--num-workers 0`` and ``--max-threads``
  = ``--threads`` (the machine is shared), ``--seed``.

Flags after ``--`` are passed to ``cryodrgn abinit`` and override these (argparse keeps the
last value), e.g. ``-- --epochs-pose-search 2``. Cost: cryoDRGN's hierarchical pose search is
slow on a CPU (one batch of 16 images evaluates its neural volume on thousands of slices; about
a minute per batch at 32 px on one shared core), so a smoke run should use ``--n-particles``.
The pretraining epoch stops after one pass over the data even when ``--n-imgs-pretrain``
(default 10,000) is larger.

``--fast`` (opt-in; the default run is unchanged) makes 3,000 particles at 48 px fit in about
40 min on 2 threads. It keeps cryoDRGN's method (random-pose pretraining, hierarchical pose
search over the same base healpy grid, then pose autodecoding; implicit neural volume) and
shrinks only sizes (measured on one thread at 48 px, CPU s per image; default -> fast)::

    --dim 128 --pe-dim 32        MLP 256 -> 128 wide, 64 -> 32 Fourier features (296k -> 74k
                                 parameters); pretrain 65 -> 23 ms, autodecoding 83 -> 35 ms
    --nkeptposes 4 --niter 3     8 -> 4 poses kept per image, 4 -> 3 refinements (final grid
                                 step ~1.9 deg instead of ~0.9; base grid: healpy order 2)
    --l-end 20                   pose search up to 20 px radius (10.9 A) instead of Nyquist (24);
                                 the autodecoding epochs still fit all frequencies
    --epochs-pose-search 2       pose-search epochs 3 -> 2 (cryoDRGN's stated minimum)
    --t-extent 0 --t-ngrid 1     only with --no-trans: no translation search (default searches
                                 196 shifts up to +-20 px that --no-trans then ignores)

Pose search: ~4.6 s (default) -> 0.48 s per image. Predicted for 3,000 particles, ``-n 12``:
default ~12 h on one thread; ``--fast`` ~66 min on one thread, ~40 min on two (assumed 1.7x).

Inputs. The particles are the dataset's ``particles.star`` (RELION 3.1, ``--datadir`` = the
dataset folder), the same file cryospin reads. ``ctf.pkl`` is made by cryoDRGN's own
``cryodrgn parse_ctf_star`` in the peer venv (the parameters map one to one, docs/conventions.md
"RELION and cryoSPARC"); its box and pixel size are checked against ``simulation.json``.

Contrast. cryospin simulates **bright** particles, ``image = CTF ⊛ P`` with the CTF positive at
DC (RELION's sign). cryoDRGN's CTF is the negative of ours (``−w`` at DC) and cryoDRGN therefore
negates the images by default, so that ``−image = CTF_cryoDRGN ⊛ P`` with the same positive
``P`` (docs/conventions.md "Contrast" and "CTF"). The right choice for cryospin's bright stacks
is hence cryoDRGN's default: **no** ``--uninvert-data`` (that flag is for dark, raw-contrast
stacks such as EMPIAR-10076). This is checked on every run: ``cryodrgn backproject_voxel``
with the true poses (the dataset's ``gt_poses.pkl``, cryoDRGN's format) and the same inversion
must give a map that correlates positively with ``gt.mrc`` without any alignment (smoke
dataset: Pearson r = 0.94, FSC=0.5 at 21.6 Å, which also confirms that cryoDRGN's ``rot`` is
cryospin's ``R``). The result is in the JSON (``oracle_check``).

Outputs of cryoDRGN read here: the last ``reconstruct.N.mrc`` (voxel size = the CTF pixel size;
``--apix`` from ``simulation.json`` is passed to ``cryospin fsc`` anyway) and ``pose.N.pkl``:
``rot`` `(N, 3, 3)`, which equals cryospin's ``R`` (both sample the volume at ``k @ R``,
docs/conventions.md "Rotations and poses"), and, unless ``--no-trans``, ``trans`` `(N, 2)`.
Unlike the legacy commands (fraction of the box), ``cryodrgn abinit`` stores ``trans`` in
**pixels** (its pose search and pose table feed it straight to ``Lattice.translate_ht``, whose
frequencies are in cycles per pixel), with the legacy sign (translating the image by ``+trans``
centres it), so ``shift_px = −trans``. The poses are rewritten as a standard cryoDRGN pose
pickle (``trans`` as a fraction of the box) with ``cryospin.io.pkl.write_cryodrgn_poses`` and
compared with ``cryospin pose-error`` against ``particles.star`` (modulo the point group when
``simulation.json`` names one, as ``bench_methods.py`` does for its symmetric particle).

Prints a Markdown row (method, wall time, peak RSS from ``os.wait4``, median/mean rotation error,
FSC = 0.5 and 0.143 resolutions against the ground truth, aligned, both hands) and writes
WORKDIR/peer_cryodrgn.json. Example (smoke size)::

    cryospin simulate bundled:6vyb -o bench_out/peer_smoke/data --n-particles 1000 --box 32 \\
        --pixel-size 6.8 --snr 0.1 --seed 0 --no-progress
    OMP_NUM_THREADS=1 python benchmarks/peer_cryodrgn.py --dataset bench_out/peer_smoke/data \\
        --workdir bench_out/peer_smoke/cryodrgn --epochs 1 --threads 1 --n-particles 160

and for the full comparison on the dataset of ``bench_reconstruct.py`` (12 epochs, hours;
add ``--fast`` for ~40 min at 48 px, 3,000 particles)::

    python benchmarks/peer_cryodrgn.py --dataset bench_out/spike64/data \
        --workdir bench_out/spike64/cryodrgn --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cryospin_argv, markdown_table, run  # noqa: E402

CRYODRGN_VERSION = "4.3.1"
TORCH_VERSION = "2.13.0"
INSTALL_RECORD = "cryospin-peer-install.json"
#: ``--fast``: cryoDRGN's method with a smaller MLP volume and pose-search grid (module docstring).
FAST_FLAGS = ["--dim", "128", "--pe-dim", "32", "--nkeptposes", "4", "--niter", "3",
              "--l-end", "20", "--epochs-pose-search", "2"]
#: added by ``--fast`` when ``--no-trans``: no translation search (its result would be ignored).
FAST_NO_TRANS_FLAGS = ["--t-extent", "0", "--t-ngrid", "1"]


def ensure_venv(venv: Path, version: str, log: Path) -> float | None:
    """Create ``venv`` and install cryoDRGN ``version`` with torch 2.13.0 unless present.

    Returns the install wall time in seconds, or None when the venv was already there.
    """
    exe = venv / "bin" / "cryodrgn"
    if exe.exists() and installed_version(venv) == version:
        return None
    t0 = time.perf_counter()
    if not (venv / "bin" / "python").exists():
        run(["python3.11", "-m", "venv", str(venv)], log)
    run([str(venv / "bin" / "python"), "-m", "pip", "install",
         f"cryodrgn=={version}", f"torch=={TORCH_VERSION}"], log)
    wall = time.perf_counter() - t0
    (venv / INSTALL_RECORD).write_text(json.dumps(
        {"cryodrgn": version, "torch": TORCH_VERSION, "install_s": wall}, indent=2) + "\n")
    return wall


def installed_version(venv: Path) -> str | None:
    """The version printed by ``cryodrgn --version`` in ``venv`` (None if it does not run)."""
    try:
        out = subprocess.run([str(venv / "bin" / "cryodrgn"), "--version"], capture_output=True,
                             text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    m = re.search(r"(\d+\.\d+\.\d+\S*)", out)
    return m.group(1) if m else None


def last_epoch(outdir: Path) -> int:
    """Largest N with both ``reconstruct.N.mrc`` and ``pose.N.pkl`` in ``outdir``."""
    epochs = [int(p.stem.split(".")[1]) for p in outdir.glob("pose.*.pkl")
              if p.stem.split(".")[1].isdigit()]
    epochs = [n for n in epochs if (outdir / f"reconstruct.{n}.mrc").exists()]
    if not epochs:
        sys.exit(f"no pose.N.pkl / reconstruct.N.mrc pair in {outdir}")
    return max(epochs)


def convert_poses(src: Path, dst: Path, box_px: int) -> None:
    """Rewrite ``cryodrgn abinit``'s pose pickle (trans in pixels) as a standard one.

    ``rot`` is kept; ``shift_px = −trans_px`` is written back by
    :func:`cryospin.io.pkl.write_cryodrgn_poses` as ``trans = −shift_px / box_px``.
    """
    from cryospin.io.pkl import safe_load_pickle, write_cryodrgn_poses

    obj = safe_load_pickle(src)
    rot, trans_px = (obj[0], obj[1]) if isinstance(obj, (tuple, list)) else (obj, None)
    rot = np.asarray(rot, dtype=np.float64)
    trans_px = (np.zeros((rot.shape[0], 2)) if trans_px is None
                else np.asarray(trans_px, dtype=np.float64))
    write_cryodrgn_poses(dst, rot, -trans_px, box_px)


def write_gt_subset(star: Path, dst: Path, n: int) -> None:
    """The true poses of the first ``n`` particles of ``star`` as a cryoDRGN pose pickle."""
    from cryospin.io.particles import load_particles
    from cryospin.io.pkl import write_cryodrgn_poses

    ps = load_particles(star, metadata_only=True, no_ctf=True, check_finite=False)
    if not 0 < n <= len(ps):
        sys.exit(f"--n-particles {n}: {star} has {len(ps)} particles")
    write_cryodrgn_poses(dst, ps.rotations[:n], ps.shifts_px[:n], ps.box_px)


def check_oracle(drgn: str, data: Path, ctf_pkl: Path, work: Path, apix: float, log: Path,
                 abinit_argv: list[str]) -> dict:
    """Convention check: ``cryodrgn backproject_voxel`` with the TRUE poses (``gt_poses.pkl``).

    Same particles, ``--datadir``, ``--ind`` and inversion as the ab initio run; a map that
    correlates positively with ``gt.mrc`` without any alignment confirms the contrast, the CTF
    and the rotation convention. Returns the Pearson r and the FSC resolutions (unaligned).
    """
    import mrcfile

    out = work / "oracle_backproject"
    argv = [drgn, "backproject_voxel", str(data / "particles.star"), "--datadir", str(data),
            "--poses", str(data / "gt_poses.pkl"), "--ctf", str(ctf_pkl), "-o", str(out),
            "--no-half-maps", "--no-fsc-vals"]
    if "--ind" in abinit_argv:
        argv += ["--ind", abinit_argv[abinit_argv.index("--ind") + 1]]
    run(argv, log)
    run(cryospin_argv() + ["fsc", str(data / "gt.mrc"), str(out / "backproject.mrc"),
                           "--apix", str(apix), "-o", str(work / "fsc_oracle.json")], log)
    with mrcfile.open(data / "gt.mrc", permissive=True) as a, \
            mrcfile.open(out / "backproject.mrc", permissive=True) as b:
        r = float(np.corrcoef(np.asarray(a.data, float).ravel(),
                              np.asarray(b.data, float).ravel())[0, 1])
    fsc = json.loads((work / "fsc_oracle.json").read_text())
    if r <= 0:
        print(f"WARNING: cryoDRGN's true-pose backprojection correlates negatively with the "
              f"ground truth (r = {r:.3f}): contrast or convention mismatch", file=sys.stderr)
    return {"pearson_r_vs_gt": r, "resolution_0.5_angstrom": fsc["resolution_0.5_angstrom"],
            "resolution_0.143_angstrom": fsc["resolution_0.143_angstrom"]}


def _angstrom(value: float | None) -> str:
    """``12.34 Å``, or ``n/a`` for a missing (non-finite) resolution."""
    return "n/a" if value is None else f"{value:.2f} Å"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dataset", type=Path, required=True,
                   help="a `cryospin simulate` output folder")
    p.add_argument("--workdir", type=Path, default=Path("bench_out/peer_cryodrgn"))
    p.add_argument("--epochs", type=int, default=12,
                   help="cryodrgn abinit -n (total epochs incl. pose search); default 12")
    p.add_argument("--venv", type=Path, default=Path("bench_out/venv-cryodrgn"))
    p.add_argument("--cryodrgn-version", default=CRYODRGN_VERSION)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")),
                   help="torch threads of cryoDRGN (default: $OMP_NUM_THREADS or 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-particles", type=int, default=None,
                   help="use only the first N particles (cryodrgn --ind N; smoke runs)")
    p.add_argument("--fast", action="store_true",
                   help="smaller volume MLP and pose-search grid (see FAST_FLAGS and above)")
    p.add_argument("--search-shifts", action="store_true",
                   help="search translations even when the simulation has none")
    p.add_argument("extra", nargs="*", help="extra flags for `cryodrgn abinit` (after --)")
    args = p.parse_args()

    data: Path = args.dataset
    for name in ("particles.star", "gt.mrc", "gt_poses.pkl", "simulation.json"):
        if not (data / name).exists():
            sys.exit(f"{data / name}: not found (expected a `cryospin simulate` folder)")
    sim = json.loads((data / "simulation.json").read_text())
    box_px, apix = int(sim["box_px"]), float(sim["pixel_size_angstrom"])
    work: Path = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    log = work / "peer.log"
    log.write_text("")  # one run per log
    venv = args.venv.resolve()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # every child, cryoDRGN and cryospin
        os.environ[var] = str(args.threads)

    install_s = ensure_venv(venv, args.cryodrgn_version, log)
    version = installed_version(venv)
    if version is None:
        sys.exit(f"cryodrgn does not run in {venv} (see {log})")
    record = venv / INSTALL_RECORD
    if install_s is None and record.exists():
        install_s = json.loads(record.read_text()).get("install_s")
    drgn = str(venv / "bin" / "cryodrgn")

    ctf_pkl = work / "ctf.pkl"
    run([drgn, "parse_ctf_star", str(data / "particles.star"), "-o", str(ctf_pkl)], log)
    from cryospin.io.pkl import read_cryodrgn_ctf

    _, ctf_box, ctf_apix = read_cryodrgn_ctf(ctf_pkl)
    if ctf_box != box_px or abs(ctf_apix - apix) > 1e-4 * apix:
        sys.exit(f"{ctf_pkl}: box {ctf_box} / {ctf_apix} Å differ from simulation.json "
                 f"({box_px} / {apix} Å)")

    out = work / "abinit"
    if out.exists():
        shutil.rmtree(out)
    no_trans = float(sim.get("shift_std_px", 0.0)) == 0.0 and not args.search_shifts
    argv = [drgn, "abinit", str(data / "particles.star"), "--datadir", str(data),
            "--ctf", str(ctf_pkl), "-o", str(out), "--zdim", "0", "-n", str(args.epochs),
            "--seed", str(args.seed), "--no-amp", "--no-analysis", "--num-workers", "0",
            "--max-threads", str(args.threads)]
    argv += ["--no-trans"] if no_trans else []
    if args.fast:
        argv += FAST_FLAGS + (FAST_NO_TRANS_FLAGS if no_trans else [])
    gt_poses = data / "particles.star"
    if args.n_particles is not None:
        ind_pkl = work / f"ind_first_{args.n_particles}.pkl"  # an int --ind is taken as a path
        with open(ind_pkl, "wb") as fh:
            pickle.dump(np.arange(args.n_particles, dtype=np.int64), fh)
        argv += ["--ind", str(ind_pkl)]
        gt_poses = work / "gt_poses_subset.pkl"
        write_gt_subset(data / "particles.star", gt_poses, args.n_particles)
    wall_s, rss_mib = run(argv + list(args.extra), log)

    oracle = check_oracle(drgn, data, ctf_pkl, work, apix, log, argv)

    epoch = last_epoch(out)
    poses = work / "poses_cryospin.pkl"
    convert_poses(out / f"pose.{epoch}.pkl", poses, box_px)
    cs = cryospin_argv()
    run(cs + ["fsc", str(data / "gt.mrc"), str(out / f"reconstruct.{epoch}.mrc"), "--align",
              "--apix", str(apix), "-o", str(work / "fsc.json"),
              "--plot", str(work / "fsc.png")], log)
    symmetry = sim.get("symmetry")  # point group of a symmetric simulation: errors modulo it
    run(cs + ["pose-error", str(poses), str(gt_poses), "--box", str(box_px),
              "-o", str(work / "pose_error.json")]
        + (["--symmetry", str(symmetry)] if symmetry else []), log)
    fsc = json.loads((work / "fsc.json").read_text())
    err = json.loads((work / "pose_error.json").read_text())

    method = f"cryoDRGN {version} `abinit --zdim 0`{' (--fast)' if args.fast else ''}"
    result = {
        "method": method,
        "cryodrgn_version": version,
        "command": argv + list(args.extra),
        "dataset": str(data),
        "n_particles": args.n_particles or sim.get("n_particles"),
        "box_px": box_px,
        "pixel_size_angstrom": apix,
        "snr": sim.get("snr"),
        "symmetry": symmetry,
        "epochs": args.epochs,
        "fast_preset": args.fast,
        "final_epoch_file": epoch,
        "threads": args.threads,
        "wall_s": wall_s,
        "peak_rss_mib": rss_mib,
        "install_s": install_s,
        "median_rotation_error_deg": err["median_rotation_error_deg"],
        "mean_rotation_error_deg": err["mean_rotation_error_deg"],
        "fraction_rotation_error_below_10_deg": err.get("fraction_rotation_error_below_10_deg"),
        "resolution_0.5_angstrom": fsc["resolution_0.5_angstrom"],
        "resolution_0.143_angstrom": fsc["resolution_0.143_angstrom"],
        "alignment": fsc.get("alignment"),
        "oracle_check": oracle,
    }
    (work / "peer_cryodrgn.json").write_text(json.dumps(result, indent=2) + "\n")

    print(f"\n### peer: {sim.get('structure')}, {result['n_particles']} particles, {box_px} px "
          f"at {apix} Å/px, SNR {sim.get('snr')}, {args.epochs} epochs, {args.threads} "
          f"thread(s)\n")
    print(markdown_table(
        ["method", "wall time", "peak RSS", "median rot. error", "mean rot. error",
         "FSC=0.5 vs GT", "FSC=0.143 vs GT"],
        [[method, f"{wall_s / 60:.1f} min", f"{rss_mib:.0f} MiB",
          f"{err['median_rotation_error_deg']:.2f}°", f"{err['mean_rotation_error_deg']:.2f}°",
          _angstrom(fsc["resolution_0.5_angstrom"]), _angstrom(fsc["resolution_0.143_angstrom"])]]))
    print(f"\nconvention check (cryoDRGN backproject_voxel, true poses): Pearson r vs ground "
          f"truth {oracle['pearson_r_vs_gt']:.3f}, FSC=0.5 "
          f"{_angstrom(oracle['resolution_0.5_angstrom'])}")
    print(f"wrote {work / 'peer_cryodrgn.json'}")


if __name__ == "__main__":
    main()
