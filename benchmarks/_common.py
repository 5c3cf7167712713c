"""Small helpers shared by the benchmark scripts (not part of the cryospin package).

* :func:`run` — run a command with its output appended to a log; wall time and the peak
  resident memory of the child (``os.wait4``), exit on failure.
* :func:`cryospin_argv` — how to call the ``cryospin`` command line with this interpreter.
* :func:`read_jsonl` — the lines of a ``metrics.jsonl``.
* :func:`machine_line` — the CPU and kernel path every speed figure is printed with.
* :func:`write_derived_set` — a simulated set's copy with other images (junk, contrast).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from cryospin.io.mrc import write_stack

__all__ = ["run", "cryospin_argv", "read_jsonl", "markdown_table", "machine_line"]


def machine_line() -> str:
    """The CPU model, ATen's CPU capability, oneDNN's ISA cap and torch's threads: every speed
    figure is printed with it (``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`` gives an
    AVX2-only machine's path on any CPU)."""
    import torch

    from cryospin.train.precision import cpu_bf16_support, cpu_model_name

    native, why = cpu_bf16_support()
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "unset")
    return (f"CPU {cpu_model_name()}, capability {torch.backends.cpu.get_cpu_capability()}, "
            f"ONEDNN_MAX_CPU_ISA {isa}, native bf16: {'yes' if native else 'no'} ({why}), "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads{_gpu()}")


def _gpu() -> str:
    """``, GPU <name> (CUDA <version>)`` where torch sees a CUDA device, else empty."""
    import torch

    if not torch.cuda.is_available():
        return ""
    return f", GPU {torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"


def cryospin_argv() -> list[str]:
    """``[python, -m, cryospin.cli.main]`` with the running interpreter."""
    return [sys.executable, "-m", "cryospin.cli.main"]


def run(argv: list[str], log: Path) -> tuple[float, float]:
    """Run ``argv`` (stdout and stderr appended to ``log``).

    Returns
    -------
    wall_s : float
        Wall time, seconds.
    peak_rss_mib : float
        Peak resident set size of the child (``ru_maxrss`` from ``os.wait4``), MiB.

    Exits the benchmark with a message naming the log when the command fails.
    """
    print(f"$ {shlex.join(argv)}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    with open(log, "ab") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if status != 0:
        sys.exit(f"command failed (see {log}): {shlex.join(argv)}")
    return wall, usage.ru_maxrss / 1024  # Linux: KiB


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every non-empty line of a JSON-lines file as a dict (missing file: empty list)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table (strings in, one string out)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


#: the files of a `cryospin simulate` folder a derived set keeps as they are
SIMULATION_FILES = ("particles.star", "gt.mrc", "gt_poses.pkl", "simulation.json")


def write_derived_set(source: Path, out: Path, images: Any, pixel_size_angstrom: float,
                      record: tuple[str, Any]) -> None:
    """A new folder ``out``: ``images`` `(N, L, L)` as its ``particles.mrcs``, the other
    files of the simulation ``source`` copied, and ``record`` = (file name, array) saved
    with ``numpy.save`` (what was changed)."""
    out.mkdir(parents=True)
    write_stack(out / "particles.mrcs", images, pixel_size_angstrom)
    for name in SIMULATION_FILES:
        shutil.copy(source / name, out / name)
    np.save(out / record[0], record[1])
