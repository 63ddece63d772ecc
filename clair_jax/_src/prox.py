"""Block layout helpers, the block (group) norm and its proximal map.

Client ``i`` owns the column block ``i`` of ``M = [X_1, ..., X_n]``
(``p x nq``); arrays are stored client-major as ``(n, p, q)``.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float

from clair_jax._src import sparsity


def blocks_to_matrix(x: Float[Array, "n p q"]) -> Float[Array, "p nq"]:
    """``(n, p, q)`` client blocks to the side-by-side matrix ``[X_1 .. X_n]``."""
    n, p, q = x.shape
    return jnp.transpose(x, (1, 0, 2)).reshape(p, n * q)


def matrix_to_blocks(m: Float[Array, "p nq"], n: int) -> Float[Array, "n p q"]:
    """Inverse of :func:`blocks_to_matrix`."""
    p, nq = m.shape
    return jnp.transpose(m.reshape(p, n, nq // n), (1, 0, 2))


def block_norms(x: Float[Array, "n p q"]) -> Float[Array, " n"]:
    """Frobenius norm of every client block, ``||X_i||_F``.

    Differentiable everywhere: at a zero block the gradient is taken as zero.
    """
    return sparsity.group_norms(x, "block")


def block_soft_threshold(
    z: Float[Array, "n p q"], tau: Float[Array, " n"] | float
) -> Float[Array, "n p q"]:
    """Proximal map of ``sum_i tau_i ||Z_i||_F`` (block soft-thresholding).

    .. math::

        S_i = \\max\\Big(0, 1 - \\frac{\\tau_i}{\\|Z_i\\|_F}\\Big) Z_i

    Args:
      z: ``(n, p, q)`` blocks.
      tau: non-negative threshold, a scalar or one per block ``(n,)``.

    Returns:
      The thresholded blocks, ``(n, p, q)``.

    Examples:
      >>> import jax.numpy as jnp
      >>> z = jnp.stack([4.0 * jnp.ones((1, 1)), 0.5 * jnp.ones((1, 1))])
      >>> block_soft_threshold(z, 2.0)[:, 0, 0]
      Array([2., 0.], dtype=float32)
    """
    return sparsity.prox(z, tau, "block")


def nuclear_norm(x: Float[Array, "n p q"]) -> Array:
    """Nuclear norm of the side-by-side matrix ``[X_1 .. X_n]``."""
    return jnp.sum(jnp.linalg.svd(blocks_to_matrix(x), compute_uv=False))


def center_clients(x: Float[Array, "n p q"]) -> Float[Array, "n p q"]:
    """Removes the mean over clients: the projection that eliminates an offset."""
    return x - jnp.mean(x, axis=0, keepdims=True)
