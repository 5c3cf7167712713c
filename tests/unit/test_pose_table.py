"""Tests of cryospin.pose.PoseTable: sparse per-row Adam, SO(3), exp-map gradients, state."""

from __future__ import annotations

import pytest
import torch

from cryospin.pose import PoseTable
from cryospin.rotations import geodesic_distance_rad, random_rotations, skew, so3_exp

F64 = torch.float64


def _table(n: int = 10, seed: int = 0, **kwargs: object) -> PoseTable:
    gen = torch.Generator().manual_seed(seed)
    rots = random_rotations(n, generator=gen, dtype=F64)
    shifts = torch.randn(n, 2, generator=gen, dtype=F64)
    return PoseTable(rots, shifts, **kwargs)


def _buffers(table: PoseTable) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in table.named_buffers()}


def test_per_row_adam_matches_torch_adam_on_dense_copies() -> None:
    """Several steps over changing subsets: each row follows its own torch.optim.Adam."""
    lr_rot, lr_shift, betas, eps = 0.05, 0.2, (0.8, 0.99), 1e-6
    table = _table(lr_rot=lr_rot, lr_shift=lr_shift, betas=betas, eps=eps)
    r0, t0 = table.rotations.clone(), table.shifts_px.clone()
    n = len(table)
    omega = [torch.zeros(3, dtype=F64, requires_grad=True) for _ in range(n)]
    shift = [t0[i].clone().requires_grad_(True) for i in range(n)]
    opts = [
        torch.optim.Adam(
            [{"params": [omega[i]], "lr": lr_rot}, {"params": [shift[i]], "lr": lr_shift}],
            betas=betas, eps=eps,
        )
        for i in range(n)
    ]
    expected_r = r0.clone()
    schedule = [[7, 2, 5], [2, 9], [5, 7, 2, 0], [2], [9, 5, 2]]
    gen = torch.Generator().manual_seed(3)
    for rows in schedule:
        g_rot = torch.randn(len(rows), 3, generator=gen, dtype=F64)
        g_t = torch.randn(len(rows), 2, generator=gen, dtype=F64)
        table.apply_gradients(torch.tensor(rows), g_rot, g_t)
        for j, i in enumerate(rows):
            before = omega[i].detach().clone()
            omega[i].grad, shift[i].grad = g_rot[j].clone(), g_t[j].clone()
            opts[i].step()
            expected_r[i] = so3_exp(omega[i].detach() - before) @ expected_r[i]
    close = {"rtol": 1e-13, "atol": 0.0}
    for i in range(n):
        if omega[i] not in opts[i].state:
            continue
        st_rot, st_t = opts[i].state[omega[i]], opts[i].state[shift[i]]
        torch.testing.assert_close(table.exp_avg_rot[i], st_rot["exp_avg"], **close)
        torch.testing.assert_close(table.exp_avg_sq_rot[i], st_rot["exp_avg_sq"], **close)
        assert int(table.step[i]) == int(st_rot["step"])
        torch.testing.assert_close(table.exp_avg_shift[i], st_t["exp_avg"], **close)
        torch.testing.assert_close(table.exp_avg_sq_shift[i], st_t["exp_avg_sq"], **close)
        assert int(table.step_shift[i]) == int(st_t["step"])
    torch.testing.assert_close(table.shifts_px, torch.stack([s.detach() for s in shift]),
                               rtol=0, atol=1e-14)
    torch.testing.assert_close(table.rotations, expected_r, rtol=0, atol=1e-13)
    assert table.step.tolist() == [1, 0, 5, 0, 0, 3, 0, 2, 0, 2]


def test_rows_outside_the_batch_are_bitwise_untouched() -> None:
    table = _table(n=12, max_shift_px=5.0)
    before = _buffers(table)
    rows = torch.tensor([3, 8, 1])
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        table.apply_gradients(rows, torch.randn(3, 3, generator=gen, dtype=F64),
                              torch.randn(3, 2, generator=gen, dtype=F64))
    others = torch.tensor([i for i in range(12) if i not in (3, 8, 1)])
    for name, buf in table.named_buffers():
        assert torch.equal(buf[others], before[name][others]), name
        assert not torch.equal(buf[rows], before[name][rows]), name


def test_without_shift_gradient_shifts_and_their_state_are_untouched() -> None:
    table = _table()
    before = _buffers(table)
    table.apply_gradients(torch.tensor([1, 4]), torch.ones(2, 3, dtype=F64), None)
    for name in ("shifts_px", "exp_avg_shift", "exp_avg_sq_shift", "step_shift"):
        assert torch.equal(getattr(table, name), before[name]), name
    assert table.step.tolist()[1] == 1 and table.step.tolist()[4] == 1


def test_rotations_stay_in_so3_after_many_float32_updates() -> None:
    gen = torch.Generator().manual_seed(5)
    table = PoseTable(random_rotations(6, generator=gen, dtype=torch.float32), lr_rot=0.3)
    idx = torch.arange(6)
    for _ in range(300):
        table.apply_gradients(idx, torch.randn(6, 3, generator=gen))
    r = table.rotations
    assert r.dtype == torch.float32
    eye = torch.eye(3).expand(6, 3, 3)
    torch.testing.assert_close(r @ r.transpose(-1, -2), eye, rtol=0, atol=2e-6)
    torch.testing.assert_close(torch.linalg.det(r), torch.ones(6), rtol=0, atol=2e-6)


def test_shift_updates_are_clamped() -> None:
    table = PoseTable(torch.eye(3).expand(2, 3, 3), lr_shift=1.0, max_shift_px=1.5)
    for _ in range(5):
        table.apply_gradients(torch.tensor([0, 1]), torch.zeros(2, 3),
                              torch.tensor([[-1.0, 1.0], [1.0, 0.0]]))
    torch.testing.assert_close(table.shifts_px, torch.tensor([[1.5, -1.5], [-1.5, 0.0]]))


@pytest.mark.parametrize("omega0", [0.0, 1e-8])
def test_compose_gradient_is_finite_and_correct_near_zero(omega0: float) -> None:
    table = _table(n=5)
    idx = torch.tensor([4, 0, 2])
    omega = torch.full((3, 3), omega0, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w: table.compose(idx, w, None)[0], (omega,))
    # analytic: d/dω_j exp([ω]×) R at ω ≈ 0 is [e_j]× R (error O(|ω|))
    jac = torch.autograd.functional.jacobian(lambda w: table.compose(idx, w, None)[0], omega)
    assert torch.isfinite(jac).all()
    base = table.rotations[idx]
    for b in range(3):
        for j in range(3):
            e = torch.zeros(3, dtype=F64)
            e[j] = 1.0
            torch.testing.assert_close(jac[b, :, :, b, j], skew(e) @ base[b], rtol=0, atol=1e-7)


def test_compose_shift_and_perturbation_at_zero_equals_gather() -> None:
    table = _table()
    idx = torch.tensor([3, 1])
    omega, dt = table.perturbation(idx)
    assert omega.requires_grad and dt.requires_grad
    assert omega.shape == (2, 3) and dt.shape == (2, 2) and omega.dtype == F64
    rot, t = table.compose(idx, omega, dt)
    r_ref, t_ref = table.gather(idx)
    torch.testing.assert_close(rot, r_ref, rtol=0, atol=0)
    torch.testing.assert_close(t, t_ref, rtol=0, atol=0)
    (t.sum() + rot[:, 0, 0].sum()).backward()
    assert torch.equal(dt.grad, torch.ones(2, 2, dtype=F64))


def test_gather_returns_detached_copies() -> None:
    table = _table()
    r, t = table.gather(torch.tensor([0, 1]))
    r.zero_()
    t.zero_()
    assert not torch.equal(table.rotations[:2], r)
    assert not torch.equal(table.shifts_px[:2], t)


def test_training_loop_pattern_converges_to_target_rotations() -> None:
    gen = torch.Generator().manual_seed(11)
    n = 8
    target = random_rotations(n, generator=gen, dtype=F64)
    start = so3_exp(0.4 * torch.randn(n, 3, generator=gen, dtype=F64)) @ target
    table = PoseTable(start, lr_rot=0.02, lr_shift=0.05)
    t_target = torch.randn(n, 2, generator=gen, dtype=F64)
    err0 = geodesic_distance_rad(table.rotations, target).mean()
    for _ in range(150):
        idx = torch.randperm(n, generator=gen)[:4]
        omega, dt = table.perturbation(idx)
        rot, t = table.compose(idx, omega, dt)
        loss = (rot - target[idx]).square().sum() + (t - t_target[idx]).square().sum()
        g_omega, g_t = torch.autograd.grad(loss, (omega, dt))
        table.apply_gradients(idx, g_omega, g_t)
    err = geodesic_distance_rad(table.rotations, target).mean()
    assert err < 0.1 * err0
    assert (table.shifts_px - t_target).abs().max() < 0.2


def test_rejects_duplicate_and_out_of_range_indices() -> None:
    table = _table(n=4)
    with pytest.raises(ValueError, match="unique"):
        table.apply_gradients(torch.tensor([1, 1]), torch.zeros(2, 3, dtype=F64))
    with pytest.raises(IndexError, match="0, 4"):
        table.gather(torch.tensor([4]))
    with pytest.raises(ValueError, match="1-D integer"):
        table.gather(torch.tensor([0.0]))
    with pytest.raises(ValueError, match="grad_omega"):
        table.apply_gradients(torch.tensor([1]), torch.zeros(2, 3, dtype=F64))


def test_rejects_bad_construction() -> None:
    with pytest.raises(ValueError, match="rotations"):
        PoseTable(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="shifts_px"):
        PoseTable(torch.eye(3).expand(2, 3, 3), torch.zeros(3, 2))


def test_state_dict_round_trip_restores_everything() -> None:
    table = _table(lr_rot=0.07, lr_shift=0.3, betas=(0.5, 0.9), eps=1e-5, max_shift_px=4.0)
    gen = torch.Generator().manual_seed(2)
    idx = torch.tensor([0, 5, 6])
    table.apply_gradients(idx, torch.randn(3, 3, generator=gen, dtype=F64),
                          torch.randn(3, 2, generator=gen, dtype=F64))
    state = table.state_dict()
    clone = PoseTable.from_state_dict(state)
    assert (clone.lr_rot, clone.lr_shift, clone.betas, clone.eps, clone.max_shift_px) == (
        0.07, 0.3, (0.5, 0.9), 1e-5, 4.0
    )
    for name, buf in table.named_buffers():
        assert torch.equal(getattr(clone, name), buf), name
    g_rot, g_t = torch.randn(3, 3, generator=gen, dtype=F64), torch.randn(3, 2, generator=gen,
                                                                         dtype=F64)
    table.apply_gradients(idx, g_rot, g_t)
    clone.apply_gradients(idx, g_rot, g_t)
    for name, buf in table.named_buffers():
        assert torch.equal(getattr(clone, name), buf), name
