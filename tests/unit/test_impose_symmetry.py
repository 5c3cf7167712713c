"""The impose-symmetry step (cryospin.train.impose) on a synthetic D2 map turned by a known
rotation and shifted: the group is found, the rebuilt volume is D2-invariant, and the converted
poses predict the same images as before the step."""

from __future__ import annotations

import pytest
import torch
from test_symmetry_search import placed

from cryospin.errors import InputError
from cryospin.forward.model import render_real
from cryospin.forward.rigid import transform_map
from cryospin.pose import PoseTable
from cryospin.rotations import random_rotations
from cryospin.rundir import Checkpoint, Stage
from cryospin.symmetry import point_group_rotations
from cryospin.train.config import build_config
from cryospin.train.impose import (
    SymmetryStep,
    impose_symmetry,
    initial_group,
    rank0_frame,
    record_of,
)
from cryospin.volume import HartleyVolume

L = 24


def _correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation over the last two dimensions, `(...)`."""
    a = a - a.mean(dim=(-2, -1), keepdim=True)
    b = b - b.mean(dim=(-2, -1), keepdim=True)
    return (a * b).sum((-2, -1)) / ((a * a).sum((-2, -1)) * (b * b).sum((-2, -1))).sqrt()


def _c1_state(n: int = 6) -> tuple[HartleyVolume, PoseTable, torch.Tensor]:
    """A C1 volume of the turned, shifted D2 map, a pose table of ``n`` poses (with a few
    Adam steps' moments) and the shift t of the map."""
    V, _, t = placed("D2", box_px=L)
    volume = HartleyVolume.from_real_space(V.double())
    g = torch.Generator().manual_seed(5)
    R = random_rotations(n, generator=g).double()
    shifts = torch.randn(n, 2, generator=g, dtype=torch.float64)
    table = PoseTable(R, shifts)
    table.exp_avg_rot.fill_(0.1)
    table.step.fill_(3)
    return volume, table, t


@pytest.mark.parametrize("symmetry", ["D2", "auto"])
def test_impose_step_keeps_the_images(symmetry: str) -> None:
    volume, table, t = _c1_state()
    R, shifts = table.gather(torch.arange(len(table)))
    with torch.no_grad():
        before = render_real(volume(), R, shifts)  # (N, L, L)
    new, step = impose_symmetry(volume, table, symmetry)
    assert step.group == "D2" and new.point_group == "D2" and step.score > 0.9
    assert torch.allclose(step.centre_px, t, atol=0.3)  # the map's centre: its shift
    # the rebuilt volume is D2-invariant (signed permutations: to rounding)
    with torch.no_grad():
        W = new.to_real_space()
    turned = transform_map(W, point_group_rotations("D2")[1:])  # (3, L, L, L)
    assert float(_correlation(W.flatten()[None, None], turned.flatten(1)[:, None]).min()) > 0.999
    # the converted poses give the images of before (up to the map's resampling)
    R2, shifts2 = table.gather(torch.arange(len(table)))
    assert torch.allclose(R2, R @ step.rotation)
    with torch.no_grad():
        after = render_real(new(), R2, shifts2)
    assert float(_correlation(before, after).min()) > 0.99
    assert int(table.step.abs().sum()) == 0 and float(table.exp_avg_rot.abs().sum()) == 0.0
    record = record_of(step)
    assert record["group"] == "D2" and len(record["rotation"]) == 3


def test_c1_found_changes_nothing() -> None:
    volume, table, _ = _c1_state()
    R = table.rotations.clone()
    new, step = impose_symmetry(volume, table, "C1")
    assert new is volume and step.group == "C1" and torch.equal(table.rotations, R)


def test_initial_group() -> None:
    after = build_config(None, {"model": {"symmetry": "D7"}})
    assert initial_group(after, None) == "C1"
    assert initial_group(after, "D7") == "D7"  # the checkpoint's, after the step
    start = build_config(None, {"model": {"symmetry": "D7"},
                                "schedule": {"impose_symmetry": "start"}})
    assert initial_group(start, None) == "D7"
    amortized = build_config(None, {"model": {"symmetry": "D7"},
                                    "schedule": {"method": "amortized"}})
    assert initial_group(amortized, None) == "D7"  # it never switches: from the start
    assert initial_group(build_config(None, {"model": {"symmetry": "auto"}}), None) == "C1"


def test_auto_is_checked() -> None:
    with pytest.raises(InputError, match="auto"):
        build_config(None, {"model": {"symmetry": "auto"},
                            "schedule": {"impose_symmetry": "start"}})
    with pytest.raises(InputError, match="auto"):
        build_config(None, {"model": {"symmetry": "auto"}, "schedule": {"method": "cryoai"}})


def test_checkpoint_keeps_the_volume_group() -> None:
    ckpt = Checkpoint(config={}, stage=Stage.AUTODECODE, epoch=3, volume={},
                      volume_symmetry="D2")
    assert Checkpoint.from_dict(ckpt.to_dict()).volume_symmetry == "D2"
    old = ckpt.to_dict()
    del old["extra"]["volume_symmetry"]  # written before the field: None (model.symmetry)
    assert Checkpoint.from_dict(old).volume_symmetry is None


class _TwoRanks:
    """The sum over two ranks of ``all_sum``: this rank's tensor plus the other's, as a
    stand-in for a :class:`~cryospin.train.distributed.Shard` (``rank`` and ``all_sum``)."""

    def __init__(self, rank: int, other: torch.Tensor | None = None) -> None:
        self.rank, self.other = rank, other

    def all_sum(self, x: torch.Tensor) -> torch.Tensor:
        return x + (torch.zeros_like(x) if self.other is None else self.other)


def test_every_rank_takes_rank_0s_group_and_frame() -> None:
    """With ``auto`` the ranks may detect different groups (a score at the threshold); all
    impose rank 0's group, frame, centre and score."""
    g = torch.Generator().manual_seed(0)
    mine = SymmetryStep("C6", 0.81, random_rotations(1, generator=g)[0],
                        torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64), 1.0)
    theirs = SymmetryStep("D12", 0.79, random_rotations(1, generator=g)[0],
                          torch.tensor([0.0, 0.25, 0.0], dtype=torch.float64), 1.2)
    # rank 0 sends its numbers; rank 1 sends zeros: the sum is rank 0's numbers on both
    sent = {}

    class _Recorder(_TwoRanks):
        def all_sum(self, x: torch.Tensor) -> torch.Tensor:
            sent[self.rank] = x.clone()
            return super().all_sum(x)

    got0 = rank0_frame(mine, _Recorder(0))
    got1 = rank0_frame(theirs, _TwoRanks(1, other=sent[0]))
    for got in (got0, got1):
        assert got.group == "C6" and got.score == pytest.approx(0.81)
        assert torch.equal(got.rotation, mine.rotation)
        assert torch.equal(got.centre_px, mine.centre_px)
    assert got1.seconds == theirs.seconds  # each rank keeps its own timing
