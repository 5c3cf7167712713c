"""Image formation: volume, poses, CTF and shifts -> predicted images (Hartley space).

Convention (see ``docs/conventions.md``): the predicted image of pose ``R`` and shift ``t`` is
``image = shift_t(CTF · P_R)``, with ``P_R(x, y) = ∫ V(Rᵀ (x, y, z)ᵀ) dz``. In Hartley space the
slice of the Hartley volume at ``(kx, ky, 0) @ R`` is the Hartley transform of ``P_R``; the CTF
multiplies it (the CTF is even in ``k``, so this equals the Fourier-space product); the shift is
:func:`~cryospin.forward.shifts.shift_hartley`.
"""

from __future__ import annotations

from torch import Tensor

from cryospin.forward.hartley import ihartley2
from cryospin.forward.lattice import negation_permutation
from cryospin.forward.shifts import shift_hartley, shift_hartley_grid
from cryospin.forward.slicing import extract_central_slices

__all__ = ["render", "render_real"]


def render(
    volume: Tensor,
    rotations: Tensor,
    shifts_px: Tensor | None = None,
    ctf: Tensor | None = None,
    *,
    frequencies: Tensor | None = None,
    negation_index: Tensor | None = None,
) -> Tensor:
    """Predicted images in Hartley space: slice, times CTF, then shift.

    Parameters
    ----------
    volume : `(L, L, L)`
        Real Hartley volume ``hartley3(density)``, indexed ``[z, y, x]``.
    rotations : `(..., 3, 3)`
        Poses (left-multiply xyz column vectors).
    shifts_px : `(..., 2)`, optional
        ``(tx, ty)`` in pixels (``image(r) = P(r − t)``); None for no shift.
    ctf : `(..., L, L)` or `(..., P)`, optional
        Precomputed CTF, broadcastable to the slices (e.g. from
        :func:`~cryospin.forward.ctf.compute_ctf`); None for no CTF.
    frequencies : `(P, 2)`, optional
        Render only these ``(kx, ky)`` (cycles per box), e.g. the loss disc; default full grid.
        With shifts, the set must be closed under ``k → −k`` (modulo ``L``).
    negation_index : `(P,)`, optional
        ``negation_permutation(frequencies, L)``, to avoid recomputing it at every call.

    Returns
    -------
    `(..., L, L)` or `(..., P)`
        Hartley transforms of the predicted images, in ``volume.dtype``.
    """
    slices = extract_central_slices(volume, rotations, frequencies=frequencies)
    if ctf is not None:
        slices = slices * ctf
    if shifts_px is None:
        return slices
    if frequencies is None:
        return shift_hartley_grid(slices, shifts_px)
    L = int(volume.shape[-1])
    if negation_index is None:
        negation_index = negation_permutation(frequencies, L)
    return shift_hartley(slices, slices[..., negation_index], shifts_px, frequencies, L)


def render_real(
    volume: Tensor,
    rotations: Tensor,
    shifts_px: Tensor | None = None,
    ctf: Tensor | None = None,
) -> Tensor:
    """Predicted real-space images `(..., L, L)`: ``ihartley2(render(...))`` on the full grid."""
    return ihartley2(render(volume, rotations, shifts_px, ctf))
