"""Gold-standard half-map evaluation: masked FSC with phase-randomisation correction,
FSC-weighted combination of the halves, poses moved into the reference half's frame, and
RELION ``postprocess.star`` output (with the sharpening of :mod:`cryospin.evaluate.sharpen`).

Conventions (``docs/conventions.md``, "Gold standard"): maps are `(L, L, L)` indexed
``[z, y, x]``; FFT shells are ``s = round(|k|)`` cycles per box as in
:mod:`cryospin.evaluate.fsc` (shells ``0 … L//2``; the corners beyond are not reported).

Mask correction (Chen et al. 2013, Ultramicroscopy 135, 24–35; RELION's ``postprocess``):

* ``s_r`` = the first shell ``s ≥ 1`` where the *unmasked* FSC is below 0.8 (the crossing
  lies between ``s_r − 1`` and ``s_r``);
* the phases of both half maps are replaced by independent uniform random phases in every
  shell ``s ≥ s_r`` (amplitudes kept, Hermitian symmetry kept so the maps stay real);
* ``FSC_n`` = masked FSC of the two randomised maps: the correlation the mask alone creates
  by spreading the (shared) lower-resolution signal into the randomised shells;
* ``FSC_true(s) = (FSC_t(s) − FSC_n(s)) / (1 − FSC_n(s))`` for ``s ≥ s_r``, ``FSC_t(s)``
  (the masked FSC) for ``s < s_r``; clamped to ``[−1, 1]`` (a correlation), and 0 where
  ``1 − FSC_n ≤ 1e-6`` (the mask alone explains the correlation: no information is left).
  Values far below 0 mean ``FSC_n > FSC_t`` by more than the noise allows: the mask is too
  tight for these half maps (:func:`cryospin.evaluate.masks.half_map_mask` avoids that).

Whitening (``whiten=True``, what :func:`cryospin.evaluate.postprocess.postprocess_half_maps`,
``--halves`` and ``cryospin postprocess`` use): before the
masked FSCs, both half maps are divided per shell by ``sqrt`` of the shell's mean power of the two
(shell 0 takes shell 1's factor). The same per-shell factor on both leaves the unmasked FSC
unchanged; it stops the mask from spreading the strong low-frequency power of Wiener-filtered
half maps into the weak high shells, where the phase randomisation (which keeps shells
``< s_r`` only) cannot model the part that comes from shells ``s_r … Nyquist`` (measured on
simulated halves that disagree at low resolution: a corrected curve of 0.2–0.5 at Nyquist
without, ±0.05 with).

The mask (:func:`cryospin.evaluate.postprocess.postprocess_half_maps`):
:func:`cryospin.evaluate.masks.half_map_mask`, a core
thresholded at a multiple of the half maps' noise (estimated from their difference), dilated,
soft-edged, inside the box's inscribed sphere and covering at most a set fraction of the box.

RELION also randomises ``|k| ≥ s_r`` but, as an empirical margin, applies the formula only
from ``s_r + 2`` (seen in its ``postprocess.star`` files); cryospin applies it wherever the
phases were randomised.

Combination: the average of the two halves filtered per shell by
``w(s) = sqrt(2 FSC / (1 + FSC))`` (the FSC of the full map, Rosenthal & Henderson 2003),
clipped to ``[0, 1]`` and 0 where ``FSC ≤ 0`` or beyond Nyquist.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import starfile
import torch
from torch import Tensor

from cryospin.atomic import atomic_path
from cryospin.evaluate.fsc import FSCResult, fsc, shell_index
from cryospin.evaluate.pose_error import flip_hand
from cryospin.evaluate.sharpen import Guinier, PostProcessed

__all__ = [
    "RANDOMISE_FSC_THRESHOLD",
    "GoldStandardFSC",
    "randomisation_shell",
    "randomise_phases",
    "corrected_fsc",
    "gold_standard_fsc",
    "whiten_halves",
    "fsc_weights",
    "fsc_weighted_average",
    "poses_in_aligned_frame",
    "write_postprocess_star",
]

#: Unmasked FSC below which phases are randomised (RELION's ``--randomize_at_fsc`` default).
RANDOMISE_FSC_THRESHOLD = 0.8


@dataclass(frozen=True)
class GoldStandardFSC:
    """The four FSC curves of a gold-standard evaluation (all on shells ``0 … L//2``).

    Attributes
    ----------
    unmasked : FSCResult
        FSC of the two half maps as they are.
    masked : FSCResult
        FSC of the masked half maps (``FSC_t``).
    phase_randomised : FSCResult
        Masked FSC of the half maps with phases randomised beyond ``randomise_from_shell``
        (``FSC_n``).
    corrected : FSCResult
        ``FSC_true`` (module docstring); its 0.143 crossing is the final resolution.
    randomise_from_shell : int
        ``s_r``: phases were randomised in shells ``s ≥ s_r`` (``L//2 + 1``: none were).
    """

    unmasked: FSCResult
    masked: FSCResult
    phase_randomised: FSCResult
    corrected: FSCResult
    randomise_from_shell: int

    @property
    def final_resolution(self) -> float:
        """Resolution (Å, px without a pixel size) where the corrected FSC crosses 0.143."""
        return self.corrected.resolution(0.143)

    @property
    def randomise_from_resolution(self) -> float:
        """Resolution of shell ``s_r`` (Å, px without a pixel size); ``inf`` at shell 0."""
        r = self.unmasked
        scale = r.box_px * (r.pixel_size_angstrom or 1.0)
        return math.inf if self.randomise_from_shell <= 0 else scale / self.randomise_from_shell

    def to_dict(self) -> dict:
        """JSON-ready summary: resolutions at 0.143 and 0.5 of every curve, and the curves."""
        unit = "angstrom" if self.unmasked.pixel_size_angstrom is not None else "px"

        def res(r: FSCResult, t: float) -> float | None:
            x = r.resolution(t)
            return float(x) if math.isfinite(x) else None

        curves = {
            "unmasked": self.unmasked,
            "masked": self.masked,
            "phase_randomised_masked": self.phase_randomised,
            "corrected": self.corrected,
        }
        out: dict = {
            "box_px": self.unmasked.box_px,
            "pixel_size_angstrom": self.unmasked.pixel_size_angstrom,
            f"final_resolution_{unit}": res(self.corrected, 0.143),
            "randomise_from_shell": self.randomise_from_shell,
            f"randomise_from_{unit}": (float(self.randomise_from_resolution)
                                       if math.isfinite(self.randomise_from_resolution)
                                       else None),
            "resolutions": {
                name: {f"0.143_{unit}": res(r, 0.143), f"0.5_{unit}": res(r, 0.5)}
                for name, r in curves.items()
            },
            "shells_cycles_per_box": self.unmasked.shells.tolist(),
            "frequency_per_px": self.unmasked.frequency_per_px.tolist(),
            "voxel_counts": self.unmasked.voxel_counts.tolist(),
        }
        for name, r in curves.items():
            out[f"fsc_{name}"] = r.fsc.tolist()
        return out

    @classmethod
    def from_dict(cls, d: dict) -> GoldStandardFSC:
        """The inverse of :meth:`to_dict` (e.g. a halves run's ``fsc.json``).

        Raises
        ------
        KeyError, TypeError, ValueError
            ``d`` is not a :meth:`to_dict` result (the caller names the file).
        """
        box = int(d["box_px"])
        apix = d["pixel_size_angstrom"]
        apix = None if apix is None else float(apix)
        shells = np.asarray(d["shells_cycles_per_box"], dtype=np.float64)
        counts = np.asarray(d["voxel_counts"], dtype=np.int64)
        if shells.ndim != 1 or counts.shape != shells.shape:
            raise ValueError("shells and voxel counts differ in length")

        def curve(name: str) -> FSCResult:
            values = np.asarray(d[f"fsc_{name}"], dtype=np.float64)
            if values.shape != shells.shape:
                raise ValueError(f"fsc_{name} has {values.size} shells, not {shells.size}")
            return FSCResult(shells=shells, fsc=values, voxel_counts=counts, box_px=box,
                             pixel_size_angstrom=apix)

        return cls(unmasked=curve("unmasked"), masked=curve("masked"),
                   phase_randomised=curve("phase_randomised_masked"),
                   corrected=curve("corrected"),
                   randomise_from_shell=int(d["randomise_from_shell"]))


def randomisation_shell(
    unmasked_fsc: Tensor | np.ndarray, threshold: float = RANDOMISE_FSC_THRESHOLD
) -> int:
    """``s_r``: the first shell ``s ≥ 1`` with ``FSC(s) < threshold``; ``S`` if there is none.

    Parameters
    ----------
    unmasked_fsc : `(S,)`
        Unmasked FSC on shells ``0 … S − 1``.
    """
    values = np.asarray(unmasked_fsc, dtype=np.float64).reshape(-1)
    below = np.flatnonzero(values[1:] < threshold)
    return int(below[0] + 1) if below.size else int(values.size)


def randomise_phases(
    volume: Tensor, from_shell: int, *, generator: torch.Generator | None = None
) -> Tensor:
    """Replace the Fourier phases of shells ``s ≥ from_shell`` by uniform random phases.

    The random phases are those of the FFT of white Gaussian noise drawn from ``generator``,
    so they are Hermitian-symmetric and the result stays real; amplitudes are unchanged. The
    corners beyond Nyquist (``s > L//2``) are randomised too when ``from_shell ≤ L//2``.

    Parameters
    ----------
    volume : `(L, L, L)`
        Real map ``[z, y, x]``.
    from_shell : int
        Shells ``0 … from_shell − 1`` keep their phases.
    generator : torch.Generator, optional
        Source of the random phases (CPU generator; the noise is moved to ``volume``'s device).

    Returns
    -------
    `(L, L, L)`
        New map, dtype and device of ``volume`` (the input is not modified).
    """
    if volume.ndim != 3 or len(set(volume.shape)) != 1:
        raise ValueError(f"expected a cubic (L, L, L) map, got {tuple(volume.shape)}")
    L = volume.shape[-1]
    noise = torch.randn(volume.shape, generator=generator, dtype=torch.float64)
    phase = torch.fft.fftn(noise.to(volume.device))
    unit = phase / phase.abs().clamp_min(1e-300)  # e^{iφ}, Hermitian-symmetric
    F = torch.fft.fftn(volume.detach().to(torch.float64))
    if from_shell > L // 2:
        return volume.detach().clone()
    beyond = shell_index(L, device=volume.device) >= int(from_shell)
    out = torch.where(beyond, F.abs() * unit, F)
    return torch.fft.ifftn(out).real.to(volume.dtype)


#: ``1 − FSC_n`` at or below which :func:`corrected_fsc` reports 0 (no information left).
_NO_INFORMATION = 1e-6


def corrected_fsc(
    masked_fsc: Tensor | np.ndarray,
    randomised_fsc: Tensor | np.ndarray,
    from_shell: int,
) -> np.ndarray:
    """``FSC_true = (FSC_t − FSC_n) / (1 − FSC_n)`` for shells ``s ≥ from_shell``, else FSC_t.

    Parameters
    ----------
    masked_fsc : `(S,)`
        ``FSC_t``, masked FSC of the half maps.
    randomised_fsc : `(S,)`
        ``FSC_n``, masked FSC of the phase-randomised half maps.
    from_shell : int
        ``s_r``.

    Returns
    -------
    `(S,)` float64 numpy array
        In ``[−1, 1]``: the formula clamped there; 0 where ``1 − FSC_n ≤ 1e-6`` (the mask
        alone explains the correlation, no information is left) or either input is not finite.
    """
    t = np.asarray(masked_fsc, dtype=np.float64).reshape(-1)
    n = np.asarray(randomised_fsc, dtype=np.float64).reshape(-1)
    if t.shape != n.shape:
        raise ValueError(f"FSC curves differ in length: {t.size} vs {n.size}")
    out = np.clip(t, -1.0, 1.0)
    beyond = np.arange(t.size) >= int(from_shell)
    denom = 1.0 - n
    ok = beyond & (denom > _NO_INFORMATION) & np.isfinite(t) & np.isfinite(n)
    out[ok] = np.clip((t[ok] - n[ok]) / denom[ok], -1.0, 1.0)
    out[beyond & ~ok] = 0.0
    return out


def _with_curve(template: FSCResult, values: np.ndarray) -> FSCResult:
    return FSCResult(
        shells=template.shells, fsc=np.asarray(values, dtype=np.float64),
        voxel_counts=template.voxel_counts, box_px=template.box_px,
        pixel_size_angstrom=template.pixel_size_angstrom,
    )


def gold_standard_fsc(
    half_a: Tensor | np.ndarray,
    half_b: Tensor | np.ndarray,
    mask: Tensor | np.ndarray,
    *,
    pixel_size_angstrom: float | None = None,
    randomise_threshold: float = RANDOMISE_FSC_THRESHOLD,
    seed: int = 0,
    whiten: bool = False,
) -> GoldStandardFSC:
    """Unmasked, masked, phase-randomised and corrected FSC of two aligned half maps.

    Parameters
    ----------
    half_a, half_b : `(L, L, L)`
        Independent half maps on the same grid and in the same frame (computed in float64).
    mask : `(L, L, L)`
        Soft real-space mask in ``[0, 1]`` multiplied into both maps.
    pixel_size_angstrom : float, optional
        Voxel size; resolutions are in Å when given, else in pixels.
    randomise_threshold : float
        Unmasked FSC below which phases are randomised (module docstring).
    seed : int
        Seed of the random phases (each half gets its own independent draw).
    whiten : bool
        Compute the masked curves on per-shell whitened halves (module docstring).

    Returns
    -------
    GoldStandardFSC
    """
    a = torch.as_tensor(half_a).to(torch.float64)
    b = torch.as_tensor(half_b).to(torch.float64)
    m = torch.as_tensor(mask).to(torch.float64)
    unmasked = fsc(a, b, pixel_size_angstrom=pixel_size_angstrom)
    if whiten:
        a, b = whiten_halves(a, b)
    masked = fsc(a, b, mask=m, pixel_size_angstrom=pixel_size_angstrom)
    s_r = randomisation_shell(unmasked.fsc, randomise_threshold)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    a_rand = randomise_phases(a, s_r, generator=gen)
    b_rand = randomise_phases(b, s_r, generator=gen)
    randomised = fsc(a_rand, b_rand, mask=m, pixel_size_angstrom=pixel_size_angstrom)
    corrected = _with_curve(masked, corrected_fsc(masked.fsc, randomised.fsc, s_r))
    return GoldStandardFSC(unmasked, masked, randomised, corrected, s_r)


def whiten_halves(half_a: Tensor, half_b: Tensor) -> tuple[Tensor, Tensor]:
    """Both maps divided per shell by ``sqrt(mean over the shell of (|F_a|² + |F_b|²)/2)``.

    Shells are ``round(|k|)`` (the corners beyond Nyquist form one more group); shell 0 (the
    mean) takes shell 1's factor; a shell without power is left as it is. Real `(L, L, L)`
    float64 in, float64 out.
    """
    L = half_a.shape[-1]
    groups = shell_index(L, device=half_a.device).clamp(max=L // 2 + 1)
    fa, fb = torch.fft.fftn(half_a), torch.fft.fftn(half_b)
    flat = groups.reshape(-1)
    power = torch.zeros(L // 2 + 2, dtype=torch.float64, device=half_a.device)
    power.index_add_(0, flat, (0.5 * (fa.abs() ** 2 + fb.abs() ** 2)).reshape(-1))
    counts = torch.bincount(flat, minlength=L // 2 + 2).clamp(min=1)
    mean = power / counts
    scale = torch.where(mean > 0, 1.0 / torch.sqrt(torch.where(mean > 0, mean, 1.0)), 1.0)
    scale[0] = scale[1]
    factor = scale[groups]
    return torch.fft.ifftn(fa * factor).real, torch.fft.ifftn(fb * factor).real


def fsc_weights(fsc_values: Tensor | np.ndarray) -> np.ndarray:
    """Per-shell filter ``sqrt(2 FSC / (1 + FSC))`` for the average of two halves, `(S,)`.

    ``2 FSC / (1 + FSC)`` is the FSC of the full (averaged) map; its square root is the
    figure of merit that weights each shell by its expected correlation with the truth.
    Clipped to ``[0, 1]``: 0 where ``FSC ≤ 0``.
    """
    f = np.clip(np.asarray(fsc_values, dtype=np.float64).reshape(-1), 0.0, 1.0)
    return np.sqrt(2.0 * f / (1.0 + f))


def fsc_weighted_average(
    half_a: Tensor, half_b: Tensor, fsc_values: Tensor | np.ndarray
) -> Tensor:
    """``(A + B)/2`` filtered per shell by :func:`fsc_weights` (0 beyond Nyquist).

    Parameters
    ----------
    half_a, half_b : `(L, L, L)`
        Aligned half maps.
    fsc_values : `(L//2 + 1,)`
        FSC per shell (normally the mask-corrected one).

    Returns
    -------
    `(L, L, L)`
        Filtered average, dtype of ``half_a``.
    """
    if half_a.shape != half_b.shape or half_a.ndim != 3:
        raise ValueError(f"expected two (L, L, L) maps, got {tuple(half_a.shape)} and "
                         f"{tuple(half_b.shape)}")
    L = half_a.shape[-1]
    w = torch.as_tensor(fsc_weights(fsc_values), device=half_a.device)
    if w.numel() != L // 2 + 1:
        raise ValueError(f"expected {L // 2 + 1} FSC shells for a {L}-voxel box, got {w.numel()}")
    w = torch.cat([w, torch.zeros(1, dtype=w.dtype, device=w.device)])  # corners -> 0
    shells = shell_index(L, device=half_a.device).clamp(max=L // 2 + 1)
    avg = 0.5 * (half_a.detach().to(torch.float64) + half_b.detach().to(torch.float64))
    out = torch.fft.ifftn(torch.fft.fftn(avg) * w[shells]).real
    return out.to(half_a.dtype)


def poses_in_aligned_frame(
    rotations: Tensor,
    shifts_px: Tensor,
    rotation: Tensor,
    translation_px: Tensor,
    flipped: bool,
) -> tuple[Tensor, Tensor]:
    """Poses that explain the same images with the aligned map ``V_h(Qᵀ (r − t))``.

    If a map ``V`` explains images with poses ``R`` and shifts ``s``, then (derivation in
    ``docs/conventions.md``, "Gold standard"): the mirror ``V(D r)`` does with ``D R D`` and
    ``s``; the rotated map ``V_h(Qᵀ r)`` with ``R_h Qᵀ``; and its translate by ``t`` with
    shifts ``s − (R' t)_xy`` where ``R' = R_h Qᵀ``. ``(Q, t, flipped)`` are those of
    :func:`cryospin.evaluate.align.align_maps` (``aligned(r) = moving_h(Qᵀ (r − t))``).

    Parameters
    ----------
    rotations : `(N, 3, 3)`
        Poses of the moving map (left-multiply xyz columns).
    shifts_px : `(N, 2)`
        ``(tx, ty)`` pixels, ``image(r) = P(r − t)``.
    rotation : `(3, 3)`
        ``Q``.
    translation_px : `(3,)`
        ``t = (tx, ty, tz)`` pixels.
    flipped : bool
        Whether the mirror of the moving map was aligned.

    Returns
    -------
    rotations : `(N, 3, 3)`, shifts_px : `(N, 2)`
        In the dtype of ``rotations`` / ``shifts_px``.
    """
    dtype = torch.promote_types(rotations.dtype, torch.float64)
    R = rotations.to(dtype)
    if flipped:
        R = flip_hand(R)
    Q = rotation.to(device=R.device, dtype=dtype)
    t = translation_px.to(device=R.device, dtype=dtype)
    R_new = R @ Q.T  # (N, 3, 3)
    moved = (R_new @ t)[..., :2]  # (N, 2): (R' t)_xy
    s_new = shifts_px.to(device=R.device, dtype=dtype) - moved
    return R_new.to(rotations.dtype), s_new.to(shifts_px.dtype)


def write_postprocess_star(
    path: str | Path,
    result: GoldStandardFSC,
    *,
    half1_name: str,
    half2_name: str,
    mask_name: str,
    masked_map_name: str,
    post: PostProcessed | None = None,
    original: Guinier | None = None,
) -> None:
    """Write ``result`` as a RELION ``postprocess.star`` (atomically).

    ``data_general``: ``rlnFinalResolution`` (Å), ``rlnBfactorUsedForSharpening`` (Å², ``post``'s
    ``B_used``; 0 without), ``rlnUnfilteredMapHalf1/2``, ``rlnMaskName``, ``rlnMaskedMapName``,
    ``rlnRandomiseFrom`` (Å) and, when a Guinier line was fitted, ``rlnFittedSlopeGuinierPlot``
    (Å²), ``rlnFittedInterceptGuinierPlot``, ``rlnCorrelationFitGuinierPlot``. ``data_fsc``, one
    row per shell ``s``: ``rlnSpectralIndex`` (= ``s``), ``rlnResolution`` (Å⁻¹, ``s / (L · pixel
    size)``), ``rlnAngstromResolution`` (999 at ``s = 0``, as RELION),
    ``rlnFourierShellCorrelationCorrected``, ``rlnFourierShellCorrelationUnmaskedMaps``,
    ``rlnFourierShellCorrelationMaskedMaps``,
    ``rlnCorrectedFourierShellCorrelationPhaseRandomizedMaskedMaps`` (``FSC_n``). With ``post``,
    ``data_guinier``, one row per shell ``1 … L//2``: ``rlnResolutionSquared`` (Å⁻²),
    ``rlnLogAmplitudesOriginal`` (``original``: the masked average of the halves, when given),
    ``rlnLogAmplitudesWeighted`` (the masked FSC-weighted map), ``rlnLogAmplitudesSharpened``
    (the masked post-processed map); ``ln 0`` is written as −99. Without a pixel size, 1 Å per
    pixel is written.
    """
    r = result.unmasked
    apix = r.pixel_size_angstrom or 1.0
    shells = np.asarray(r.shells, dtype=np.float64)
    freq = shells / (r.box_px * apix)
    with np.errstate(divide="ignore"):
        ang = np.where(shells > 0, 1.0 / np.where(freq > 0, freq, 1.0), 999.0)
    freq = np.where(shells > 0, freq, 1.0 / 999.0)

    def finite(x: float) -> float:
        return float(x) if math.isfinite(x) else 999.0

    general = {
        "rlnFinalResolution": finite(result.final_resolution),
        "rlnBfactorUsedForSharpening": 0.0 if post is None else float(post.bfactor_a2),
        "rlnUnfilteredMapHalf1": str(half1_name),
        "rlnUnfilteredMapHalf2": str(half2_name),
        "rlnMaskName": str(mask_name),
        "rlnMaskedMapName": str(masked_map_name),
        "rlnRandomiseFrom": finite(result.randomise_from_resolution),
    }
    if post is not None and post.fit is not None:
        general["rlnFittedSlopeGuinierPlot"] = post.fit.slope_a2
        general["rlnFittedInterceptGuinierPlot"] = post.fit.intercept
        general["rlnCorrelationFitGuinierPlot"] = post.fit.correlation
    table = pd.DataFrame({
        "rlnSpectralIndex": shells.astype(np.int64),
        "rlnResolution": freq,
        "rlnAngstromResolution": ang,
        "rlnFourierShellCorrelationCorrected": result.corrected.fsc,
        "rlnFourierShellCorrelationUnmaskedMaps": result.unmasked.fsc,
        "rlnFourierShellCorrelationMaskedMaps": result.masked.fsc,
        "rlnCorrectedFourierShellCorrelationPhaseRandomizedMaskedMaps":
            result.phase_randomised.fsc,
    })
    blocks: dict[str, dict | pd.DataFrame] = {"general": general, "fsc": table}
    if post is not None:
        def logs(plot: Guinier) -> np.ndarray:
            return np.where(np.isfinite(plot.log_amplitude), plot.log_amplitude, -99.0)

        # q² to 7 significant digits (fixed-point %.6f would keep 2 to 4 of the small ones)
        guinier: dict[str, object] = {
            "rlnResolutionSquared": [f"{x:.6e}" for x in post.weighted.q2_per_a2]}
        if original is not None:
            guinier["rlnLogAmplitudesOriginal"] = logs(original)
        guinier["rlnLogAmplitudesWeighted"] = logs(post.weighted)
        guinier["rlnLogAmplitudesSharpened"] = logs(post.sharpened)
        blocks["guinier"] = pd.DataFrame(guinier)
    with atomic_path(path) as tmp:
        starfile.write(blocks, tmp, float_format="%.6f", sep=" ")
