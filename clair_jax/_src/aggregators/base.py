"""The aggregation interface for federated LoRA and the factor algebra the rules share.

Every adapted module (one weight matrix) carries LoRA factors ``B`` (``p x r``)
and ``A`` (``r x q``) whose product ``B A`` is the weight update. Clients' factors
arrive stacked on a leading axis (``B`` ``(n, p, r)``, ``A`` ``(n, r, q)``), one
:class:`LoRAFactors` per module name. An :class:`Aggregator` is a name plus a pure,
jittable function

``aggregate(clients, global_, weights, round_index, key) -> AggregateResult``

returning the adapter each client starts the next round from, the server's
global adapter, the clients the rule flagged, and diagnostics. Factories build
them (optax style: configuration in the closure, data traced): the averaging
rules in :mod:`~clair_jax._src.aggregators.averaging`, the Byzantine-robust ones
in :mod:`~clair_jax._src.aggregators.robust` and CLAIR's in
:mod:`~clair_jax._src.aggregators.clair_rule`.

Conventions shared by all rules:

* ``weights`` ``(n,)`` are non-negative, not all zero, and normalised inside to
  ``p_i = w_i / Σ_j w_j``. The averaging rules (FedIT, FlexLoRA, FFA-LoRA,
  FedRot-LoRA, CLAIR's benign mean) use them; the Byzantine-robust rules follow
  their papers, which are unweighted (coordinate median, trimmed mean, Krum
  scores), except Multi-Krum's average of the selected clients and the geometric
  median, which use the weights (RFA's ``α_i``).
* ``diagnostics["aggregation_error/<module>"]`` is, for every rule,
  ``||Σ_i p_i B_i A_i - B_g A_g||_F``: the distance of the returned global
  adapter's update from the exact weighted average of the clients' updates.
* The orientation is PEFT's: ``B`` is ``lora_B`` (``out x r``) and ``A`` is
  ``lora_A`` (``r x in``), so ``p = out`` and ``q = in``. Flax NNX ``nnx.LoRA``
  (``y = x @ lora_a @ lora_b``) maps by transposes: ``A = lora_a.T``,
  ``B = lora_b.T``.
* The Byzantine-robust rules act on each client's flattened factors (all
  modules' ``B`` and ``A``, what the client sends), as in their papers. Like
  FedIT they see factors, not products, so they inherit the rotational
  ambiguity FedRot-LoRA removes; clients that start every round from the same
  broadcast adapter stay close in factor space, which is where they apply.
* Every rule screens the clients first
  (:mod:`~clair_jax._src.aggregators.screening`): a client with NaN or inf in
  its factors, or far larger than the others, is excluded (its factors replaced
  by the adapter it started from, its weight set to zero), flagged, and
  reported in ``diagnostics["screened/reason"]``; the rule runs on the others
  and the round goes on. ``screen="raise"`` raises instead, naming the client;
  ``screen="off"`` screens nobody. An excluded client starts the next round
  from the new global adapter. Weights are renormalised over the included
  clients (``diagnostics["screened/weights"]``).
* The returned global adapter is never non-finite: if the rule's would be (or
  no included client has a positive weight), the previous global adapter is
  kept, ``diagnostics["screened/refused"]`` is True and the largest included
  client is flagged with reason ``"non-finite result"``; a client whose own next
  adapter would be non-finite gets the global adapter, with the same reason.
* Products and squared norms are computed at a safe scale (factors brought to
  unit size by powers of two first), so finite factors do not overflow them.
* Half-precision factors (float16, bfloat16) are factorised (SVD/QR) in float32,
  and weights, averages, distances and medians are computed in float32 too
  (squared distances or weight sums above 65504 overflow float16); the results
  are returned in the factors' own dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool

from clair_jax._src import validation
from clair_jax._src.aggregators import alignment, screening
from clair_jax._src.linalg.scaling import times_power_of_two, working_exponent
from clair_jax._src.lora.types import Adapters, LoRAFactors, check_adapters

HIGHEST = jax.lax.Precision.HIGHEST


class AggregateResult(NamedTuple):
    """What an aggregation rule returns.

    Attributes:
      clients: ``(n, ...)`` adapters each client starts the next round from (the
        broadcast global adapter for FedIT-like rules; personalised for
        local-only and CLAIR).
      global_: the un-stacked global adapter (the server's model).
      flagged: ``(n,)`` bool, clients the rule flagged or excluded (all False
        for rules that flag nobody).
      diagnostics: scalar or ``(n,)`` arrays keyed ``"<quantity>/<module>"``
        or ``"<quantity>"``; every rule reports ``"aggregation_error/<module>"``.
    """

    clients: Adapters
    global_: Adapters
    flagged: Bool[Array, " n"]
    diagnostics: dict[str, Array]


class Aggregator(NamedTuple):
    """A named aggregation rule.

    Attributes:
      name: short name, e.g. ``"fedit"``.
      aggregate: ``(clients, global_, weights, round_index, key) -> AggregateResult``,
        pure and jittable (``round_index`` is a traced int32 scalar, ``key`` a
        ``jax.random`` key).
      frozen_factor: the factor clients must not train (``"A"`` for :func:`ffa_lora` by
        default), else None.
      uses_start: when True the round also passes ``start=`` (the adapters the
        clients started the round from, stacked like ``clients``), so that the
        rule can measure each client's round update ``B_i A_i - B_i^0 A_i^0``
        (:func:`clair_aggregator` with ``measure="update"``).
    """

    name: str
    aggregate: Callable[..., AggregateResult]
    frozen_factor: str | None = None
    uses_start: bool = False


def broadcast(global_: Adapters, n: int) -> Adapters:
    """Stacks ``n`` copies of the global adapter (what every client starts from)."""
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *x.shape)), global_)


def factorwise_mean(factors: LoRAFactors, p: Array) -> LoRAFactors:
    """FedIT: ``(Σ p_i B_i, Σ p_i A_i)``, summed in ``p``'s dtype, in the factors' dtype."""
    return LoRAFactors(
        B=jnp.einsum("n,npr->pr", p, factors.B, precision=HIGHEST).astype(factors.B.dtype),
        A=jnp.einsum("n,nrq->rq", p, factors.A, precision=HIGHEST).astype(factors.A.dtype),
    )


def selected_mean(factors: LoRAFactors, p: Array, selected: Array) -> LoRAFactors:
    """:func:`factorwise_mean` over the ``selected`` clients only (the others' factors,
    however large, never enter the sums: ``0 * inf`` would be NaN)."""
    keep = selected[:, None, None]
    return factorwise_mean(
        LoRAFactors(B=jnp.where(keep, factors.B, 0), A=jnp.where(keep, factors.A, 0)), p
    )


def errors(clients: Adapters, global_: Adapters, p: Array, key: str = "aggregation_error"):
    """``{key/<module>: ||Σ p_i B_i A_i - B_g A_g||_F}``, at a safe scale.

    The ``B``'s and the ``A``'s are brought to unit size by powers of two before
    the products are formed, and the norm scaled back (``inf`` only when the
    error itself is beyond the dtype's range).
    """
    out = {}
    for name, f in clients.items():
        g = global_[name]
        work = validation.working_dtype(f.B.dtype)
        e_b = working_exponent(jnp.concatenate([f.B.reshape(-1), g.B.reshape(-1)]).astype(work))
        e_a = working_exponent(jnp.concatenate([f.A.reshape(-1), g.A.reshape(-1)]).astype(work))
        b, a = (
            times_power_of_two(f.B.astype(work), -e_b),
            times_power_of_two(f.A.astype(work), -e_a),
        )
        b_g = times_power_of_two(g.B.astype(work), -e_b)
        a_g = times_power_of_two(g.A.astype(work), -e_a)
        out[f"{key}/{name}"] = times_power_of_two(
            alignment.product_error(a, b, p, a_g, b_g), e_a + e_b
        )
    return out


def num_clients(clients: Adapters) -> int:
    """Length of the client axis of stacked adapters (static)."""
    return next(iter(clients.values())).A.shape[0]


def broadcast_result(clients, new_global, p, flagged=None, extra=None) -> AggregateResult:
    """The result of a broadcast rule: every client starts from ``new_global``.

    Args:
      clients: stacked client adapters (for the aggregation errors).
      new_global: the new global adapter.
      p: ``(n,)`` normalised weights.
      flagged: ``(n,)`` bool, flagged clients (default: none).
      extra: diagnostics added to the aggregation errors.

    Returns:
      An :class:`AggregateResult`.
    """
    n = num_clients(clients)
    diagnostics = errors(clients, new_global, p)
    diagnostics.update(extra or {})
    if flagged is None:
        flagged = jnp.zeros((n,), bool)
    return AggregateResult(broadcast(new_global, n), new_global, flagged, diagnostics)


def truncated_factors(b_cat: Array, a_cat: Array, rank: int, dtype=None) -> LoRAFactors:
    """Best rank-``rank`` factors of ``b_cat @ a_cat`` (``p x k`` times ``k x q``).

    Returns ``B = U_r Σ_r^{1/2}``, ``A = Σ_r^{1/2} V_r^T`` from the truncated SVD of
    the product, computed through thin QR factorisations of both factors, so the
    ``p x q`` product is never formed: ``O((p + q) k^2 + k^3)``. Ranks beyond that
    of the product come out as zero columns/rows.

    Args:
      b_cat: ``(p, k)`` left factor.
      a_cat: ``(k, q)`` right factor.
      rank: the rank kept (static).
      dtype: dtype of the result (default: ``b_cat``'s); factorised in at least float32.

    Returns:
      :class:`LoRAFactors` ``(B (p, rank), A (rank, q))``.
    """
    dtype = b_cat.dtype if dtype is None else dtype
    work = validation.working_dtype(dtype)
    # Safe scale: both factors at unit size (exact powers of two), scaled back at the end.
    # An even total keeps the returned factors balanced (each scaled back by half of it).
    e_b, e_a = working_exponent(b_cat.astype(work)), working_exponent(a_cat.astype(work))
    e_b = e_b + (e_a + e_b) % 2
    q_b, r_b = jnp.linalg.qr(times_power_of_two(b_cat.astype(work), -e_b))  # (p, k1), (k1, k)
    q_a, r_a = jnp.linalg.qr(times_power_of_two(a_cat.T.astype(work), -e_a))  # (q, k2), (k2, k)
    u, s, vt = jnp.linalg.svd(jnp.matmul(r_b, r_a.T, precision=HIGHEST), full_matrices=False)
    u = jnp.matmul(q_b, u, precision=HIGHEST)
    v = jnp.matmul(q_a, vt.T, precision=HIGHEST)
    k = s.shape[0]
    if k < rank:  # the product has fewer than `rank` singular values: pad with zeros
        u = jnp.pad(u, ((0, 0), (0, rank - k)))
        v = jnp.pad(v, ((0, 0), (0, rank - k)))
        s = jnp.pad(s, (0, rank - k))
    root = jnp.sqrt(s[:rank])
    b, a = u[:, :rank] * root[None, :], (v[:, :rank] * root[None, :]).T
    half = (e_a + e_b) // 2
    b, a = times_power_of_two(b, half), times_power_of_two(a, half)
    return LoRAFactors(B=b.astype(dtype), A=a.astype(dtype))


def weighted_product_factors(factors: LoRAFactors, p: Array) -> LoRAFactors:
    """Best rank-``r`` factors of ``Σ_i p_i B_i A_i`` (FlexLoRA), in the factors' dtype.

    The stacked ``[p_1 B_1 .. p_n B_n]`` (``p x nr``) and ``[A_1; ..; A_n]``
    (``nr x q``) go to :func:`truncated_factors`; the product is never formed.
    """
    n, rows, r = factors.B.shape
    b_cat = jnp.transpose(factors.B * p[:, None, None], (1, 0, 2)).reshape(rows, n * r)
    a_cat = factors.A.reshape(n * r, factors.A.shape[2])
    return truncated_factors(b_cat, a_cat, r, factors.B.dtype)


def dense_factors(m: Array, rank: int) -> LoRAFactors:
    """Best rank-``rank`` factors ``(U_r Σ_r^{1/2}, Σ_r^{1/2} V_r^T)`` of a ``p x q`` matrix."""
    u, s, vt = jnp.linalg.svd(m.astype(validation.working_dtype(m.dtype)), full_matrices=False)
    k = s.shape[0]
    if k < rank:
        u = jnp.pad(u, ((0, 0), (0, rank - k)))
        vt = jnp.pad(vt, ((0, rank - k), (0, 0)))
        s = jnp.pad(s, (0, rank - k))
    root = jnp.sqrt(s[:rank])
    b, a = u[:, :rank] * root[None, :], root[:, None] * vt[:rank]
    return LoRAFactors(B=b.astype(m.dtype), A=a.astype(m.dtype))


def flatten_clients(clients: Adapters) -> tuple[Array, Callable[[Array], Adapters]]:
    """Clients' factors as rows ``(n, d)`` and a map from a ``(d,)`` row to an adapter.

    The rows are in the working dtype (at least float32, where the robust rules'
    squared distances do not overflow); ``unflatten`` returns each factor in its
    own dtype.

    Args:
      clients: stacked client adapters.

    Returns:
      ``(rows, unflatten)``: ``(n, d)`` rows and the map back to an unstacked adapter.
    """
    leaves, treedef = jax.tree.flatten(clients)
    n = leaves[0].shape[0]
    shapes = [leaf.shape[1:] for leaf in leaves]
    dtypes = [leaf.dtype for leaf in leaves]
    sizes = [int(np.prod(s)) for s in shapes]
    work = validation.working_dtype(jnp.result_type(*dtypes))
    rows = jnp.concatenate([leaf.reshape(n, -1).astype(work) for leaf in leaves], axis=1)

    def unflatten(v: Array) -> Adapters:
        parts, start = [], 0
        for shape, dtype, size in zip(shapes, dtypes, sizes, strict=True):
            parts.append(v[start : start + size].reshape(shape).astype(dtype))
            start += size
        return jax.tree.unflatten(treedef, parts)

    return rows, unflatten


def checked_start(start, global_: Adapters, weights) -> Adapters:
    """The adapters of the round start (``start=``), checked like the clients' and finite.

    Raises:
      ValueError: ``start`` is None, does not fit ``global_`` and ``weights``, or
        holds NaN/inf (the server's own state, not a client's vote).
    """
    if start is None:
        raise ValueError("this rule needs start= (the adapters of the round start).")
    try:  # start fits global_ and weights exactly when it fits like clients
        start, _, _ = check_adapters(start, global_, weights)
    except ValueError as err:
        raise ValueError(f"start (the adapters of the round start): {err}") from None
    return start


def _finite(tree) -> Array:
    """Whether every leaf of ``tree`` is finite (a scalar bool)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves))


def _finite_rows(clients: Adapters) -> Array:
    """``(n,)`` whether each client's factors are all finite."""
    rows = [
        jnp.all(jnp.isfinite(x.reshape(x.shape[0], -1)), axis=1) for x in jax.tree.leaves(clients)
    ]
    return jnp.all(jnp.stack(rows), axis=0)


def make_aggregator(
    name: str,
    core: Callable[..., AggregateResult],
    *,
    screen: str = "exclude",
    frozen_factor: str | None = None,
    uses_start: bool = False,
) -> Aggregator:
    """An :class:`Aggregator` from a rule's core, with screening and the commit guard.

    ``aggregate(clients, global_, weights, round_index, key, start=None)``:

    1. checks the shapes (:func:`~clair_jax._src.lora.types.check_adapters`; NaN
       in ``global_`` or ``start`` raises, NaN in a client does not);
    2. screens the clients (:func:`~clair_jax._src.aggregators.screening.screen_clients`;
       ``screen="raise"`` raises naming the first excluded client, ``"off"``
       excludes nobody);
    3. replaces the excluded clients' factors by the adapter they started from
       (``start`` when the rule uses it, else ``global_``), zeroes their weights
       and renormalises the others', and runs
       ``core(clients, global_, p, excluded, round_index, key[, start=])``;
    4. keeps the previous global adapter when the core's is non-finite or no
       included client has a positive weight (``screened/refused``), and gives
       the global adapter to every excluded client and to every client whose
       own result is non-finite.

    Diagnostics added: ``screened/reason``, ``screened/module``,
    ``screened/factor`` (see :class:`~clair_jax._src.aggregators.screening.Screening`),
    ``screened/log_factor_norm``, ``screened/log_product_norm``,
    ``screened/weights`` (the ``p`` the core used) and ``screened/refused``.

    Args:
      name: the rule's name.
      core: the rule on checked, screened clients.
      screen: ``"exclude"`` (default), ``"raise"`` or ``"off"``.
      frozen_factor: as :class:`Aggregator`.
      uses_start: as :class:`Aggregator`.

    Returns:
      An :class:`Aggregator`.

    Raises:
      ValueError: an unknown ``screen``.
    """
    mode = screening.check_screen(screen)

    def aggregate(clients, global_, weights, round_index, key, start=None) -> AggregateResult:
        clients, global_, p = check_adapters(clients, global_, weights, finite=False)
        n = num_clients(clients)
        if uses_start:
            start = checked_start(start, global_, weights)
        found = screening.screen_clients(clients)
        if mode == "raise":
            p = screening.raise_if_excluded(found, list(clients), p)
        excluded = found.excluded if mode != "off" else jnp.zeros((n,), bool)
        keep = ~excluded
        origin = start if uses_start else broadcast(global_, n)
        clean = {
            k: LoRAFactors(
                B=jnp.where(keep[:, None, None], f.B, origin[k].B),
                A=jnp.where(keep[:, None, None], f.A, origin[k].A),
            )
            for k, f in clients.items()
        }
        w = jnp.where(keep, p, 0)
        total = jnp.sum(w)
        live = total > 0
        p_eff = jnp.where(live, w / jnp.where(live, total, 1), 0)
        extra = {"start": start} if uses_start else {}
        res = core(clean, global_, p_eff, excluded, round_index, key, **extra)
        new_global = {k: LoRAFactors(*map(jnp.asarray, g)) for k, g in res.global_.items()}
        committed = live & _finite(new_global)
        new_global = jax.tree.map(lambda a, b: jnp.where(committed, a, b), new_global, global_)
        result_clients = {k: LoRAFactors(*map(jnp.asarray, f)) for k, f in res.clients.items()}
        bad_result = keep & ~_finite_rows(result_clients)
        take = (keep & ~bad_result)[:, None, None]
        next_clients = {
            k: LoRAFactors(
                B=jnp.where(take, f.B, new_global[k].B[None]),
                A=jnp.where(take, f.A, new_global[k].A[None]),
            )
            for k, f in result_clients.items()
        }
        # A refused global with clients left: name the non-finite or largest included one.
        size = jnp.fmax(found.log_factor_norm, found.log_product_norm)
        size = jnp.where(found.reason == screening.NON_FINITE, jnp.inf, size)
        size = jnp.where(keep, jnp.nan_to_num(size, nan=-jnp.inf), -jnp.inf)
        blame = (jnp.arange(n) == jnp.argmax(size)) & keep & live & ~committed
        result_reason = jnp.where(bad_result | blame, screening.NON_FINITE_RESULT, screening.OK)
        reason = jnp.where(excluded, found.reason, result_reason).astype(jnp.int32)
        diagnostics = dict(res.diagnostics)
        diagnostics.update(
            {
                "screened/reason": reason,
                "screened/module": jnp.where(excluded, found.module, -1),
                "screened/factor": jnp.where(excluded, found.factor, -1),
                "screened/log_factor_norm": found.log_factor_norm,
                "screened/log_product_norm": found.log_product_norm,
                "screened/weights": p_eff,
                "screened/refused": ~committed,
            }
        )
        flagged = jnp.asarray(res.flagged, bool) | (reason > 0)
        return AggregateResult(next_clients, new_global, flagged, diagnostics)

    return Aggregator(name, aggregate, frozen_factor=frozen_factor, uses_start=uses_start)
