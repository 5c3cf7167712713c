"""Per-image Gaussian negative log-likelihood and the winner-take-all rule over heads.

The image model is ``observed = predicted + noise`` with independent Gaussian noise of variance
``σ²`` on every Hartley coefficient of the loss disc (see ``docs/conventions.md``). Working in
Hartley space costs nothing: for a real image ``H = Re F − Im F`` and ``H(−k)`` pairs with
``H(k)`` so that, over any set of frequencies closed under ``k -> −k`` (the loss disc is),

    Σ_k (H_pred(k) − H_obs(k))² = Σ_k |F_pred(k) − F_obs(k)|²       (Parseval for Hartley),

because ``H(k)² + H(−k)² = 2 (Re F(k)² + Im F(k)²)`` and the transform is linear. The summed
squared Hartley error is therefore exactly the summed squared Fourier error, and the Hartley
NLL equals the Fourier NLL with the same ``σ²`` per real degree of freedom.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from cryospin.rotations import geodesic_distance_deg

__all__ = [
    "gaussian_nll",
    "log_likelihood_ratio",
    "random_phase_log_likelihood_ratio",
    "shell_signal_power",
    "class_responsibility",
    "winner_take_all",
    "head_usage",
    "head_spread_deg",
]


def gaussian_nll(predicted: Tensor, observed: Tensor, noise_variance: float | Tensor) -> Tensor:
    """Negative log-likelihood of each image under each head's prediction, constants dropped.

    ``nll[b, m] = Σ_p (predicted[b, m, p] − observed[b, p])² / (2 σ²[b, p])``.

    Parameters
    ----------
    predicted : `(B, M, P)`
        Predicted Hartley coefficients on the ``P`` frequencies of the loss disc, one row per
        head (or per candidate pose) ``m``.
    observed : `(B, P)`
        Observed Hartley coefficients on the same frequencies.
    noise_variance : float or Tensor
        Noise variance ``σ²`` per Hartley coefficient, in the squared units of the
        coefficients: a positive float, or a tensor broadcastable against `(B, P)` (e.g. `()`,
        `(P,)` per frequency, `(B, 1)` per image or `(B, P)`).

    Returns
    -------
    `(B, M)`
        Per-image, per-head NLL (dtype of ``predicted``); ``log σ`` terms are omitted, so only
        differences at fixed ``σ²`` are meaningful.
    """
    if predicted.ndim != 3 or observed.ndim != 2:
        raise ValueError(
            f"expected predicted (B, M, P) and observed (B, P), got {tuple(predicted.shape)} "
            f"and {tuple(observed.shape)}"
        )
    if predicted.shape[0] != observed.shape[0] or predicted.shape[2] != observed.shape[1]:
        raise ValueError(
            f"predicted {tuple(predicted.shape)} and observed {tuple(observed.shape)} disagree"
        )
    if not isinstance(noise_variance, Tensor):
        if not noise_variance > 0:
            raise ValueError(f"noise_variance must be positive, got {noise_variance}")
        noise_variance = torch.as_tensor(
            noise_variance, dtype=predicted.dtype, device=predicted.device
        )
    inv_two_var = (0.5 / noise_variance).broadcast_to(observed.shape)  # (B, P)
    sq = (predicted - observed.unsqueeze(1)).square()  # (B, M, P)
    return (sq * inv_two_var.unsqueeze(1)).sum(-1)  # (B, M)


def log_likelihood_ratio(predicted: Tensor, observed: Tensor,
                         noise_variance: float | Tensor) -> Tensor:
    """Log-likelihood of each image under its prediction against an empty image, in nats.

    ``llr[b] = NLL(0) − NLL(predicted) = Σ_p (2 y_p ŷ_p − ŷ_p²) / (2 σ²)`` with the NLL of
    :func:`gaussian_nll` (``y`` = ``observed``, ``ŷ`` = ``predicted``), evaluated in this
    cancellation-free form in float64. Positive: the prediction explains the image better
    than no particle at all. For ``y = ŷ + noise`` its mean is ``Σ ŷ² / (2 σ²)``; for pure
    noise ``−Σ ŷ² / (2 σ²)``; its standard deviation is ``sqrt(Σ ŷ²) / σ`` in both cases.

    Parameters
    ----------
    predicted, observed : `(B, P)`
        Hartley coefficients on the ``P`` frequencies of the loss disc.
    noise_variance : float or Tensor
        ``σ²`` per coefficient, as in :func:`gaussian_nll` (broadcastable against `(B, P)`).

    Returns
    -------
    `(B,)` float64
    """
    if predicted.ndim != 2 or predicted.shape != observed.shape:
        raise ValueError(f"expected predicted and observed of the same shape (B, P), got "
                         f"{tuple(predicted.shape)} and {tuple(observed.shape)}")
    var = torch.as_tensor(noise_variance, dtype=torch.float64, device=predicted.device)
    if not bool((var > 0).all()):
        raise ValueError("noise_variance must be positive")
    y, yhat = observed.double(), predicted.double()
    return ((2.0 * y - yhat) * yhat / (2.0 * var).broadcast_to(y.shape)).sum(-1)


def random_phase_log_likelihood_ratio(observed: Tensor, signal_power: Tensor,
                                      noise_variance: float | Tensor) -> Tensor:
    """Log-likelihood of each image under a random-phase particle against an empty image, nats.

    The junk class's image model: every coefficient ``y_p ~ N(0, σ² + S_p)``, the noise plus a
    signal of power ``S_p`` whose phases carry no structure (a particle of that power spectrum
    at no consistent pose, e.g. contamination, aggregates, a false pick on carbon). Against the
    empty image ``y_p ~ N(0, σ²)``::

        llr[b] = Σ_p  y_p² / 2 · (1/σ² − 1/(σ² + S_p)) − ½ log(1 + S_p / σ²)

    in float64. Its mean is ``Σ ½ (a − log(1 + a))`` (``a = S/σ²``, ≥ 0) for an image of that
    power and ``−Σ ½ (log(1 + a) − a / (1 + a))`` (≤ 0) for noise alone.

    Parameters
    ----------
    observed : `(B, P)`
        Hartley coefficients on the loss disc.
    signal_power : `(B, P)` or broadcastable
        ``S_p ≥ 0`` per coefficient, in the squared units of ``observed``.
    noise_variance : float or Tensor
        ``σ² > 0``, broadcastable against `(B, P)`.

    Returns
    -------
    `(B,)` float64
    """
    if observed.ndim != 2:
        raise ValueError(f"expected observed (B, P), got {tuple(observed.shape)}")
    var = torch.as_tensor(noise_variance, dtype=torch.float64, device=observed.device)
    if not bool((var > 0).all()):
        raise ValueError("noise_variance must be positive")
    s = torch.as_tensor(signal_power, dtype=torch.float64, device=observed.device)
    if not bool((s >= 0).all()):
        raise ValueError("signal_power must be non-negative")
    # 1/σ² − 1/(σ² + S) = a / (σ² (1 + a)), a = S/σ²; in place where the tensor is ours
    a = (s / var).broadcast_to(observed.shape)
    log_term = torch.log1p(a)  # (B, P)
    frac = a / (a + 1.0)
    y2 = observed.double().square()  # a new tensor (observed may be float64)
    return y2.mul_(frac).div_(var).sub_(log_term).sum(-1).mul_(0.5)


def shell_signal_power(predicted: Tensor, ctf: Tensor | None, frequencies: Tensor, *,
                       reduce: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """The random-phase class's signal power `(B, P)` float64 from a batch's predictions.

    The predictions' power pooled over the batch on each shell ``round(|k|)`` (cycles per box)
    and taken out of the CTF: ``P(r) = Σ_{b, |k_p|≈r} ŷ_bp² / Σ_{b, |k_p|≈r} c_bp²``; each
    coefficient gets ``S_bp = c_bp² P(r_p)`` (``c`` the CTF, 1 without). Over the
    orientations of a batch this is the map's power at ``|k|`` as the slices render it (the
    slice theorem, with the trilinear interpolation's smoothing).

    Parameters
    ----------
    predicted : `(B, P)`
        Predicted Hartley coefficients (slice times CTF; a shift does not change the power).
    ctf : `(B, P)` or None
    frequencies : `(P, 2)`
        ``(kx, ky)`` of the coefficients, cycles per box.
    reduce : callable, optional
        Applied to the per-shell sums `(2, K)` before the division: a distributed run's sum
        over the ranks, so that every rank pools the whole global batch.
    """
    if predicted.ndim != 2 or frequencies.shape != (predicted.shape[1], 2):
        raise ValueError(f"expected predicted (B, P) and frequencies (P, 2), got "
                         f"{tuple(predicted.shape)} and {tuple(frequencies.shape)}")
    shell = frequencies.double().norm(dim=-1).round().long().to(predicted.device)  # (P,)
    c2 = (torch.ones_like(predicted, dtype=torch.float64) if ctf is None
          else ctf.double().square())  # (B, P), a new tensor
    count = int(shell.max()) + 1 if shell.numel() else 1
    power = torch.zeros(count, dtype=torch.float64, device=predicted.device)
    weight = torch.zeros_like(power)
    power.index_add_(0, shell, predicted.double().square().sum(0))
    weight.index_add_(0, shell, c2.sum(0))
    if reduce is not None:
        power, weight = reduce(torch.stack([power, weight])).to(power.device, torch.float64)
    per_shell = torch.where(weight > 0, power / weight.clamp_min(torch.finfo(torch.float64).tiny),
                            torch.zeros_like(power))
    return c2.mul_(per_shell[shell])


def class_responsibility(particle_llr: Tensor, junk_llr: Tensor | None = None, *,
                         empty: bool = True) -> Tensor:
    """Posterior probability `(B,)` that each image holds the particle, among the classes.

    Equal priors over the particle, the empty image (when ``empty``) and the random-phase
    junk (when ``junk_llr`` is given), each class's log-likelihood taken against the empty
    image (:func:`log_likelihood_ratio`, :func:`random_phase_log_likelihood_ratio`; the
    empty class's is 0): the softmax's particle entry; with the empty class alone
    ``σ(llr)``. The gradient of the mixture's NLL ``−log Σ_c π_c p(y | c)`` with respect to
    the particle's prediction ``ŷ`` is this responsibility times the gradient of the
    particle class's NLL (:func:`gaussian_nll`): weighting each image's NLL by it (held
    constant) is the mixture's volume gradient. Same dtype as ``particle_llr``.
    """
    logits = [particle_llr]
    if empty:
        logits.append(torch.zeros_like(particle_llr))
    if junk_llr is not None:
        logits.append(junk_llr.to(particle_llr.dtype))
    return torch.softmax(torch.stack(logits, dim=-1), dim=-1)[..., 0]


def winner_take_all(loss_bm: Tensor) -> tuple[Tensor, Tensor]:
    """Keep, for each image, only the head with the least loss.

    Parameters
    ----------
    loss_bm : `(B, M)`
        Per-image, per-head loss.

    Returns
    -------
    loss : `()`
        ``mean_b min_m loss_bm[b, m]``. Its gradient reaches only the winning entry of each
        row (ties: the lowest head index wins).
    best_head : `(B,)` long
        Index of the winning head of each image.
    """
    if loss_bm.ndim != 2 or loss_bm.shape[1] == 0:
        raise ValueError(f"expected loss of shape (B, M) with M >= 1, got {tuple(loss_bm.shape)}")
    best_loss, best_head = loss_bm.min(dim=1)  # (B,), (B,)
    return best_loss.mean(), best_head


def head_usage(best_head: Tensor, num_heads: int) -> Tensor:
    """Fraction of images won by each head.

    Parameters
    ----------
    best_head : `(B,)` integer
        Winning head per image, in ``[0, num_heads)``.
    num_heads : int
        Number of heads ``M``.

    Returns
    -------
    `(M,)` float32
        ``usage[m] = #{b : best_head[b] = m} / B`` (sums to 1; all zeros when ``B = 0``).
    """
    counts = torch.bincount(best_head.reshape(-1).long(), minlength=num_heads)
    if counts.numel() > num_heads:
        raise ValueError(f"best_head has values >= num_heads = {num_heads}")
    total = max(int(best_head.numel()), 1)
    return counts.to(torch.float32) / total


def head_spread_deg(rotations: Tensor) -> Tensor:
    """How much each head's rotation varies from image to image (a stage-1 diagnostic).

    Parameters
    ----------
    rotations : `(B, M, 3, 3)`
        Every head's rotation for a batch of ``B >= 2`` images.

    Returns
    -------
    `(M,)` float64
        Per head, the median geodesic distance (degrees) between the rotations of images ``b``
        and ``b + B//2`` (``b < B//2``): 0 when a head gives every image the same rotation;
        ≈ 132° for rotations drawn uniformly at random. NaN when ``B < 2``.
    """
    b, m = int(rotations.shape[0]), int(rotations.shape[1])
    half = b // 2
    if half == 0:
        return torch.full((m,), float("nan"), dtype=torch.float64)
    r = rotations.detach().to(torch.float64)
    angles = geodesic_distance_deg(r[:half], r[half:2 * half])  # (half, M)
    return angles.median(dim=0).values.cpu()  # (M,)
