"""Rigid alignment of one map onto another: rotation, translation and hand.

Conventions (``docs/conventions.md``): volumes are `(L, L, L)` indexed ``[z, y, x]``; voxel
``[z, y, x]`` has coordinate ``r = (x, y, z) − L//2`` pixels; rotations left-multiply xyz column
vectors. The transformed map is

    aligned(r) = moving_h(Qᵀ (r − t)),

with ``moving_h = moving`` or, when ``flipped``, its mirror ``moving(D r)``, ``D = diag(1, 1, −1)``.
For poses: if ``moving`` explains the data with poses ``R`` then ``moving_h`` does with
``H(R)`` (``H(R) = D R D`` when flipped, see :mod:`cryospin.evaluate.pose_error`) and ``aligned``
with ``H(R) Qᵀ`` (and shifts changed by the projected translation).

Method: a global search over SO(3) on low-passed, Fourier-cropped maps (``coarse_box_px``) with a
deterministic near-uniform rotation set (super-Fibonacci spiral, Alexa 2022), for both hands:
each rotation is scored by the normalised cross-correlation (NCC) of the two maps with their
centres of mass (of the positive density) moved to the origin; the best few distinct rotations
get their translation from an FFT cross-correlation, and are refined by L-BFGS on ``(ω, t)``
with ``Q ← exp([ω]×) Q`` and trilinear resampling (``grid_sample``), first at
``refine_box_px`` and then, for the best one, at ``min(L, final_box_px)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from cryospin.forward.resample import fourier_crop_3d, fourier_pad_3d
from cryospin.forward.rigid import centred_coords, transform_map
from cryospin.forward.trilinear import sample_volume
from cryospin.rotations import quaternion_to_matrix, so3_exp

_MAX_OVERSAMPLED_BOX = 256

__all__ = [
    "AlignResult",
    "align_maps",
    "mirror_map",
    "super_fibonacci_rotations",
]


@dataclass(frozen=True)
class AlignResult:
    """Result of :func:`align_maps`.

    Attributes
    ----------
    rotation : `(3, 3)` float64
        ``Q`` in ``aligned(r) = moving_h(Qᵀ (r − t))``.
    translation_px : `(3,)` float64
        ``t = (tx, ty, tz)`` in pixels of the input box.
    flipped : bool
        Whether the mirror ``moving(D r)`` was used.
    aligned : `(L, L, L)`
        The transformed moving map, dtype of ``moving``.
    correlation : float
        Real-space normalised cross-correlation of the final (refinement-level) maps.
    """

    rotation: Tensor
    translation_px: Tensor
    flipped: bool
    aligned: Tensor
    correlation: float

    def __iter__(self):  # allows ``Q, t, flipped, aligned = align_maps(...)``
        return iter((self.rotation, self.translation_px, self.flipped, self.aligned))


def super_fibonacci_rotations(
    n: int, *, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
) -> Tensor:
    """``n`` near-uniformly spread rotations `(n, 3, 3)` from the super-Fibonacci spiral.

    Deterministic (Alexa, "Super-Fibonacci Spirals", CVPR 2022): unit quaternions
    ``(r sin α, r cos α, R sin β, R cos β)`` with ``s = i + 1/2``, ``r = sqrt(s/n)``,
    ``R = sqrt(1 − s/n)``, ``α = 2πs/√2``, ``β = 2πs/ψ``, ``ψ⁴ = ψ + 4``.
    """
    phi = math.sqrt(2.0)
    psi = 1.533751168755204288118041
    s = torch.arange(n, dtype=torch.float64, device=device) + 0.5
    t = s / n
    r, rr = torch.sqrt(t), torch.sqrt(1 - t)
    alpha, beta = 2 * math.pi * s / phi, 2 * math.pi * s / psi
    q = torch.stack([r * torch.sin(alpha), r * torch.cos(alpha), rr * torch.sin(beta),
                     rr * torch.cos(beta)], -1)
    return quaternion_to_matrix(q).to(dtype)


def mirror_map(volume: Tensor) -> Tensor:
    """The mirror ``V(D r)``, ``D = diag(1, 1, −1)``: z reversed about the centre index ``L//2``.

    For even ``L`` the plane ``z = −L/2`` maps onto itself by periodicity (``index L − i``).
    """
    L = volume.shape[-3]
    flipped = torch.flip(volume, dims=[-3])  # index L − 1 − i
    return torch.roll(flipped, shifts=1, dims=-3) if L % 2 == 0 else flipped


def _fft3c(x: Tensor) -> Tensor:
    dims = (-3, -2, -1)
    return torch.fft.fftshift(torch.fft.fftn(torch.fft.ifftshift(x, dim=dims), dim=dims), dim=dims)


def _ifft3c(X: Tensor) -> Tensor:
    dims = (-3, -2, -1)
    return torch.fft.fftshift(torch.fft.ifftn(torch.fft.ifftshift(X, dim=dims), dim=dims), dim=dims)


def _crop(volume: Tensor, box_px: int) -> Tensor:
    """Fourier crop to ``box_px`` (values kept; see forward.resample), identity when not smaller."""
    return fourier_crop_3d(volume, box_px) if box_px < volume.shape[-1] else volume


def _normalise(v: Tensor) -> Tensor:
    """Zero mean, unit norm over the last three axes."""
    v = v - v.mean(dim=(-3, -2, -1), keepdim=True)
    return v / v.flatten(-3).norm(dim=-1).clamp_min(1e-30)[..., None, None, None]


def _best_translation_scores(
    ref: Tensor, rotated: Tensor, max_shift_px: float
) -> tuple[Tensor, Tensor]:
    """Best circular cross-correlation over translations for each rotated map.

    ``ref`` `(L, L, L)` and ``rotated`` `(B, L, L, L)` are zero-mean, unit-norm. Returns the
    scores `(B,)` and translations `(B, 3)` (x, y, z) with ``ref(r) ≈ rotated(r − t)``.
    """
    L = ref.shape[-1]
    cc = torch.fft.irfftn(
        torch.fft.rfftn(ref)[None] * torch.fft.rfftn(rotated, dim=(-3, -2, -1)).conj(),
        s=(L, L, L),
        dim=(-3, -2, -1),
    )  # (B, L, L, L): cc[t] = Σ_r ref(r) rotated(r − t), t indexed [z, y, x] periodically
    k = torch.fft.fftfreq(L, d=1.0 / L, device=ref.device)
    kz, ky, kx = torch.meshgrid(k, k, k, indexing="ij")
    too_far = (kx**2 + ky**2 + kz**2) > max_shift_px**2
    cc = cc.masked_fill(too_far, -math.inf)
    best, flat = cc.flatten(1).max(dim=1)
    iz, iy, ix = flat // (L * L), (flat // L) % L, flat % L
    t = torch.stack([k[ix], k[iy], k[iz]], -1)
    return best, t


def _phase_shift(volume: Tensor, translation_px: Tensor) -> Tensor:
    """``out(r) = V(r − t)`` by a Fourier phase ramp (periodic); `(L, L, L)`, ``t`` `(3,)` xyz."""
    L = volume.shape[-1]
    k = torch.fft.fftfreq(L, d=1.0 / L, dtype=volume.dtype, device=volume.device)
    kz, ky, kx = torch.meshgrid(k, k, k, indexing="ij")
    t = translation_px.to(volume.dtype)
    phase = torch.exp(-2j * math.pi * (kx * t[0] + ky * t[1] + kz * t[2]) / L)
    X = torch.fft.fftn(torch.fft.ifftshift(volume))
    return torch.fft.fftshift(torch.fft.ifftn(X * phase)).real


def _centre_of_mass(volume: Tensor) -> Tensor:
    """Centre of mass ``(x, y, z)`` (pixels from ``L//2``) of the positive part of a map."""
    w = volume.clamp_min(0)
    total = w.sum()
    if float(total) <= 0:
        return torch.zeros(3, dtype=volume.dtype, device=volume.device)
    r = centred_coords(volume.shape[-1], volume.dtype, volume.device)  # (L, L, L, 3)
    return (w[..., None] * r).sum(dim=(0, 1, 2)) / total


def _coarse_search(
    ref: Tensor, moving: Tensor, rotations: Tensor, *, batch: int, max_shift_px: float, top_k: int
) -> list[tuple[float, Tensor, Tensor]]:
    """Global rotation search on coarse maps; return ``top_k`` distinct (score, Q, t).

    Rotations are scored by the NCC of the maps with their centres of mass moved to the
    origin (translation-free scoring, one resampling per rotation); each kept candidate then
    gets its translation from an FFT cross-correlation of the uncentred maps.
    """
    c_ref, c_mov = _centre_of_mass(ref), _centre_of_mass(moving)
    ref_centred = _phase_shift(ref, -c_ref)
    mov_centred = _phase_shift(moving, -c_mov)
    # score on the voxels of the inscribed ball only (rotation-invariant support)
    L = ref.shape[-1]
    pts = centred_coords(L, ref.dtype, ref.device).reshape(-1, 3)
    pts = pts[pts.norm(dim=-1) <= L // 2]  # (P, 3)
    f = _sample4(ref_centred[None], pts)[:, 0]
    f = f - f.mean()
    f = f / f.norm().clamp_min(1e-30)
    scores = []
    for start in range(0, rotations.shape[0], batch):
        Q = rotations[start : start + batch].to(ref.dtype)  # (b, 3, 3)
        samples = _sample4(mov_centred[None], (pts @ Q).reshape(-1, 3))[:, 0]
        samples = samples.reshape(Q.shape[0], -1)  # (b, P)
        samples = samples - samples.mean(-1, keepdim=True)
        samples = samples / samples.norm(dim=-1, keepdim=True).clamp_min(1e-30)
        scores.append(samples @ f)  # (b,)
    score = torch.cat(scores)
    order = torch.argsort(score, descending=True)
    picked: list[tuple[float, Tensor]] = []
    for i in order.tolist():
        Q = rotations[i]
        if all(_angle_deg(Q, q) > 15.0 for _, q in picked):  # distinct basins only
            picked.append((float(score[i]), Q))
        if len(picked) >= top_k:
            break
    ref_u = _normalise(ref)
    out = []
    for s, Q in picked:
        rotated = _normalise(transform_map(moving, Q[None]))  # (1, l, l, l)
        _, t = _best_translation_scores(ref_u, rotated, max_shift_px)
        out.append((s, Q, t[0]))
    return out


def _angle_deg(A: Tensor, B: Tensor) -> float:
    c = ((A.T @ B).diagonal().sum() - 1) / 2
    return math.degrees(math.acos(float(c.clamp(-1.0, 1.0))))


def _with_gradient(volume: Tensor) -> Tensor:
    """Stack ``[V, ∂V/∂x, ∂V/∂y, ∂V/∂z]`` `(4, L, L, L)` (spectral derivatives, per pixel)."""
    L = volume.shape[-1]
    k = torch.fft.fftfreq(L, d=1.0 / L, dtype=volume.dtype, device=volume.device)
    if L % 2 == 0:
        k = k.clone()
        k[L // 2] = 0.0  # the unpaired Nyquist frequency has no real derivative
    X = torch.fft.fftn(torch.fft.ifftshift(volume))
    factor = 2j * math.pi / L
    grads = [
        torch.fft.fftshift(torch.fft.ifftn(X * (factor * kk))).real
        for kk in (k[None, None, :], k[None, :, None], k[:, None, None])  # x, y, z
    ]
    return torch.stack([volume, *grads])


def _sample4(stack: Tensor, points: Tensor) -> Tensor:
    """Trilinear samples of a `(C, L, L, L)` stack at xyz coordinates `(P, 3)` -> `(P, C)`."""
    L = stack.shape[-1]
    grid = (points + (L // 2)) * (2.0 / (L - 1)) - 1.0
    return sample_volume(stack, grid.reshape(-1, 3)).T  # on every CPU thread


def _ncc(a: Tensor, b: Tensor) -> float:
    a = a - a.mean()
    b = b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-30))


def _refine(
    ref: Tensor, moving: Tensor, Q0: Tensor, t0: Tensor, *, max_iter: int
) -> tuple[Tensor, Tensor, float]:
    """Local Gauss–Newton refinement of ``(Q, t)`` maximising the NCC; returns (Q, t, ncc).

    Model ``ref(x) ≈ α·m(Qᵀ (x − t)) + β``; perturbing ``Q ← exp([ω]×) Q``, ``t ← t + δ``
    changes the sample point by ``−Qᵀ (δ + ω × y)`` with ``y = x − t``, so with ``a = Q ∇m``
    the Jacobian rows are ``∂/∂ω = −(y × a)``, ``∂/∂δ = −a``. Each step solves the damped
    6×6 normal equations; a step that lowers the NCC is halved (up to 4 times).
    """
    dtype = ref.dtype
    L = ref.shape[-1]
    f = ref.reshape(-1)
    x = centred_coords(L, dtype, ref.device).reshape(-1, 3)  # (P, 3)
    stack = _with_gradient(moving.to(dtype))  # (4, L, L, L)
    Q, t = Q0.to(dtype), t0.to(dtype)

    def evaluate(Q: Tensor, t: Tensor) -> tuple[Tensor, float]:
        s4 = _sample4(stack, (x - t) @ Q)  # (P, 4): row form of Qᵀ (x − t)
        return s4, _ncc(s4[:, 0], f)

    s4, ncc = evaluate(Q, t)
    for _ in range(max_iter):
        m, g = s4[:, 0], s4[:, 1:]
        design = torch.stack([m, torch.ones_like(m)], -1)
        alpha, beta = torch.linalg.lstsq(design, f[:, None]).solution[:, 0]
        y = x - t
        a = g @ Q.T  # (P, 3): Q ∇m as rows
        J = alpha * torch.cat([-torch.linalg.cross(y, a, dim=-1), -a], -1)  # (P, 6)
        resid = f - beta - alpha * m
        JtJ = J.T @ J
        JtJ = JtJ + 1e-3 * torch.diag(JtJ.diagonal()) + 1e-12 * torch.eye(6, dtype=dtype)
        step = torch.linalg.solve(JtJ, J.T @ resid)
        for _half in range(5):
            Q_new = so3_exp(step[:3]) @ Q
            t_new = t + step[3:]
            s4_new, ncc_new = evaluate(Q_new, t_new)
            if ncc_new >= ncc:
                break
            step = step / 2
        else:
            break
        converged = float(step[:3].norm()) < 1e-4 and float(step[3:].norm()) < 1e-3
        Q, t, s4, ncc = Q_new, t_new, s4_new, ncc_new
        if converged:
            break
    return Q, t, ncc


def align_maps(
    reference: Tensor,
    moving: Tensor,
    *,
    search_hand: bool = True,
    n_rotations: int = 5000,
    coarse_box_px: int = 16,
    refine_box_px: int = 24,
    final_box_px: int = 48,
    top_k: int = 2,
    max_shift_fraction: float = 0.25,
    oversample_output: int = 2,
) -> AlignResult:
    """Find ``Q``, ``t`` (and hand) with ``moving_h(Qᵀ (r − t)) ≈ reference(r)``.

    Parameters
    ----------
    reference, moving : `(L, L, L)`
        Maps on the same grid (same box and voxel size), indexed ``[z, y, x]``.
    search_hand : bool
        Also try the mirror of ``moving`` and keep the better hand.
    n_rotations : int
        Size of the global rotation set (super-Fibonacci; ~5000 gives a mean nearest-neighbour
        spacing of about 9°).
    coarse_box_px, refine_box_px, final_box_px : int
        Fourier-cropped box sizes of the global search, the candidate refinement and the final
        refinement (each capped at ``L``).
    top_k : int
        Distinct candidates per hand carried from the global search into refinement.
    max_shift_fraction : float
        Largest translation searched, as a fraction of the box.
    oversample_output : int
        The output map is resampled from a Fourier-upsampled copy of ``moving`` (this factor;
        1 = plain trilinear), which loses less high-resolution signal. Skipped when the
        upsampled box would exceed 256 voxels (memory).

    Returns
    -------
    AlignResult
        Unpacks as ``(Q, t, flipped, aligned)``.
    """
    if reference.shape != moving.shape or reference.ndim != 3 or len(set(reference.shape)) != 1:
        raise ValueError(
            f"expected two cubic maps of equal shape, got {tuple(reference.shape)} and "
            f"{tuple(moving.shape)}"
        )
    L = reference.shape[-1]
    ref64, mov64 = reference.detach().to(torch.float64), moving.detach().to(torch.float64)
    hands = [False, True] if search_hand else [False]
    lc, lr, lf = min(L, coarse_box_px), min(L, refine_box_px), min(L, final_box_px)
    rotations = super_fibonacci_rotations(n_rotations, dtype=torch.float32, device=reference.device)

    best: tuple[float, Tensor, Tensor, bool] | None = None
    for flipped in hands:
        mov_h = mirror_map(mov64) if flipped else mov64
        ref_c, mov_c = _crop(ref64, lc), _crop(mov_h, lc)
        candidates = _coarse_search(
            ref_c.float(), mov_c.float(), rotations, batch=1024,
            max_shift_px=max_shift_fraction * lc, top_k=top_k,
        )
        ref_r, mov_r = _crop(ref64, lr), _crop(mov_h, lr)
        for _, Q, t in candidates:
            Qr, tr, ncc = _refine(ref_r.float(), mov_r.float(), Q, t * (lr / lc), max_iter=8)
            if best is None or ncc > best[0]:
                best = (ncc, Qr.double(), tr.double() * (L / lr), flipped)
    assert best is not None
    _, Q, t, flipped = best
    mov_h = mirror_map(mov64) if flipped else mov64
    if lf > lr:
        ref_f, mov_f = _crop(ref64, lf), _crop(mov_h, lf)
        Q, t_f, ncc = _refine(ref_f, mov_f, Q, t * (lf / L), max_iter=10)
        t = t_f * (L / lf)
    else:
        ncc = best[0]
    factor = oversample_output if L * oversample_output <= _MAX_OVERSAMPLED_BOX else 1
    src = fourier_pad_3d(mov_h, L * factor) if factor > 1 else mov_h
    aligned = transform_map(src, Q, t, output_box_px=L, input_scale=float(factor))
    return AlignResult(
        rotation=Q, translation_px=t, flipped=flipped, aligned=aligned.to(moving.dtype),
        correlation=ncc,
    )
