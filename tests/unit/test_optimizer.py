"""The encoder's and the volume's Adam: fused where possible, the same update as the plain one."""

from __future__ import annotations

import copy

import torch
from torch import nn

from cryospin.train.optimizer import adam


def _params(seed: int) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(shape, generator=gen, dtype=torch.float64))
            for shape in [(7, 5), (13,), (3, 4, 6)]]


def _run(opt: torch.optim.Optimizer, params: list[nn.Parameter], steps: range) -> None:
    for step in steps:
        gen = torch.Generator().manual_seed(1000 + step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype) * 10.0 ** (step % 3 - 1)
        opt.step()


def test_adam_is_fused_on_the_cpu():
    opt = adam(_params(0), lr=1e-3)
    assert opt.param_groups[0]["fused"] is True


def test_fused_adam_equals_the_plain_update_in_float64():
    fused_params, plain_params = _params(0), _params(0)
    fused = adam(fused_params, lr=3e-3)
    plain = torch.optim.Adam(plain_params, lr=3e-3, foreach=False)
    _run(fused, fused_params, range(25))
    _run(plain, plain_params, range(25))
    for a, b, start in zip(fused_params, plain_params, _params(0), strict=True):
        assert (a - start).abs().max() > 1e-2  # 25 steps of lr 3e-3 moved it
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_fused_adam_resumes_from_its_state_dict():
    params = _params(1)
    opt = adam(params, lr=1e-2)
    _run(opt, params, range(10))
    saved_params, saved_state = copy.deepcopy(params), copy.deepcopy(opt.state_dict())
    _run(opt, params, range(10, 20))

    resumed_params = [nn.Parameter(p.detach().clone()) for p in saved_params]
    resumed = adam(resumed_params, lr=1e-2)
    resumed.load_state_dict(saved_state)
    _run(resumed, resumed_params, range(10, 20))
    for a, b in zip(params, resumed_params, strict=True):
        assert torch.equal(a, b)
