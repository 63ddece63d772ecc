"""Exact pairwise squared distances of the clients' factors (Krum's distances).

:func:`log_squared_distances` returns ``log ||x_i - x_j||^2`` for every pair of
clients, where ``x_i`` is client ``i``'s factors flattened (all leaves of a
pytree with a leading client axis: an array of rows, a
:class:`~clair_jax._src.lora.types.LoRAFactors`, or an adapter dict), without
concatenating them. Distances are never formed from Gram matrices
(``||x_i||^2 + ||x_j||^2 - 2 <x_i, x_j>`` cancels catastrophically for nearby
clients); every pair's differences are summed, in cache-sized column tiles of
each leaf, at a safe scale:

* Each pair's differences are multiplied by ``2^{-E_ij}``, with ``2^{E_ij}`` a
  power-of-two bound of ``|x_i| + |x_j|`` (largest entries, per leaf), so the
  scaled differences are below 8 in size and the sum of their squares cannot
  overflow. A power of two scales exactly: the sum equals the unscaled one's
  rounding.
* Small scaled differences can underflow when squared. That changes the sum
  only when it is itself tiny: a pair whose scaled sum over all leaves is below
  ``2^-40`` (near-identical clients, relative to their size, or identical ones)
  is recomputed exactly as :func:`scaled_norms` does (differences divided by
  their own largest entry), one pair at a time.

So finite factors of any magnitude give the logs of their exact squared
distances to the dtype's rounding (``-inf`` for identical clients), and the
logs of several modules combine by ``logaddexp``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from clair_jax._src.aggregators.factor_algebra import client_blocks

#: Pair-coordinates (``n^2 x`` columns) of one tile of the distance sweep.
TILE_PAIR_ELEMENTS = 1 << 20
#: A pair whose scaled sum of squares is below ``2^-SUSPECT_BITS`` is recomputed exactly.
SUSPECT_BITS = 40


def scaled_norms(diff: Array) -> Array:
    """``(n,)`` row norms ``m ||diff / m||`` with ``m`` each row's largest entry.

    Neither overflows nor underflows for finite rows of any magnitude (the
    squares are of entries in ``[-1, 1]``, the largest equal to 1).
    """
    m = jnp.max(jnp.abs(diff), axis=1)
    scaled = diff / jnp.where(m > 0, m, 1)[:, None]
    return m * jnp.sqrt(jnp.sum(scaled * scaled, axis=1))


def _tile_width(n: int, d: int) -> int:
    """Columns per tile: about ``TILE_PAIR_ELEMENTS`` pair-coordinates, at least 8."""
    return max(1, min(d, max(8, TILE_PAIR_ELEMENTS // (n * n))))


def _scaled_sums(x: Array, scale: Array, excluded: Array) -> Array:
    """``(n, n)`` sums over the columns of ``((x_i - x_j) scale_ij)^2``, tile by tile
    (excluded rows read as zeros)."""
    n, d = x.shape
    tile = _tile_width(n, d)

    def part(cols: Array) -> Array:
        cols = jnp.where(excluded[:, None], 0, cols)
        diff = (cols[:, None, :] - cols[None, :, :]) * scale[:, :, None]
        return jnp.sum(diff * diff, axis=2)

    count = d // tile

    def body(total, i):
        cols = jax.lax.dynamic_slice_in_dim(x, i * tile, tile, axis=1)
        return total + part(cols), None

    total, _ = jax.lax.scan(body, jnp.zeros((n, n), x.dtype), jnp.arange(count))
    if count * tile < d:
        total = total + part(x[:, count * tile :])
    return total


def _exact_pairs(blocks: list[Array], log_d: Array, suspect: Array) -> Array:
    """``log_d`` with the ``suspect`` pairs (upper triangle) recomputed by scaled norms."""
    n = log_d.shape[0]
    pairs = n * (n - 1) // 2
    rows, cols = jnp.nonzero(suspect, size=max(pairs, 1), fill_value=0)
    count = jnp.sum(suspect)

    def body(state):
        k, out = state
        i, j = rows[k], cols[k]
        diffs = [b[i] - b[j] for b in blocks]
        m = jnp.max(jnp.stack([jnp.max(jnp.abs(v)) for v in diffs]))
        safe = jnp.where(m > 0, m, 1)
        ssq = sum(jnp.sum(jnp.square(v / safe)) for v in diffs)
        value = jnp.where(m > 0, 2 * jnp.log(m) + jnp.log(ssq), -jnp.inf)
        return k + 1, out.at[i, j].set(value).at[j, i].set(value)

    _, out = jax.lax.while_loop(lambda s: s[0] < count, body, (jnp.zeros((), count.dtype), log_d))
    return out


def log_squared_distances(clients, excluded: Array | None = None) -> Array:
    """``(n, n)`` logs of the clients' exact pairwise squared Euclidean distances.

    ``L_ij = log ||x_i - x_j||^2`` over all leaves of ``clients`` (see the module
    docstring for the safe scale and the exact recomputation of tiny distances).
    The sum of the logs' exponentials over several calls (``logaddexp``) is the
    distance over the union of their leaves, so distances can be accumulated
    module by module.

    Args:
      clients: a pytree of arrays with a leading client axis of length ``n``
        (rows ``(n, d)``, a ``LoRAFactors``, an adapter dict); computed in the
        working dtype (at least float32).
      excluded: optional ``(n,)`` bool; pairs with an excluded client are
        ``+inf`` and its factors are never read into a sum.

    Returns:
      ``(n, n)`` symmetric, ``-inf`` on the diagonal and for identical clients;
      NaN for pairs of included clients with non-finite factors.

    Raises:
      ValueError: ``clients`` holds no arrays or no common client axis, or
        ``excluded`` has the wrong shape.
    """
    blocks, _ = client_blocks(clients)
    n = blocks[0].shape[0]
    if excluded is None:
        excluded = jnp.zeros((n,), bool)
    excluded = jnp.asarray(excluded)
    if excluded.shape != (n,):
        raise ValueError(f"excluded must have shape ({n},), got {excluded.shape}.")
    dtype = blocks[0].dtype
    info = jnp.finfo(dtype)
    ln2 = np.log(2.0).astype(dtype)
    logs, exponents = [], []
    for b in blocks:
        _, e = jnp.frexp(jnp.max(jnp.where(excluded[:, None], 0, jnp.abs(b)), axis=1))  # < 2^e_i
        # |b_i - b_j| < 2^(max + 1); clipped so that 2^-E is a normal number.
        big = jnp.clip(jnp.maximum(e[:, None], e[None, :]) + 1, info.minexp, info.maxexp - 2)
        scale = jnp.ldexp(jnp.ones((), dtype), -big)
        logs.append(jnp.log(_scaled_sums(b, scale, excluded)) + 2 * big.astype(dtype) * ln2)
        exponents.append(big)
    log_d = jax.nn.logsumexp(jnp.stack(logs), axis=0) if len(logs) > 1 else logs[0]
    bound = 2 * jnp.max(jnp.stack(exponents), axis=0).astype(dtype) * ln2
    upper = jnp.triu(jnp.ones((n, n), bool), 1) & ~excluded[:, None] & ~excluded[None, :]
    suspect = upper & (log_d < bound - SUSPECT_BITS * ln2)
    log_d = jax.lax.cond(
        jnp.any(suspect), lambda v: _exact_pairs(blocks, v, suspect), lambda v: v, log_d
    )  # the excluded rows are not read: no suspect pair holds one
    log_d = jnp.where(jnp.eye(n, dtype=bool), -jnp.inf, log_d)
    return jnp.where(excluded[:, None] | excluded[None, :], jnp.inf, log_d)
