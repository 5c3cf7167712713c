"""``winner_nll``: stage 1's winner-take-all loss with only the winners rendered with autograd
equals the minimum over all heads of ``predict_nll`` in value and gradient (float64)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from cryospin.encoder import EncoderOutput
from cryospin.forward.lattice import disc_frequencies, negation_permutation
from cryospin.rotations import random_rotations
from cryospin.train.autoencode import predict_nll, winner_nll
from cryospin.train.data import Batch, sub_disc

L, B, M = 12, 5, 4


class _FixedPoses(nn.Module):
    """An 'encoder' whose hypotheses are learnable parameters (float64), one set per image."""

    def __init__(self, generator: torch.Generator, shifts: bool) -> None:
        super().__init__()
        rot = random_rotations(B * M, generator=generator).reshape(B, M, 3, 3)
        self.rotations = nn.Parameter(rot.to(torch.float64))
        self.shifts_px = nn.Parameter(torch.randn(B, M, 2, generator=generator,
                                                  dtype=torch.float64)) if shifts else None
        self.num_heads = M

    def forward(self, images: torch.Tensor) -> EncoderOutput:
        return EncoderOutput(self.rotations, self.shifts_px)


@pytest.mark.parametrize(("shifts", "ctf", "radius"), [
    (False, False, None), (True, True, None), (True, True, 3.5),
])
def test_winner_nll_equals_min_of_all_heads_in_value_and_gradient(shifts, ctf, radius) -> None:
    g = torch.Generator().manual_seed(7)
    f64 = {"dtype": torch.float64}
    freqs = disc_frequencies(L, L // 2 - 1).to(torch.float64)  # (P, 2)
    P = freqs.shape[0]
    data = SimpleNamespace(frequencies=freqs, negation_index=negation_permutation(freqs, L),
                           noise_variance=0.7, box_px=L)
    batch = Batch(indices=torch.arange(B), images=torch.randn(B, L, L, generator=g, **f64),
                  hartley=torch.randn(B, P, generator=g, **f64),
                  ctf=torch.rand(B, P, generator=g, **f64) if ctf else None)
    disc = None if radius is None else sub_disc(freqs, L, radius)
    volume = torch.randn(L, L, L, generator=g, **f64)

    def run(fn):
        enc = _FixedPoses(torch.Generator().manual_seed(3), shifts)
        vol = volume.clone().requires_grad_(True)
        out = fn(enc, vol)
        out[0].sum().backward()
        grads = [vol.grad, enc.rotations.grad] + ([enc.shifts_px.grad] if shifts else [])
        return out, grads

    (ref_nll, ref_best), ref_grads = run(
        lambda e, v: predict_nll(e, v, batch, data, disc)[0].min(dim=1))
    (nll, best, rot, shift, hyp), grads = run(lambda e, v: winner_nll(e, v, batch, data, disc))
    assert torch.equal(best, ref_best)
    rows = torch.arange(B)
    enc = _FixedPoses(torch.Generator().manual_seed(3), shifts)
    torch.testing.assert_close(rot, enc.rotations[rows, best], rtol=0, atol=0)
    torch.testing.assert_close(hyp, enc.rotations.detach(), rtol=0, atol=0)
    assert (shift is None) == (not shifts)
    if shifts:
        torch.testing.assert_close(shift, enc.shifts_px[rows, best], rtol=0, atol=0)
    assert len(set(best.tolist())) > 1  # the test exercises several winning heads
    torch.testing.assert_close(nll, ref_nll, rtol=1e-12, atol=1e-12)
    for g_ref, g_new in zip(ref_grads, grads, strict=True):
        assert g_new.abs().sum() > 0
        torch.testing.assert_close(g_new, g_ref, rtol=1e-10, atol=1e-12)
