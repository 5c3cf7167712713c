"""The report's "Symmetry" section and the symmetry axes on the map figure, on small synthetic
run folders (no training): a D7 blob map with D7 imposed, the same map turned with C1 imposed
(the detected D7 drawn in its found orientation), an asymmetric map (C1, nothing drawn), and
pose errors (final and tracked) modulo the imposed group."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cryospin.evaluate.pose_error import flip_hand
from cryospin.io.mrc import write_map
from cryospin.io.star import relion_euler_from_rotation
from cryospin.report import write_report
from cryospin.report.ground_truth import head_errors, track_errors
from cryospin.report.map_figure import plot_map_views
from cryospin.report.symmetry_check import (
    AxisMark,
    DrawnAxes,
    SymmetryCheck,
    axes_to_draw,
    check_symmetry,
    imposed_symmetry,
    relaxed_symmetry,
    section_marks,
    symmetry_advice,
)
from cryospin.rotations import random_rotations
from cryospin.symmetry import point_group_rotations, symmetry_axes
from cryospin.train.track import PoseTrack

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from test_symmetry_search import blob_centres, blob_map  # noqa: E402  (the detection's maps)

needs_matplotlib = pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None,
    reason="the report's figures need matplotlib (pip install 'cryospin[report]')",
)

L = 32


def _d7_map(turn: torch.Tensor | None = None) -> np.ndarray:
    """A D7 blob map `(L, L, L)` in D7's RELION orientation, or turned by ``turn``."""
    centres = blob_centres("D7", box_px=L, seed=0, n_blobs=3)
    if turn is not None:
        centres = centres @ turn.T
    return blob_map(centres, L).numpy()


def _write_star(path: Path, R: np.ndarray) -> None:
    rot, tilt, psi = (a.numpy() for a in relion_euler_from_rotation(torch.from_numpy(R)))
    lines = ["data_optics", "loop_", "_rlnOpticsGroup", "_rlnImagePixelSize", "_rlnImageSize",
             "_rlnVoltage", "_rlnSphericalAberration", "_rlnAmplitudeContrast",
             f"1 3.0 {L} 300 2.7 0.1", "", "data_particles", "loop_", "_rlnImageName",
             "_rlnAngleRot", "_rlnAngleTilt", "_rlnAnglePsi", "_rlnOriginXAngst",
             "_rlnOriginYAngst", "_rlnOpticsGroup"]
    lines += [f"{i + 1}@p.mrcs {a:.12f} {b:.12f} {c:.12f} 0 0 1"
              for i, (a, b, c) in enumerate(zip(rot, tilt, psi, strict=True))]
    path.write_text("\n".join(lines) + "\n")


def _run(tmp_path: Path, volume: np.ndarray, symmetry: str | None) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    config = "cryospin_version: 0.2.0\n"
    if symmetry is not None:
        config += f"model:\n  symmetry: {symmetry}\n"
    (run / "config.yaml").write_text(config)
    write_map(run / "map.mrc", volume.astype(np.float32), 3.0)
    return run


# ----------------------------------------------------------------------------- pure parts
def test_section_marks_of_d7_in_relion_orientation() -> None:
    axes, orders = symmetry_axes(point_group_rotations("D7"))
    drawn = DrawnAxes("D7", "imposed", axes, orders, torch.zeros(3, dtype=torch.float64))
    marks = section_marks(drawn, L)
    half = L // 2
    z_marks = [m for m in marks if m.section == "z"]
    # the 7-fold pierces the z = 0 section at the centre; the seven 2-folds lie in it
    assert [m.order for m in z_marks if m.kind == "point"] == [7]
    assert z_marks[0].points == ((half, half),)
    assert sorted(m.order for m in z_marks if m.kind == "line") == [2] * 7
    # on the y = 0 section: the 7-fold (z) and the 2-fold on x are lines, the other 2-folds
    # (each more than 10° off the plane) pierce it at the centre: one circle
    y_marks = [m for m in marks if m.section == "y"]
    assert sorted((m.kind, m.order) for m in y_marks) == [("line", 2), ("line", 7),
                                                          ("point", 2)]
    seven = next(m for m in y_marks if m.kind == "line" and m.order == 7)
    (u0, v0), (u1, v1) = seven.points  # vertical through the centre: column x, row z
    assert u0 == pytest.approx(half) and u1 == pytest.approx(half) and v0 < half < v1


def test_advice_when_the_map_looks_more_symmetric_than_imposed() -> None:
    check = check_symmetry(_d7_map(), "C1")
    assert check.detected == "D7" and check.problem is None
    advice = symmetry_advice(check)
    assert advice is not None and advice.startswith(
        "The map looks D7 but the run imposed C1: consider --symmetry D7 if its subunits are "
        "identical")
    assert "--relax-symmetry D7" in advice  # or a pseudo-symmetric particle
    assert symmetry_advice(check_symmetry(_d7_map(), "D7")) is None
    assert symmetry_advice(check_symmetry(_d7_map(), "C2")) == (
        "The map looks D7 but the run imposed C2: consider --symmetry D7.")
    relaxed = symmetry_advice(check_symmetry(_d7_map(), "C1", relaxed="D7"))
    assert relaxed == ("The map looks D7, the pseudo-symmetry the run relaxed "
                       "(each pose's D7 copies scored in stage 2; the map is kept C1).")
    assert relaxed_symmetry({"model": {"relax_symmetry": "c3"}}) == "C3"
    assert relaxed_symmetry({"model": {}}) == relaxed_symmetry({}) == "C1"  # older runs
    auto = {"model": {"relax_symmetry": "auto"}}  # the group each epoch's map showed
    found = [{"extra": {"relax": {"group": g}}} for g in ("C1", "C3", "C1")]
    assert relaxed_symmetry(auto, found) == "C3"
    assert relaxed_symmetry(auto, found[:1]) == relaxed_symmetry(auto) == "C1"
    big = check_symmetry(_d7_map(), "C1", max_box_px=16)
    assert big.search is None and "skipped" in (big.problem or "")
    assert axes_to_draw(big) is None
    none = SymmetryCheck("C1", None, 0.0, "symmetry detection failed (x)")
    assert symmetry_advice(none) is None and axes_to_draw(none) is None


@needs_matplotlib
def test_map_figure_returns_the_marks_it_drew(tmp_path: Path) -> None:
    axes, orders = symmetry_axes(point_group_rotations("O"))
    drawn = DrawnAxes("O", "imposed", axes, orders, torch.zeros(3, dtype=torch.float64))
    marks = section_marks(drawn, L)
    out = plot_map_views(_d7_map(), tmp_path / "m.png", axis_marks=marks, axes_title="O")
    assert out == marks and all(isinstance(m, AxisMark) for m in out)
    # O: on every section the 4-fold normal to it is a circle, the two others are lines
    for s in "zyx":
        assert sorted((m.kind, m.order) for m in out if m.section == s and m.order == 4) == [
            ("line", 4), ("line", 4), ("point", 4)]
    assert plot_map_views(_d7_map(), tmp_path / "n.png") == []
    assert (tmp_path / "m.png").stat().st_size > 0


# ----------------------------------------------------------------------------- the page
@needs_matplotlib
def test_report_of_an_imposed_d7_run(tmp_path: Path) -> None:
    run = _run(tmp_path, _d7_map(), "D7")
    result = write_report(run)
    text = result.html_path.read_text(encoding="utf-8")
    sym = result.summary["symmetry"]
    assert sym["imposed"] == "D7" and sym["detected"] == "D7" and sym["problem"] is None
    assert sym["scores"][0]["group"] == "D7" and sym["scores"][0]["score"] > 0.9
    assert sym["pose_errors_modulo"] is None and sym["detection_s"] > 0
    assert "<h2>Symmetry</h2>" in text and "Imposed by the run" in text
    assert "<td>D7</td><td>14</td>" in text and "consider --symmetry" not in text
    assert "imposed group D7 (1 × 7-fold, 7 × 2-fold)" in text
    saved = json.loads((run / "report" / "summary.json").read_text())
    assert saved["symmetry"]["detected"] == "D7"


@needs_matplotlib
def test_report_of_a_c1_run_whose_map_looks_d7(tmp_path: Path) -> None:
    turn = random_rotations(1, generator=torch.Generator().manual_seed(5))[0]
    run = _run(tmp_path, _d7_map(turn), None)  # an older config: no model.symmetry
    result = write_report(run)
    text = result.html_path.read_text(encoding="utf-8")
    sym = result.summary["symmetry"]
    assert sym["imposed"] == "C1" and sym["detected"] == "D7"
    assert "The map looks D7 but the run imposed C1: consider --symmetry D7 if its" in text
    assert "detected group D7" in text
    check = check_symmetry(_d7_map(turn), "C1")
    drawn = axes_to_draw(check)
    assert drawn is not None and drawn.source == "detected"
    seven = drawn.axes[drawn.orders == 7][0]
    true_seven = turn @ torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    assert math.degrees(math.acos(min(1.0, abs(float(seven @ true_seven))))) < 3.0


@needs_matplotlib
def test_c1_run_of_an_asymmetric_map_only_gains_the_section(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(2)
    centres = (torch.rand(6, 3, generator=g, dtype=torch.float64) - 0.5) * 0.5 * L
    run = _run(tmp_path, blob_map(centres, L).numpy(), "C1")
    R = random_rotations(20, generator=g).numpy()
    _write_star(run / "poses.star", R)
    _write_star(tmp_path / "gt.star", R)
    result = write_report(run, gt_poses=tmp_path / "gt.star")
    sym = result.summary["symmetry"]
    assert sym["detected"] == "C1" and sym["pose_errors_modulo"] == "C1"
    assert result.summary["median_rotation_error_deg"] < 1e-3
    text = result.html_path.read_text(encoding="utf-8")
    assert "draws no symmetry axes" in text and "no symmetry reduction (C1 imposed)" in text
    assert "consider --symmetry" not in text


@needs_matplotlib
def test_pose_errors_are_modulo_the_imposed_group(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(3)
    gt = random_rotations(30, generator=g)
    group = point_group_rotations("D7")
    which = torch.randint(0, 14, (30,), generator=g)
    pred = gt @ group[which]  # every pose a symmetry mate of the truth
    run = _run(tmp_path, _d7_map(), "D7")
    _write_star(run / "poses.star", pred.numpy())
    _write_star(tmp_path / "gt.star", gt.numpy())
    result = write_report(run, gt_poses=tmp_path / "gt.star")
    assert result.summary["median_rotation_error_deg"] < 1e-3
    assert result.summary["symmetry"]["pose_errors_modulo"] == "D7"
    text = result.html_path.read_text(encoding="utf-8")
    assert "Pose errors against the ground truth are taken modulo D7" in text


@pytest.mark.parametrize("flipped", [False, True])
def test_tracked_errors_are_modulo_the_group(flipped: bool) -> None:
    n, g = 30, torch.Generator().manual_seed(7)
    gt = random_rotations(n, generator=g)
    A = random_rotations(1, generator=g)[0]
    mates = gt @ point_group_rotations("D7")[torch.randint(1, 14, (n,), generator=g)]
    pred = ((flip_hand(mates) if flipped else mates) @ A).numpy()  # symmetry mates, run frame
    heads = np.stack([random_rotations(n, generator=g).numpy(), pred], axis=1)  # (N, 2, 3, 3)
    track = PoseTrack(
        indices=np.arange(n, dtype=np.int64), epochs=np.array([1], dtype=np.int64),
        rotations=pred[None].astype(np.float32), shifts_px=np.zeros((1, n, 2), np.float32),
        head_rotations=heads[None].astype(np.float32),
        head_losses=np.zeros((1, n, 2), np.float32))
    modulo = track_errors(track, gt, symmetry="D7")
    assert modulo.median_deg[0] < 1e-3 and modulo.best_head_median_deg[0] < 1e-3
    assert bool(modulo.results[0].flipped) == flipped
    _, per_head = head_errors(track, gt, modulo)  # (M, K)
    assert float(per_head[1].max()) < 1e-3 and float(np.median(per_head[0])) > 10
    plain = track_errors(track, gt)
    assert plain.median_deg[0] > 10


def test_imposed_symmetry_reads_the_step() -> None:
    """The group imposed: the impose-symmetry step's (metrics.jsonl), else model.symmetry."""
    step = [{"epoch": 3, "extra": {"symmetry": {"group": "D2", "score": 0.9}}}]
    assert imposed_symmetry({"model": {"symmetry": "auto"}}, step) == "D2"
    assert imposed_symmetry({"model": {"symmetry": "auto"}}, [{"epoch": 1}]) == "C1"
    assert imposed_symmetry({"model": {"symmetry": "d7"}}) == "D7"
    assert imposed_symmetry({}) == "C1"
