"""Run configuration: frozen typed dataclasses, YAML presets, and the run's ``config.yaml``.

The checks a :class:`Config` runs when it is made are :mod:`cryospin.train.config_checks`; the
presets' files and names are :mod:`cryospin.train.presets`.

One source of truth: a :class:`Config` is built once (defaults < preset < command line), saved
as ``RUN_DIR/config.yaml`` together with the cryospin version and the command line, and read
back into the identical dataclass on ``--resume``.

Epoch numbering: epochs are counted from 1. Stage 1 (auto-encoding) runs epochs
``1 .. switch_epoch``; stage 2 (auto-decoding) runs epochs ``switch_epoch + 1 .. epochs``.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from cryospin import __version__
from cryospin.atomic import atomic_write_text
from cryospin.errors import InputError
from cryospin.train.config_checks import check_sections, coerce, migrate_renamed, validate
from cryospin.train.config_rules import AMORTIZED_METHODS, apply_merge_rules
from cryospin.train.presets import preset_text

__all__ = [
    "ModelConfig",
    "OptimConfig",
    "ScheduleConfig",
    "DataConfig",
    "RunConfig",
    "InputConfig",
    "Config",
    "AMORTIZED_METHODS",
    "load_preset",
    "build_config",
    "config_to_dict",
    "config_from_dict",
    "save_config",
    "load_config",
    "read_config_argv",
    "record_resolved",
]

Method = Literal["semi-amortized", "amortized", "cryoai"]
Device = Literal["auto", "cpu", "cuda", "mps"]
FinalMap = Literal["backprojection", "decoder"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
SwitchPoses = Literal["inference", "last_epoch"]
ImposeSymmetry = Literal["after_search", "during_search", "start"]
HeadType = Literal["reference", "spread"]  # cryospin.encoder.HeadType
EncoderInput = Literal["image", "pyramid"]  # cryospin.encoder.EncoderInput
Pooling = Literal["adaptive", "vgg16"]  # cryospin.encoder.Pooling

_META_KEYS = ("cryospin_version", "argv", "resumed_argv", "resolved")


@dataclass(frozen=True)
class ModelConfig:
    """Encoder (stage 1) architecture and pose parametrisation.

    Attributes
    ----------
    num_heads : int
        Number M of pose heads sharing the CNN trunk (winner-take-all).
    width_multiplier : float
        Channel multiplier of the VGG16-style trunk (1.0 = the paper's widths).
    head_hidden : int
        Hidden width of each head's MLP.
    precision : "auto", "fp32", "bf16" or "fp16"
        Arithmetic of the encoder trunk (``torch.autocast``; everything else is float32).
        ``auto`` is resolved per device and machine when the run starts
        (:func:`cryospin.train.precision.resolve_precision`): on CPU bf16 only where the hardware
        has it (AVX512-BF16 or AMX) *and* a micro-benchmark of the encoder step measures it
        faster than float32, else fp32; on CUDA bf16 where supported, else fp16 with a gradient
        scaler; fp32 on MPS. The choice and its reason are logged and recorded in
        ``config.yaml`` (``resolved``).
    encoder_box_px : int or None
        Fourier-crop the encoder's input to this box (even, pixels of the training box; the
        decoder and the loss keep the full box). ``None``, or a value ``>=`` the training box:
        full size.
    predict_shifts : bool
        Also estimate a 2D in-plane shift per particle (heads in stage 1, pose table in stage 2).
    max_shift_px : float
        Bound on the shift magnitude per axis, pixels.
    encoder_lowpass : bool
        With frequency marching (``schedule.loss_radius_start_px``), low-pass the encoder's
        input images with a Gaussian of ``σ`` = the current loss radius.
    head : "reference" or "spread"
        Pose heads (:class:`cryospin.encoder.MultiHeadPoseEncoder`): ``reference``, BatchNorm
        MLPs as in the cryoSPIN authors' public code, whose rotations differ from image to
        image from the start; ``spread``, cryospin <= 0.2's heads, which start at fixed,
        well-separated rotations (practically one rotation per head for every image). The
        built-in value is ``spread`` so that configurations written before 0.3 read back as
        they ran; the presets choose.
    encoder_input : "image" or "pyramid"
        The trunk's input: the image, or a 5-channel Gaussian pyramid of it (the reference
        design; blur widths scaled to the encoder's box).
    pooling : "adaptive" or "vgg16"
        ``adaptive``: as many 2x2 max-pools as leave at least a 2x2 map (a 32 px input gets 4);
        ``vgg16``: always 5 (cryospin <= 0.2).
    symmetry : str
        Point group (``C1``: none; Cn, Dn, T, O, I in RELION's axes, :mod:`cryospin.symmetry`).
    relax_symmetry : str
        A pseudo-symmetry of a C1 particle (``C1``: none): in every stage-2 epoch its copies of
        each pose are scored and the best kept (:mod:`cryospin.train.relax`; RELION's
        ``--relax_sym``); ``auto``: the cyclic group each stage-2 epoch's map shows, in a
        C1 semi-amortized run (elsewhere nothing).
    empty_class : bool
        The stage-2 image model has a second class, an empty image (empty ice, a false pick):
        each image's weight in the volume steps is the posterior probability that it holds
        the particle (:func:`cryospin.losses.class_responsibility` of its score,
        :mod:`cryospin.train.scores`), the search's jump fraction counts only images more
        likely particle, and the final map leaves out the particles scoring no better than
        an empty image. Off: every image is the particle (cryospin <= 0.3).
    junk_class : bool
        The stage-2 image model also has junk (contamination, aggregates, false picks with
        structure): a signal of the map's own power spectrum with random phases
        (:func:`cryospin.losses.random_phase_log_likelihood_ratio`). Each image's weight in
        the volume steps is then the particle's posterior among the classes (equal priors,
        :func:`cryospin.losses.class_responsibility`), the scores are taken against the
        likelier of an empty image and junk (:func:`cryospin.train.scores.particle_scores`)
        and the final map leaves out those at or below 0. Off: no junk class (runs from
        before it existed resume unchanged).
    """

    num_heads: int = 7
    width_multiplier: float = 0.5
    head_hidden: int = 256
    precision: Precision = "auto"
    encoder_box_px: int | None = None
    predict_shifts: bool = False
    max_shift_px: float = 8.0
    encoder_lowpass: bool = False
    head: HeadType = "spread"
    encoder_input: EncoderInput = "image"
    pooling: Pooling = "vgg16"
    symmetry: str = "C1"
    relax_symmetry: str = "C1"
    empty_class: bool = False
    junk_class: bool = False

    def encoder_input_box(self, box_px: int) -> int:
        """The encoder trunk's box for training images of ``box_px``: ``encoder_box_px`` when
        smaller, else ``box_px``."""
        box = self.encoder_box_px
        return int(box_px) if box is None or box >= box_px else int(box)


@dataclass(frozen=True)
class OptimConfig:
    """Optimisers (all Adam) and batch size.

    Attributes
    ----------
    batch_size : int
        Images per batch in both stages.
    encoder_lr : float
        Encoder learning rate (stage 1).
    encoder_lr_final : float or None
        If given, the encoder learning rate stays at ``encoder_lr`` for the first
        ``encoder_lr_decay_start`` of the stage-1 steps, then decays linearly, step by step,
        to this value at the last stage-1 step (the encoder anneals before the switch reads
        it). ``None``: constant.
    encoder_lr_decay_start : float
        Fraction in [0, 1) of the stage-1 steps after which that decay starts.
    decoder_lr : float
        Volume learning rate in stage 1.
    decoder_lr_after_switch : float
        Volume learning rate in stage 2 (a new optimiser is created at the switch).
    decoder_lr_final : float or None
        If given, the stage-2 volume learning rate stays at ``decoder_lr_after_switch`` during
        the search epochs, then decays geometrically, epoch by epoch, to this value in the last
        epoch (less high-frequency noise in the final map). ``None``: constant.
    pose_lr : float
        Per-particle rotation learning rate (rad per step scale, Adam).
    shift_lr : float
        Per-particle shift learning rate (pixels per step scale, Adam).
    pose_lr_final : float or None
        If given, the rotation learning rate decays like the volume's (constant through the
        search epochs, then geometric) to this value in the last epoch, and the shift learning
        rate by the same factor. Large late pose steps make the map and the poses drift together
        along the global-rotation ambiguity (measured: ~10 deg per epoch on off-centre data);
        ``None``: constant.
    anchor_pose_frame : bool
        In the stage-2 epochs without global search, take out each batch's common rotation of
        the poses after their steps (``cryospin.train.autodecode.remove_common_rotation``), so
        that map and poses cannot drift together along the global-rotation ambiguity.
    pose_steps_per_batch : int
        Pose steps per batch before the one volume step (stage 2).
    search_rotations : int
        Rotations of the global search's grid over SO(3) (``schedule.search_epochs``).
    search_candidates : int
        The global search's decision: 1 replaces a particle's pose by the best grid pose when
        that fits better on the search's own low-frequency disc. ``K > 1`` keeps each image's
        ``K`` best grid poses on that disc, polishes each by a local pattern search and
        chooses among them, and against the current pose, on the disc of the search epochs'
        pose steps (``search_refine_radius_px``; :func:`cryospin.train.autodecode.
        decide_candidates`): the low-frequency disc cannot tell a pseudo-symmetric
        particle's copies apart when the noise is strongest there (coloured noise).
    search_polish_sweeps : int
        With ``search_candidates > 1``: sweeps of the candidates' pattern search (each tries
        ±half the grid's spacing about the three axes).
    rebackproject_after_search : bool
        When the global search ends and local epochs follow, the volume is replaced by the
        Wiener backprojection of the training images from the poses at that point
        (:mod:`cryospin.train.rebackproject`) and gets a new optimiser: the local epochs refine
        the poses against a map made from them rather than the one trained along with the
        search. Off here, on in the ``default`` preset (its comment gives the measurements).
    rebackproject_during_search : bool
        Likewise at the start of every search epoch from the second on: the search goes on
        against the backprojection from the poses it found in the epoch before, not against
        the volume trained along with poses that were still jumping between basins. Off here,
        on in the ``default`` preset (its comment gives the measurements).
    copy_consensus : str
        ``auto``: when the global search ends, in a C1 run whose map shows no point group but
        a cyclic pseudo-symmetry (a group scoring >= 0.25 there), the particles are moved to
        random copies of their poses under it and then, round by round, each to the copy
        that fits the map made from the poses best; the new poses are kept only if the
        images fit their map better (:mod:`cryospin.train.consensus`): a small data set's
        split between a pseudo-symmetric particle's copies, which more search does not undo.
        A cyclic group (``C3``): the same with that group, placed in the map whatever its
        score. ``off`` here; ``auto`` in the ``default`` preset (its comment gives the
        measurements).
    search_radius_px : float
        Radius (cycles per box) of the low-frequency disc the global search is scored on
        (in the first search epoch).
    search_radius_end_px : float or None
        Radius in the last search epoch (linear in between); ``None`` = ``search_radius_px``.
    search_radius_symmetric_px : float or None
        Radius of the search epochs that search one asymmetric unit of a symmetric volume
        (``model.symmetry`` imposed), in place of the radius above; ``None``: the same.
        At 6 cycles/box the search cannot place a C7 ring (benchmarks/RESULTS.md,
        "Point-group symmetry").
    search_refine_radius_px : float or None
        Radius (cycles per box) of the disc the pose steps of the search epochs (after each
        batch's search) fit; their volume steps and the local epochs fit the training disc.
        ``None``: the training disc. On ADK at 128 px the pose steps on the whole disc let
        one seed settle with a third of its particles in a wrong basin (benchmarks/RESULTS.md,
        "The search epochs' pose steps on a low-frequency disc"), and they were most of a
        search epoch's time.
    local_refine_resolution_angstrom : float or None
        The pose steps of the local epochs (stage 2 without a search) fit only the training
        disc's frequencies up to this resolution (Å; ``|k| <= L·apix / Å`` cycles per box of
        the training box); their volume steps and the loss keep the whole disc. ``None``, or
        a resolution at or below the training images' Nyquist: the whole disc. On ADK at
        128 px (0.75 Å/px) the whole disc's pose steps fitted frequencies that carry no signal
        and ended less accurate and slower (benchmarks/RESULTS.md, "The local epochs' pose
        steps up to 2.4 Å").
    search_shift_step_px : float or None
        With shifts on (``model.predict_shifts``), the global search also tries every shift of a
        square grid with this spacing (pixels) within ``model.max_shift_px`` per axis, jointly
        with the rotations; ``None`` keeps each particle's current shift.
    switch_hypotheses : int
        At the switch, keep each particle's this many lowest-NLL heads (at most
        ``model.num_heads``: all of them when larger), refine each locally
        against the switch's volume and start the particle from the best after refinement
        (:mod:`cryospin.train.hypotheses`; needs ``schedule.switch_poses = inference``);
        1: the winning head, as in the paper.
    switch_refine_steps : int
        Per-row Adam steps on each of those hypotheses (at ``pose_lr``).
    switch_refine_radius_px : float or None
        Disc (cycles per box) the hypotheses are refined and compared on; ``None``: the
        training disc.
    """

    batch_size: int = 64
    encoder_lr: float = 1e-4
    encoder_lr_final: float | None = None
    encoder_lr_decay_start: float = 0.5
    decoder_lr: float = 0.05
    decoder_lr_after_switch: float = 0.02
    decoder_lr_final: float | None = None
    pose_lr: float = 0.05
    shift_lr: float = 0.05
    pose_lr_final: float | None = None
    anchor_pose_frame: bool = False
    pose_steps_per_batch: int = 5
    search_rotations: int = 8192
    search_candidates: int = 1
    search_polish_sweeps: int = 1
    rebackproject_after_search: bool = False
    rebackproject_during_search: bool = False
    copy_consensus: str = "off"
    search_radius_px: float = 6.0
    search_radius_end_px: float | None = None
    search_radius_symmetric_px: float | None = None
    search_refine_radius_px: float | None = None
    local_refine_resolution_angstrom: float | None = None
    search_shift_step_px: float | None = 2.0
    switch_hypotheses: int = 1
    switch_refine_steps: int = 20
    switch_refine_radius_px: float | None = None


@dataclass(frozen=True)
class ScheduleConfig:
    """Epochs and the switch from auto-encoding to auto-decoding.

    Attributes
    ----------
    epochs : int
        Total number of epochs (passes over the particles).
    switch_epoch : int
        Last epoch of stage 1; 0 starts directly with stage 2, ``>= epochs`` never switches (a
        fully amortized run). With 0 and ``search_epochs > 0`` (:attr:`search_only`) no encoder
        is built: every particle starts from a random rotation that the first search epoch
        replaces; with 0 and no search, from the untrained encoder's poses.
    switch_steps : int or None
        Stage 1 lasts exactly this many optimizer steps (batches) instead of ``switch_epoch``
        epochs: ``ceil(switch_steps / batches per epoch)`` epochs, the last one cut short; the
        ``epochs - switch_epoch`` stage-2 epochs follow (:func:`cryospin.train.schedule.
        with_step_budget`). None: ``switch_epoch`` decides.
    method : str
        ``"semi-amortized"`` (cryoSPIN); ``"amortized"`` (the paper's fully-amortized baseline:
        multi-head winner-take-all in every epoch, never switching); ``"cryoai"`` (the paper's
        cryoAI-explicit baseline: one head, its pose and the pose of the 180° in-plane rotated
        image as two hypotheses, never switching; requires ``model.num_heads = 1``). With both
        baselines :func:`build_config` sets ``switch_epoch = epochs`` and ``search_epochs = 0``
        and the trainer never switches, whatever ``switch_epoch`` says.
    loss_radius_start_px : float or None
        Frequency marching in stage 1: the loss disc radius (cycles per box) at the first
        step; it grows linearly, step by step, to ``loss_radius_end_px`` at the switch.
        ``None``: no marching (the full training disc throughout).
    loss_radius_end_px : float or None
        Radius reached at the switch; ``None`` = the training disc (``data.loss_radius_px``).
        Needs ``loss_radius_start_px``; equal to it, a fixed low-frequency stage 1.
    search_epochs : int
        The first ``search_epochs`` epochs of stage 2 (at most: see ``search_min_epochs``)
        start every batch with a global rotation search (``optim.search_rotations``,
        ``optim.search_radius_px``) that replaces a particle's rotation when a grid rotation
        fits better; 0 = never.
    search_min_epochs : int or None
        Early stop of the global search: after stage-2 search epoch ``s`` with
        ``search_min_epochs <= s < search_epochs`` whose ``jump_fraction`` (the fraction of
        particles whose rotation moved by more than
        ``cryospin.train.autodecode.JUMP_THRESHOLD_DEG`` in the epoch) is below
        ``search_stop_fraction``, the remaining search epochs are skipped: the local epochs
        that follow keep their number (``epochs - switch_epoch - search_epochs``), so the run
        ends ``search_epochs - s`` epochs before ``epochs``, and the learning-rate decay starts
        after the actual last search epoch (:mod:`cryospin.train.schedule`). ``None``: no early
        stop (every search epoch runs). :func:`build_config` drops a preset's value above the
        ``search_epochs`` in effect (e.g. ``--search-epochs 1`` with the default preset).
    search_stop_fraction : float
        Threshold in [0, 1] of that early stop (0: never stop early).
    search_plateau_fraction : float
        A second early stop, under the same ``search_min_epochs``: after a search epoch whose
        ``jump_fraction`` is below this (in [0, 1]) but fell by less than a quarter
        (``cryospin.train.schedule.PLATEAU_MIN_DROP``) from the previous search epoch's, the
        search no longer settles the particles still jumping (flips between the near-identical
        copies of a pseudo-symmetric particle) and stops (0: never).
    search_settled_nats : float
        A third early stop, under the same ``search_min_epochs``: after a search epoch whose
        mean loss (nats per image) fell by less than this since the previous search epoch's,
        the particles still jumping no longer make the images fit better (a symmetric
        particle's jumps between exact copies) and the search stops (0: never;
        :func:`cryospin.train.schedule.search_stops`).
    switch_poses : "inference" or "last_epoch"
        Where each particle's starting pose at the switch comes from: ``inference``, a pass of
        the final encoder over every particle (the paper); ``last_epoch``, the winning head's
        pose as trained on in the last stage-1 epoch (no extra pass: it costs about half a
        stage-1 epoch; kept in the checkpoint so that a run stopped at the switch resumes
        exactly).
    impose_symmetry : "after_search", "during_search" or "start"
        When ``model.symmetry`` (a group, or ``auto``) is imposed: ``during_search`` (the
        default), the run is C1 for the first ``search_min_epochs`` search epochs (all of them
        without a minimum; up to the switch without a search), then the group's axes are
        found in the map, the volume and poses move to its frame (:mod:`cryospin.train.
        impose`) and the remaining search epochs search one asymmetric unit of the symmetric
        map; ``after_search``, the same after the whole search; ``start``, the volume is
        averaged over the group from epoch 1 (not with ``auto``). The methods that never
        switch impose it from the start.
    """

    epochs: int = 20
    switch_epoch: int = 7
    switch_steps: int | None = None
    method: Method = "semi-amortized"
    loss_radius_start_px: float | None = None
    loss_radius_end_px: float | None = None
    search_epochs: int = 0
    search_min_epochs: int | None = None
    search_stop_fraction: float = 0.0
    search_plateau_fraction: float = 0.0
    search_settled_nats: float = 0.0
    switch_poses: SwitchPoses = "inference"
    impose_symmetry: ImposeSymmetry = "during_search"

    @property
    def search_only(self) -> bool:
        """No stage 1 and a global search first (the semi-amortized method with
        ``switch_epoch = 0``, no step budget, ``search_epochs > 0``): the run needs no
        encoder."""
        return (self.method == "semi-amortized" and self.switch_epoch == 0
                and self.switch_steps is None and self.search_epochs > 0)


@dataclass(frozen=True)
class DataConfig:
    """Preprocessing of the particle images.

    Attributes
    ----------
    invert_contrast : bool
        Multiply images by −1 before training (see docs/conventions.md, Contrast).
    no_ctf : bool
        Ignore CTF parameters (CTF = 1).
    loss_radius_px : int or None
        Radius of the Fourier disc of the loss, in Fourier pixels (cycles per box);
        ``None`` = ``L//2 − 1``.
    noise_variance : float or None
        Noise variance of the real-space images after normalisation; ``None`` = estimated
        from the image corners.
    max_preload_gb : float
        Preprocess every image once and keep it in memory when that takes at most this many
        GB (images, Hartley values and CTF, float32); otherwise read and preprocess each batch
        from the stacks. 0 never preloads. Used only when ``max_memory_gb`` is None (the rule
        of configurations written before ``max_memory_gb`` existed).
    max_memory_gb : float or None
        Budget (GB, 1e9 bytes) for the whole run's peak resident memory, predicted before
        training by :mod:`cryospin.train.memory` (``--max-memory``). The data are held in
        memory when the in-memory plan fits, else streamed from the stacks in chunks; when
        even the streaming plan exceeds it the run stops before training. None: the
        ``max_preload_gb`` rule decides, and the plan is only printed.
    cache_dir : str or None
        Folder of the on-disk cache of preprocessed images (float16) read by the streaming
        loader (``--cache-dir``); written once, rebuilt when the inputs or preprocessing change.
    box_px : int or None
        Fourier-crop every image to this box (even, ``<=`` the particles' box) when it is
        read; the pixel size becomes ``pixel_size · L / box_px`` and outputs are written in
        the original particles' frame (shifts in original pixels). ``None``: no cropping.
    normalize : "global" or "background"
        "global": divide all images by one standard deviation of the pixels; "background":
        per image, subtract the mean and divide by the standard deviation of the pixels
        outside the mask radius (docs/conventions.md, Preprocessing).
    mask_radius_fraction : float or None
        Radius of the soft circular mask applied to the encoder's input, as a fraction of
        half the (cropped) box, in (0, 1]; also the background radius of
        ``normalize: background`` (default 0.8 there). ``None``: no mask.
    mask_edge_px : float
        Width of the mask's raised-cosine edge, pixels of the (cropped) box.
    whiten_noise : bool
        Measure the noise's power spectrum on the images' background (outside the inscribed
        circle) and whiten it: every Hartley value and the CTF multiplied by
        ``sqrt(σ² / N(|k|))`` on the loss disc (:mod:`cryospin.noise_spectrum`), so the
        image model's one noise variance ``σ²`` holds at every frequency. Needs the CTF
        (ignored with ``no_ctf``).
    """

    invert_contrast: bool = False
    no_ctf: bool = False
    loss_radius_px: int | None = None
    noise_variance: float | None = None
    max_preload_gb: float = 8.0
    box_px: int | None = None
    normalize: Literal["global", "background"] = "global"
    mask_radius_fraction: float | None = None
    mask_edge_px: float = 3.0
    max_memory_gb: float | None = None
    cache_dir: str | None = None
    whiten_noise: bool = False


@dataclass(frozen=True)
class RunConfig:
    """Execution settings.

    Attributes
    ----------
    seed : int
        Seed of every random generator (initialisation, batch order).
    device : str
        ``"auto"`` (cuda if available, else mps, else cpu), ``"cpu"``, ``"cuda"`` or ``"mps"``.
    num_threads : int or None
        ``torch.set_num_threads`` on CPU; ``None``: the cores available to the process
        (affinity and cgroup quota, :func:`cryospin.cpus.available_cpus`), never more than
        torch's default (physical cores, or ``OMP_NUM_THREADS``).
    inference_batch_size : int
        Batch size of the inference pass at the switch.
    progress : bool
        Show a progress bar per pass (an epoch, the switch's inference pass, the final
        backprojection) when stderr is a terminal (:mod:`cryospin.train.feedback`).
    progress_interval_s : float
        Without a bar (no terminal, or ``progress`` false): a progress log line every this many
        seconds of a pass (stage, epoch, images, images/s, ETA of the epoch and of the run);
        0 turns the lines off.
    keep_epoch_maps : bool
        Write ``map.NNN.mrc`` after every epoch.
    final_map : str
        What the final ``map.mrc`` is: ``"backprojection"`` (a CTF-corrected Wiener
        backprojection of the training images from the final poses; the trained volume is
        kept as ``map_decoder.mrc``) or ``"decoder"`` (the trained volume itself).
    track_particles : int
        Follow this many particles (a seeded subset; all when fewer) through training in
        ``RUN_DIR/pose_track.npz`` (:mod:`cryospin.train.track`); 0 disables the track.
    """

    seed: int = 0
    device: Device = "auto"
    num_threads: int | None = None
    inference_batch_size: int = 256
    progress: bool = True
    progress_interval_s: float = 30.0
    keep_epoch_maps: bool = True
    final_map: FinalMap = "backprojection"
    track_particles: int = 512


@dataclass(frozen=True)
class InputConfig:
    """Where the particles come from (recorded so that ``--resume`` can reload them).

    Attributes
    ----------
    particles : str or None
        ``.star``, ``.cs``, ``.txt`` or ``.mrcs`` file.
    ctf : str or None
        cryoDRGN ``ctf.pkl`` (for ``.mrcs``/``.txt`` inputs).
    ind : str or None
        cryoDRGN index ``.pkl`` selecting a subset.
    datadir : str or None
        Folder to resolve relative image paths against.
    relative_to : str or None
        Folder the image paths of the written ``poses.star`` are made relative to (e.g. the
        RELION project folder); None: the paths as the input had them.
    optics_group : str or None
        The one optics group of a ``.star`` to read (its number or name, ``--optics-group``);
        ``ind`` then indexes that group's particles. None: every particle.
    """

    particles: str | None = None
    ctf: str | None = None
    ind: str | None = None
    datadir: str | None = None
    relative_to: str | None = None
    optics_group: str | None = None


@dataclass(frozen=True)
class Config:
    """The whole run configuration."""

    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)
    input: InputConfig = field(default_factory=InputConfig)

    def __post_init__(self) -> None:
        validate(self)


_SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "optim": OptimConfig,
    "schedule": ScheduleConfig,
    "data": DataConfig,
    "run": RunConfig,
    "input": InputConfig,
}


def load_preset(name: str) -> dict[str, dict[str, object]]:
    """The nested overrides of preset ``name`` (``{section: {field: value}}``), validated."""
    text = preset_text(name)
    where = f"preset {name}"
    data = check_sections(yaml.safe_load(text) or {}, _SECTIONS, where)
    config_from_dict(data, where=where)  # type check now, not at first use
    return data


def build_config(
    preset: str | None = "default",
    overrides: Mapping[str, Mapping[str, object]] | None = None,
) -> Config:
    """Defaults < preset < ``overrides`` (e.g. from the command line; ``None`` values ignored).

    ``schedule.method`` ``amortized`` or ``cryoai`` replaces the preset's ``switch_epoch`` by
    ``epochs`` and its ``search_epochs`` by 0 (they never switch), and ``cryoai`` its
    ``num_heads`` by 1 (and drops a preset's ``switch_steps``); an override that contradicts
    this raises :class:`InputError`. A ``switch_epoch`` override without a ``switch_steps``
    one drops the preset's ``switch_steps``. A preset's ``search_min_epochs`` above the
    resulting ``search_epochs`` becomes None.
    """
    merged: dict[str, dict[str, object]] = {}
    if preset is not None:
        for section, values in load_preset(preset).items():
            merged.setdefault(section, {}).update(values)
    for section, given in (overrides or {}).items():
        for key, value in given.items():
            if value is not None:
                merged.setdefault(section, {})[key] = value
    apply_merge_rules(merged, overrides or {}, dataclasses.asdict(ScheduleConfig()))
    return config_from_dict(merged, where="command line")


def config_to_dict(config: Config) -> dict[str, dict[str, object]]:
    """Plain nested dict (YAML-ready) of ``config``."""
    return {name: dataclasses.asdict(getattr(config, name)) for name in _SECTIONS}


def config_from_dict(data: Mapping[str, object], *, where: str = "configuration") -> Config:
    """Build a :class:`Config` from a nested dict; missing fields take their defaults.

    Unknown sections or fields and wrongly typed values raise :class:`InputError` naming
    ``where`` (a file name or "command line").
    """
    nested = migrate_renamed(check_sections(data, _SECTIONS, where), where)
    sections: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        values = nested.get(name, {}) or {}
        hints = typing.get_type_hints(cls)
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in values.items():
            if key not in known:
                raise InputError(
                    f"{where}: unknown field {name}.{key} "
                    f"(expected one of {', '.join(sorted(known))})"
                )
            kwargs[key] = coerce(value, hints[key], f"{where}: {name}.{key}")
        sections[name] = cls(**kwargs)
    try:
        return Config(**sections)
    except InputError as exc:
        raise InputError(f"{where}: {exc}") from None


def save_config(
    path: str | Path,
    config: Config,
    argv: list[str] | None = None,
    *,
    resumed: list[list[str] | None] | None = None,
) -> None:
    """Write ``config`` as YAML (atomically) with the cryospin version and command line.

    ``argv`` is the command line that started the run; ``resumed`` the command lines of the
    later ``--resume`` invocations (recorded under ``resumed_argv``).
    """
    doc: dict[str, Any] = {
        "cryospin_version": __version__,
        "argv": list(argv) if argv is not None else None,
    }
    if resumed:
        doc["resumed_argv"] = [None if a is None else list(a) for a in resumed]
    doc.update(config_to_dict(config))
    atomic_write_text(path, yaml.safe_dump(doc, sort_keys=False, default_flow_style=False))


def load_config(path: str | Path) -> Config:
    """Read a ``config.yaml`` written by :func:`save_config` back into a :class:`Config`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError("file not found", path) from None
    except OSError as exc:
        raise InputError(f"cannot read ({exc.strerror})", path) from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise InputError(f"not valid YAML ({str(exc).splitlines()[0]})", path) from None
    if not isinstance(data, dict):
        raise InputError("expected a YAML mapping", path)
    data = {k: v for k, v in data.items() if k not in _META_KEYS}
    return config_from_dict(data, where=str(path))


def record_resolved(path: str | Path, resolved: Mapping[str, object]) -> None:
    """Add (replace) the ``resolved`` section of a ``config.yaml``: what ``auto`` settings became
    on this machine (precision and why, device, threads, CPU). Metadata: ignored by
    :func:`load_config`. Atomic; an unreadable file is left alone."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return
    if not isinstance(doc, dict):
        return
    doc["resolved"] = dict(resolved)
    atomic_write_text(path, yaml.safe_dump(doc, sort_keys=False, default_flow_style=False))


def read_config_argv(path: str | Path) -> tuple[list[str] | None, list[list[str] | None]]:
    """``(argv, resumed_argv)`` recorded in a ``config.yaml`` (``(None, [])`` if unreadable)."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return None, []
    if not isinstance(data, dict):
        return None, []
    return data.get("argv"), list(data.get("resumed_argv") or [])
