"""Symmetry relaxation (``model.relax_symmetry``, :mod:`cryospin.train.relax`): the copies of
a pose under a pseudo-symmetry placed in the map, the per-batch choice among them, the
placement, and the configuration's checks."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tests._synthetic import blob_volume, synthetic_particles

from cryospin.errors import InputError
from cryospin.forward.model import render
from cryospin.pose import PoseTable
from cryospin.rotations import geodesic_distance_deg, random_rotations
from cryospin.symmetry import point_group_rotations
from cryospin.symmetry_search import poses_in_group_frame
from cryospin.train.autodecode import SymmetryCopies, autodecode_epoch, move_to_best_copies
from cryospin.train.config import DataConfig, build_config
from cryospin.train.data import TrainingData, prepare_data
from cryospin.train.relax import place_copies, relax_record, relaxed_group
from cryospin.volume import HartleyVolume

F64 = torch.float64


def _copies(gen: torch.Generator, symbol: str, *, centre_px: torch.Tensor | None = None,
            dtype: torch.dtype = F64) -> tuple[SymmetryCopies, torch.Tensor]:
    """The group ``symbol`` (all but its identity, element 0) in a random frame ``M``:
    ``(copies, M)``."""
    frame = random_rotations(1, generator=gen, dtype=dtype)[0]
    g0 = point_group_rotations(symbol).to(dtype)[1:]
    centre = torch.zeros(3, dtype=dtype) if centre_px is None else centre_px.to(dtype)
    return SymmetryCopies(frame @ g0 @ frame.T, centre), frame


def test_the_copies_are_the_poses_of_the_group_frame_moved_by_each_element():
    """Float64 property: ``(R g, t + (R (1 − g) c)_xy)`` is what the group frame's poses
    (:func:`poses_in_group_frame`: ``R M``, ``t + (R c)_xy``) become when moved by ``g₀`` there
    and brought back — the same images of a map symmetric about ``c``."""
    gen = torch.Generator().manual_seed(0)
    centre = torch.randn(3, generator=gen, dtype=F64) * 3
    copies, frame = _copies(gen, "D3", centre_px=centre)
    rotations = random_rotations(5, generator=gen, dtype=F64)
    shifts = torch.randn(5, 2, generator=gen, dtype=F64)
    got_rot, got_shift = copies.poses(rotations, shifts)  # (5, 5, 3, 3), (5, 5, 2)
    assert got_shift is not None
    w_rot, w_shift = poses_in_group_frame(rotations, shifts, frame, centre)
    for k, g0 in enumerate(point_group_rotations("D3").to(F64)[1:]):
        moved = w_rot @ g0  # the same images of W, symmetric under g0 about 0
        back_rot = moved @ frame.T  # W's pose R' M -> V's pose R'
        back_shift = w_shift - (back_rot @ centre)[:, :2]
        torch.testing.assert_close(got_rot[:, k], back_rot, rtol=0, atol=1e-12)
        torch.testing.assert_close(got_shift[:, k], back_shift, rtol=0, atol=1e-12)
    no_shift_rot, none = copies.poses(rotations, None)
    assert none is None
    torch.testing.assert_close(no_shift_rot, got_rot, rtol=0, atol=0)


def test_an_exactly_symmetric_map_renders_every_copy_alike():
    """Float64: a map made C4-symmetric about z by exact quarter turns of its voxels (odd
    box: the centre voxel is fixed) renders each pose and its four copies to the same image,
    to rounding; an asymmetric map does not."""
    assert bool((point_group_rotations("C4")[0] == torch.eye(3)).all())
    gen = torch.Generator().manual_seed(1)
    L = 15
    blobs = blob_volume(L, gen)
    sym = sum(torch.rot90(blobs, k, dims=(1, 2)) for k in range(4))
    rotations = random_rotations(6, generator=gen, dtype=F64)
    copies = SymmetryCopies(point_group_rotations("C4").to(F64)[1:], torch.zeros(3, dtype=F64))
    cand, _ = copies.poses(rotations, None)
    cand = torch.cat([rotations[:, None], cand], dim=1)  # the pose and its 3 copies
    for vol, same in ((sym, True), (blobs, False)):
        ht = HartleyVolume.from_real_space(vol).to(F64)().detach()
        images = render(ht, cand.reshape(-1, 3, 3)).reshape(6, 4, -1)
        spread = (images - images[:, :1]).abs().amax() / images.abs().amax()
        assert (spread < 1e-10) if same else (spread > 1e-2), float(spread)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> TrainingData:
    """32 synthetic particles of 16 px with their CTFs, prepared for training (the tests render
    their own images where they need known poses)."""
    particles = synthetic_particles(tmp_path_factory.mktemp("relax"), box_px=16, n=32, seed=3)
    return prepare_data(particles, DataConfig())


@pytest.mark.parametrize("with_shifts", [False, True])
def test_each_row_moves_to_the_copy_that_explains_its_image(data, with_shifts):
    """Noise-free images of an asymmetric map at the true poses; the table holds each pose
    moved to a copy under a C3 in a random frame (the identity for some; with shifts, a C3
    about an off-origin centre, so each copy's shift differs): the choice brings every row
    back to its true pose, moves only the rows that were off, and zeroes their Adam moments
    only."""
    gen = torch.Generator().manual_seed(2)
    n = len(data)
    ht = HartleyVolume.from_real_space(blob_volume(data.box_px, gen).float())().detach()
    truth = random_rotations(n, generator=gen, dtype=torch.float32)
    shifts = (torch.rand(n, 2, generator=gen) - 0.5) * 2 if with_shifts else None
    centre = torch.tensor([1.5, -1.0, 0.5]) if with_shifts else None
    copies, _ = _copies(gen, "C3", centre_px=centre, dtype=torch.float32)
    which = torch.randint(0, 3, (n,), generator=gen)  # 0: the pose itself, 1, 2: its copies
    cand_rot, cand_shift = copies.poses(truth, shifts)
    pick, copy = torch.arange(n), (which - 1).clamp(min=0)
    start = torch.where((which == 0)[:, None, None], truth, cand_rot[pick, copy])
    start_shift = None
    if shifts is not None and cand_shift is not None:
        start_shift = torch.where((which == 0)[:, None], shifts, cand_shift[pick, copy])
        assert float((start_shift - shifts).abs().max()) > 0.5  # the copies' shifts differ
    table = PoseTable(start.clone(), None if start_shift is None else start_shift.clone(),
                      lr_rot=0.05, lr_shift=0.05)
    table.exp_avg_rot.fill_(1.0)
    batch = data.batch(torch.arange(n))
    batch = dataclasses.replace(batch, hartley=render(ht, truth, shifts, batch.ctf,
                                                      frequencies=data.frequencies,
                                                      negation_index=data.negation_index))
    moved = move_to_best_copies(table, ht, copies, batch, data, refine_shifts=with_shifts)
    off = which != 0
    assert moved == int(off.sum()) > 0
    assert float(geodesic_distance_deg(table.rotations, truth).max()) < 1e-3
    if shifts is not None:
        assert float((table.shifts_px - shifts).abs().max()) < 1e-4
    assert bool((table.exp_avg_rot[off] == 0).all())
    assert bool((table.exp_avg_rot[~off] == 1).all())
    again = move_to_best_copies(table, ht, copies, batch, data, refine_shifts=with_shifts)
    assert again == 0  # the true pose beats its copies


def test_an_epoch_reports_the_fraction_relaxed(data):
    """``autodecode_epoch`` with ``relax`` moves the rows and reports the fraction; without,
    ``relaxed_fraction`` is None."""
    gen = torch.Generator().manual_seed(5)
    volume = HartleyVolume.ab_initio(data.box_px, data.radial_amplitude.cpu(), generator=gen)
    optimizer = torch.optim.Adam(volume.parameters(), lr=1e-3)
    copies, _ = _copies(gen, "C2", dtype=torch.float32)
    for relax in (copies, None):
        table = PoseTable(random_rotations(len(data), generator=gen, dtype=torch.float32), None,
                          lr_rot=0.05,
                          lr_shift=0.05)
        stats = autodecode_epoch(volume, table, data, optimizer, batch_size=8, pose_steps=1,
                                 refine_shifts=False, generator=torch.Generator().manual_seed(1),
                                 epoch=2, relax=relax)
        if relax is None:
            assert stats.relaxed_fraction is None
        else:
            assert stats.relaxed_fraction is not None and 0 < stats.relaxed_fraction < 1


def _group_map(gen: torch.Generator, symbol: str = "C3",
               L: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """A map built exactly ``symbol``-symmetric in a random frame ``Q`` (blob centres
    ``Q g p``), float64 `(L, L, L)`, and ``Q``."""
    q = random_rotations(1, generator=gen, dtype=F64)[0]
    g0 = point_group_rotations(symbol).to(F64)
    k = torch.arange(L, dtype=F64) - L // 2
    z, y, x = torch.meshgrid(k, k, k, indexing="ij")
    points = (torch.rand(4, 3, generator=gen, dtype=F64) - 0.5) * L * 0.4
    vol = torch.zeros(L, L, L, dtype=F64)
    for p in points:
        for g in g0:
            cx, cy, cz = (q @ g @ p).tolist()
            vol += torch.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (2 * 2.0 ** 2))
    return vol, q


@pytest.mark.parametrize("group", ["C3", "auto"])
def test_the_group_is_placed_in_the_map_frame(group):
    """On a C3 map of :func:`_group_map` (given C3, or detected by ``auto``): the placed
    copies are ``Q g Qᵀ``, each within 3 deg, with a high score, and the centre lies on the
    axis."""
    gen = torch.Generator().manual_seed(3)
    vol, q = _group_map(gen)
    g0 = point_group_rotations("C3").to(F64)
    frame = place_copies(HartleyVolume.from_real_space(vol.float()), group)
    assert frame.step.group == "C3" and frame.step.score > 0.9
    assert frame.copies is not None
    want = q @ g0[1:] @ q.T  # element 0 is the identity
    got = frame.copies.rotations.to(F64)
    assert got.shape == (2, 3, 3)
    dist = geodesic_distance_deg(got[:, None], want[None])  # (2, 2)
    assert float(dist.amin(dim=1).max()) < 3.0
    axis = q[:, 2]  # the C3 axis, through the origin
    centre = frame.copies.centre_px.to(F64)
    assert float((centre - (centre @ axis) * axis).norm()) < 0.5  # the centre is on it


def test_auto_relaxes_nothing_on_a_map_without_symmetry():
    """Random blobs: ``auto`` finds no group (``C1``) and gives no copies; the epoch's record
    says so, with nothing moved."""
    gen = torch.Generator().manual_seed(5)
    vol = blob_volume(32, gen, n_blobs=7)
    frame = place_copies(HartleyVolume.from_real_space(vol.float()), "auto")
    assert frame.step.group == "C1" and frame.copies is None
    record = relax_record(frame, None)
    assert record["group"] == record["detected"] == "C1" and record["moved_fraction"] == 0.0


def test_auto_relaxes_nothing_on_a_map_with_a_dihedral_group():
    """An exactly D3-symmetric map: ``auto`` detects D3 but relaxes nothing (a non-cyclic group
    is taken for an exact symmetry, whose copies are the same image); the record keeps what was
    detected. Given explicitly, D3 is relaxed."""
    vol, _ = _group_map(torch.Generator().manual_seed(4), "D3")
    volume = HartleyVolume.from_real_space(vol.float())
    frame = place_copies(volume, "auto")
    assert frame.step.group == "D3" and frame.copies is None
    record = relax_record(frame, None)
    assert (record["group"], record["detected"], record["moved_fraction"]) == ("C1", "D3", 0.0)
    given = place_copies(volume, "D3")
    assert given.copies is not None and given.copies.rotations.shape == (5, 3, 3)
    assert relax_record(given, 0.25)["group"] == "D3"


def test_auto_applies_only_to_a_c1_run_that_switches():
    """``relaxed_group``: the configured group; ``auto`` in a C1 semi-amortized run; nothing
    for ``C1``, for ``auto`` with an imposed group or with a method that never switches (no
    error: a preset can carry ``auto``)."""
    cases = [({}, None), ({"model": {"relax_symmetry": "C3"}}, "C3"),
             ({"model": {"relax_symmetry": "auto"}}, "auto"),
             ({"model": {"relax_symmetry": "AUTO"}}, "auto"),
             ({"model": {"relax_symmetry": "auto", "symmetry": "D7"}}, None),
             ({"model": {"relax_symmetry": "auto"}, "schedule": {"method": "amortized"}}, None)]
    for overrides, want in cases:
        assert relaxed_group(build_config("default", overrides)) == want, overrides
    assert relaxed_group(build_config("paper-synthetic")) == "auto"  # the preset carries it
    assert relaxed_group(build_config("paper-synthetic",
                                      {"schedule": {"method": "amortized"}})) is None


def test_relax_symmetry_is_checked_with_clear_messages():
    assert build_config("default").model.relax_symmetry == "C1"
    config = build_config("paper-synthetic", {"model": {"relax_symmetry": "C3"}})
    assert config.model.relax_symmetry == "C3"
    bad = [({"model": {"relax_symmetry": "C0"}}, "model.relax_symmetry"),
           ({"model": {"relax_symmetry": "C3", "symmetry": "D7"}}, "give one of them"),
           ({"model": {"relax_symmetry": "C3"}, "schedule": {"method": "amortized"}},
            "never switches")]
    for overrides, words in bad:
        with pytest.raises(InputError, match=words):
            build_config("default", overrides)


def test_the_flag_reaches_the_config():
    import argparse

    from cryospin.cli import reconstruct as cli
    from cryospin.cli.flags import reconstruct as flags

    parser = argparse.ArgumentParser()
    flags.add_args(parser)
    args = parser.parse_args(["p.star", "-o", "run", "--relax-symmetry", "C3"])
    assert build_config("default", cli._overrides(args)).model.relax_symmetry == "C3"
