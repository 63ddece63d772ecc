"""Block layout helpers, the block (group) norm and its proximal map.

Client ``i`` owns the column block ``i`` of ``M = [X_1, ..., X_n]``
(``p x nq``); arrays are stored client-major as ``(n, p, q)``.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from clair_jax._src import validation
from clair_jax._src.linalg import sparsity
from clair_jax._src.linalg import svd as svd_lib


def blocks_to_matrix(x: Float[Array, "n p q"]) -> Float[Array, "p nq"]:
    """``(n, p, q)`` client blocks to the side-by-side matrix ``[X_1 .. X_n]``.

    Raises:
      ValueError: ``x`` is not 3-D.
    """
    x = jnp.asarray(x)
    if x.ndim != 3:
        raise ValueError(f"x must have shape (n, p, q) (client blocks), got {tuple(x.shape)}.")
    n, p, q = x.shape
    return jnp.transpose(x, (1, 0, 2)).reshape(p, n * q)


def matrix_to_blocks(m: Float[Array, "p nq"], n: int) -> Float[Array, "n p q"]:
    """Inverse of :func:`blocks_to_matrix`: ``p x nq`` to ``n`` blocks ``(n, p, q)``.

    Raises:
      ValueError: ``m`` is not 2-D, or its ``nq`` columns do not split into ``n``
        equal blocks.
    """
    m = jnp.asarray(m)
    if m.ndim != 2:
        raise ValueError(f"m must be a (p, nq) matrix, got shape {tuple(m.shape)}.")
    p, nq = m.shape
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1 or nq % n:
        raise ValueError(
            f"n must be an int >= 1 dividing the {nq} columns of m {tuple(m.shape)}, got {n!r}."
        )
    n = int(n)
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
      z: ``(n, p, q)`` blocks (integers become the default float).
      tau: non-negative threshold, a scalar or one per block ``(n,)``.

    Returns:
      The thresholded blocks, ``(n, p, q)``.

    Raises:
      ValueError: ``z`` not 3-D; ``tau`` negative, non-finite or of a shape
        other than ``()`` or ``(n,)`` (a traced negative ``tau`` raises at run
        time).
      TypeError: non-numeric ``z`` or ``tau``.

    Examples:
      >>> import jax.numpy as jnp
      >>> z = jnp.stack([4.0 * jnp.ones((1, 1)), 0.5 * jnp.ones((1, 1))])
      >>> block_soft_threshold(z, 2.0)[:, 0, 0]
      Array([2., 0.], dtype=float32)
    """
    z = validation.as_float_array(z, "z")
    if z.ndim != 3:
        raise ValueError(f"z must have shape (n, p, q) (client blocks), got {tuple(z.shape)}.")
    tau = validation.as_float_array(tau, "tau", z.dtype)
    if tau.shape not in ((), z.shape[:1]):
        raise ValueError(
            f"tau must be a scalar or have shape (n,) = ({z.shape[0]},) for z of shape "
            f"{tuple(z.shape)}, got {tuple(tau.shape)}."
        )
    return sparsity.prox(z, validation.check_nonnegative(tau, "tau"), "block")


def nuclear_norm(x: Float[Array, "n p q"]) -> Array:
    """Nuclear norm of the side-by-side matrix ``[X_1 .. X_n]``.

    Under ``jax.vmap`` on CPU the matrices are factorised one at a time
    (:func:`~clair_jax._src.linalg.svd.thin_svd`); the derivative is
    ``<U V^T, dM>`` (``M = U Σ V^T`` thin), as that of the sum of ``jnp.linalg.svd``'s
    values.
    """
    return _matrix_nuclear_norm(blocks_to_matrix(x))


@jax.custom_jvp
def _matrix_nuclear_norm(m: Array) -> Array:
    return jnp.sum(svd_lib.thin_svd(m, compute_uv=False))


@_matrix_nuclear_norm.defjvp
def _matrix_nuclear_norm_jvp(primals, tangents):
    (m,), (dm,) = primals, tangents
    u, s, vt = svd_lib.thin_svd(m, compute_uv=True)
    return jnp.sum(s), jnp.sum(jnp.matmul(u, vt) * dm)


def center_clients(x: Float[Array, "n p q"]) -> Float[Array, "n p q"]:
    """Removes the mean over clients: the projection that eliminates an offset."""
    return x - jnp.mean(x, axis=0, keepdims=True)
