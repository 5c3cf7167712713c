"""``cryospin postprocess HALF_A HALF_B -o DIR``: two half maps of a blurred structure are
post-processed as ``reconstruct --halves`` does it (the same functional core), the B-factor
they were blurred by is found, the files are RELION's, and bad input is refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import starfile
import torch
from tests._cli import refused

from cryospin.cli.main import main
from cryospin.evaluate.postprocess import postprocess_half_maps
from cryospin.evaluate.sharpen import apply_bfactor, fit_guinier, guinier_plot, lowpass
from cryospin.io.mrc import read_map, write_map

L, APIX, BLUR = 40, 1.0, 150.0
F64 = torch.float64


def _blobs(seed: int) -> torch.Tensor:
    """Thirty Gaussian 'atoms' (σ 0.7 px) within 9 px of the centre, `(L, L, L)` float64."""
    g = torch.Generator().manual_seed(seed)
    x = torch.arange(L, dtype=torch.float64) - L // 2
    z, y, xx = torch.meshgrid(x, x, x, indexing="ij")
    out = torch.zeros(L, L, L, dtype=torch.float64)
    for _ in range(30):
        c = (torch.rand(3, generator=g, dtype=torch.float64) * 2 - 1) * 9.0
        out += torch.exp(-((z - c[0]) ** 2 + (y - c[1]) ** 2 + (xx - c[2]) ** 2) / (2 * 0.49))
    return out


@pytest.fixture(scope="module")
def halves(tmp_path_factory) -> tuple[Path, Path, torch.Tensor, torch.Tensor]:
    """Two half maps: one structure blurred by B = 150 Å², independent noise in each."""
    folder = tmp_path_factory.mktemp("postprocess")
    truth = apply_bfactor(_blobs(1), BLUR, APIX)
    g = torch.Generator().manual_seed(2)
    sigma = 0.02 * float(truth.max())
    a = truth + sigma * torch.randn(L, L, L, generator=g, dtype=torch.float64)
    b = truth + sigma * torch.randn(L, L, L, generator=g, dtype=torch.float64)
    write_map(folder / "half_A.mrc", a.numpy(), APIX)
    write_map(folder / "half_B.mrc", b.numpy(), APIX)
    # what the files hold (float32)
    a32 = torch.tensor(read_map(folder / "half_A.mrc")[0], dtype=torch.float64)
    b32 = torch.tensor(read_map(folder / "half_B.mrc")[0], dtype=torch.float64)
    return folder / "half_A.mrc", folder / "half_B.mrc", a32, b32


def test_postprocess_finds_the_blur_and_writes_relion_files(halves, tmp_path, capsys) -> None:
    half_a, half_b, a, b = halves
    out = tmp_path / "post"
    assert main(["postprocess", str(half_a), str(half_b), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    for name in ("postprocess.mrc", "postprocess_masked.mrc", "map.mrc", "map_masked.mrc",
                 "mask.mrc", "locres.mrc", "postprocess.star", "fsc.json", "fsc.png",
                 "guinier.png", "locres.png"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "fsc.json").read_text())
    final = summary["final_resolution_angstrom"]
    assert 2 * APIX <= final < 5.0  # the noise leaves the resolution well within 10 Å
    sharpening = summary["sharpening"]
    fit = sharpening["guinier_fit"]
    assert fit is not None and sharpening["no_fit_reason"] is None
    assert fit["high_angstrom"] == pytest.approx(final) and fit["low_angstrom"] == 10.0
    # B_used is the blur plus the structure's own fall-off (0.7 px atoms: 8π²σ² ≈ 39 Å²),
    # the latter fitted on the noise-free unblurred structure over the same range
    mask = torch.tensor(read_map(out / "mask.mrc")[0], dtype=torch.float64)
    own = fit_guinier(guinier_plot(_blobs(1) * mask, APIX), low_angstrom=10.0,
                      high_angstrom=final)
    assert own is not None and -60.0 < own.bfactor_a2 < -20.0
    assert sharpening["bfactor_a2"] == pytest.approx(own.bfactor_a2 - BLUR, abs=10.0)
    assert f"B-factor {sharpening['bfactor_a2']:.0f} Å²" in printed
    assert f"corrected {final:.2f} Å" in printed
    assert summary["mask"]["kind"] == "half-map noise threshold"
    # the same numbers as the functional core on the same maps
    core = postprocess_half_maps(a, b, pixel_size_angstrom=APIX)
    assert sharpening["bfactor_a2"] == pytest.approx(core.post.bfactor_a2, rel=1e-9)
    post, apix = read_map(out / "postprocess.mrc")
    assert apix == pytest.approx(APIX)
    scale = float(np.abs(post).max())
    np.testing.assert_allclose(post, core.post.volume.numpy(), atol=1e-5 * scale)
    # postprocess.mrc = map.mrc sharpened by B_used and low-passed at the resolution
    weighted = torch.tensor(read_map(out / "map.mrc")[0], dtype=torch.float64)
    expected = lowpass(apply_bfactor(weighted, sharpening["bfactor_a2"], APIX), final, APIX)
    np.testing.assert_allclose(post, expected.numpy(), atol=1e-4 * scale)
    masked, _ = read_map(out / "postprocess_masked.mrc")
    np.testing.assert_allclose(masked, post * mask.numpy(), atol=1e-6 * scale)
    blocks = starfile.read(out / "postprocess.star", always_dict=True)
    general = blocks["general"]
    assert general["rlnBfactorUsedForSharpening"] == pytest.approx(sharpening["bfactor_a2"],
                                                                   rel=1e-5)
    assert general["rlnFinalResolution"] == pytest.approx(final, rel=1e-5)
    assert general["rlnUnfilteredMapHalf1"] == str(half_a)
    assert general["rlnCorrelationFitGuinierPlot"] < -0.95
    assert len(blocks["guinier"]) == L // 2
    # local resolution: uniform noise over one structure, so around the global value
    local = summary["local_resolution"]
    assert local["window_px"] == 24 and local["points"] > 0
    assert 0.8 * final <= local["median"] <= 1.5 * final
    assert f"local resolution: median {local['median']:.2f} Å within the mask" in printed
    # windows centred on the atoms' density (the made mask's threshold) read at least as well
    assert 0 < local["density_points"] < local["points"]
    assert local["density_median"] <= local["median"] + 1e-9
    assert f"{local['density_median']:.2f} Å on density" in printed
    locres, _ = read_map(out / "locres.mrc")
    assert float(np.abs(locres[mask.numpy() < 0.5]).max()) == 0.0
    assert float(np.median(locres[mask.numpy() >= 0.5])) == pytest.approx(local["median"],
                                                                          rel=0.2)


def test_postprocess_with_a_given_mask_and_bfactor(halves, tmp_path, capsys) -> None:
    half_a, half_b, _, _ = halves
    first = tmp_path / "first"
    assert main(["postprocess", str(half_a), str(half_b), "-o", str(first)]) == 0
    out = tmp_path / "given"
    assert main(["postprocess", str(half_a), str(half_b), "-o", str(out), "--mask",
                 str(first / "mask.mrc"), "--bfactor", "-50"]) == 0
    assert "B-factor -50 Å² (given)" in capsys.readouterr().out
    summary = json.loads((out / "fsc.json").read_text())
    assert summary["mask"] == {"kind": "given", "path": str(first / "mask.mrc")}
    assert summary["local_resolution"]["density_median"] is None  # no density known
    assert summary["sharpening"]["bfactor_a2"] == -50.0
    assert summary["sharpening"]["guinier_fit"] is None
    # the mask made before, given back: the same curves
    before = json.loads((first / "fsc.json").read_text())
    np.testing.assert_allclose(summary["fsc_corrected"], before["fsc_corrected"], atol=1e-6)
    general = starfile.read(out / "postprocess.star", always_dict=True)["general"]
    assert general["rlnBfactorUsedForSharpening"] == -50.0


def test_postprocess_without_a_voxel_size_fits_nothing(halves, tmp_path, capsys,
                                                      caplog) -> None:
    _, _, a, b = halves
    for name, v in (("a.mrc", a), ("b.mrc", b)):
        write_map(tmp_path / name, v.numpy(), 0.0)
    out = tmp_path / "px"
    assert main(["postprocess", str(tmp_path / "a.mrc"), str(tmp_path / "b.mrc"), "-o",
                 str(out)]) == 0
    printed = capsys.readouterr().out
    assert "not sharpened: no pixel size" in printed and "corrected" in printed
    assert "px" in printed and "Å (" not in printed
    assert "no voxel size in" in caplog.text and "pass --apix" in caplog.text
    assert json.loads((out / "fsc.json").read_text())["sharpening"]["bfactor_a2"] == 0.0


def test_postprocess_refusals(halves, tmp_path, capsys) -> None:
    half_a, half_b, a, _ = halves
    out = tmp_path / "out"
    small = tmp_path / "small.mrc"
    write_map(small, a[:-2, :-2, :-2].numpy(), APIX)
    refused(["postprocess", str(half_a), str(small), "-o", str(out)], capsys,
            str(small), "differs from")
    coarse = tmp_path / "coarse.mrc"
    write_map(coarse, a.numpy(), 2 * APIX)
    refused(["postprocess", str(half_a), str(coarse), "-o", str(out)], capsys,
            str(coarse), "voxel size 2 Å differs", "--apix")
    refused(["postprocess", str(half_a), str(half_b), "-o", str(out), "--mask", str(half_a)],
            capsys, str(half_a), "mask values run from", "[0, 1]")
    refused(["postprocess", str(half_a), str(half_b), "-o", str(out), "--mask", str(small)],
            capsys, str(small), "mask box")
    empty = tmp_path / "empty.mrc"
    write_map(empty, np.zeros((L, L, L), dtype=np.float32), APIX)
    refused(["postprocess", str(half_a), str(half_b), "-o", str(out), "--mask", str(empty)],
            capsys, str(empty), "the mask is empty")
    refused(["postprocess", str(half_a), str(half_b), "-o", str(out), "--apix", "-1"],
            capsys, "--apix must be a positive")
    refused(["postprocess", str(half_a), str(half_b), "-o", str(out), "--bfactor", "nan"],
            capsys, "--bfactor must be a number")
    refused(["postprocess", str(half_a), str(tmp_path / "missing.mrc"), "-o", str(out)],
            capsys, "missing.mrc", "not found")
    refused(["postprocess", str(half_a), str(half_a), "-o", str(out)], capsys,
            str(half_a), "the same map as", "independently")
    assert not out.exists()  # nothing made by a refusal
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    refused(["postprocess", str(half_a), str(half_b), "-o", str(busy)], capsys,
            str(busy), "not empty", "--force")
    assert sorted(p.name for p in busy.iterdir()) == ["keep.txt"]


def test_postprocess_warns_when_the_fsc_never_falls(halves, tmp_path, caplog) -> None:
    """Halves that agree to Nyquist (here: nearly noise-free): a warning, not a silent
    Nyquist resolution."""
    _, _, a, _ = halves
    g = torch.Generator().manual_seed(9)
    for name, seed_noise in (("a.mrc", 0), ("b.mrc", 1)):
        noise = 1e-6 * float(a.abs().max()) * torch.randn(L, L, L, generator=g, dtype=F64)
        write_map(tmp_path / name, (a + noise * (seed_noise + 1)).numpy(), APIX)
    assert main(["postprocess", str(tmp_path / "a.mrc"), str(tmp_path / "b.mrc"), "-o",
                 str(tmp_path / "out")]) == 0
    assert "never falls below 0.143" in caplog.text and "not independent" in caplog.text
    summary = json.loads((tmp_path / "out" / "fsc.json").read_text())
    assert summary["final_resolution_angstrom"] == pytest.approx(2 * APIX)
