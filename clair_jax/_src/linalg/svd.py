"""Thin SVD, QR and symmetric eigendecomposition (sequential under vmap on CPU)."""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float

from clair_jax._src.linalg import batching

#: Aspect ratio (long side / short side) from which :func:`thin_svd` first
#: reduces the matrix to its short side by a QR factorisation.
QR_FIRST_ASPECT = 2


def thin_svd(z: Float[Array, "p m"], compute_uv: bool = True):
    """Thin SVD ``z = U diag(s) V^T`` (``jnp.linalg.svd(z, full_matrices=False)``).

    For a matrix at least ``QR_FIRST_ASPECT`` times wider than tall (or taller
    than wide) it first factorises ``z^T = Q R`` (``z = Q R``) and takes the
    SVD of the small square ``R^T`` (``R``): ``z = U_R Σ (Q W_R)^T``. This is
    exact (it does not square the condition number, unlike a Gram matrix) and
    cheaper, because LAPACK's SVD of a wide matrix costs several times its QR.
    Not meant for autodiff (the QR's derivative is singular at rank-deficient
    inputs); the SVT has its own JVP. Under ``jax.vmap`` on CPU the matrices are
    factorised one at a time (:func:`~clair_jax._src.linalg.batching.sequential_on_cpu`),
    as is every factorisation of this module.

    Args:
      z: a 2-D matrix.
      compute_uv: whether to return the singular vectors.

    Returns:
      ``(U, s, V^T)``, or ``s`` alone when ``compute_uv`` is False; ``s``
      descending.
    """
    return _thin_svd_factors(z) if compute_uv else _thin_svd_values(z)


def _qr_first_svd(z: Array, compute_uv: bool):
    rows, cols = z.shape
    if cols >= QR_FIRST_ASPECT * rows:  # wide: z = R^T Q^T
        q, r = jnp.linalg.qr(z.T)
        if not compute_uv:
            return jnp.linalg.svd(r, compute_uv=False)
        u, s, wt = jnp.linalg.svd(r.T)
        return u, s, wt @ q.T
    if rows >= QR_FIRST_ASPECT * cols:  # tall: z = Q R
        q, r = jnp.linalg.qr(z)
        if not compute_uv:
            return jnp.linalg.svd(r, compute_uv=False)
        w, s, vt = jnp.linalg.svd(r)
        return q @ w, s, vt
    out = jnp.linalg.svd(z, full_matrices=False, compute_uv=compute_uv)
    return tuple(out) if compute_uv else out  # a plain tuple, not jnp's SVDResult


@batching.sequential_on_cpu
def _thin_svd_factors(z: Array):
    return _qr_first_svd(z, True)


@batching.sequential_on_cpu
def _thin_svd_values(z: Array):
    return _qr_first_svd(z, False)


@batching.sequential_on_cpu
def orthonormal_factor(z: Array) -> Array:
    """``Q`` of the thin QR factorisation ``z = Q R`` (one matrix at a time under vmap on CPU)."""
    return jnp.linalg.qr(z)[0]


@batching.sequential_on_cpu
def symmetric_eigh(a: Array) -> tuple[Array, Array]:
    """``(eigenvalues ascending, eigenvectors)`` of the symmetric ``a`` (sequential on CPU)."""
    evals, evecs = jnp.linalg.eigh(a)
    return evals, evecs
