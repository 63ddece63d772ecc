"""The CLAIR aggregation rule: CLAIR per module on the clients' updates, refined per client."""

from __future__ import annotations

from functools import partial

import jax.numpy as jnp

from clair_jax._src import validation
from clair_jax._src.aggregators.base import (
    AggregateResult,
    Aggregator,
    make_aggregator,
    num_clients,
)
from clair_jax._src.aggregators.clair_common import (
    check_rule_options,
    map_modules,
    module_diagnostics,
    module_mesh,
    pooled_detection,
    refine_width,
    rule_defaults,
)
from clair_jax._src.aggregators.factor_algebra import (
    HIGHEST,
    dense_factors,
    errors,
    weighted_product_factors,
)
from clair_jax._src.aggregators.factored import clair_aggregator_factored
from clair_jax._src.clair.pipeline import clair
from clair_jax._src.clair.refinement import refine
from clair_jax._src.linalg import batching
from clair_jax._src.linalg.scaling import times_power_of_two, working_exponent
from clair_jax._src.lora.types import Adapters, LoRAFactors


def clair_aggregator(
    *,
    shared_space: str = "column",
    measure: str = "adapter",
    detection: str = "module",
    flagged: str = "trained",
    refine_rank: int | str | None = "lora",
    benign_majority: bool = True,
    screen: str = "exclude",
    server_math: str = "factored",
    devices=None,
    **clair_kwargs,
) -> Aggregator:
    """CLAIR per module on the clients' updates ``X_i = B_i A_i``, refined per client.

    For every module, :func:`clair_jax.clair` runs on the stacked matrices
    ``X_i`` (``(n, p, q)``; with ``shared_space="row"`` on their transposes, so
    that the shared subspace is a row space):

    * ``measure="adapter"``: ``X_i = B_i A_i``, the whole adapter a client sends;
    * ``measure="update"``: ``X_i = B_i A_i - B_i^0 A_i^0``, the client's update
      in this round from the adapter ``(B_i^0, A_i^0)`` it started from (the
      round passes ``start=``), so that clients starting from personalised
      adapters are compared on what they learnt this round.

    Detection uses CLAIR's own subspace ``Û`` (its rank rule); the refinement
    keeps at most ``refine_rank`` of its leading directions, by default the LoRA
    rank ``r``: a shared LoRA subspace is spanned by the clients' ``B`` factors
    (rows: the ``A``'s), so it has at most ``r`` dimensions.

    Which clients are collaborative (``Ĉ``):

    * ``detection="module"``: a client is flagged when CLAIR does not find it
      collaborative in at least one module; each module refines on its own set.
    * ``detection="client"``: the evidence is pooled over the ``K`` modules.
      With ``d_ik`` the CLAIR score of client ``i`` in module ``k`` and ``m_k``
      their median over clients, the client score

      .. math::

          z_i = \\operatorname{median}_k \\, d_{ik} / m_k

      (about 1 for a benign client) is thresholded by CLAIR's robust rule, and
      the same ``Ĉ`` is used in every module.

    Each collaborative client's refined update
    ``X̃_i = X̄_Ĉ + P_Û (X_i - X̄_Ĉ)`` (plus ``B_i^0 A_i^0`` for ``"update"``)
    is re-factorised to rank ``r`` by truncated SVD and sent back to that client.
    A flagged client is left out of the consensus and keeps the adapter it
    trained this round (``flagged="trained"``) or gets the global adapter
    (``"global"``). The global adapter is the rank-``r`` factorisation of the
    weighted mean ``Σ_{i∈Ĉ} p_i B_i A_i / Σ_{i∈Ĉ} p_i`` (all clients when ``Ĉ``
    is empty).

    Screening (``screen=``, see
    :func:`~clair_jax._src.aggregators.base.make_aggregator`) runs first: an
    excluded client enters CLAIR as the adapter it started from (a zero update
    for ``measure="update"``), is left out of every consensus and of the global
    mean, is flagged, and starts the next round from the global adapter. The
    products ``B_i A_i`` are formed at a safe scale: when they could overflow
    the dtype, every factor of the module is first scaled by a power of two and
    the results scaled back (CLAIR's own statistics are scale-relative).

    Diagnostics, per module: ``"flagged/<module>"`` (CLAIR's own set),
    ``"scores/<module>"``, ``"threshold/<module>"``, ``"rank/<module>"``
    (CLAIR's rank), ``"refine_rank/<module>"`` (directions kept),
    ``"majority_refit/<module>"``, ``"converged/<module>"`` and
    ``"num_iters/<module>"`` (of CLAIR's final decomposition); with
    ``detection="client"`` also ``"client_scores"`` and ``"client_threshold"``.

    Args:
      shared_space: ``"column"`` (subspace of ``R^p``, spanned by the ``B``
        factors) or ``"row"`` (of ``R^q``, spanned by the rows of ``A``).
      measure: ``"adapter"`` or ``"update"`` (see above).
      detection: ``"module"`` or ``"client"`` (see above).
      flagged: what a flagged client holds next, ``"trained"`` or ``"global"``;
        ``"trained"`` keeps a contaminated client distinguishable in later rounds
        (that adapter passed screening: finite, and within the screening's
        ratio of the median size); a screened-out client gets the global one.
      refine_rank: directions of ``Û`` the refinement keeps at most: ``"lora"``
        (the LoRA rank ``r``), an int, or ``None`` (all of ``Û``).
      benign_majority: passed to :func:`clair_jax.clair`; True here (the
        Byzantine threat model: fewer than half of the clients contaminated).
      screen: ``"exclude"``, ``"raise"`` or ``"off"``.
      server_math: ``"factored"`` (default) runs CLAIR on the exact small
        coordinates of the updates (:func:`clair_jax.clair_aggregator_factored`):
        no ``p x q`` product is formed and the statistics follow the coordinates'
        dimensions, which keeps detection working when ``n r < min(p, q)``;
        ``"dense"`` forms the products and runs :func:`clair_jax.clair` on them.
        Both give the same flags and refined updates when ``n r >= p`` and
        ``r >= q`` (``n r >= q`` with ``offset=True``), or with given
        ``lam_nuc``, ``lam_block``, ``noise_scale`` and ``rank``.
      devices: ``None`` (the modules are solved one after another) or a sequence
        of devices (e.g. ``jax.devices()``) over which each shape's modules are
        split, every device solving its share (``jax.shard_map``; the same flags,
        and the same adapters to the last bit when the rule is jitted alone; inputs
        must not be committed to one device). On CPU, where each module's
        factorisations run on one core, give JAX one device per core before its
        first use, ``jax.config.update("jax_num_cpu_devices", os.cpu_count())``.
        Not inside a program sharded over another mesh
        (:func:`clair_jax.make_sharded_round`).
      **clair_kwargs: passed to :func:`clair_jax.clair` (``rank``, ``max_rank``,
        ``lam_nuc``, ``lam_block``, ``threshold``, ``offset``, ``consensus``
        (``"robust"`` by default, ``"mean"`` for the plain rule), ``tol`` (``1e-5``
        by default, ``clair_common.ROUND_TOL``: with the default refit the outputs need
        only the decomposition's rank and flags), ``method``, ...).

    Returns:
      An :class:`Aggregator` named ``"clair"`` (``uses_start`` for ``"update"``).

    Raises:
      TypeError: ``devices`` not None or a sequence.
      ValueError: an unknown ``shared_space``, ``measure``, ``detection`` or
        ``flagged``; a bad ``refine_rank``; bad ``devices``; ``contaminated`` among
        ``clair_kwargs``; at aggregation, ``measure="update"`` without ``start``
        or with a ``start`` unlike ``clients``, fewer than 2 clients.

    References:
      CLAIR, arXiv:2605.21217.
    """
    validation.check_choice(server_math, "server_math", ("factored", "dense"))
    if server_math == "factored":
        return clair_aggregator_factored(
            shared_space=shared_space,
            measure=measure,
            detection=detection,
            flagged=flagged,
            refine_rank=refine_rank,
            benign_majority=benign_majority,
            screen=screen,
            devices=devices,
            **clair_kwargs,
        )
    check_rule_options(shared_space, measure, detection, flagged, refine_rank, clair_kwargs)
    mesh = module_mesh(devices)
    clair_kwargs = rule_defaults(clair_kwargs)
    keep_trained = flagged == "trained"
    row = shared_space == "row"

    def core(clients, global_, p, excluded, round_index, key, start=None) -> AggregateResult:
        del round_index, key
        n = num_clients(clients)
        if n < 2:
            raise ValueError(
                f"clair_aggregator needs clients from at least 2 clients (CLAIR tells them "
                f"apart by comparing them), got factors with a client axis of {n}."
            )
        inputs, exponents = _module_inputs(clients, start if measure == "update" else None, row)
        # Screened-out clients are CLAIR's step-0 exclusions (zero blocks, out of every
        # statistic): their replacement factors would otherwise form a group of identical
        # updates that the robust consensus reads as a coordinated one.
        results = map_modules(
            partial(clair, benign_majority=benign_majority, exclude=excluded, **clair_kwargs),
            {name: jnp.where(excluded[:, None, None], 0.0, x) for name, (x, _) in inputs.items()},
            mesh,
        )
        diagnostics, widths = {}, {}
        outliers = jnp.zeros((n,), bool)
        for name, f in clients.items():
            res = results[name]
            widths[name] = refine_width(refine_rank, f.A.shape[1], res.basis.shape[1])
            outliers = outliers | ~res.collaborative
            diagnostics.update(module_diagnostics(name, res, res.decomposition, widths[name]))
        if detection == "client":
            scores = jnp.stack([res.scores for res in results.values()])
            outliers, client_scores, client_threshold = pooled_detection(scores)
            diagnostics["client_scores"] = client_scores
            diagnostics["client_threshold"] = client_threshold
        collaborative = ~outliers
        new_clients, new_global = {}, {}
        for name, f in clients.items():
            x, origin = inputs[name]
            res = results[name]
            members = collaborative if detection == "client" else res.collaborative
            members = members & ~excluded  # screened-out clients join no consensus
            basis = res.basis[:, : widths[name]]
            new_clients[name], new_global[name] = _refined_module(
                f, x, origin, basis, members, p, row, exponents[name]
            )
        # Flagged clients are left out of the consensus: they keep the adapter they
        # trained this round (flagged="trained") or get the global one ("global").
        if keep_trained:
            fallback = clients
        else:
            fallback = {name: LoRAFactors(g.B[None], g.A[None]) for name, g in new_global.items()}
        keep = collaborative[:, None, None]
        new_clients = {
            name: LoRAFactors(
                B=jnp.where(keep, f.B, fallback[name].B),
                A=jnp.where(keep, f.A, fallback[name].A),
            )
            for name, f in new_clients.items()
        }
        diagnostics.update(errors(clients, new_global, p))
        return AggregateResult(new_clients, new_global, outliers, diagnostics)

    return make_aggregator("clair", core, screen=screen, uses_start=measure == "update")


def _module_inputs(clients: Adapters, start: Adapters | None, row: bool) -> tuple[dict, dict]:
    """Per module ``(X, origin)``, CLAIR's input and what the refined updates are added
    to, and the exponent ``e`` they are scaled by.

    ``X_i = (B_i A_i - origin_i) 2^-e`` (transposed when ``row``), ``origin_i``
    the product of the round start's factors (zero when ``start`` is None),
    times ``2^-e``. ``e = 0`` unless the products could overflow the dtype
    (``r max|B| max|A|`` beyond a quarter of its largest value); then the
    factors are brought to unit size by powers of two before the products
    (``e`` even, so that the refined factors scale back balanced).
    """
    inputs, exponents = {}, {}
    for name, f in clients.items():
        factors = [f] if start is None else [f, start[name]]
        e_b = working_exponent(jnp.stack([jnp.max(jnp.abs(g.B)) for g in factors]))
        e_a = working_exponent(jnp.stack([jnp.max(jnp.abs(g.A)) for g in factors]))
        limit = jnp.finfo(f.B.dtype).max / (4 * f.B.shape[2])
        safe = jnp.ldexp(jnp.ones((), f.B.dtype), e_b + e_a) < limit
        e_b, e_a = jnp.where(safe, 0, e_b + (e_a + e_b) % 2), jnp.where(safe, 0, e_a)

        def product(g, e_b=e_b, e_a=e_a):
            b, a = times_power_of_two(g.B, -e_b), times_power_of_two(g.A, -e_a)
            return jnp.einsum("npr,nrq->npq", b, a, precision=HIGHEST)

        x = product(f)
        origin = jnp.zeros_like(x)
        if start is not None:
            origin = product(start[name])
        x = x - origin
        inputs[name] = (jnp.swapaxes(x, 1, 2) if row else x), origin
        exponents[name] = e_b + e_a
    return inputs, exponents


def _refined_module(f: LoRAFactors, x, origin, basis, members, p, row: bool, exponent=0):
    """A module's refined client factors and its global factors.

    Args:
      f: the clients' stacked factors.
      x: ``(n, p, q)`` CLAIR's input (transposed when ``row``).
      origin: ``(n, p, q)`` what the refined updates are added to.
      basis: the basis directions the refinement keeps.
      members: ``(n,)`` bool, the collaborative set.
      p: ``(n,)`` normalised client weights.
      row: whether ``x`` is transposed.
      exponent: ``x`` and ``origin`` are the products times ``2^-exponent``.

    Returns:
      ``(clients, global_)``: rank-``r`` factors of ``origin + X̃_i`` per client,
      and of the members' weighted mean product.
    """
    r = f.A.shape[1]
    _, refined = refine(x, basis, members)
    refined = jnp.swapaxes(refined, 1, 2) if row else refined
    half = exponent // 2  # exponent is even
    scaled = batching.map_matrices(partial(dense_factors, rank=r), origin + refined)
    clients = LoRAFactors(
        B=times_power_of_two(scaled.B, half).astype(f.B.dtype),
        A=times_power_of_two(scaled.A, half).astype(f.A.dtype),
    )
    w = jnp.where(members, p, 0.0)
    # Collaborative clients all of weight zero: average them equally; none
    # collaborative: every client, with its weight.
    equal = members.astype(p.dtype)
    w = jnp.where(jnp.sum(w) > 0, w, jnp.where(jnp.sum(equal) > 0, equal, p))
    return clients, weighted_product_factors(f, w / jnp.sum(w))
