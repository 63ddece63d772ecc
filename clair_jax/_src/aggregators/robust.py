"""Byzantine-robust rules on the clients' flattened factors.

Every factory takes ``screen=`` (see
:func:`~clair_jax._src.aggregators.base.make_aggregator`). The rules act on the
included clients only: the medians, the trimmed means and the Krum scores are
taken over them (the excluded rows never enter a sort or a distance), and the
geometric median gives the excluded ones zero weight.

The coordinate-wise rules (median, trimmed mean) run leaf by leaf (no
concatenated copy of all factors), sorting each coordinate over the clients by
a compare-exchange network in cache-sized column tiles. Krum's distances are
exact pairwise sums of squared differences
(:func:`~clair_jax._src.aggregators.distances.log_squared_distances`), never
Gram-matrix shortcuts, at a safe scale (powers of two and, for tiny distances,
each difference divided by its largest entry), which changes no ranking and no
minimiser; the geometric median's distances are scaled the same way.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from clair_jax._src import validation
from clair_jax._src.aggregators.base import (
    AggregateResult,
    Aggregator,
    broadcast_result,
    make_aggregator,
)
from clair_jax._src.aggregators.distances import log_squared_distances, scaled_norms
from clair_jax._src.aggregators.factor_algebra import (
    HIGHEST,
    client_blocks,
    flatten_clients,
    selected_mean,
)
from clair_jax._src.aggregators.sorting import by_column_tiles, median_rows, ordered_rows
from clair_jax._src.linalg.scaling import times_power_of_two, working_exponent


def coordinate_median(*, screen: str = "exclude") -> Aggregator:
    """Coordinate-wise median of the clients' flattened factors (unweighted).

    Every coordinate of ``(B, A)`` over all modules is the median over the
    included clients (the mean of the two middle values when their number is
    even). Flags nobody.

    References:
      D. Yin, Y. Chen, K. Ramchandran, P. Bartlett, "Byzantine-Robust Distributed
      Learning: Towards Optimal Statistical Rates", ICML 2018, arXiv:1803.01498.
    """

    def core(clients, global_, p, excluded, round_index, key) -> AggregateResult:
        del round_index, key
        blocks, unblock = client_blocks(clients)
        median = unblock([by_column_tiles(lambda x: median_rows(x, excluded), b) for b in blocks])
        return broadcast_result(clients, median, p)

    return make_aggregator("coordinate_median", core, screen=screen)


def trimmed_mean(beta: float = 0.1, *, screen: str = "exclude") -> Aggregator:
    """Coordinate-wise β-trimmed mean of the clients' flattened factors (unweighted).

    For every coordinate the ``k = floor(β m)`` largest and ``k`` smallest values
    over the ``m`` included clients are removed and the remaining ``m - 2k``
    averaged. Flags nobody.

    Args:
      beta: fraction trimmed from each side, ``0 <= β < 1/2`` (and ``2k < m``).
      screen: ``"exclude"``, ``"raise"`` or ``"off"``.

    References:
      D. Yin, Y. Chen, K. Ramchandran, P. Bartlett, "Byzantine-Robust Distributed
      Learning: Towards Optimal Statistical Rates", ICML 2018, arXiv:1803.01498.
    """
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not 0 <= beta < 0.5:
        raise ValueError(f"beta must be a number in [0, 0.5), got {beta!r}.")

    def core(clients, global_, p, excluded, round_index, key) -> AggregateResult:
        del round_index, key
        blocks, unblock = client_blocks(clients)
        n = blocks[0].shape[0]
        m = n - jnp.sum(excluded)
        # k = floor(β m) from a table of the static values (exactly as in float64).
        k = jnp.asarray(np.floor(beta * np.arange(n + 1)).astype(np.int32))[m]
        kept = [(j >= k) & (j < m - k) for j in range(n)]
        count = jnp.maximum(m - 2 * k, 1)
        # Summed at unit size (one power of two for all factors), so the sum of finite
        # rows cannot overflow.
        exponent = jnp.max(
            jnp.stack([working_exponent(jnp.where(excluded[:, None], 0, b)) for b in blocks])
        )

        def trimmed(rows):
            ordered = ordered_rows(times_power_of_two(rows, -exponent), excluded)
            if isinstance(ordered, jax.Array):
                total = jnp.sum(jnp.where(jnp.stack(kept)[:, None], ordered, 0), axis=0)
            else:  # one elementwise pass over the network's outputs
                total = jnp.where(kept[0], ordered[0], 0)
                for j in range(1, n):
                    total = total + jnp.where(kept[j], ordered[j], 0)
            return times_power_of_two(total / count.astype(rows.dtype), exponent)

        return broadcast_result(clients, unblock([by_column_tiles(trimmed, b) for b in blocks]), p)

    return make_aggregator("trimmed_mean", core, screen=screen)


def unit_rows(rows: Array, excluded: Array) -> Array:
    """The included rows times ``2^-e`` (largest entry in ``[1/2, 1)``), the others zero."""
    rows = jnp.where(excluded[:, None], 0, rows)
    return times_power_of_two(rows, -working_exponent(rows))


def krum_scores(clients, f: int, excluded: Array | None = None) -> Array:
    """Krum scores: sum of squared distances to the ``m - f - 2`` nearest other clients.

    Over the ``m`` included clients (the excluded get ``+inf``; with fewer than
    ``f + 3`` included, one neighbour). ``inf`` where a score exceeds the dtype;
    rank by :func:`log_krum_scores`, which does not overflow.
    """
    return jnp.exp(log_krum_scores(clients, f, excluded))


def log_krum_scores(clients, f: int, excluded: Array | None = None) -> Array:
    """Logs of the Krum scores of :func:`krum_scores`, at a safe scale.

    ``clients``: rows ``(n, d)`` or any pytree with a leading client axis (its
    leaves together are each client's vector). The distances are exact
    (:func:`~clair_jax._src.aggregators.distances.log_squared_distances`) and
    summed in the log domain, so the ranking is exact for finite factors of any
    magnitude.
    """
    log_d = log_squared_distances(clients, excluded)
    return log_krum_scores_from_distances(log_d, f, excluded)


def log_krum_scores_from_distances(log_d: Array, f: int, excluded: Array | None = None) -> Array:
    """Logs of the Krum scores from ``(n, n)`` logs of squared distances.

    ``log_d`` as from
    :func:`~clair_jax._src.aggregators.distances.log_squared_distances`, or
    several modules' combined by ``logaddexp``; the diagonal and the pairs with
    an excluded client are ignored, and excluded clients score ``+inf``.
    """
    n = log_d.shape[0]
    if excluded is None:
        excluded = jnp.zeros((n,), bool)
    logd = jnp.where(jnp.eye(n, dtype=bool) | excluded[None, :] | excluded[:, None], jnp.inf, log_d)
    neighbours = jnp.maximum(n - jnp.sum(excluded) - f - 2, 1)
    ordered = jnp.sort(logd, axis=1)
    near = jnp.arange(n)[None, :] < neighbours
    log_scores = jax.nn.logsumexp(jnp.where(near, ordered, -jnp.inf), axis=1)
    return jnp.where(excluded, jnp.inf, log_scores)


def _check_krum(n: int, f: int, m: int) -> None:
    if n < 2 * f + 3:
        raise ValueError(f"Krum with f={f} needs n >= 2f + 3 = {2 * f + 3} clients, got n={n}.")
    if m > n:
        raise ValueError(f"multi_krum m={m} is larger than the number of clients n={n}.")


def multi_krum(f: int, m: int, *, screen: str = "exclude") -> Aggregator:
    """Multi-Krum: average the ``m`` clients with the lowest Krum scores.

    On the clients' flattened factors ``x_i`` (all modules), the score of client
    ``i`` is ``Σ_{j ∈ N_i} ||x_i - x_j||^2`` over its ``n - f - 2`` nearest other
    clients; the ``m`` lowest-scoring clients (ties broken by index) are averaged
    factor-wise with their weights renormalised, and the others are flagged.
    ``m = 1`` is Krum. Scores are computed once (Blanchard et al.'s Multi-Krum),
    not by repeated Krum. Needs ``n >= 2f + 3``. Screened-out clients take no
    part: the scores count the included clients' neighbours among the included
    (at least one neighbour when screening leaves fewer than ``2f + 3``), and
    at most the included clients are selected. Diagnostics: ``krum/scores``.

    Args:
      f: assumed number of Byzantine clients, ``f >= 0``.
      m: number of clients averaged, ``1 <= m <= n``.
      screen: ``"exclude"``, ``"raise"`` or ``"off"``.

    References:
      P. Blanchard, E. M. El Mhamdi, R. Guerraoui, J. Stainer, "Machine Learning
      with Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS 2017.
    """
    for value, arg, low in ((f, "f", 0), (m, "m", 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{arg} must be an int >= {low}, got {value!r}.")
    f, m = int(f), int(m)

    def core(clients, global_, p, excluded, round_index, key) -> AggregateResult:
        del round_index, key
        n = excluded.shape[0]
        _check_krum(n, f, m)
        log_scores = log_krum_scores(clients, f, excluded)
        scores = jnp.exp(log_scores)
        selected = jnp.zeros((n,), bool).at[jnp.argsort(log_scores, stable=True)[:m]].set(True)
        selected = selected & ~excluded
        w = jnp.where(selected, p, 0.0)
        # All selected weights zero (zero-weight clients): average them equally.
        w = jnp.where(jnp.sum(w) > 0, w, selected.astype(p.dtype))
        w = w / jnp.sum(w)
        new_global = {name: selected_mean(fac, w, selected, m) for name, fac in clients.items()}
        return broadcast_result(clients, new_global, p, ~selected, {"krum/scores": scores})

    return make_aggregator("krum" if m == 1 else "multi_krum", core, screen=screen)


def krum(f: int, *, screen: str = "exclude") -> Aggregator:
    """Krum: the single client with the lowest Krum score (see :func:`multi_krum`).

    The global adapter is that client's factors; every other client is flagged.

    References:
      P. Blanchard, E. M. El Mhamdi, R. Guerraoui, J. Stainer, "Machine Learning
      with Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS 2017.
    """
    return multi_krum(f, 1, screen=screen)


def geometric_median(
    *, nu: float = 1e-6, max_iter: int = 100, tol: float = 1e-6, screen: str = "exclude"
) -> Aggregator:
    """Weighted geometric median of the flattened factors by smoothed Weiszfeld (RFA).

    Minimises ``Σ_i α_i max(ν, ||v - x_i||)`` (``α_i = p_i``, zero for excluded
    clients) by the iteration

    .. math::

        β_i = \\frac{α_i}{\\max(ν, \\|v - x_i\\|)}, \\qquad
        v \\leftarrow \\frac{\\sum_i β_i x_i}{\\sum_i β_i},

    from the weighted mean, until ``||Δv|| <= tol · ||v||`` or ``max_iter``
    iterations. The iteration runs on the rows (and ``ν``) brought to unit size
    by a power of two, and each distance is computed with its difference scaled
    to unit size (:func:`scaled_norms`), so distances of finite factors neither
    overflow nor underflow; the minimiser scales back exactly. Flags nobody. Diagnostics:
    ``geometric_median/num_iters``, ``geometric_median/converged`` (False when
    the iterations ran out before the tolerance, or the iterate is not finite)
    and the final normalised ``β`` (``geometric_median/weights``, small for
    far-away clients).

    Args:
      nu: smoothing ``ν > 0`` (guards the division when ``v`` hits a client).
        Absolute, in the units of the factors, as in RFA: clients closer than
        ``ν`` to ``v`` get the same weight, so with factors whose distances are
        all below ``ν`` the rule returns the weighted mean.
      max_iter: iteration cap.
      tol: relative change at which to stop.
      screen: ``"exclude"``, ``"raise"`` or ``"off"``.

    References:
      K. Pillutla, S. M. Kakade, Z. Harchaoui, "Robust Aggregation for Federated
      Learning", IEEE Trans. Signal Process. 2022, arXiv:1912.13445.
    """
    nu = validation.check_positive_float(nu, "nu")
    tol = validation.check_positive_float(tol, "tol")
    max_iter = validation.check_positive_int(max_iter, "max_iter")

    def core(clients, global_, p, excluded, round_index, key) -> AggregateResult:
        del round_index, key
        raw, unflatten = flatten_clients(clients)
        exponent = working_exponent(jnp.where(excluded[:, None], 0, raw))
        rows = unit_rows(raw, excluded)
        tiny = jnp.finfo(rows.dtype).tiny
        nu_scaled = jnp.maximum(times_power_of_two(jnp.asarray(nu, rows.dtype), -exponent), tiny)
        alpha = p.astype(rows.dtype)

        def beta(v):
            dist = scaled_norms(rows - v[None, :])
            return alpha / jnp.maximum(dist, nu_scaled)

        def step(v):
            b = beta(v)
            return jnp.einsum("n,nd->d", b / jnp.sum(b), rows, precision=HIGHEST)

        def norm(x):  # at a safe scale: ||v|| can be far below 1 on the scaled rows
            return scaled_norms(x[None, :])[0]

        def cond(state):
            v, change, it = state
            return (it < max_iter) & (change > tol * norm(v))

        def body(state):
            v, _, it = state
            new = step(v)
            return new, norm(new - v), it + 1

        v0 = jnp.einsum("n,nd->d", alpha, rows, precision=HIGHEST)
        init = (v0, jnp.asarray(jnp.inf, rows.dtype), jnp.zeros((), jnp.int32))
        v, change, it = jax.lax.while_loop(cond, body, init)
        b = beta(v)
        converged = (change <= tol * norm(v)) & jnp.all(jnp.isfinite(v))
        extra = {
            "geometric_median/num_iters": it,
            "geometric_median/converged": converged,
            "geometric_median/weights": b / jnp.sum(b),
        }
        median = unflatten(times_power_of_two(v, exponent))
        return broadcast_result(clients, median, p, extra=extra)

    return make_aggregator("geometric_median", core, screen=screen)
