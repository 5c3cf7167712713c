"""The memory plan of a training run: predicted peak resident memory, and the loader it implies.

The peak resident set of ``cryospin reconstruct`` is modelled as

    peak = runtime + metadata + data + max(setup, stage 1, switch, stage 2, final)

with every term an explicit function of the number of particles ``N``, the (cropped) box
``L``, the loss-disc size ``P``, the heads ``M``, the batch size ``B``, the encoder width, the
global-search grid and the loader (sizes in bytes; see :func:`plan_memory` for the formulas).
The constants were calibrated against the peak RSS (``resource.getrusage``) of small CPU runs
(``tests/unit/test_memory.py`` checks the prediction within ±35 %).

:func:`plan_and_load` is what the trainer calls before training: it logs one table (in-memory
and streaming plans side by side), holds the data in memory when the in-memory plan fits
``DataConfig.max_memory_gb``, streams otherwise, and stops with a one-line
:class:`~cryospin.errors.InputError` when even the streaming plan does not fit.

Distributed training (``W`` ranks): the data are sharded (each rank reads, preprocesses and
holds or streams only its particles ``i mod W == rank``), so the plan is that of one rank: the
data terms use the largest share ``⌈N / W⌉`` (the metadata, pose table and outputs stay ``N``).
Every rank computes the same plan from ``N`` and ``W``, hence picks the same loader.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from cryospin.encoder import VGG16_LAYOUT, MultiHeadPoseEncoder
from cryospin.errors import InputError
from cryospin.symmetry import grid_cosets, point_group_rotations
from cryospin.train.config import AMORTIZED_METHODS, Config, ModelConfig
from cryospin.train.data import TrainingData
from cryospin.train.distributed import Shard
from cryospin.train.release import return_free_memory
from cryospin.train.stream import StreamOptions

__all__ = [
    "RUNTIME_BYTES",
    "MemoryPlan",
    "LoaderChoice",
    "plan_memory",
    "choose_loader",
    "format_plans",
    "plan_and_load",
    "encoder_layer_sizes",
    "encoder_parameter_count",
    "return_free_memory",
    "symmetry_volume_bytes",
]

logger = logging.getLogger(__name__)

#: Resident memory of the Python interpreter with torch, numpy, pandas and cryospin imported
#: (≈ 290 MB) plus what the first forward/backward passes add for good (kernel code pages,
#: oneDNN primitives, allocator pools; ≈ 160 MB) (measured, torch 2.13 CPU, Linux x86-64).
RUNTIME_BYTES = 450 * 2**20


# calibrated constants (bytes per element of the named quantity)
_PREPROCESS_BYTES_PER_PIXEL = 56  # float64 image, complex FFT and its shifts, per pixel
_STATS_IMAGES = 2000  # prepare_data's statistics sample (float64 + float32 copy)
_ACT_BYTES = 10.0  # encoder activations kept for backward, per element (bf16 conv + f32 BN)
_ACT_BYTES_F32 = 14.0  # the same in float32
_RENDER_FLOATS = 24  # floats kept per predicted coefficient (B·M·P) in stage 1
_STAGE2_FLOATS = 40  # floats per coefficient (B·P) in a pose step and the volume step
_VOLUME_COPIES = 14  # float32 L³ arrays: 2 params, 2 grads, 4 Adam moments, forward + backward
_FINAL_VOLUME_BYTES = 96  # per voxel at the end: Wiener backprojection (float64/complex) + maps
_METADATA_BYTES = 240  # per particle: CTF (float64), stack/image/optics indices, names
_OUTPUT_BYTES = 700  # per particle at the end: final poses, float64 copies, poses.star table
_POSE_TABLE_BYTES = 4 * (9 + 2 + 3 + 3 + 2 + 2) + 8 * 2  # rotation, shift, Adam, step counts
_BEST_POSES_BYTES = 2 * 4 * (9 + 2 + 1 + 1)  # BestPoses and the switch's float copies of it
_SEARCH_CHUNK = 4096  # rotations per matrix product in the global search
# the group average of a symmetric volume (forward + backward), in float32 L³ arrays: a base,
# then per resampling about z (bilinear, shared by the planes), per trilinear resampling (its
# M³ × 3 grid kept for backward) and per grid permutation. Measured (peak RSS above a C1
# volume step, torch 2.13 CPU, L = 96-160, repeated: the allocator makes it vary): C7 9-23,
# D7 10-15, T 56-62, O 11-14, I 25-39; these constants give C7 28, D7 29, T 66, O 33, I 43
# (a plan must not fall short: never below the largest measured).
_SYM_BASE, _SYM_BILINEAR, _SYM_TRILINEAR, _SYM_PERMUTATION = 9.0, 3.0, 5.5, 1.0
#: the group planned for ``symmetry: auto`` (detection may choose any): T, the costliest
_AUTO_PLANNED_GROUP = "T"


def symmetry_volume_bytes(symbol: str, box_px: int) -> int:
    """Memory of one forward and backward pass of the group average of an ``L³`` volume
    (:func:`cryospin.forward.symmetrize.symmetrize_volume`), bytes; 0 for C1. ``"auto"`` is
    planned as the costliest group it may choose (T)."""
    group = _AUTO_PLANNED_GROUP if symbol.lower() == "auto" else symbol
    rotations = point_group_rotations(group)  # (G, 3, 3)
    if rotations.shape[0] == 1:
        return 0
    cosets, perms = grid_cosets(rotations)  # (H, 3, 3), (P, 3, 3); identity first
    about_z = [bool((h[2, 2] == 1) & (h[:2, 2].abs().sum() + h[2, :2].abs().sum() == 0))
               for h in cosets[1:].double()]
    n_bilinear = sum(about_z)
    n_trilinear = len(about_z) - n_bilinear
    units = (_SYM_BASE + _SYM_BILINEAR * n_bilinear + _SYM_TRILINEAR * n_trilinear
             + _SYM_PERMUTATION * perms.shape[0])
    return int(units * 4 * box_px**3)


@dataclass(frozen=True)
class MemoryPlan:
    """Predicted peak resident memory of one run with one loader.

    Attributes
    ----------
    loader : str
        ``"in-memory"`` or ``"streaming"``.
    rows : tuple of ``(component, bytes)``
        Resident terms and the largest phase (``peak phase: ...``); they add up to the total.
    phases : dict of str to int
        Transient bytes of each phase (setup, stage 1, switch, stage 2, final).
    """

    loader: str
    rows: tuple[tuple[str, int], ...]
    phases: dict[str, int]

    @property
    def total_bytes(self) -> int:
        """Predicted peak resident memory (bytes)."""
        return int(sum(b for _, b in self.rows))

    @property
    def total_gb(self) -> float:
        return self.total_bytes / 1e9


@dataclass(frozen=True)
class LoaderChoice:
    """The loader chosen by :func:`choose_loader` and why."""

    preload: bool
    reason: str
    in_memory: MemoryPlan
    streaming: MemoryPlan

    @property
    def plan(self) -> MemoryPlan:
        return self.in_memory if self.preload else self.streaming


def encoder_layer_sizes(box_px: int, width_multiplier: float) -> list[tuple[int, int]]:
    """``(channels, pixels per channel)`` of every convolution output of the encoder trunk."""
    side, sizes = int(box_px), []
    for item in VGG16_LAYOUT:
        if item == "M":
            side = math.ceil(side / 2)
            continue
        channels = max(8, round(int(item) * width_multiplier))
        sizes.append((channels, side * side))
    return sizes


def encoder_parameter_count(model: ModelConfig, box_px: int) -> int:
    """Number of learnable values of the stage-1 encoder of ``model`` for ``box_px`` images.

    Counted on the encoder itself, built on the meta device (shapes only: nothing allocated,
    no random numbers drawn). The cryoAI in-plane-flip wrapper adds no parameters.
    """
    with torch.device("meta"):
        encoder = MultiHeadPoseEncoder(
            box_px, model.num_heads, width_multiplier=model.width_multiplier,
            predict_shifts=model.predict_shifts, max_shift_px=model.max_shift_px,
            head_hidden=model.head_hidden, input_box_px=model.encoder_input_box(box_px),
            head=model.head, input_channels=model.encoder_input, pooling=model.pooling,
        )
    return sum(p.numel() for p in encoder.parameters())


def _disc_size(radius_px: float) -> int:
    """Number of integer frequencies with ``|k| ≤ radius`` (≈ π r²)."""
    r = int(math.floor(radius_px))
    return sum(2 * int(math.floor(math.sqrt(radius_px**2 - y * y))) + 1 for y in range(-r, r + 1))


def plan_memory(
    config: Config,
    *,
    num_particles: int,
    box_px: int,
    num_frequencies: int,
    use_ctf: bool,
    loader: str,
    stream_options: StreamOptions | None = None,
    world_size: int = 1,
) -> MemoryPlan:
    """Predict the peak resident memory of a run (of one rank when distributed).

    Parameters
    ----------
    config : cryospin.train.config.Config
        Heads, width, head width, batch size, bf16, shifts, search grid and radii, inference
        batch size and the final-map mode are read from it.
    num_particles : int
        ``N``.
    box_px : int
        ``L`` after any cropping.
    num_frequencies : int
        ``P``, frequencies on the loss disc.
    use_ctf : bool
    loader : "in-memory" or "streaming"
    stream_options : cryospin.train.stream.StreamOptions, optional
    world_size : int
        ``W`` ranks sharing the particles: the data terms below are those of ``⌈N / W⌉``
        particles (in memory) or ``1 / W`` of the streamed rows.

    Returns
    -------
    MemoryPlan
        Resident terms (bytes): ``runtime`` (:data:`RUNTIME_BYTES`), ``metadata``
        (``240 N``), ``data`` (in memory ``4 N (L² + P (1 + ctf))``; streaming, the images of
        :meth:`StreamOptions.resident_images` plus one chunk's preprocessing at ``56 L²``
        per image), ``volume`` (``14 · 4 L³``), ``encoder`` (parameters, gradients and Adam:
        16 bytes each; no row in a search-only run, which builds none); and the largest
        phase: setup (statistics sample ``2000 L² · 12`` and one 512-image preprocessing
        chunk), stage 1 (activations ``B Σ_layers C·H·W · 10`` + rendering ``B M P · 96``),
        switch (inference activations + pose table ``100 N`` + best poses ``104 N``; search
        only: the pose table alone), stage 2 (pose table, ``B P · 160``, search grid
        products, and with a point group the group average's temporaries,
        :func:`symmetry_volume_bytes`; in stage 1 too when it is imposed from the start),
        final (``96 L³`` + ``700 N`` + pose table).
    """
    if loader not in ("in-memory", "streaming"):
        raise ValueError(f"loader must be 'in-memory' or 'streaming', got {loader!r}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    opts = stream_options or StreamOptions()
    N, L, P = int(num_particles), int(box_px), int(num_frequencies)
    W = int(world_size)
    n_rank = -(-N // W)  # the largest share of the particles (rank 0's)
    m, o, s = config.model, config.optim, config.schedule
    B, M = int(o.batch_size), int(m.num_heads)
    per_image = 4 * (L * L + P * (2 if use_ctf else 1))
    preprocess_chunk = min(512, n_rank) * L * L * _PREPROCESS_BYTES_PER_PIXEL

    if loader == "in-memory":
        data = n_rank * per_image
        setup_chunk = preprocess_chunk
    else:  # the held rows of the windows, queue and batch (≈ 1 / W of them)
        chunk = -(-min(opts.chunk_images, N) // W)
        data = min(-(-opts.resident_images(B) // W), n_rank + -(-B // W)) * per_image
        data += chunk * L * L * _PREPROCESS_BYTES_PER_PIXEL
        setup_chunk = preprocess_chunk
    volume = _VOLUME_COPIES * 4 * L**3
    encoder_params = 0 if s.search_only else encoder_parameter_count(m, L)  # none built
    trains_encoder = s.switch_epoch > 0
    encoder = 16 * encoder_params if trains_encoder else 4 * encoder_params

    layers = encoder_layer_sizes(m.encoder_input_box(L), m.width_multiplier)
    act_elems = sum(c * hw for c, hw in layers)
    # "auto" may resolve to fp32 (the larger activations): plan for it
    act_bytes = _ACT_BYTES if m.precision in ("bf16", "fp16") else _ACT_BYTES_F32
    stats = min(_STATS_IMAGES, N)
    phases = {
        "setup": stats * L * L * 12 + setup_chunk,
        "stage 1": int(B * act_elems * act_bytes) + B * M * P * 4 * _RENDER_FLOATS
        if trains_encoder else 0,
    }
    ib = min(int(config.run.inference_batch_size), N)
    largest = max((c * hw for c, hw in layers), default=0)
    phases["switch"] = (N * _POSE_TABLE_BYTES if s.search_only  # random rotations only
                        else ib * largest * 4 * 3 + ib * M * P * 4 * 8
                        + N * (_POSE_TABLE_BYTES + _BEST_POSES_BYTES))
    r_search = max(o.search_radius_px, o.search_radius_end_px or 0.0,
                   o.search_radius_symmetric_px or 0.0)
    r_search = min(r_search, L // 2 - 1)
    p_search = _disc_size(r_search)
    grid = int(o.search_rotations)
    chunk_r = min(_SEARCH_CHUNK, grid)
    search = (grid * 9 * 4 + chunk_r * p_search * 4 * 8 + B * chunk_r * 4 * 4
              if s.search_epochs > 0 else 0)
    phases["stage 2"] = N * _POSE_TABLE_BYTES + B * P * 4 * _STAGE2_FLOATS + search
    symmetric = symmetry_volume_bytes(m.symmetry, L)  # once the group is imposed
    phases["stage 2"] += symmetric
    from_start = s.impose_symmetry == "start" or s.method in AMORTIZED_METHODS
    if phases["stage 1"] and from_start and m.symmetry.lower() != "auto":
        phases["stage 1"] += symmetric
    phases["final"] = (_FINAL_VOLUME_BYTES * L**3 + N * (_OUTPUT_BYTES + _POSE_TABLE_BYTES)
                       + (min(256, N) * per_image * 4
                          if getattr(config.run, "final_map", "decoder") == "backprojection"
                          else 0))
    peak_name = max(phases, key=lambda k: phases[k])
    rows = (
        ("runtime (python + torch)", RUNTIME_BYTES),
        ("particle metadata", N * _METADATA_BYTES),
        (("images + Hartley + CTF" if loader == "in-memory" else "streamed chunks")
         + (f" (1/{W} per rank)" if W > 1 else ""), data),
        ("volume + Adam", volume),
        *((("encoder + Adam", encoder),) if encoder_params else ()),
        (f"peak phase: {peak_name}", phases[peak_name]),
    )
    return MemoryPlan(loader=loader, rows=rows, phases=phases)


def format_plans(plans: list[MemoryPlan], chosen: str | None = None) -> str:
    """One Markdown table (MB = 2²⁰ bytes) with a column per plan; ``chosen`` marked ``*``."""
    head = "| component | " + " | ".join(
        p.loader + (" *" if p.loader == chosen else "") for p in plans) + " |"
    lines = [head, "|---|" + "---:|" * len(plans)]
    names = [name.split(":")[0] for name, _ in plans[0].rows]
    for i, name in enumerate(names):
        cells = []
        for p in plans:
            label, value = p.rows[i]
            extra = label.split(":", 1)[1].strip() if ":" in label else ""
            cells.append(f"{value / 2**20:,.0f}" + (f" ({extra})" if extra else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("| **total (MB)** | " + " | ".join(
        f"**{p.total_bytes / 2**20:,.0f}**" for p in plans) + " |")
    return "\n".join(lines)


def choose_loader(
    config: Config, *, num_particles: int, box_px: int, num_frequencies: int, use_ctf: bool,
    stream_options: StreamOptions | None = None, world_size: int = 1,
) -> LoaderChoice:
    """In memory or streaming, following ``config.data.max_memory_gb`` (see module docstring).

    ``world_size`` ``W``: the budgets are per rank and the data terms those of a rank's share
    ``⌈N / W⌉``; the choice depends on ``N`` and ``W`` only, so every rank makes the same.

    Raises
    ------
    InputError
        When ``max_memory_gb`` is set and even the streaming plan exceeds it.
    """
    mem, stream = (
        plan_memory(config, num_particles=num_particles, box_px=box_px,
                    num_frequencies=num_frequencies, use_ctf=use_ctf, loader=loader,
                    stream_options=stream_options, world_size=world_size)
        for loader in ("in-memory", "streaming"))
    budget = config.data.max_memory_gb
    if budget is None:
        n_rank = -(-int(num_particles) // int(world_size))
        data_gb = n_rank * 4 * (box_px**2 + num_frequencies * (2 if use_ctf else 1)) / 1e9
        limit = config.data.max_preload_gb
        preload = data_gb <= limit
        share = f" per rank ({n_rank} particles)" if world_size > 1 else ""
        reason = (f"the preprocessed data take {data_gb:.2f} GB{share}, "
                  f"{'within' if preload else 'over'} max_preload_gb {limit:g} GB "
                  f"(no --max-memory given)")
        return LoaderChoice(preload, reason, mem, stream)
    if mem.total_gb <= budget:
        reason = f"the in-memory plan ({mem.total_gb:.2f} GB) fits --max-memory {budget:g} GB"
        return LoaderChoice(True, reason, mem, stream)
    if stream.total_gb <= budget:
        reason = (f"the in-memory plan ({mem.total_gb:.2f} GB) exceeds --max-memory {budget:g} "
                  f"GB; the streaming plan ({stream.total_gb:.2f} GB) fits")
        return LoaderChoice(False, reason, mem, stream)
    raise InputError(
        f"predicted peak memory {stream.total_gb:.2f} GB even when streaming exceeds "
        f"--max-memory {budget:g} GB; use a smaller --batch-size or --box (or raise --max-memory)"
    )


def plan_and_load(
    config: Config, data: TrainingData, stream_options: StreamOptions | None = None,
    shard: Shard | None = None,
) -> TrainingData:
    """Log the memory plan, choose the loader and finish ``data`` accordingly.

    Parameters
    ----------
    config : Config
    data : TrainingData
        Lazy (from ``prepare_data(..., preload=False)``).
    stream_options : StreamOptions, optional
    shard : cryospin.train.distributed.Shard, optional
        Distributed: the data are restricted to the rank's particles
        (``data.holding(shard.owned(N))``) before loading; the plan is per rank and every
        rank chooses the same loader. Rank 0 logs.

    Returns
    -------
    TrainingData
        ``data.in_memory()`` or ``data.streaming()`` (sharded: of the rank's particles).
    """
    world_size = 1 if shard is None else int(shard.world_size)
    main = shard is None or shard.rank == 0
    choice = choose_loader(
        config, num_particles=len(data), box_px=data.box_px,
        num_frequencies=int(data.frequencies.shape[0]), use_ctf=data.use_ctf,
        stream_options=stream_options, world_size=world_size,
    )
    loader = "in-memory" if choice.preload else "streaming"
    if main:
        logger.info("memory plan (predicted peak resident memory%s, MB):\n%s",
                    f" per rank, {world_size} ranks" if world_size > 1 else "",
                    format_plans([choice.in_memory, choice.streaming], chosen=loader))
        if world_size > 1:
            logger.info("loader: %s on each of the %d ranks (each holds its ~%d of %d "
                        "particles), because %s", loader, world_size,
                        -(-len(data) // world_size), len(data), choice.reason)
        else:
            logger.info("loader: %s, because %s", loader, choice.reason)
        if loader == "streaming" and config.data.cache_dir is None:
            logger.info("streaming without --cache-dir: the images are read, transformed and "
                        "their CTFs computed again every epoch; --cache-dir DIR stores them "
                        "once (float16) and makes epochs about as fast as in memory")
    if shard is not None:
        data = data.holding(shard.owned(len(data)))
    if choice.preload:
        return data.in_memory()
    return data.streaming()
