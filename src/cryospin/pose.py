"""Per-particle pose table for the auto-decoding stage, with per-row Adam state.

Each particle ``i`` owns a rotation ``R_i`` `(3, 3)` and a shift ``t_i`` `(2,)` in pixels.
A batch touches only its own rows: the forward pass uses ``R = exp([ω]×) · R_i`` and
``t = t_i + δt`` with perturbations ``ω = 0``, ``δt = 0`` that require grad; the gradients at
zero are then fed to :meth:`PoseTable.apply_gradients`, which performs one Adam step **per row**
(same formula as :class:`torch.optim.Adam`, with per-row step counts for the bias correction)
and retracts it onto the table: ``R_i ← exp([Δω]×) · R_i`` (left multiplication, as in
``docs/conventions.md``), ``t_i ← clamp(t_i + Δt)``. Nothing is ever done to rows outside the
batch, so the cost of a step is ``O(B)``, not ``O(N)``.

Usage in a training step::

    omega, dt = table.perturbation(idx)
    R, t = table.compose(idx, omega, dt)
    loss = ...(R, t)...
    g_omega, g_t = torch.autograd.grad(loss, (omega, dt))
    table.apply_gradients(idx, g_omega, g_t)

Indices within one call must be unique (checked): with duplicates, two Adam steps would race
for one row. Deduplicate the batch (or split it) before calling.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypedDict

import torch
from torch import Tensor, nn

from cryospin.rotations import matrix_to_rotation_6d, rotation_6d_to_matrix, so3_exp

__all__ = ["PoseTable", "PoseTableSettings"]


class PoseTableSettings(TypedDict):
    """A :class:`PoseTable`'s hyper-parameters, saved in its ``state_dict()`` (extra state)."""

    lr_rot: float
    lr_shift: float
    betas: tuple[float, float]
    eps: float
    max_shift_px: float | None


class PoseTable(nn.Module):
    """Per-particle rotations and shifts refined by a sparse, row-wise Adam.

    Parameters
    ----------
    rotations : `(N, 3, 3)`
        Initial rotations (left-multiplying xyz column vectors). Copied; the table's floating
        dtype and device are those of this tensor.
    shifts_px : `(N, 2)`, optional
        Initial shifts ``(tx, ty)`` in pixels; zeros when omitted.
    lr_rot : float
        Adam step size for the rotation perturbation ω, radians (the paper uses 0.05).
    lr_shift : float
        Adam step size for the shifts, pixels per step.
    betas, eps : Adam hyper-parameters, as in :class:`torch.optim.Adam`.
    max_shift_px : float, optional
        If given, each shift component is clamped to ``[−max_shift_px, max_shift_px]`` after
        every update (a box, like the encoder's ``max_shift_px · tanh``).

    Buffers (all in ``state_dict()``)
    ---------------------------------
    rotations `(N, 3, 3)`, shifts_px `(N, 2)`, exp_avg_rot `(N, 3)`, exp_avg_sq_rot `(N, 3)`,
    exp_avg_shift `(N, 2)`, exp_avg_sq_shift `(N, 2)`, step `(N,)` int64 (Adam steps taken by
    each row's rotation), step_shift `(N,)` int64 (same for the shift, which may be frozen).
    The hyper-parameters travel in the state dict as extra state.
    """

    rotations: Tensor
    shifts_px: Tensor
    exp_avg_rot: Tensor
    exp_avg_sq_rot: Tensor
    exp_avg_shift: Tensor
    exp_avg_sq_shift: Tensor
    step: Tensor
    step_shift: Tensor

    def __init__(
        self,
        rotations: Tensor,
        shifts_px: Tensor | None = None,
        *,
        lr_rot: float = 0.05,
        lr_shift: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        max_shift_px: float | None = None,
    ) -> None:
        super().__init__()
        if rotations.ndim != 3 or rotations.shape[1:] != (3, 3):
            raise ValueError(f"rotations must be (N, 3, 3), got {tuple(rotations.shape)}")
        if not rotations.is_floating_point():
            raise ValueError(f"rotations must be floating point, got {rotations.dtype}")
        n = rotations.shape[0]
        dtype, device = rotations.dtype, rotations.device
        if shifts_px is None:
            shifts_px = torch.zeros(n, 2, dtype=dtype, device=device)
        if shifts_px.shape != (n, 2):
            raise ValueError(f"shifts_px must be ({n}, 2), got {tuple(shifts_px.shape)}")
        if max_shift_px is not None and max_shift_px < 0:
            raise ValueError(f"max_shift_px must be >= 0, got {max_shift_px}")
        self.lr_rot = float(lr_rot)
        self.lr_shift = float(lr_shift)
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = float(eps)
        self.max_shift_px = None if max_shift_px is None else float(max_shift_px)

        shifts = shifts_px.detach().to(dtype=dtype, device=device).clone()
        if self.max_shift_px is not None:
            shifts = shifts.clamp(-self.max_shift_px, self.max_shift_px)
        self.register_buffer("rotations", rotations.detach().clone())
        self.register_buffer("shifts_px", shifts)
        self.register_buffer("exp_avg_rot", torch.zeros(n, 3, dtype=dtype, device=device))
        self.register_buffer("exp_avg_sq_rot", torch.zeros(n, 3, dtype=dtype, device=device))
        self.register_buffer("exp_avg_shift", torch.zeros(n, 2, dtype=dtype, device=device))
        self.register_buffer("exp_avg_sq_shift", torch.zeros(n, 2, dtype=dtype, device=device))
        self.register_buffer("step", torch.zeros(n, dtype=torch.int64, device=rotations.device))
        self.register_buffer(
            "step_shift", torch.zeros(n, dtype=torch.int64, device=rotations.device)
        )

    # ------------------------------------------------------------------ queries

    def __len__(self) -> int:
        return int(self.rotations.shape[0])

    def gather(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """Current poses of rows ``indices`` `(B,)`, detached: ``(R (B, 3, 3), t_px (B, 2))``."""
        idx = self._check_indices(indices, unique=False)
        return self.rotations[idx].clone(), self.shifts_px[idx].clone()

    def perturbation(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """Zero perturbations requiring grad: ``(ω (B, 3) radians, δt (B, 2) pixels)``."""
        b = int(indices.shape[0])
        dtype, device = self.rotations.dtype, self.rotations.device
        omega = torch.zeros(b, 3, dtype=dtype, device=device, requires_grad=True)
        dt = torch.zeros(b, 2, dtype=dtype, device=device, requires_grad=True)
        return omega, dt

    def compose(self, indices: Tensor, omega: Tensor, dt: Tensor | None) -> tuple[Tensor, Tensor]:
        """Perturbed poses for the forward pass, differentiable in ``omega`` and ``dt``.

        Parameters
        ----------
        indices : `(B,)` long
        omega : `(B, 3)`
            Rotation perturbation in radians (left-multiplied): ``R = exp([ω]×) · R_i``.
        dt : `(B, 2)` or None
            Shift perturbation in pixels: ``t = t_i + δt`` (``t = t_i`` when None).

        Returns
        -------
        R : `(B, 3, 3)`
        t_px : `(B, 2)`
        """
        base_r, base_t = self.gather(indices)
        if omega.shape != (base_r.shape[0], 3):
            raise ValueError(f"omega must be ({base_r.shape[0]}, 3), got {tuple(omega.shape)}")
        rot = so3_exp(omega) @ base_r  # (B, 3, 3)
        t = base_t if dt is None else base_t + dt  # (B, 2)
        return rot, t

    # ------------------------------------------------------------------ updates

    @torch.no_grad()
    def apply_gradients(
        self, indices: Tensor, grad_omega: Tensor, grad_shift: Tensor | None = None
    ) -> None:
        """One Adam step on rows ``indices`` only (unique), from gradients at ω = 0, δt = 0.

        ``Δ = −lr · m̂ / (√v̂ + eps)`` with the bias corrections of each row's own step count;
        then ``R_i ← GS(exp([Δω]×) · R_i)`` (Gram–Schmidt on the rows, which removes the
        float round-off drift away from SO(3)) and ``t_i ← clamp(t_i + Δt)``. When
        ``grad_shift`` is None the shifts and their Adam state are left untouched.

        Parameters
        ----------
        indices : `(B,)` long, unique
        grad_omega : `(B, 3)`
            ``∂loss/∂ω`` at ω = 0.
        grad_shift : `(B, 2)`, optional
            ``∂loss/∂δt`` at δt = 0.
        """
        idx = self._check_indices(indices, unique=True)
        b = idx.shape[0]
        if grad_omega.shape != (b, 3):
            raise ValueError(f"grad_omega must be ({b}, 3), got {tuple(grad_omega.shape)}")
        self.step[idx] += 1
        delta_rot = self._adam_rows(
            idx, grad_omega, self.exp_avg_rot, self.exp_avg_sq_rot, self.step, self.lr_rot
        )  # (B, 3)
        rot = so3_exp(delta_rot) @ self.rotations[idx]  # (B, 3, 3)
        self.rotations[idx] = rotation_6d_to_matrix(matrix_to_rotation_6d(rot))

        if grad_shift is not None:
            if grad_shift.shape != (b, 2):
                raise ValueError(f"grad_shift must be ({b}, 2), got {tuple(grad_shift.shape)}")
            self.step_shift[idx] += 1
            delta_t = self._adam_rows(
                idx,
                grad_shift,
                self.exp_avg_shift,
                self.exp_avg_sq_shift,
                self.step_shift,
                self.lr_shift,
            )  # (B, 2)
            t = self.shifts_px[idx] + delta_t
            if self.max_shift_px is not None:
                t = t.clamp(-self.max_shift_px, self.max_shift_px)
            self.shifts_px[idx] = t

    @torch.no_grad()
    def replace_poses(self, rotations: Tensor, shifts_px: Tensor) -> None:
        """Every row's pose replaced (`(N, 3, 3)`, `(N, 2)` px; clamped to ``max_shift_px``)
        and its Adam moments and step counts zeroed: the poses of another frame."""
        if rotations.shape != self.rotations.shape or shifts_px.shape != self.shifts_px.shape:
            raise ValueError(f"poses {tuple(rotations.shape)}, {tuple(shifts_px.shape)} for a "
                             f"table of {len(self)} rows")
        shifts = shifts_px.to(self.shifts_px)
        if self.max_shift_px is not None:
            shifts = shifts.clamp(-self.max_shift_px, self.max_shift_px)
        self.rotations.copy_(rotations.to(self.rotations))
        self.shifts_px.copy_(shifts)
        self.reset_optimizer_state()

    @torch.no_grad()
    def reset_optimizer_state(self) -> None:
        """Zero every row's Adam moments and step counts (poses are kept)."""
        for buf in (self.exp_avg_rot, self.exp_avg_sq_rot, self.exp_avg_shift,
                    self.exp_avg_sq_shift, self.step, self.step_shift):
            buf.zero_()

    def _adam_rows(
        self, idx: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: Tensor,
        lr: float,
    ) -> Tensor:
        """Update the moments of rows ``idx`` in place and return the Adam step `(B, D)`."""
        beta1, beta2 = self.betas
        g = grad.detach().to(exp_avg.dtype)
        m = exp_avg[idx].mul_(beta1).add_(g, alpha=1 - beta1)
        v = exp_avg_sq[idx].mul_(beta2).addcmul_(g, g, value=1 - beta2)
        exp_avg[idx] = m
        exp_avg_sq[idx] = v
        t = step[idx].to(exp_avg.dtype).unsqueeze(-1)  # (B, 1)
        bias1 = 1 - beta1**t
        bias2 = 1 - beta2**t
        denom = (v.sqrt() / bias2.sqrt()).add_(self.eps)
        return -(lr / bias1) * m / denom

    def _check_indices(self, indices: Tensor, *, unique: bool) -> Tensor:
        if indices.ndim != 1 or indices.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"indices must be a 1-D integer tensor, got {tuple(indices.shape)} {indices.dtype}"
            )
        idx = indices.to(device=self.rotations.device, dtype=torch.int64)
        if idx.numel() == 0:
            return idx
        n = len(self)
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= n:
            raise IndexError(f"pose indices must lie in [0, {n}), got range [{lo}, {hi}]")
        if unique and torch.unique(idx).numel() != idx.numel():
            raise ValueError("pose indices of one update must be unique")
        return idx

    # ------------------------------------------------------------------ state

    def get_extra_state(self) -> PoseTableSettings:
        """Hyper-parameters, saved in ``state_dict()`` next to the buffers."""
        return {
            "lr_rot": self.lr_rot,
            "lr_shift": self.lr_shift,
            "betas": self.betas,
            "eps": self.eps,
            "max_shift_px": self.max_shift_px,
        }

    def set_extra_state(self, state: PoseTableSettings) -> None:
        """Restore the hyper-parameters saved by :meth:`get_extra_state`."""
        self.lr_rot = float(state["lr_rot"])
        self.lr_shift = float(state["lr_shift"])
        self.betas = (float(state["betas"][0]), float(state["betas"][1]))
        self.eps = float(state["eps"])
        ms = state["max_shift_px"]
        self.max_shift_px = None if ms is None else float(ms)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, object]) -> PoseTable:
        """A table rebuilt from ``state_dict()`` alone (sizes, dtype and device from it)."""
        rotations, shifts_px = state["rotations"], state["shifts_px"]
        if not isinstance(rotations, Tensor) or not isinstance(shifts_px, Tensor):
            raise TypeError("a PoseTable state needs the rotations and shifts_px tensors")
        table = cls(rotations, shifts_px)
        table.load_state_dict(state)
        return table

    def extra_repr(self) -> str:
        return (
            f"num_particles={len(self)}, lr_rot={self.lr_rot}, lr_shift={self.lr_shift}, "
            f"max_shift_px={self.max_shift_px}"
        )
