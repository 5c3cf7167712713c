"""Known-pose reconstruction by Hartley-space backprojection with CTF (Wiener) correction.

Model (``docs/conventions.md``): an observed image is ``image = shift_t(CTF · P_R) + noise``, and
by the Fourier (and Hartley) slice theorem the Hartley transform of ``P_R`` is the central slice
of the Hartley volume ``H = hartley3(V)`` at ``(kx, ky, 0) @ R``. Streaming over the particles,

    numerator   N = Σ_i insert(CTF_i · shift_{−t_i}(hartley2(image_i)), R_i)
    denominator D = Σ_i insert(CTF_i², R_i)

with ``insert`` = :func:`~cryospin.forward.slicing.insert_central_slices` (the exact adjoint of
trilinear slice extraction; without CTF, ``CTF ≡ 1``), and

    H_est(k) = N(k) / (D(k) + λ(k)),     V_est = ihartley3(H_est),

zero beyond ``|k| > L//2``. The Wiener term ``λ``:

* constant: ``λ = reg · mean(D)`` over the ball ``|k| ≤ L//2`` (scale-free version of cryoDRGN's
  ``--reg``; ``reg`` = 1e-3 by default);
* FSC-based (default, ``wiener=True``; RELION's τ² estimate): reconstruct the two half sets
  with the constant ``λ``, compute their FSC per shell ``s``, set
  ``SNR_half(s) = FSC / (1 − FSC)`` and ``SNR_full = 2 · SNR_half``, and reconstruct again with
  ``λ(s) = mean_shell(D) / SNR(s)`` (the Wiener filter ``σ²/τ²`` for data whose per-voxel SNR is
  ``D τ² / σ²``), never below the constant ``λ``.

Half sets come from ``rlnRandomSubset`` (values 1/2) when available, otherwise from a seeded
random split; the returned FSC is between the two returned half maps.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cryospin.errors import InputError
from cryospin.evaluate.fsc import FSCResult, fsc
from cryospin.forward.ctf import CTFParams, compute_ctf
from cryospin.forward.hartley import hartley2, ihartley3
from cryospin.forward.shifts import shift_hartley_grid
from cryospin.forward.slicing import insert_central_slices

__all__ = [
    "BackprojectionResult",
    "BackprojectionSums",
    "accumulate_backprojection",
    "reconstruct_from_sums",
    "half_set_assignment",
    "backproject",
    "backproject_particles",
]

log = logging.getLogger(__name__)


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


def half_set_assignment(
    n: int, *, random_subset: Any = None, seed: int = 0
) -> np.ndarray:
    """Half set (1 or 2) of each of ``n`` particles, `(n,)` int64.

    ``random_subset`` (e.g. ``rlnRandomSubset``) is used when given and it holds only 1s and
    2s with both present; otherwise a seeded random split into halves of sizes ``ceil(n/2)``
    and ``floor(n/2)``.
    """
    if random_subset is not None:
        rs = np.asarray(random_subset).astype(np.int64).reshape(-1)
        if rs.shape == (n,) and set(np.unique(rs).tolist()) == {1, 2}:
            return rs
        log.warning("random subsets are not a 1/2 split; using a random split (seed %d)", seed)
    perm = np.random.default_rng(seed).permutation(n)
    out = np.empty(n, dtype=np.int64)
    out[perm[: (n + 1) // 2]] = 1
    out[perm[(n + 1) // 2 :]] = 2
    return out


def _image_getter(images: Any) -> Callable[[np.ndarray], Tensor]:
    if isinstance(images, Tensor):
        return lambda idx: images[torch.from_numpy(idx).to(images.device)]
    if isinstance(images, np.ndarray):
        return lambda idx: torch.from_numpy(np.asarray(images[idx]))
    if hasattr(images, "images"):
        return lambda idx: images.images(idx)
    raise TypeError(f"images must be a tensor, an array or have .images(), got {type(images)}")


def accumulate_backprojection(
    images: Any,
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
    get = _image_getter(images)
    device = rotations.device
    sums = [torch.zeros(L, L, L, dtype=dtype, device=device) for _ in range(4)]
    half_set = np.asarray(half_set)
    starts = range(0, n, batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="backproject", unit="batch")
    for start in starts:
        idx = np.arange(start, min(n, start + batch_size))
        imgs = get(idx).to(device=device, dtype=dtype)  # (b, L, L)
        if imgs.shape[-2:] != (L, L):
            raise InputError(f"images are {tuple(imgs.shape[-2:])} px, expected ({L}, {L})")
        h = hartley2(imgs)  # (b, L, L)
        if shifts_px is not None:
            h = shift_hartley_grid(h, -shifts_px[idx].to(device=device, dtype=dtype))
        if ctf is None:
            c = None
        elif isinstance(ctf, CTFParams):
            sel = torch.from_numpy(idx)
            params = ctf[sel].to(device=device, dtype=dtype)
            c = compute_ctf(params, L, float(pixel_size_angstrom))  # (b, L, L)
        else:
            c = ctf[torch.from_numpy(idx).to(ctf.device)].to(device=device, dtype=dtype)
        num = h if c is None else c * h
        den = torch.ones_like(h) if c is None else c * c
        R = rotations[idx].to(dtype)
        for which, (acc_num, acc_den) in ((1, (0, 1)), (2, (2, 3))):
            m = torch.from_numpy(half_set[idx] == which).to(device)
            if bool(m.any()):
                both = insert_central_slices(torch.stack([num[m], den[m]]), R[m], L,
                                             channels=True)  # (2, L, L, L)
                sums[acc_num] += both[0]
                sums[acc_den] += both[1]
        if on_batch is not None:
            on_batch(len(idx))
    return BackprojectionSums(*sums)


def _shells_centred(L: int, device: torch.device) -> Tensor:
    """Shell index ``round(|k|)`` on the centred grid, `(L, L, L)` int64."""
    k = torch.arange(L, dtype=torch.float64, device=device) - L // 2
    r = torch.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2)
    return torch.round(r).long()


def _shell_mean(values: Tensor, shells: Tensor, n_shells: int) -> Tensor:
    inside = shells < n_shells
    total = torch.zeros(n_shells, dtype=values.dtype, device=values.device)
    total.index_add_(0, shells[inside], values[inside])
    count = torch.bincount(shells[inside], minlength=n_shells).to(values.dtype)
    return total / count.clamp_min(1)


def _solve(num: Tensor, den: Tensor, lam: Tensor, shells: Tensor, L: int) -> Tensor:
    """Real-space map from Hartley sums with Wiener term ``lam`` (scalar or per-voxel)."""
    h = num / (den + lam)
    h = torch.where(shells <= L // 2, h, torch.zeros_like(h))
    return ihartley3(h)


def reconstruct_from_sums(
    sums: BackprojectionSums,
    *,
    reg: float = 1e-3,
    wiener: bool = True,
    pixel_size_angstrom: float | None = None,
) -> tuple[Tensor, Tensor, Tensor, FSCResult]:
    """Maps from accumulated sums: ``(volume, half_a, half_b, fsc)`` (see the module docstring)."""
    L = sums.box_px
    device = sums.numerator_a.device
    shells = _shells_centred(L, device)
    n_shells = L // 2 + 1
    ball = shells <= L // 2
    den_full = sums.denominator_a + sums.denominator_b
    num_full = sums.numerator_a + sums.numerator_b

    def const_lam(den: Tensor) -> Tensor:
        mean = den[ball].mean()
        return reg * mean if float(mean) > 0 else torch.ones((), dtype=den.dtype, device=device)

    lam_a, lam_b = const_lam(sums.denominator_a), const_lam(sums.denominator_b)
    lam_full = const_lam(den_full)
    half_a = _solve(sums.numerator_a, sums.denominator_a, lam_a, shells, L)
    half_b = _solve(sums.numerator_b, sums.denominator_b, lam_b, shells, L)
    if wiener:
        curve = torch.as_tensor(fsc(half_a, half_b).fsc, dtype=den_full.dtype, device=device)
        curve = curve.clamp(1e-6, 1 - 1e-6)
        snr_half = curve / (1 - curve)  # (n_shells,)
        clamped = shells.clamp(max=n_shells - 1)

        def wiener_lam(den: Tensor, snr: Tensor, floor: Tensor) -> Tensor:
            lam_shell = _shell_mean(den, shells, n_shells) / snr
            return torch.maximum(lam_shell[clamped], floor)

        half_a = _solve(sums.numerator_a, sums.denominator_a,
                        wiener_lam(sums.denominator_a, snr_half, lam_a), shells, L)
        half_b = _solve(sums.numerator_b, sums.denominator_b,
                        wiener_lam(sums.denominator_b, snr_half, lam_b), shells, L)
        lam_full = wiener_lam(den_full, 2 * snr_half, lam_full)
    volume = _solve(num_full, den_full, lam_full, shells, L)
    result = fsc(half_a, half_b, pixel_size_angstrom=pixel_size_angstrom)
    return volume, half_a, half_b, result


def backproject(
    images: Any,
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
        progress=progress, on_batch=on_batch,
    )
    volume, half_a, half_b, curve = reconstruct_from_sums(
        sums, reg=reg, wiener=wiener, pixel_size_angstrom=pixel_size_angstrom
    )
    return BackprojectionResult(volume, half_a, half_b, curve, half_set)


def backproject_particles(
    particles: Any,
    *,
    use_ctf: bool = True,
    reg: float = 1e-3,
    wiener: bool = True,
    seed: int = 0,
    batch_size: int = 256,
    dtype: torch.dtype = torch.float64,
    progress: bool = False,
) -> BackprojectionResult:
    """:func:`backproject` for a :class:`~cryospin.io.particles.ParticleSet` with poses.

    Uses its rotations, shifts, CTF parameters (unless ``use_ctf`` is false or it has none),
    pixel size and ``rlnRandomSubset`` half sets (when present; otherwise a seeded split).
    """
    if particles.rotations is None:
        raise InputError("the particles have no poses (give them with --poses)", particles.source)
    half = half_set_assignment(len(particles), random_subset=particles.random_subset, seed=seed)
    ctf = particles.ctf if use_ctf else None
    return backproject(
        particles, particles.rotations, particles.shifts_px, ctf,
        box_px=particles.box_px, pixel_size_angstrom=particles.pixel_size_angstrom, reg=reg,
        wiener=wiener, half_set=half, seed=seed, batch_size=batch_size, dtype=dtype,
        progress=progress,
    )
