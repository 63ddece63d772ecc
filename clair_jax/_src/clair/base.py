"""Result and static configuration of :func:`clair_jax.clair`."""

from __future__ import annotations

from typing import NamedTuple

from jaxtyping import Array, Bool, Float, Int

from clair_jax._src.solvers.decomposition import Decomposition


class ClairResult(NamedTuple):
    """Output of :func:`clair`.

    Attributes:
      basis: ``(p, k)`` orthonormal basis ``Û`` of the shared column space in its
        first ``rank`` columns, zero columns after them (``k = rank`` when the
        rank is given, ``max_rank`` otherwise).
      rank: int32, the rank ``r̂`` used.
      collaborative: ``(n,)`` bool, the estimated benign set ``Ĉ``.
      refined: ``(n, p, q)`` refined per-client estimates ``X̃_i``.
      consensus: ``(p, q)`` mean update of the collaborative clients ``X̄_Ĉ``.
      scores: ``(n,)`` detection scores ``d_i = ||(I - Û Û^T)(X_i - c)||_F``
        (``inf`` for a client screened out for its size, step 0).
      threshold: the threshold ``τ`` applied to ``scores``.
      noise_scale: ``σ̂``: the given ``noise_scale``, or the final estimate
        (with ``refit=True`` from the collaborative clients' residuals about the
        refitted subspace, otherwise the one the last decomposition's λ's were
        set from), raised to the noise floor when below it.
      lam_nuc: ``λ_*`` used in the decomposition.
      lam_block: ``λ_S`` used in the decomposition.
      block_norms: ``(n,)`` ``||Ŝ_i||_F`` of the decomposition (non-zero = the
        decomposition's own flag, before the refit and the threshold ``τ``).
      decomposition: the :class:`~clair_jax.Decomposition` of the last pass.
      majority_refit: bool, True when detection left fewer than half of the
        clients collaborative and the result comes from the refit on the flagged
        majority instead (``benign_majority=True``, step 6). ``decomposition``,
        ``block_norms`` and the λ's are then still those of the decomposition.
      inside_scores: ``(n,)`` scores inside the subspace ``e_i = ||C_i - m||_F``,
        ``C_i = Û^T (X_i - c)`` and ``m`` the geometric median of the
        collaborative clients' ``C_i`` (``consensus="robust"``; zero otherwise,
        ``inf`` for a screened client).
      inside_threshold: the threshold ``τ_in`` on ``inside_scores`` (``inf``
        unless ``consensus="robust"``).
    """

    basis: Float[Array, "p k"]
    rank: Int[Array, ""]
    collaborative: Bool[Array, " n"]
    refined: Float[Array, "n p q"]
    consensus: Float[Array, "p q"]
    scores: Float[Array, " n"]
    threshold: Float[Array, ""]
    noise_scale: Float[Array, ""]
    lam_nuc: Float[Array, ""]
    lam_block: Float[Array, ""]
    block_norms: Float[Array, " n"]
    decomposition: Decomposition
    majority_refit: Bool[Array, ""]
    inside_scores: Float[Array, " n"]
    inside_threshold: Float[Array, ""]


class Config(NamedTuple):
    """Static configuration of :func:`clair` (hashable: a ``jax.jit`` static argument).

    Attributes:
      rank: the given rank, or None to estimate it.
      max_rank: columns of the basis when the rank is estimated.
      offset: whether the updates share a common offset.
      refit: whether to refit the basis on the collaborative set.
      noise_passes: passes that re-estimate ``σ̂`` before the final one.
      given_noise: whether ``noise_scale`` was given.
      benign_majority: whether to refit on a flagged majority.
      solver: ``(key, value)`` pairs passed on to :func:`clair_jax.decompose`.
      consensus: ``"robust"``, ``"rank"`` or ``"mean"`` (see :func:`clair_jax.clair`).
    """

    rank: int | None
    max_rank: int
    offset: bool
    refit: bool
    noise_passes: int
    given_noise: bool
    benign_majority: bool
    solver: tuple
    consensus: str = "rank"
