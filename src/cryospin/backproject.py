"""Known-pose reconstruction by Hartley-space backprojection with CTF (Wiener) correction.

Model (``docs/conventions.md``): an observed image is ``image = shift_t(CTF · P_R) + noise``, and
by the Fourier (and Hartley) slice theorem the Hartley transform of ``P_R`` is the central slice
of the Hartley volume ``H = hartley3(V)`` at ``(kx, ky, 0) @ R``. Streaming over the particles,

    numerator   N = Σ_i insert(CTF_i · shift_{−t_i}(hartley2(image_i)), R_i)
    denominator D = Σ_i insert(CTF_i², R_i)

with ``insert`` = :func:`~cryospin.forward.slicing.insert_central_slices` (the exact adjoint of
trilinear slice extraction; without CTF, ``CTF ≡ 1``), and

    H_est(k) = N(k) / (D(k) + λ(k)),     V_est = ihartley3(H_est),

zero beyond ``|k| > L//2``. With a point group ``G`` (``symmetry``, :mod:`cryospin.symmetry`)
each image is inserted at every symmetry-related pose ``R_i g``, ``g ∈ G`` (poses ``R`` and
``R g`` give the same image of a map with ``V(g r) = V(r)``):

    N = Σ_i Σ_g insert(CTF_i · shift_{−t_i}(hartley2(image_i)), R_i g),  D likewise,

the transforms and the CTF of an image computed once for its ``|G|`` insertions. This equals
backprojecting the symmetry-expanded particle set (each image ``|G|`` times, poses ``R_i g``)
to rounding. Averaging the C1 sums over ``G`` instead would be the same only for rotations that
map the voxel grid onto itself (trilinear insertion at ``gᵀ q`` is not the grid resampled by
``g``), and those are used so: for a signed permutation matrix ``p`` the trilinear weights
satisfy ``w(m − pᵀ q) = w(p m − q)``, so the insertion at ``R h p`` is the insertion at
``R h`` read at ``p m``. With ``G = {h p}``, ``P`` the signed permutations of ``G``
(:func:`cryospin.symmetry.grid_cosets`), each image is inserted ``|G| / |P|`` times, at
``R_i h``, into a grid that also holds ``k = +L/2`` (the mirror of ``−L/2``; ``(L+1)³`` for even
``L``), and the sums are folded once, ``N(m) = Σ_p N_H(p m)``: exact, and O costs one insertion,
I2 five, D7 seven, C4 one.

A cheaper, inexact way (``symmetrize="resample"``): insert each image once, at ``R_i``, and
average the four C1 sums over the group afterwards, ``N(m) = Σ_g N_1(g m)``
(:func:`cryospin.forward.symmetrize.symmetrize_volume` times ``|G|``: the ``|P|`` elements
exactly, the others by trilinear resampling of the sums). One insertion whatever the group,
and equal to the above for groups whose elements all map the grid onto itself (C2, C4, D2,
O); for the others the rotated copies are interpolated twice (inserted, then resampled), a
smoothing the exact sums do not have. Measured on the D7 ring (20,000 images at 64 px, the
poses of a ``--symmetry D7`` run, two threads; ``benchmarks/bench_symmetrize.py``): 10.3 s
against 53.1 s, FSC 0.5 against the true map 8.21 Å against 8.28 Å, the two maps' FSC ≥ 0.99
to shell 22 of 32 and ≥ 0.9 to Nyquist. Training uses it for the volume re-made after the search
(:mod:`cryospin.train.rebackproject`), an intermediate map; the final map and ``cryospin
backproject`` insert.

The Wiener term ``λ``:

* constant: ``λ = reg · mean(D)`` over the ball ``|k| ≤ L//2`` (scale-free version of cryoDRGN's
  ``--reg``; ``reg`` = 1e-3 by default);
* FSC-based (default, ``wiener=True``; RELION's τ² estimate): reconstruct the two half sets
  with the constant ``λ``, compute their FSC per shell ``s``, set
  ``SNR_half(s) = FSC / (1 − FSC)`` and ``SNR_full = 2 · SNR_half``, and reconstruct again with
  ``λ(s) = mean_shell(D) / SNR(s)`` (the Wiener filter ``σ²/τ²`` for data whose per-voxel SNR is
  ``D τ² / σ²``), never below the constant ``λ``.

A low-pass map (``radius_px``): only the shells ``round(|k|) <= radius_px`` are made, zero
beyond, and only the image frequencies whose trilinear insertion reaches them (``|k| <=
radius_px + 0.5 + √3``, :func:`inserted_frequencies`) are inserted, their CTF evaluated there
only: the sums are exact on those shells, the constant ``λ`` is the mean over that smaller
ball. Training re-makes the frequencies a search epoch reads so (18 cycles/box: at 128 px
8 % of the image frequencies inserted, 10.6 s against 47.2 s for 20,000 images on two threads;
:mod:`cryospin.train.rebackproject`).

Half sets come from ``rlnRandomSubset`` (values 1/2) when available, otherwise from a seeded
random split; the returned FSC is between the two returned half maps.

Memory does not grow with the number of particles: the four sums (``L³`` each, in ``dtype``);
while accumulating, one ``(2, b, L, L)`` buffer per half set of a batch (``b ≤ batch_size``),
the transforms of 32 images at a time, and inside ``insert_central_slices`` an output of 2
volumes and a grid of 1.5 (its kernel; the float64 scatter on the CPU: a few MB); while
solving, about six more volumes (three maps, one Hartley volume, a half-size complex FFT). At
256 px in float64 (134 MB a volume) the peak resident memory measured 1.7 GB for 5 particles
and 1.9 GB for 512 (default batch size; the images in memory); float32 1.4 GB.
With a symmetry whose grid-preserving part is more than the identity, the sums are
``(L+1)³`` until the fold, which adds one ``L³`` volume at a time.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from cryospin.errors import InputError
from cryospin.evaluate.fsc import FSCResult
from cryospin.forward.ctf import CTFParams, compute_ctf
from cryospin.forward.hartley import hartley2
from cryospin.forward.lattice import frequency_grid_2d
from cryospin.forward.shifts import shift_hartley_grid
from cryospin.forward.slicing import insert_central_slices
from cryospin.forward.symmetrize import symmetrize_volume
from cryospin.half_sets import half_set_assignment
from cryospin.preprocess import PreprocessedParticles
from cryospin.symmetry import grid_cosets, point_group_rotations

if TYPE_CHECKING:  # annotations only: importing cryospin.io loads every reader
    from cryospin.io.particle_set import ParticleSet

__all__ = [
    "BackprojectionResult",
    "BackprojectionSums",
    "ImageReader",
    "Images",
    "accumulate_backprojection",
    "reconstruct_from_sums",
    "backproject",
    "backprojection_dtype",
    "backproject_particles",
    "insert_radius_px",
    "inserted_frequencies",
]



@dataclass(frozen=True)
class BackprojectionSums:
    """Accumulated numerators and denominators of the two half sets, `(L, L, L)` each (Hartley)."""

    numerator_a: Tensor
    denominator_a: Tensor
    numerator_b: Tensor
    denominator_b: Tensor

    @property
    def box_px(self) -> int:
        """Box size ``L``."""
        return int(self.numerator_a.shape[-1])


@dataclass(frozen=True)
class BackprojectionResult:
    """Reconstruction from known poses.

    Attributes
    ----------
    volume, half_a, half_b : `(L, L, L)`
        Real-space maps ``[z, y, x]`` (full set and the two half sets).
    fsc : FSCResult
        FSC between ``half_a`` and ``half_b``.
    half_set : `(N,)` int numpy array
        1 or 2: the half set of each particle.
    """

    volume: Tensor
    half_a: Tensor
    half_b: Tensor
    fsc: FSCResult
    half_set: np.ndarray


class ImageReader(Protocol):
    """Images read by index: any :class:`cryospin.sources.ImageSource` (a
    :class:`~cryospin.io.particle_set.ParticleSet`, a
    :class:`~cryospin.preprocess.PreprocessedParticles` view) or a lighter stand-in."""

    def images(self, indices: Tensor) -> Tensor:
        """Images `(n, L, L)` of the particles ``indices`` `(n,)` int64, ``[y, x]``."""
        ...


#: What the backprojection reads images from: `(N, L, L)` tensor or array, or a reader.
Images = Tensor | np.ndarray | ImageReader
#: How a symmetric backprojection averages over the group (module docstring).
Symmetrize = Literal["insert", "resample"]


def _image_getter(images: Images) -> Callable[[np.ndarray], Tensor]:
    if isinstance(images, Tensor):
        return lambda idx: images[torch.from_numpy(idx).to(images.device)]
    if isinstance(images, np.ndarray):
        return lambda idx: torch.from_numpy(np.asarray(images[idx]))
    if hasattr(images, "images"):
        return lambda idx: images.images(torch.from_numpy(idx))
    raise TypeError(f"images must be a tensor, an array or have .images(), got {type(images)}")


def accumulate_backprojection(
    images: Images,
    rotations: Tensor,
    shifts_px: Tensor | None = None,
    ctf: Tensor | CTFParams | None = None,
    *,
    half_set: np.ndarray,
    box_px: int,
    pixel_size_angstrom: float | None = None,
    batch_size: int = 256,
    dtype: torch.dtype = torch.float64,
    progress: bool = False,
    on_batch: Callable[[int], None] | None = None,
    symmetry: Tensor | None = None,
    symmetrize: Symmetrize = "insert",
    radius_px: float | None = None,
) -> BackprojectionSums:
    """Stream over the particles in batches and accumulate ``N`` and ``D`` for each half set.

    Parameters
    ----------
    images : `(N, L, L)` tensor/array, or an object with ``.images(indices) -> (n, L, L)``
        (e.g. a :class:`~cryospin.io.particles.ParticleSet`); images ``[y, x]``.
    rotations : `(N, 3, 3)`
        Poses (left-multiply xyz columns; slice samples the volume at ``k @ R``).
    shifts_px : `(N, 2)`, optional
        ``(tx, ty)`` px with ``image(r) = P(r − t)``; undone before insertion.
    ctf : `(N, L, L)` tensor or CTFParams, optional
        CTF on the centred grid, or its parameters (then ``pixel_size_angstrom`` is required).
    half_set : `(N,)` ints in {1, 2}
    box_px : int
    batch_size : int
        Images per batch (memory is ``O(batch_size · L²)`` besides the four volumes).
    dtype : torch.dtype
        Computation and accumulation dtype.
    progress : bool
        A tqdm bar over the batches.
    on_batch : callable, optional
        Called after each batch with its number of images.
    symmetry : `(G, 3, 3)`, optional
        Rotations of the particle's point group (:func:`cryospin.symmetry.point_group_rotations`):
        the sums of the insertions at ``R g`` for every ``g`` (None: once, at ``R``), computed
        with ``|G| / |P|`` insertions and a fold over ``P`` (module docstring).
    symmetrize : "insert" or "resample"
        With ``symmetry``: those sums (``insert``), or the C1 sums averaged over the group by
        resampling (``resample``; inexact, one insertion per image: module docstring).
    radius_px : float, optional
        The sums are needed only on the shells ``round(|k|) <= radius_px`` (cycles per box):
        only the image frequencies that reach those voxels, ``|k| <= radius_px + 0.5 + √3``
        (:func:`insert_radius_px`), are inserted, so the sums are exact there and partial
        beyond (reconstruct with the same ``radius_px``). None: every frequency.

    Returns
    -------
    BackprojectionSums
    """
    L = int(box_px)
    n = int(rotations.shape[0])
    if rotations.shape != (n, 3, 3):
        raise ValueError(f"rotations must be (N, 3, 3), got {tuple(rotations.shape)}")
    if shifts_px is not None and tuple(shifts_px.shape) != (n, 2):
        raise ValueError(f"shifts_px must be ({n}, 2), got {tuple(shifts_px.shape)}")
    if isinstance(ctf, CTFParams) and pixel_size_angstrom is None:
        raise ValueError("CTF parameters need pixel_size_angstrom")
    if symmetrize not in ("insert", "resample"):
        raise ValueError(f"symmetrize must be 'insert' or 'resample', got {symmetrize!r}")
    get = _image_getter(images)
    device = rotations.device
    cosets, perms = (None, None) if symmetry is None else grid_cosets(
        symmetry.detach().to(device="cpu", dtype=torch.float64))  # (G/|P|, 3, 3), (|P|, 3, 3)
    if symmetrize == "resample" and cosets is not None and perms is not None:
        plain = accumulate_backprojection(
            images, rotations, shifts_px, ctf, half_set=half_set, box_px=box_px,
            pixel_size_angstrom=pixel_size_angstrom, batch_size=batch_size, dtype=dtype,
            progress=progress, on_batch=on_batch,
            # resampling reads the C1 sums up to √3 beyond a voxel at |k| < radius + 0.5:
            # shells round(|k|) <= radius + 2
            radius_px=None if radius_px is None else radius_px + 2)
        order = cosets.shape[0] * perms.shape[0]
        c1 = [plain.numerator_a, plain.denominator_a, plain.numerator_b, plain.denominator_b]
        del plain  # one extra volume at a time
        return BackprojectionSums(*[order * symmetrize_volume(c1.pop(0), cosets, perms)
                                    for _ in range(4)])
    # with grid permutations to fold: a grid holding the mirror p m of every voxel m
    fold = perms is not None and perms.shape[0] > 1
    box = L + 1 if fold and L % 2 == 0 else L  # k = −L/2 … L/2 (even L); centre index L//2
    # the inserted frequencies (P, 2) and their indices `keep` (P,) in the L² grid; None:
    # all, and without a larger box the images' own grid
    keep, freqs = (None, None) if radius_px is None else inserted_frequencies(
        L, radius_px, dtype=dtype, device=device)
    if freqs is None and box != L:
        freqs = frequency_grid_2d(L, dtype=dtype, device=device).reshape(L * L, 2)
    P = L * L if keep is None else int(keep.numel())
    sums = [torch.zeros(box, box, box, dtype=dtype, device=device) for _ in range(4)]
    half_set = np.asarray(half_set)
    starts = range(0, n, batch_size)
    if progress:
        starts = tqdm(starts, desc="backproject", unit="batch")
    for start in starts:
        idx = np.arange(start, min(n, start + batch_size))
        for which, (acc_num, acc_den) in ((1, (0, 1)), (2, (2, 3))):
            sel = idx[half_set[idx] == which]
            if sel.size == 0:
                continue
            # (CTF · image, CTF²) of the half's images, filled _PREP_CHUNK images at a time so
            # that the transforms' and the CTF's temporaries stay small whatever batch_size
            values = torch.empty(2, sel.size, P, dtype=dtype, device=device)
            for j in range(0, sel.size, _PREP_CHUNK):
                part = sel[j : j + _PREP_CHUNK]
                _weighted_slices(get(part), part, shifts_px, ctf, L, pixel_size_angstrom,
                                 out=values[:, j : j + part.size], keep=keep, freqs=freqs)
            rot = rotations[sel].to(dtype)  # (b, 3, 3)
            slices = values if freqs is not None else values.reshape(2, sel.size, L, L)
            for h in [None] if cosets is None else cosets.to(device=device, dtype=dtype):
                both = insert_central_slices(slices, rot if h is None else rot @ h, box,
                                             frequencies=freqs, channels=True)  # (2, box³)
                sums[acc_num] += both[0]
                sums[acc_den] += both[1]
                del both
            del values, slices
        if on_batch is not None:
            on_batch(len(idx))
    if fold:
        assert perms is not None
        sums = [_fold_grid(sums.pop(0), perms, L) for _ in range(4)]  # one extra volume at a time
    return BackprojectionSums(*sums)


def _fold_grid(volume: Tensor, perms: Tensor, L: int) -> Tensor:
    """``Σ_p V(p m)`` on the centred ``L³`` grid, `(L, L, L)` ``[z, y, x]``.

    ``volume`` `(M, M, M)` holds ``V`` at ``k = −L//2 … M − 1 − L//2`` on each axis, ``M`` = L
    (odd L) or L + 1 (even L), so that it holds ``p m`` for every ``m`` of the ``L`` grid;
    ``perms`` `(P, 3, 3)` are signed permutation matrices (exact 0, ±1). Gathers only: the sum
    is exact up to the additions' rounding.
    """
    c = L // 2
    m = torch.arange(L, device=volume.device) - c  # (L,) coordinates of the L grid
    out = torch.zeros(L, L, L, dtype=volume.dtype, device=volume.device)
    for p in perms.tolist():
        index = []
        for i in range(3):  # component i of p m is s · m_j: the index of volume's axis 2 − i
            j = next(col for col in range(3) if p[i][col] != 0)
            shape = [1, 1, 1]
            shape[2 - j] = L  # laid out along the output's axis of m_j
            index.append((int(p[i][j]) * m + c).reshape(shape))
        out += volume[index[2], index[1], index[0]]
    return out


#: images whose transforms and CTF are computed together inside a batch
_PREP_CHUNK = 32


def insert_radius_px(radius_px: float) -> float:
    """The largest image frequency (cycles per box) whose trilinear insertion reaches a voxel
    of shell ``round(|k|) <= radius_px``: ``radius_px + 0.5 + √3`` (a shell's voxels lie
    within ``|k| < radius_px + 0.5``; a sample spreads onto the 8 voxels of its unit cube, at
    most ``√3`` away)."""
    return float(radius_px) + 0.5 + math.sqrt(3.0)


def inserted_frequencies(box_px: int, radius_px: float, *, dtype: torch.dtype = torch.float64,
                         device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """The image frequencies a low-pass backprojection to the shells ``round(|k|) <=
    radius_px`` inserts, ``|k| <= insert_radius_px(radius_px)``: their indices `(P,)` int64 in
    the centred ``L × L`` grid (row-major) and the frequencies `(P, 2)` ``(kx, ky)`` in cycles
    per box."""
    L = int(box_px)
    grid = frequency_grid_2d(L, dtype=dtype, device=device).reshape(L * L, 2)
    keep = torch.nonzero(grid.square().sum(-1) <= insert_radius_px(radius_px) ** 2).squeeze(1)
    return keep, grid[keep]


def _weighted_slices(
    imgs: Tensor, idx: np.ndarray, shifts_px: Tensor | None, ctf: Tensor | CTFParams | None,
    L: int, pixel_size_angstrom: float | None, *, out: Tensor, keep: Tensor | None = None,
    freqs: Tensor | None = None,
) -> None:
    """Write ``CTF · shift_{−t}(hartley2(image))`` and ``CTF²`` of the images at rows ``idx``
    into ``out`` `(2, b, P)` (``CTF ≡ 1`` without a CTF): at the centred grid's ``P = L²``
    frequencies, or with ``keep`` `(P,)` (indices in that grid) at those only, whose
    frequencies are ``freqs`` `(P, 2)` (cycles per box; the CTF is evaluated there only)."""
    dtype, device = out.dtype, out.device
    imgs = imgs.to(device=device, dtype=dtype)  # (b, L, L)
    if imgs.shape[-2:] != (L, L):
        raise InputError(f"images are {tuple(imgs.shape[-2:])} px, expected ({L}, {L})")
    h = hartley2(imgs)  # (b, L, L)
    del imgs
    if shifts_px is not None:
        h = shift_hartley_grid(h, -shifts_px[idx].to(device=device, dtype=dtype))
    h = h.reshape(h.shape[0], L * L)
    if keep is not None:
        h = h[:, keep]  # (b, P)
    if ctf is None:
        out[0] = h
        out[1] = 1
        return
    if isinstance(ctf, CTFParams):
        assert pixel_size_angstrom is not None  # accumulate_backprojection checked it
        params = ctf[torch.from_numpy(idx)].to(device=device, dtype=dtype)
        c = compute_ctf(params, L, float(pixel_size_angstrom),
                        frequencies=freqs if keep is not None else None)  # (b, P) or (b, L, L)
        c = c.reshape(c.shape[0], -1)
    else:
        c = ctf[torch.from_numpy(idx).to(ctf.device)].to(device=device, dtype=dtype)
        c = c.reshape(c.shape[0], L * L)
        if keep is not None:
            c = c[:, keep]
    torch.mul(c, h, out=out[0])
    torch.mul(c, c, out=out[1])


def _shells_centred(L: int, device: torch.device) -> Tensor:
    """Shell index ``round(|k|)`` on the centred grid, clamped at ``L//2 + 1`` (every voxel
    beyond the ball ``|k| ≤ L//2`` gets that one value), `(L, L, L)` int32.

    ``|k|²`` is an exact integer; ``round(sqrt(.))`` of it is exact in float32 too (no integer
    lies within 5e-4 of a half-integer's square root for ``L ≤ 4096``)."""
    k2 = (torch.arange(L, device=device, dtype=torch.int32) - L // 2) ** 2  # (L,)
    r2 = k2[:, None, None] + k2[None, :, None] + k2[None, None, :]  # (L, L, L) int32
    shells = r2.to(torch.float32).sqrt_().round_()
    del r2
    return shells.clamp_(max=L // 2 + 1).to(torch.int32)


def _shell_sums(values: Tensor, shells: Tensor, n_shells: int) -> Tensor:
    """Per-shell sums of ``values`` `(L, L, L)` over shells ``0 … n_shells − 1``, returned as
    float64 (summed in ``values``' dtype: no float64 copy of a float32 volume)."""
    total = torch.zeros(n_shells + 1, dtype=values.dtype, device=values.device)
    total.index_add_(0, shells.reshape(-1), values.reshape(-1))
    return total[:n_shells].to(torch.float64)


def _hartley_fsc(h_a: Tensor, h_b: Tensor, shells: Tensor, n_shells: int) -> Tensor:
    """FSC per shell `(n_shells,)` float64 from the half maps' centred Hartley transforms.

    For real maps, ``Re(F_a F_b*)`` at ``k`` and ``−k`` sum to ``H_a H_b`` at ``k`` and ``−k``
    (and ``|F|²`` to ``H²``); shells are closed under ``k → −k``, so the shell sums of
    ``H_a H_b``, ``H_a²``, ``H_b²`` are those of the Fourier FSC of the real-space maps
    (:func:`cryospin.evaluate.fsc.fsc`, to rounding), with no transform and no complex volume.
    """
    cross = _shell_sums(h_a * h_b, shells, n_shells)
    pa = _shell_sums(h_a * h_a, shells, n_shells)
    pb = _shell_sums(h_b * h_b, shells, n_shells)
    denom = torch.sqrt(pa * pb)
    return torch.where(denom > 0, cross / torch.where(denom > 0, denom, 1), 0)


def _wiener_hartley(num: Tensor, den: Tensor, lam: Tensor, shells: Tensor) -> Tensor:
    """``num / (den + lam)``, zero beyond the ball, as one new volume; ``lam`` is a scalar or
    one value per shell `(n_shells,)` (``shells`` as :func:`_shells_centred`)."""
    n_shells = int(shells.shape[-1]) // 2 + 1
    if lam.dim() == 0:
        h = den + lam
    else:
        per_shell = torch.cat([lam, lam[-1:]]).to(den.dtype)  # beyond the ball: unused
        h = per_shell[shells].add_(den)  # (L, L, L)
    torch.div(num, h, out=h)
    return h.masked_fill_(shells == n_shells, 0)


def _to_real_space(h: Tensor) -> Tensor:
    """:func:`~cryospin.forward.hartley.ihartley3` of ``h`` `(L, L, L)` by a real FFT.

    ``rfftn`` gives ``F`` at ``kx ≥ 0`` (half a complex volume; ``fftn`` of a real volume
    holds two complex volumes and is ~4x slower); ``H = Re F − Im F`` there, and at
    ``kx < 0`` ``F(k) = conj F(−k)`` gives ``H(k) = Re F(−k) + Im F(−k)``. ``h`` is consumed
    (its storage is released): do not use it afterwards.
    """
    L = int(h.shape[-1])
    x = torch.fft.ifftshift(h)  # origin at index 0
    # release h's storage now; the caller holds only a dead reference (set_() without a source
    # is not in torch's stubs)
    h.set_()  # type: ignore[call-overload]
    R = torch.fft.rfftn(x)  # (L, L, L//2 + 1) complex: kx = 0 … L//2
    del x
    m = L // 2 + 1
    out = torch.empty(L, L, L, dtype=R.real.dtype, device=R.device)
    torch.sub(R.real, R.imag, out=out[..., :m])
    # kx index c = m … L−1 is −(L − c) with L − c = L − m … 1: columns L − m … 1 of R, at −kz, −ky
    part = R[..., 1:L - m + 1]
    part = (part.real + part.imag).flip(-1)  # (L, L, L − m)
    del R
    part = torch.roll(part.flip(0, 1), shifts=(1, 1), dims=(0, 1))  # index a -> (−a) mod L
    out[..., m:] = part
    del part
    out = torch.fft.fftshift(out)
    return out.div_(out.numel())


def reconstruct_from_sums(
    sums: BackprojectionSums,
    *,
    reg: float = 1e-3,
    wiener: bool = True,
    pixel_size_angstrom: float | None = None,
    radius_px: float | None = None,
) -> tuple[Tensor, Tensor, Tensor, FSCResult]:
    """Maps from accumulated sums: ``(volume, half_a, half_b, fsc)`` (see the module docstring).

    With ``radius_px`` (cycles per box) the ball is the shells ``round(|k|) <= radius_px``
    instead of ``<= L//2``: the maps are zero beyond, the constant Wiener term is the mean
    of the denominators over that ball, and the FSC is zero on the shells outside it (sums
    accumulated with the same ``radius_px`` are exact on the ball).

    Memory: besides ``sums`` (four volumes) at most about six volumes of their dtype at a time
    (the three maps returned, one Hartley volume, a complex FFT) and an int32 shell index. The
    Wiener terms are kept per shell and the FSCs are computed in Hartley space
    (:func:`_hartley_fsc`), so neither needs a transform or a volume of its own.
    """
    L = sums.box_px
    device = sums.numerator_a.device
    n_shells = L // 2 + 1
    shells = _shells_centred(L, device)  # (L, L, L) int32; n_shells = beyond the ball
    if radius_px is not None and math.floor(radius_px) < n_shells - 1:
        shells.masked_fill_(shells > math.floor(radius_px), n_shells)
    counts = torch.bincount(shells.reshape(-1), minlength=n_shells + 1)[:n_shells]

    def const_lam(*dens: Tensor) -> Tensor:
        """``reg ·`` the mean over the ball of the sum of ``dens`` (a 0-d tensor)."""
        total = functools.reduce(operator.add, [_shell_sums(d, shells, n_shells) for d in dens])
        mean = total.sum() / counts.sum()
        dtype = dens[0].dtype
        return (reg * mean).to(dtype) if float(mean) > 0 else torch.ones((), dtype=dtype,
                                                                           device=device)

    den_a, den_b = sums.denominator_a, sums.denominator_b
    lam_a, lam_b, lam_full = const_lam(den_a), const_lam(den_b), const_lam(den_a, den_b)
    if wiener:  # half maps with the constant term, only for their FSC
        h_a = _wiener_hartley(sums.numerator_a, den_a, lam_a, shells)
        h_b = _wiener_hartley(sums.numerator_b, den_b, lam_b, shells)
        curve = _hartley_fsc(h_a, h_b, shells, n_shells).clamp(1e-6, 1 - 1e-6)
        del h_a, h_b
        snr_half = curve / (1 - curve)  # (n_shells,) float64

        def lam_of(snr: Tensor, floor: Tensor, *dens: Tensor) -> Tensor:
            """``mean_shell(D) / SNR`` per shell `(n_shells,)`, never below ``floor``."""
            mean = sum(_shell_sums(d, shells, n_shells) for d in dens) / counts.clamp_min(1)
            return (mean / snr).clamp_min(float(floor))

        lam_full = lam_of(2 * snr_half, lam_full, den_a, den_b)
        lam_a = lam_of(snr_half, lam_a, den_a)
        lam_b = lam_of(snr_half, lam_b, den_b)
    h = _wiener_hartley(sums.numerator_a + sums.numerator_b, den_a + den_b, lam_full, shells)
    volume = _to_real_space(h)
    h_a = _wiener_hartley(sums.numerator_a, den_a, lam_a, shells)
    h_b = _wiener_hartley(sums.numerator_b, den_b, lam_b, shells)
    values = _hartley_fsc(h_a, h_b, shells, n_shells)
    half_a = _to_real_space(h_a)
    half_b = _to_real_space(h_b)
    result = FSCResult(
        shells=np.arange(n_shells, dtype=np.float64),
        fsc=values.cpu().numpy(),
        voxel_counts=counts.cpu().numpy(),
        box_px=L,
        pixel_size_angstrom=None if pixel_size_angstrom is None else float(pixel_size_angstrom),
    )
    return volume, half_a, half_b, result


def backproject(
    images: Images,
    rotations: Tensor,
    shifts_px: Tensor | None = None,
    ctf: Tensor | CTFParams | None = None,
    *,
    box_px: int | None = None,
    pixel_size_angstrom: float | None = None,
    reg: float = 1e-3,
    wiener: bool = True,
    half_set: np.ndarray | None = None,
    seed: int = 0,
    batch_size: int = 256,
    dtype: torch.dtype = torch.float64,
    progress: bool = False,
    on_batch: Callable[[int], None] | None = None,
    symmetry: Tensor | None = None,
    symmetrize: Symmetrize = "insert",
    radius_px: float | None = None,
) -> BackprojectionResult:
    """Reconstruct a map and two half maps from images with known poses.

    Parameters
    ----------
    images : `(N, L, L)` tensor/array, or an object with ``.images(indices)``
        Particle images ``[y, x]``.
    rotations : `(N, 3, 3)`
        Poses in the cryospin convention.
    shifts_px : `(N, 2)`, optional
        ``(tx, ty)`` pixels, ``image(r) = P(r − t)``.
    ctf : `(N, L, L)` tensor or CTFParams, optional
        CTF on the centred grid or its parameters; None for no CTF correction.
    box_px : int, optional
        ``L``; default from ``images`` (needed when ``images`` is not an array).
    pixel_size_angstrom : float, optional
        Needed with CTFParams; also gives the FSC in Å.
    reg : float
        Constant Wiener term relative to the mean denominator (module docstring).
    wiener : bool
        Use the FSC-based (τ²) Wiener term.
    half_set : `(N,)` in {1, 2}, optional
        Half-set assignment; default a seeded random split (``seed``).
    batch_size : int
        Images per batch.
    dtype : torch.dtype
        Computation dtype (float64 by default; float32 halves memory).
    progress : bool
        A tqdm bar over the batches.
    on_batch : callable, optional
        Called after each batch of the accumulation with its number of images.
    symmetry : `(G, 3, 3)`, optional
        Point-group rotations: the symmetrised backprojection (module docstring).
    symmetrize : "insert" or "resample"
        How (:func:`accumulate_backprojection`).
    radius_px : float, optional
        A low-pass map: only the shells ``round(|k|) <= radius_px`` (cycles per box), zero
        beyond, and only the image frequencies that reach them inserted
        (:func:`accumulate_backprojection`, :func:`reconstruct_from_sums`); None: the whole
        ball ``|k| <= L//2``.

    Returns
    -------
    BackprojectionResult
    """
    rotations = torch.as_tensor(rotations)
    n = int(rotations.shape[0])
    if n < 2:
        raise InputError(f"need at least 2 particles to backproject, got {n}")
    if box_px is None:
        if hasattr(images, "box_px"):
            box_px = int(images.box_px)
        elif hasattr(images, "shape"):
            box_px = int(images.shape[-1])
        else:
            raise ValueError("box_px is required for this kind of image source")
    if half_set is None:
        half_set = half_set_assignment(n, seed=seed)
    half_set = np.asarray(half_set).astype(np.int64)
    if half_set.shape != (n,) or not set(np.unique(half_set).tolist()) <= {1, 2}:
        raise ValueError("half_set must be (N,) with values 1 and 2")
    shifts = None if shifts_px is None else torch.as_tensor(shifts_px).to(rotations.device)
    sums = accumulate_backprojection(
        images, rotations, shifts, ctf, half_set=half_set, box_px=box_px,
        pixel_size_angstrom=pixel_size_angstrom, batch_size=batch_size, dtype=dtype,
        progress=progress, on_batch=on_batch, symmetry=symmetry, symmetrize=symmetrize,
        radius_px=radius_px,
    )
    volume, half_a, half_b, curve = reconstruct_from_sums(
        sums, reg=reg, wiener=wiener, pixel_size_angstrom=pixel_size_angstrom,
        radius_px=radius_px,
    )
    return BackprojectionResult(volume, half_a, half_b, curve, half_set)


def backprojection_dtype(device: torch.device) -> torch.dtype:
    """float64, the accumulation dtype of backprojection, except on MPS (no float64 there)."""
    return torch.float32 if device.type == "mps" else torch.float64


def backproject_particles(
    particles: ParticleSet,
    *,
    device: torch.device | str = "cpu",
    use_ctf: bool = True,
    reg: float = 1e-3,
    wiener: bool = True,
    seed: int = 0,
    batch_size: int = 256,
    dtype: torch.dtype = torch.float64,
    progress: bool = False,
    box_px: int | None = None,
    invert_contrast: bool = False,
    symmetry: str = "C1",
    symmetrize: Symmetrize = "insert",
) -> BackprojectionResult:
    """:func:`backproject` for a :class:`~cryospin.io.particles.ParticleSet` with poses.

    Uses its rotations, shifts, CTF parameters (unless ``use_ctf`` is false or it has none),
    pixel size and ``rlnRandomSubset`` half sets (when present; otherwise a seeded split).
    ``box_px`` Fourier-crops the images to that box as they are read
    (:class:`cryospin.preprocess.PreprocessedParticles`: the maps are ``box_px``³ at the
    pixel size ``pixel_size · L / box_px``; shifts are scaled to the new pixels).
    ``invert_contrast`` reconstructs ``−image``: backprojection is linear, so the maps are
    negated (the FSC is unchanged). ``symmetry`` (a point-group symbol, :mod:`cryospin.symmetry`)
    inserts each image at its ``|G|`` symmetry-related poses; ``"C1"`` inserts it once;
    ``symmetrize="resample"`` inserts it once and averages the sums over the group
    (:func:`accumulate_backprojection`). The sums are computed on ``device`` (the images are
    read on the CPU and moved there); the maps are returned on the CPU.
    """
    if particles.rotations is None:
        raise InputError("the particles have no poses (give them with --poses)", particles.source)
    half = half_set_assignment(len(particles), random_subset=particles.random_subset, seed=seed)
    ctf = particles.ctf if use_ctf else None
    source = PreprocessedParticles.wrap(particles, box_px=box_px)
    group = point_group_rotations(symmetry)  # (G, 3, 3)
    shifts = particles.shifts_px
    if shifts is not None and source is not particles:
        shifts = shifts * (source.box_px / particles.box_px)  # in the cropped box's pixels
    dev = torch.device(device)
    result = backproject(
        source, particles.rotations.to(dev), None if shifts is None else shifts.to(dev), ctf,
        box_px=source.box_px, pixel_size_angstrom=source.pixel_size_angstrom, reg=reg,
        wiener=wiener, half_set=half, seed=seed, batch_size=batch_size, dtype=dtype,
        progress=progress, symmetry=group if group.shape[0] > 1 else None,
        symmetrize=symmetrize,
    )
    sign = -1.0 if invert_contrast else 1.0
    return dataclasses.replace(result, volume=sign * result.volume.cpu(),
                               half_a=sign * result.half_a.cpu(), half_b=sign * result.half_b.cpu())
