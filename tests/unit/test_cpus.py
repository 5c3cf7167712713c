"""The cores available to the process: cgroup quota parsing, affinity, torch's default."""

from __future__ import annotations

import os

import pytest

from cryospin.cpus import (
    available_cpus,
    cgroup_cpu_quota,
    combine_cpu_limits,
    default_cpu_threads,
)


@pytest.mark.parametrize(
    ("cpu_max", "quota", "period", "expected"),
    [
        ("max 100000\n", None, None, None),  # v2, no limit
        ("200000 100000\n", None, None, 2.0),  # v2, 2 CPUs
        ("150000 100000\n", None, None, 1.5),
        ("50000\n", None, None, 0.5),  # v2 without a period: the kernel's default 100000
        (None, "-1\n", "100000\n", None),  # v1, no limit
        (None, "150000\n", "100000\n", 1.5),  # v1
        (None, "400000", "200000", 2.0),
        (None, "150000\n", None, None),  # v1 period missing
        (None, None, None, None),  # no cgroup files at all
        ("max 100000\n", "300000", "100000", 3.0),  # v2 unlimited, v1 file limits
        ("100000 100000", "300000", "100000", 1.0),  # v2 wins when it limits
        ("garbage", "x", "100000", None),  # unreadable contents: no limit
        ("", None, None, None),
        ("0 100000", None, None, None),  # nonsensical quota: no limit
    ],
)
def test_cgroup_cpu_quota_parses_v1_and_v2_texts(cpu_max, quota, period, expected):
    assert cgroup_cpu_quota(cpu_max, quota, period) == expected


def test_fractional_quota_rounds_up_and_limits_affinity():
    assert combine_cpu_limits(8, 64, cgroup_cpu_quota(None, "150000", "100000")) == 2
    assert combine_cpu_limits(8, 64, cgroup_cpu_quota("max 100000")) == 8  # no limit


def test_affinity_smaller_than_the_quota_wins():
    assert combine_cpu_limits(3, 64, 16.0) == 3
    assert combine_cpu_limits(None, 12, None) == 12  # no affinity API: cpu_count
    assert combine_cpu_limits(None, 12, 4.0) == 4


@pytest.mark.parametrize(
    ("affinity", "count", "quota"),
    [(None, None, None), (0, None, None), (None, None, 0.01), (1, 1, 0.001)],
)
def test_at_least_one(affinity, count, quota):
    assert combine_cpu_limits(affinity, count, quota) == 1


def test_available_cpus_reads_the_cgroup_files_under_a_root(tmp_path):
    affinity = len(os.sched_getaffinity(0))
    assert available_cpus(tmp_path) == affinity  # no files: the affinity
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert available_cpus(tmp_path) == affinity
    (tmp_path / "cpu.max").write_text("100000 100000\n")
    assert available_cpus(tmp_path) == 1
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("50000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert available_cpus(tmp_path) == 1
    assert 1 <= available_cpus() <= affinity  # this machine's real files


def test_default_cpu_threads():
    assert default_cpu_threads(3, 64, 2) == 3  # asked for: as asked
    assert default_cpu_threads(None, 64, 2) == 2  # container quota below torch's default
    assert default_cpu_threads(None, 8, 16) == 8  # SMT: torch's physical cores
    assert default_cpu_threads(None, 1, 8) == 1  # OMP_NUM_THREADS=1 (torchrun)
    assert default_cpu_threads(None, 4, 0) == 1
