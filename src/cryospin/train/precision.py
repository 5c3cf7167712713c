"""The encoder's arithmetic, chosen per device and machine (``model.precision``).

Why: bf16 autocast runs the encoder step 2.9x faster than float32 on a CPU with native bf16
(AMD Zen 4, AVX512-BF16; 3–5x with AMX) and **10x slower** on one without (AVX2 only: the bf16
kernels are emulated) — ``benchmarks/bench_encoder.py`` and ``benchmarks/RESULTS.md``. A user
cannot be expected to know which machine they are on, so ``precision: auto`` decides:

- **CPU**: bf16 only when the hardware has it (:func:`cpu_bf16_support`: AVX512-BF16 or AMX,
  ATen's kernels at the AVX512 level and oneDNN not capped below bf16 by
  ``ONEDNN_MAX_CPU_ISA``) *and* a micro-benchmark of the actual encoder training step
  (:func:`measure_encoder_step`, about a second) measures it faster than float32; else fp32.
  The measurement is cached per machine, torch version, thread count and encoder shape in the
  user's cache folder (:func:`cache_path`), so later runs start at once — unless the machine
  was busy when it was taken (:func:`machine_busy`): then it decides this run only, and the
  next run measures again (on an Intel Xeon with AMX, a 15-head encoder measured 0.82x in
  bf16 beside another job and was cached as fp32 for good, where the same encoder with shift
  heads had measured 1.37x).
- **CUDA**: bf16 where ``torch.cuda.is_bf16_supported()``, else fp16 with a gradient scaler.
- **MPS**: fp32 (autocast coverage on MPS differs between macOS and torch versions).

``fp32``, ``bf16`` and ``fp16`` are taken as asked (with a warning when the hardware has no fast
path for them). Testing the other path on any machine: ``ATEN_CPU_CAPABILITY=avx2
ONEDNN_MAX_CPU_ISA=AVX2`` for the process makes this module, torch and oneDNN behave as on an
AVX2-only CPU.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from cryospin.atomic import atomic_write_text
from cryospin.train.optimizer import adam

__all__ = [
    "PrecisionChoice",
    "StepTimes",
    "autocast_dtype",
    "cache_path",
    "cpu_bf16_support",
    "cpu_model_name",
    "machine_busy",
    "machine_key",
    "measure_encoder_step",
    "resolve_precision",
]

logger = logging.getLogger(__name__)

_DTYPES: dict[str, torch.dtype | None] = {
    "fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16,
}
#: oneDNN ISA caps (``ONEDNN_MAX_CPU_ISA``) that still allow its native bf16 kernels.
_ONEDNN_BF16_ISAS = ("AVX512_CORE_BF16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16",
                     "AVX10_1_512", "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16",
                     "AVX10_2_512", "AVX10_2_512_AMX_2", "ALL", "DEFAULT")
#: bf16 must beat float32 by this factor (a tie is not worth bf16's rounding)
_MIN_SPEEDUP = 1.1
#: a machine whose 1-minute load average exceeds this fraction of its CPUs is busy
_BUSY_LOAD_FRACTION = 0.5
_BENCH_BUDGET_S = 0.5  # timed steps per precision (after one warm-up step)
_BENCH_MAX_STEPS = 6
_BENCH_BATCH = 16


@dataclass(frozen=True)
class PrecisionChoice:
    """The resolved ``model.precision`` and why.

    Attributes
    ----------
    name : "fp32", "bf16" or "fp16"
    reason : str
        One line for the log and ``config.yaml``.
    requested : str
        ``model.precision`` as configured (``auto`` or the name).
    """

    name: str
    reason: str
    requested: str

    @property
    def dtype(self) -> torch.dtype | None:
        """The encoder trunk's autocast dtype (None: float32)."""
        return autocast_dtype(self.name)

    @property
    def needs_grad_scaler(self) -> bool:
        """fp16 gradients underflow without loss scaling."""
        return self.name == "fp16"


@dataclass(frozen=True)
class StepTimes:
    """Seconds per image of one encoder training step (forward, backward, Adam)."""

    fp32_s: float
    bf16_s: float

    @property
    def speedup(self) -> float:
        """float32 time / bf16 time (> 1: bf16 is faster)."""
        return self.fp32_s / self.bf16_s if self.bf16_s > 0 else 0.0


def autocast_dtype(name: str) -> torch.dtype | None:
    """``"fp32"`` -> None, ``"bf16"`` -> ``torch.bfloat16``, ``"fp16"`` -> ``torch.float16``."""
    if name not in _DTYPES:
        raise ValueError(f"precision must be fp32, bf16 or fp16, got {name!r}")
    return _DTYPES[name]


def cpu_bf16_support() -> tuple[bool, str]:
    """Whether this process's CPU kernels have a native bf16 path, and why (one phrase).

    Native means: the CPU has AVX512-BF16 or AMX tiles, ATen's kernels run at the AVX512 level
    (``torch.backends.cpu.get_cpu_capability()``; ``ATEN_CPU_CAPABILITY=avx2`` lowers it) and
    ``ONEDNN_MAX_CPU_ISA``, if set, allows oneDNN's bf16 instructions.
    """
    capability = torch.backends.cpu.get_cpu_capability()
    has_bf16 = bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())
    has_amx = bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
    if not (has_bf16 or has_amx):
        return False, f"the CPU has neither AVX512-BF16 nor AMX (capability {capability})"
    if not capability.startswith("AVX512"):
        return False, f"ATen's CPU capability is {capability}"
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    if isa and isa not in _ONEDNN_BF16_ISAS:
        return False, f"ONEDNN_MAX_CPU_ISA={isa} caps oneDNN below its bf16 kernels"
    return True, ("the CPU has AMX" if has_amx else "the CPU has AVX512-BF16") + \
        f" (capability {capability})"


def cpu_model_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``; else :func:`platform.processor`)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


# The timed step's version, part of the cache key: 2 since its Adam is the fused one
# (train/optimizer.adam), which changes both precisions' times; 3 since a measurement on a busy
# machine is no longer cached (older entries may have been); older entries are re-measured.
_STEP_VERSION = 3


def machine_key(shape: dict[str, object]) -> str:
    """Cache key of a measurement: the CPU, the kernels' ISA settings, torch, threads, the timed
    step's version and the encoder ``shape`` (box, width, heads, ...)."""
    parts = {
        "step": _STEP_VERSION,
        "cpu": cpu_model_name(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", ""),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        **shape,
    }
    return json.dumps(parts, sort_keys=True)


def machine_busy() -> tuple[bool, str]:
    """Whether other work loads this machine (1-minute load average above half its CPUs), and
    the load as a phrase; never busy where the load average is unknown (not Unix)."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return False, "load unknown"
    cpus = os.cpu_count() or 1
    return load > _BUSY_LOAD_FRACTION * cpus, f"load {load:.1f} on {cpus} CPUs"


def cache_path() -> Path:
    """``$XDG_CACHE_HOME/cryospin/precision.json`` (default ``~/.cache/...``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cryospin" / "precision.json"


def _read_cache(path: Path) -> dict[str, dict[str, float]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(path: Path, key: str, times: StepTimes) -> None:
    """Best effort: an unwritable cache only costs the next run its second."""
    data = _read_cache(path)
    data[key] = asdict(times)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True))
    except OSError as exc:
        logger.debug("precision cache %s not written: %s", path, exc)


def measure_encoder_step(
    build: Callable[[torch.dtype | None], nn.Module],
    box_px: int,
    *,
    batch: int = _BENCH_BATCH,
    budget_s: float = _BENCH_BUDGET_S,
) -> StepTimes:
    """Time one training step of the encoder in float32 and in bf16 autocast, per image.

    Parameters
    ----------
    build : callable
        ``build(autocast_dtype)`` returns a fresh encoder (CPU) taking `(B, L, L)` images.
    box_px : int
        ``L``, the images' box.
    batch : int
        Images per timed step.
    budget_s : float
        Seconds of timed steps per precision (at least one step each, after a warm-up step).

    Returns
    -------
    StepTimes
        The fastest step of each precision, seconds per image. The two precisions' steps
        alternate, so that a burst of load from another process slows both alike. bf16 stops
        after its warm-up when that alone is 3x slower than float32's (an emulated path: no
        need to time more).
    """
    # the run seeded the global generator before this: leave it as it was, so that a run is
    # the same whether this machine's timing was cached or measured now
    with torch.random.fork_rng(devices=[]):
        return _time_steps(build, box_px, batch, budget_s)


def _time_steps(build: Callable[[torch.dtype | None], nn.Module], box_px: int, batch: int,
                budget_s: float) -> StepTimes:
    """:func:`measure_encoder_step`'s timing (it seeds and draws from the global generator)."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, box_px, box_px, generator=gen)  # (B, L, L)

    def make_step(dtype: torch.dtype | None) -> Callable[[], float]:
        torch.manual_seed(0)
        encoder = build(dtype)
        opt = adam(encoder.parameters(), lr=1e-4)

        def step() -> float:
            t0 = time.perf_counter()
            out = encoder(images)
            loss = out.rotations.square().sum() + (
                0 if out.shifts_px is None else out.shifts_px.square().sum())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return time.perf_counter() - t0

        return step

    steps = {"fp32": make_step(None), "bf16": make_step(torch.bfloat16)}
    warm = {name: step() for name, step in steps.items()}  # allocations, kernel selection
    if warm["bf16"] > 3.0 * warm["fp32"] + 0.05:
        return StepTimes(fp32_s=warm["fp32"] / batch, bf16_s=warm["bf16"] / batch)
    best = {name: float("inf") for name in steps}
    spent, rounds = 0.0, 0
    while rounds < 1 or (spent < 2 * budget_s and rounds < _BENCH_MAX_STEPS):
        for name, step in steps.items():
            dt = step()
            best[name], spent = min(best[name], dt), spent + dt
        rounds += 1
    return StepTimes(fp32_s=best["fp32"] / batch, bf16_s=best["bf16"] / batch)


def resolve_precision(
    requested: str,
    device: torch.device,
    *,
    measure: Callable[[], StepTimes] | None = None,
    shape: dict[str, object] | None = None,
    cache: Path | None = None,
) -> PrecisionChoice:
    """Resolve ``model.precision`` for ``device``.

    Parameters
    ----------
    requested : "auto", "fp32", "bf16" or "fp16"
    device : torch.device
    measure : callable, optional
        Runs the micro-benchmark (:func:`measure_encoder_step`); needed for ``auto`` on a CPU
        with native bf16 (without it such a CPU gets fp32).
    shape : dict, optional
        The encoder's shape, part of the cache key (:func:`machine_key`).
    cache : Path, optional
        The measurements' cache file (default :func:`cache_path`).

    Returns
    -------
    PrecisionChoice
        Never bf16 when the measurement found it slower than float32.
    """
    if requested != "auto":
        autocast_dtype(requested)  # validates
        return PrecisionChoice(requested, _explicit_reason(requested, device), requested)
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return PrecisionChoice("bf16", "auto: the GPU supports bf16", requested)
        return PrecisionChoice("fp16", "auto: the GPU has no bf16; fp16 with a gradient scaler",
                               requested)
    if device.type != "cpu":
        return PrecisionChoice("fp32", f"auto: fp32 on {device.type}", requested)
    native, why = cpu_bf16_support()
    if not native:
        return PrecisionChoice("fp32", f"auto: no native bf16 ({why})", requested)
    if measure is None:
        return PrecisionChoice("fp32", f"auto: {why}, but no encoder step to measure",
                               requested)
    path = cache or cache_path()
    key = machine_key(shape or {})
    cached = _read_cache(path).get(key)
    source = "cached"
    times: StepTimes | None = None
    if isinstance(cached, dict):
        try:
            times = StepTimes(float(cached["fp32_s"]), float(cached["bf16_s"]))
        except (KeyError, TypeError, ValueError):
            times = None
    if times is None:
        busy, load = machine_busy()
        times = measure()
        if busy:  # for this run only: the next one measures again
            source = f"measured on a busy machine ({load}; not cached)"
        else:
            source = "measured"
            _write_cache(path, key, times)
    rates = (f"{1 / times.fp32_s:.0f} img/s fp32, {1 / times.bf16_s:.0f} img/s bf16"
             if times.fp32_s > 0 and times.bf16_s > 0 else "no timing")
    if times.speedup >= _MIN_SPEEDUP:
        return PrecisionChoice(
            "bf16", f"auto: {why}; encoder step {source} {times.speedup:.1f}x faster in bf16 "
            f"({rates})", requested)
    return PrecisionChoice(
        "fp32", f"auto: {why}, but the encoder step {source} no faster in bf16 "
        f"({times.speedup:.2f}x; {rates})", requested)


def _explicit_reason(name: str, device: torch.device) -> str:
    """The reason line of a precision given explicitly (warns about slow paths)."""
    if device.type == "cpu" and name == "bf16":
        native, why = cpu_bf16_support()
        if not native:
            logger.warning("precision bf16 on a CPU without native bf16 (%s): the encoder "
                           "runs emulated, ~10x slower than fp32; consider --precision auto",
                           why)
            return f"as configured (no native bf16: {why})"
    if device.type == "cpu" and name == "fp16":
        logger.warning("precision fp16 on a CPU: few CPUs have fast fp16 kernels; consider "
                       "--precision auto")
    return "as configured"
