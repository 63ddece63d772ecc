"""The aggregation interface for federated LoRA and the screened constructor of the rules.

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
:mod:`~clair_jax._src.aggregators.clair_rule`; the factor algebra they share
(weighted means, best rank-``r`` factors, the aggregation error) is in
:mod:`~clair_jax._src.aggregators.factor_algebra`, and :func:`make_aggregator`
wraps a rule's core with the screening and the commit guard below.

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
from jaxtyping import Array, Bool

from clair_jax._src import validation
from clair_jax._src.aggregators import screening
from clair_jax._src.aggregators.factor_algebra import errors
from clair_jax._src.lora.types import Adapters, LoRAFactors, check_adapters


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
       ``core(clients, global_, p, excluded, round_index, key[, start=])``, jitted
       (one compilation per structure, shapes and dtypes of the arguments);
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
    # The core jitted: called as it is (README, PEFT files), every call would otherwise
    # compile the rule's control flow (conds and maps over fresh closures) again. The
    # checks above it stay eager, so that bad arguments raise ValueError at once.
    jitted_core = jax.jit(core)

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
        res = jitted_core(clean, global_, p_eff, excluded, round_index, key, **extra)
        new_global = {k: LoRAFactors(*map(jnp.asarray, g)) for k, g in res.global_.items()}
        committed = live & validation.all_finite(new_global)
        new_global = jax.tree.map(lambda a, b: jnp.where(committed, a, b), new_global, global_)
        result_clients = {k: LoRAFactors(*map(jnp.asarray, f)) for k, f in res.clients.items()}
        bad_result = keep & ~validation.finite_rows(result_clients)
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
