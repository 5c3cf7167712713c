"""`cryospin demo` (what `make demo` runs) end to end at a small size that converges."""

from __future__ import annotations

import json
from pathlib import Path

from cryospin.cli.demo import split_note, wrong_structure_note
from cryospin.cli.main import main

# Since the `default` dropped its encoder epoch (2026-12-07, search only; one thread per run
# on an AMD EPYC, capability AVX2, float32, on the data of seeds 0-15 as below): all 16 seeds
# converge, median 1.56-2.28 deg unreduced (seed 0: 1.57), where the preset with the encoder
# epoch converged on 15 (seed 6 split, 114 deg; seed 0: 1.71); benchmarks/RESULTS.md, "Search
# only as the default". Before that change:
# the spike's poses at this size since the copy consensus after the search (2026-12-07,
# `optim.copy_consensus: auto`; two threads, `cryospin reconstruct ... --seed S` on the data
# of seed S): median 1.75 / 1.79 / 1.90 deg for seeds 0 / 1 / 2, 98.6-99.4 % within 10 deg
# (without it 3.15 / 1.76 / 2.34, 66-99 %); seed 3 still splits (its search ends before the
# views are found); benchmarks/RESULTS.md, "Copy consensus". Before that, modulo the
# trimer's pseudo-C3 (pose_error_c3.json): median
# rotation error 1.96 / 1.72 / 3.14 / 26.67 deg for seeds 0 / 1 / 2 / 3 with the `default`
# preset since 2026-12-06's second change (the volume re-made at the start of every search
# epoch; unreduced 1.95 / 1.71 / 3.07 / 87.78 deg, seed 0 on two threads 3.15 deg); with the
# volume re-made after the search only 5.49 / 14.12 / 6.91 / 32.40 (unreduced 117.3 / 113.9 /
# 117.8 / 100.2: every seed split between the copies); before either 6.77 / 16.17 / 8.22 /
# 33.43; measured with
#   taskset -c C env OMP_NUM_THREADS=1 cryospin reconstruct D/data/particles.star -o RUN \
#       --preset default --seed S
# on the data of `cryospin demo --out D --n-particles 1000 --box 32 --pixel-size 6.75 --snr 1
# --seed S` (what the demo runs; two seeds at a time, one core each, Intel Xeon with AMX,
# capability AVX512, torch 2.13.0; on 2026-12-04, with the preset of then on an AMD EPYC:
# 4.73 / 5.60 / 6.92 / 5.90). Random poses give ~80 deg modulo C3. The test runs seed 0; the
# bound leaves ~4x its error. The size sits at the edge of convergence (seed 3 ends 27 deg
# off even modulo C3, on two threads 117.72 / 5.26 deg: a split between the copies that
# follows the particles' true views; benchmarks/RESULTS.md, "The volume re-made in every
# search epoch", "The demo test's size, seed 3"), and
# smaller runs do not converge: 96 particles of 16 px at 13 A/px, SNR 0.1, 3 epochs (the old
# test) is 6 optimizer steps in all, 113-118 deg; 1,000 particles at SNR 0.1 110 deg; SNR 1 is
# what brings 1,000 particles to a map the global search can align to.
MEDIAN_MOD_C3_BOUND_DEG = 12.0


def test_demo_recovers_poses(tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    status = main(["demo", "--out", str(out), "--n-particles", "1000", "--box", "32",
                   "--pixel-size", "6.75", "--snr", "1", "--seed", "0"])
    printed = capsys.readouterr().out
    assert status == 0
    run = out / "run"
    for name in ("map.mrc", "poses.star", "poses.pkl", "metrics.jsonl", "config.yaml",
                 "report.html"):
        assert (run / name).is_file(), name
    fsc = json.loads((out / "fsc_vs_gt.json").read_text())
    err = json.loads((out / "pose_error.json").read_text())
    err_c3 = json.loads((out / "pose_error_c3.json").read_text())
    assert fsc["resolution_0.5_angstrom"] > 0
    assert err["n_particles"] == err_c3["n_particles"] == 1000
    # the unreduced error is not bounded here: at this size a run may still leave the
    # particles split over the three protomer-related poses (seed 3: 87.8 deg; before the
    # volume was re-made in every search epoch seeds 0-3 all did, 100-118 deg), and which
    # runs do depends on the machine's arithmetic (thread count, instruction set)
    assert err_c3["median_rotation_error_deg"] <= MEDIAN_MOD_C3_BOUND_DEG
    assert f"median rotation error: {err['median_rotation_error_deg']:.2f}" in printed
    assert f"({err_c3['median_rotation_error_deg']:.2f}° modulo" in printed
    assert str(run / "map.mrc") in printed
    # split between the copies (as seed 0 was before, 117 deg, 5.5 deg modulo C3): the
    # summary says so
    assert (split_note(err["median_rotation_error_deg"], err_c3["median_rotation_error_deg"])
            is not None) == (err["median_rotation_error_deg"] > 20.0)
    assert ("stayed split between its three near-identical protomer copies" in printed) == (
        err["median_rotation_error_deg"] > 20.0)
    assert "the run did not converge" not in printed  # right modulo C3: no wrong structure


def test_the_split_note_needs_a_large_error_that_the_pseudo_symmetry_explains() -> None:
    assert split_note(117.48, 10.29) is not None and "10.3°" in split_note(117.48, 10.29)
    assert split_note(2.31, 2.32) is None  # converged
    assert split_note(110.0, 80.0) is None  # not converged even modulo C3: not a split
    assert split_note(15.0, 2.0) is None  # a few particles off: not the split


def test_the_wrong_structure_note_is_for_a_failure_the_pseudo_symmetry_does_not_explain() -> None:
    # the demo test's seed 6 (RESULTS "A search that stops when the fit stops improving")
    note = wrong_structure_note(110.65, 34.76, 6)
    assert note is not None and "`cryospin demo --seed 7`" in note
    assert note.endswith("`cryospin reconstruct ... --starts 2` runs two starts and keeps the "
                         "one that fits the images best)")
    assert "110.7° median, 34.8° modulo the trimer's pseudo-C3" in note
    assert wrong_structure_note(110.0, 80.0, 0) is not None  # not converged even modulo C3
    assert wrong_structure_note(117.48, 10.29, 0) is None  # a split: split_note's case
    assert wrong_structure_note(2.31, 2.32, 0) is None  # converged
    assert wrong_structure_note(15.0, 2.0, 0) is None  # a few particles off
    assert wrong_structure_note(40.0, 25.0, 0) is not None  # modulo C3 explains too little
    assert split_note(110.65, 34.76) is None  # no longer called a split (34.8° modulo C3)
