"""Average a Hartley (or any) volume grid over a point group: ``V_sym(k) = (1/|G|) Σ_g V(g k)``.

Convention (``docs/conventions.md``, "Symmetry"): a map is symmetric when ``V(g r) = V(r)``
for every ``g`` of the group, and then so is its Hartley transform, ``H(g k) = H(k)``. The
volume is indexed ``[z, y, x]`` on the centred grid (index ``i`` is ``k = i − L//2``);
rotations left-multiply xyz column vectors; points outside the grid read 0 (as in
:mod:`cryospin.forward.slicing`).

The group is given split as ``G = {h p : h ∈ H, p ∈ P}`` (``cryospin.symmetry.grid_cosets``),
``P`` its signed permutation matrices (they map the grid onto itself). With
``U(m) = Σ_h V(h m)`` (trilinear, one resampling per coset, none for the identity),

    V_sym(k) = (1/|G|) Σ_p U(p k),

since ``V(h p k) = U_h(p k)``: ``|H| − 1`` trilinear resamplings and ``|P|`` exact flips and
transposes instead of ``|G|`` resamplings (O: none; D7: 6; I: 4); a rotation about ``z``
(those of Cn and Dn) keeps the planes ``z``: one bilinear resampling shared by the planes.
``U`` is computed on the grid extended by ``+L/2`` for even ``L`` (``V`` reads 0 there,
``V(h m)`` need not), so the result is the definition at every grid point. The operator is
linear, and autograd gives its adjoint (``grid_sample``'s backward).

For a permutation group the result is exactly invariant, ``V_sym(p k) = V_sym(k)`` wherever
``p k`` lies on the grid (for even ``L`` a sign flip sends the ``−L/2`` faces off it), and
idempotent on the points whose whole orbit lies on the grid (every point for odd ``L``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from cryospin.forward.trilinear import sample_volume

__all__ = ["symmetrize_volume"]


def _extended_size(L: int) -> int:
    """``M``: the grid ``k = −L//2 … M − 1 − L//2`` per axis holds ``p k`` for every signed
    permutation ``p`` and grid point ``k`` (``L + 1`` for even ``L``: it adds ``+L/2``)."""
    return L + 1 if L % 2 == 0 else L


def _coordinates(L: int, M: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``k = −L//2 … M − 1 − L//2`` `(M,)`."""
    return torch.arange(M, dtype=dtype, device=device) - L // 2


def _resampled(volume: Tensor, rotation: list[list[float]], M: int) -> Tensor:
    """``V(h m)`` (trilinear, zero outside) at the points ``m`` of the ``M³`` grid ``k = −L//2
    … M − 1 − L//2`` per axis, `(M, M, M)` ``[z, y, x]``.

    A rotation about ``z`` keeps each plane ``z``: one bilinear resampling shared by the
    planes (the trilinear one's weights, the ``z`` coordinate being exact), planes beyond the
    volume zero. Otherwise one trilinear resampling of the ``M³`` points (on every CPU thread:
    :func:`cryospin.forward.trilinear.sample_volume`)."""
    L = volume.shape[-1]
    k = _coordinates(L, M, volume.dtype, volume.device)
    scale = 2.0 / (L - 1)  # align_corners=True, as in slicing: index i -> −1 + 2 i / (L − 1)
    (a, b, c), (d, e, f), (g, h, i) = rotation
    if abs(c) + abs(f) + abs(g) + abs(h) == 0 and i == 1:  # about z
        y, x = k[:, None], k[None, :]
        grid = torch.stack([a * x + b * y, d * x + e * y], dim=-1)  # (M, M, 2): (x, y) of h m
        grid = (grid + L // 2) * scale - 1.0
        planes = F.grid_sample(volume[None], grid[None], mode="bilinear",
                               padding_mode="zeros", align_corners=True)[0]  # (L, M, M)
        return F.pad(planes, (0, 0, 0, 0, 0, M - L))  # (M, M, M)
    z, y, x = k[:, None, None], k[None, :, None], k[None, None, :]
    grid = torch.stack([a * x + b * y + c * z, d * x + e * y + f * z, g * x + h * y + i * z],
                       dim=-1)  # (M, M, M, 3): h m, xyz
    grid = (grid + L // 2) * scale - 1.0
    return sample_volume(volume[None], grid.reshape(-1, 3))[0].reshape(M, M, M)


def _permuted(summed: Tensor, perm: list[list[int]]) -> Tensor:
    """``U(p m)`` at every point ``m`` of the extended grid `(M, M, M)` ``[z, y, x]`` (a view).

    On the extended grid (:func:`_extended_size`) index ``a`` holds ``k = a − L//2`` and
    ``−k`` is index ``M − 1 − a``: a sign is a flip, exactly; ``(p m)_i = s_i m_{σ(i)}``
    reads axis ``i`` at the coordinate of axis ``σ(i)``: a transpose."""
    xyz = summed.permute(2, 1, 0)  # [x, y, z]
    flips = [i for i in range(3) if sum(perm[i]) < 0]
    if flips:
        xyz = xyz.flip(flips)
    sigma = [next(col for col in range(3) if perm[i][col] != 0) for i in range(3)]
    dims = [0, 0, 0]
    for i in range(3):
        dims[sigma[i]] = i  # the output's axis σ(i) is axis i of the flipped array
    return xyz.permute(dims).permute(2, 1, 0)  # [z, y, x]


def symmetrize_volume(volume: Tensor, cosets: Tensor, permutations: Tensor) -> Tensor:
    """The group average ``(1/|G|) Σ_g V(g k)`` of a volume at every grid point ``k``.

    Pure and differentiable in ``volume`` (module docstring); dtype and device follow it.

    Parameters
    ----------
    volume : `(L, L, L)`
        Real volume on the centred grid, indexed ``[z, y, x]`` (e.g. a Hartley volume).
    cosets : `(H, 3, 3)`
        One element ``h`` of each coset ``h P``, the identity first (its resampling is
        skipped); rotations left-multiplying xyz column vectors. Read as numbers (on the CPU:
        keep it there to avoid a device sync).
    permutations : `(P, 3, 3)`
        The group's signed permutation matrices (entries exactly 0, ±1; a subgroup), so that
        ``G = {h p}`` has ``H · P`` elements. Read as numbers, like ``cosets``.

    Returns
    -------
    `(L, L, L)`
        The symmetrised volume.
    """
    if volume.ndim != 3 or len(set(volume.shape)) != 1:
        raise ValueError(f"volume must have shape (L, L, L), got {tuple(volume.shape)}")
    if cosets.ndim != 3 or cosets.shape[-2:] != (3, 3) or cosets.shape[0] < 1:
        raise ValueError(f"cosets must have shape (H, 3, 3), got {tuple(cosets.shape)}")
    perms = permutations.detach().cpu()
    if perms.ndim != 3 or perms.shape[-2:] != (3, 3) or not bool((perms == perms.round()).all()):
        raise ValueError("permutations must be (P, 3, 3) signed permutation matrices")
    L = int(volume.shape[-1])
    order = cosets.shape[0] * perms.shape[0]
    # U on the L³ grid, or with permutations on the extended grid (+L/2 of an even L: V
    # reads 0 there, V(h m) need not)
    M = L if perms.shape[0] == 1 else _extended_size(L)
    summed = F.pad(volume, (0, M - L, 0, M - L, 0, M - L))  # (M, M, M)
    for h in cosets.detach().cpu().to(torch.float64).tolist()[1:]:
        summed = summed + _resampled(volume, h, M)
    if perms.shape[0] == 1:
        return summed / order
    rows = perms.to(torch.int64).tolist()
    out = _permuted(summed, rows[0])[:L, :L, :L]
    for p in rows[1:]:
        out = out + _permuted(summed, p)[:L, :L, :L]
    return out / order
