"""The two half sets of a particle set (gold-standard FSC, Wiener filter): 1 or 2 per particle.

``rlnRandomSubset`` (RELION) is kept when it is a valid 1/2 split; otherwise a seeded random
split. Used by backprojection, ``reconstruct --halves`` and ``symmetry-expand``.
"""

from __future__ import annotations

import logging

import numpy as np

__all__ = ["half_set_assignment"]

log = logging.getLogger(__name__)


def half_set_assignment(
    n: int, *, random_subset: np.ndarray | None = None, seed: int = 0
) -> np.ndarray:
    """Half set (1 or 2) of each of ``n`` particles, `(n,)` int64.

    ``random_subset`` (e.g. ``rlnRandomSubset``) is used when given and it holds only 1s and
    2s with both present; otherwise a seeded random split into halves of sizes ``ceil(n/2)``
    and ``floor(n/2)``.
    """
    if random_subset is not None:
        rs = np.asarray(random_subset).astype(np.int64).reshape(-1)
        if rs.shape == (n,) and set(np.unique(rs).tolist()) == {1, 2}:
            return rs
        log.warning("random subsets are not a 1/2 split; using a random split (seed %d)", seed)
    perm = np.random.default_rng(seed).permutation(n)
    out = np.empty(n, dtype=np.int64)
    out[perm[: (n + 1) // 2]] = 1
    out[perm[(n + 1) // 2 :]] = 2
    return out
