"""Averaging rules: local-only, FedIT, FedRot-LoRA, FlexLoRA, FFA-LoRA.

Every factory takes ``screen=`` (``"exclude"``, ``"raise"`` or ``"off"``): how
clients with non-finite or outsized factors are handled before the rule runs
(:mod:`~clair_jax._src.aggregators.screening`); the rule then averages the
included clients with their weights renormalised.
"""

from __future__ import annotations

import jax.numpy as jnp

from clair_jax._src import validation
from clair_jax._src.aggregators import alignment
from clair_jax._src.aggregators.base import (
    AggregateResult,
    Aggregator,
    broadcast_result,
    make_aggregator,
    num_clients,
)
from clair_jax._src.aggregators.factor_algebra import (
    HIGHEST,
    errors,
    factorwise_mean,
    weighted_product_factors,
)
from clair_jax._src.lora.types import LoRAFactors


def local_only(*, screen: str = "exclude") -> Aggregator:
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

    def core(clients, global_, p, excluded, round_index, key) -> AggregateResult:
        del excluded, round_index, key
        n = num_clients(clients)
        return AggregateResult(clients, global_, jnp.zeros((n,), bool), errors(clients, global_, p))

    return make_aggregator("local_only", core, screen=screen)


def fedit(*, screen: str = "exclude") -> Aggregator:
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

    def core(clients, global_, p, excluded, round_index, key) -> AggregateResult:
        del excluded, round_index, key
        new_global = {name: factorwise_mean(f, p) for name, f in clients.items()}
        return broadcast_result(clients, new_global, p)

    return make_aggregator("fedit", core, screen=screen)


def fedrot(
    strength: float = 1.5,
    *,
    alternate: bool = True,
    factor: str = "A",
    skip_first_round: bool = True,
    allow_reflection: bool | None = None,
    screen: str = "exclude",
) -> Aggregator:
    """FedRot-LoRA: align clients' factors to the broadcast global ones, then FedIT.

    In round ``t`` every client's factors are rotated by :func:`fedrot_align`
    toward the global factors broadcast at the start of the round (``global_``),
    then averaged factor-wise. With ``alternate`` (the authors' schedule) the
    aligned factor is ``A`` on odd rounds and ``B`` on even rounds; otherwise it
    is always ``factor``. With ``skip_first_round`` round 0 is not aligned (the
    initial global adapter has a zero factor and carries no basis to align to).
    Each client's product ``B_i A_i`` is unchanged by the rotation.

    The defaults are the authors' (their ``client.py`` with ``initialshare: 'A'``
    and ``rotate_lambda = 1.5``): hard Procrustes over ``O(r)``, ``A`` on odd
    rounds, ``B`` on even ones, none in round 0, the reference being the global
    adapter the clients received. The authors align on each client before upload;
    here the server aligns before averaging, with the same result.

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
      screen: ``"exclude"``, ``"raise"`` or ``"off"`` (see
        :func:`~clair_jax._src.aggregators.base.make_aggregator`).

    Returns:
      An :class:`Aggregator` named ``"fedrot"``.

    References:
      FedRot-LoRA: Mitigating Rotational Misalignment in Federated LoRA,
      arXiv:2602.23638.
    """
    validation.check_choice(factor, "factor", alignment.FACTORS)
    allow_reflection = alignment.check_reflection(allow_reflection)
    alignment.check_strength(strength, jnp.float32)
    lam_value = float(strength)  # kept in full precision, cast per module

    def core(clients, global_, p, excluded, round_index, key) -> AggregateResult:
        del excluded, key
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
                rot_a = alignment.alignment_rotations(
                    f.A, f.B, ref.A, ref.B, lam, "A", allow_reflection
                )
                rot = jnp.where(choice == 1, rot_a, rot)
            if alternate or factor == "B":
                rot_b = alignment.alignment_rotations(
                    f.A, f.B, ref.A, ref.B, lam, "B", allow_reflection
                )
                rot = jnp.where(choice == 2, rot_b, rot)
            aligned[name] = LoRAFactors(
                B=jnp.einsum("nps,nsr->npr", f.B, rot, precision=HIGHEST),
                A=jnp.einsum("nsr,nsq->nrq", rot, f.A, precision=HIGHEST),
            )
        new_global = {name: factorwise_mean(f, p) for name, f in aligned.items()}
        unaligned = {name: factorwise_mean(f, p) for name, f in clients.items()}
        extra = errors(clients, unaligned, p, "aggregation_error_unaligned")
        extra["fedrot/aligned_factor"] = choice.astype(jnp.int32)
        # Errors of the global adapter against the clients' (unchanged) products.
        return broadcast_result(aligned, new_global, p, extra=extra)

    return make_aggregator("fedrot", core, screen=screen)


def flexlora(*, screen: str = "exclude") -> Aggregator:
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

    def core(clients, global_, p, excluded, round_index, key) -> AggregateResult:
        del excluded, round_index, key
        new_global = {}
        for name, f in clients.items():
            new_global[name] = weighted_product_factors(f, p)
        return broadcast_result(clients, new_global, p)

    return make_aggregator("flexlora", core, screen=screen)


def ffa_lora(frozen: str = "A", *, screen: str = "exclude") -> Aggregator:
    """FFA-LoRA: one factor stays frozen at its initial value, the other is averaged.

    FFA-LoRA freezes the randomly initialised factor and trains only the
    zero-initialised one, so factor-wise averaging is exact. In this package's
    model (``clair_jax._src.lora.model.LoRALinear``), as in PEFT and flax's
    ``nnx.LoRA``, the down-projection ``A`` (PEFT's ``lora_A``, ``r x in``) is
    the random one and the up-projection ``B`` (``lora_B``, ``out x r``) starts
    at zero, so the default freezes ``A`` as the paper does.
    (Freezing the zero-initialised factor would keep every update at zero.) The
    frozen factor of the new global adapter is copied from ``global_``; the
    trainable one is ``Σ_i p_i (.)_i``. The returned :class:`Aggregator` carries
    ``frozen_factor`` so the training loop can keep that factor fixed.

    Args:
      frozen: ``"A"`` (default, the down-projection) or ``"B"``, the factor
        clients do not train.
      screen: ``"exclude"``, ``"raise"`` or ``"off"`` (see
        :func:`~clair_jax._src.aggregators.base.make_aggregator`).

    References:
      Y. Sun, Z. Li, Y. Li, B. Ding, "Improving LoRA in Privacy-preserving
      Federated Learning", ICLR 2024, arXiv:2403.12313.
    """
    validation.check_choice(frozen, "frozen", alignment.FACTORS)

    def core(clients, global_, p, excluded, round_index, key) -> AggregateResult:
        del excluded, round_index, key
        new_global = {}
        for name, f in clients.items():
            mean = factorwise_mean(f, p)
            if frozen == "B":
                new_global[name] = LoRAFactors(B=global_[name].B, A=mean.A)
            else:
                new_global[name] = LoRAFactors(B=mean.B, A=global_[name].A)
        return broadcast_result(clients, new_global, p)

    return make_aggregator("ffa_lora", core, screen=screen, frozen_factor=frozen)
