"""The best in-plane shift of a predicted image, by cross-correlation over every integer shift.

For Hartley samples on a frequency set closed under ``k → −k`` (the loss disc), the squared
error of a prediction ``p`` shifted by ``t`` (:func:`cryospin.forward.shifts.shift_hartley`)
against an observation ``y`` is ``‖y‖² + ‖p‖² − 2 c(t)`` — a shift only changes phases — with
the correlation

    c(t) = Σ_k y(k) · p_t(k) = Re Σ_k Y(k) conj(P(k)) exp(+2πi k·t / L),

``Y``, ``P`` the Fourier values (``Re F = (H(k) + H(−k)) / 2``, ``Im F = (H(−k) − H(k)) / 2``).
So the least-squares (and Gaussian-NLL) shift is the correlation's peak, and one inverse FFT of
``Y conj(P)`` placed on the ``L × L`` grid gives ``c`` at every integer shift at once.
Conventions (``docs/conventions.md``): ``shift_px = (tx, ty)`` pixels, ``image(r) = P(r − t)``;
frequencies ``(kx, ky)`` in cycles per box.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["shift_correlation", "best_shifts"]


def _fourier(h: Tensor, negation_index: Tensor) -> Tensor:
    """Fourier values `(..., P)` complex from Hartley values `(..., P)` on a symmetric set."""
    h_neg = h[..., negation_index]
    return torch.complex((h + h_neg) / 2, (h_neg - h) / 2)


def shift_correlation(
    observed: Tensor, predicted: Tensor, negation_index: Tensor, frequencies: Tensor,
    box_px: int,
) -> Tensor:
    """``c(t) = Σ_p observed[..., p] · shift_hartley(predicted, t)[..., p]`` at every integer t.

    Parameters
    ----------
    observed, predicted : `(..., P)`
        Hartley values on the frequencies (broadcast against each other), float32 or float64.
    negation_index : `(P,)`
        Index of ``−k`` for each frequency (:func:`cryospin.forward.lattice.negation_permutation`).
    frequencies : `(P, 2)`
        Integer ``(kx, ky)`` cycles per box, ``|k| < L/2``, closed under ``k → −k``.
    box_px : int
        ``L``.

    Returns
    -------
    `(..., L, L)`
        ``c`` at ``[ty mod L, tx mod L]``: index ``[0, 0]`` is no shift, ``[L − 1, 1]`` is
        ``t = (1, −1)``. In the dtype of the inputs' real part.
    """
    L = int(box_px)
    product = _fourier(observed, negation_index) * _fourier(predicted, negation_index).conj()
    k = torch.round(frequencies).long().to(product.device) % L  # (P, 2) DFT indices
    grid = product.new_zeros((*product.shape[:-1], L * L))
    grid[..., k[:, 1] * L + k[:, 0]] = product
    return torch.fft.ifft2(grid.reshape(*product.shape[:-1], L, L), norm="forward").real


def best_shifts(
    observed: Tensor, predicted: Tensor, negation_index: Tensor, frequencies: Tensor,
    box_px: int, max_shift_px: float,
) -> Tensor:
    """The shift of each prediction that best explains its observation (least squares).

    The peak of :func:`shift_correlation` over the integer shifts with ``|tx|, |ty| ≤
    max_shift_px``, then a parabola through the peak and its two neighbours along each axis
    (at most half a pixel further).

    Parameters
    ----------
    observed : `(B, P)`
        Hartley values of the images.
    predicted : `(B, M, P)`
        Hartley values of ``M`` unshifted predictions per image (e.g. slice × CTF per head).
    negation_index, frequencies, box_px
        As in :func:`shift_correlation`.
    max_shift_px : float
        Largest shift per axis, pixels, ``< L/2``.

    Returns
    -------
    `(B, M, 2)`
        ``(tx, ty)`` pixels, in the dtype of ``predicted``.
    """
    L = int(box_px)
    if not 0 <= max_shift_px < L / 2:
        raise ValueError(f"max_shift_px must be in [0, {L / 2}), got {max_shift_px}")
    c = shift_correlation(observed[:, None, :], predicted, negation_index, frequencies, L)
    t = torch.arange(L, device=c.device)
    t = torch.where(t < (L + 1) // 2, t, t - L)  # the signed shift of each index
    outside = (t.abs() > max_shift_px)
    c = c.masked_fill(outside[:, None] | outside[None, :], -torch.inf)
    flat = c.flatten(-2).argmax(-1)  # (B, M)
    iy, ix = flat // L, flat % L

    def offset(minus: Tensor, peak: Tensor, plus: Tensor) -> Tensor:
        """The parabola's vertex from the peak, pixels; 0 where a neighbour is out of
        bounds or the peak is not a strict maximum."""
        curvature = minus - 2 * peak + plus
        ok = torch.isfinite(minus) & torch.isfinite(plus) & (curvature < 0)
        safe = torch.where(ok, curvature, torch.full_like(curvature, -1.0))
        return torch.where(ok, ((minus - plus) / (2 * safe)).clamp(-0.5, 0.5),
                           torch.zeros_like(curvature))

    def at(y: Tensor, x: Tensor) -> Tensor:  # c at the (periodic) indices, (B, M)
        return torch.gather(c.flatten(-2), -1, ((y % L) * L + x % L)[..., None])[..., 0]

    peak = at(iy, ix)
    dx = offset(at(iy, ix - 1), peak, at(iy, ix + 1))
    dy = offset(at(iy - 1, ix), peak, at(iy + 1, ix))
    shifts = torch.stack([t[ix] + dx, t[iy] + dy], dim=-1).to(predicted.dtype)
    return shifts.clamp(-max_shift_px, max_shift_px)
