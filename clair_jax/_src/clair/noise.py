"""Noise level of client updates: sizes, Marchenko–Pastur median, regularisation weights."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from clair_jax._src.linalg import prox
from clair_jax._src.linalg import svd as svd_lib
from clair_jax._src.linalg.scaling import times_power_of_two, working_exponent

#: ``λ_* = LAM_NUC_FACTOR σ̂ (sqrt(p) + sqrt(nq))``.
LAM_NUC_FACTOR = 2.0
#: ``λ_S = LAM_BLOCK_FACTOR σ̂ sqrt(pq)``.
LAM_BLOCK_FACTOR = 2.0


#: σ̂ (estimated or given) is kept above this fraction of the typical client's
#: root-mean-square entry (:func:`typical_size`), so that noiseless data give
#: small positive λ's rather than zero.
NOISE_FLOOR = 1e-3


def marchenko_pastur_median(beta: Float[ArrayLike, ""], points: int = 1025) -> Array:
    """Median of the Marchenko–Pastur law with aspect ratio ``0 < beta <= 1`` (unit variance).

    The eigenvalues of ``Y Y^T / N`` for an ``M x N`` (``M <= N``) matrix ``Y``
    with i.i.d. unit-variance entries follow, as ``M/N -> beta``, the density
    ``sqrt((b - x)(x - a)) / (2 pi beta x)`` on ``[a, b] = [(1 ∓ sqrt(beta))^2]``.
    Integrated by the trapezoid rule in ``x = a + (b - a)(1 - cos θ)/2``, which
    makes the integrand smooth.

    Args:
      beta: aspect ratio ``M / N`` in ``(0, 1]``; may be traced.
      points: quadrature nodes (static).

    Returns:
      The median, a scalar of the default float dtype.

    Examples:
      >>> round(float(marchenko_pastur_median(1.0)), 3)
      0.653
    """
    beta = jnp.asarray(beta, jnp.result_type(float))
    a, b = (1.0 - jnp.sqrt(beta)) ** 2, (1.0 + jnp.sqrt(beta)) ** 2
    theta = jnp.linspace(0.0, jnp.pi, points, dtype=beta.dtype)
    half = 0.5 * (b - a)
    x = a + half * (1.0 - jnp.cos(theta))
    # (half sin θ)^2 / x, continued by its limit 4 half^2 / b at θ = 0 when a = 0.
    safe_x = jnp.where(x > 0, x, 1.0)
    ratio = jnp.where(x > 0, (half * jnp.sin(theta)) ** 2 / safe_x, 4.0 * half**2 / b)
    dens = ratio / (2.0 * jnp.pi * beta)
    steps = 0.5 * (dens[1:] + dens[:-1]) * jnp.diff(theta)
    cdf = jnp.concatenate([jnp.zeros((1,), dens.dtype), jnp.cumsum(steps)])
    return jnp.interp(0.5, cdf / cdf[-1], x)


def spectral_noise_scale(blocks: Array, rows, cols) -> Array:
    """Gavish–Donoho estimate of ``σ`` from the singular values of ``[B_1 .. B_n]``.

    ``rows x cols`` is the size of the pure-noise matrix the blocks hold (fewer
    rows after projecting out a subspace, fewer columns after masking clients);
    its ``min(rows, cols)`` non-zero singular values have median
    ``σ sqrt(max(rows, cols) μ_β)``, ``μ_β`` the Marchenko–Pastur median of
    ``β = min/max``. Low-rank spikes and a minority of contaminated blocks move
    this median little, and only upwards.

    Args:
      blocks: ``(n, p, q)`` blocks (masked or projected).
      rows: rows of the pure-noise matrix (may be traced).
      cols: columns of the pure-noise matrix (may be traced).

    Returns:
      The estimate of ``σ``, a scalar.

    References:
      M. Gavish, D. L. Donoho, "The optimal hard threshold for singular values is
      4/sqrt(3)", IEEE Trans. Inf. Theory 60(8), 2014, arXiv:1305.5870.
    """
    s = svd_lib.thin_svd(prox.blocks_to_matrix(blocks), compute_uv=False)
    return noise_scale_from_spectrum(s, rows, cols)


def noise_scale_from_spectrum(s: Array, rows, cols) -> Array:
    """:func:`spectral_noise_scale` from the singular values ``s`` (descending)."""
    rows = jnp.maximum(jnp.asarray(rows, s.dtype), 1.0)
    cols = jnp.maximum(jnp.asarray(cols, s.dtype), 1.0)
    small, large = jnp.minimum(rows, cols), jnp.maximum(rows, cols)
    k = jnp.minimum(small, s.shape[0]).astype(jnp.int32)
    med = 0.5 * (s[(k - 1) // 2] + s[k // 2])
    return med / jnp.sqrt(large * marchenko_pastur_median(small / large).astype(s.dtype))


def lambdas(given, sigma, lam_nuc, lam_block, n, p, q):
    """``(λ_*, λ_S)``: the given values where ``given[0]``/``given[1]``, else the rules.

    Args:
      given: ``(3,)`` bool, which of ``(lam_nuc, lam_block, threshold)`` were given.
      sigma: the noise level ``σ̂``.
      lam_nuc: the given ``λ_*`` (used where ``given[0]``).
      lam_block: the given ``λ_S`` (used where ``given[1]``).
      n: clients (static).
      p: rows (static).
      q: columns (static).

    Returns:
      ``(λ_*, λ_S)`` in ``sigma``'s dtype.
    """
    # Python floats (weakly typed): σ̂ keeps the data dtype, also under jax_enable_x64.
    rule_nuc = LAM_NUC_FACTOR * sigma * float(np.sqrt(p) + np.sqrt(n * q))
    rule_block = LAM_BLOCK_FACTOR * sigma * float(np.sqrt(p * q))
    return jnp.where(given[0], lam_nuc, rule_nuc), jnp.where(given[1], lam_block, rule_block)


def masked_median(values: Array, mask: Array) -> Array:
    """Median of ``values`` where ``mask`` (NaN when the mask is empty)."""
    return jnp.nanmedian(jnp.where(mask, values, jnp.nan))


def client_sizes(x: Array, offset: bool) -> Array:
    """``(n,)`` root-mean-square entry of each ``X_i`` (of ``X_i - c̃`` with an offset).

    ``c̃`` is the entrywise median of the blocks, which a few huge
    (contaminated) clients do not move. Each block is scaled by the power of two
    of its largest entry before squaring, so nothing overflows or underflows.

    Args:
      x: ``(n, p, q)`` client blocks.
      offset: whether to remove the entrywise median first (static).

    Returns:
      ``(n,)`` sizes in ``x``'s dtype.
    """
    if offset:
        x = x - jnp.median(x, axis=0)[None]
    exponent = working_exponent(x, axes=(1, 2), keepdims=True)
    unit = times_power_of_two(x, -exponent)  # largest entry in [1/2, 1)
    return times_power_of_two(jnp.sqrt(jnp.mean(unit**2, axis=(1, 2))), exponent[:, 0, 0])


def typical_size(sizes: Array) -> Array:
    """Median of the non-zero client sizes (0 when all are zero).

    Clients sending nothing (idle, or an untrained zero-initialised factor) do
    not pull the typical size, hence the noise floor, the λ's and τ, to zero.

    Args:
      sizes: ``(n,)`` non-negative client sizes.

    Returns:
      A scalar in ``sizes``' dtype.
    """
    typical = masked_median(sizes, sizes > 0)
    return jnp.where(jnp.any(sizes > 0), typical, 0.0).astype(sizes.dtype)
