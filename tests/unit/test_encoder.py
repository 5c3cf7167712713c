"""Tests of cryospin.encoder.MultiHeadPoseEncoder (small boxes and widths, to stay fast)."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from cryospin.encoder import EncoderOutput, MultiHeadPoseEncoder
from cryospin.losses import winner_take_all
from cryospin.rotations import geodesic_distance_deg


def _images(b: int, L: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, L, L, generator=torch.Generator().manual_seed(seed))


def _encoder(L: int = 16, m: int = 5, **kwargs: object) -> MultiHeadPoseEncoder:
    torch.manual_seed(0)
    kwargs.setdefault("width_multiplier", 0.125)
    kwargs.setdefault("head_hidden", 32)
    return MultiHeadPoseEncoder(L, m, **kwargs)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16])
def test_output_shapes_so3_and_bounded_shifts(dtype: torch.dtype | None) -> None:
    enc = _encoder(predict_shifts=True, max_shift_px=3.0, autocast_dtype=dtype)
    out = enc(_images(4, 16))
    assert isinstance(out, EncoderOutput)
    assert out.rotations.shape == (4, 5, 3, 3) and out.rotations.dtype == torch.float32
    assert out.shifts_px.shape == (4, 5, 2) and out.shifts_px.dtype == torch.float32
    assert out.shifts_px.abs().max() <= 3.0
    r = out.rotations
    eye = torch.eye(3).expand_as(r)
    torch.testing.assert_close(r @ r.transpose(-1, -2), eye, rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.linalg.det(r), torch.ones(4, 5), rtol=0, atol=1e-5)


def test_no_shifts_unless_asked() -> None:
    rotations, shifts = _encoder()(_images(2, 16))
    assert rotations.shape == (2, 5, 3, 3) and shifts is None


def test_heads_start_with_well_separated_rotations() -> None:
    enc = _encoder(m=7, width_multiplier=0.25, head_hidden=256)
    out = enc(_images(8, 16))
    for i, j in itertools.combinations(range(7), 2):
        dist = geodesic_distance_deg(out.rotations[:, i], out.rotations[:, j])  # (B,)
        assert dist.min() > 30.0, (i, j, dist)


def test_per_image_standardisation_makes_output_invariant_to_affine_intensity() -> None:
    enc = _encoder(predict_shifts=True, max_shift_px=2.0).eval()
    x = _images(3, 16)
    scaled = 7.5 * x - 2.0
    a, b = enc(x), enc(scaled)
    torch.testing.assert_close(a.rotations, b.rotations, rtol=0, atol=1e-4)
    torch.testing.assert_close(a.shifts_px, b.shifts_px, rtol=0, atol=1e-4)


@pytest.mark.parametrize("L", [8, 21, 40])
def test_small_and_odd_boxes(L: int) -> None:
    out = _encoder(L=L, m=2)(_images(2, L))
    assert out.rotations.shape == (2, 2, 3, 3)


def test_channel_widths_follow_the_vgg16_layout() -> None:
    enc = MultiHeadPoseEncoder(16, 1, width_multiplier=0.5, head_hidden=8)
    convs = [m.out_channels for m in enc.trunk if isinstance(m, nn.Conv2d)]
    assert convs == [32, 32, 64, 64, 128, 128, 128] + [256] * 6
    assert sum(isinstance(m, nn.MaxPool2d) for m in enc.trunk) == 5
    assert enc.feature_dim == 256 * 4
    tiny = MultiHeadPoseEncoder(16, 1, width_multiplier=0.01, head_hidden=8)
    assert {m.out_channels for m in tiny.trunk if isinstance(m, nn.Conv2d)} == {8}


def test_gradient_reaches_trunk_and_only_winning_heads() -> None:
    enc = _encoder(m=4)
    out = enc(_images(3, 16))
    target = torch.eye(3)
    loss_bm = (out.rotations - target).square().sum((-2, -1))  # (B, M)
    loss, best = winner_take_all(loss_bm)
    loss.backward()
    for name, p in enc.trunk.named_parameters():  # every trunk parameter, not only the first
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name
    winners = set(best.tolist())
    for m in range(4):
        g = enc.heads.weight3.grad[m]
        assert (g.abs().sum() > 0) == (m in winners), m


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_trunk_uses_channels_last_and_is_close_to_float32(dtype: torch.dtype) -> None:
    enc32 = _encoder(width_multiplier=0.25).eval()
    enc16 = _encoder(width_multiplier=0.25, autocast_dtype=dtype).eval()
    enc16.load_state_dict(enc32.state_dict())
    conv = next(m for m in enc16.trunk if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    x = _images(4, 16)
    dist = geodesic_distance_deg(enc32(x).rotations, enc16(x).rotations)
    assert dist.max() < 5.0, dist


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_training_step_gives_float32_gradients_to_every_parameter(
    dtype: torch.dtype,
) -> None:
    enc = _encoder(autocast_dtype=dtype, predict_shifts=True, max_shift_px=1.0)
    out = enc(_images(2, 16))
    (out.rotations.sum() + out.shifts_px.sum()).backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        assert bool(torch.isfinite(p.grad).all()), name
        assert float(p.grad.abs().sum()) > 0, name  # the gradient reaches every parameter


def test_input_box_feeds_the_trunk_the_fourier_cropped_image() -> None:
    """An encoder on 32 px images with a 16 px input box is the 16 px encoder applied to the
    Fourier-cropped images (same weights: the trunk ends in an adaptive pool)."""
    from cryospin.forward.resample import fourier_crop_2d

    big = _encoder(L=32, input_box_px=16, predict_shifts=True, max_shift_px=2.0).eval()
    small = _encoder(L=16, predict_shifts=True, max_shift_px=2.0).eval()
    small.load_state_dict(big.state_dict())
    x = _images(3, 32)
    a, b = big(x), small(fourier_crop_2d(x, 16))
    torch.testing.assert_close(a.rotations, b.rotations, rtol=0, atol=1e-5)
    torch.testing.assert_close(a.shifts_px, b.shifts_px, rtol=0, atol=1e-5)
    assert _encoder(L=32, input_box_px=32).input_box_px == 32


def test_input_box_and_autocast_dtype_are_checked() -> None:
    with pytest.raises(ValueError, match="input_box_px"):
        MultiHeadPoseEncoder(32, 2, input_box_px=15)
    with pytest.raises(ValueError, match="input_box_px"):
        MultiHeadPoseEncoder(32, 2, input_box_px=64)
    with pytest.raises(ValueError, match="autocast_dtype"):
        MultiHeadPoseEncoder(32, 2, autocast_dtype=torch.float64)


def test_rejects_bad_arguments_and_inputs() -> None:
    with pytest.raises(ValueError, match="max_shift_px"):
        MultiHeadPoseEncoder(32, 2, predict_shifts=True)
    with pytest.raises(ValueError, match="num_heads"):
        MultiHeadPoseEncoder(32, 0)
    enc = _encoder()
    with pytest.raises(ValueError, match="expected images"):
        enc(torch.zeros(2, 1, 16, 16))
    with pytest.raises(ValueError, match="expected images"):
        enc(torch.zeros(2, 20, 20))


# --------------------------------------------------------------- the reference design (issue 14)


def _median_spread_deg(rotations: torch.Tensor) -> list[float]:
    """Per head: the median distance between the rotations of two disjoint halves of the
    batch `(B, M, 3, 3)` (0 when every image gets the same rotation)."""
    half = rotations.shape[0] // 2
    return [float(geodesic_distance_deg(rotations[:half, m], rotations[half:2 * half, m])
                  .median()) for m in range(rotations.shape[1])]


@pytest.mark.parametrize("input_channels", ["image", "pyramid"])
def test_reference_heads_spread_over_so3_across_images_at_initialisation(
    input_channels: str,
) -> None:
    """Reference heads (BatchNorm MLPs) give each image its own rotation from the start (random
    rotation pairs are 132 deg apart in median); the spread heads give practically one."""
    x = _images(128, 32, seed=3)
    ref = _encoder(L=32, m=7, width_multiplier=0.25, head_hidden=64, head="reference",
                   input_channels=input_channels, pooling="adaptive")
    with torch.no_grad():
        spread_ref = _median_spread_deg(ref(x).rotations)
        spread_old = _median_spread_deg(_encoder(L=32, m=7, width_multiplier=0.25,
                                                 head_hidden=64)(x).rotations)
    assert min(spread_ref) > 60.0, spread_ref
    assert max(spread_old) < 10.0, spread_old


def test_reference_heads_train_on_a_single_image_and_take_gradients_everywhere() -> None:
    enc = _encoder(L=32, m=3, head="reference", input_channels="pyramid", pooling="adaptive")
    out = enc(_images(1, 32))  # batch statistics of one sample: running statistics instead
    assert bool(torch.isfinite(out.rotations).all())
    enc(_images(4, 32)).rotations.sum().backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name


def test_reference_heads_follow_the_stated_initialisation() -> None:
    torch.manual_seed(0)
    enc = MultiHeadPoseEncoder(32, 4, width_multiplier=0.25, head_hidden=128, head="reference")
    heads = enc.heads
    w1 = heads.layer1.weight.detach().reshape(4, 256, -1)  # per head Linear(F, 2H): fan_out 256
    assert abs(float(w1.std()) - (2.0 / 256) ** 0.5) < 0.05 * (2.0 / 256) ** 0.5
    w2 = heads.weight2.detach()
    assert abs(float(w2.std()) - (2.0 / 128) ** 0.5) < 0.05 * (2.0 / 128) ** 0.5
    for bias in (heads.layer1.bias.detach(), heads.bias2.detach()):
        assert -1.0 <= float(bias.min()) < -0.9 and 0.9 < float(bias.max()) <= 1.0
    bound = 1.0 / 128 ** 0.5  # the last layer: nn.Linear's default
    w3, b3 = heads.weight3.detach(), heads.bias3.detach()
    assert float(w3.abs().max()) <= bound and float(b3.abs().max()) <= bound


def test_reference_heads_start_every_image_centred_and_learn_shifts() -> None:
    """With shifts, the reference heads' shift outputs start at 0 for every image (initialised
    like the rotations they gave random shifts of ~5 px std, which blurred the volume), while
    the rotations still spread; the zeroed weights still take gradients."""
    x = _images(128, 32, seed=4)
    enc = _encoder(L=32, m=5, width_multiplier=0.25, head_hidden=64, head="reference",
                   input_channels="pyramid", pooling="adaptive", predict_shifts=True,
                   max_shift_px=12.0)
    out = enc(x)
    assert out.shifts_px is not None
    assert float(out.shifts_px.abs().max()) == 0.0
    assert min(_median_spread_deg(out.rotations.detach())) > 60.0
    (out.shifts_px - 3.0).pow(2).sum().backward()  # a loss that wants a shift
    for p in (enc.heads.weight3, enc.heads.bias3):
        assert isinstance(p, nn.Parameter) and p.grad is not None
        assert float(p.grad[..., 6:].abs().sum()) > 0


@pytest.mark.parametrize(("box", "pooling", "pools", "grid"),
                         [(32, "adaptive", 4, 2), (64, "adaptive", 5, 2), (16, "adaptive", 3, 2),
                          (128, "adaptive", 5, 4), (32, "vgg16", 5, 1), (6, "adaptive", 1, 3)])
def test_pooling_adapts_to_the_input_box(box: int, pooling: str, pools: int, grid: int) -> None:
    """Adaptive pooling leaves a map of at least 2x2 before the average pool (VGG16's five
    pools leave 1x1 at 32 px); the parameter names do not depend on the box."""
    enc = _encoder(L=box, m=1, pooling=pooling)
    assert enc.pools == pools
    assert sum(isinstance(mod, nn.MaxPool2d) for mod in enc.trunk) == pools
    x = torch.zeros(1, 1, box, box)
    for mod in enc.trunk:
        if isinstance(mod, nn.AdaptiveAvgPool2d):
            break
        x = mod(x) if not isinstance(mod, nn.BatchNorm2d) else x
    assert x.shape[-1] == grid
    assert set(enc.state_dict()) == set(_encoder(L=box, m=1, pooling="vgg16").state_dict())


def test_pyramid_input_has_five_standardised_channels() -> None:
    from cryospin.preprocess import pyramid_variances_px2

    enc = _encoder(L=64, m=2, input_box_px=32, input_channels="pyramid")
    first = next(mod for mod in enc.trunk if isinstance(mod, nn.Conv2d))
    assert first.in_channels == 5
    assert enc.pyramid_variances_px2 == pyramid_variances_px2(32)
    torch.testing.assert_close(torch.tensor(pyramid_variances_px2(32)),
                               torch.tensor([0.01, 0.1, 1.0, 10.0, 100.0]) / 16)


def test_design_choices_are_checked() -> None:
    with pytest.raises(ValueError, match="head"):
        MultiHeadPoseEncoder(32, 2, head="mlp")
    with pytest.raises(ValueError, match="input_channels"):
        MultiHeadPoseEncoder(32, 2, input_channels="rgb")
    with pytest.raises(ValueError, match="pooling"):
        MultiHeadPoseEncoder(32, 2, pooling="max")
