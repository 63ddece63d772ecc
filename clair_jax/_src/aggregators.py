"""Server aggregation rules for federated LoRA, behind one interface.

Every adapted module (one weight matrix) carries LoRA factors ``B`` (``p x r``)
and ``A`` (``r x q``) whose product ``B A`` is the weight update. Clients' factors
arrive stacked on a leading axis (``B`` ``(n, p, r)``, ``A`` ``(n, r, q)``), one
:class:`LoRAFactors` per module name. An :class:`Aggregator` is a name plus a pure,
jittable function

``aggregate(clients, global_, weights, round_index, key) -> AggregateResult``

returning the adapter each client starts the next round from, the server's
global adapter, the clients the rule flagged, and diagnostics. The factories in
this module build them (optax style: configuration in the closure, data traced).

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
* With Flax NNX ``nnx.LoRA`` (``y = x @ lora_a @ lora_b``) take ``B = lora_a``
  (``in x r``) and ``A = lora_b`` (``r x out``), so ``p = in`` and ``q = out``.
* The Byzantine-robust rules act on each client's flattened factors (all
  modules' ``B`` and ``A``, what the client sends), as in their papers. Like
  FedIT they see factors, not products, so they inherit the rotational
  ambiguity FedRot-LoRA removes; clients that start every round from the same
  broadcast adapter stay close in factor space, which is where they apply.
* Factors with NaN or inf are rejected (``ValueError``; inside ``jit`` a runtime
  error), for every rule: a non-finite update is a bug to surface, not a vote.
* Half-precision factors (float16, bfloat16) are factorised (SVD/QR) in float32,
  and weights, averages, distances and medians are computed in float32 too
  (squared distances or weight sums above 65504 overflow float16); the results
  are returned in the factors' own dtype.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool

from clair_jax._src import batching, validation
from clair_jax._src import fedrot as fedrot_lib

_HIGHEST = jax.lax.Precision.HIGHEST


class LoRAFactors(NamedTuple):
    """One adapted module's LoRA factors; the weight update is ``B @ A`` (``p x q``).

    Attributes:
      B: ``(n, p, r)`` stacked over clients, or ``(p, r)`` for the global adapter.
      A: ``(n, r, q)`` stacked over clients, or ``(r, q)`` for the global adapter.
    """

    B: Array
    A: Array


Adapters = dict[str, LoRAFactors]
"""Module name -> :class:`LoRAFactors`."""


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


# --- shared helpers ------------------------------------------------------------------------


def check_adapters(
    clients: Mapping[str, LoRAFactors], global_: Mapping[str, LoRAFactors], weights
) -> tuple[Adapters, Adapters, Array]:
    """Checks stacked client adapters against the global one; returns them and ``p``.

    Raises:
      ValueError: different module names, shapes that do not fit together, bad
        weights, or NaN/inf in a factor (traced factors: a runtime error with the
        same message); the message names the module and the shapes.
      TypeError: non-mappings or non-numeric factors.
    """
    if not isinstance(clients, Mapping) or not isinstance(global_, Mapping):
        raise TypeError(
            "clients and global_ must be dicts {module name: LoRAFactors(B, A)}, got "
            f"{type(clients).__name__} and {type(global_).__name__}."
        )
    if not clients:
        raise ValueError("clients must hold at least one module.")
    if set(clients) != set(global_):
        raise ValueError(
            f"clients and global_ must have the same modules, got {sorted(clients)} and "
            f"{sorted(global_)}."
        )
    out_c, out_g = {}, {}
    n = None
    for name in clients:
        try:
            b, a = _factors(clients[name], f"clients[{name!r}]")
            b_g, a_g = _factors(global_[name], f"global_[{name!r}]")
            a, b, a_g, b_g = fedrot_lib.check_factors(a, b, a_g, b_g, None, " of global_")
        except ValueError as err:
            raise ValueError(f"module {name!r}: {err}") from None
        if n is None:
            n = a.shape[0]
        elif a.shape[0] != n:
            raise ValueError(
                f"module {name!r} has {a.shape[0]} clients (A {tuple(a.shape)}), other modules {n}."
            )
        out_c[name] = LoRAFactors(B=b, A=a)
        out_g[name] = LoRAFactors(B=b_g, A=a_g)
    dtype = jnp.result_type(*[f.A.dtype for f in out_c.values()])
    p = fedrot_lib.check_weights(weights, n, dtype)
    return out_c, out_g, p


def _factors(f, where: str) -> tuple:
    if isinstance(f, Mapping) and set(f) == {"A", "B"}:
        return f["B"], f["A"]
    if isinstance(f, tuple) and len(f) == 2:
        return f[0], f[1]
    raise TypeError(f"{where} must be LoRAFactors(B, A), got {type(f).__name__}.")


def broadcast(global_: Adapters, n: int) -> Adapters:
    """Stacks ``n`` copies of the global adapter (what every client starts from)."""
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *x.shape)), global_)


def factorwise_mean(factors: LoRAFactors, p: Array) -> LoRAFactors:
    """FedIT: ``(Σ p_i B_i, Σ p_i A_i)``, summed in ``p``'s dtype, in the factors' dtype."""
    return LoRAFactors(
        B=jnp.einsum("n,npr->pr", p, factors.B, precision=_HIGHEST).astype(factors.B.dtype),
        A=jnp.einsum("n,nrq->rq", p, factors.A, precision=_HIGHEST).astype(factors.A.dtype),
    )


def _selected_mean(factors: LoRAFactors, p: Array, selected: Array) -> LoRAFactors:
    """:func:`factorwise_mean` over the ``selected`` clients only (the others' factors,
    however large, never enter the sums: ``0 * inf`` would be NaN)."""
    keep = selected[:, None, None]
    return factorwise_mean(
        LoRAFactors(B=jnp.where(keep, factors.B, 0), A=jnp.where(keep, factors.A, 0)), p
    )


def errors(clients: Adapters, global_: Adapters, p: Array, key: str = "aggregation_error"):
    """``{key/<module>: ||Σ p_i B_i A_i - B_g A_g||_F}``."""
    return {
        f"{key}/{name}": fedrot_lib.product_error(f.A, f.B, p, global_[name].A, global_[name].B)
        for name, f in clients.items()
    }


def _n_clients(clients: Adapters) -> int:
    return next(iter(clients.values())).A.shape[0]


def _broadcast_result(clients, new_global, p, flagged=None, extra=None) -> AggregateResult:
    n = _n_clients(clients)
    diagnostics = errors(clients, new_global, p)
    diagnostics.update(extra or {})
    if flagged is None:
        flagged = jnp.zeros((n,), bool)
    return AggregateResult(broadcast(new_global, n), new_global, flagged, diagnostics)


# --- non-robust rules ----------------------------------------------------------------------


def local_only() -> Aggregator:
    """No aggregation: every client keeps its own adapter.

    The global adapter is returned unchanged (there is no server model to
    update); ``aggregation_error`` then measures how far it is from the clients'
    average update.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import clair_jax as cj
      >>> clients = {"w": cj.LoRAFactors(B=jnp.ones((3, 4, 2)), A=jnp.ones((3, 2, 5)))}
      >>> global_ = {"w": cj.LoRAFactors(B=jnp.zeros((4, 2)), A=jnp.zeros((2, 5)))}
      >>> res = cj.local_only().aggregate(
      ...     clients, global_, jnp.ones(3), jnp.int32(0), jax.random.key(0))
      >>> bool(jnp.all(res.clients["w"].B == 1)), bool(jnp.all(res.global_["w"].B == 0))
      (True, True)
    """

    def aggregate(clients, global_, weights, round_index, key) -> AggregateResult:
        del round_index, key
        clients, global_, p = check_adapters(clients, global_, weights)
        n = _n_clients(clients)
        return AggregateResult(clients, global_, jnp.zeros((n,), bool), errors(clients, global_, p))

    return Aggregator("local_only", aggregate)


def fedit() -> Aggregator:
    """FedIT: average ``A`` and ``B`` separately, ``(Σ p_i B_i, Σ p_i A_i)``.

    The average of products is not the product of averages: the difference is
    the aggregation error reported in the diagnostics.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import clair_jax as cj
      >>> B = jnp.array([[[1.0]], [[-1.0]]])
      >>> clients = {"w": cj.LoRAFactors(B=B, A=B)}  # both updates are +1
      >>> global_ = {"w": cj.LoRAFactors(B=jnp.zeros((1, 1)), A=jnp.zeros((1, 1)))}
      >>> res = cj.fedit().aggregate(
      ...     clients, global_, jnp.ones(2), jnp.int32(1), jax.random.key(0))
      >>> res.global_["w"].B, res.diagnostics["aggregation_error/w"]
      (Array([[0.]], dtype=float32), Array(1., dtype=float32))

    References:
      J. Zhang et al., "Towards Building the Federated GPT: Federated Instruction
      Tuning", arXiv:2305.05644.
    """

    def aggregate(clients, global_, weights, round_index, key) -> AggregateResult:
        del round_index, key
        clients, global_, p = check_adapters(clients, global_, weights)
        new_global = {name: factorwise_mean(f, p) for name, f in clients.items()}
        return _broadcast_result(clients, new_global, p)

    return Aggregator("fedit", aggregate)


def fedrot(
    strength: float = 1.5,
    *,
    alternate: bool = True,
    factor: str = "A",
    skip_first_round: bool = True,
    allow_reflection: bool | None = None,
) -> Aggregator:
    """FedRot-LoRA: align clients' factors to the broadcast global ones, then FedIT.

    In round ``t`` every client's factors are rotated by :func:`fedrot_align`
    toward the global factors broadcast at the start of the round (``global_``),
    then averaged factor-wise. With ``alternate`` (the authors' schedule) the
    aligned factor is ``A`` on odd rounds and ``B`` on even rounds; otherwise it
    is always ``factor``. With ``skip_first_round`` round 0 is not aligned (the
    initial global adapter has a zero factor and carries no basis to align to).
    Each client's product ``B_i A_i`` is unchanged by the rotation.

    The defaults are the authors' (official ``client.py`` with their
    ``initialshare: 'A'`` configuration, ``rotate_lambda = 1.5``): hard
    Procrustes over ``O(r)``, ``A`` on odd rounds (``state % 2 != 0``), ``B`` on
    even ones, none in round 0, the reference being the global adapter the
    clients received. There the alignment runs on each client before upload;
    here on the server before averaging, with the same result. ``strength``
    maps onto ``rotate_lambda`` one to one (see :func:`fedrot_align`): ``> 1``
    hard over ``O(r)``, ``1`` hard over ``SO(r)``, ``< 1`` soft; before the
    port was checked against the official code the default was ``1.0`` over
    ``SO(r)``, the worst point of the paper's λ-sensitivity figure.

    Diagnostics, per module: ``aggregation_error/<m>`` after alignment and
    ``aggregation_error_unaligned/<m>`` of plain FedIT on the same clients;
    ``fedrot/aligned_factor`` is 0 (none), 1 (``A``) or 2 (``B``).

    Args:
      strength: alignment strength ``λ >= 0``, the official ``rotate_lambda``
        (0: FedIT; ``< 1`` soft; 1: Procrustes over ``SO(r)``; ``> 1``: over
        ``O(r)``, the authors' default 1.5). The paper's λ-sensitivity figure
        has RTE best near 0.4, SST-2 at 0.6, QNLI at 0–0.2, and ``λ = 1``
        worst on all three.
      alternate: alternate the aligned factor by round.
      factor: ``"A"`` or ``"B"``, the aligned factor when not alternating.
      skip_first_round: leave round 0 unaligned.
      allow_reflection: ``None`` (official: ``O(r)`` iff ``λ > 1``), or
        ``True``/``False`` for ``O(r)``/``SO(r)`` at every ``λ``; see
        :func:`fedrot_align`.

    Returns:
      An :class:`Aggregator` named ``"fedrot"``.

    References:
      FedRot-LoRA: Mitigating Rotational Misalignment in Federated LoRA,
      arXiv:2602.23638.
    """
    validation.check_choice(factor, "factor", fedrot_lib.FACTORS)
    allow_reflection = fedrot_lib.check_reflection(allow_reflection)
    fedrot_lib.check_strength(strength, jnp.float32)
    lam_value = float(strength)  # kept in full precision, cast per module

    def aggregate(clients, global_, weights, round_index, key) -> AggregateResult:
        del key
        clients, global_, p = check_adapters(clients, global_, weights)
        round_index = jnp.asarray(round_index, jnp.int32)
        if alternate:
            choice = jnp.where(round_index % 2 == 1, 1, 2)
        else:
            choice = jnp.int32(1 if factor == "A" else 2)
        if skip_first_round:
            choice = jnp.where(round_index == 0, 0, choice)
        aligned = {}
        for name, f in clients.items():
            ref = global_[name]
            lam = jnp.asarray(lam_value, f.A.dtype)
            r = f.A.shape[1]
            eye = jnp.broadcast_to(jnp.eye(r, dtype=f.A.dtype), (f.A.shape[0], r, r))
            rot = eye
            if alternate or factor == "A":
                rot_a = fedrot_lib.alignment_rotations(
                    f.A, f.B, ref.A, ref.B, lam, "A", allow_reflection
                )
                rot = jnp.where(choice == 1, rot_a, rot)
            if alternate or factor == "B":
                rot_b = fedrot_lib.alignment_rotations(
                    f.A, f.B, ref.A, ref.B, lam, "B", allow_reflection
                )
                rot = jnp.where(choice == 2, rot_b, rot)
            aligned[name] = LoRAFactors(
                B=jnp.einsum("nps,nsr->npr", f.B, rot, precision=_HIGHEST),
                A=jnp.einsum("nsr,nsq->nrq", rot, f.A, precision=_HIGHEST),
            )
        new_global = {name: factorwise_mean(f, p) for name, f in aligned.items()}
        unaligned = {name: factorwise_mean(f, p) for name, f in clients.items()}
        extra = errors(clients, unaligned, p, "aggregation_error_unaligned")
        extra["fedrot/aligned_factor"] = choice.astype(jnp.int32)
        # Errors of the global adapter against the clients' (unchanged) products.
        return _broadcast_result(aligned, new_global, p, extra=extra)

    return Aggregator("fedrot", aggregate)


def truncated_factors(b_cat: Array, a_cat: Array, rank: int, dtype=None) -> LoRAFactors:
    """Best rank-``rank`` factors of ``b_cat @ a_cat`` (``p x k`` times ``k x q``).

    Returns ``B = U_r Σ_r^{1/2}``, ``A = Σ_r^{1/2} V_r^T`` from the truncated SVD of
    the product, computed through thin QR factorisations of both factors, so the
    ``p x q`` product is never formed: ``O((p + q) k^2 + k^3)``. Ranks beyond that
    of the product come out as zero columns/rows. The factors come out in ``dtype``
    (default: ``b_cat``'s).
    """
    dtype = b_cat.dtype if dtype is None else dtype
    work = validation.working_dtype(dtype)
    q_b, r_b = jnp.linalg.qr(b_cat.astype(work))  # (p, k1), (k1, k)
    q_a, r_a = jnp.linalg.qr(a_cat.T.astype(work))  # (q, k2), (k2, k)
    u, s, vt = jnp.linalg.svd(jnp.matmul(r_b, r_a.T, precision=_HIGHEST), full_matrices=False)
    u = jnp.matmul(q_b, u, precision=_HIGHEST)
    v = jnp.matmul(q_a, vt.T, precision=_HIGHEST)
    k = s.shape[0]
    if k < rank:  # the product has fewer than `rank` singular values: pad with zeros
        u = jnp.pad(u, ((0, 0), (0, rank - k)))
        v = jnp.pad(v, ((0, 0), (0, rank - k)))
        s = jnp.pad(s, (0, rank - k))
    root = jnp.sqrt(s[:rank])
    b, a = u[:, :rank] * root[None, :], (v[:, :rank] * root[None, :]).T
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


def flexlora() -> Aggregator:
    """Exact product averaging re-factorised to rank ``r`` (FlexLoRA style).

    The server forms ``ΔW = Σ_i p_i B_i A_i`` (without building it: through the
    thin QR factors of ``[p_1 B_1, ..., p_n B_n]`` and ``[A_1; ...; A_n]``) and
    keeps its best rank-``r`` approximation (Eckart–Young),

    .. math::

        \\bar B = U_r \\Sigma_r^{1/2}, \\qquad \\bar A = \\Sigma_r^{1/2} V_r^\\top,
        \\qquad \\Delta W = U \\Sigma V^\\top,

    with ``r`` the LoRA rank of the global adapter. The aggregation error is the
    Frobenius norm of the discarded tail of ``ΔW``'s spectrum. (FlexLoRA also
    lets clients have different ranks; here all share ``r``.)

    References:
      J. Bai et al., "Federated Fine-tuning of Large Language Models under
      Heterogeneous Tasks and Client Resources", arXiv:2402.11505.
    """

    def aggregate(clients, global_, weights, round_index, key) -> AggregateResult:
        del round_index, key
        clients, global_, p = check_adapters(clients, global_, weights)
        new_global = {}
        for name, f in clients.items():
            new_global[name] = weighted_product_factors(f, p)
        return _broadcast_result(clients, new_global, p)

    return Aggregator("flexlora", aggregate)


def ffa_lora(frozen: str = "A") -> Aggregator:
    """FFA-LoRA: one factor stays frozen at its initial value, the other is averaged.

    FFA-LoRA freezes the randomly initialised factor and trains only the
    zero-initialised one, so factor-wise averaging is exact. In this package's
    model (``clair_jax._src.lora.LoRALinear``) ``A = lora_b`` (``r x out``) is
    the random one and ``B = lora_a`` (``in x r``) starts at zero, so the
    default freezes ``A``. Flax's own ``nnx.LoRA`` initialises the other way
    round (``lora_a`` random, ``lora_b`` zeros): with it pass ``frozen="B"``.
    (Freezing the zero-initialised factor would keep every update at zero.) The
    frozen factor of the new global adapter is copied from ``global_``; the
    trainable one is ``Σ_i p_i (.)_i``. The returned :class:`Aggregator` carries
    ``frozen_factor`` so the training loop can keep that factor fixed.

    Args:
      frozen: ``"A"`` (default) or ``"B"``, the factor clients do not train.

    References:
      Y. Sun, Z. Li, Y. Li, B. Ding, "Improving LoRA in Privacy-preserving
      Federated Learning", ICLR 2024, arXiv:2403.12313.
    """
    validation.check_choice(frozen, "frozen", fedrot_lib.FACTORS)

    def aggregate(clients, global_, weights, round_index, key) -> AggregateResult:
        del round_index, key
        clients, global_, p = check_adapters(clients, global_, weights)
        new_global = {}
        for name, f in clients.items():
            mean = factorwise_mean(f, p)
            if frozen == "B":
                new_global[name] = LoRAFactors(B=global_[name].B, A=mean.A)
            else:
                new_global[name] = LoRAFactors(B=mean.B, A=global_[name].A)
        return _broadcast_result(clients, new_global, p)

    return Aggregator("ffa_lora", aggregate, frozen_factor=frozen)


# --- CLAIR -----------------------------------------------------------------------------------


def clair_aggregator(
    *,
    shared_space: str = "column",
    measure: str = "adapter",
    detection: str = "module",
    flagged: str = "trained",
    refine_rank: int | str | None = "lora",
    benign_majority: bool = True,
    **clair_kwargs,
) -> Aggregator:
    """CLAIR per module on the clients' updates ``X_i = B_i A_i``, refined per client.

    For every module, :func:`clair_jax.clair` runs on the stacked matrices
    ``X_i`` (``(n, p, q)``; with ``shared_space="row"`` on their transposes, so
    that the shared subspace is a row space):

    * ``measure="adapter"``: ``X_i = B_i A_i``, the whole adapter a client sends;
    * ``measure="update"``: ``X_i = B_i A_i - B_i^0 A_i^0``, the client's update
      in this round from the adapter ``(B_i^0, A_i^0)`` it started from (the
      round passes ``start=``). Clients that start from different, personalised
      adapters are then compared on what they learnt this round only.

    Detection uses CLAIR's own subspace ``Û`` (its rank rule); the refinement
    below keeps at most ``refine_rank`` of its directions (the leading ones),
    ``r`` (the LoRA rank) by default: a shared LoRA subspace is spanned by the
    clients' ``B`` factors (rows: the ``A``'s), so it has at most ``r``
    dimensions. In text-copying runs (README) CLAIR's estimate was 15-52 of 64
    per module and kept most of each client's over-fit update (benign accuracy
    0.920 against 0.938 refined on ``r = 8`` directions, seed 0); capping the
    rank of detection too cut detection under sign flips (F1 0.75 against
    1.00, seed 0).

    Which clients are collaborative (``Ĉ``):

    * ``detection="module"``: per module, CLAIR's own set; a client is flagged
      when it is not collaborative in at least one module.
    * ``detection="client"``: a client's data are contaminated or not as a
      whole, so the evidence is pooled over the ``K`` modules: with ``d_ik``
      the CLAIR score of client ``i`` in module ``k`` and ``m_k`` their median
      over clients, the client score is ``z_i = median_k d_ik / m_k`` (about 1
      for a benign client; the median over modules ignores one module where a
      benign client happens to stand out), thresholded by CLAIR's robust rule
      (``τ = m + 3.5 max(1.4826 MAD, 0.1 m)`` on a re-estimated benign set).
      The same ``Ĉ`` is then used in every module.

    Each collaborative client's refined update (:func:`clair_jax.clair`'s
    refinement on the module's subspace ``Û``, ``X̃_i = X̄_Ĉ + P_Û (X_i - X̄_Ĉ)``;
    plus ``B_i^0 A_i^0`` for ``"update"``) is re-factorised to the LoRA rank
    ``r`` by truncated SVD and sent back to that client (personalised adapters).
    A flagged client is left out of the consensus and the global adapter. What
    it holds next is set by ``flagged``: ``"trained"`` (default) keeps the
    adapter it trained this round, as under local-only training; ``"global"``
    gives it the global adapter. In text-copying runs (README) ``"global"``
    hid the contaminated clients in later rounds: reset to the consensus every
    round, they differed from it by one round of training only, while benign
    clients carried their personalised adapters (majority-of-rounds F1 1.00 /
    1.00 / 0.80 over three seeds, against 1.00 in all three with
    ``"trained"``). With ``measure="update"`` a flagged client that kept its
    *start* instead re-sent the same update every round and stayed flagged.
    The global adapter is the rank-``r`` factorisation of the weighted mean of
    the collaborative clients' adapters, ``Σ_{i∈Ĉ} p_i B_i A_i / Σ_{i∈Ĉ} p_i`` (all
    clients if ``Ĉ`` is empty; with ``detection="module"`` the module's own
    ``Ĉ``, with ``"client"`` the pooled one). Diagnostics: per module ``"flagged/<module>"``
    (CLAIR's own set), ``"scores/<module>"``, ``"threshold/<module>"``,
    ``"rank/<module>"`` (CLAIR's estimated rank, used for detection),
    ``"refine_rank/<module>"`` (the directions the refinement kept),
    ``"majority_refit/<module>"`` (CLAIR refitted on a flagged majority),
    ``"converged/<module>"`` and ``"num_iters/<module>"`` (of CLAIR's final
    decomposition: non-convergence is reported, not hidden); with
    ``detection="client"`` also ``"client_scores"`` and ``"client_threshold"``.

    Args:
      shared_space: ``"column"`` (subspace of ``R^p``, spanned by the ``B``
        factors) or ``"row"`` (of ``R^q``, spanned by the rows of ``A``).
      measure: ``"adapter"`` or ``"update"`` (see above).
      detection: ``"module"`` or ``"client"`` (see above).
      flagged: what a flagged client holds next, ``"trained"`` (the adapter it
        trained) or ``"global"`` (the global adapter).
      refine_rank: directions of ``Û`` the refinement keeps at most: ``"lora"``
        (the LoRA rank ``r``), an int, or ``None`` (all of ``Û``).
      benign_majority: passed to :func:`clair_jax.clair`; True (default here,
        unlike :func:`clair_jax.clair`) assumes, as the Byzantine-robust rules
        do, that fewer than half of the clients are contaminated: a module whose
        detection leaves a minority collaborative is refitted on the flagged
        majority (a coordinated group of identical updates otherwise becomes the
        shared subspace when the benign updates are diverse).
      **clair_kwargs: passed to :func:`clair_jax.clair` (``rank``, ``max_rank``,
        ``lam_nuc``, ``lam_block``, ``threshold``, ``offset``, ``method``, ...).
        ``method`` defaults to ``"admm"``, as in :func:`clair_jax.clair`
        (FISTA can stall in float32 on the exactly low-rank adapters of a few
        clients after a few local steps).

    Raises:
      ValueError: an unknown ``shared_space``, ``measure``, ``detection`` or
        ``flagged``; ``contaminated`` among ``clair_kwargs``; at aggregation,
        ``measure="update"`` without ``start`` or with a ``start`` unlike
        ``clients``, fewer than 2 clients.

    References:
      CLAIR, arXiv:2605.21217 (abstract only; see :func:`clair_jax.clair`).
    """
    validation.check_choice(shared_space, "shared_space", ("column", "row"))
    validation.check_choice(measure, "measure", ("adapter", "update"))
    validation.check_choice(detection, "detection", ("module", "client"))
    validation.check_choice(flagged, "flagged", ("global", "trained"))
    if not (refine_rank is None or refine_rank == "lora"):
        if isinstance(refine_rank, bool) or not isinstance(refine_rank, int) or refine_rank < 1:
            raise ValueError(
                f"refine_rank must be 'lora', None or an int >= 1, got {refine_rank!r}."
            )
    if "contaminated" in clair_kwargs:
        raise ValueError(
            "contaminated= has no effect in clair_aggregator: what a flagged client holds "
            "next is set by flagged= ('trained' or 'global')."
        )
    keep_trained = flagged == "trained"
    row = shared_space == "row"

    def aggregate(clients, global_, weights, round_index, key, start=None) -> AggregateResult:
        del round_index, key
        from clair_jax._src import clair as clair_lib  # imported late: clair imports decompose

        clients, global_, p = check_adapters(clients, global_, weights)
        if measure == "update":
            if start is None:
                raise ValueError('measure="update" needs start= (the adapters of the round start).')
            try:  # start fits global_ and weights exactly when it fits like clients
                start, _, _ = check_adapters(start, global_, weights)
            except ValueError as err:
                raise ValueError(f"start (the adapters of the round start): {err}") from None
        n = _n_clients(clients)
        if n < 2:
            raise ValueError(
                f"clair_aggregator needs clients from at least 2 clients (CLAIR tells them "
                f"apart by comparing them), got factors with a client axis of {n}."
            )
        diagnostics, fits, inputs = {}, {}, {}
        outliers = jnp.zeros((n,), bool)
        for name, f in clients.items():
            product = jnp.einsum("npr,nrq->npq", f.B, f.A, precision=_HIGHEST)
            origin = jnp.zeros_like(product)
            if measure == "update":
                f0 = start[name]
                origin = jnp.einsum("npr,nrq->npq", f0.B, f0.A, precision=_HIGHEST)
            x = product - origin
            inputs[name] = (jnp.swapaxes(x, 1, 2) if row else x), origin
        results = _per_module(
            partial(clair_lib.clair, benign_majority=benign_majority, **clair_kwargs),
            {name: x for name, (x, _) in inputs.items()},
        )
        for name, f in clients.items():
            (x, origin), res = inputs[name], results[name]
            width = _refine_width(refine_rank, f.A.shape[1], res.basis.shape[1])
            fits[name] = (x, origin, res, width)
            outliers = outliers | ~res.collaborative
            diagnostics[f"flagged/{name}"] = ~res.collaborative
            diagnostics[f"scores/{name}"] = res.scores
            diagnostics[f"threshold/{name}"] = res.threshold
            diagnostics[f"rank/{name}"] = res.rank
            diagnostics[f"refine_rank/{name}"] = jnp.minimum(res.rank, width)
            diagnostics[f"majority_refit/{name}"] = res.majority_refit
            diagnostics[f"converged/{name}"] = res.decomposition.converged
            diagnostics[f"num_iters/{name}"] = res.decomposition.num_iters
        if detection == "client":
            scores = jnp.stack([fit[2].scores for fit in fits.values()])  # (K, n)
            typical = jnp.median(scores, axis=1, keepdims=True)
            relative = scores / jnp.maximum(typical, jnp.finfo(scores.dtype).tiny)
            client_scores = jnp.median(relative, axis=0)
            client_threshold = clair_lib._threshold(client_scores, jnp.zeros((), scores.dtype))
            outliers = client_scores > client_threshold
            diagnostics["client_scores"] = client_scores
            diagnostics["client_threshold"] = client_threshold
        collaborative = ~outliers
        new_clients, new_global = {}, {}
        for name, (x, origin, res, width) in fits.items():
            f = clients[name]
            r = f.A.shape[1]
            members = collaborative if detection == "client" else res.collaborative
            _, refined = clair_lib.refine(x, res.basis[:, :width], members)
            refined = jnp.swapaxes(refined, 1, 2) if row else refined
            new_clients[name] = jax.tree.map(
                lambda a, like: a.astype(like.dtype),
                batching.map_matrices(partial(dense_factors, rank=r), origin + refined),
                f,
            )
            # The module's own collaborative set ("module"), the pooled one ("client").
            w = jnp.where(members, p, 0.0)
            # Collaborative clients all of weight zero: average them equally; none
            # collaborative: every client, with its weight.
            equal = members.astype(p.dtype)
            w = jnp.where(jnp.sum(w) > 0, w, jnp.where(jnp.sum(equal) > 0, equal, p))
            new_global[name] = weighted_product_factors(f, w / jnp.sum(w))
        # Flagged clients are left out of the consensus: they keep the adapter they
        # trained this round (flagged="trained") or get the global one ("global").
        keep = collaborative[:, None, None]
        if keep_trained:
            fallback = clients
        else:
            fallback = {name: LoRAFactors(g.B[None], g.A[None]) for name, g in new_global.items()}
        new_clients = {
            name: LoRAFactors(
                B=jnp.where(keep, f.B, fallback[name].B),
                A=jnp.where(keep, f.A, fallback[name].A),
            )
            for name, f in new_clients.items()
        }
        diagnostics.update(errors(clients, new_global, p))
        return AggregateResult(new_clients, new_global, outliers, diagnostics)

    return Aggregator("clair", aggregate, uses_start=measure == "update")


def _per_module(fn: Callable, xs: Mapping[str, Array]) -> dict:
    """``fn`` on every module's array; modules of one shape and dtype share one solve.

    Those are stacked and mapped with ``jax.lax.map`` (sequentially, one
    compiled copy of ``fn`` per shape instead of one per module: CLAIR's round
    of a two-layer text-copying model compiled 12 copies). The results equal
    ``{name: fn(x)}``.
    """
    groups: dict[tuple, list[str]] = {}
    for name, x in xs.items():
        groups.setdefault((x.shape, x.dtype), []).append(name)
    out = {}
    for names in groups.values():
        if len(names) == 1:
            out[names[0]] = fn(xs[names[0]])
            continue
        stacked = jax.lax.map(fn, jnp.stack([xs[name] for name in names]))
        for i, name in enumerate(names):
            out[name] = jax.tree.map(lambda a, i=i: a[i], stacked)
    return {name: out[name] for name in xs}


def _refine_width(refine_rank, lora_rank: int, width: int) -> int:
    """Columns of CLAIR's basis the refinement keeps (static)."""
    if refine_rank is None:
        return width
    return min(width, lora_rank if refine_rank == "lora" else refine_rank)


# --- Byzantine-robust rules on the flattened factors ------------------------------------------


def flatten_clients(clients: Adapters) -> tuple[Array, Callable[[Array], Adapters]]:
    """Clients' factors as rows ``(n, d)`` and a map from a ``(d,)`` row to an adapter.

    The rows are in the working dtype (at least float32: the robust rules' squared
    distances overflow float16 at 65504); ``unflatten`` returns each factor in its
    own dtype.
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


def coordinate_median() -> Aggregator:
    """Coordinate-wise median of the clients' flattened factors (unweighted).

    Every coordinate of ``(B, A)`` over all modules is the median over clients
    (the mean of the two middle values when ``n`` is even). Flags nobody.

    References:
      D. Yin, Y. Chen, K. Ramchandran, P. Bartlett, "Byzantine-Robust Distributed
      Learning: Towards Optimal Statistical Rates", ICML 2018, arXiv:1803.01498.
    """

    def aggregate(clients, global_, weights, round_index, key) -> AggregateResult:
        del round_index, key
        clients, global_, p = check_adapters(clients, global_, weights)
        rows, unflatten = flatten_clients(clients)
        return _broadcast_result(clients, unflatten(jnp.median(rows, axis=0)), p)

    return Aggregator("coordinate_median", aggregate)


def trimmed_mean(beta: float = 0.1) -> Aggregator:
    """Coordinate-wise β-trimmed mean of the clients' flattened factors (unweighted).

    For every coordinate the ``k = floor(β n)`` largest and ``k`` smallest values
    over clients are removed and the remaining ``n - 2k`` averaged. Flags nobody.

    Args:
      beta: fraction trimmed from each side, ``0 <= β < 1/2`` (and ``2k < n``).

    References:
      D. Yin, Y. Chen, K. Ramchandran, P. Bartlett, "Byzantine-Robust Distributed
      Learning: Towards Optimal Statistical Rates", ICML 2018, arXiv:1803.01498.
    """
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not 0 <= beta < 0.5:
        raise ValueError(f"beta must be a number in [0, 0.5), got {beta!r}.")

    def aggregate(clients, global_, weights, round_index, key) -> AggregateResult:
        del round_index, key
        clients, global_, p = check_adapters(clients, global_, weights)
        rows, unflatten = flatten_clients(clients)
        n = rows.shape[0]
        k = int(np.floor(beta * n))
        kept = jnp.sort(rows, axis=0)[k : n - k]
        return _broadcast_result(clients, unflatten(jnp.mean(kept, axis=0)), p)

    return Aggregator("trimmed_mean", aggregate)


def _squared_distances(rows: Array) -> Array:
    """``(n, n)`` exact squared Euclidean distances, one row at a time (``O(n d)`` memory)."""
    return jax.lax.map(lambda x: jnp.sum((rows - x[None, :]) ** 2, axis=1), rows)


def krum_scores(rows: Array, f: int) -> Array:
    """Krum scores: sum of squared distances to the ``n - f - 2`` nearest other clients."""
    n = rows.shape[0]
    d = _squared_distances(rows)
    d = jnp.where(jnp.eye(n, dtype=bool), jnp.inf, d)
    return jnp.sum(jnp.sort(d, axis=1)[:, : n - f - 2], axis=1)


def _check_krum(n: int, f: int, m: int) -> None:
    if n < 2 * f + 3:
        raise ValueError(f"Krum with f={f} needs n >= 2f + 3 = {2 * f + 3} clients, got n={n}.")
    if m > n:
        raise ValueError(f"multi_krum m={m} is larger than the number of clients n={n}.")


def multi_krum(f: int, m: int) -> Aggregator:
    """Multi-Krum: average the ``m`` clients with the lowest Krum scores.

    On the clients' flattened factors ``x_i`` (all modules), the score of client
    ``i`` is ``Σ_{j ∈ N_i} ||x_i - x_j||^2`` over its ``n - f - 2`` nearest other
    clients; the ``m`` lowest-scoring clients (ties broken by index) are averaged
    factor-wise with their weights renormalised, and the others are flagged.
    ``m = 1`` is Krum. Scores are computed once (Blanchard et al.'s Multi-Krum),
    not by repeated Krum. Needs ``n >= 2f + 3``. Diagnostics: ``krum/scores``.

    Args:
      f: assumed number of Byzantine clients, ``f >= 0``.
      m: number of clients averaged, ``1 <= m <= n``.

    References:
      P. Blanchard, E. M. El Mhamdi, R. Guerraoui, J. Stainer, "Machine Learning
      with Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS 2017.
    """
    for value, arg, low in ((f, "f", 0), (m, "m", 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{arg} must be an int >= {low}, got {value!r}.")
    f, m = int(f), int(m)

    def aggregate(clients, global_, weights, round_index, key) -> AggregateResult:
        del round_index, key
        clients, global_, p = check_adapters(clients, global_, weights)
        rows, _ = flatten_clients(clients)
        n = rows.shape[0]
        _check_krum(n, f, m)
        scores = krum_scores(rows, f)
        selected = jnp.zeros((n,), bool).at[jnp.argsort(scores, stable=True)[:m]].set(True)
        w = jnp.where(selected, p, 0.0)
        # All selected weights zero (zero-weight clients): average them equally.
        w = jnp.where(jnp.sum(w) > 0, w, selected.astype(p.dtype))
        w = w / jnp.sum(w)
        new_global = {name: _selected_mean(fac, w, selected) for name, fac in clients.items()}
        return _broadcast_result(clients, new_global, p, ~selected, {"krum/scores": scores})

    return Aggregator("krum" if m == 1 else "multi_krum", aggregate)


def krum(f: int) -> Aggregator:
    """Krum: the single client with the lowest Krum score (see :func:`multi_krum`).

    The global adapter is that client's factors; every other client is flagged.

    References:
      P. Blanchard, E. M. El Mhamdi, R. Guerraoui, J. Stainer, "Machine Learning
      with Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS 2017.
    """
    return multi_krum(f, 1)


def geometric_median(*, nu: float = 1e-6, max_iter: int = 100, tol: float = 1e-6) -> Aggregator:
    """Weighted geometric median of the flattened factors by smoothed Weiszfeld (RFA).

    Minimises ``Σ_i α_i max(ν, ||v - x_i||)`` (``α_i = p_i``) by the iteration

    .. math::

        β_i = \\frac{α_i}{\\max(ν, \\|v - x_i\\|)}, \\qquad
        v \\leftarrow \\frac{\\sum_i β_i x_i}{\\sum_i β_i},

    from the weighted mean, until ``||Δv|| <= tol · ||v||`` or ``max_iter``
    iterations. Flags nobody. Diagnostics: ``geometric_median/num_iters``,
    ``geometric_median/converged`` and the final normalised ``β``
    (``geometric_median/weights``, small for far-away clients).

    Args:
      nu: smoothing ``ν > 0`` (guards the division when ``v`` hits a client).
        Absolute, in the units of the factors, as in RFA: clients closer than
        ``ν`` to ``v`` get the same weight, so with factors whose distances are
        all below ``ν`` the rule returns the weighted mean.
      max_iter: iteration cap.
      tol: relative change at which to stop.

    References:
      K. Pillutla, S. M. Kakade, Z. Harchaoui, "Robust Aggregation for Federated
      Learning", IEEE Trans. Signal Process. 2022, arXiv:1912.13445.
    """
    nu = validation.check_positive_float(nu, "nu")
    tol = validation.check_positive_float(tol, "tol")
    max_iter = validation.check_positive_int(max_iter, "max_iter")

    def aggregate(clients, global_, weights, round_index, key) -> AggregateResult:
        del round_index, key
        clients, global_, p = check_adapters(clients, global_, weights)
        rows, unflatten = flatten_clients(clients)

        def beta(v):
            dist = jnp.sqrt(jnp.sum((rows - v[None, :]) ** 2, axis=1))
            return p / jnp.maximum(dist, nu)

        def step(v):
            b = beta(v)
            return jnp.einsum("n,nd->d", b / jnp.sum(b), rows, precision=_HIGHEST)

        def cond(state):
            v, change, it = state
            return (it < max_iter) & (change > tol * jnp.linalg.norm(v))

        def body(state):
            v, _, it = state
            new = step(v)
            return new, jnp.linalg.norm(new - v), it + 1

        v0 = jnp.einsum("n,nd->d", p, rows, precision=_HIGHEST)
        init = (v0, jnp.asarray(jnp.inf, rows.dtype), jnp.zeros((), jnp.int32))
        v, change, it = jax.lax.while_loop(cond, body, init)
        b = beta(v)
        extra = {
            "geometric_median/num_iters": it,
            "geometric_median/converged": change <= tol * jnp.linalg.norm(v),
            "geometric_median/weights": b / jnp.sum(b),
        }
        return _broadcast_result(clients, unflatten(v), p, extra=extra)

    return Aggregator("geometric_median", aggregate)
