"""``cryospin posterior`` on a tiny run: one PNG per particle and posterior.npz, consistent
with the run's checkpoint and pose track; bad particle lists fail with one line."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from tests._synthetic import make_dataset

from cryospin.cli.main import main as cli_main
from cryospin.rundir import load_checkpoint
from cryospin.train.track import load_pose_track

needs_matplotlib = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                                      reason="the figures need matplotlib")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _dataset(folder: Path, n: int = 32, L: int = 16) -> Path:
    """Noisy CTF-modulated, shifted images of a blob volume (particles.mrcs + ctf.pkl)."""
    make_dataset(folder, box_px=L, n=n, seed=11, max_shift_px=0.5,
                 draw_order=("defocus", "shifts", "rotations"), n_blobs=5, spread_px=7.0,
                 variance_px2=1.5)
    return folder


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """32 particles of 16 px; 2 epochs (switch after 1), every particle tracked."""
    root = tmp_path_factory.mktemp("posterior")
    data, run = _dataset(root / "D"), root / "R"
    assert cli_main(["reconstruct", str(data / "particles.mrcs"), "--ctf", str(data / "ctf.pkl"),
                     "-o", str(run), "--epochs", "2", "--switch-epoch", "1", "--batch-size",
                     "16", "--heads", "3", "--width", "0.125", "--no-bf16", "--shifts",
                     "--final-map", "decoder", "--no-progress", "--threads", "1",
                     "--device", "cpu"]) == 0
    return run


@needs_matplotlib
def test_posterior_of_tracked_particles(tiny_run, tmp_path, capsys):
    track = load_pose_track(tiny_run)
    assert track.indices.tolist() == list(range(32))  # fewer particles than the default 512
    out = tmp_path / "post"
    status = cli_main(["posterior", str(tiny_run), "--particles", "0,5,17", "--nside", "2",
                       "--psi-steps", "12", "-o", str(out)])
    assert status == 0
    assert "posterior.npz" in capsys.readouterr().out
    for i in (0, 5, 17):
        png = out / f"posterior_{i}.png"
        assert png.is_file() and png.read_bytes()[:8] == PNG_MAGIC
        import matplotlib.image

        pixels = np.asarray(matplotlib.image.imread(png), dtype=np.float64)
        assert pixels.shape[0] > 200 and pixels[..., :3].std() > 0.05
    with np.load(out / "posterior.npz") as z:
        assert int(z["nside"]) == 2 and int(z["psi_steps"]) == 12
        assert z["particles"].tolist() == [0, 5, 17]
        assert z["directions"].shape == (48, 3)
        logp = z["log_posterior"]
        assert logp.shape == (3, 48) and np.isfinite(logp).all()
        np.testing.assert_allclose(np.exp(logp).sum(axis=1), 1.0, atol=1e-9)
        # the final pose and shift are the pose table's (stage 2) rows
        table = load_checkpoint(tiny_run / "checkpoint.pt")["pose_table"]
        idx = torch.tensor([0, 5, 17])
        np.testing.assert_allclose(z["final_rotations"], table["rotations"][idx].double(),
                                   atol=1e-7)
        np.testing.assert_allclose(z["shifts_px"], table["shifts_px"][idx].double(), atol=1e-7)


@needs_matplotlib
def test_posterior_with_a_smaller_disc_defaults_to_run_folder(tiny_run):
    assert cli_main(["posterior", str(tiny_run), "--particles", "3", "--nside", "1",
                     "--psi-steps", "4", "--loss-radius", "3"]) == 0
    assert (tiny_run / "posterior" / "posterior_3.png").is_file()
    with np.load(tiny_run / "posterior" / "posterior.npz") as z:
        assert z["log_posterior"].shape == (1, 12)


@needs_matplotlib
def test_posterior_refuses_a_folder_that_holds_files(tiny_run, tmp_path, capsys):
    out = tmp_path / "o"
    argv = ["posterior", str(tiny_run), "--particles", "2", "--nside", "1", "--psi-steps", "4",
            "-o", str(out)]
    assert cli_main(argv) == 0
    before = (out / "posterior.npz").read_bytes()
    capsys.readouterr()
    other = [*argv[:3], "4", *argv[4:]]  # other particles into the same folder
    assert cli_main(other) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{out}: not empty" in err[0] and "--force" in err[0], err
    assert (out / "posterior.npz").read_bytes() == before
    assert not (out / "posterior_4.png").exists()
    assert cli_main([*other, "--force"]) == 0
    assert (out / "posterior_4.png").is_file()


@pytest.mark.parametrize("args, needle", [
    (["--particles", "0,x"], "comma-separated"),
    (["--particles", "99"], "outside 0..31"),
    (["--particles", "1", "--nside", "0"], "--nside"),
    (["--particles", "1", "--loss-radius", "50"], "--loss-radius"),
])
def test_bad_arguments_fail_with_one_line(tiny_run, tmp_path, capsys, args, needle):
    assert cli_main(["posterior", str(tiny_run), *args, "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


def test_missing_run_folder(tmp_path, capsys):
    assert cli_main(["posterior", str(tmp_path / "nope"), "--particles", "0"]) == 2
    assert "run folder not found" in capsys.readouterr().err
