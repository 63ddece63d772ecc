"""Sorting the clients' values coordinate by coordinate (the median and the trimmed mean).

For up to :data:`NETWORK_MAX_CLIENTS` clients the values of every coordinate
are sorted by a compare-exchange network of element-wise ``minimum`` /
``maximum`` (Batcher's odd-even merge sort), whose outputs the rules select
from element-wise, so that XLA fuses the network and the selection into one
pass over the coordinates; :func:`by_column_tiles` runs that pass over
cache-sized column tiles. Beyond, ``jnp.sort`` along the client axis.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array

#: Entries (clients x columns) of one tile of the coordinate-wise rules.
TILE_ENTRIES = 1 << 18


def by_column_tiles(fn: Callable[[Array], Array], rows: Array) -> Array:
    """``fn`` (``(n, t) -> (t,)``, column by column) applied to ``(n, d)`` rows, tile by tile.

    A loop over cache-sized column tiles (at least two; the last one overlapping
    its predecessor, so every tile has the same width). Besides keeping a tile
    in cache, the loop computes each column once: XLA would otherwise fuse a
    sorting network into every consumer of its result (the finiteness checks,
    each client's copy of the broadcast result) and run it again there.
    """
    n, d = rows.shape
    if d < 2:
        return fn(rows)
    tile = min(-(-d // 2), max(1, TILE_ENTRIES // max(n, 1)))
    count = -(-d // tile)

    def body(i, out):
        start = jnp.minimum(i * tile, d - tile)
        cols = jax.lax.dynamic_slice_in_dim(rows, start, tile, axis=1)
        return jax.lax.dynamic_update_slice_in_dim(out, fn(cols).astype(out.dtype), start, 0)

    return jax.lax.fori_loop(0, count, body, jnp.zeros((d,), rows.dtype))


#: Largest number of clients sorted by a compare-exchange network (beyond it, ``jnp.sort``).
NETWORK_MAX_CLIENTS = 64


def network_pairs(size: int) -> list[tuple[int, int]]:
    """Compare-exchange pairs of Batcher's odd-even merge sort of ``size`` (a power of two)."""
    pairs, p = [], 1
    while p < size:
        k = p
        while k >= 1:
            for j in range(k % p, size - k, 2 * k):
                for i in range(min(k, size - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return pairs


def sorted_rows(rows: Array) -> list[Array] | Array:
    """The ``(n, d)`` rows sorted along the client axis, as a list of ``n`` rows (or an array).

    For ``n <= NETWORK_MAX_CLIENTS`` a Batcher odd-even merge sorting network of
    element-wise ``minimum``/``maximum`` (``O(n log^2 n)`` comparators), which XLA
    fuses into one pass over the ``d`` coordinates, where ``jnp.sort(rows, axis=0)``
    sorts ``d`` separate length-``n`` segments. Rows are padded with ``+inf`` to a
    power of two; NaNs propagate.
    """
    n = rows.shape[0]
    if n > NETWORK_MAX_CLIENTS:
        return jnp.sort(rows, axis=0)
    size = 1 << max(n - 1, 0).bit_length()
    out = [rows[i] for i in range(n)]
    out += [jnp.full_like(rows[0], jnp.inf)] * (size - n)
    for a, b in network_pairs(size):
        out[a], out[b] = jnp.minimum(out[a], out[b]), jnp.maximum(out[a], out[b])
    return out[:n]


def ordered_rows(rows: Array, excluded: Array) -> list[Array] | Array:
    """The included rows sorted along the client axis, then ``+inf`` rows.

    The excluded rows are replaced by ``+inf`` (with ``jnp.where``) before the
    sort, so the ``m`` included values of every coordinate come first. A list of
    ``n`` rows from the sorting network (consumers select from it elementwise,
    so that XLA fuses the network and the selection into one pass over the
    coordinates instead of writing the ``n`` sorted rows out), or the ``(n, d)``
    array of ``jnp.sort`` beyond ``NETWORK_MAX_CLIENTS``.
    """
    return sorted_rows(jnp.where(excluded[:, None], jnp.inf, rows))


def pick(ordered: list[Array] | Array, index: Array, last: int) -> Array:
    """``ordered[index]`` for a traced ``0 <= index <= last`` (elementwise on a list)."""
    if isinstance(ordered, jax.Array):
        return ordered[index]
    out = ordered[0]
    for j in range(1, last + 1):
        out = jnp.where(index == j, ordered[j], out)
    return out


def median_rows(rows: Array, excluded: Array | None = None) -> Array:
    """Median over the client axis of the included ``(n, d)`` rows (mean of the two middle).

    With ``m`` included rows, the mean of the sorted rows ``(m - 1) // 2`` and
    ``m // 2``; when every row is excluded, zeros (the aggregator keeps the
    previous global adapter then).
    """
    n = rows.shape[0]
    if excluded is None:
        excluded = jnp.zeros((n,), bool)
    m = n - jnp.sum(excluded)
    ordered = ordered_rows(rows, excluded)
    lo = pick(ordered, jnp.maximum(m - 1, 0) // 2, (n - 1) // 2)
    hi = pick(ordered, m // 2, n // 2)
    return jnp.where(m > 0, 0.5 * lo + 0.5 * hi, 0)  # halves first: no overflow
