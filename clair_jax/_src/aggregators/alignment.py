"""FedRot-LoRA: rotate clients' LoRA factors toward a reference before averaging.

A LoRA update ``B A`` (``B`` ``p x r``, ``A`` ``r x q``) is invariant under
``B -> B R``, ``A -> R^T A`` for any orthogonal ``R``. Clients that learn the same
update in different latent bases therefore send factors that cancel when the
server averages ``A`` and ``B`` separately (FedIT). FedRot-LoRA rotates each
client's factors toward the reference the server broadcast at the start of the
round, which leaves every client's product unchanged and shrinks the aggregation
error

.. math::

    \\Big\\|\\sum_i p_i B_i A_i - \\bar B \\bar A\\Big\\|_F,
    \\qquad \\bar B = \\sum_i p_i B_i,\\; \\bar A = \\sum_i p_i A_i.

The authors' code is public (GitHub ``haoran-zh/FedRot-LoRA``,
``federatedscope/rotation_alignment_tools.py``) and this port follows it: the
closed form is the orthogonal Procrustes solution (Schönemann 1966); the
strength ``λ`` (the official ``rotate_lambda``, default 1.5) selects the hard
solution over O(r) (``λ > 1``, reflections allowed) or the Kabsch-fixed
solution over SO(r), softened through the polar factor when ``λ < 1``. The
alternation and round-0 skip of :func:`clair_jax.fedrot` follow the official
client (``core/workers/client.py``). The factors are the authors' own, with no
mapping: their code holds PEFT's ``lora_A`` (``r x in``) and ``lora_B``
(``out x r``), which are this package's ``A`` and ``B``.
``tests/test_fedrot_official.py`` checks the port against a NumPy transcription
of the official alignment.

References:
  FedRot-LoRA: Mitigating Rotational Misalignment in Federated LoRA,
  arXiv:2602.23638.
  P. H. Schönemann, "A generalized solution of the orthogonal Procrustes
  problem", Psychometrika 31, 1966.
  W. Kabsch, "A solution for the best rotation to relate two sets of vectors",
  Acta Cryst. A32, 1976.
"""

from __future__ import annotations

from functools import partial

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

from clair_jax._src import validation
from clair_jax._src.linalg import batching
from clair_jax._src.linalg.scaling import unit_size
from clair_jax._src.lora import types as lora_types

FACTORS = ("A", "B")


_HIGHEST = jax.lax.Precision.HIGHEST


def nearest_rotation(
    m: Float[Array, "... r r"], allow_reflection: bool = False
) -> Float[Array, "... r r"]:
    """The orthogonal ``R`` maximising ``tr(R^T M)``: ``U V^T`` for ``M = U Σ V^T``.

    This is the orthogonal polar factor of ``M``, the orthogonal matrix nearest to
    ``M`` in Frobenius norm. Unless ``allow_reflection``, the maximisation is over
    rotations (``det R = +1``): when ``det(U V^T) < 0`` the last (smallest)
    singular pair's sign is flipped (Kabsch 1976), which is optimal over SO(r).
    """
    u, _, vt = jnp.linalg.svd(m.astype(validation.working_dtype(m.dtype)), full_matrices=False)
    if not allow_reflection:
        det = jnp.linalg.det(u) * jnp.linalg.det(vt)
        sign = jnp.where(det < 0, -1.0, 1.0).astype(u.dtype)
        u = u.at[..., :, -1].multiply(sign[..., None])
    return jnp.matmul(u, vt, precision=_HIGHEST).astype(m.dtype)


@partial(jax.jit, static_argnames=("factor", "allow_reflection"))
def alignment_rotations(
    A: Float[Array, "n r q"],
    B: Float[Array, "n p r"],
    A_ref: Float[Array, "r q"] | None,
    B_ref: Float[Array, "p r"] | None,
    strength: Float[Array, ""],
    factor: str,
    allow_reflection: bool | None = None,
) -> Float[Array, "n r r"]:
    """Per-client rotations ``R_i`` of :func:`fedrot_align` (no argument checks).

    The rotation does not change when a client's factor or the reference is
    scaled, so both are brought to unit size (a power of two; in at least
    float32) before the cross term is formed, which then neither overflows nor
    underflows. Jitted, with ``factor`` and ``allow_reflection`` static, so
    eager calls compile once.

    ``strength`` is traced: both the hard (``λ > 1``) and the soft (``λ <= 1``)
    rotations are computed and one is selected.

    Args:
      A: ``(n, r, q)`` clients' ``A`` factors.
      B: ``(n, p, r)`` clients' ``B`` factors.
      A_ref: ``(r, q)`` reference (used when ``factor == "A"``).
      B_ref: ``(p, r)`` reference (used when ``factor == "B"``).
      strength: scalar ``λ >= 0`` (the official ``rotate_lambda``).
      factor: ``"A"`` or ``"B"``.
      allow_reflection: ``None`` (official: ``O(r)`` iff ``λ > 1``) or a bool forcing
        ``O(r)`` / ``SO(r)``.

    Returns:
      ``(n, r, r)`` orthogonal matrices, in ``A``'s dtype.
    """
    dtype = A.dtype
    work = validation.working_dtype(dtype)
    if factor == "A":  # min_R ||R^T A_i - A_ref||_F: maximise tr(R^T A_i A_ref^T)
        mine, ref, spec = A, A_ref, "nrq,sq->nrs"
    else:  # min_R ||B_i R - B_ref||_F: maximise tr(R^T B_i^T B_ref)
        mine, ref, spec = B, B_ref, "npr,ps->nrs"
    mine, ref = unit_size(mine.astype(work), (1, 2)), unit_size(ref.astype(work))
    cross = jnp.einsum(spec, mine, ref, precision=_HIGHEST)
    eye = jnp.broadcast_to(jnp.eye(cross.shape[-1], dtype=cross.dtype), cross.shape)
    # One client at a time on CPU (see clair_jax._src.linalg.batching).
    # One SVD gives both optima: over O(r) (U V^T) and over SO(r) (Kabsch fix).
    free, proper = batching.map_matrices(procrustes_pair, cross)
    # A zero cross term (e.g. a zero reference) makes every rotation optimal: keep I.
    nonzero = jnp.max(jnp.abs(cross), axis=(1, 2), keepdims=True) > 0
    free, proper = jnp.where(nonzero, free, eye), jnp.where(nonzero, proper, eye)
    lam = jnp.asarray(strength, cross.dtype)
    # λ <= 1 (official rotation_alignment_soft): the Kabsch-fixed R, or R over O(r)
    # with allow_reflection=True; exactly R at λ = 1, else the polar factor of the
    # interpolation, taken over O(r) as the official code does.
    inner = free if allow_reflection is True else proper
    polar = partial(nearest_rotation, allow_reflection=True)
    soft = batching.map_matrices(polar, (1 - lam) * eye + lam * inner)
    soft = jnp.where(lam == 1, inner, soft)
    # λ > 1 (official rotation_alignment): U V^T over O(r), no determinant fix;
    # over SO(r) only when allow_reflection=False.
    hard = proper if allow_reflection is False else free
    return jnp.where(lam > 1, hard, soft).astype(dtype)


def procrustes_pair(m: Float[Array, "r r"]) -> tuple[Float[Array, "r r"], Float[Array, "r r"]]:
    """``argmax tr(R^T M)`` over O(r) and over SO(r), from one SVD ``M = U Σ V^T``.

    Over O(r) it is ``U V^T``; over SO(r), when ``det(U V^T) < 0`` the sign of the
    last (smallest) singular pair is flipped first (Kabsch 1976).
    """
    u, _, vt = jnp.linalg.svd(m, full_matrices=False)
    free = jnp.matmul(u, vt, precision=_HIGHEST)
    sign = jnp.where(jnp.linalg.det(u) * jnp.linalg.det(vt) < 0, -1.0, 1.0).astype(u.dtype)
    proper = jnp.matmul(u.at[:, -1].multiply(sign), vt, precision=_HIGHEST)
    return free, proper


def fedrot_align(
    A: Float[ArrayLike, "n r q"],
    B: Float[ArrayLike, "n p r"],
    A_ref: Float[ArrayLike, "r q"] | None,
    B_ref: Float[ArrayLike, "p r"] | None,
    *,
    strength: float | Float[ArrayLike, ""] = 1.5,
    factor: str = "A",
    allow_reflection: bool | None = None,
) -> tuple[Float[Array, "n r q"], Float[Array, "n p r"]]:
    """Rotates every client's LoRA factors toward a reference (FedRot-LoRA).

    Client ``i`` holds ``B_i`` (``p x r``) and ``A_i`` (``r x q``). Aligning on
    ``A`` solves the orthogonal Procrustes problem

    .. math::

        R_i^\\star = \\arg\\min_{R \\in G}
          \\|R^\\top A_i - A_{\\mathrm{ref}}\\|_F = U V^\\top,
        \\qquad A_i A_{\\mathrm{ref}}^\\top = U \\Sigma V^\\top,

    over ``G = O(r)`` or ``G = SO(r)`` (then the sign of the last singular pair
    is flipped when ``det(U V^T) < 0``, the Kabsch fix). Aligning on ``B``
    minimises ``||B_i R - B_ref||_F`` and uses the SVD of ``B_i^T B_ref``. The
    strength ``λ`` has the semantics of the official ``rotate_lambda``:

    * ``λ > 1`` (default 1.5, the authors' default): the hard solution over
      ``O(r)``, reflections allowed (official ``rotation_alignment``); every
      ``λ > 1`` gives the same rotation.
    * ``λ = 1``: the hard solution over ``SO(r)`` (rotation only).
    * ``λ < 1``: the polar factor of the interpolation with the ``SO(r)``
      solution (official ``rotation_alignment_soft``); ``λ = 0`` is no rotation
      (plain FedIT):

    .. math::

        R_i = \\operatorname{polar}\\big((1 - λ) I + λ R_i^\\star\\big).

    ``allow_reflection`` overrides the group: ``None`` (default) is the official
    choice above; ``True`` takes ``R_i^*`` over ``O(r)`` at every ``λ``;
    ``False`` over ``SO(r)`` at every ``λ`` (then ``λ > 1`` equals ``λ = 1``; this
    was the default before the official code was ported). In the paper's
    λ-sensitivity figure ``λ = 1`` is the worst point on all three tasks (RTE is
    best near 0.4, SST-2 at 0.6, QNLI at 0–0.2); when clients differ by sign
    flips of latent directions only ``O(r)`` can undo them.

    Returns ``A_i' = R_i^T A_i``, ``B_i' = B_i R_i``, so ``B_i' A_i' = B_i A_i``
    up to rounding. When the cross term ``A_i A_ref^T`` (or ``B_i^T B_ref``) is
    zero every rotation is optimal and ``R_i = I`` (the official code takes
    whatever its SVD returns); when it is rank deficient the optimum is not
    unique and the SVD picks one of them.

    ``strength`` is traced (``vmap`` over a grid of strengths); ``factor`` and
    ``allow_reflection`` are static. Align a batch of modules with ``jax.vmap``.

    Args:
      A: ``(n, r, q)`` clients' ``A`` factors.
      B: ``(n, p, r)`` clients' ``B`` factors.
      A_ref: ``(r, q)`` reference ``A`` (the broadcast global factor); needed
        when ``factor="A"``, otherwise unused and may be ``None``.
      B_ref: ``(p, r)`` reference ``B``; needed when ``factor="B"``, otherwise
        unused and may be ``None``.
      strength: alignment strength ``λ >= 0`` (the official ``rotate_lambda``):
        ``> 1`` hard over ``O(r)``, ``1`` hard over ``SO(r)``, ``< 1`` soft.
      factor: ``"A"`` or ``"B"``, the factor aligned to its reference.
      allow_reflection: ``None`` for the official group (``O(r)`` when
        ``λ > 1``, else ``SO(r)``); ``True`` for ``O(r)`` and ``False`` for
        ``SO(r)`` at every ``λ``. With ``r = 1`` the only rotation is ``1``, so
        alignment needs ``O(r)`` to flip signs.

    Returns:
      ``(A', B')`` with the shapes and dtype of ``(A, B)``.

    Raises:
      ValueError: shapes that do not fit together (e.g. different ranks), a
        missing reference, ``strength`` negative, not finite or not a scalar,
        unknown ``factor``, NaN or inf in the factors. A traced ``strength``
        out of range (or traced factors with NaN/inf) raises at run time with
        the same message.
      TypeError: non-numeric arrays, or ``allow_reflection`` not a bool or None.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import clair_jax as cj
      >>> kb, ka, kr = jax.random.split(jax.random.key(0), 3)
      >>> b, a = jax.random.normal(kb, (6, 2)), jax.random.normal(ka, (2, 5))
      >>> rot = jnp.linalg.qr(jax.random.normal(kr, (3, 2, 2)))[0]
      >>> B = b @ rot                                # one update, three bases
      >>> A = jnp.swapaxes(rot, 1, 2) @ a
      >>> A2, B2 = cj.fedrot_align(A, B, a, b, strength=1.0, factor="A")
      >>> float(cj.aggregation_error(A, B)) > 1.0
      True
      >>> float(cj.aggregation_error(A2, B2)) < 1e-4
      True

    References:
      FedRot-LoRA: Mitigating Rotational Misalignment in Federated LoRA,
      arXiv:2602.23638.
      P. H. Schönemann, "A generalized solution of the orthogonal Procrustes
      problem", Psychometrika 31, 1966.
      W. Kabsch, "A solution for the best rotation to relate two sets of
      vectors", Acta Cryst. A32, 1976.
    """
    validation.check_choice(factor, "factor", FACTORS)
    a, b, a_ref, b_ref = lora_types.check_factors(A, B, A_ref, B_ref, factor)
    lam = check_strength(strength, a.dtype)
    allow_reflection = check_reflection(allow_reflection)
    rot = alignment_rotations(a, b, a_ref, b_ref, lam, factor, allow_reflection)
    a2 = jnp.einsum("nsr,nsq->nrq", rot, a, precision=_HIGHEST)
    b2 = jnp.einsum("nps,nsr->npr", b, rot, precision=_HIGHEST)
    return a2, b2


def aggregation_error(
    A: Float[ArrayLike, "n r q"],
    B: Float[ArrayLike, "n p r"],
    weights: Float[ArrayLike, " n"] | None = None,
    *,
    A_global: Float[ArrayLike, "r q"] | None = None,
    B_global: Float[ArrayLike, "p r"] | None = None,
) -> Float[Array, ""]:
    """Aggregation error of factor-wise averaging, ``||Σ p_i B_i A_i - B̄ Ā||_F``.

    .. math::

        \\Big\\|\\sum_i p_i B_i A_i - \\bar B \\bar A\\Big\\|_F,
        \\qquad p_i = w_i / \\textstyle\\sum_j w_j,

    with ``B̄ = Σ p_i B_i`` and ``Ā = Σ p_i A_i`` unless the server's global
    factors are given (then the error of that global adapter against the exact
    weighted average of the clients' products).

    Args:
      A: ``(n, r, q)`` clients' ``A`` factors.
      B: ``(n, p, r)`` clients' ``B`` factors.
      weights: ``(n,)`` non-negative client weights, not all zero (default equal).
      A_global: ``(r, q)`` global ``A`` (default ``Σ p_i A_i``).
      B_global: ``(p, r)`` global ``B`` (default ``Σ p_i B_i``).

    Returns:
      The Frobenius norm, a scalar.

    Examples:
      >>> import jax.numpy as jnp
      >>> import clair_jax as cj
      >>> B = jnp.array([[[1.0]], [[-1.0]]])      # p = r = q = 1
      >>> A = jnp.array([[[1.0]], [[-1.0]]])      # both clients' update is +1
      >>> cj.aggregation_error(A, B)              # but the factor means are 0
      Array(1., dtype=float32)
    """
    a, b, a_glob, b_glob = lora_types.check_factors(A, B, A_global, B_global, None, "_global")
    p = lora_types.check_weights(weights, a.shape[0], a.dtype)
    if a_glob is None:
        a_glob = jnp.einsum("n,nrq->rq", p, a, precision=_HIGHEST)
    if b_glob is None:
        b_glob = jnp.einsum("n,npr->pr", p, b, precision=_HIGHEST)
    return product_error(a, b, p, a_glob, b_glob)


def product_error(a, b, p, a_glob, b_glob) -> Array:
    """``||Σ p_i B_i A_i - B_g A_g||_F`` without argument checks (``p`` normalised).

    Args:
      a: ``(n, r, q)`` clients' ``A``.
      b: ``(n, p, r)`` clients' ``B``.
      p: ``(n,)`` weights summing to one.
      a_glob: ``(r, q)`` global ``A``.
      b_glob: ``(p, r)`` global ``B``.

    Returns:
      The Frobenius norm, a scalar in the working dtype (at least float32).
    """
    work = validation.working_dtype(jnp.result_type(p, b, a, b_glob, a_glob))
    p, b, a, b_glob, a_glob = (x.astype(work) for x in (p, b, a, b_glob, a_glob))
    exact = jnp.einsum("n,npr,nrq->pq", p, b, a, precision=_HIGHEST)
    approx = jnp.matmul(b_glob, a_glob, precision=_HIGHEST)
    return jnp.linalg.norm(exact - approx)


def check_strength(strength, dtype) -> Array:
    """A finite scalar strength ``>= 0`` (checked now, or at run time when traced).

    Args:
      strength: the alignment strength.
      dtype: its dtype.

    Returns:
      ``strength`` as a scalar array.

    Raises:
      ValueError: not a scalar, negative or not finite.
      TypeError: non-numeric.
    """
    lam = validation.as_float_array(strength, "strength", dtype)
    validation.check_scalar(lam, "strength")
    bad = ~((lam >= 0) & jnp.isfinite(lam))
    msg = "strength must be finite and >= 0 (> 1: hard over O(r), as the official default 1.5)"
    if validation.is_traced(lam):
        return eqx.error_if(lam, bad, msg + ".")
    if bool(bad):
        raise ValueError(f"{msg}, got {float(lam)!r}.")
    return lam


def check_reflection(allow_reflection) -> bool | None:
    """``None`` (the official choice by strength) or a static bool."""
    if allow_reflection is None:
        return None
    return validation.check_bool(allow_reflection, "allow_reflection")
