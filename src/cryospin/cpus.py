"""How many CPU cores this process may use: its affinity mask and its cgroup CPU quota.

``os.cpu_count()`` is the *host's* core count, and torch's default thread count (physical cores,
or ``OMP_NUM_THREADS``) does not read the cgroup CPU quota; in a container or under a batch
scheduler the process may run on fewer cores: a CPU affinity mask (``taskset``, Slurm
``--cpus-per-task`` with task binding, ``docker --cpuset-cpus``) and/or a CFS quota
(``docker --cpus``, Kubernetes CPU limits). More compute threads than that only add contention.

The cgroup files are read from the process's own view of ``/sys/fs/cgroup`` (a container's
cgroup namespace shows its own cgroup there): v2 ``cpu.max`` (``"max 100000"``: no limit,
``"200000 100000"``: 2 CPUs) and v1 ``cpu/cpu.cfs_quota_us`` / ``cpu/cpu.cfs_period_us``
(quota ``-1``: no limit). The parsing is pure (:func:`cgroup_cpu_quota` takes the file texts);
:func:`available_cpus` only reads the files and the affinity.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

__all__ = [
    "CGROUP_ROOT",
    "available_cpus",
    "cgroup_cpu_quota",
    "combine_cpu_limits",
    "default_cpu_threads",
]

CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_cpu_quota(
    cpu_max: str | None = None,
    cfs_quota_us: str | None = None,
    cfs_period_us: str | None = None,
) -> float | None:
    """The CPU quota, in CPUs, from the texts of the cgroup files; ``None``: no limit.

    Parameters
    ----------
    cpu_max : str, optional
        Text of cgroup v2 ``cpu.max``: ``"QUOTA PERIOD"`` in microseconds, QUOTA ``max`` for no
        limit. Takes precedence over the v1 texts when it gives a limit.
    cfs_quota_us, cfs_period_us : str, optional
        Texts of cgroup v1 ``cpu.cfs_quota_us`` (``-1`` for no limit) and ``cpu.cfs_period_us``.

    ``None`` (file missing) or unreadable contents count as "no limit".
    """
    if cpu_max is not None:
        fields = cpu_max.split()
        if len(fields) >= 1 and fields[0] != "max":
            period = fields[1] if len(fields) > 1 else "100000"  # the kernel's default period
            quota = _ratio(fields[0], period)
            if quota is not None:
                return quota
    if cfs_quota_us is not None and cfs_period_us is not None:
        return _ratio(cfs_quota_us.strip(), cfs_period_us.strip())
    return None


def _ratio(quota_us: str, period_us: str) -> float | None:
    """``quota / period`` when both are integers and positive; otherwise ``None``."""
    try:
        quota, period = int(quota_us), int(period_us)
    except ValueError:
        return None
    if quota <= 0 or period <= 0:  # -1: no limit
        return None
    return quota / period


def combine_cpu_limits(
    affinity_cpus: int | None, cpu_count: int | None, quota_cpus: float | None
) -> int:
    """``min(affinity (or cpu_count when unknown), ceil(quota))``, at least 1.

    Parameters
    ----------
    affinity_cpus : int, optional
        Cores in the process's affinity mask (``None`` where the platform has none).
    cpu_count : int, optional
        ``os.cpu_count()`` (``None`` when undetermined).
    quota_cpus : float, optional
        The cgroup CPU quota in CPUs (:func:`cgroup_cpu_quota`); ``None``: no limit. A fractional
        quota rounds up (1.5 CPUs -> 2 threads: the second one still gets half a core).
    """
    cores = affinity_cpus if affinity_cpus is not None else cpu_count
    limits = [n for n in (cores,) if n is not None]
    if quota_cpus is not None:
        limits.append(math.ceil(quota_cpus))
    return max(1, min(limits, default=1))


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:  # missing (no such cgroup version/controller) or unreadable
        return None


def available_cpus(cgroup_root: Path = CGROUP_ROOT) -> int:
    """Cores this process may use: affinity mask and cgroup v2/v1 CPU quota; at least 1."""
    try:
        affinity: int | None = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS, Windows
        affinity = None
    quota = cgroup_cpu_quota(
        _read(cgroup_root / "cpu.max"),
        _read(cgroup_root / "cpu" / "cpu.cfs_quota_us"),
        _read(cgroup_root / "cpu" / "cpu.cfs_period_us"),
    )
    return combine_cpu_limits(affinity, os.cpu_count(), quota)


def default_cpu_threads(requested: int | None, torch_default: int, available: int) -> int:
    """Compute threads to give torch: ``requested`` when set, else the available cores.

    Without a request: ``min(available, torch_default)``. ``available`` (:func:`available_cpus`)
    counts logical CPUs; torch's own default counts *physical* cores (or is
    ``OMP_NUM_THREADS`` when set, e.g. 1 per rank by ``torchrun``) but ignores a cgroup CPU
    quota: too many in a container limited to fewer cores, yet it avoids two threads per core on
    a machine with SMT. So never more than either.
    """
    if requested is not None:
        return requested
    return max(1, min(available, torch_default))
