"""Singular value thresholding by exact factorisations: the thin SVD and the Gram matrix.

Both backends share the closed-form differential of :func:`svt_wide_tangent`,
which stays finite at repeated and zero singular values, where autodiff through
``svd`` or ``eigh`` divides by zero.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from clair_jax._src.linalg.svd import symmetric_eigh, thin_svd


def shrink(s: Array, tau: Array) -> Array:
    """Soft threshold of singular values, ``max(s - tau, 0)``."""
    return jnp.maximum(s - tau, 0.0)


def _on_wide_side(svt_wide, z: Array, tau) -> tuple[Array, Array]:
    """``(SVT_tau(z), rank)`` from a ``p <= m`` kernel ``svt_wide(z, tau) -> (out, s)``,
    transposing a tall ``z`` (the SVT commutes with transposition)."""
    tall = z.shape[0] > z.shape[1]
    out, s = svt_wide(z.T if tall else z, tau)
    return (out.T if tall else out), jnp.sum(s > tau)


def svt_full(z: Float[Array, "p m"], tau) -> tuple[Array, Array]:
    """``(SVT_tau(z), rank)`` from the thin SVD (backend ``"full"``), no argument checks.

    Args:
      z: a 2-D matrix.
      tau: non-negative scalar threshold.

    Returns:
      The thresholded matrix and the number of singular values above ``tau``.
    """
    return _on_wide_side(_svt_wide, z, tau)


def ratio(num, den, limit):
    """``num / den`` clipped to ``[0, 1]``, ``limit`` where ``den == 0``."""
    safe = jnp.where(den == 0, 1.0, den)
    return jnp.where(den == 0, limit, jnp.clip(num / safe, 0.0, 1.0))


@jax.custom_jvp
def _svt_wide(z: Float[Array, "p m"], tau) -> tuple[Array, Array]:
    """``(SVT_tau(z), singular values of z)`` for ``p <= m``, with a closed-form JVP."""
    u, s, vt = thin_svd(z)
    return (u * shrink(s, tau)[None, :]) @ vt, s


@_svt_wide.defjvp
def _svt_wide_jvp(primals, tangents):
    z, tau = primals
    (out, s), tangent = svt_wide_tangent(z, tau, *tangents)
    return (out, s), tangent


def svt_wide_tangent(z, tau, dz, dtau):
    r"""The differential of SVT (Candès, Sing-Long & Trzasko 2013, arXiv:1210.4139).

    With ``z = U diag(s) V^T`` (thin, ``p <= m``), ``f(s) = max(s - tau, 0)`` and
    ``A = U^T dz V``:

    .. math::

        d\,\mathrm{SVT} = U \big(R^- \circ \mathrm{sym}(A) + R^+ \circ
          \mathrm{skew}(A)\big) V^T + U \operatorname{diag}(f(s)/s) U^T dz
          (I - V V^T) - d\tau\, U \operatorname{diag}(1[s > \tau]) V^T

    with ``R^-_ij = (f_i - f_j)/(s_i - s_j)`` and ``R^+_ij = (f_i + f_j)/(s_i + s_j)``,
    divided differences of a monotone 1-Lipschitz ``f``, so in ``[0, 1]``; where
    the denominator vanishes (repeated or zero singular values, e.g. exactly
    low-rank or zero data) they take their limits ``f'(s_i)`` and ``1[tau == 0]``,
    with ``f'(s) = 1[s > tau]`` except that ``f`` is the identity on ``s >= 0``
    when ``tau == 0`` (``SVT_0(z) = z``): ``f' = 1`` there, also at ``s = 0``
    (an exactly zero repeated singular value, as LAPACK returns for some
    rank-deficient matrices). Autodiff through ``jnp.linalg.svd`` divides by
    ``s_i^2 - s_j^2`` instead and returns NaN there.
    """
    u, s, vt = thin_svd(z)
    f = shrink(s, tau)
    active = (s > tau).astype(z.dtype)
    zero_limit = jnp.where(tau == 0, 1.0, 0.0).astype(z.dtype)
    slope = jnp.maximum(active, zero_limit)  # f'(s); f is the identity when tau == 0
    r_minus = ratio(f[:, None] - f[None, :], s[:, None] - s[None, :], slope[:, None])
    r_plus = ratio(f[:, None] + f[None, :], s[:, None] + s[None, :], zero_limit)
    left = u.T @ dz  # (p, m)
    a = left @ vt.T  # (p, p)
    inner = r_minus * 0.5 * (a + a.T) + r_plus * 0.5 * (a - a.T)
    scale = ratio(f, s, zero_limit)
    complement = (u * scale[None, :]) @ (left - a @ vt)
    d_out = u @ inner @ vt + complement - dtau * (u * active[None, :]) @ vt
    return ((u * f[None, :]) @ vt, s), (d_out, jnp.diagonal(a))


def svt_gram(z: Float[Array, "p m"], tau) -> tuple[Array, Array]:
    """``(SVT_tau(z), rank)`` from the smaller Gram matrix (backend ``"gram"``).

    Singular values below about ``sqrt(eps) * s_max`` are not resolved; they
    matter only when ``tau`` is below that level.

    Args:
      z: a 2-D matrix.
      tau: non-negative scalar threshold.

    Returns:
      The thresholded matrix and the number of singular values above ``tau``.
    """
    return _on_wide_side(_svt_gram_wide, z, tau)


@jax.custom_jvp
def _svt_gram_wide(z: Float[Array, "p m"], tau) -> tuple[Array, Array]:
    """``(SVT_tau(z), singular values of z)`` for ``p <= m`` from ``eigh(z z^T)``.

    Differentiated with the closed form of :func:`svt_wide_tangent` (from a thin
    SVD of ``z``): autodiff through ``eigh`` divides by eigenvalue gaps and
    returns NaN for repeated ones.
    """
    gram = z @ z.T
    gram = 0.5 * (gram + gram.T)
    evals, evecs = symmetric_eigh(gram)
    s = jnp.sqrt(jnp.maximum(evals, 0.0))
    keep = s > tau
    # Safe division: the ratio is only used where s > tau >= 0.
    s_safe = jnp.where(keep, s, 1.0)
    factor = jnp.where(keep, (s - tau) / s_safe, 0.0)
    # One p x p x m product instead of two: (U diag(factor) U^T) z.
    return ((evecs * factor[None, :]) @ evecs.T) @ z, s


@_svt_gram_wide.defjvp
def _svt_gram_wide_jvp(primals, tangents):
    z, tau = primals
    out, s = _svt_gram_wide(z, tau)
    _, tangent = svt_wide_tangent(z, tau, *tangents)
    return (out, s), (tangent[0], tangent[1][::-1])  # eigh orders s ascending
