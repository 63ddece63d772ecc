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
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool

from clair_jax._src import fedrot as fedrot_lib
from clair_jax._src import validation

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
      frozen_factor: ``"A"`` when clients must not train ``A`` (FFA-LoRA), else None.
    """

    name: str
    aggregate: Callable[..., AggregateResult]
    frozen_factor: str | None = None


# --- shared helpers ------------------------------------------------------------------------


def check_adapters(
    clients: Mapping[str, LoRAFactors], global_: Mapping[str, LoRAFactors], weights
) -> tuple[Adapters, Adapters, Array]:
    """Checks stacked client adapters against the global one; returns them and ``p``.

    Raises:
      ValueError: different module names, shapes that do not fit together, or bad
        weights; the message names the module and the shapes.
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
            (b, a), (b_g, a_g) = clients[name], global_[name]
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


def broadcast(global_: Adapters, n: int) -> Adapters:
    """Stacks ``n`` copies of the global adapter (what every client starts from)."""
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *x.shape)), global_)


def factorwise_mean(factors: LoRAFactors, p: Array) -> LoRAFactors:
    """FedIT: ``(Σ p_i B_i, Σ p_i A_i)``."""
    return LoRAFactors(
        B=jnp.einsum("n,npr->pr", p, factors.B, precision=_HIGHEST),
        A=jnp.einsum("n,nrq->rq", p, factors.A, precision=_HIGHEST),
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
    strength: float = 1.0,
    *,
    alternate: bool = True,
    factor: str = "A",
    skip_first_round: bool = True,
    allow_reflection: bool = False,
) -> Aggregator:
    """FedRot-LoRA: align clients' factors to the broadcast global ones, then FedIT.

    In round ``t`` every client's factors are rotated by :func:`fedrot_align`
    toward the global factors broadcast at the start of the round (``global_``),
    then averaged factor-wise. With ``alternate`` (the authors' schedule) the
    aligned factor is ``A`` on odd rounds and ``B`` on even rounds; otherwise it
    is always ``factor``. With ``skip_first_round`` round 0 is not aligned (the
    initial global adapter has a zero factor and carries no basis to align to).
    Each client's product ``B_i A_i`` is unchanged by the rotation.

    Diagnostics, per module: ``aggregation_error/<m>`` after alignment and
    ``aggregation_error_unaligned/<m>`` of plain FedIT on the same clients;
    ``fedrot/aligned_factor`` is 0 (none), 1 (``A``) or 2 (``B``).

    Args:
      strength: alignment strength ``λ ∈ [0, 1]`` (0: FedIT; 1: full Procrustes;
        the paper reports ``λ ≈ 0.4`` as its best setting).
      alternate: alternate the aligned factor by round.
      factor: ``"A"`` or ``"B"``, the aligned factor when not alternating.
      skip_first_round: leave round 0 unaligned.
      allow_reflection: see :func:`fedrot_align`.

    Returns:
      An :class:`Aggregator` named ``"fedrot"``.

    References:
      FedRot-LoRA: Mitigating Rotational Misalignment in Federated LoRA,
      arXiv:2602.23638.
    """
    validation.check_choice(factor, "factor", fedrot_lib.FACTORS)
    lam_value = float(fedrot_lib.check_strength(strength, jnp.float32))

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
