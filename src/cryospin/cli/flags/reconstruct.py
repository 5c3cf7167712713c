"""Ab initio reconstruction of a volume and per-particle poses (cryoSPIN).

Stage 1 trains a multi-head encoder and the volume together (winner-take-all over heads); after
--switch-epoch, each particle's best head seeds its pose, which is then refined per particle
while the volume keeps learning (stage 2). The default preset has no stage 1 (--switch-epoch 0):
every particle starts from a random rotation that a global rotation search replaces; --preset
paper-synthetic / paper-real train the encoder as the paper does. Writes RUN_DIR/map.NNN.mrc
after each epoch, metrics.jsonl, checkpoint.pt, and at the end map.mrc (a Wiener backprojection
of the images from the final poses; the trained volume is map_decoder.mrc), poses.star (RELION
3.1: the input's columns and image paths, new poses), poses.pkl, and poses.cs for a .cs input.

Progress: a bar per epoch in a terminal; without one (nohup, a batch job) a line every
--progress-interval seconds with the epoch's and the run's ETA. RUN_DIR/run.log keeps everything
the console shows, with date and time (appended to on --resume).

examples:
  cryospin reconstruct particles.star -o run1 --preset paper-real
  cryospin reconstruct stack.mrcs --ctf ctf.pkl -o run2 --epochs 10 --switch-epoch 4
  cryospin reconstruct --resume run1                 # continue after Ctrl-C, SIGTERM, a crash
  cryospin reconstruct --resume run1 --epochs 40     # train longer
  cryospin reconstruct particles.star -o run3 --halves   # gold-standard half maps and FSC
  cryospin reconstruct particles.star -o run5 --starts 3  # three seeds, the best fit kept
  cryospin reconstruct particles.star -o run6 --halves --starts 2  # each half its best of 2
  cryospin reconstruct --resume run3 --max-starts 4  # a worse-fitting half: up to 4 starts
  cryospin reconstruct particles.star -o run4 --symmetry D7   # a D7-symmetric particle
"""

from __future__ import annotations

import argparse

from cryospin.train.presets import PRESETS

__all__ = ["add_args"]


def add_args(parser: argparse.ArgumentParser) -> None:
    """Flags of ``cryospin reconstruct``, in the order ``--help`` lists them."""
    parser.add_argument("particles", nargs="?", metavar="PARTICLES",
                        help=".star, .cs, .txt (list of stacks) or .mrcs (with --ctf)")
    parser.add_argument("-o", "--out", metavar="RUN_DIR", help="output folder (created)")
    parser.add_argument("--resume", metavar="RUN_DIR",
                        help="continue the run in RUN_DIR from its last complete epoch")
    parser.add_argument("--preset", choices=PRESETS, default="default",
                        help="settings to start from (default: %(default)s)")
    _add_input_flags(parser)
    _add_model_flags(parser)
    _add_optimisation_flags(parser)
    _add_execution_flags(parser)


def _add_input_flags(parser: argparse.ArgumentParser) -> None:
    """The particles, their CTF and selection, image preprocessing."""
    g = parser.add_argument_group("input")
    g.add_argument("--ctf", metavar="PKL", help="cryoDRGN ctf.pkl (for .mrcs/.txt inputs)")
    g.add_argument("--ind", metavar="PKL", help="index file selecting a subset of particles")
    g.add_argument("--datadir", metavar="DIR", help="folder to resolve image paths against")
    g.add_argument("--optics-group", metavar="N|NAME",
                   help="read only this optics group of a .star (its rlnOpticsGroup number or "
                        "rlnOpticsGroupName), e.g. one pixel size of a star that mixes several; "
                        "--ind then indexes the group's particles")
    g.add_argument("--relative-to", metavar="DIR",
                   help="write poses.star's image paths relative to DIR (e.g. the RELION "
                        "project folder; default: as the input has them)")
    g.add_argument("--no-ctf", action="store_true", default=None, help="ignore the CTF")
    g.add_argument("--invert-contrast", action="store_true", default=None,
                   help="multiply the images by -1")
    g.add_argument("--max-memory", type=float, metavar="GB",
                   help="peak memory budget: stream the images from disk in chunks when the "
                        "in-memory plan exceeds it; stop if even streaming does not fit")
    g.add_argument("--cache-dir", metavar="DIR",
                   help="keep preprocessed images (float16) here for the streaming loader")
    g.add_argument("--box", type=int, metavar="N",
                   help="Fourier-crop the images to N px on the fly (even; outputs stay in "
                        "the original particles' frame)")
    g.add_argument("--normalize", choices=["global", "background"],
                   help="image normalisation: one global std, or per particle from the "
                        "background outside the mask radius (default: global)")
    g.add_argument("--mask-diameter", type=float, metavar="A",
                   help="soft circular mask on the encoder input, diameter in Å (about the "
                        "particle's largest extent; also the background region of --normalize "
                        "background; default: no mask)")
    g.add_argument("--mask-radius", type=float, metavar="F",
                   help="the same mask, radius as a fraction of half the box, in (0, 1]")
    g.add_argument("--mask-edge", type=float, metavar="PX",
                   help="width of the mask's soft edge, pixels (default: 3)")
    g.add_argument("--whiten-noise", action=argparse.BooleanOptionalAction, default=None,
                   help="measure the noise's power spectrum on the images' background "
                        "(outside the inscribed circle) and weight each frequency by it, "
                        "as real images' noise is not white (needs the CTF; default: from "
                        "the preset)")


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    """The encoder, the stages and the method."""
    g = parser.add_argument_group("model and schedule (default: from the preset)")
    g.add_argument("--heads", type=int, metavar="M", help="number of encoder heads")
    g.add_argument("--width", type=float, metavar="W", help="encoder channel multiplier")
    g.add_argument("--encoder-box", type=int, metavar="N",
                   help="Fourier-crop the encoder's input to N px (even; the decoder and the "
                        "loss keep the full box): stage 1 costs ~(N/L)^2 of the full size")
    g.add_argument("--shifts", action=argparse.BooleanOptionalAction, default=None,
                   help="estimate in-plane shifts")
    g.add_argument("--max-shift-px", type=float, metavar="PX", help="shift bound, pixels")
    g.add_argument("--empty-class", action=argparse.BooleanOptionalAction, default=None,
                   help="stage 2's image model also has an empty image (empty ice, false "
                        "picks): each image weighs in the volume steps by the probability "
                        "that it holds the particle, and the final map leaves out those "
                        "scoring no better than an empty image (default: from the preset)")
    g.add_argument("--junk-class", action=argparse.BooleanOptionalAction, default=None,
                   help="stage 2's image model also has junk: a particle of the map's power "
                        "spectrum with random phases (contamination, aggregates); images "
                        "likelier junk weigh little in the volume steps and are left out of "
                        "the final map (default: from the preset)")
    g.add_argument("--epochs", type=int, metavar="E", help="total epochs")
    g.add_argument("--switch-epoch", type=int, metavar="K",
                   help="last epoch of stage 1 (auto-encoding); 0 with search epochs: search "
                        "only, no encoder (every particle starts from a random rotation; the "
                        "default preset's choice)")
    g.add_argument("--switch-steps", type=int, metavar="T",
                   help="stage 1 lasts exactly T optimizer steps (batches) instead of "
                        "--switch-epoch epochs; the --epochs minus --switch-epoch stage-2 "
                        "epochs follow")
    g.add_argument("--head", choices=["reference", "spread"],
                   help="pose heads: reference (BatchNorm MLPs, the authors' public design) "
                        "or spread (cryospin <= 0.2: fixed, well-separated start rotations)")
    g.add_argument("--encoder-input", choices=["image", "pyramid"],
                   help="the encoder's input: the image, or a 5-level Gaussian pyramid of it")
    g.add_argument("--pooling", choices=["adaptive", "vgg16"],
                   help="max-pools of the encoder trunk: adaptive (a 2x2 map at least) or "
                        "vgg16 (always 5)")
    g.add_argument("--symmetry", metavar="GROUP",
                   help="point group of the particle, in RELION's axes (Cn, Dn, T, O, I or "
                        "I1..I4; docs/conventions.md, \"Symmetry\"; default C1: none), or "
                        "auto (the largest group the map shows): the run is C1 for the first "
                        "epochs of the global search (--impose-symmetry), then the group's "
                        "axes are found in the map, the volume and poses move to its frame, "
                        "and from then on the volume is averaged over the group, the search "
                        "covers one asymmetric unit, and the final map is a symmetric "
                        "backprojection")
    g.add_argument("--relax-symmetry", metavar="GROUP",
                   help="a pseudo-symmetry of a C1 particle (e.g. C3 for a trimer whose "
                        "protomers differ): in every stage-2 epoch the group's axes are "
                        "placed in the current map and each particle keeps the best of its "
                        "|G| symmetry-related copies of its pose before its pose steps "
                        "(RELION's --relax_sym); the map stays C1. auto (the paper-synthetic "
                        "preset's): the cyclic group Cn the map shows, found again in each "
                        "stage-2 epoch (none, or a dihedral or higher group, which is more "
                        "likely exact: nothing relaxed; nothing with --symmetry or a method "
                        "that never switches). Default C1: none")
    g.add_argument("--impose-symmetry", choices=["after_search", "during_search", "start"],
                   help="when --symmetry is imposed: during_search (default: C1 for the "
                        "search's minimum epochs, then the group's frame, and the remaining "
                        "search epochs search one asymmetric unit), after_search (C1 until "
                        "the search ends) or start (the volume averaged over the group from "
                        "epoch 1, which stalled on a D7 test)")
    g.add_argument("--method", choices=["semi-amortized", "amortized", "cryoai"],
                   help="semi-amortized (cryoSPIN, default); baselines that never switch: "
                        "amortized (multi-head winner-take-all throughout), cryoai (one head "
                        "+ its 180° in-plane partner; sets --heads 1)")


def _add_optimisation_flags(parser: argparse.ArgumentParser) -> None:
    """Batch, learning rates, the global search, frequency marching."""
    g = parser.add_argument_group("optimisation (default: from the preset)")
    g.add_argument("--batch-size", type=int, metavar="B")
    g.add_argument("--encoder-lr", type=float, metavar="LR")
    g.add_argument("--encoder-lr-final", type=float, metavar="LR",
                   help="decay the encoder lr linearly to this by the switch (from "
                        "--encoder-lr-decay-start of the stage-1 steps on)")
    g.add_argument("--encoder-lr-decay-start", type=float, metavar="F",
                   help="fraction (0-1) of the stage-1 steps after which that decay starts")
    g.add_argument("--decoder-lr", type=float, metavar="LR", help="volume lr in stage 1")
    g.add_argument("--decoder-lr-after-switch", type=float, metavar="LR",
                   help="volume lr in stage 2")
    g.add_argument("--pose-lr", type=float, metavar="LR", help="per-particle rotation lr")
    g.add_argument("--shift-lr", type=float, metavar="LR", help="per-particle shift lr")
    g.add_argument("--decoder-lr-final", type=float, metavar="LR",
                   help="volume lr reached by the last epoch (decays after the search epochs)")
    g.add_argument("--pose-lr-final", type=float, metavar="LR",
                   help="rotation lr reached by the last epoch (decays like the volume's; the "
                        "shift lr by the same factor)")
    g.add_argument("--anchor-pose-frame", action=argparse.BooleanOptionalAction, default=None,
                   help="take each batch's common rotation out of the local pose updates "
                        "(the map and the poses then cannot drift together; default preset: on)")
    g.add_argument("--switch-poses", choices=["inference", "last_epoch"],
                   help="the switch starts each particle from an inference pass of the trained "
                        "encoder, or from its winner as trained on in the last stage-1 epoch "
                        "(no pass; default preset)")
    g.add_argument("--switch-hypotheses", type=int, metavar="K",
                   help="at the switch, refine each particle's K best heads locally and keep "
                        "the best after refinement (needs the inference pass; 1: the winner)")
    g.add_argument("--switch-refine-steps", type=int, metavar="N",
                   help="Adam steps on each of those hypotheses (default 20)")
    g.add_argument("--switch-refine-radius", type=float, metavar="K",
                   help="disc (cycles per box) the hypotheses are refined and compared on "
                        "(default: the full training disc)")
    g.add_argument("--search-epochs", type=int, metavar="E",
                   help="stage-2 epochs that start each batch with a global rotation search "
                        "(at most, with --search-min-epochs)")
    g.add_argument("--search-min-epochs", type=int, metavar="E",
                   help="stop the global search early, after search epoch E or later, when "
                        "few particles jumped (see --search-stop-fraction); the local epochs "
                        "follow at once and the run ends sooner")
    g.add_argument("--search-stop-fraction", type=float, metavar="F",
                   help="early stop when fewer than this fraction (0-1) of the particles' "
                        "rotations moved by more than 20 deg in a search epoch; 0 never stops "
                        "early")
    g.add_argument("--search-plateau-fraction", type=float, metavar="F",
                   help="also stop early when fewer than this fraction (0-1) jumped and that "
                        "fraction fell by less than a quarter since the previous search epoch "
                        "(particles flipping between a pseudo-symmetric particle's copies); 0 "
                        "never")
    g.add_argument("--search-settled-nats", type=float, metavar="X",
                   help="also stop early when the search epoch's mean loss fell by less than "
                        "X nats per image since the previous search epoch (the particles "
                        "still jumping no longer improve the fit); 0 never")
    g.add_argument("--search-rotations", type=int, metavar="N",
                   help="rotations in the global search grid")
    g.add_argument("--search-candidates", type=int, metavar="K",
                   help="keep each image's K best grid poses, polish each and decide among "
                        "them and the current pose on the search-refine disc (1: the best "
                        "grid pose, decided on the search's own disc)")
    g.add_argument("--search-polish-sweeps", type=int, metavar="N",
                   help="sweeps of the candidates' pattern search (with --search-candidates "
                        "above 1)")
    g.add_argument("--rebackproject-after-search", action=argparse.BooleanOptionalAction,
                   default=None,
                   help="when the global search ends, replace the volume by the Wiener "
                        "backprojection from the poses before the local epochs (default: from "
                        "the preset)")
    g.add_argument("--rebackproject-during-search", action=argparse.BooleanOptionalAction,
                   default=None,
                   help="at the start of every search epoch from the second on, replace the "
                        "volume by the Wiener backprojection from the poses (default: from the "
                        "preset)")
    g.add_argument("--copy-consensus", metavar="GROUP",
                   help="when the search ends, settle a split between a pseudo-symmetric "
                        "particle's copies: each particle moved to a random copy of its pose, "
                        "then rounds of each to its best copy under the map from the poses, "
                        "kept only if the images fit better. auto (the default preset's): "
                        "where the map shows no point group but a cyclic group scores >= "
                        "0.25; a cyclic group (C3): that group, placed in the map; off: never")
    g.add_argument("--search-resolution", type=float, metavar="A",
                   help="score the global search on frequencies up to this resolution, Å "
                        "(the preset gives a radius in cycles per box)")
    g.add_argument("--search-radius", type=float, metavar="K",
                   help="the same as a frequency radius in cycles per box, not pixels "
                        "(box size in Å / resolution in Å)")
    g.add_argument("--search-radius-symmetric", type=float, metavar="K",
                   help="with --symmetry: the global search's radius (cycles per box) once the "
                        "group is imposed, over one asymmetric unit of the symmetric map")
    g.add_argument("--search-refine-resolution", type=float, metavar="A",
                   help="in the search epochs, refine the poses after each batch's search on "
                        "frequencies up to this resolution, Å (the map and the local epochs "
                        "fit the whole disc)")
    g.add_argument("--search-refine-radius", type=float, metavar="K",
                   help="the same as a frequency radius in cycles per box (the preset's)")
    g.add_argument("--local-refine-resolution", type=float, metavar="A",
                   help="in the local epochs (stage 2 after the search), refine the poses on "
                        "frequencies up to this resolution, Å (the map fits the whole disc; "
                        "default preset 2.4; at or below the images' Nyquist: the whole disc)")
    g.add_argument("--search-shift-step", type=float, metavar="PX",
                   help="with --shifts, the global search also tries a shift grid of this "
                        "spacing within --max-shift-px (default 2)")
    g.add_argument("--loss-resolution-start", type=float, metavar="A",
                   help="stage-1 frequency marching: fit only frequencies up to this "
                        "resolution (Å) at the first step, growing to the full disc at the "
                        "switch")
    g.add_argument("--loss-radius-start", type=float, metavar="K",
                   help="the same as a frequency radius in cycles per box, not pixels")
    g.add_argument("--loss-resolution-end", type=float, metavar="A",
                   help="with frequency marching, the resolution (Å) reached at the switch "
                        "instead of the full disc (equal to the start: a fixed low-frequency "
                        "stage 1)")
    g.add_argument("--loss-radius-end", type=float, metavar="K",
                   help="the same as a frequency radius in cycles per box")
    g.add_argument("--encoder-lowpass", action="store_true", default=None,
                   help="with frequency marching, low-pass the encoder input too")


def _add_execution_flags(parser: argparse.ArgumentParser) -> None:
    """Device, threads, precision, progress, the final map, stopping, half sets."""
    g = parser.add_argument_group("execution")
    g.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], help="default: auto")
    g.add_argument("--seed", type=int)
    g.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads (torch; default: the cores available to the process, "
                        "from its affinity and cgroup CPU quota)")
    g.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"],
                   help="encoder arithmetic (default auto: bf16 where the CPU/GPU has it and "
                        "it measures faster, else fp32; fp16 with loss scaling on GPUs "
                        "without bf16)")
    g.add_argument("--no-bf16", action="store_true", help="the same as --precision fp32")
    g.add_argument("--no-progress", action="store_true",
                   help="no progress bar (the --progress-interval lines are shown instead)")
    g.add_argument("--progress-interval", type=float, metavar="S",
                   help="without a bar (no terminal, or --no-progress): a progress line every S "
                        "seconds of an epoch, with the epoch's and the run's ETA (default 30; "
                        "0: none)")
    g.add_argument("--final-map", choices=["backprojection", "decoder"],
                   help="map.mrc = Wiener backprojection from the final poses (default; the "
                        "trained volume is kept as map_decoder.mrc) or the trained volume")
    g.add_argument("--stop-after", type=int, metavar="EPOCH",
                   help="stop after this epoch (checkpoint kept; continue with --resume)")
    g.add_argument("--starts", type=int, metavar="K",
                   help="run the reconstruction K times, from seeds --seed, --seed + 1, ... "
                        "(RUN_DIR/start_1 ... start_K, one after the other), and keep the "
                        "one whose images fit best, the lowest final loss (RUN_DIR/choice.json "
                        "and the link RUN_DIR/chosen; as cryospin choose-run): a start that "
                        "settled on a wrong structure is left out, at K times the time; with "
                        "--halves, K starts in each half at first, each half choosing its own "
                        "(RUN_DIR/half_A/chosen, half_B/chosen)")
    g.add_argument("--max-starts", type=int, metavar="M",
                   help="with --halves: a half whose images fit clearly worse than the "
                        "other's (the halves' fit check) gets another start, chosen against "
                        "its others by its own images' fit, until the halves agree or it has M "
                        "starts (default 3, or --starts when larger; 1: never; may be raised "
                        "with --resume)")
    g.add_argument("--halves", action="store_true",
                   help="gold standard: reconstruct two random halves independently "
                        "(RUN_DIR/half_A, half_B; rlnRandomSubset when present), align them "
                        "and write the FSC (postprocess.star, fsc.json, fsc.png), the "
                        "FSC-weighted map.mrc and poses.star; warns when one half explains "
                        "its images clearly worse than the other (a half on a wrong "
                        "structure, which the FSC can hide) and gives that half more starts "
                        "(--max-starts)")
