"""Gold-standard evaluation: half split, phase randomisation, mask-corrected FSC, FSC-weighted
combination, poses moved into the reference half's frame, ``postprocess.star``.

Map alignment itself (known rotation, sub-pixel shift and hand) is covered by
``tests/unit/test_align.py::test_recovers_rotation_shift_and_hand``; here it is exercised
through the poses (``test_transformed_poses_backproject_onto_reference``).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import starfile
import torch

from cryospin.backproject import backproject
from cryospin.evaluate.align import align_maps
from cryospin.evaluate.fsc import fsc, shell_index
from cryospin.evaluate.gold_standard import (
    GoldStandardFSC,
    corrected_fsc,
    fsc_weighted_average,
    fsc_weights,
    gold_standard_fsc,
    poses_in_aligned_frame,
    randomisation_shell,
    randomise_phases,
    write_postprocess_star,
)
from cryospin.evaluate.masks import spherical_mask
from cryospin.evaluate.pose_error import HAND_FLIP, flip_hand
from cryospin.evaluate.sharpen import apply_bfactor, guinier_plot, postprocess_map
from cryospin.forward.hartley import hartley3
from cryospin.forward.model import render_real
from cryospin.io.particles import ParticleSet
from cryospin.rotations import geodesic_distance_deg, random_rotations
from cryospin.train.halves import split_halves

F64 = torch.float64


def _particle_set(n: int, random_subset: np.ndarray | None = None) -> ParticleSet:
    """Metadata-only set (the images are never read)."""
    return ParticleSet(
        source=Path("x.star"), stack_paths=(Path("x.mrcs"),),
        stack_index=np.zeros(n, np.int64), image_index=np.arange(n, dtype=np.int64),
        box_px=16, pixel_size_angstrom=2.0, ctf=None, rotations=None, shifts_px=None,
        optics_group=np.ones(n, np.int64), random_subset=random_subset,
    )


# ----------------------------------------------------------------------------- half split


def test_split_disjoint_covering_and_seeded() -> None:
    ps = _particle_set(101)
    half, source = split_halves(ps, seed=5)
    assert source == "random"
    assert half.shape == (101,) and set(np.unique(half).tolist()) == {1, 2}
    a, b = np.flatnonzero(half == 1), np.flatnonzero(half == 2)
    assert np.intersect1d(a, b).size == 0 and np.union1d(a, b).size == 101
    assert {a.size, b.size} == {50, 51}
    np.testing.assert_array_equal(split_halves(ps, seed=5)[0], half)
    assert not np.array_equal(split_halves(ps, seed=6)[0], half)


def test_split_honours_random_subset() -> None:
    rs = np.array([2, 1, 1, 2, 2, 2, 1, 2], dtype=np.int64)
    half, source = split_halves(_particle_set(8, rs), seed=0)
    assert source == "rlnRandomSubset"
    np.testing.assert_array_equal(half, rs)
    # a one-sided subset column is not a split: fall back to the seeded one
    half, source = split_halves(_particle_set(8, np.ones(8, np.int64)), seed=0)
    assert source == "random" and set(np.unique(half).tolist()) == {1, 2}


# ----------------------------------------------------------------------------- phase randomisation


def test_randomise_phases_keeps_amplitudes_and_low_shells() -> None:
    L = 20
    g = torch.Generator().manual_seed(0)
    v = torch.randn(L, L, L, generator=g, dtype=F64)
    before = v.clone()
    out = randomise_phases(v, 4, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(v, before)  # input untouched
    assert out.dtype == v.dtype and out.shape == v.shape
    Fv, Fo = torch.fft.fftn(v), torch.fft.fftn(out)
    torch.testing.assert_close(Fo.abs(), Fv.abs(), rtol=1e-10, atol=1e-10)  # stays real too
    shells = shell_index(L)
    low = shells < 4
    torch.testing.assert_close(Fo[low], Fv[low], rtol=1e-10, atol=1e-10)
    assert not torch.allclose(Fo[shells == 4], Fv[shells == 4])
    # beyond: phases uncorrelated with the original
    assert abs(fsc(v, out).fsc[6:].mean()) < 0.05
    out32 = randomise_phases(v.float(), 3, generator=torch.Generator().manual_seed(0))
    assert out32.dtype == torch.float32


def test_randomisation_shell_and_correction_formula() -> None:
    assert randomisation_shell(np.array([1.0, 0.95, 0.9, 0.7, 0.85, 0.1])) == 3
    assert randomisation_shell(np.array([1.0, 0.95, 0.9])) == 3  # never drops: none
    t = np.array([1.0, 0.9, 0.6, 0.5, 0.2])
    n = np.array([1.0, 0.9, 0.5, 0.5, 1.0])
    out = corrected_fsc(t, n, 2)
    np.testing.assert_allclose(out, [1.0, 0.9, (0.6 - 0.5) / 0.5, 0.0, 0.0])


def test_mask_correction_removes_mask_induced_correlation() -> None:
    """Two halves = a shared signal band-limited to shell 5 (flat spectrum, per-voxel Fourier
    SNR 16) + independent white noise.

    Beyond the signal band the halves are independent noise, so the true FSC is 0 there. A
    tight mask convolves the shared low-resolution signal into the higher shells and inflates
    the masked FSC; the phase-randomisation correction must bring it back to 0. (The masked
    FSC of two *purely* independent noise maps is already 0 in expectation: the mask only
    creates correlation out of signal the halves share.) Means over 16 noise realisations:
    near ``s_r`` one realisation scatters by up to ~0.3 (``1 − FSC_n`` is small there), which
    is why the test looks at the mean.
    """
    L, s0, snr = 48, 5, 16.0
    shells = shell_index(L)
    mask = spherical_mask(L, 12.0, soft_edge_px=2.0)
    corrected, masked = [], []
    for seed in range(16):
        g = torch.Generator().manual_seed(seed)
        F = torch.fft.fftn(torch.randn(L, L, L, generator=g, dtype=F64))
        signal = torch.fft.ifftn(F / F.abs() * (shells <= s0)).real * math.sqrt(snr * L**3)
        a = signal + torch.randn(L, L, L, generator=g, dtype=F64)
        b = signal + torch.randn(L, L, L, generator=g, dtype=F64)
        res = gold_standard_fsc(a, b, mask, seed=100 + seed)
        # unmasked FSC is ~0.94 in the band and ~0 beyond: s_r is the first shell past it
        assert res.randomise_from_shell == s0 + 1
        corrected.append(res.corrected.fsc)
        masked.append(res.masked.fsc)
    s_r = s0 + 1
    mean_corr = np.mean(corrected, axis=0)
    mean_masked = np.mean(masked, axis=0)
    assert mean_masked[s_r] > 0.6 and mean_masked[s_r + 1] > 0.3  # mask-induced
    assert np.all(np.abs(mean_corr[s_r:]) < 0.1), mean_corr[s_r:]
    assert abs(float(mean_corr[s_r:].mean())) < 0.02
    # within the band the correction leaves the masked FSC alone
    np.testing.assert_array_equal(mean_corr[:s_r], mean_masked[:s_r])


def test_identical_halves_have_fsc_one_and_nyquist_resolution() -> None:
    L = 16
    v = torch.randn(L, L, L, generator=torch.Generator().manual_seed(3), dtype=F64)
    res = gold_standard_fsc(v, v, spherical_mask(L, 5.0, soft_edge_px=2.0),
                            pixel_size_angstrom=2.0)
    assert res.randomise_from_shell == L // 2 + 1  # nothing randomised
    np.testing.assert_allclose(res.corrected.fsc, 1.0, atol=1e-12)
    assert math.isclose(res.final_resolution, 4.0)
    d = res.to_dict()
    assert d["final_resolution_angstrom"] == pytest.approx(4.0)
    assert len(d["fsc_corrected"]) == L // 2 + 1


@pytest.mark.parametrize("apix", [2.0, None])
def test_to_dict_from_dict_round_trip_through_json(apix: float | None) -> None:
    """``fsc.json`` of a halves run (to_dict, JSON) reads back into the same curves."""
    import json

    L = 16
    g = torch.Generator().manual_seed(5)
    signal = torch.randn(L, L, L, generator=g, dtype=F64)
    a = signal + 0.8 * torch.randn(L, L, L, generator=g, dtype=F64)
    b = signal + 0.8 * torch.randn(L, L, L, generator=g, dtype=F64)
    res = gold_standard_fsc(a, b, spherical_mask(L, 5.0, soft_edge_px=2.0),
                            pixel_size_angstrom=apix, seed=1)
    back = GoldStandardFSC.from_dict(json.loads(json.dumps(res.to_dict())))
    assert back.randomise_from_shell == res.randomise_from_shell
    for name in ("unmasked", "masked", "phase_randomised", "corrected"):
        x, y = getattr(res, name), getattr(back, name)
        np.testing.assert_array_equal(y.fsc, x.fsc)
        np.testing.assert_array_equal(y.shells, x.shells)
        np.testing.assert_array_equal(y.voxel_counts, x.voxel_counts)
        assert (y.box_px, y.pixel_size_angstrom) == (x.box_px, x.pixel_size_angstrom)
    assert back.final_resolution == res.final_resolution
    d = res.to_dict()
    d["fsc_masked"] = d["fsc_masked"][:-1]
    with pytest.raises(ValueError, match="fsc_masked"):
        GoldStandardFSC.from_dict(d)
    d = res.to_dict()
    del d["fsc_corrected"]
    with pytest.raises(KeyError):
        GoldStandardFSC.from_dict(d)


# ----------------------------------------------------------------------------- combination


def test_fsc_weights_values() -> None:
    w = fsc_weights(np.array([1.0, 1 / 3, 0.0, -0.4, 1.2]))
    np.testing.assert_allclose(w, [1.0, math.sqrt(0.5), 0.0, 0.0, 1.0])


def test_fsc_weighted_average_filters_per_shell() -> None:
    L = 16
    g = torch.Generator().manual_seed(4)
    shells = shell_index(L)
    inside = shells <= L // 2
    a = torch.fft.ifftn(torch.fft.fftn(torch.randn(L, L, L, generator=g, dtype=F64)) * inside).real
    b = torch.fft.ifftn(torch.fft.fftn(torch.randn(L, L, L, generator=g, dtype=F64)) * inside).real
    ones = np.ones(L // 2 + 1)
    torch.testing.assert_close(fsc_weighted_average(a, b, ones), 0.5 * (a + b))
    curve = np.linspace(1.0, -0.2, L // 2 + 1)
    out = fsc_weighted_average(a, b, curve)
    w = torch.as_tensor(fsc_weights(curve))
    expected = torch.fft.fftn(0.5 * (a + b)) * w[shells.clamp(max=L // 2)] * inside
    torch.testing.assert_close(torch.fft.fftn(out), expected, atol=1e-9, rtol=1e-9)


# ----------------------------------------------------------------------------- poses


def _blobs(seed: int):
    """A non-symmetric density: 5 anisotropic Gaussians; returns V(points `(..., 3)` xyz)."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(5, 3, generator=g, dtype=F64) * 2.5
    A = torch.randn(5, 3, 3, generator=g, dtype=F64)
    prec = torch.linalg.inv(0.3 * A @ A.transpose(-1, -2) + 2.0 * torch.eye(3, dtype=F64))
    amp = torch.rand(5, generator=g, dtype=F64) + 0.5

    def V(p: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(p.shape[:-1], dtype=F64)
        for m, P, w in zip(means, prec, amp, strict=True):
            d = p - m
            out = out + w * torch.exp(-0.5 * torch.einsum("...i,ij,...j->...", d, P, d))
        return out

    return V


def _coords(L: int) -> torch.Tensor:
    c = torch.arange(L, dtype=F64) - L // 2
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    return torch.stack([x, y, z], -1)  # (L, L, L, 3)


def _ncc(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


@pytest.mark.parametrize("flip", [True, False])
def test_transformed_poses_backproject_onto_reference(flip: bool) -> None:
    """Half B lives in another frame (rotation, shift and hand); its images and poses are
    self-consistent there. After aligning B's map onto A's, B's poses moved by
    ``poses_in_aligned_frame`` backproject B's *own images* into a map aligned with A, as
    well as B's original poses backproject them into B's frame.

    The alignment is that of the exact maps, so the test measures the pose transform and not
    the alignment's accuracy on imperfect maps (``tests/unit/test_align.py`` covers that).
    """
    L, n = 24, 400
    V = _blobs(11)
    r = _coords(L)
    ref = V(r)  # half A's map (A's frame)
    Q0 = random_rotations(1, generator=torch.Generator().manual_seed(7), dtype=F64)[0]
    t0 = torch.tensor([1.3, -0.8, 0.6], dtype=F64)
    M = Q0 @ HAND_FLIP if flip else Q0
    map_b_true = V(r @ M.T + t0)  # V_B(r) = V(Q0 H r + t0): aligned(r) = V_B,h(Q0ᵀ(r − t0))
    g = torch.Generator().manual_seed(8)
    rot_b = random_rotations(n, generator=g, dtype=F64)
    shift_b = (torch.rand(n, 2, generator=g, dtype=F64) * 2 - 1) * 1.5
    images = render_real(hartley3(map_b_true), rot_b, shift_b)  # B's particles, (n, L, L)

    map_b = backproject(images, rot_b, shift_b, box_px=L, wiener=False).volume
    quality = _ncc(map_b, map_b_true)  # how well these images and poses give B's map
    assert quality > 0.98
    align = align_maps(ref, map_b_true)
    assert align.flipped is flip

    rot_new, shift_new = poses_in_aligned_frame(rot_b, shift_b, align.rotation,
                                                align.translation_px, align.flipped)
    assert rot_new.dtype == F64 and shift_new.shape == (n, 2)
    in_a = backproject(images, rot_new, shift_new, box_px=L, wiener=False).volume
    assert _ncc(in_a, ref) > quality - 0.005
    assert _ncc(map_b, ref) < 0.6  # without the transform the maps do not overlap
    # a wrong hand or shift sign does not work
    wrong_hand = poses_in_aligned_frame(rot_b, shift_b, align.rotation, align.translation_px,
                                        not align.flipped)
    wrong_sign = poses_in_aligned_frame(rot_b, shift_b, align.rotation, -align.translation_px,
                                        align.flipped)
    for rot_w, shift_w in (wrong_hand, wrong_sign):
        bad = backproject(images, rot_w, shift_w, box_px=L, wiener=False).volume
        assert _ncc(bad, ref) < quality - 0.05
    # the poses themselves: H(R_B) Q0ᵀ, shifts s − (R' t0)_xy
    expected = (flip_hand(rot_b) if flip else rot_b) @ Q0.T
    assert float(geodesic_distance_deg(rot_new, expected).max()) < 0.2
    expected_shift = shift_b - (expected @ t0)[:, :2]
    assert float((shift_new - expected_shift).abs().max()) < 0.02


# ----------------------------------------------------------------------------- postprocess.star


def test_postprocess_star_round_trip(tmp_path: Path, shared_data: Path) -> None:
    L = 16
    g = torch.Generator().manual_seed(9)
    a = torch.randn(L, L, L, generator=g, dtype=F64)
    b = a + 0.5 * torch.randn(L, L, L, generator=g, dtype=F64)
    res = gold_standard_fsc(a, b, spherical_mask(L, 5.0, soft_edge_px=2.0),
                            pixel_size_angstrom=1.5)
    path = tmp_path / "postprocess.star"
    write_postprocess_star(path, res, half1_name="half_A.mrc", half2_name="half_B.mrc",
                           mask_name="mask.mrc", masked_map_name="map_masked.mrc")
    blocks = starfile.read(path, always_dict=True)
    general, table = blocks["general"], blocks["fsc"]
    assert general["rlnFinalResolution"] == pytest.approx(res.final_resolution, rel=1e-5)
    assert general["rlnUnfilteredMapHalf2"] == "half_B.mrc"
    assert general["rlnMaskedMapName"] == "map_masked.mrc"
    assert general["rlnRandomiseFrom"] == pytest.approx(res.randomise_from_resolution, rel=1e-5)
    np.testing.assert_array_equal(table["rlnSpectralIndex"], np.arange(L // 2 + 1))
    np.testing.assert_allclose(table["rlnFourierShellCorrelationCorrected"],
                               res.corrected.fsc, atol=1e-6)
    np.testing.assert_allclose(table["rlnFourierShellCorrelationMaskedMaps"],
                               res.masked.fsc, atol=1e-6)
    np.testing.assert_allclose(table["rlnAngstromResolution"][1:],
                               L * 1.5 / np.arange(1, L // 2 + 1), rtol=1e-5)
    assert table["rlnAngstromResolution"][0] == 999.0
    # same layout as a real RELION 3.0.8 postprocess.star
    real = starfile.read(shared_data / "formats" / "relion30" / "postprocess_rln3.0.8.star",
                         always_dict=True)
    assert list(table.columns) == list(real["fsc"].columns)
    assert set(real["general"]) <= set(general)


def test_postprocess_star_guinier_block_and_bfactor(tmp_path: Path, shared_data: Path) -> None:
    """With the post-processing: RELION's Guinier labels, the B-factor used and the fitted
    line in ``data_general``, the plots as computed (``ln 0`` as −99)."""
    L, apix = 32, 1.0
    g = torch.Generator().manual_seed(4)
    truth = apply_bfactor(torch.randn(L, L, L, generator=g, dtype=F64), 80.0, apix)
    a = truth + 0.02 * torch.randn(L, L, L, generator=g, dtype=F64)
    b = truth + 0.02 * torch.randn(L, L, L, generator=g, dtype=F64)
    mask = torch.ones(L, L, L, dtype=F64)
    res = gold_standard_fsc(a, b, mask, pixel_size_angstrom=apix)
    weighted = fsc_weighted_average(a, b, res.corrected.fsc)
    post = postprocess_map(weighted, mask, resolution_angstrom=res.final_resolution,
                           pixel_size_angstrom=apix)
    assert post.fit is not None and post.bfactor_a2 < 0
    original = guinier_plot(0.5 * (a + b), apix)
    path = tmp_path / "postprocess.star"
    write_postprocess_star(path, res, half1_name="half_A.mrc", half2_name="half_B.mrc",
                           mask_name="mask.mrc", masked_map_name="map_masked.mrc", post=post,
                           original=original)
    blocks = starfile.read(path, always_dict=True)
    general, guinier = blocks["general"], blocks["guinier"]
    assert general["rlnBfactorUsedForSharpening"] == pytest.approx(post.bfactor_a2, rel=1e-5)
    assert general["rlnFittedSlopeGuinierPlot"] == pytest.approx(post.fit.slope_a2, rel=1e-5)
    assert general["rlnFittedInterceptGuinierPlot"] == pytest.approx(post.fit.intercept,
                                                                     abs=1e-5)
    assert general["rlnCorrelationFitGuinierPlot"] == pytest.approx(post.fit.correlation,
                                                                    abs=1e-5)
    real = starfile.read(shared_data / "formats" / "relion30" / "postprocess_rln3.0.8.star",
                         always_dict=True)
    assert set(real["guinier"].columns) <= set(guinier.columns)
    assert "rlnLogAmplitudesSharpened" in guinier.columns
    assert len(guinier) == L // 2
    np.testing.assert_allclose(guinier["rlnResolutionSquared"],
                               (np.arange(1, L // 2 + 1) / (L * apix)) ** 2, rtol=1e-5)
    np.testing.assert_allclose(guinier["rlnLogAmplitudesOriginal"], original.log_amplitude,
                               atol=1e-5)
    sharpened = np.where(np.isfinite(post.sharpened.log_amplitude),
                         post.sharpened.log_amplitude, -99.0)
    np.testing.assert_allclose(guinier["rlnLogAmplitudesSharpened"], sharpened, atol=1e-5)
    # without the post-processing: no B-factor, no Guinier block (as before)
    write_postprocess_star(path, res, half1_name="half_A.mrc", half2_name="half_B.mrc",
                           mask_name="mask.mrc", masked_map_name="map_masked.mrc")
    blocks = starfile.read(path, always_dict=True)
    assert "guinier" not in blocks and blocks["general"]["rlnBfactorUsedForSharpening"] == 0.0
