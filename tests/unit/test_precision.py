"""Tests of cryospin.train.precision: ``model.precision: auto`` chosen per device and machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from cryospin.encoder import MultiHeadPoseEncoder
from cryospin.train import precision as prec
from cryospin.train.precision import StepTimes, measure_encoder_step, resolve_precision

CPU = torch.device("cpu")


@pytest.fixture
def native_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU that reports AVX512-BF16 with ATen at the AVX512 level."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(prec.os, "getloadavg", lambda: (0.0, 0.0, 0.0))  # an idle machine


def _never() -> StepTimes:
    raise AssertionError("the micro-benchmark must not run here")


def test_auto_is_fp32_when_the_cpu_reports_no_bf16(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    choice = resolve_precision("auto", CPU, measure=_never, cache=tmp_path / "c.json")
    assert choice.name == "fp32" and choice.dtype is None
    assert "neither AVX512-BF16 nor AMX" in choice.reason


def test_auto_is_fp32_when_aten_runs_at_avx2(native_bf16, monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    choice = resolve_precision("auto", CPU, measure=_never, cache=tmp_path / "c.json")
    assert choice.name == "fp32" and "AVX2" in choice.reason


def test_auto_is_fp32_when_onednn_is_capped_below_bf16(native_bf16, monkeypatch,
                                                       tmp_path) -> None:
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    choice = resolve_precision("auto", CPU, measure=_never, cache=tmp_path / "c.json")
    assert choice.name == "fp32" and "ONEDNN_MAX_CPU_ISA" in choice.reason
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx512_core_amx")  # case-insensitive, allowed
    choice = resolve_precision("auto", CPU, measure=lambda: StepTimes(2e-2, 1e-2),
                               cache=tmp_path / "c.json")
    assert choice.name == "bf16"


@pytest.mark.parametrize(("fp32_s", "bf16_s", "expected"), [
    (0.020, 0.007, "bf16"),   # 2.9x faster: the Zen 4 measurement
    (0.017, 0.170, "fp32"),   # 10x slower: emulated bf16
    (0.010, 0.0095, "fp32"),  # a tie is not worth bf16's rounding
])
def test_auto_never_picks_bf16_measured_slower_than_fp32(native_bf16, tmp_path, fp32_s, bf16_s,
                                                         expected) -> None:
    calls = []

    def measure() -> StepTimes:
        calls.append(1)
        return StepTimes(fp32_s, bf16_s)

    cache = tmp_path / "precision.json"
    choice = resolve_precision("auto", CPU, measure=measure, shape={"box_px": 64}, cache=cache)
    assert choice.name == expected and len(calls) == 1
    assert "measured" in choice.reason
    if expected == "fp32":
        assert bf16_s / fp32_s > 1 / prec._MIN_SPEEDUP
    # cached per machine and shape: the next run does not measure again ...
    again = resolve_precision("auto", CPU, measure=_never, shape={"box_px": 64}, cache=cache)
    assert again.name == expected and "cached" in again.reason
    # ... but another encoder shape does
    other = resolve_precision("auto", CPU, measure=measure, shape={"box_px": 32}, cache=cache)
    assert other.name == expected and len(calls) == 2
    assert len(json.loads(cache.read_text())) == 2


def test_a_measurement_on_a_busy_machine_decides_its_run_only(native_bf16, tmp_path,
                                                               monkeypatch) -> None:
    """Measured while other work loads the machine (1-minute load above half the CPUs), the
    choice holds for this run and is not cached: the next run measures again, and caches once
    the machine is idle."""
    cache = tmp_path / "precision.json"
    monkeypatch.setattr(prec.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(prec.os, "getloadavg", lambda: (1.9, 1.0, 0.5))
    calls = []

    def measure(times: StepTimes) -> StepTimes:
        calls.append(1)
        return times

    busy = resolve_precision("auto", CPU, measure=lambda: measure(StepTimes(0.0085, 0.0104)),
                             cache=cache)
    assert busy.name == "fp32" and "busy machine (load 1.9 on 2 CPUs; not cached)" in busy.reason
    assert not cache.exists()
    monkeypatch.setattr(prec.os, "getloadavg", lambda: (0.3, 1.0, 0.5))  # idle (<= 1 of 2)
    idle = resolve_precision("auto", CPU, measure=lambda: measure(StepTimes(0.0085, 0.0062)),
                             cache=cache)
    assert idle.name == "bf16" and len(calls) == 2 and "measured" in idle.reason
    again = resolve_precision("auto", CPU, measure=_never, cache=cache)
    assert again.name == "bf16" and "cached" in again.reason
    assert prec.machine_busy() == (False, "load 0.3 on 2 CPUs")

    def no_load_average() -> tuple[float, float, float]:
        raise OSError("not available")

    monkeypatch.setattr(prec.os, "getloadavg", no_load_average)
    assert prec.machine_busy() == (False, "load unknown")


def test_a_corrupt_cache_is_measured_again(native_bf16, tmp_path) -> None:
    cache = tmp_path / "precision.json"
    cache.write_text("{not json")
    choice = resolve_precision("auto", CPU, measure=lambda: StepTimes(0.02, 0.01), cache=cache)
    assert choice.name == "bf16"
    assert len(json.loads(cache.read_text())) == 1


def test_a_measurement_of_an_older_timed_step_is_measured_again(native_bf16, tmp_path) -> None:
    # An entry written before the timed step changed (its Adam became the fused one) does not
    # decide a run: the same machine and shape under the previous step version is ignored.
    cache = tmp_path / "precision.json"
    old_key = json.loads(prec.machine_key({"box_px": 64}))
    old_key["step"] = prec._STEP_VERSION - 1
    cache.write_text(json.dumps({json.dumps(old_key, sort_keys=True):
                                 {"fp32_s": 0.01, "bf16_s": 0.05}}))
    calls = []

    def measure() -> StepTimes:
        calls.append(1)
        return StepTimes(0.02, 0.01)

    choice = resolve_precision("auto", CPU, measure=measure, shape={"box_px": 64}, cache=cache)
    assert (choice.name, len(calls)) == ("bf16", 1) and "measured" in choice.reason


def test_explicit_precisions_are_taken_as_asked(monkeypatch, tmp_path, caplog) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        choice = resolve_precision(name, CPU, measure=_never, cache=tmp_path / "c.json")
        assert (choice.name, choice.dtype, choice.requested) == (name, dtype, name)
    assert "emulated" in caplog.text  # bf16 asked for on a CPU without it: a warning
    assert resolve_precision("fp16", CPU).needs_grad_scaler
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp64", CPU)


def test_auto_on_gpus_and_mps(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", torch.device("cuda")).name == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    choice = resolve_precision("auto", torch.device("cuda"))
    assert choice.name == "fp16" and choice.needs_grad_scaler
    assert resolve_precision("auto", torch.device("mps")).name == "fp32"


def test_micro_benchmark_times_a_real_encoder_step() -> None:
    built = []

    def build(dtype: torch.dtype | None) -> MultiHeadPoseEncoder:
        built.append(dtype)
        return MultiHeadPoseEncoder(16, 2, width_multiplier=0.125, head_hidden=16,
                                    autocast_dtype=dtype)

    times = measure_encoder_step(build, 16, batch=4, budget_s=0.05)
    assert built == [None, torch.bfloat16]  # built once each, steps alternate
    assert 0 < times.fp32_s < 1 and 0 < times.bf16_s < 1
    assert times.speedup == pytest.approx(times.fp32_s / times.bf16_s)


def test_the_micro_benchmark_leaves_the_global_generator_as_it_was() -> None:
    """The timing seeds and draws (its encoders' initialisation): a run that measured its
    machine must start training from the same random state as one that read the cache. (Before
    the fix, the demo's 48 px run on one core ended at 2.31 deg when it timed and at 117 deg
    when it read the cache.)"""
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    measure_encoder_step(lambda dtype: MultiHeadPoseEncoder(
        16, 2, width_multiplier=0.125, head_hidden=16, autocast_dtype=dtype), 16, batch=4,
        budget_s=0.01)
    assert torch.equal(torch.get_rng_state(), before)


def test_the_avx2_restriction_of_the_process_gives_fp32() -> None:
    """What an AVX2-only user gets, on any machine: ``ATEN_CPU_CAPABILITY=avx2
    ONEDNN_MAX_CPU_ISA=AVX2`` for the process."""
    code = ("import torch; from cryospin.train.precision import resolve_precision as r; "
            "c = r('auto', torch.device('cpu')); "
            "print(torch.backends.cpu.get_cpu_capability(), c.name)")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, timeout=120)
    capability, name = out.stdout.split()
    assert name == "fp32"
    assert capability in ("AVX2", "DEFAULT")  # DEFAULT on a CPU below AVX2
