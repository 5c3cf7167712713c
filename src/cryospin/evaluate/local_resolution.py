"""Local resolution: the FSC of two half maps within a small soft window, around points on a
grid inside the mask (as blocres, cryoSPARC's and RELION's local resolution).

A global FSC averages over the whole mask: a rigid core and a flexible or poorly aligned
periphery give one number that describes neither. Here both half maps are first **whitened**
(:func:`cryospin.evaluate.gold_standard.whiten_halves`: divided per shell by the root of the
shell's mean power, which leaves their FSC as it is). Around each sample point ``c`` (every
``step_px`` voxels on a grid through the box centre, kept where the mask at ``c`` is at least
0.5), both are cut to a ``W``-voxel cube centred on ``c`` (periodic, as the FFT sees the box),
multiplied by a soft sphere (flat to radius ``W/4``, a raised cosine to ``W/2``), and their FSC
is taken over the cube's shells ``0 … W//2`` (:func:`cryospin.evaluate.fsc.fsc_curve`'s shells
on the ``W`` grid). The local resolution is where that FSC first falls below ``threshold``
(0.143, as the global one; linear in frequency between the shells around the crossing), in Å:
``W · pixel size / s``; 2 voxels (Nyquist) when it never falls below.

Why whitened: the window multiplies both halves alike, so it spreads their strong, correlated
low-frequency signal into the high shells of the window's FFT; on ADK's 64 px halves (global
corrected FSC 0.143 at 3.79 Å) most unwhitened 16-voxel windows read Nyquist (3.0 Å) at FSC 0.5,
while whitened ones read a median of 3.91 Å (24 voxels) and 3.79 Å (32 voxels) at 0.143
(benchmarks/RESULTS.md, "Local resolution"). No phase-randomisation correction is made within a
window. A window's low shells hold few voxels, so its FSC scatters: on two halves of pure noise,
5 % of 24-voxel windows read 12.6 Å or better. Read the map for where the structure is better
or worse, within the mask, rather than for one window's number. The mask reaches into the
solvent (dilated, soft-edged), so windows centred there read worse; given where the density
is, the points on it are summarised apart (on the 128 px spike: a median of 4.30 Å on density
against 6.39 Å over the whole mask).

The map (:attr:`LocalResolution.volume`) gives every voxel where the mask is at least 0.5 the
value of the grid point nearest to it (a grid point that was not sampled, its mask below 0.5,
takes the mean of its sampled neighbours, up to :data:`_FILL_STEPS` grid steps out), and 0
elsewhere: a map to colour another map by (ChimeraX's *Surface Color* by volume data), as
RELION's ``relion_locres.mrc``.

Maps are `(L, L, L)` indexed ``[z, y, x]`` (``docs/conventions.md``, "Gold standard").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from cryospin.evaluate.fsc import shell_index
from cryospin.evaluate.gold_standard import whiten_halves
from cryospin.evaluate.masks import spherical_mask

__all__ = ["LOCAL_FSC_THRESHOLD", "LocalResolution", "default_window_px", "local_resolution",
           "soft_sphere_window"]

#: FSC threshold of a window (the global gold-standard one).
LOCAL_FSC_THRESHOLD = 0.143
#: Windows whose FSCs are computed at once (memory ``batch · W³`` complex numbers).
_BATCH = 128
#: How many grid steps out from the sampled points the map is filled.
_FILL_STEPS = 3


@dataclass(frozen=True)
class LocalResolution:
    """Local resolution of two half maps (:func:`local_resolution`).

    Attributes
    ----------
    points : `(P, 3)` int64
        Sample points ``[z, y, x]`` (voxels) inside the mask.
    resolution_angstrom : `(P,)` float64
        Local resolution at each point (Å; voxels without a pixel size).
    volume : `(L, L, L)` float64
        Each voxel with mask ≥ 0.5: the resolution at its nearest grid point (module
        docstring); 0 elsewhere.
    window_px, step_px : int
        Window edge and sampling step, voxels.
    threshold : float
        FSC threshold of a window.
    on_density : `(P,)` bool or None
        Whether each point lies on the structure's density (``density`` given to
        :func:`local_resolution`; None when none was).
    """

    points: Tensor
    resolution_angstrom: Tensor
    volume: Tensor
    window_px: int
    step_px: int
    threshold: float
    on_density: Tensor | None = None

    def percentiles(self, qs: tuple[float, ...] = (5.0, 50.0, 95.0), *,
                    density_only: bool = False) -> list[float]:
        """Percentiles of the sample points' resolutions (Å), in the order of ``qs``; with
        ``density_only``, of the points on density (NaN without ``on_density`` or such
        points)."""
        values = self.resolution_angstrom
        if density_only:
            values = (values[self.on_density] if self.on_density is not None
                      else values[:0])
        if values.numel() == 0:
            return [math.nan for _ in qs]
        return [float(np.percentile(values.cpu().numpy(), q)) for q in qs]

    def to_dict(self) -> dict:
        """JSON-ready summary (without the map): the whole mask's points, and those on density
        (``density_*``: None without ``on_density``)."""
        p5, p50, p95 = self.percentiles()
        out = {"window_px": self.window_px, "step_px": self.step_px,
               "fsc_threshold": self.threshold, "points": int(self.points.shape[0]),
               "median": p50, "percentile_5": p5, "percentile_95": p95,
               "density_points": None, "density_median": None,
               "density_percentile_5": None, "density_percentile_95": None}
        if self.on_density is not None:
            d5, d50, d95 = self.percentiles(density_only=True)
            out.update({"density_points": int(self.on_density.sum()),
                        "density_median": None if math.isnan(d50) else d50,
                        "density_percentile_5": None if math.isnan(d5) else d5,
                        "density_percentile_95": None if math.isnan(d95) else d95})
        return out


def default_window_px(box_px: int) -> int:
    """The window edge for an ``L``-voxel box: ``L/4`` rounded to an even number, from 24 (12
    shells) to 48, and at most ``L`` (an odd ``L``: ``L − 1``)."""
    return min(box_px - box_px % 2, min(48, max(24, 2 * round(box_px / 8))))


def soft_sphere_window(window_px: int, *, dtype: torch.dtype = torch.float64,
                       device: torch.device | str | None = None) -> Tensor:
    """The window, `(W, W, W)`: 1 within radius ``W/4`` of voxel ``[W//2]*3``, a raised cosine
    to 0 at radius ``W/2``, 0 beyond (:func:`cryospin.evaluate.masks.spherical_mask`)."""
    return spherical_mask(window_px, window_px / 4, soft_edge_px=window_px / 4, dtype=dtype,
                          device=device)


def _grid(box_px: int, step_px: int) -> Tensor:
    """Sample coordinates along one axis: every ``step_px`` through ``L//2``, `(G,)` int64."""
    first = (box_px // 2) % step_px
    return torch.arange(first, box_px, step_px, dtype=torch.int64)


def _crossing(fsc_values: Tensor, threshold: float) -> Tensor:
    """Per row `(P, S)`: the frequency (shells, float64) where the FSC first falls below
    ``threshold`` from shell 1 on, linear between the shells around it; ``S − 1`` (Nyquist)
    where it never does."""
    P, S = fsc_values.shape
    device = fsc_values.device
    below = fsc_values[:, 1:] < threshold  # (P, S-1): shells 1 … S-1
    any_below = below.any(dim=1)
    first = torch.where(any_below, below.to(torch.int64).argmax(dim=1) + 1,
                        torch.full((P,), S - 1, dtype=torch.int64, device=device))  # s ≥ 1
    rows = torch.arange(P, device=device)
    before, at = fsc_values[rows, first - 1], fsc_values[rows, first]
    span = before - at
    frac = torch.where(span > 0, (before - threshold) / torch.where(span > 0, span, 1.0), 0.0)
    freq = (first - 1).to(torch.float64) + frac.clamp(0.0, 1.0)
    return torch.where(any_below, freq, torch.full_like(freq, float(S - 1)))


def _spread(table: Tensor, known: Tensor) -> tuple[Tensor, Tensor]:
    """Grid values `(G, G, G)` with the unknown cells next to known ones set to the mean of
    their known neighbours (26-connected), :data:`_FILL_STEPS` times."""
    ones = torch.ones(1, 1, 3, 3, 3, dtype=torch.float64, device=table.device)
    for _ in range(_FILL_STEPS):
        k = known.to(torch.float64)[None, None]
        total = torch.nn.functional.conv3d((table * known)[None, None], ones, padding=1)[0, 0]
        count = torch.nn.functional.conv3d(k, ones, padding=1)[0, 0]
        new = ~known & (count > 0)
        if not bool(new.any()):
            break
        table = torch.where(new, total / count.clamp(min=1), table)
        known = known | new
    return table, known


def local_resolution(
    half_a: Tensor,
    half_b: Tensor,
    mask: Tensor,
    *,
    pixel_size_angstrom: float | None,
    window_px: int | None = None,
    step_px: int | None = None,
    threshold: float = LOCAL_FSC_THRESHOLD,
    density: Tensor | None = None,
) -> LocalResolution:
    """Local resolution of two aligned half maps within ``mask`` (module docstring).

    Parameters
    ----------
    half_a, half_b : `(L, L, L)`
        Independent half maps in one frame (computed in float64; whitened here).
    mask : `(L, L, L)`
        Mask in ``[0, 1]``: points and voxels where it is at least 0.5 are sampled / filled.
    pixel_size_angstrom : float or None
        Voxel size, Å (None: resolutions in voxels).
    window_px : int, optional
        Window edge, voxels (even, 8 … L; default :func:`default_window_px`).
    step_px : int, optional
        Sampling step, voxels (default ``W/4``, at least 1).
    threshold : float
        FSC threshold of a window.
    density : `(L, L, L)` bool, optional
        Where the structure's density is (e.g. the halves' average above the mask's
        threshold): the points on it are marked (:attr:`LocalResolution.on_density`), for a
        summary of the structure apart from the mask's solvent edge.

    Returns
    -------
    LocalResolution
    """
    a = half_a.detach().to(torch.float64)
    b = half_b.detach().to(device=a.device, dtype=torch.float64)
    m = mask.detach().to(device=a.device, dtype=torch.float64)
    if a.ndim != 3 or len(set(a.shape)) != 1 or a.shape != b.shape or m.shape != a.shape:
        raise ValueError(f"expected three (L, L, L) maps, got {tuple(a.shape)}, "
                         f"{tuple(b.shape)} and {tuple(m.shape)}")
    L = int(a.shape[-1])
    W = default_window_px(L) if window_px is None else int(window_px)
    if W % 2 or not 8 <= W <= L:
        raise ValueError(f"the window must be an even number of voxels from 8 to {L}, got {W}")
    step = max(1, W // 4) if step_px is None else int(step_px)
    if step < 1:
        raise ValueError(f"the sampling step must be at least 1 voxel, got {step}")
    apix = 1.0 if pixel_size_angstrom is None else float(pixel_size_angstrom)
    a, b = whiten_halves(a, b)

    g = _grid(L, step).to(a.device)
    cz, cy, cx = torch.meshgrid(g, g, g, indexing="ij")
    centres = torch.stack([cz.reshape(-1), cy.reshape(-1), cx.reshape(-1)], dim=1)  # (G³, 3)
    centres = centres[m[centres[:, 0], centres[:, 1], centres[:, 2]] >= 0.5]  # (P, 3)

    window = soft_sphere_window(W, device=a.device)
    offsets = torch.arange(W, device=a.device) - W // 2
    shells = shell_index(W, device=a.device).reshape(-1)
    S = W // 2 + 1
    inside = shells < S
    onehot = torch.zeros(W**3, S, dtype=torch.float64, device=a.device)
    onehot[torch.nonzero(inside).squeeze(1), shells[inside]] = 1.0  # (W³, S)
    frequencies = []
    for start in range(0, centres.shape[0], _BATCH):
        c = centres[start:start + _BATCH]  # (n, 3)
        iz = (c[:, 0, None] + offsets) % L  # (n, W)
        iy = (c[:, 1, None] + offsets) % L
        ix = (c[:, 2, None] + offsets) % L
        cubes = [v[iz[:, :, None, None], iy[:, None, :, None], ix[:, None, None, :]] * window
                 for v in (a, b)]  # (n, W, W, W) each
        fa, fb = (torch.fft.fftn(cube, dim=(1, 2, 3)).reshape(len(c), -1) for cube in cubes)
        cross = (fa * fb.conj()).real @ onehot  # (n, S)
        power = torch.sqrt((fa.abs() ** 2 @ onehot) * (fb.abs() ** 2 @ onehot))
        fsc_values = torch.where(power > 0, cross / torch.where(power > 0, power, 1.0), 0.0)
        frequencies.append(_crossing(fsc_values, threshold))
    freq = (torch.cat(frequencies) if frequencies
            else torch.zeros(0, dtype=torch.float64, device=a.device))
    resolution = torch.where(freq > 0, W * apix / torch.where(freq > 0, freq, 1.0),
                             torch.full_like(freq, W * apix))  # (P,)

    # every voxel with mask ≥ 0.5: its nearest sample point's value (its grid cell's centre)
    volume = torch.zeros(L, L, L, dtype=torch.float64, device=a.device)
    if centres.shape[0]:
        first, G = int(g[0]), int(g.numel())
        table = torch.zeros(G, G, G, dtype=torch.float64, device=a.device)
        known = torch.zeros(G, G, G, dtype=torch.bool, device=a.device)
        k = (centres - first) // step
        table[k[:, 0], k[:, 1], k[:, 2]] = resolution
        known[k[:, 0], k[:, 1], k[:, 2]] = True
        table, known = _spread(table, known)
        near = ((torch.arange(L, device=a.device) - first).to(torch.float64) / step).round()
        near = near.clamp(0, G - 1).to(torch.int64)
        nz, ny, nx = torch.meshgrid(near, near, near, indexing="ij")
        fill = (m >= 0.5) & known[nz, ny, nx]
        volume = torch.where(fill, table[nz, ny, nx], volume)
    on_density = None
    if density is not None:
        if tuple(density.shape) != tuple(a.shape):
            raise ValueError(f"the density's shape {tuple(density.shape)} differs from the "
                             f"maps' {tuple(a.shape)}")
        d = density.to(device=a.device, dtype=torch.bool)
        on_density = d[centres[:, 0], centres[:, 1], centres[:, 2]]
    return LocalResolution(points=centres, resolution_angstrom=resolution, volume=volume,
                           window_px=W, step_px=step, threshold=float(threshold),
                           on_density=on_density)
