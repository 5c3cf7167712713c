"""Point-group detection of a map: which group, about which axes, how well; or where a given
group's axes lie (:func:`place_group`).

Conventions (``docs/conventions.md``, "Symmetry" and "Symmetry detection"): volumes `(L, L, L)`
indexed ``[z, y, x]``, voxel ``[z, y, x]`` at ``r = (x, y, z) − L//2`` pixels; rotations
left-multiply xyz column vectors. A map ``V`` has the group ``G`` in the *frame* ``M`` about
the *centre* ``c`` when ``W(r) = V(M r + c)`` is symmetric under ``G`` in its conventional
orientation (:func:`cryospin.symmetry.point_group_rotations`), i.e. ``V`` is symmetric under
``M g Mᵀ`` about ``c``. ``W`` is the map in the conventional frame
(:func:`map_in_group_frame`); poses ``R`` of ``V`` become ``R M`` with shifts
``t + (R c)_xy`` for ``W`` (:func:`poses_in_group_frame`).

Method (:func:`detect_symmetry`):

1. The map is Fourier-cropped to a small search box (default 32 px). Its centre ``c`` is the
   centre of mass of the positive part of that map low-passed to 0.25 cycles/px (for an
   exactly symmetric map it lies on every symmetry axis); the map is moved there (Fourier
   phase shift) and *whitened*: each Fourier shell divided by its RMS amplitude, with a
   raised-cosine roll-off from 0.4 to 0.5 cycles/px, so that the details, not the overall
   shape (which correlates highly with itself under any rotation), decide the scores.
   Rotated copies are read by trilinear interpolation of the 2× Fourier-padded copy (accurate
   up to the search box's Nyquist frequency), over the voxels within ``0.45 b`` of the centre
   with a soft spherical weight.
2. Axis search: for each direction ``u`` of a near-uniform hemisphere grid, the map is sampled
   on cylinders about ``u`` and Fourier-transformed in the azimuth; ``S_n(u)``, the share of
   the power at azimuthal frequencies ``m ≠ 0`` that lies at multiples of ``n``, is 1 for an
   exact ``n``-fold axis (one resampling scores every ``n``). The best two directions of
   each ``n`` at least 15° apart are the candidate axes.
3. Groups: each of ``Cn``, ``Dn``, ``T``, ``O``, ``I`` (= ``I2``) is placed with its principal
   axis (``n``, ``n``, 3, 4, 5-fold) on each candidate axis and the angle about it scanned in
   3° steps (scored by up to four elements off that axis); the best frame, when it scores at
   least ``threshold − 0.2``, is refined by a pattern search over small rotations (2°, 0.5°).
   The score of a group is the mean, over its
   elements ``h ≠ 1``, of the (weighted Pearson) correlation of the map with its copy
   ``V(hᵀ r)``; ``C1`` scores 1.
4. Choice (:func:`rank_groups`): the largest group whose score is at least ``threshold``
   (ties of order: the higher score); the table lists the accepted groups by order, then the
   rejected ones by score. The *gap* is the chosen score minus the best rejected score.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from cryospin.forward.resample import fourier_crop_3d, fourier_pad_3d
from cryospin.forward.rigid import centred_coords, transform_map
from cryospin.forward.trilinear import sample_volume
from cryospin.point_group import parse_point_group
from cryospin.rotations import so3_exp
from cryospin.symmetry import icosahedral_five_fold, point_group_rotations

__all__ = [
    "GroupFit",
    "SearchMap",
    "SymmetrySearch",
    "axis_rotation",
    "cyclic_power_scores",
    "detect_symmetry",
    "group_score",
    "hemisphere_directions",
    "map_in_group_frame",
    "place_group",
    "poses_in_group_frame",
    "prepare_search_map",
    "rank_groups",
    "symmetry_correlations",
]

#: largest box resampled after 2× Fourier padding by :func:`map_in_group_frame`
_MAX_OVERSAMPLED_BOX = 256


@dataclass(frozen=True)
class GroupFit:
    """One candidate group placed on the map.

    Attributes
    ----------
    group : str
        Symbol (``"C7"``, ``"D7"``, ``"T"``, ``"O"``, ``"I2"``).
    order : int
        ``|G|``.
    score : float
        Mean correlation of the map with its copies rotated by the group's elements ≠ 1.
    frame : `(3, 3)` float64
        ``M``: conventional coordinates -> map coordinates (``W(r) = V(M r + c)``).
    """

    group: str
    order: int
    score: float
    frame: Tensor


@dataclass(frozen=True)
class SymmetrySearch:
    """Result of :func:`detect_symmetry`.

    Attributes
    ----------
    fits : tuple of GroupFit
        Ranked best first (:func:`rank_groups`); ``fits[0]`` is the chosen group.
    centre_px : `(3,)` float64
        ``c = (x, y, z)`` in pixels of the input box from ``L//2``.
    threshold : float
        The score a group needs to be chosen.
    gap : float
        Chosen score minus the best score of a rejected group (1 when none was rejected).
    """

    fits: tuple[GroupFit, ...]
    centre_px: Tensor
    threshold: float
    gap: float

    @property
    def chosen(self) -> GroupFit:
        """The chosen group (the first of the ranking)."""
        return self.fits[0]


# ----------------------------------------------------------------------------- geometry


def axis_rotation(axis: Tensor, angle_rad: Tensor | float) -> Tensor:
    """Right-handed rotations by ``angle_rad`` about unit ``axis``, `(..., 3, 3)`.

    ``axis`` `(..., 3)` (normalised here) and ``angle_rad`` broadcast; dtype of ``axis``.
    """
    a = axis / axis.norm(dim=-1, keepdim=True)
    angle = torch.as_tensor(angle_rad, dtype=a.dtype, device=a.device)
    return so3_exp(a * angle[..., None])


def hemisphere_directions(n: int, *, dtype: torch.dtype = torch.float64) -> Tensor:
    """``n`` near-uniform unit directions with ``z ≥ 0`` (Fibonacci lattice), `(n, 3)`.

    An axis and its opposite are the same axis, so a hemisphere covers every axis; the
    spacing is about ``√(2π / n)`` rad.
    """
    i = torch.arange(n, dtype=dtype) + 0.5
    z = 1.0 - i / n  # (0, 1]
    rho = (1.0 - z * z).clamp_min(0).sqrt()
    phi = i * (math.pi * (3.0 - math.sqrt(5.0)))
    return torch.stack([rho * torch.cos(phi), rho * torch.sin(phi), z], -1)


def _rotation_taking(a: Tensor, b: Tensor) -> Tensor:
    """A rotation ``C`` with ``C a = b`` for unit ``a``, ``b`` `(3,)`, `(3, 3)`."""
    v = torch.linalg.cross(a, b)
    s, c = float(v.norm()), float(a @ b)
    if s < 1e-12:
        if c > 0:
            return torch.eye(3, dtype=a.dtype)
        perp = torch.linalg.cross(a, torch.eye(3, dtype=a.dtype)[int(a.abs().argmin())])
        return axis_rotation(perp, math.pi)
    return axis_rotation(v, math.atan2(s, c))


# ----------------------------------------------------------------------------- the search map


def _shift(volume: Tensor, translation_px: Tensor) -> Tensor:
    """``out(r) = V(r − t)`` by a Fourier phase ramp, `(L, L, L)`, ``t`` `(3,)` xyz px."""
    L = volume.shape[-1]
    k = torch.fft.fftfreq(L, d=1.0 / L, dtype=volume.dtype)
    kz, ky, kx = torch.meshgrid(k, k, k, indexing="ij")
    t = translation_px.to(volume.dtype)
    phase = torch.exp(-2j * math.pi * (kx * t[0] + ky * t[1] + kz * t[2]) / L)
    X = torch.fft.fftn(torch.fft.ifftshift(volume))
    return torch.fft.fftshift(torch.fft.ifftn(X * phase)).real


def _lowpass(volume: Tensor, pass_cpp: float, stop_cpp: float) -> Tensor:
    """Raised-cosine low-pass: 1 below ``pass_cpp``, 0 above ``stop_cpp`` (cycles/px)."""
    L = volume.shape[-1]
    k = torch.fft.fftfreq(L, dtype=volume.dtype)
    kz, ky, kx = torch.meshgrid(k, k, k, indexing="ij")
    s = (kx**2 + ky**2 + kz**2).sqrt()
    x = ((s - pass_cpp) / (stop_cpp - pass_cpp)).clamp(0, 1)
    return torch.fft.ifftn(torch.fft.fftn(volume) * (0.5 + 0.5 * torch.cos(math.pi * x))).real


@dataclass(frozen=True)
class SearchMap:
    """The map as the search sees it (:func:`prepare_search_map`).

    Attributes
    ----------
    small : `(b, b, b)`
        Cropped, filtered, recentred map (centre of mass at ``b//2``).
    padded : `(2b, 2b, 2b)`
        ``small`` Fourier-padded 2×: resampled (trilinear) by the scores, accurate to a few
        per mille up to ``small``'s Nyquist frequency.
    points : `(P, 3)`
        ``(x, y, z)`` of the voxels of ``small`` within ``0.45 b`` of its centre.
    weights : `(P,)`
        Their weights in the correlation (a soft sphere, cosine edge from ``0.35 b``).
    centre_px : `(3,)` float64
        The centre of mass ``c`` (xyz) in pixels of the input box from ``L//2``.
    """

    small: Tensor
    padded: Tensor
    points: Tensor
    weights: Tensor
    centre_px: Tensor


def _whiten(volume: Tensor) -> Tensor:
    """Divide each Fourier shell by its root-mean-square amplitude (DC kept at 0), then a
    raised-cosine low-pass from 0.4 to 0.5 cycles/px."""
    L = volume.shape[-1]
    k = torch.fft.fftfreq(L, d=1.0 / L, dtype=volume.dtype)
    kz, ky, kx = torch.meshgrid(k, k, k, indexing="ij")
    shell = (kx**2 + ky**2 + kz**2).sqrt().round().long()
    X = torch.fft.fftn(volume)
    power = torch.zeros(int(shell.max()) + 1, dtype=volume.dtype)
    count = torch.zeros_like(power)
    power.index_add_(0, shell.flatten(), (X.abs() ** 2).flatten())
    count.index_add_(0, shell.flatten(), torch.ones_like(power[:1]).expand(shell.numel()))
    rms = (power / count.clamp_min(1)).sqrt().clamp_min(1e-30)
    s = (kx**2 + ky**2 + kz**2).sqrt() / L
    edge = ((s - 0.4) / 0.1).clamp(0, 1)
    filt = (0.5 + 0.5 * torch.cos(math.pi * edge)) / rms[shell]
    filt = torch.where(shell == 0, torch.zeros_like(filt), filt)
    return torch.fft.ifftn(X * filt).real


def prepare_search_map(volume: Tensor, box_px: int = 32) -> SearchMap:
    """The small, whitened, recentred map of the search (:class:`SearchMap`).

    Parameters
    ----------
    volume : `(L, L, L)`
        Input map; dtype followed.
    box_px : int
        Search box ``b = min(L, box_px)`` (Fourier crop).

    The centre of mass is that of the positive part of the cropped map low-passed to
    0.25 cycles/px (the shape, not the noise); the map is moved there by a Fourier phase
    shift, then whitened (:func:`_whiten`: every shell weighs the same in the correlations,
    so that the details, not the overall shape, decide them).
    """
    L = volume.shape[-1]
    b = min(L, int(box_px))
    small = fourier_crop_3d(volume, b) if b < L else volume.clone()
    smooth = _lowpass(small, 0.2, 0.25)
    weight = smooth.clamp_min(0)
    r = centred_coords(b, small.dtype)
    total = weight.sum()
    centre_small = ((weight[..., None] * r).sum(dim=(0, 1, 2)) / total
                    if float(total) > 0 else torch.zeros(3, dtype=small.dtype))
    small = _whiten(_shift(small, -centre_small))
    radius = r.norm(dim=-1)
    inside = radius <= 0.45 * b
    edge = ((radius[inside] - 0.35 * b) / (0.1 * b)).clamp(0, 1)
    return SearchMap(small=small, padded=fourier_pad_3d(small, 2 * b), points=r[inside],
                     weights=0.5 + 0.5 * torch.cos(math.pi * edge),
                     centre_px=centre_small.double() * (L / b))


# ----------------------------------------------------------------------------- scores


def _sample(padded: Tensor, points: Tensor) -> Tensor:
    """Trilinear values of the 2× padded map at ``points`` `(..., P, 3)` (pixels of the small
    box from its centre, xyz), `(..., P)`; zero outside."""
    B2 = padded.shape[-1]
    grid = (points * 2.0 + B2 // 2) * (2.0 / (B2 - 1)) - 1.0
    out = sample_volume(padded[None], grid.reshape(-1, 3))  # (1, Q), on every CPU thread
    return out.reshape(points.shape[:-1])


def symmetry_correlations(search: SearchMap, rotations: Tensor) -> Tensor:
    """Weighted Pearson correlation of the search map with each copy ``V(hᵀ r)``, `(B,)`.

    Parameters
    ----------
    search : SearchMap
        From :func:`prepare_search_map`.
    rotations : `(B, 3, 3)`
        ``h``; cast to the map's dtype.
    """
    dtype = search.small.dtype
    h = rotations.to(dtype)
    p = search.points  # (P, 3)
    a = _sample(search.padded, p)  # (P,)
    c = _sample(search.padded, p @ h)  # (B, P): V(hᵀ r), rows of p @ h are hᵀ r
    w = search.weights / search.weights.sum()
    a = a - (w * a).sum()
    c = c - (w * c).sum(-1, keepdim=True)
    num = (w * a * c).sum(-1)
    return num / ((w * a * a).sum() * (w * c * c).sum(-1)).sqrt().clamp_min(1e-30)


def group_score(search: SearchMap, rotations: Tensor) -> float:
    """Mean of :func:`symmetry_correlations` over the elements ≠ identity (1.0 for C1).

    ``rotations`` `(G, 3, 3)`, identity first (as :func:`point_group_rotations` and
    ``M g Mᵀ`` of it).
    """
    if rotations.shape[0] <= 1:
        return 1.0
    return float(symmetry_correlations(search, rotations[1:]).mean())


def cyclic_power_scores(search: SearchMap, directions: Tensor, orders: list[int], *,
                        azimuths: int = 64, chunk: int = 64) -> Tensor:
    """``S_n(u)``: share of the azimuthal power (``m ≠ 0``) at multiples of ``n``, `(D, K)`.

    The map is sampled (trilinear, 2× padded) on cylinders about each direction ``u``: radii
    ``1 … ⌊0.45 b⌋``, heights every 2 px within the sphere of radius ``0.45 b``, ``azimuths``
    angles; the power ``P_m`` of the azimuthal Fourier series is summed over radius (weighted
    by the radius, the cylindrical volume element) and height.
    ``S_n = Σ_{m ≠ 0, n | m} P_m / Σ_{m ≠ 0} P_m`` is 1 for an exact ``n``-fold axis along
    ``u``.

    Parameters
    ----------
    search : SearchMap
    directions : `(D, 3)`
        Unit axes.
    orders : list of int
        The ``n`` (each ``< azimuths / 2``).
    """
    b = search.small.shape[-1]
    dtype = search.small.dtype
    R = int(0.45 * b)
    radii = torch.arange(1, R + 1, dtype=dtype)
    heights = torch.arange(-R + (R % 2), R + 1, 2, dtype=dtype)
    rr, hh = torch.meshgrid(radii, heights, indexing="ij")
    keep = rr**2 + hh**2 <= R**2
    rr, hh = rr[keep], hh[keep]  # (C,) circles
    phi = torch.arange(azimuths, dtype=dtype) * (2 * math.pi / azimuths)
    cx, cy = rr[:, None] * torch.cos(phi), rr[:, None] * torch.sin(phi)  # (C, A)
    cz = hh[:, None].expand(-1, azimuths)
    m = torch.fft.fftfreq(azimuths, d=1.0 / azimuths).abs().round().long()  # (A,)
    nonzero = m != 0
    select = torch.stack([nonzero & (m % n == 0) for n in orders], -1).to(dtype)  # (A, K)
    out = []
    for start in range(0, directions.shape[0], chunk):
        u = directions[start:start + chunk].to(dtype)  # (d, 3)
        helper = torch.eye(3, dtype=dtype)[u.abs().argmin(dim=-1)]  # (d, 3)
        e1 = torch.linalg.cross(u, helper)
        e1 = e1 / e1.norm(dim=-1, keepdim=True)
        e2 = torch.linalg.cross(u, e1)
        pts = (cx[None, ..., None] * e1[:, None, None] + cy[None, ..., None] * e2[:, None, None]
               + cz[None, ..., None] * u[:, None, None])  # (d, C, A, 3) xyz
        samples = _sample(search.padded, pts)  # (d, C, A)
        power = torch.fft.fft(samples, dim=-1).abs() ** 2
        power = (power * rr[None, :, None]).sum(1)  # (d, A)
        total = (power * nonzero).sum(-1, keepdim=True).clamp_min(1e-30)
        out.append(power @ select / total)
    return torch.cat(out)


# ----------------------------------------------------------------------------- search steps


def _distinct_maxima(scores: Tensor, directions: Tensor, count: int,
                     min_angle_deg: float) -> list[Tensor]:
    """The ``count`` best directions at least ``min_angle_deg`` apart (as axes)."""
    cos_min = math.cos(math.radians(min_angle_deg))
    picked: list[Tensor] = []
    for i in torch.argsort(scores, descending=True).tolist():
        u = directions[i]
        if all(abs(float(u @ p)) < cos_min for p in picked):
            picked.append(u)
            if len(picked) == count:
                break
    return picked


def _conjugate(group: Tensor, frame: Tensor) -> Tensor:
    """``M g Mᵀ`` for every ``g``, `(G, 3, 3)`."""
    return frame @ group @ frame.T


def _refine_frame(search: SearchMap, group: Tensor, frame: Tensor,
                  *, steps_deg: tuple[float, ...]) -> tuple[Tensor, float]:
    """Pattern search of the group score over ``M ← exp([ω]×) M``, six moves per step."""
    best = group_score(search, _conjugate(group, frame))
    if group.shape[0] <= 1:
        return frame, best
    for step in steps_deg:
        moves = torch.cat([torch.eye(3), -torch.eye(3)]).double() * math.radians(step)  # (6, 3)
        for _ in range(10):
            cands = so3_exp(moves) @ frame  # (6, 3, 3)
            conj = cands[:, None] @ group[None, 1:] @ cands[:, None].transpose(-1, -2)
            sc = symmetry_correlations(search, conj.reshape(-1, 3, 3)).reshape(6, -1).mean(-1)
            i = int(sc.argmax())
            if float(sc[i]) <= best:
                break
            best, frame = float(sc[i]), cands[i]
    return frame, best


def _principal(symbol: str) -> tuple[Tensor, float]:
    """The principal axis of a conventional group `(3,)` and the period of the scan about it
    (rad): the angle about the axis that maps the group onto itself (0: no scan)."""
    g = parse_point_group(symbol)
    z = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    if g.kind == "C":
        return z, 0.0
    if g.kind == "D":
        return z, math.pi / g.n
    if g.kind == "T":
        return z, 2 * math.pi / 3
    if g.kind == "O":
        return z, math.pi / 2
    return icosahedral_five_fold(g.setting), 2 * math.pi / 5


def _fit_group(search: SearchMap, symbol: str, axes: list[Tensor], *, scan_step_deg: float,
               refine_above: float) -> GroupFit:
    """Place ``symbol`` with its principal axis on each candidate axis, scan the angle about
    it (scoring up to 4 elements off that axis), refine the best frame with the whole group
    when its score reaches ``refine_above``."""
    group = point_group_rotations(symbol)
    a_conv, period = _principal(symbol)
    off_axis = (group @ a_conv - a_conv).norm(dim=-1) > 1e-6  # (G,): moves the principal axis
    probe = torch.cat([group[:1], group[off_axis][:4]]) if period else group
    frames = []
    for u in axes:
        base = _rotation_taking(a_conv, u.double())  # C0 a_conv = u
        n_psi = max(1, int(round(math.degrees(period) / scan_step_deg))) if period else 1
        frames += [base @ axis_rotation(a_conv, period * k / n_psi) for k in range(n_psi)]
    conj = torch.stack([_conjugate(probe, fr)[1:] for fr in frames])  # (F, p, 3, 3)
    scan = symmetry_correlations(search, conj.reshape(-1, 3, 3)).reshape(len(frames), -1)
    frame = frames[int(scan.mean(-1).argmax())]
    score = group_score(search, _conjugate(group, frame))
    if score >= refine_above:
        frame, score = _refine_frame(search, group, frame, steps_deg=(2.0, 0.5))
    g = parse_point_group(symbol)
    return GroupFit(group=g.symbol, order=g.order, score=score, frame=frame.double())


def rank_groups(fits: list[GroupFit], threshold: float) -> tuple[tuple[GroupFit, ...], float]:
    """Rank: the groups scoring ``≥ threshold`` by order (largest first; ties by score), then
    the others by score. Returns the ranking and the gap (the first's score minus the best
    rejected score; 1.0 when none is rejected)."""
    accepted = sorted((f for f in fits if f.score >= threshold),
                      key=lambda f: (-f.order, -f.score))
    rejected = sorted((f for f in fits if f.score < threshold), key=lambda f: -f.score)
    ranked = tuple(accepted + rejected)
    gap = ranked[0].score - rejected[0].score if rejected else 1.0
    return ranked, gap


def _candidate_axes(search: SearchMap, orders: list[int], directions: int,
                    axes_per_order: int) -> dict[int, list[Tensor]]:
    """The ``axes_per_order`` best distinct (15° apart) axes of each order `(3,)`, from
    :func:`cyclic_power_scores` on ``directions`` hemisphere directions."""
    dirs = hemisphere_directions(directions, dtype=search.small.dtype)
    power = cyclic_power_scores(search, dirs, orders, azimuths=max(64, 4 * max(orders) + 4))
    return {n: _distinct_maxima(power[:, j], dirs, axes_per_order, 15.0)
            for j, n in enumerate(orders)}


def place_group(volume: Tensor, group: str, *, box_px: int = 32, threshold: float = 0.7,
                directions: int = 1000, axes_per_order: int = 2) -> SymmetrySearch:
    """Place the given ``group`` on ``volume``: its frame ``M``, centre ``c`` and score.

    The steps of :func:`detect_symmetry` for one group: the candidate axes of its principal
    order only, the scan about each and the refinement (whatever the score). Returns a
    :class:`SymmetrySearch` with that one fit (``chosen``) and its ``centre_px``; ``gap`` is
    its score minus ``threshold`` (negative: the map does not look ``group``-symmetric).
    ``C1``: the identity about the centre of mass, score 1. Every icosahedral setting
    (I1–I4) is placed about its own five-fold. Raises :class:`~cryospin.errors.InputError`
    for an unknown symbol.
    """
    search = prepare_search_map(volume, box_px)
    g = parse_point_group(group)
    if g.order == 1:
        fit = GroupFit(g.symbol, 1, 1.0, torch.eye(3, dtype=torch.float64))
    else:
        axes = _candidate_axes(search, [g.n], directions, axes_per_order)[g.n]
        fit = _fit_group(search, g.symbol, axes, scan_step_deg=3.0, refine_above=-1.0)
    return SymmetrySearch(fits=(fit,), centre_px=search.centre_px, threshold=threshold,
                          gap=fit.score - threshold)


def detect_symmetry(volume: Tensor, *, max_order: int = 12, box_px: int = 32,
                    threshold: float = 0.7, directions: int = 1000,
                    axes_per_order: int = 2) -> SymmetrySearch:
    """Score C1, Cn and Dn (n = 2 … ``max_order``), T, O and I on ``volume`` and rank them.

    Parameters
    ----------
    volume : `(L, L, L)`
        The map; its dtype is used throughout (float32 is enough; float64 for tests).
    max_order : int
        Largest ``n`` of Cn and Dn.
    box_px : int
        Search box (:func:`prepare_search_map`).
    threshold : float
        Score a group needs to be chosen (:func:`rank_groups`).
    directions : int
        Hemisphere directions of the axis search (spacing ≈ √(2π / directions) rad).
    axes_per_order : int
        Distinct best axes of each order tried as principal axes.
    """
    search = prepare_search_map(volume, box_px)
    orders = list(range(2, max_order + 1))
    axes = _candidate_axes(search, orders, directions, axes_per_order)
    fits = [GroupFit("C1", 1, 1.0, torch.eye(3, dtype=torch.float64))]
    symbols = [(f"{k}{n}", n) for n in orders for k in "CD"]
    symbols += [(s, n) for s, n in (("T", 3), ("O", 4), ("I", 5)) if n in axes]
    for symbol, n in symbols:
        fits.append(_fit_group(search, symbol, axes[n], scan_step_deg=3.0,
                               refine_above=threshold - 0.2))
    ranked, gap = rank_groups(fits, threshold)
    return SymmetrySearch(fits=ranked, centre_px=search.centre_px, threshold=threshold, gap=gap)


# ----------------------------------------------------------------------------- outputs


def map_in_group_frame(volume: Tensor, frame: Tensor, centre_px: Tensor) -> Tensor:
    """``W(r) = V(M r + c)``: the map in the conventional frame of its group, `(L, L, L)`.

    Trilinear resampling of the 2× Fourier-padded map (of the map itself when ``2L`` exceeds
    256); zero outside the box. ``frame`` ``M`` `(3, 3)`, ``centre_px`` ``c`` `(3,)` xyz in
    pixels from ``L//2``; dtype of ``volume``.
    """
    L = volume.shape[-1]
    M = frame.to(volume.dtype)
    t = -(M.T @ centre_px.to(volume.dtype))  # transform_map: out(r) = V(Qᵀ (r − t)), Q = Mᵀ
    if 2 * L <= _MAX_OVERSAMPLED_BOX:
        return transform_map(fourier_pad_3d(volume, 2 * L), M.T, t, output_box_px=L,
                             input_scale=2.0)
    return transform_map(volume, M.T, t)


def poses_in_group_frame(rotations: Tensor, shifts_px: Tensor, frame: Tensor,
                         centre_px: Tensor) -> tuple[Tensor, Tensor]:
    """Poses of ``W(r) = V(M r + c)`` that give the images that ``V`` gives with ``(R, t)``.

    ``∫ V(Rᵀ r) dz = ∫ W((R M)ᵀ (r − R c)) dz``, so ``R' = R M`` and, with
    ``image(r) = P(r − t)``, ``t' = t + (R c)_xy``.

    Parameters
    ----------
    rotations : `(N, 3, 3)`
    shifts_px : `(N, 2)`
        ``(tx, ty)`` pixels.
    frame : `(3, 3)`
        ``M``.
    centre_px : `(3,)`
        ``c`` (xyz pixels, same box as the shifts).

    Returns
    -------
    rotations : `(N, 3, 3)`, shifts_px : `(N, 2)`, dtypes of the inputs
    """
    M = frame.to(rotations.dtype)
    rc = rotations @ centre_px.to(rotations.dtype)  # (N, 3)
    return rotations @ M, shifts_px + rc[:, :2].to(shifts_px.dtype)
