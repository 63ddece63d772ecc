"""Rank-capped SVT by warm-started subspace iteration, and its exactness certificate.

A block power (subspace) iteration with ``k`` columns, warm-started from the
previous call's right singular vectors, costs ``O(p m k)`` instead of
``O(p m min(p, m))`` and is exact at a fixed point while the thresholded rank
stays below ``k``. :func:`capped_svt_certified` proves when it is.

References:
  N. Halko, P.-G. Martinsson, J. A. Tropp, "Finding structure with randomness",
  SIAM Review 53(2), 2011, arXiv:0909.4061.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from clair_jax._src.linalg import batching
from clair_jax._src.linalg.svd import orthonormal_factor, thin_svd
from clair_jax._src.linalg.svt_exact import shrink, svt_wide_tangent


def svt_rank_capped(
    z: Float[Array, "p m"], tau, basis: Float[Array, "m k"], power_iters: int
) -> tuple[Array, Array, Array]:
    """``(SVT_tau(z) on the basis' subspace, rank, new basis)`` (backend ``"rank_capped"``).

    Args:
      z: a 2-D ``(p, m)`` matrix.
      tau: non-negative scalar threshold.
      basis: ``(m, k)`` orthonormal warm-start columns (not differentiated).
      power_iters: subspace iterations, static.

    Returns:
      The thresholded matrix, the number of kept singular values (at most
      ``k``) and the next warm-start basis.
    """
    out, s_new, new_basis = _svt_capped(z, tau, jax.lax.stop_gradient(basis), power_iters)
    return out, jnp.sum(s_new > 0), new_basis


@partial(jax.custom_jvp, nondiff_argnums=(3,))
def _svt_capped(z, tau, basis, power_iters: int) -> tuple[Array, Array, Array]:
    """``(SVT_tau(z) on the basis' subspace, shrunk singular values, new basis)``.

    Differentiated with the exact SVT's closed form (:func:`svt_wide_tangent`,
    from a thin SVD of ``z``), which is the derivative of the capped map whenever
    the cap does not bind; autodiff through its QR and SVD divides by
    singular-value gaps.
    """
    v = basis
    # z^T materialised once: XLA:CPU's product with a transposed left operand runs
    # several times slower than a copy followed by the plain product. The barrier keeps
    # XLA from folding the transpose back into the product.
    zt = jax.lax.optimization_barrier(z.T)
    for _ in range(power_iters - 1):
        q = orthonormal_factor(z @ v)
        v = orthonormal_factor(zt @ q)
    q = orthonormal_factor(z @ v)
    # The SVD of the small wide projection q^T z by way of the QR of z^T q (thin_svd).
    ub, s, vt = thin_svd((zt @ q).T)
    s_new = shrink(s, tau)
    out = ((q @ ub) * s_new[None, :]) @ vt
    return out, s_new, vt.T


@_svt_capped.defjvp
def _svt_capped_jvp(power_iters, primals, tangents):
    z, tau, basis = primals
    dz, dtau, _ = tangents
    out, s_new, new_basis = _svt_capped(z, tau, basis, power_iters)
    if z.shape[0] <= z.shape[1]:
        _, (d_out, _) = svt_wide_tangent(z, tau, dz, dtau)
    else:
        _, (d_out, _) = svt_wide_tangent(z.T, tau, dz.T, dtau)
        d_out = d_out.T
    return (out, s_new, new_basis), (d_out, jnp.zeros_like(s_new), jnp.zeros_like(new_basis))


def _nuclear_value_and_direction(m, row_basis, exact, *, direction: bool) -> tuple:
    """``(||m||_*,)``, or ``(||m||_*, G)`` with ``G = U W^T`` the nuclear norm's (sub)gradient.

    Without ``exact`` the rows of ``m`` must lie in the span of the orthonormal
    columns of ``row_basis``: then ``m = (m B) B^T`` and ``m B`` (``p x k``) has
    the singular values of ``m``. With ``exact`` a thin SVD of ``m`` is run
    instead, inside a ``while_loop`` of zero or one trip: a vmapped batch pays
    for it only when one of its elements asks for it. ``G`` (and the singular
    vectors it needs) is computed only when ``direction`` is True.
    """
    dtype = m.dtype

    def summarise(a):  # a has the singular values of m
        if not direction:
            return (jnp.sum(thin_svd(a, compute_uv=False)),)
        u, s, vt = thin_svd(a)
        keep = (s > jnp.finfo(dtype).eps * jnp.max(s, initial=0.0)).astype(dtype)
        return jnp.sum(s), (u * keep[None, :]) @ vt

    capped = summarise(m @ row_basis)
    if direction:
        capped = (capped[0], capped[1] @ row_basis.T)

    def full(carry):
        del carry
        return (*summarise(m), jnp.zeros((), bool))

    *out, _ = jax.lax.while_loop(lambda carry: carry[-1], full, (*capped, jnp.asarray(exact, bool)))
    return tuple(out)


@jax.custom_jvp
def nuclear_norm_in_row_space(
    m: Float[Array, "p m"], row_basis: Float[Array, "m k"], exact: Array
) -> Array:
    """``||m||_*`` from the ``k`` columns of ``row_basis`` that span the rows of ``m``.

    The rank-capped factorisation leaves its result ``L = Q diag(s) V^T`` with
    ``V`` the new warm-start basis, so ``||L||_* = ||L V||_*``: an SVD of a
    ``p x k`` matrix instead of ``p x m``. Differentiable in ``m``: the
    derivative is ``<U W^T, dm>`` (``L = U Σ W^T`` thin, zero singular values
    left out), the nuclear norm's gradient; ``row_basis`` is treated as fixed.

    Args:
      m: the matrix (rows in the span of ``row_basis`` unless ``exact``).
      row_basis: ``(cols, k)`` orthonormal columns.
      exact: traced bool; when True the norm comes from a full SVD of ``m``
        (``row_basis`` is then ignored).

    Returns:
      The nuclear norm, a scalar.
    """
    return _nuclear_value_and_direction(m, row_basis, exact, direction=False)[0]


@nuclear_norm_in_row_space.defjvp
def _nuclear_norm_in_row_space_jvp(primals, tangents):
    m, row_basis, exact = primals
    dm = tangents[0]
    value, direction = _nuclear_value_and_direction(m, row_basis, exact, direction=True)
    return value, jnp.sum(direction * dm)


@batching.sequential_on_cpu
def capped_svt_certified(
    z: Float[Array, "p m"],
    tau,
    basis: Float[Array, "m k"],
    rank,
    low_rank: Float[Array, "p m"],
    margin,
    error_bound,
) -> Array:
    """Whether ``low_rank`` is ``SVT_tau(z)`` to within ``error_bound``, proved.

    A certificate for the rank-capped factorisation, whose warm-started subspace
    iteration can settle one rank short (a singular value just above the threshold
    nearly tied with the first one outside the subspace) or keep singular vectors
    that have not converged (a kept singular value close to the bulk below it).
    With ``V`` the first ``rank`` columns of ``basis`` (the kept right singular
    vectors), ``Z V = U S O^T`` (thin SVD) and ``V' = V O``, the matrix

    .. math::

        \tilde Z = U S V'^T + (I - U U^T) Z (I - V' V'^T)

    has ``(U, S, V')`` among its singular triplets and differs from ``Z`` by
    ``E = U U^T Z (I - V V^T)`` (``(I - UU^T) Z V = 0``). When the remaining block
    ``Y = (I - U U^T) Z`` has ``||Y||_2 <= tau + margin`` (checked exactly by a
    Cholesky factorisation of ``(tau + margin)^2 I - Y Y^T``), ``SVT_tau(Z~)`` is
    ``U (S - tau)_+ V'^T`` (up to ``margin`` per singular value), and since SVT is
    non-expansive, ``||low_rank - SVT_tau(Z)||_F <= ||low_rank - U (S - tau)_+
    V'^T||_F + ||E||_F``. True when that bound is at most ``error_bound``.

    Under ``jax.vmap`` on CPU the problems are certified one at a time
    (``sequential_on_cpu``, as :func:`thin_svd`; positional arguments only).

    Args:
      z: the matrix thresholded.
      tau: the threshold.
      basis: ``(m, k)`` orthonormal columns, the first ``rank`` of them kept.
      rank: int scalar (may be traced), ``0 <= rank <= k``.
      low_rank: the capped result to certify.
      margin: non-negative slack added to ``tau`` for the remaining block.
      error_bound: the Frobenius error accepted.

    Returns:
      A bool scalar.
    """
    keep = (jnp.arange(basis.shape[1]) < rank).astype(z.dtype)
    v = basis * keep[None, :]
    u, s, ot = thin_svd(z @ v)  # s descending: the first `rank` are the kept ones
    u = u * keep[None, :]
    ut_z = u.T @ z
    off_block = ut_z - (ut_z @ v) @ v.T  # U^T Z (I - V V^T)
    y = z - u @ ut_z  # (I - U U^T) Z
    gram = y @ y.T if y.shape[0] <= y.shape[1] else y.T @ y
    bound = jnp.square(tau + margin)
    factor = jnp.linalg.cholesky(bound * jnp.eye(gram.shape[0], dtype=gram.dtype) - gram)
    rows = low_rank @ v
    kept = (u * (shrink(s, tau) * keep)[None, :]) @ ot
    distance = jnp.sqrt(
        jnp.sum(jnp.square(rows - kept)) + jnp.sum(jnp.square(low_rank - rows @ v.T))
    )
    error = distance + jnp.sqrt(jnp.sum(jnp.square(off_block)))
    return jnp.logical_and(jnp.all(jnp.isfinite(factor)), error <= error_bound)


def initial_basis(shape: tuple[int, int], rank_cap: int, dtype) -> Array:
    """Deterministic orthonormal starting basis for ``"rank_capped"``.

    Args:
      shape: ``(rows, cols)`` of the matrices thresholded.
      rank_cap: columns of the basis.
      dtype: its dtype.

    Returns:
      A ``(cols, rank_cap)`` matrix with orthonormal columns (from a fixed key).
    """
    key = jax.random.key(0)
    g = jax.random.normal(key, (shape[1], rank_cap), dtype=dtype)
    return orthonormal_factor(g)
