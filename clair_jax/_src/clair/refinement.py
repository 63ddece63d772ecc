"""Shared-subspace fits and the refinement of clients' estimates onto the subspace."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float

from clair_jax._src.clair.base import Config
from clair_jax._src.clair.consensus import shared_directions
from clair_jax._src.clair.detection import off_subspace
from clair_jax._src.clair.noise import (
    LAM_NUC_FACTOR,
    noise_scale_from_spectrum,
    spectral_noise_scale,
)
from clair_jax._src.linalg import prox
from clair_jax._src.linalg import svd as svd_lib
from clair_jax._src.solvers.decomposition import Decomposition

#: σ̂ re-estimations of the refit on the flagged majority (step 6).
MAJORITY_PASSES = 3


def refine(
    x: Float[Array, "n p q"], basis: Float[Array, "p k"], collaborative: Bool[Array, " n"]
) -> tuple[Float[Array, "p q"], Float[Array, "n p q"]]:
    """CLAIR's refinement ``X̃_i = X̄_Ĉ + P_Û (X_i - X̄_Ĉ)`` (step 5 of CLAIR).

    Args:
      x: ``(n, p, q)`` the clients' estimates ``X_i``.
      basis: ``(p, k)`` orthonormal columns (zero columns allowed) spanning ``Û``.
      collaborative: ``(n,)`` bool, the set ``Ĉ``.

    Returns:
      ``(consensus, refined)``: ``X̄_Ĉ``, the mean of the collaborative clients'
      estimates (of all clients when ``Ĉ`` is empty), and the ``(n, p, q)``
      refined estimates.
    """
    weight = collaborative.astype(x.dtype)
    count = jnp.sum(weight)
    consensus = jnp.where(
        count > 0,
        jnp.einsum("n,npq->pq", weight, x) / jnp.maximum(count, 1.0),
        jnp.mean(x, axis=0),
    )
    inside = jnp.einsum("pk,nkq->npq", basis, jnp.einsum("pk,npq->nkq", basis, x - consensus[None]))
    return consensus, consensus[None] + inside


def top_basis(blocks: Array, width: int) -> tuple[Array, Array]:
    """Left singular vectors (first ``width``) and singular values of ``[B_1 .. B_n]``."""
    u, s, _ = svd_lib.thin_svd(prox.blocks_to_matrix(blocks))
    return u[:, :width], s


def masked_basis(u: Array, rank: Array) -> Array:
    """``u`` with the columns from ``rank`` on zeroed (a static shape for a traced rank)."""
    return u * (jnp.arange(u.shape[1]) < rank)[None, :]


class Fit(NamedTuple):
    """A shared-subspace fit.

    Attributes:
      rank: int32 scalar, the rank used.
      basis: ``(p, width)`` basis, zero columns from ``rank`` on.
      center: ``(p, q)`` offset estimate (zero without an offset).
      scores: ``(n,)`` off-subspace residual norms ``d_i``.
    """

    rank: Array
    basis: Array
    center: Array
    scores: Array


def fit_from_decomposition(cfg: Config, x, sol: Decomposition, lam_nuc, width) -> Fit:
    """Rank, (masked) basis and offset of one decomposition, and the scores."""
    center = sol.offset if cfg.offset else jnp.zeros_like(x[0])
    blocks = x - center[None] - sol.sparse
    u, s = top_basis(blocks, width)
    if cfg.rank is None:
        members = jnp.ones((x.shape[0],), bool)
        u, rank = shared_directions(u, s, blocks, members, lam_nuc, width, robust_rank(cfg))
    else:
        rank = jnp.asarray(cfg.rank, jnp.int32)
    basis = masked_basis(u, rank)
    return Fit(rank, basis, center, prox.block_norms(off_subspace(x, center, basis)))


def robust_rank(cfg: Config) -> bool:
    """Whether the rank rule asks for the median client too (``consensus`` not ``"mean"``)."""
    return cfg.consensus != "mean"


def members_center(cfg: Config, x, weight) -> Array:
    """The offset estimate: the members' mean update (``weight`` 0/1), zero without offset."""
    if not cfg.offset:
        return jnp.zeros_like(x[0])
    return jnp.einsum("n,npq->pq", weight, x) / jnp.maximum(jnp.sum(weight), 1.0)


def refit_subspace(cfg: Config, x, rank, collaborative, width) -> Fit:
    """Basis (and offset) from the collaborative clients' updates alone, unshrunk."""
    weight = collaborative.astype(x.dtype)
    center = members_center(cfg, x, weight)
    u, _ = top_basis((x - center[None]) * weight[:, None, None], width)
    basis = masked_basis(u, rank)
    return Fit(rank, basis, center, prox.block_norms(off_subspace(x, center, basis)))


def residual_noise(cfg: Config, x, fit: Fit, collaborative, floor) -> Array:
    """``σ̂`` from the off-subspace residuals of the collaborative clients (Gavish–Donoho)."""
    n, p, q = x.shape
    weight = collaborative.astype(x.dtype)
    count = jnp.sum(weight)
    blocks = off_subspace(x, fit.center, fit.basis) * weight[:, None, None]
    sigma = spectral_noise_scale(blocks, p - fit.rank, count * q)
    if cfg.offset:  # the offset is a mean over the clients: variance factor 1 - 1/count
        sigma = sigma / jnp.sqrt(jnp.maximum(1.0 - 1.0 / jnp.maximum(count, 2.0), 0.5))
    return jnp.maximum(sigma, floor)


def majority_fit(cfg: Config, x, members, width, floor, given_sigma, detect):
    """Subspace, ``σ̂`` and collaborative set refitted on ``members`` alone (step 6).

    A plain (unshrunk) fit, as :func:`refit_subspace`, with the rank chosen by the rule
    of steps 1-3 on the members' matrix ``[X_j - c]_{j ∈ members}``: singular
    values above ``λ_* = 2 σ̂ (sqrt(p) + sqrt(|members| q))`` (and carried by
    the median member, :func:`~clair_jax._src.clair.consensus.shared_directions`,
    unless ``consensus="mean"``), ``σ̂`` started
    from its Marchenko–Pastur median and re-estimated ``MAJORITY_PASSES``
    times from the off-subspace residuals (``given_sigma`` instead when the
    noise level is given).

    Args:
      cfg: the static configuration.
      x: ``(n, p, q)`` client blocks.
      members: ``(n,)`` bool, the clients to fit.
      width: columns of the basis (static).
      floor: the noise floor.
      given_sigma: the given noise level (used when ``cfg.given_noise``).
      detect: ``(scores, σ̂) -> (collaborative, τ)``.

    Returns:
      ``(fit, σ̂, Ĉ, τ)``, ``Ĉ`` and ``τ`` from ``detect``.
    """
    n, p, q = x.shape
    weight = members.astype(x.dtype)
    count = jnp.sum(weight)
    center = members_center(cfg, x, weight)
    blocks = (x - center[None]) * weight[:, None, None]
    u, s = top_basis(blocks, width)
    if cfg.given_noise:
        sigma0 = given_sigma
    else:
        sigma0 = jnp.maximum(noise_scale_from_spectrum(s, p, count * q), floor)

    def fit_at(sigma):
        if cfg.rank is None:
            lam = LAM_NUC_FACTOR * sigma * (float(np.sqrt(p)) + jnp.sqrt(count * q))
            kept, rank = shared_directions(u, s, blocks, members, lam, width, robust_rank(cfg))
        else:
            kept, rank = u, jnp.asarray(cfg.rank, jnp.int32)
        basis = masked_basis(kept, rank)
        return Fit(rank, basis, center, prox.block_norms(off_subspace(x, center, basis)))

    def one(_, sigma):
        return residual_noise(cfg, x, fit_at(sigma), members, floor)

    sigma = sigma0 if cfg.given_noise else jax.lax.fori_loop(0, MAJORITY_PASSES, one, sigma0)
    fit = fit_at(sigma)
    collaborative, tau = detect(fit.scores, sigma)
    return fit, sigma, collaborative, tau
