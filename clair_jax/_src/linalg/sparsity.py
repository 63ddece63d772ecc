"""Structures of the sparse part: the group norm and its proximal map.

The sparse part ``S`` of ``M = L + S`` is penalised by a weighted group norm
``sum_i w_i g(S_i)`` over the client blocks ``S_i`` (``p x q``); the structure
decides the groups inside ``g``:

* ``"block"``: one group per client, ``g(S_i) = ||S_i||_F`` (block Outlier
  Pursuit, the CLAIR decomposition: non-zero blocks are contaminated clients).
* ``"column"``: one group per column of ``M``, ``g(S_i) = sum_j ||S_i[:, j]||_2``
  (Outlier Pursuit, Xu, Caramanis & Sanghavi 2012, arXiv:1010.4237).
* ``"entry"``: ``g(S_i) = sum_{jk} |S_i[j, k]|``, the ℓ1 norm of classic
  Principal Component Pursuit (Candès, Li, Ma & Wright 2011, arXiv:0912.3599).

Each structure's proximal map is group soft-thresholding,
``S_g = max(0, 1 - tau / ||Z_g||) Z_g``, with scalar groups for ``"entry"``
(the usual soft threshold). The solvers only ever call :func:`norm` and
:func:`prox`, so one solver loop serves every structure.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float

SPARSITIES = ("block", "column", "entry")

# Axes of a (n, p, q) block array reduced inside one group.
_GROUP_AXES = {"block": (1, 2), "column": (1,), "entry": ()}


def group_norms(x: Float[Array, "n p q"], sparsity: str) -> Array:
    """Norm of every group: ``(n,)`` blocks, ``(n, q)`` columns or ``(n, p, q)`` entries.

    Differentiable everywhere: at a zero group the gradient is taken as zero.
    """
    axes = _GROUP_AXES[sparsity]
    if not axes:
        return jnp.abs(x)
    sq = jnp.sum(x * x, axis=axes)
    positive = sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def _per_client(values: Array, ndim: int) -> Array:
    """Broadcasts ``(n,)`` per-client values against ``ndim``-dimensional group norms."""
    return values.reshape(values.shape + (1,) * (ndim - 1))


def norm(x: Float[Array, "n p q"], weights: Float[Array, " n"], sparsity: str) -> Array:
    """``sum_i w_i g(X_i)`` for the structure ``sparsity``."""
    norms = group_norms(x, sparsity)
    return jnp.sum(_per_client(weights, norms.ndim) * norms)


def prox(z: Float[Array, "n p q"], tau: Float[Array, " n"] | float, sparsity: str) -> Array:
    """Proximal map of ``sum_i tau_i g(Z_i)``: group soft-thresholding.

    Args:
      z: ``(n, p, q)`` blocks.
      tau: non-negative threshold, a scalar or one per client ``(n,)``.
      sparsity: ``"block"``, ``"column"`` or ``"entry"``.

    Returns:
      The thresholded blocks, ``(n, p, q)``.
    """
    norms = group_norms(z, sparsity)
    tau = jnp.broadcast_to(jnp.asarray(tau, z.dtype), z.shape[:1])
    tau = _per_client(tau, norms.ndim)
    keep = norms > tau
    scale = jnp.where(keep, 1.0 - tau / jnp.where(keep, norms, 1.0), 0.0)
    if sparsity == "block":
        return z * scale[:, None, None]
    if sparsity == "column":
        return z * scale[:, None, :]
    return z * scale
