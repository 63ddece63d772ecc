"""Robust consensus: the shared directions of a majority, and detection inside the subspace.

Two rules of :func:`clair_jax.clair` with ``consensus="robust"`` (the default):

* **Shared directions** (:func:`shared_directions`). The rank rule keeps the
  singular directions of ``Z = [Z_1 .. Z_n]`` with ``s_j > λ_*``: a measure of
  energy, which a small coordinated group sending large updates in its own
  subspace passes, so that its directions join ``Û`` and its off-subspace
  scores stay small. The robust rule counts, inside that span, how many
  clients carry each direction: each client votes with the projector ``P_i``
  onto its own significant directions (singular values of its coordinates
  above the rank rule's per-client threshold ``λ_* / sqrt(n)``), and the
  eigenvalues of ``mean_i P_i`` are the fractions of the clients carrying its
  eigenvectors (when the clients' subspaces are nested or orthogonal). The
  directions carried by more than ``MINORITY = 2.5`` clients' worth but at
  most half of the clients (``MAJORITY``) are a coordinated minority's and
  are left out of ``Û``; the group is then flagged by its off-subspace
  scores. Each client has one vote whatever its size. Directions of one or
  two clients stay, as with the plain rule (a smaller group inside ``Û`` has
  coordinates far from the benign clients' and is flagged by the detection
  inside the subspace), and when no direction is carried
  by a majority (benign clients each spanning part of the subspace, ``q < r``;
  most clients sending nothing) the plain span is kept.
* **Detection inside the subspace** (:func:`inside_scores`). Attackers whose
  updates lie inside the shared subspace (a coordinated ``-3x`` the benign
  update, a scaled copy) have small off-subspace scores. Their coordinates
  ``C_i = Û^T (X_i - c)`` (``r x q``) are far from the benign clients' instead:
  client ``i`` scores ``e_i = ||C_i - m||_F`` with ``m`` the geometric median
  of the collaborative clients' coordinates (:func:`geometric_median`,
  breakdown point 1/2), and is flagged when ``log e_i`` exceeds the median
  of the collaborative clients' log scores by ``INSIDE_Z = 5`` robust
  spreads (:func:`inside_threshold`). Clients whose
  in-subspace coefficients legitimately differ (benign heterogeneity) spread
  the scores and raise the threshold with them; only the outliers of that
  spread are flagged.

References:
  E. Weiszfeld, "Sur le point pour lequel la somme des distances de n points
  donnés est minimum", Tôhoku Math. J. 43, 1937.
  K. Pillutla, S. M. Kakade, Z. Harchaoui, "Robust Aggregation for Federated
  Learning", IEEE Trans. Signal Process. 70, 2022, arXiv:1912.13445.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array

from clair_jax._src.clair.detection import THRESHOLD_ITERS
from clair_jax._src.clair.noise import masked_median
from clair_jax._src.linalg.svd import symmetric_eigh

#: Robust z-score of the threshold inside the subspace, on the log scores (wider than
#: the off-subspace one: benign clients differ legitimately inside the subspace, and
#: few clients give a noisy MAD).
INSIDE_Z = 5.0

#: Smallest spread of the log scores inside the subspace: with ``INSIDE_Z`` a flag
#: needs at least ``exp(0.5) = 1.65`` times the typical score.
LOG_SPREAD = 0.1

#: A direction is shared when more than this fraction of the clients carry it.
MAJORITY = 0.5

#: Directions at most this many clients' worth carry (a client's own directions, or
#: two benign clients' that happen to meet) stay, as with the plain rule; smaller
#: coordinated groups are left to the detection inside the subspace.
MINORITY = 2.5

#: A client carries a direction when its energy along it exceeds this multiple of
#: the rank rule's per-client threshold ``λ_*^2 / n``.
VOTE_FACTOR = 1.0

#: Weiszfeld iterations of the geometric median of the coordinates.
WEISZFELD_ITERS = 64

#: Smoothing of the Weiszfeld weights, relative to the median distance to the start.
WEISZFELD_NU = 1e-6

#: Columns the shared-direction vote runs on when the plain rank fits in them (of
#: ``width >= 2 VOTE_WIDTH``): its eigenproblems are ``width x width``.
VOTE_WIDTH = 64

#: Choices of ``consensus=``: both robust rules, the shared-direction rule alone
#: (for coordinates in per-client frames, which detect inside the subspace in a
#: common frame themselves), and the plain rules.
CONSENSUS_CHOICES = ("robust", "rank", "mean")


def shared_directions(
    u: Array, s: Array, blocks: Array, members: Array, lam: Array, width: int, robust: bool
) -> tuple[Array, Array]:
    """The shared basis (columns, zero-padded to ``width``) and its rank.

    The plain rule keeps the leading columns ``u_j`` with ``s_j > λ``. With
    ``robust``, client ``i``'s directions are the eigenvectors of
    ``Y_i Y_i^T`` (``Y_i = Ũ^T B_i``, ``Ũ`` the plain span) with eigenvalues
    above ``VOTE_FACTOR λ^2 / |members|`` and above ``10 max(width, q) eps``
    times the client's largest (rounding), ``P_i`` their projector; the
    eigenvectors of ``P̄ = mean_{i ∈ members} P_i`` with eigenvalue in
    ``(MINORITY / |members|, MAJORITY]`` are removed from ``Ũ``, and the rest
    re-ordered by the members' energy along them. Without a direction of
    eigenvalue above ``MAJORITY`` the plain span is kept.

    Args:
      u: ``(p, width)`` left singular vectors of the blocks (descending ``s``).
      s: singular values (descending, at least ``width`` of them).
      blocks: ``(n, p, q)`` the blocks ``u`` and ``s`` came from.
      members: ``(n,)`` bool, the clients that vote.
      lam: the threshold ``λ`` on the singular values.
      width: columns of ``u`` (static).
      robust: whether to narrow the span to majority directions (static).

    Returns:
      ``(basis, rank)``: ``(p, width)`` columns, the first ``rank`` spanning the
      shared subspace (the caller masks the rest), and the int32 rank.
    """
    keep = s[:width] > lam
    rank = jnp.sum(keep).astype(jnp.int32)
    if not robust:
        return u, rank

    def vote(cols: int):
        # Columns from the rank on are masked out: when the rank fits in the first
        # ``cols``, the vote on them alone gives the same basis (zero-padded).
        ordered, narrowed, votes = _majority_span(
            u[:, :cols], keep[:cols], blocks, members, lam, max(width, blocks.shape[2])
        )
        ordered = jnp.pad(ordered, ((0, 0), (0, width - cols)))
        return jnp.where(votes, ordered, u), jnp.where(votes, narrowed, rank)

    return on_narrowest(rank, (VOTE_WIDTH,) if width >= 2 * VOTE_WIDTH else (), width, vote)


def on_narrowest(rank: Array, widths, full: int, fn):
    """``fn(w)`` for the smallest static ``w`` among ``widths`` with ``rank <= w``, else
    ``fn(full)``: a ladder of ``jax.lax.cond``'s, one compiled branch per width.

    For computations on the leading columns of a basis whose columns from ``rank`` on
    are zero, where the narrower computation gives the same result for less.

    Args:
      rank: int scalar (may be traced).
      widths: static ints; those outside ``(0, full)`` are ignored.
      full: the static width used when no width holds the rank.
      fn: ``w -> pytree`` of arrays whose shapes do not depend on ``w``.

    Returns:
      ``fn``'s output at the width chosen.
    """
    ladder = sorted({int(w) for w in widths if 0 < int(w) < full})

    def level(i: int):
        if i == len(ladder):
            return fn(full)
        return jax.lax.cond(rank <= ladder[i], lambda: fn(ladder[i]), lambda: level(i + 1))

    return level(0)


def _majority_span(u, keep, blocks, members, lam, size) -> tuple[Array, Array, Array]:
    """``(ordered, narrowed rank, votes)`` of :func:`shared_directions`' robust rule on the
    columns of ``u`` (``keep`` marks the plain span); ``size`` sets the rounding floor."""
    width = u.shape[1]
    rank = jnp.sum(keep).astype(jnp.int32)
    masked = u * keep[None, :]
    count = jnp.maximum(jnp.sum(members), 1).astype(u.dtype)
    y = jnp.einsum("pk,npq->nkq", masked, blocks)
    q = blocks.shape[2]
    if q < width:  # the smaller Gram matrix: right singular vectors, then the left ones
        evals, right = jax.vmap(symmetric_eigh)(jnp.einsum("nkq,nkj->nqj", y, y))  # ascending
        safe = jnp.sqrt(jnp.where(evals > 0, evals, 1.0))
        evecs = jnp.einsum("nkq,nqd->nkd", y, right) / safe[:, None, :]
    else:
        evals, evecs = jax.vmap(symmetric_eigh)(jnp.einsum("nkq,njq->nkj", y, y))  # ascending
    # Rounding leaves eigenvalues of order eps * width * the largest: not a direction.
    rounding = 10.0 * size * jnp.finfo(u.dtype).eps * evals[:, -1:]
    own = (evals > jnp.maximum(VOTE_FACTOR * lam**2 / count, rounding)) & members[:, None]
    mean_proj = jnp.einsum("nkd,nd,njd->kj", evecs, own.astype(u.dtype), evecs) / count
    share, dirs = symmetric_eigh(mean_proj)
    # Left out: directions more than MINORITY clients but at most half of them carry.
    drop = (share > MINORITY / count) & (share <= MAJORITY)
    dropped = dirs * drop[None, :]
    kept = masked - jnp.matmul(jnp.matmul(masked, dropped), dropped.T)
    # Order the kept directions by the members' energy along them (SVD order).
    c = jnp.einsum("pk,npq->nkq", kept, blocks * members[:, None, None])
    energy, rot = symmetric_eigh(jnp.einsum("nkq,njq->kj", c, c))
    ordered = jnp.matmul(kept, rot[:, ::-1])
    votes = jnp.any(share > MAJORITY)
    return ordered, (rank - jnp.sum(drop)).astype(jnp.int32), votes


def geometric_median(points: Array, members: Array, iters: int = WEISZFELD_ITERS) -> Array:
    """Geometric median of the ``members``' rows of ``points`` by smoothed Weiszfeld.

    Minimises ``Σ_{i ∈ members} ||z - x_i||_2`` over ``z``: starting from the
    coordinate-wise median, ``z ← Σ w_i x_i / Σ w_i`` with
    ``w_i = 1 / max(||z - x_i||, ν)`` (``ν = WEISZFELD_NU`` times the median
    distance to the start), ``iters`` times.

    Args:
      points: ``(n, d)`` points.
      members: ``(n,)`` bool (all clients when none).
      iters: Weiszfeld iterations (static).

    Returns:
      The ``(d,)`` geometric median.
    """
    members = jnp.where(jnp.any(members), members, True)
    start = masked_column_median(points, members)
    dist0 = jnp.linalg.norm(points - start[None], axis=1)
    typical = jnp.nanmedian(jnp.where(members, dist0, jnp.nan))
    nu = jnp.maximum(WEISZFELD_NU * typical, jnp.finfo(points.dtype).tiny)

    def step(_, z):
        dist = jnp.linalg.norm(points - z[None], axis=1)
        w = jnp.where(members, nu / jnp.maximum(dist, nu), 0.0)  # in (0, 1]: no overflow
        return jnp.einsum("n,nd->d", w, points) / jnp.sum(w)

    return jax.lax.fori_loop(0, iters, step, start)


def masked_column_median(points: Array, members: Array) -> Array:
    """``(d,)`` median of each column of ``points`` over the ``members``' rows.

    The value of ``jnp.nanmedian`` with the non-members' rows set to NaN (the mean of
    the two middle values for an even count), from the ``n // 2 + 1`` smallest
    entries of each column (``jax.lax.top_k``) instead of a sort of the whole column.

    Args:
      points: ``(n, d)`` finite points.
      members: ``(n,)`` bool with at least one True.

    Returns:
      The ``(d,)`` coordinate-wise median.
    """
    n = points.shape[0]
    count = jnp.sum(members).astype(jnp.int32)
    masked = jnp.where(members[:, None], points, jnp.inf)
    smallest = -jax.lax.top_k(-masked.T, n // 2 + 1)[0]  # (d, n // 2 + 1), ascending
    low = smallest[:, (count - 1) // 2]
    high = smallest[:, count // 2]
    return jnp.where(count % 2 == 1, low, low * 0.5 + high * 0.5)


def inside_scores(coords: Array, members: Array) -> Array:
    """``(n,)`` ``e_i = ||C_i - m||_F``, ``m`` the members' geometric median of ``coords``."""
    flat = coords.reshape(coords.shape[0], -1)
    center = geometric_median(flat, members)
    return jnp.linalg.norm(flat - center[None], axis=1)


def inside_detection(coords: Array, members: Array) -> tuple[Array, Array, Array]:
    """Detection inside the subspace (module docstring).

    Args:
      coords: ``(n, k, m)`` clients' coordinates in the shared subspace, in one
        common frame.
      members: ``(n,)`` bool, the clients collaborative so far.

    Returns:
      ``(inliers, scores, threshold)``: ``(n,)`` bool ``e_i <= τ_in`` (a
      non-member may be an inlier: the caller intersects with ``members``), the
      ``(n,)`` scores ``e_i`` and ``τ_in``.
    """
    scores = inside_scores(coords, members)
    tau = inside_threshold(scores, members)
    return scores <= tau, scores, tau


def inside_threshold(scores: Array, members: Array, iters: int = THRESHOLD_ITERS) -> Array:
    """``τ_in = exp(m + z max(1.4826 MAD, ρ))`` on the members' log scores ``log e_i``.

    ``m`` and ``MAD`` are the median and median absolute deviation of
    ``log e_i`` over a benign set that starts as the lower half of the members'
    scores and is re-estimated as ``{i ∈ members : e_i <= τ_in}`` for ``iters``
    rounds (as :func:`~clair_jax._src.clair.detection.detection_threshold`);
    ``z = INSIDE_Z``, ``ρ = LOG_SPREAD``. On the log scale the threshold is a
    ratio to the typical score: in-subspace distances of heterogeneous benign
    clients are skewed (products of coefficients), and a flag needs a score at
    least ``exp(z ρ)`` times the typical one.

    Args:
      scores: ``(n,)`` scores ``e_i >= 0``.
      members: ``(n,)`` bool, the clients the statistics run over.
      iters: rounds of the benign set (static).

    Returns:
      The threshold ``τ_in``, a scalar (``inf`` without members).
    """
    logs = jnp.log(jnp.maximum(scores, jnp.finfo(scores.dtype).tiny))

    def tau_of(keep):
        center = masked_median(logs, keep)
        mad = 1.4826 * masked_median(jnp.abs(logs - center), keep)
        return center + INSIDE_Z * jnp.maximum(mad, LOG_SPREAD)

    keep = members & (logs <= masked_median(logs, members))
    keep = jax.lax.fori_loop(0, iters - 1, lambda _, k: members & (logs <= tau_of(k)), keep)
    return jnp.where(jnp.any(members), jnp.exp(tau_of(keep)), jnp.inf).astype(scores.dtype)
