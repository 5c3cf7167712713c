"""Stage 2 (auto-decoding): per-particle pose refinement alternating with volume updates.

For each batch: ``pose_steps`` steps of the per-row Adam of :class:`cryospin.pose.PoseTable`
(``R ← exp([ω]×) · R``, ``t ← t + δt``) against the current volume (held fixed), then one Adam
step of the volume with the refined poses. Only the rows of the batch are touched.

Optionally (:class:`RotationSearch`, the first epochs after the switch), each batch first runs
a global search: the NLL of every image against every rotation of a fixed, near-uniform grid
of SO(3) (and, with shifts, every shift of a grid) is evaluated on a small low-frequency disc
(two matrix products), and a particle's pose is replaced by the best grid pose when that fits
better than its current one. With ``optim.search_candidates = K > 1`` the decision moves to a
wider disc (:func:`decide_candidates`): the ``K`` best grid poses are polished by a pattern
search there, and the best replaces the pose when it beats it there; the low frequencies
cannot tell a pseudo-symmetric particle's copies apart under coloured noise.
This rescues the particles whose stage-1 pose sits in a wrong basin, which local refinement
cannot leave. The pose steps of the search epochs may fit a low-frequency disc only
(:func:`search_refine_disc`, ``optim.search_refine_radius_px``), and those of the local
epochs the frequencies up to a resolution (:func:`local_refine_disc`,
``optim.local_refine_resolution_angstrom``); the volume steps fit the whole training disc.

Optionally (:class:`SymmetryCopies`, a pseudo-symmetry placed in the map by
:mod:`cryospin.train.relax`), each batch then scores every particle's pose at its ``|G|``
symmetry-related copies and keeps the best: the jump between the protomer copies of a
pseudo-symmetric particle that local refinement cannot make.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cryospin.errors import InputError
from cryospin.forward.model import render
from cryospin.forward.shifts import shift_hartley
from cryospin.forward.slicing import extract_central_slices
from cryospin.losses import class_responsibility, gaussian_nll
from cryospin.pose import PoseTable
from cryospin.rotations import geodesic_distance_deg, quaternion_to_matrix, so3_exp, so3_log
from cryospin.rundir import Stage
from cryospin.symmetry import asymmetric_unit, point_group_rotations
from cryospin.train.autoencode import EpochStats
from cryospin.train.config import Config
from cryospin.train.data import Batch, LossDisc, TrainingData, sub_disc
from cryospin.train.distributed import Shard, local_batches
from cryospin.train.metrics import RunningMean, check_finite_gradients, check_finite_loss
from cryospin.train.schedule import search_radius_px
from cryospin.train.scores import junk_log_likelihood_ratio, score_from_nll

__all__ = [
    "autodecode_epoch",
    "SymmetryCopies",
    "move_to_best_copies",
    "epoch_search",
    "search_refine_disc",
    "local_refine_disc",
    "local_refine_radius",
    "JUMP_THRESHOLD_DEG",
    "CANDIDATE_MARGIN_NATS",
    "pose_change_deg",
    "pose_nll",
    "pose_prediction",
    "refine_poses",
    "RotationSearch",
    "super_fibonacci_rotations",
    "search_rotations",
    "search_top_poses",
    "polish_rotations",
    "polish_step_deg",
    "decide_candidates",
    "shift_grid",
    "remove_common_rotation",
]

#: A rotation that moves by more than this in one epoch jumped to another basin (a global-search
#: replacement or a hop between pseudo-symmetric copies) rather than being refined locally: the
#: 8,192-rotation search grid's covering radius is ~10 deg (a replacement inside the right basin
#: moves a pose by at most that, local steps by a few degrees), while a hop between the protomer
#: copies of a pseudo-C3 particle moves it by ~120 deg.
JUMP_THRESHOLD_DEG = 20.0

#: With ``optim.search_candidates > 1``, an image's other basins are weighed on the decision
#: disc only when one of their grid poses fits within this many nats of its current pose on
#: the search's own disc (:func:`decide_candidates`). Under the true map of the 64 px spike
#: (20,000 particles, SNR 0.1, whitened), from a wrong protomer copy the true pose's best grid
#: pose was at most 2.0 nats worse than the copy on 6 cycles/box in 99 % of the particles (at
#: most 1.4 with coloured noise), while from the true pose another basin came within 5 nats in
#: 13 % (ADK 11 %; coloured spike 84 %): benchmarks/RESULTS.md, "The search's decision on a
#: wider disc".
CANDIDATE_MARGIN_NATS = 5.0


def super_fibonacci_rotations(n: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """``n`` deterministic, near-uniform rotations `(n, 3, 3)` (super-Fibonacci spiral).

    Unit quaternions ``q_i = (r sin α, r cos α, ρ sin β, ρ cos β)`` with ``s = i + ½``,
    ``r = √(s/n)``, ``ρ = √(1 − s/n)``, ``α = 2π s / √2``, ``β = 2π s / ψ`` (``ψ`` the real
    root of ``ψ⁴ = ψ + 4``), as in Alexa, "Super-Fibonacci spirals", CVPR 2022.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    psi = 1.533751168755204288118041
    s = torch.arange(n, dtype=torch.float64) + 0.5
    r, rho = (s / n).sqrt(), (1.0 - s / n).sqrt()
    alpha, beta = 2 * math.pi * s / math.sqrt(2.0), 2 * math.pi * s / psi
    q = torch.stack(
        [r * alpha.sin(), r * alpha.cos(), rho * beta.sin(), rho * beta.cos()], dim=-1
    )  # (n, 4)
    return quaternion_to_matrix(q).to(dtype)


def shift_grid(max_shift_px: float, step_px: float, dtype: torch.dtype = torch.float32) -> Tensor:
    """Shifts ``(tx, ty)`` `(S, 2)` on a square grid of spacing ``step_px`` within
    ``[−max_shift_px, max_shift_px]`` per axis (the pose table's bound), ``(0, 0)`` included."""
    if not step_px > 0:
        raise ValueError(f"step_px must be > 0, got {step_px}")
    n = int(math.floor(max_shift_px / step_px + 1e-9))
    axis = torch.arange(-n, n + 1, dtype=torch.float64) * step_px  # (2n+1,)
    ty, tx = torch.meshgrid(axis, axis, indexing="ij")
    return torch.stack([tx.reshape(-1), ty.reshape(-1)], dim=-1).to(dtype)


@dataclass(frozen=True)
class RotationSearch:
    """A global pose search: the rotation grid, an optional shift grid, and the disc it is
    scored on.

    Attributes
    ----------
    rotations : `(R, 3, 3)`
        Candidate rotations.
    disc : LossDisc
        Frequencies of the score (a sub-disc of the training disc).
    shifts_px : `(S, 2)` or None
        Candidate shifts ``(tx, ty)`` (pixels), searched jointly with the rotations; None keeps
        each image's current shift.
    candidates : int
        How the jump is decided (:func:`decide_candidates`): 1, the best grid pose against the
        current one on ``disc``; ``K > 1``, each image's ``K`` best grid poses, polished, and
        the current pose compared on ``decision_disc``.
    decision_disc : LossDisc or None
        The disc of the decision among ``K > 1`` candidates; None: the training disc.
    group : `(G, 3, 3)` or None
        The volume's point group when the grid covers one asymmetric unit (None: C1): a
        candidate ``R`` is in the basin of a pose ``Q`` when some ``R g`` is.
    polish_sweeps : int
        Sweeps of the candidates' pattern search (:func:`polish_rotations`).
    """

    rotations: Tensor
    disc: LossDisc
    shifts_px: Tensor | None = None
    candidates: int = 1
    decision_disc: LossDisc | None = None
    group: Tensor | None = None
    polish_sweeps: int = 1

    @property
    def polish_step(self) -> float:
        """The candidates' polishing step, degrees: :func:`polish_step_deg` of the grid's
        density over SO(3), ``R·|G|`` rotations (``R`` of one asymmetric unit of ``G``)."""
        group_order = 1 if self.group is None else self.group.shape[0]
        return polish_step_deg(self.rotations.shape[0] * group_order)

    @classmethod
    def build(cls, data: TrainingData, num_rotations: int, radius_px: float,
              shifts_px: Tensor | None = None, symmetry: str = "C1", candidates: int = 1,
              decision_disc: LossDisc | None = None, polish_sweeps: int = 1) -> RotationSearch:
        """Super-Fibonacci grid of ``num_rotations`` on the disc ``|k| ≤ radius_px``; with a
        point group, only its points in one asymmetric unit
        (:func:`cryospin.symmetry.asymmetric_unit`: the density stays that of
        ``num_rotations`` over SO(3), about ``num_rotations / |G|`` rotations are searched)."""
        grid = super_fibonacci_rotations(num_rotations)
        group = point_group_rotations(symmetry)
        if group.shape[0] > 1:
            grid = asymmetric_unit(grid, group)
        grid = grid.to(data.frequencies.device)
        shifts = None if shifts_px is None else shifts_px.to(data.frequencies)
        return cls(grid, sub_disc(data.frequencies, data.box_px, radius_px), shifts,
                   candidates, decision_disc, group.to(grid) if group.shape[0] > 1 else None,
                   polish_sweeps)


def polish_step_deg(num_rotations: int) -> float:
    """Half the median distance (degrees) from a random rotation to its nearest rotation of a
    grid of ``num_rotations`` spread over SO(3): ``½ (6π ln 2 / R)^(1/3)`` rad, since a ball
    of radius ``θ ≪ 1`` holds the fraction ``θ³ / (6π)`` of SO(3) (3.35° for 8,192; the
    super-Fibonacci grid's measured median is 6.1°, i.e. 3.07° halved)."""
    return 0.5 * math.degrees((6.0 * math.pi * math.log(2.0) / num_rotations) ** (1.0 / 3.0))


def search_rotations(
    volume_ht: Tensor,
    search: RotationSearch,
    batch: Batch,
    data: TrainingData,
    shifts_px: Tensor | None = None,
    chunk: int = 4096,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Best grid pose of every image of ``batch`` and its NLL on ``search.disc``:
    :func:`search_top_poses` with one candidate, `(B, 3, 3)`, `(B,)`, `(B, 2)` or None."""
    rot, nll, shift = search_top_poses(volume_ht, search, batch, data, shifts_px, chunk, 1)
    return rot[:, 0], nll[:, 0], None if shift is None else shift[:, 0]


def search_top_poses(
    volume_ht: Tensor,
    search: RotationSearch,
    batch: Batch,
    data: TrainingData,
    shifts_px: Tensor | None = None,
    chunk: int = 4096,
    top_k: int = 1,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The ``top_k`` best grid poses of every image of ``batch`` and their NLL on
    ``search.disc``, best first.

    With observed ``y`` `(B, P')`, CTF ``c`` and the slice ``s_r`` of grid rotation ``r``,
    ``NLL[b, r] = Σ_p (y − c s_r)² / (2σ²) = (Σ y² − 2 (y∘c)·s_r + (c²)·(s_r²)) / (2σ²)``:
    two matrix products per chunk of ``chunk`` rotations. A shift ``t`` is applied by
    shifting the observation by ``−t`` (equivalent to shifting the prediction by ``t``: the
    shift is orthogonal on a negation-closed disc, so ``Σ y²`` does not change); with a shift
    grid (``search.shifts_px``, ``S`` shifts) the cross term is computed for every shifted
    observation, ``S`` times the cost of the rotation-only search.

    Parameters
    ----------
    volume_ht : `(L, L, L)`
        Hartley volume (held fixed).
    search : RotationSearch
    batch : Batch
        On the full training disc.
    data : TrainingData
    shifts_px : `(B, 2)`, optional
        Current in-plane shifts of the images (used when the search has no shift grid).
    chunk : int
        Grid rotations per matrix product (memory ``B × S × chunk``; reduced for large ``S``).
    top_k : int
        Poses kept per image (at most the grid's ``S × R``).

    Returns
    -------
    rotations : `(B, K, 3, 3)`
    nll : `(B, K)`
        Ascending.
    shifts_px : `(B, K, 2)` or None
        The grid shifts (None without a shift grid).
    """
    disc = search.disc
    restricted = batch.restrict(disc)
    y = restricted.hartley  # (B, P')
    B = y.shape[0]
    if search.shifts_px is not None:
        cand = search.shifts_px  # (S, 2)
        S = cand.shape[0]
        yy = y[:, None, :].expand(B, S, y.shape[1])  # (B, S, P')
        tt = (-cand)[None].expand(B, S, 2)
        y_s = shift_hartley(yy, yy[..., disc.negation_index], tt, disc.frequencies,
                            data.box_px)  # (B, S, P')
    else:
        if shifts_px is not None:
            y = shift_hartley(y, y[:, disc.negation_index], -shifts_px, disc.frequencies,
                              data.box_px)  # (B, P')
        S = 1
        y_s = y[:, None, :]  # (B, 1, P')
    c = torch.ones_like(y) if restricted.ctf is None else restricted.ctf  # (B, P')
    yc = (y_s * c[:, None, :]).reshape(B * S, -1)  # (B·S, P')
    c2 = c * c  # (B, P')
    y2 = y.square().sum(-1)  # (B,)
    best_sq = y.new_empty((B, 0))  # (B, ≤ K), without the constant Σ y²
    best_flat = torch.empty((B, 0), dtype=torch.long, device=y.device)  # s · R + r
    R_total = search.rotations.shape[0]
    step = max(64, chunk // max(1, S // 4))
    for start in range(0, R_total, step):
        grid = search.rotations[start:start + step]
        slices = extract_central_slices(volume_ht, grid.to(volume_ht.dtype),
                                        frequencies=disc.frequencies)  # (r, P')
        cross = (yc @ slices.T).reshape(B, S, -1)  # (B, S, r)
        quad = c2 @ slices.square().T  # (B, r)
        sq = (quad[:, None, :] - 2.0 * cross).reshape(B, -1)  # (B, S·r) over (s, r)
        value, index = sq.topk(min(top_k, sq.shape[1]), dim=1, largest=False)
        r_len = grid.shape[0]
        flat = (index // r_len) * R_total + index % r_len + start
        best_sq = torch.cat([best_sq, value], dim=1)
        best_flat = torch.cat([best_flat, flat], dim=1)
        if best_sq.shape[1] > top_k:
            best_sq, keep = best_sq.topk(top_k, dim=1, largest=False)
            best_flat = best_flat.gather(1, keep)
    best_sq, order = best_sq.sort(dim=1)
    best_flat = best_flat.gather(1, order)
    best_nll = (best_sq + y2[:, None]) * (0.5 / data.noise_variance)
    best_rot = search.rotations[best_flat % R_total]
    best_shift = None if search.shifts_px is None else search.shifts_px[best_flat // R_total]
    return best_rot, best_nll, best_shift


#: Unit rotation axes of the candidates' pattern search (:func:`polish_rotations`).
_PATTERN_AXES = torch.cat([torch.eye(3, dtype=torch.float64), -torch.eye(3, dtype=torch.float64)])


def polish_rotations(
    volume_ht: Tensor, rotations: Tensor, shifts_px: Tensor | None, batch: Batch,
    data: TrainingData, disc: LossDisc | None = None, *, step_deg: float, sweeps: int = 1,
) -> tuple[Tensor, Tensor]:
    """Candidate rotations improved by a pattern search, and their NLL (as
    :func:`pose_nll`: on the training disc, or on ``disc`` when ``batch`` is restricted to it).

    Each sweep tries ``R ← exp(±step·e_i) R`` for the six unit axes in turn and keeps every
    move that lowers the candidate's NLL (shifts held).

    Parameters
    ----------
    volume_ht : `(L, L, L)`
    rotations : `(B, K, 3, 3)`
        ``K`` candidate poses of each of ``B`` images.
    shifts_px : `(B, K, 2)` or None
        Their shifts (pixels), held fixed.
    batch : Batch
        The ``B`` images.
    data : TrainingData
    disc : LossDisc or None
    step_deg : float
        The move's angle.
    sweeps : int

    Returns
    -------
    rotations : `(B, K, 3, 3)`
    nll : `(B, K)`
    """
    lattice = data if disc is None else disc
    ctf = None if batch.ctf is None else batch.ctf[:, None]  # (B, 1, P')

    def nll_of(rot: Tensor) -> Tensor:
        pred = render(volume_ht, rot, shifts_px, ctf, frequencies=lattice.frequencies,
                      negation_index=lattice.negation_index)  # (B, K, P')
        return gaussian_nll(pred, batch.hartley, data.noise_variance)  # (B, K)

    best = rotations
    best_nll = nll_of(best)
    moves = so3_exp(_PATTERN_AXES * math.radians(step_deg)).to(rotations)  # (6, 3, 3)
    for _ in range(sweeps):
        for move in moves:
            cand = move @ best
            cand_nll = nll_of(cand)
            better = cand_nll < best_nll
            best = torch.where(better[..., None, None], cand, best)
            best_nll = torch.where(better, cand_nll, best_nll)
    return best, best_nll


def decide_candidates(
    volume_ht: Tensor, search: RotationSearch, batch: Batch, data: TrainingData,
    rotations: Tensor, shifts_px: Tensor | None,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """The global search with ``search.candidates = K > 1``: each image's ``K`` best grid
    poses on the search's low-frequency disc, polished (:func:`polish_rotations`, step
    ``search.polish_step``) on ``search.decision_disc``, and the best of them, to be
    compared there with the current pose.

    The search's own disc is chosen for speed and for a map that is still blurred; a
    pseudo-symmetric particle's copies differ at higher frequencies, and coloured noise is
    strongest at the lowest ones, so the choice among basins is taken where they differ. An
    unpolished grid pose (~6° from the image's pose for 8,192 rotations) would lose to a
    refined current pose on that wider disc. Every candidate is polished, those in the
    current pose's own basin too: with only the other basins' candidates polished (against
    the current pose, polished or not) the best of several polished starts beat the single
    current pose by chance, and 8-9 % of the white-noise spike's particles kept hopping
    between its copies in every search epoch (benchmarks/RESULTS.md, "The search's decision
    on a wider disc"). An image whose ``K`` candidates all lie in its current pose's basin
    (within :data:`JUMP_THRESHOLD_DEG`, modulo ``search.group``) has no basin to choose: it
    is not polished and keeps its pose for the pose steps, and so is one whose other basins'
    grid poses all fit worse than its current pose on the search's disc by more than
    :data:`CANDIDATE_MARGIN_NATS`: a search that has settled polishes only the images whose
    basin is in doubt.

    Parameters
    ----------
    rotations : `(B, 3, 3)`
        The images' current rotations.
    shifts_px : `(B, 2)` or None
        Their current shifts (None: no shifts used).

    Returns
    -------
    rotations : `(B, 3, 3)`, shifts_px : `(B, 2)` or None
        The best polished candidate of each image (its grid shift, or the current shift);
        an image whose candidates were not polished gets its best grid pose.
    better : `(B,)` bool
        Where that candidate fits better than the current pose on the decision disc.
    """
    grid_rot, grid_nll, grid_shift = search_top_poses(volume_ht, search, batch, data,
                                                      shifts_px, top_k=search.candidates)
    B, K = grid_rot.shape[:2]
    cand_shift = grid_shift if grid_shift is not None else (
        None if shifts_px is None else shifts_px[:, None].expand(B, K, 2))
    current = rotations.to(grid_rot)
    far = pose_change_deg(current[:, None].expand_as(grid_rot).reshape(-1, 3, 3),
                          grid_rot.reshape(-1, 3, 3), search.group).reshape(B, K) \
        > JUMP_THRESHOLD_DEG  # (B, K), modulo the group
    current_coarse = pose_nll(volume_ht, current, shifts_px, batch.restrict(search.disc), data,
                              search.disc)  # (B,)
    plausible = far & (grid_nll <= current_coarse[:, None] + CANDIDATE_MARGIN_NATS)
    rows = plausible.any(dim=1).nonzero(as_tuple=True)[0]  # (n,) images with a basin to choose
    better = torch.zeros(B, dtype=torch.bool, device=grid_rot.device)
    chosen = grid_rot[:, 0].clone()
    chosen_shift = None if cand_shift is None else cand_shift[:, 0].clone()
    if rows.numel() == 0:
        return chosen, chosen_shift, better
    disc = search.decision_disc  # None: the training disc
    doubt = batch.select(rows)  # (n,) images
    if disc is not None:
        doubt = doubt.restrict(disc)
    polished, nll = polish_rotations(
        volume_ht, grid_rot[rows], None if cand_shift is None else cand_shift[rows], doubt,
        data, disc, step_deg=search.polish_step, sweeps=search.polish_sweeps)
    best_nll, best = nll.min(dim=1)  # (n,)
    pick = torch.arange(rows.numel(), device=best.device)
    now = pose_nll(volume_ht, current[rows], None if shifts_px is None else shifts_px[rows],
                   doubt, data, disc)  # (n,)
    chosen[rows] = polished[pick, best]
    if chosen_shift is not None and cand_shift is not None:
        chosen_shift[rows] = cand_shift[rows][pick, best]
    better[rows] = best_nll < now
    return chosen, chosen_shift, better


def _apply_search(
    pose_table: PoseTable, volume_ht: Tensor, search: RotationSearch, batch: Batch,
    data: TrainingData, refine_shifts: bool,
) -> int:
    """Replace the rows of ``batch`` whose best grid pose beats their pose (with
    ``search.candidates > 1``: their best polished candidate, :func:`decide_candidates`);
    return count."""
    idx = batch.indices
    rot, shift = pose_table.gather(idx)
    shift_used = shift if refine_shifts else None
    if not refine_shifts and search.shifts_px is not None:
        raise ValueError("a shift grid needs refine_shifts")
    if search.candidates > 1:
        grid_rot, grid_shift, better = decide_candidates(volume_ht, search, batch, data, rot,
                                                         shift_used)
        if search.shifts_px is None:
            grid_shift = None  # the current shift, kept
    else:
        grid_rot, grid_nll, grid_shift = search_rotations(volume_ht, search, batch, data,
                                                          shift_used)
        current = pose_nll(volume_ht, rot, shift_used, batch.restrict(search.disc), data,
                           search.disc)  # (B,)
        better = grid_nll < current  # (B,)
    _jump_rows(pose_table, idx[better], grid_rot[better],
               None if grid_shift is None else grid_shift[better])
    return int(better.sum())


@torch.no_grad()
def _jump_rows(pose_table: PoseTable, rows: Tensor, rotations: Tensor,
               shifts_px: Tensor | None) -> None:
    """Rows ``rows`` `(n,)` of ``pose_table`` jump to ``rotations`` `(n, 3, 3)` (and
    ``shifts_px`` `(n, 2)`, when given); their Adam moments and step counts are zeroed."""
    if rows.numel() == 0:
        return
    pose_table.rotations[rows] = rotations.to(pose_table.rotations.dtype)
    for buf in (pose_table.exp_avg_rot, pose_table.exp_avg_sq_rot):
        buf[rows] = 0
    pose_table.step[rows] = 0
    if shifts_px is not None:
        pose_table.shifts_px[rows] = shifts_px.to(pose_table.shifts_px.dtype)
        for buf in (pose_table.exp_avg_shift, pose_table.exp_avg_sq_shift):
            buf[rows] = 0
        pose_table.step_shift[rows] = 0


@dataclass(frozen=True)
class SymmetryCopies:
    """A (pseudo-)symmetry placed in the map: the map ``V`` is (nearly) symmetric about the
    centre ``c`` under each rotation ``g``, ``V(g(r − c) + c) ≈ V(r)``.

    Attributes
    ----------
    rotations : `(G − 1, 3, 3)`
        The group's elements other than the identity, in the map's frame (``M g₀ Mᵀ`` of the
        conventional elements ``g₀``); the pose itself is the identity's copy.
    centre_px : `(3,)`
        ``c``, xyz pixels from ``L//2``.
    """

    rotations: Tensor
    centre_px: Tensor

    @classmethod
    def placed(cls, group: str, frame: Tensor, centre_px: Tensor,
               device: torch.device) -> SymmetryCopies:
        """The copies of ``group`` placed in a map with the frame ``M`` `(3, 3)` and centre
        ``c`` `(3,)` (:func:`cryospin.symmetry_search.place_group`): ``M g₀ Mᵀ`` for every
        element but the identity, float32 on ``device``."""
        g0 = point_group_rotations(group).double()[1:]  # identity first: left out
        frame = frame.double().cpu()
        return cls((frame @ g0 @ frame.T).float().to(device), centre_px.float().to(device))

    def poses(self, rotations: Tensor, shifts_px: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Each pose's copies: ``R g`` `(B, G − 1, 3, 3)` and ``t + (R (1 − g) c)_xy``
        `(B, G − 1, 2)` (None without shifts), which give the images that ``(R, t)`` gives of
        an exactly symmetric map (``docs/conventions.md``, "Symmetry")."""
        g = self.rotations.to(rotations)
        copies = rotations[:, None] @ g[None]
        if shifts_px is None:
            return copies, None
        d = (torch.eye(3, dtype=g.dtype, device=g.device) - g) @ self.centre_px.to(g)  # (G, 3)
        moved = (rotations[:, None] @ d[None, :, :, None])[..., :2, 0]  # (B, G, 2)
        return copies, shifts_px[:, None].to(moved) + moved


def move_to_best_copies(
    pose_table: PoseTable, volume_ht: Tensor, copies: SymmetryCopies, batch: Batch,
    data: TrainingData, refine_shifts: bool, disc: LossDisc | None = None,
) -> int:
    """Each row of ``batch`` moves to the copy of its pose (:meth:`SymmetryCopies.poses`)
    with the lowest NLL on the training disc (or on ``disc``, the batch restricted to it
    here), when it fits better than the pose; the moved rows' Adam moments are zeroed.
    Returns how many rows moved."""
    view = batch if disc is None else batch.restrict(disc)
    rot, shift = pose_table.gather(batch.indices)
    cand_rot, cand_shift = copies.poses(rot, shift if refine_shifts else None)
    nll = torch.stack([
        pose_nll(volume_ht, cand_rot[:, k], None if cand_shift is None else cand_shift[:, k],
                 view, data, disc)
        for k in range(cand_rot.shape[1])
    ], dim=1)  # (B, G − 1)
    current = pose_nll(volume_ht, rot, shift if refine_shifts else None, view, data,
                       disc)  # (B,)
    best_nll, best = nll.min(dim=1)
    better = best_nll < current
    pick = torch.arange(len(best), device=best.device)
    _jump_rows(pose_table, batch.indices[better], cand_rot[pick, best][better],
               None if cand_shift is None else cand_shift[pick, best][better])
    return int(better.sum())


def remove_common_rotation(
    before: Tensor, after: Tensor, shard: Shard | None = None
) -> Tensor:
    """``after`` `(B, 3, 3)` with the batch's common rotation in the map frame taken out.

    Poses ``R Qᵀ`` with the map rotated by ``Q`` give the same images (the global-rotation
    ambiguity, ``cryospin.evaluate.pose_error``), so a change ``R → R·exp(c)`` shared by all
    rows moves nothing but the frame — and a map that rotates a little with every volume step,
    followed by poses refined only once per epoch, leaves the rows visited early and late in an
    epoch in different frames. With ``c`` = the mean over the batch (over all ranks with a
    ``shard``) of ``log(Rᵢ,beforeᵀ Rᵢ,after)`` `(3,)`, returns ``Rᵢ,after · exp(−c)``: the
    poses' refinement keeps each row's own change and the map must follow the poses.
    """
    w = so3_log(before.transpose(-1, -2) @ after)  # (B, 3), map frame
    total = torch.cat([w.sum(0), w.new_tensor([float(w.shape[0])])])  # (4,)
    if shard is not None:
        total = shard.all_sum(total)
    if float(total[3]) == 0:
        return after
    c = total[:3] / total[3]  # (3,)
    return after @ so3_exp(-c).to(after)


def pose_nll(
    volume_ht: Tensor, rotations: Tensor, shifts_px: Tensor | None, batch: Batch,
    data: TrainingData, disc: LossDisc | None = None,
) -> Tensor:
    """Per-image NLL `(B,)` of poses ``rotations`` `(B, 3, 3)`, ``shifts_px`` `(B, 2)` or None;
    on the training disc, or on ``disc`` when ``batch`` is restricted to it
    (:meth:`Batch.restrict`)."""
    pred = pose_prediction(volume_ht, rotations, shifts_px, batch, data, disc)  # (B, P)
    return gaussian_nll(pred[:, None, :], batch.hartley, data.noise_variance)[:, 0]  # (B,)


def pose_prediction(
    volume_ht: Tensor, rotations: Tensor, shifts_px: Tensor | None, batch: Batch,
    data: TrainingData, disc: LossDisc | None = None,
) -> Tensor:
    """The predicted images `(B, P)` (Hartley, on the training disc or on ``disc``) that
    :func:`pose_nll` scores."""
    return render(
        volume_ht,
        rotations,
        shifts_px,
        batch.ctf,
        frequencies=data.frequencies if disc is None else disc.frequencies,
        negation_index=data.negation_index if disc is None else disc.negation_index,
    )


def refine_poses(
    pose_table: PoseTable,
    volume_ht: Tensor,
    batch: Batch,
    data: TrainingData,
    *,
    steps: int,
    refine_shifts: bool,
    epoch: int = 0,
    batch_number: int = 0,
    disc: LossDisc | None = None,
) -> None:
    """``steps`` per-row Adam steps on the poses of ``batch.indices`` against a fixed volume.

    The loss of each row is that image's NLL (summed over the batch, so rows do not interact);
    on ``disc`` when given (``batch`` restricted to it), else on the training disc.
    """
    idx = batch.indices
    volume_ht = volume_ht.detach()
    for _ in range(steps):
        omega, dt = pose_table.perturbation(idx)
        rot, shift = pose_table.compose(idx, omega, dt if refine_shifts else None)
        nll = pose_nll(volume_ht, rot, shift if refine_shifts else None, batch, data,
                       disc)  # (B,)
        total = nll.sum()
        check_finite_loss(total, Stage.AUTODECODE, epoch, batch_number)
        if refine_shifts:
            g_omega, g_dt = torch.autograd.grad(total, (omega, dt))
            check_finite_gradients({"poses": (g_omega, g_dt)}, Stage.AUTODECODE, epoch,
                                   batch_number)
            pose_table.apply_gradients(idx, g_omega, g_dt)
        else:
            (g_omega,) = torch.autograd.grad(total, (omega,))
            check_finite_gradients({"poses": (g_omega,)}, Stage.AUTODECODE, epoch, batch_number)
            pose_table.apply_gradients(idx, g_omega, None)


def pose_change_deg(before: Tensor, after: Tensor, symmetry: Tensor | None = None) -> Tensor:
    """How far each pose moved, `(B,)` degrees, from ``before`` to ``after`` `(B, 3, 3)`:
    the angle of ``beforeᵀ after``, or with a point group ``symmetry`` `(G, 3, 3)` the
    smallest over ``g`` of the angle of ``beforeᵀ after g`` (poses ``R`` and ``R g`` give the
    same images of a symmetric map)."""
    if symmetry is None:
        return geodesic_distance_deg(before, after)
    moved = after[:, None] @ symmetry.to(after)[None]  # (B, G, 3, 3)
    return geodesic_distance_deg(before[:, None], moved).amin(dim=1)


def autodecode_epoch(
    volume: nn.Module,
    pose_table: PoseTable,
    data: TrainingData,
    decoder_optimizer: torch.optim.Optimizer,
    *,
    batch_size: int,
    pose_steps: int,
    refine_shifts: bool,
    generator: torch.Generator,
    epoch: int,
    progress: Callable[[int, float], None] | None = None,
    search: RotationSearch | None = None,
    shard: Shard | None = None,
    anchor_frame: bool = False,
    symmetry: Tensor | None = None,
    relax: SymmetryCopies | None = None,
    refine_disc: LossDisc | None = None,
    empty_class: bool = False,
    junk_class: bool = False,
    junk_weights: bool = True,
) -> EpochStats:
    """One pass over the particles in random order (drawn from ``generator``).

    Parameters
    ----------
    volume : HartleyVolume
    pose_table : PoseTable
        Updated in place (its buffers), rows of each batch only.
    data : TrainingData
    decoder_optimizer : torch.optim.Optimizer
        Over ``volume.parameters()``.
    batch_size, pose_steps : int
    refine_shifts : bool
        Whether shifts are refined and used.
    generator : torch.Generator
        CPU generator of the batch order.
    epoch : int
        For error messages.
    progress : callable, optional
        Called after each batch with ``(images_in_batch, batch_loss)``.
    search : RotationSearch, optional
        Run a global rotation search on each batch before the pose steps.
    shard : cryospin.train.distributed.Shard, optional
        Distributed run: this rank searches and refines the rows it owns in each global batch,
        the volume gradients are averaged over the ranks and the returned statistics are those
        of all ranks.
    anchor_frame : bool
        After the pose steps of each batch, take out the batch's common rotation
        (:func:`remove_common_rotation`; not in search epochs, whose grid jumps are no drift).
    symmetry : `(G, 3, 3)`, optional
        The volume's point group: pose changes (and jumps) are measured modulo it
        (:func:`pose_change_deg`), since ``R`` and ``R g`` are the same pose.
    relax : SymmetryCopies, optional
        A pseudo-symmetry of the C1 map: each batch's poses first move to their best copy
        (after the search, before the pose steps).
    refine_disc : LossDisc, optional
        A smaller disc (:func:`search_refine_disc` in a search epoch, :func:`local_refine_disc`
        in a local one) the pose steps fit (the search and the
        copies are scored on their own discs); the volume step and the returned loss use the
        training disc. None: the pose steps fit the training disc too.
    empty_class : bool
        The image model has a second class, an empty image (``model.empty_class``): each
        image's NLL in the volume step is weighted by the posterior probability that it holds
        the particle (:func:`cryospin.losses.class_responsibility` of its score after the
        pose steps), and only images more likely particle than empty count in the jump
        fraction.
    junk_class : bool
        The image model has junk as a class too (``model.junk_class``): a signal of the
        map's power at the batch's poses with random phases
        (:func:`cryospin.train.scores.junk_log_likelihood_ratio`, pooled over the global
        batch). The weight is then the particle's posterior among all the
        classes (:func:`cryospin.losses.class_responsibility`), and only images likeliest
        the particle count in the jump fraction.
    junk_weights : bool
        With ``junk_class``: whether the junk class is in effect (False: it is only
        counted; the weights and the jump fraction are those without it;
        :func:`cryospin.train.scores.junk_takes_effect`).

    Returns
    -------
    EpochStats
        With ``jump_fraction``: the fraction of visited particles whose rotation moved by more
        than :data:`JUMP_THRESHOLD_DEG` from the start of their batch to its end (with
        ``empty_class``, of those more likely particle than empty); with ``relax``,
        ``relaxed_fraction``: the fraction that moved to another copy; with ``empty_class``
        or ``junk_class``, ``empty_fraction``: the fraction of visited images likeliest
        empty; with ``junk_class``, ``junk_fraction``: those likeliest junk.

    Raises
    ------
    NonFiniteLossError
        If a loss is NaN/Inf.
    NonFiniteGradientError
        If a gradient of the poses or the volume is NaN/Inf (before it is applied).
    """
    running = RunningMean()
    rot_change = RunningMean()
    shift_change = RunningMean()
    jumps = 0  # visited particles whose rotation moved > JUMP_THRESHOLD_DEG
    relaxed = 0  # visited particles moved to another copy (relax)
    empty = 0  # visited images likeliest empty (empty_class)
    junk = 0  # visited images likeliest junk (junk_class)
    counted = 0  # visited images whose jumps count (likeliest the particle among the weights)
    batches = data.epoch_batches(batch_size, generator)
    for b, (batch, total) in enumerate(local_batches(batches, shard), start=1):
        idx = batch.indices
        rot0, shift0 = pose_table.gather(batch.indices)
        with torch.no_grad():
            volume_fixed = volume()
            if search is not None:
                _apply_search(pose_table, volume_fixed, search, batch, data, refine_shifts)
            if relax is not None:
                relaxed += move_to_best_copies(pose_table, volume_fixed, relax, batch, data,
                                               refine_shifts)
        refine_poses(
            pose_table, volume_fixed,
            batch if refine_disc is None else batch.restrict(refine_disc), data,
            steps=pose_steps, refine_shifts=refine_shifts, epoch=epoch, batch_number=b,
            disc=refine_disc,
        )
        if anchor_frame and search is None:
            pose_table.rotations[idx] = remove_common_rotation(
                rot0, pose_table.rotations[idx], shard)
        rot, shift = pose_table.gather(batch.indices)
        pred = pose_prediction(volume(), rot, shift if refine_shifts else None, batch, data)
        nll = gaussian_nll(pred[:, None, :], batch.hartley, data.noise_variance)[:, 0]  # (B,)
        loss = nll.mean()
        weighted = nll
        is_particle = None
        if empty_class or junk_class:
            score = score_from_nll(nll.detach(), batch, data)  # (B,) against empty
            junk_llr = (junk_log_likelihood_ratio(pred.detach(), batch, data,
                                                  reduce=None if shard is None else shard.all_sum)
                        if junk_class else None)
            weight = class_responsibility(score, junk_llr if junk_weights else None,
                                          empty=empty_class)  # (B,)
            weighted = nll * weight.to(nll.dtype)
            is_particle, is_empty, is_junk = _likeliest(score, junk_llr, empty_class,
                                                        junk_weights)
        objective = weighted.mean() if shard is None else shard.objective(weighted, total)
        check_finite_loss(objective, Stage.AUTODECODE, epoch, b)
        decoder_optimizer.zero_grad(set_to_none=True)
        objective.backward()
        if shard is not None:
            shard.average_gradients(volume.parameters())
        check_finite_gradients({"volume": (p.grad for p in volume.parameters())},
                               Stage.AUTODECODE, epoch, b)
        decoder_optimizer.step()
        n = int(idx.numel())
        if n == 0:  # distributed: none of this batch's particles is on this rank
            continue
        running.add(float(loss.detach()), n)
        change_deg = pose_change_deg(rot0, rot, symmetry)  # (B,)
        rot_change.add(float(change_deg.mean()), n)
        jumped = change_deg > JUMP_THRESHOLD_DEG
        if is_particle is not None:
            jumped &= is_particle
            counted += int(is_particle.sum())
            empty += int(is_empty.sum())
            junk += int(is_junk.sum())
        else:
            counted += n
        jumps += int(jumped.sum())
        if refine_shifts:
            shift_change.add(float((shift - shift0).norm(dim=-1).mean()), n)
        if progress is not None:
            progress(n, float(loss.detach()))
    if shard is not None:  # statistics of all ranks
        sums = shard.all_sum(torch.tensor([running.total, running.weight, rot_change.total,
                                           shift_change.total, float(jumps), float(relaxed),
                                           float(empty), float(junk), float(counted)]))
        running.total, running.weight = float(sums[0]), float(sums[1])
        rot_change.total, rot_change.weight = float(sums[2]), float(sums[1])
        shift_change.total, shift_change.weight = float(sums[3]), float(sums[1])
        jumps, relaxed = round(float(sums[4])), round(float(sums[5]))
        empty, junk = round(float(sums[6])), round(float(sums[7]))
        counted = round(float(sums[8]))
    return EpochStats(
        loss=running.mean,
        num_images=int(running.weight),
        mean_pose_change_deg=rot_change.mean,
        mean_shift_change_px=shift_change.mean if refine_shifts else None,
        jump_fraction=jumps / counted if counted > 0 else None,
        relaxed_fraction=(relaxed / running.weight if relax is not None and running.weight > 0
                          else None),
        empty_fraction=(empty / running.weight if (empty_class or junk_class)
                        and running.weight > 0 else None),
        junk_fraction=(junk / running.weight if junk_class and running.weight > 0 else None),
        junk_weighted=(junk_weights if junk_class else None),
    )


def _likeliest(score: Tensor, junk_llr: Tensor | None, empty_class: bool,
               junk_weights: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Masks `(B,)` of the images likeliest the particle among the classes in the weights
    (junk only with ``junk_weights``: a class not yet in effect changes nothing), and of
    those likeliest empty and likeliest junk among all the model's classes (reported; ties:
    neither the particle nor junk)."""
    none = torch.zeros_like(score, dtype=torch.bool)
    floor = torch.zeros_like(score) if empty_class else torch.full_like(score, -torch.inf)
    if junk_llr is None:
        return score > floor, (score <= floor) if empty_class else none, none
    rival = torch.maximum(floor, junk_llr) if junk_weights else floor
    is_empty = (score <= 0) & (junk_llr <= 0) if empty_class else none
    return score > rival, is_empty, junk_llr > torch.maximum(score, floor)


def search_refine_disc(config: Config, data: TrainingData) -> LossDisc | None:
    """The disc a search epoch's pose steps fit: ``|k| <= optim.search_refine_radius_px``
    (cycles per box) of the training disc, or None (the training disc) when that is unset or
    reaches the training disc's largest frequency."""
    return _inner_disc(data, config.optim.search_refine_radius_px)


def local_refine_radius(angstrom: float | None, extent_angstrom: float) -> float | None:
    """The local epochs' pose-step radius ``extent / angstrom`` (cycles per box) for a box of
    ``extent_angstrom`` (``L·apix``); None when ``angstrom`` is None or the extent unknown
    (``<= 0``).

    Raises
    ------
    InputError
        If the resolution is coarser than the box itself (a radius below 1 cycle per box).
    """
    if angstrom is None or not extent_angstrom > 0:
        return None
    radius = extent_angstrom / angstrom
    if radius < 1:
        raise InputError(f"optim.local_refine_resolution_angstrom {angstrom:g} Å is coarser "
                         f"than the box itself ({extent_angstrom:.4g} Å, 1 cycle per box)")
    return radius


def local_refine_disc(config: Config, data: TrainingData) -> LossDisc | None:
    """The disc a local epoch's pose steps fit: the training disc's frequencies up to
    ``optim.local_refine_resolution_angstrom``, ``|k| <= L·apix / Å`` cycles per box (``L`` and
    ``apix`` of the training box, :func:`local_refine_radius`); None (the training disc) when
    that is unset, when the pixel size is unknown, or when the resolution is at or below what
    the training disc reaches."""
    return _inner_disc(data, local_refine_radius(config.optim.local_refine_resolution_angstrom,
                                                 data.box_px * data.pixel_size_angstrom))


def _inner_disc(data: TrainingData, radius_px: float | None) -> LossDisc | None:
    """The training disc's frequencies with ``|k| <= radius_px`` (cycles per box); None when
    ``radius_px`` is None or reaches the training disc's largest frequency (the whole disc)."""
    if radius_px is None or radius_px >= float(data.frequencies.norm(dim=-1).max()):
        return None
    return sub_disc(data.frequencies, data.box_px, radius_px)


def epoch_search(config: Config, data: TrainingData, stage2_epoch: int,
                 symmetry: str) -> RotationSearch | None:
    """The global search of stage-2 epoch ``stage2_epoch`` (1-based) over an asymmetric unit
    of the volume's group ``symmetry``, or None. With a group other than C1, on a disc of
    radius ``optim.search_radius_symmetric_px`` when that is given (at most the training
    disc's)."""
    largest = float(data.frequencies.norm(dim=-1).max())
    radius = search_radius_px(config, stage2_epoch, largest)
    if radius is None:
        return None
    o = config.optim
    if o.search_radius_symmetric_px is not None and symmetry.upper() != "C1":
        radius = min(o.search_radius_symmetric_px, largest)
    shifts = None
    if config.model.predict_shifts and o.search_shift_step_px is not None:
        shifts = shift_grid(config.model.max_shift_px, o.search_shift_step_px)
    return RotationSearch.build(data, o.search_rotations, radius, shifts_px=shifts,
                                symmetry=symmetry, candidates=o.search_candidates,
                                decision_disc=search_refine_disc(config, data),
                                polish_sweeps=o.search_polish_sweeps)
