"""Multi-head pose encoder of the auto-encoding stage: a VGG16-style CNN trunk shared by M heads.

Each head is an MLP that maps the shared image feature to a 6D rotation (the first two rows of
``R``, turned into a rotation by Gram–Schmidt, see :func:`cryospin.rotations.rotation_6d_to_matrix`)
and, optionally, a 2D shift ``max_shift_px · tanh(·)`` in pixels. With winner-take-all training
(:func:`cryospin.losses.winner_take_all`) the heads specialise on different pose hypotheses, so
they are initialised to output well-separated rotations.

cryoAI's symmetrised loss (``--method cryoai``) is :func:`in_plane_flip_hypotheses`: every head's
pose ``(R, t)`` is paired with ``(diag(−1, −1, 1) · R, −t)``, the pose that renders the same image
rotated by 180° in-plane about the box centre (docs/conventions.md, "cryoAI two hypotheses");
:class:`InPlaneFlipEncoder` wraps an encoder so that the trainer sees ``2M`` hypotheses and keeps
the best one (winner-take-all), with no special case in the training loop.

Speed: the trunk may run under ``torch.autocast`` (``autocast_dtype``) with ``channels_last``
tensors. On CPUs with native bf16 (AVX512-BF16, AMX) bf16 is 2.9–5x faster than float32; without
it bf16 is emulated and ~10x *slower* (``benchmarks/bench_encoder.py``), which is why the
precision is chosen per machine (:mod:`cryospin.train.precision`). The trunk may also see a
Fourier-cropped copy of the image (``input_box_px``): coarse poses live in the low frequencies,
and the trunk's cost scales with the square of its box. The per-image normalisation, the heads
and Gram–Schmidt always run in float32.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from cryospin.forward.resample import fourier_crop_2d
from cryospin.preprocess import gaussian_pyramid, pyramid_variances_px2
from cryospin.rotations import (
    geodesic_distance_rad,
    matrix_to_rotation_6d,
    quaternion_to_matrix,
    rotation_6d_to_matrix,
)

__all__ = [
    "HeadType",
    "EncoderInput",
    "Pooling",
    "num_pools",
    "EncoderOutput",
    "MultiHeadPoseEncoder",
    "InPlaneFlipEncoder",
    "VGG16_LAYOUT",
    "in_plane_flip_hypotheses",
]

#: VGG16 convolution widths; "M" is a 2x2 max-pool.
VGG16_LAYOUT: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)

_POOL_GRID = 2  # the trunk's output is average-pooled to a (2, 2) grid per channel
_VGG16_POOLS = 5

#: ``reference``: BatchNorm MLP heads as in the authors' public code (outputs spread over SO(3)
#: across images at initialisation); ``spread``: cryospin <= 0.2 heads that start at fixed,
#: well-separated rotations (practically the same rotation for every image).
HeadType = Literal["reference", "spread"]
#: ``image``: one channel; ``pyramid``: a 5-level Gaussian pyramid of the image.
EncoderInput = Literal["image", "pyramid"]
#: ``adaptive``: as many 2x2 max-pools as leave a map of at least 2x2 (at most VGG16's 5);
#: ``vgg16``: always 5 (a 32 px input ends as a 1x1 map).
Pooling = Literal["adaptive", "vgg16"]
_MIN_CHANNELS = 8
_HEAD_SEPARATION_CANDIDATES = 512


class EncoderOutput(NamedTuple):
    """Per-image, per-head pose hypotheses.

    Attributes
    ----------
    rotations : `(B, M, 3, 3)` float32
        Rotations left-multiplying xyz column vectors.
    shifts_px : `(B, M, 2)` float32 or None
        ``(tx, ty)`` in pixels, in ``[−max_shift_px, max_shift_px]``; None when the encoder does
        not predict shifts.
    """

    rotations: Tensor
    shifts_px: Tensor | None


def num_pools(input_box_px: int, pooling: Pooling) -> int:
    """Number of 2x2 max-pools of the trunk for a ``input_box_px`` input: 5 for ``vgg16``; for
    ``adaptive`` the largest ``n <= 5`` with ``input_box_px / 2**n >= 2`` (at least 1)."""
    if pooling == "vgg16":
        return _VGG16_POOLS
    if pooling != "adaptive":
        raise ValueError(f"pooling must be 'adaptive' or 'vgg16', got {pooling!r}")
    n = int(math.floor(math.log2(max(int(input_box_px), 2) / _POOL_GRID)))
    return min(_VGG16_POOLS, max(1, n))


def _vgg_trunk(width_multiplier: float, batch_norm: bool, in_channels: int = 1,
               pools: int = _VGG16_POOLS) -> tuple[nn.Sequential, int]:
    """VGG16 convolutions; the max-pools after the first ``pools`` are identities (kept as
    modules so that the parameters' names do not depend on the box)."""
    layers: list[nn.Module] = []
    in_ch = in_channels
    pools_left = int(pools)
    for item in VGG16_LAYOUT:
        if item == "M":
            # ceil_mode keeps odd and tiny feature maps valid (a 1x1 map stays 1x1)
            layers.append(nn.MaxPool2d(2, 2, ceil_mode=True) if pools_left > 0
                          else nn.Identity())
            pools_left -= 1
            continue
        out_ch = max(_MIN_CHANNELS, round(int(item) * width_multiplier))
        layers.append(nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(out_ch))
        layers.append(nn.ReLU(inplace=True))
        in_ch = out_ch
    layers.append(nn.AdaptiveAvgPool2d(_POOL_GRID))
    layers.append(nn.Flatten())
    return nn.Sequential(*layers), in_ch * _POOL_GRID * _POOL_GRID


def _spread_rotations(num: int) -> Tensor:
    """``num`` well-separated rotations `(num, 3, 3)` float32, by farthest-point selection.

    Candidates are drawn with the global torch RNG (so ``torch.manual_seed`` controls them).
    """
    q = torch.randn(_HEAD_SEPARATION_CANDIDATES, 4, dtype=torch.float64)
    cand = quaternion_to_matrix(q)  # (C, 3, 3), uniform on SO(3)
    chosen = [0]
    dist = geodesic_distance_rad(cand[0].expand_as(cand), cand)  # (C,)
    for _ in range(1, num):
        nxt = int(dist.argmax())
        chosen.append(nxt)
        dist = torch.minimum(dist, geodesic_distance_rad(cand[nxt].expand_as(cand), cand))
    return cand[chosen].to(torch.float32)


class _MultiHeadMLP(nn.Module):
    """M independent 3-layer MLPs on a shared input, evaluated in three batched matmuls.

    Layer 1 of all heads is one ``Linear(F, M·H)`` (the input is shared); layers 2 and 3 are
    per-head weights `(M, H, H)` and `(M, H, D)` applied with ``einsum``.
    """

    def __init__(self, in_features: int, num_heads: int, hidden: int, out_features: int) -> None:
        super().__init__()
        self.num_heads, self.hidden, self.out_features = num_heads, hidden, out_features
        self.layer1 = nn.Linear(in_features, num_heads * hidden)
        self.weight2 = nn.Parameter(torch.empty(num_heads, hidden, hidden))
        self.bias2 = nn.Parameter(torch.empty(num_heads, hidden))
        self.weight3 = nn.Parameter(torch.empty(num_heads, hidden, out_features))
        self.bias3 = nn.Parameter(torch.empty(num_heads, out_features))
        bound = 1.0 / math.sqrt(hidden)  # nn.Linear's default init, per head
        for p in (self.weight2, self.bias2, self.weight3, self.bias3):
            nn.init.uniform_(p, -bound, bound)

    def forward(self, feature: Tensor) -> Tensor:
        """`(B, F)` -> `(B, M, D)`."""
        b = feature.shape[0]
        h = torch.relu(self.layer1(feature)).reshape(b, self.num_heads, self.hidden)  # (B, M, H)
        h = torch.relu(torch.einsum("bmh,mhk->bmk", h, self.weight2) + self.bias2)  # (B, M, H)
        return torch.einsum("bmh,mhd->bmd", h, self.weight3) + self.bias3  # (B, M, D)


def _batch_norm(norm: nn.BatchNorm1d, x: Tensor) -> Tensor:
    """``norm(x)``, with the running statistics for a training batch of one image (batch
    statistics of a single sample are undefined)."""
    if norm.training and x.shape[0] < 2:
        return nn.functional.batch_norm(x, norm.running_mean, norm.running_var, norm.weight,
                                        norm.bias, False, 0.0, norm.eps)
    return norm(x)


class _ReferenceHeads(nn.Module):
    """M heads ``Linear(F, 2H) → ReLU → BN → Linear(2H, H) → ReLU → BN → Linear(H, D)`` on a
    shared input (the authors' public design with ``H = 256``), batched like
    :class:`_MultiHeadMLP`.

    Initialisation as there: hidden weights Kaiming-normal with fan_out (std ``√(2/fan_out)``
    per head), hidden biases ``U(−1, 1)``, the last layer PyTorch's ``nn.Linear`` default.
    Batch normalisation scales the small image-to-image differences of the trunk's features
    to unit variance, so that each head's rotation differs from image to image from the start.
    The encoder zeroes the last layer's shift outputs (weights and biases): initialised like the
    rotations they gave every image a random shift (std 5.5 px at ``max_shift_px`` 12), which
    blurred the volume the rotations learn against (ADK, 64 px: 92° after 3,125 steps with
    them on centred images, 37° without shift heads; benchmarks/RESULTS.md, "paper-real on
    off-centre particles").
    """

    def __init__(self, in_features: int, num_heads: int, hidden: int, out_features: int) -> None:
        super().__init__()
        h1, h2 = 2 * hidden, hidden
        self.num_heads, self.h1, self.h2, self.out_features = num_heads, h1, h2, out_features
        self.layer1 = nn.Linear(in_features, num_heads * h1)
        self.norm1 = nn.BatchNorm1d(num_heads * h1)
        self.weight2 = nn.Parameter(torch.empty(num_heads, h1, h2))
        self.bias2 = nn.Parameter(torch.empty(num_heads, h2))
        self.norm2 = nn.BatchNorm1d(num_heads * h2)
        self.weight3 = nn.Parameter(torch.empty(num_heads, h2, out_features))
        self.bias3 = nn.Parameter(torch.empty(num_heads, out_features))
        with torch.no_grad():
            nn.init.normal_(self.layer1.weight, 0.0, math.sqrt(2.0 / h1))
            nn.init.uniform_(self.layer1.bias, -1.0, 1.0)
            nn.init.normal_(self.weight2, 0.0, math.sqrt(2.0 / h2))
            nn.init.uniform_(self.bias2, -1.0, 1.0)
            bound = 1.0 / math.sqrt(h2)  # nn.Linear's default, per head
            nn.init.uniform_(self.weight3, -bound, bound)
            nn.init.uniform_(self.bias3, -bound, bound)

    def forward(self, feature: Tensor) -> Tensor:
        """`(B, F)` -> `(B, M, D)`."""
        b, m = feature.shape[0], self.num_heads
        h = _batch_norm(self.norm1, torch.relu(self.layer1(feature)))  # (B, M·2H)
        h = torch.einsum("bmh,mhk->bmk", h.reshape(b, m, self.h1), self.weight2) + self.bias2
        h = _batch_norm(self.norm2, torch.relu(h).reshape(b, m * self.h2))  # (B, M·H)
        return torch.einsum("bmh,mhd->bmd", h.reshape(b, m, self.h2), self.weight3) + self.bias3


class MultiHeadPoseEncoder(nn.Module):
    """VGG16-style CNN trunk + ``num_heads`` MLP heads -> rotations (and shifts) per head.

    Parameters
    ----------
    box_px : int
        Image size ``L``; inputs must be `(B, L, L)`.
    num_heads : int
        Number of heads ``M`` (paper: 7 synthetic, 15 real data).
    width_multiplier : float
        Scales the VGG16 channel counts (rounded, at least 8).
    predict_shifts : bool
        Whether each head also predicts a shift.
    max_shift_px : float
        Shift bound in pixels (required > 0 when ``predict_shifts``).
    head_hidden : int
        Hidden width of each head's MLP (two hidden layers).
    autocast_dtype : torch.dtype or None
        Run the trunk under ``torch.autocast(<input device>, dtype=autocast_dtype)`` (bfloat16 or
        float16) with ``channels_last`` tensors; None runs it in float32. Float16 needs a
        gradient scaler in training (``torch.amp.GradScaler``).
    input_box_px : int or None
        Fourier-crop the images to this box before the trunk (even, ``<= box_px``); None or
        ``box_px`` feeds them at full size.
    batch_norm : bool
        Batch normalisation after each convolution.
    head : "reference" or "spread"
        ``reference`` (:class:`_ReferenceHeads`): BatchNorm MLPs whose rotations differ from
        image to image from the start. ``spread``: 3-layer MLPs initialised so that, before
        training, head ``m`` outputs rotations close to ``R_m`` for every image, where
        ``R_1..R_M`` are well separated (farthest-point sampling over random rotations drawn
        from the global torch RNG): the last layer's bias is the 6D representation of ``R_m``
        and its weights are scaled down by ``_HEAD_OUT_GAIN`` (cryospin <= 0.2).
    input_channels : "image" or "pyramid"
        ``pyramid``: the trunk sees 5 channels, the (cropped) image blurred with the reference
        variances scaled to its box (:func:`cryospin.preprocess.pyramid_variances_px2`), each
        standardised per image; ``image``: the standardised image alone.
    pooling : "adaptive" or "vgg16"
        Max-pools of the trunk (:func:`num_pools` of the input box).
    """

    _HEAD_OUT_GAIN = 0.1

    def __init__(
        self,
        box_px: int,
        num_heads: int,
        *,
        width_multiplier: float = 1.0,
        predict_shifts: bool = False,
        max_shift_px: float = 0.0,
        head_hidden: int = 256,
        autocast_dtype: torch.dtype | None = None,
        input_box_px: int | None = None,
        batch_norm: bool = True,
        head: HeadType = "spread",
        input_channels: EncoderInput = "image",
        pooling: Pooling = "vgg16",
    ) -> None:
        super().__init__()
        if box_px < 2 or num_heads < 1 or width_multiplier <= 0 or head_hidden < 1:
            raise ValueError(
                f"invalid encoder size: box_px={box_px}, num_heads={num_heads}, "
                f"width_multiplier={width_multiplier}, head_hidden={head_hidden}"
            )
        if predict_shifts and not max_shift_px > 0:
            raise ValueError("predict_shifts needs max_shift_px > 0")
        if head not in ("reference", "spread"):
            raise ValueError(f"head must be 'reference' or 'spread', got {head!r}")
        if input_channels not in ("image", "pyramid"):
            raise ValueError(f"input_channels must be 'image' or 'pyramid', got "
                             f"{input_channels!r}")
        if autocast_dtype not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f"autocast_dtype must be None, bfloat16 or float16, "
                             f"got {autocast_dtype}")
        input_box = int(box_px) if input_box_px is None else int(input_box_px)
        if not 2 <= input_box <= box_px or (input_box < box_px and input_box % 2):
            raise ValueError(f"input_box_px must be even and in [2, {box_px}], got {input_box_px}")
        self.box_px = int(box_px)
        self.num_heads = int(num_heads)
        self.predict_shifts = bool(predict_shifts)
        self.max_shift_px = float(max_shift_px)
        self.autocast_dtype = autocast_dtype
        self.input_box_px = input_box
        self.head = head
        self.input_channels = input_channels
        self.pyramid_variances_px2 = (pyramid_variances_px2(input_box)
                                      if input_channels == "pyramid" else ())
        self.pools = num_pools(input_box, pooling)

        self.trunk, feature_dim = _vgg_trunk(
            width_multiplier, batch_norm, max(1, len(self.pyramid_variances_px2)), self.pools)
        self.feature_dim = feature_dim
        out = 6 + (2 if predict_shifts else 0)
        self.heads: nn.Module
        if head == "reference":
            self.heads = _ReferenceHeads(feature_dim, num_heads, head_hidden, out)
            if predict_shifts:  # every image starts centred (see _ReferenceHeads)
                with torch.no_grad():
                    self.heads.weight3[..., 6:].zero_()
                    self.heads.bias3[..., 6:].zero_()
        else:
            self.heads = _MultiHeadMLP(feature_dim, num_heads, head_hidden, out)
            with torch.no_grad():
                self.heads.weight3.mul_(self._HEAD_OUT_GAIN)
                self.heads.bias3.zero_()
                if not self.heads.bias3.is_meta:  # meta device: shapes only (memory planner)
                    self.heads.bias3[:, :6] = matrix_to_rotation_6d(
                        _spread_rotations(num_heads))
        if self.autocast_dtype is not None:
            # Module.to takes memory_format at run time; torch's stubs leave it out
            self.trunk.to(memory_format=torch.channels_last)  # type: ignore[call-overload]

    def forward(self, images: Tensor) -> EncoderOutput:
        """Pose hypotheses of every head for a batch of images.

        Parameters
        ----------
        images : `(B, L, L)` float32
            Real-space particle images ``[y, x]``; each is Fourier-cropped to
            ``input_box_px``, expanded to the pyramid when asked, and each channel
            standardised (zero mean, unit standard deviation) inside.

        Returns
        -------
        EncoderOutput
            ``rotations`` `(B, M, 3, 3)`, ``shifts_px`` `(B, M, 2)` or None, float32.
        """
        if images.ndim != 3 or images.shape[-2:] != (self.box_px, self.box_px):
            raise ValueError(
                f"expected images (B, {self.box_px}, {self.box_px}), got {tuple(images.shape)}"
            )
        x = images.to(torch.float32)
        if self.input_box_px < self.box_px:
            x = fourier_crop_2d(x, self.input_box_px)  # (B, L', L')
        if self.pyramid_variances_px2:
            x = gaussian_pyramid(x, self.pyramid_variances_px2)  # (B, C, L', L')
        else:
            x = x.unsqueeze(1)  # (B, 1, L', L')
        mean = x.mean(dim=(-2, -1), keepdim=True)
        std = x.std(dim=(-2, -1), keepdim=True)
        x = (x - mean) / (std + 1e-6)  # each channel standardised per image
        if self.autocast_dtype is not None:
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device_type=x.device.type, dtype=self.autocast_dtype):
                feature = self.trunk(x)  # (B, F)
        else:
            feature = self.trunk(x)  # (B, F)
        out = self.heads(feature.to(torch.float32))  # (B, M, 6 [+2])
        rotations = rotation_6d_to_matrix(out[..., :6])  # (B, M, 3, 3)
        shifts = self.max_shift_px * torch.tanh(out[..., 6:8]) if self.predict_shifts else None
        return EncoderOutput(rotations, shifts)

    def extra_repr(self) -> str:
        return (
            f"box_px={self.box_px}, num_heads={self.num_heads}, "
            f"predict_shifts={self.predict_shifts}, max_shift_px={self.max_shift_px}, "
            f"input_box_px={self.input_box_px}, autocast_dtype={self.autocast_dtype}, "
            f"head={self.head}, input_channels={self.input_channels}, pools={self.pools}"
        )


def in_plane_flip_hypotheses(
    rotations: Tensor, shifts_px: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """Append, for every pose, the pose of the image rotated by 180° in-plane (cryoAI).

    Rotating an image by 180° about the box centre, ``image'(r) = image(−r)``, gives the image
    of pose ``R' = diag(−1, −1, 1) · R`` and shift ``t' = −t``: the slice of ``R'`` samples the
    volume at ``k @ R' = (−k) @ R`` for ``k = (kx, ky, 0)``, so the rendered transform is the
    original one at ``−k`` (the 180°-rotated image), and ``P'(r − t') = P(−r − t)``
    (docs/conventions.md, "cryoAI two hypotheses"). Pure; keeps dtype, device and autograd.

    Parameters
    ----------
    rotations : `(B, M, 3, 3)`
        Poses (left-multiply xyz column vectors).
    shifts_px : `(B, M, 2)` or None
        ``(tx, ty)`` in pixels.

    Returns
    -------
    rotations : `(B, 2M, 3, 3)`
        ``[..., :M]`` the input poses, ``[..., M:]`` their flipped partners, head by head.
    shifts_px : `(B, 2M, 2)` or None
        ``[..., :M]`` the input shifts, ``[..., M:]`` their negatives.
    """
    if rotations.ndim != 4 or rotations.shape[-2:] != (3, 3):
        raise ValueError(f"expected rotations (B, M, 3, 3), got {tuple(rotations.shape)}")
    if shifts_px is not None and shifts_px.shape != (*rotations.shape[:2], 2):
        raise ValueError(
            f"expected shifts (B, M, 2) with rotations {tuple(rotations.shape)}, "
            f"got {tuple(shifts_px.shape)}"
        )
    sign = torch.tensor([-1.0, -1.0, 1.0], dtype=rotations.dtype, device=rotations.device)
    flipped = rotations * sign[:, None]  # diag(-1, -1, 1) @ R: rows x and y negated
    rot2 = torch.cat([rotations, flipped], dim=1)  # (B, 2M, 3, 3)
    if shifts_px is None:
        return rot2, None
    return rot2, torch.cat([shifts_px, -shifts_px], dim=1)  # (B, 2M, 2)


class InPlaneFlipEncoder(nn.Module):
    """An encoder whose ``M`` head poses are each paired with their 180° in-plane partner.

    The output has ``2M`` hypotheses per image (:func:`in_plane_flip_hypotheses`); used with
    one head it is cryoAI's symmetrised loss with cryospin's explicit decoder
    (``--method cryoai``). The wrapped encoder is the only learnable state.

    Parameters
    ----------
    encoder : MultiHeadPoseEncoder
    """

    def __init__(self, encoder: MultiHeadPoseEncoder) -> None:
        super().__init__()
        self.encoder = encoder
        self.num_heads = 2 * int(encoder.num_heads)  # hypotheses seen by the trainer
        self.box_px = encoder.box_px
        self.predict_shifts = encoder.predict_shifts
        self.max_shift_px = encoder.max_shift_px
        self.autocast_dtype = encoder.autocast_dtype

    def forward(self, images: Tensor) -> EncoderOutput:
        """`(B, L, L)` -> rotations `(B, 2M, 3, 3)`, shifts `(B, 2M, 2)` or None."""
        out = self.encoder(images)
        return EncoderOutput(*in_plane_flip_hypotheses(out.rotations, out.shifts_px))
