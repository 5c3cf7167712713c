"""The steps between stage-2 epochs in the report's training figure: which ones
(:func:`cryospin.report.analysis.run_events`) and where the figure draws them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from cryospin.report import figures
from cryospin.report.analysis import run_events

needs_matplotlib = pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None,
    reason="the report's figures need matplotlib (pip install 'cryospin[report]')",
)


def _metrics() -> list[dict]:
    """A ``--symmetry D7`` run's shape: stage 1 in epoch 1, D7 imposed at the start of epoch 6,
    the search stopped after epoch 6, the volume re-made at the start of epoch 7."""
    rows = [{"epoch": e, "stage": "autoencode" if e == 1 else "autodecode", "loss": 10.0 - e,
             "mean_pose_change_deg": None if e == 1 else 60.0 / e, "elapsed_s": 20.0 * e,
             "extra": {}} for e in range(1, 10)]
    rows[1]["extra"] = {"switch": {"poses": "winners"}}
    rows[5]["extra"] = {"symmetry": {"group": "D7", "score": 0.9, "rotation": [],
                                     "centre_px": []},
                        "search_stop": {"after_epoch": 6, "jump_fraction": 0.001}}
    rows[6]["extra"] = {"rebackproject": {"images": 100, "group": "D7", "seconds": 9.3}}
    return rows


def test_events_in_epoch_order_with_one_boundary_s_labels_joined() -> None:
    assert run_events(_metrics()) == [(5, "D7 imposed"), (6, "search done; volume re-made")]
    rows = _metrics()
    rows[5]["extra"]["symmetry"]["group"] = "C1"  # auto found no group: nothing imposed
    rows[0]["extra"] = {"symmetry": {"group": "C3"}}  # imposed at the start (epoch 1)
    assert run_events(rows) == [(0, "C3 imposed"), (6, "search done; volume re-made")]
    assert run_events([{"epoch": 1, "stage": "autoencode"}]) == []


@needs_matplotlib
def test_the_training_figure_draws_each_event_at_its_epoch_boundary(tmp_path: Path,
                                                                     monkeypatch) -> None:
    """Dotted lines at the end of epochs 5 and 6 (100 s and 120 s) in both panels, one label
    each in the last panel; the switch's dashed line at the end of epoch 1 (20 s)."""
    saved = []
    monkeypatch.setattr(figures, "save_figure", lambda fig, path: saved.append(fig))
    figures.plot_training(_metrics(), tmp_path / "training.png")
    (fig,) = saved
    loss_ax, pose_ax = fig.axes
    for ax in (loss_ax, pose_ax):
        dotted = sorted(float(line.get_xdata()[0]) for line in ax.get_lines()
                        if line.get_linestyle() == ":")
        dashed = [float(line.get_xdata()[0]) for line in ax.get_lines()
                  if line.get_linestyle() == "--"]
        assert dotted == [100.0, 120.0] and dashed == [20.0]
    labels = {text.get_text().strip(): text.get_position()[0] for text in pose_ax.texts}
    assert labels == {"D7 imposed": 100.0, "search done; volume re-made": 120.0}
