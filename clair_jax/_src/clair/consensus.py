"""Robust consensus: the shared directions of a majority, and detection inside the subspace.

Two rules of :func:`clair_jax.clair` with ``consensus="robust"`` (the default):

* **Shared directions** (:func:`shared_directions`). Today's rank rule keeps the
  singular directions ``u_j`` of ``Z = [Z_1 .. Z_n]`` with ``s_j > λ_*``, i.e.
  ``mean_i E_ij > λ_*^2 / n`` with ``E_ij = ||u_j^T Z_i||^2`` the energy of
  client ``i`` along ``u_j`` (``s_j^2 = Σ_i E_ij``). A small coordinated group
  sending updates in its own subspace passes this test (its energy is large)
  and is absorbed into the shared subspace. The robust rule also asks the
  *median* client to carry the direction: ``median_i E_ij > λ_*^2 / n``. A
  direction carried by fewer than half of the clients has a median energy at
  the noise level and is left out, so the group's updates fall outside ``Û``
  and their off-subspace scores flag them.
* **Detection inside the subspace** (:func:`inside_scores`). Attackers whose
  updates lie inside the shared subspace (a coordinated ``-3x`` the benign
  update, a scaled copy) have small off-subspace scores. Their coordinates
  ``C_i = Û^T (X_i - c)`` (``r x q``) are far from the benign clients' instead:
  client ``i`` scores ``e_i = ||C_i - m||_F`` with ``m`` the geometric median
  of the collaborative clients' coordinates (:func:`geometric_median`,
  breakdown point 1/2), and is flagged when ``e_i`` exceeds the robust
  threshold of :func:`~clair_jax._src.clair.detection.detection_threshold`
  (median + 3.5 robust spreads of the collaborative scores). Clients whose
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

from clair_jax._src.clair.detection import detection_threshold

#: Weiszfeld iterations of the geometric median of the coordinates.
WEISZFELD_ITERS = 64

#: Smoothing of the Weiszfeld weights, relative to the median distance to the start.
WEISZFELD_NU = 1e-6

#: Choices of ``consensus=``: both robust rules, the shared-direction rule alone
#: (for coordinates in per-client frames, which detect inside the subspace in a
#: common frame themselves), and the plain rules.
CONSENSUS_CHOICES = ("robust", "rank", "mean")


def direction_energies(blocks: Array, u: Array) -> Array:
    """``(n, k)`` energies ``E_ij = ||u_j^T B_i||^2`` of every client along every column."""
    return jnp.sum(jnp.einsum("pk,npq->nkq", u, blocks) ** 2, axis=2)


def shared_directions(
    u: Array, s: Array, blocks: Array, members: Array, lam: Array, width: int, robust: bool
) -> tuple[Array, Array]:
    """Columns of ``u`` kept as shared directions, moved to the front, and their number.

    Direction ``j`` is kept when ``s_j > λ`` and, with ``robust``, when the
    median over ``members`` of ``E_ij`` exceeds ``λ^2 / |members|`` (module
    docstring). Kept columns keep their order; at most ``width`` are kept.

    Args:
      u: ``(p, width)`` left singular vectors of the members' blocks.
      s: singular values (descending, at least ``width`` of them).
      blocks: ``(n, p, q)`` the blocks ``u`` and ``s`` came from.
      members: ``(n,)`` bool, the clients the median runs over.
      lam: the threshold ``λ`` on the singular values.
      width: columns of ``u`` (static).
      robust: whether to ask for the median client too (static).

    Returns:
      ``(u', rank)``: ``u`` with the kept columns first (the caller masks the
      rest) and the int32 number kept.
    """
    keep = s[:width] > lam
    if robust:
        count = jnp.maximum(jnp.sum(members), 1).astype(u.dtype)
        energy = direction_energies(blocks, u)  # (n, width)
        typical = jnp.nanmedian(jnp.where(members[:, None], energy, jnp.nan), axis=0)
        keep = keep & (typical > lam**2 / count)
    order = jnp.argsort(jnp.where(keep, 0, 1), stable=True)
    return u[:, order], jnp.sum(keep).astype(jnp.int32)


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
    start = jnp.nanmedian(jnp.where(members[:, None], points, jnp.nan), axis=0)
    dist0 = jnp.linalg.norm(points - start[None], axis=1)
    typical = jnp.nanmedian(jnp.where(members, dist0, jnp.nan))
    nu = WEISZFELD_NU * jnp.maximum(typical, jnp.finfo(points.dtype).tiny)

    def step(_, z):
        dist = jnp.linalg.norm(points - z[None], axis=1)
        w = jnp.where(members, 1.0 / jnp.maximum(dist, nu), 0.0)
        return jnp.einsum("n,nd->d", w, points) / jnp.sum(w)

    return jax.lax.fori_loop(0, iters, step, start)


def inside_scores(coords: Array, members: Array) -> Array:
    """``(n,)`` ``e_i = ||C_i - m||_F``, ``m`` the members' geometric median of ``coords``."""
    flat = coords.reshape(coords.shape[0], -1)
    center = geometric_median(flat, members)
    return jnp.linalg.norm(flat - center[None], axis=1)


def inside_detection(coords: Array, members: Array, sigma: Array) -> tuple[Array, Array, Array]:
    """Detection inside the subspace (module docstring).

    Args:
      coords: ``(n, k, m)`` clients' coordinates in the shared subspace, in one
        common frame.
      members: ``(n,)`` bool, the clients collaborative so far.
      sigma: the noise level ``σ̂`` (the threshold's spread floor ``σ̂ / sqrt(2)``).

    Returns:
      ``(inliers, scores, threshold)``: ``(n,)`` bool ``e_i <= τ_in`` (a
      non-member may be an inlier: the caller intersects with ``members``), the
      ``(n,)`` scores ``e_i`` and ``τ_in``.
    """
    scores = inside_scores(coords, members)
    tau = detection_threshold(jnp.where(members, scores, jnp.inf), sigma)
    return scores <= tau, scores, tau
