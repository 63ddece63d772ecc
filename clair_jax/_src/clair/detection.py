"""Detection of contaminated clients: size screening, off-subspace scores, robust threshold."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array

from clair_jax._src.clair.noise import client_sizes, masked_median, typical_size

#: Robust z-score of the detection threshold τ.
THRESHOLD_Z = 3.5


#: Smallest spread of the benign scores, relative to their median.
RELATIVE_SPREAD = 0.1


#: Re-estimation rounds of the threshold's benign set.
THRESHOLD_ITERS = 4


#: Clients whose root-mean-square entry exceeds this multiple of the typical
#: client's are flagged without entering the fit (step 0).
SCREEN_RATIO = 1e3


def off_subspace(x: Array, center: Array, basis: Array) -> Array:
    """``(I - U U^T)(X_i - c)`` for every client, ``U = basis`` (zero columns allowed)."""
    r = x - center[None]
    return r - jnp.einsum("pk,nkq->npq", basis, jnp.einsum("pk,npq->nkq", basis, r))


def detection_threshold(scores, sigma, iters: int = THRESHOLD_ITERS):
    """Robust threshold ``τ = m + z max(1.4826 MAD, σ̂ / sqrt(2), ρ m)`` on the scores.

    ``m`` and ``MAD`` are the median and median absolute deviation of the scores
    of a benign set ``C``. ``C`` starts as the lower half of the scores (benign
    whenever fewer than half of the clients are contaminated, as contamination
    raises the score) and is re-estimated as ``{d_i <= τ}`` for ``iters``
    rounds, so that a large contaminated fraction does not inflate ``m`` and
    the MAD. The spread is at least ``σ̂ / sqrt(2)`` (the standard deviation of
    a Gaussian noise block's norm) and ``ρ m``: benign clients' noise levels
    differ, and a contamination well below the noise is not worth a flag.
    ``z = THRESHOLD_Z``, ``ρ = RELATIVE_SPREAD``.

    Args:
      scores: ``(n,)`` detection scores (``inf`` allowed for screened clients).
      sigma: the noise level ``σ̂``.
      iters: rounds of the benign set (static).

    Returns:
      The threshold ``τ``, a scalar.
    """

    def tau_of(keep):
        center = masked_median(scores, keep)
        mad = 1.4826 * masked_median(jnp.abs(scores - center), keep)
        spread = jnp.maximum(jnp.maximum(mad, sigma / jnp.sqrt(2.0)), RELATIVE_SPREAD * center)
        return center + THRESHOLD_Z * spread

    keep = scores <= jnp.median(scores)
    keep = jax.lax.fori_loop(0, iters - 1, lambda _, k: scores <= tau_of(k), keep)
    return tau_of(keep)


def screen(x: Array, offset: bool) -> tuple[Array, Array]:
    """Step 0 of CLAIR: the clients more than ``SCREEN_RATIO`` times the typical size.

    Args:
      x: ``(n, p, q)`` client blocks.
      offset: whether sizes are taken about the entrywise median (static).

    Returns:
      ``(screened, typical)``: ``(n,)`` bool and the typical size (:func:`typical_size`).
    """
    sizes = client_sizes(x, offset)
    typical = typical_size(sizes)
    return (typical > 0) & (sizes > SCREEN_RATIO * typical), typical
