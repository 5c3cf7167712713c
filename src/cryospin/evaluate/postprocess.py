"""Post-processing of two aligned half maps, as RELION's ``postprocess``: the gold-standard FSC
within a mask, the FSC-weighted average, its sharpening, and the files they go to.

Used by ``cryospin reconstruct --halves`` (:mod:`cryospin.train.halves`, after aligning half B
onto half A) and by ``cryospin postprocess`` (two half maps from anywhere, already in one
frame). The steps, each in its own module:

1. the mask: given, or made from the halves' noise
   (:func:`cryospin.evaluate.masks.half_map_mask`);
2. the unmasked, masked and phase-randomisation-corrected FSC
   (:func:`cryospin.evaluate.gold_standard.gold_standard_fsc`, masked curves on whitened
   halves); the final resolution is the corrected FSC at 0.143;
3. the average weighted per shell by ``sqrt(2 FSC / (1 + FSC))``
   (:func:`cryospin.evaluate.gold_standard.fsc_weighted_average`);
4. the B-factor of its masked Guinier plot between 10 Å and the resolution, applied, and a
   low-pass at the resolution (:func:`cryospin.evaluate.sharpen.postprocess_map`);
5. the local resolution within the mask
   (:func:`cryospin.evaluate.local_resolution.local_resolution`).

Files (:class:`cryospin.rundir.PostprocessFiles`): ``map.mrc`` (the weighted average),
``mask.mrc``, ``map_masked.mrc``, ``postprocess.mrc`` (sharpened, low-passed),
``postprocess_masked.mrc``, ``postprocess.star`` (RELION's layout, with the Guinier plot),
``locres.mrc`` (local resolution, Å, 0 outside the mask), ``fsc.png``, ``guinier.png`` and
``locres.png``. Maps are `(L, L, L)` indexed ``[z, y, x]``
(``docs/conventions.md``, "Gold standard").
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from cryospin.errors import CryospinError
from cryospin.evaluate.gold_standard import (
    GoldStandardFSC,
    fsc_weighted_average,
    gold_standard_fsc,
    write_postprocess_star,
)
from cryospin.evaluate.local_resolution import LocalResolution, local_resolution
from cryospin.evaluate.masks import HalfMapMask, half_map_mask
from cryospin.evaluate.sharpen import Guinier, PostProcessed, guinier_plot, postprocess_map
from cryospin.io.mrc import write_map
from cryospin.plotting import plot_fsc, plot_guinier, plot_local_resolution
from cryospin.rundir import MAP, POSTPROCESS_MAP, PostprocessFiles

__all__ = ["HalfMapsPostprocessed", "postprocess_half_maps", "write_postprocessed",
           "postprocess_summary", "sharpening_summary", "sharpening_line",
           "local_resolution_line", "local_resolution_brief"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HalfMapsPostprocessed:
    """Everything :func:`postprocess_half_maps` computed.

    Attributes
    ----------
    gold : GoldStandardFSC
        The four FSC curves; ``gold.final_resolution`` is the resolution.
    mask : `(L, L, L)` float64
        The mask used, in ``[0, 1]``.
    made_mask : HalfMapMask or None
        How the mask was made from the halves (None: it was given).
    weighted : `(L, L, L)` float64
        The FSC-weighted average of the halves (``map.mrc``).
    post : PostProcessed
        The sharpened, low-passed map and its B-factor (``postprocess.mrc``).
    original : Guinier
        The Guinier plot of the masked plain average (``rlnLogAmplitudesOriginal``).
    local : LocalResolution
        The local resolution within the mask (``locres.mrc``).
    """

    gold: GoldStandardFSC
    mask: Tensor
    made_mask: HalfMapMask | None
    weighted: Tensor
    post: PostProcessed
    original: Guinier
    local: LocalResolution


def postprocess_half_maps(
    half_a: Tensor,
    half_b: Tensor,
    *,
    pixel_size_angstrom: float | None,
    seed: int = 0,
    mask: Tensor | None = None,
    dilate_px: float | None = None,
    soft_edge_px: float | None = None,
    bfactor_a2: float | None = None,
) -> HalfMapsPostprocessed:
    """Mask, gold-standard FSC, FSC-weighted average and sharpening of two half maps.

    Parameters
    ----------
    half_a, half_b : `(L, L, L)`
        Independent half maps in one frame (computed in float64).
    pixel_size_angstrom : float or None
        Voxel size, Å; None: resolutions in pixels and no B-factor fitted.
    seed : int
        Seed of the phase randomisation.
    mask : `(L, L, L)`, optional
        A mask in ``[0, 1]`` to use; default: made from the halves' noise (``dilate_px``,
        ``soft_edge_px``: :func:`cryospin.evaluate.masks.half_map_mask`).
    bfactor_a2 : float, optional
        A B-factor to apply instead of the fitted one (Å², negative sharpens).

    Returns
    -------
    HalfMapsPostprocessed

    Logs the mask made (a warning when it fell back), a warning when the corrected FSC never
    falls below 0.143, the sharpening
    (:func:`sharpening_line`) and the local resolution (:func:`local_resolution_line`).
    """
    a = half_a.detach().to(torch.float64)
    b = half_b.detach().to(device=a.device, dtype=torch.float64)
    if a.shape != b.shape:
        raise ValueError(f"the half maps differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    made: HalfMapMask | None = None
    if mask is None:
        made = half_map_mask(a, b, dilate_px=dilate_px, soft_edge_px=soft_edge_px)
        m = made.mask
        log.info("mask: (half A + half B)/2 above %.3g (%.3g noise sigmas, from half A - "
                 "half B), dilated %g px, soft edge %g px, %.0f %% of the box", made.threshold,
                 made.threshold / made.noise_sigma if made.noise_sigma > 0 else math.inf,
                 made.dilate_px, made.soft_edge_px, 100 * made.fraction)
        if made.fallback is not None:
            log.warning("mask: %s", made.fallback)
    else:
        m = mask.detach().to(device=a.device, dtype=torch.float64)
        if m.shape != a.shape:
            raise ValueError(f"the mask's shape {tuple(m.shape)} differs from the maps' "
                             f"{tuple(a.shape)}")
    gold = gold_standard_fsc(a, b, m, pixel_size_angstrom=pixel_size_angstrom, seed=seed,
                             whiten=True)
    if bool((gold.corrected.fsc[1:] >= 0.143).all()):
        unit = "Å" if pixel_size_angstrom is not None else "px"
        log.warning("the corrected FSC never falls below 0.143: the resolution is Nyquist "
                    "(%.2f %s) or better, which finer pixels would be needed to measure (or "
                    "the halves are not independent)", gold.final_resolution, unit)
    weighted = fsc_weighted_average(a, b, gold.corrected.fsc)
    post = postprocess_map(weighted, m, resolution_angstrom=gold.final_resolution,
                           pixel_size_angstrom=pixel_size_angstrom, bfactor_a2=bfactor_a2)
    original = guinier_plot(0.5 * (a + b) * m, pixel_size_angstrom or 1.0)
    unit = "Å" if pixel_size_angstrom is not None else "px"
    log.info(sharpening_line(post, unit))
    # density: the halves' average above the made mask's threshold (a given mask: none known)
    density = None if made is None else 0.5 * (a + b) >= made.threshold
    local = local_resolution(a, b, m, pixel_size_angstrom=pixel_size_angstrom,
                             density=density)
    log.info(local_resolution_line(local, unit))
    return HalfMapsPostprocessed(gold, m, made, weighted, post, original, local)


def write_postprocessed(files: PostprocessFiles, result: HalfMapsPostprocessed,
                        pixel_size_angstrom: float, *, half_names: tuple[str, str],
                        fsc_title: str = "gold-standard FSC (half A vs half B)") -> None:
    """Write the maps, ``postprocess.star`` and the two plots (each file atomically; a plot
    that cannot be drawn is logged and left out).

    Parameters
    ----------
    files : PostprocessFiles
        Where (the folder exists).
    result : HalfMapsPostprocessed
    pixel_size_angstrom : float
        Voxel size written into the maps' headers (Å; 1 when unknown).
    half_names : (str, str)
        The half maps as ``postprocess.star`` names them (``rlnUnfilteredMapHalf1/2``).
    fsc_title : str
        Title of ``fsc.png``.
    """
    post, mask = result.post, result.mask
    write_map(files.map, result.weighted.numpy(), pixel_size_angstrom)
    write_map(files.mask, mask.numpy(), pixel_size_angstrom)
    write_map(files.masked_map, (result.weighted * mask).numpy(), pixel_size_angstrom)
    write_map(files.postprocessed, post.volume.numpy(), pixel_size_angstrom)
    write_map(files.postprocessed_masked, (post.volume * mask).numpy(), pixel_size_angstrom)
    write_map(files.local_resolution, result.local.volume.numpy(), pixel_size_angstrom)
    write_postprocess_star(files.postprocess, result.gold, half1_name=half_names[0],
                           half2_name=half_names[1], mask_name=files.mask.name,
                           masked_map_name=files.masked_map.name, post=post,
                           original=result.original)
    gold = result.gold
    try:
        plot_fsc([("unmasked", gold.unmasked), ("masked", gold.masked),
                  ("phase-randomised masked", gold.phase_randomised),
                  ("corrected", gold.corrected)],
                 files.fsc_png, thresholds=(0.143,), title=fsc_title)
        plot_guinier(post.weighted.q2_per_a2,
                     [("average of the halves", result.original.log_amplitude),
                      (f"FSC-weighted ({MAP})", post.weighted.log_amplitude),
                      (f"sharpened ({POSTPROCESS_MAP})", post.sharpened.log_amplitude)],
                     post.fit, files.guinier_png)
        plot_local_resolution(result.weighted.numpy(), result.local.volume.numpy(),
                              files.local_resolution_png,
                              unit="Å" if gold.unmasked.pixel_size_angstrom is not None
                              else "px")
    except CryospinError as exc:  # matplotlib missing: the numbers are in the star file
        log.warning("plots not written (%s)", exc)


def postprocess_summary(result: HalfMapsPostprocessed) -> dict:
    """``fsc.json``'s ``sharpening`` (:func:`sharpening_summary`) and ``local_resolution``
    (:meth:`cryospin.evaluate.local_resolution.LocalResolution.to_dict`; Å, or voxels
    without a pixel size)."""
    return {"sharpening": sharpening_summary(result.post),
            "local_resolution": result.local.to_dict()}


def sharpening_summary(post: PostProcessed) -> dict:
    """``fsc.json``'s ``sharpening``: the B-factor applied (Å², RELION's sign), the Guinier
    fit (or why there is none) and the resolution the map was low-passed at."""
    return {"bfactor_a2": post.bfactor_a2,
            "guinier_fit": None if post.fit is None else post.fit.to_dict(),
            "no_fit_reason": post.reason,
            "lowpass_resolution": (post.resolution_angstrom
                                   if math.isfinite(post.resolution_angstrom) else None)}


def local_resolution_line(local: LocalResolution, unit: str) -> str:
    """One line on the local resolution: its median and spread within the mask."""
    if local.points.shape[0] == 0:
        return "local resolution: no sample point within the mask"
    p5, p50, p95 = local.percentiles()
    line = (f"local resolution (FSC {local.threshold:g} in {local.window_px}-voxel windows "
            f"every {local.step_px} voxels, {local.points.shape[0]} within the mask): median "
            f"{p50:.2f} {unit}, 5-95 % {p5:.2f}-{p95:.2f} {unit}")
    d5, d50, d95 = local.percentiles(density_only=True)
    if local.on_density is not None and not math.isnan(d50):
        line += (f"; centred on density ({int(local.on_density.sum())} points): median "
                 f"{d50:.2f} {unit}, 5-95 % {d5:.2f}-{d95:.2f} {unit}")
    return line


def local_resolution_brief(local: LocalResolution, unit: str) -> str:
    """The end-of-run line: the median and 5–95 % within the mask and, when known, on
    density (``unit``: ``"Å"`` or ``"px"``)."""
    p5, p50, p95 = local.percentiles()
    line = (f"local resolution: median {p50:.2f} {unit} within the mask (5-95 %: {p5:.2f} to "
            f"{p95:.2f} {unit})")
    d5, d50, d95 = local.percentiles(density_only=True)
    if not math.isnan(d50):
        line += f", {d50:.2f} {unit} on density (5-95 %: {d5:.2f} to {d95:.2f} {unit})"
    return line


def sharpening_line(post: PostProcessed, unit: str) -> str:
    """One line on the sharpening: the B-factor and its fit, or why there is none
    (``unit``: ``"Å"``, or ``"px"`` without a pixel size)."""
    at = (f"low-passed at {post.resolution_angstrom:.2f} {unit}"
          if math.isfinite(post.resolution_angstrom) else "not low-passed")
    if post.fit is None:
        what = f"B-factor {post.bfactor_a2:g} Å²" if post.bfactor_a2 else "none"
        return f"sharpening: {what} ({post.reason}); {POSTPROCESS_MAP} {at}"
    f = post.fit
    return (f"sharpening: B-factor {post.bfactor_a2:.0f} Å² from the Guinier plot of the "
            f"FSC-weighted map between {f.low_angstrom:g} and {f.high_angstrom:.2f} Å "
            f"({f.shells} shells, correlation {f.correlation:.3f}); {POSTPROCESS_MAP} {at}")
