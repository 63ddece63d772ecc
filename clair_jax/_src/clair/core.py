"""The jitted CLAIR passes: decompose, estimate the noise, detect, refit."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from clair_jax._src.clair.base import ClairResult, Config
from clair_jax._src.clair.consensus import inside_detection
from clair_jax._src.clair.detection import detection_threshold
from clair_jax._src.clair.noise import NOISE_FLOOR, client_sizes, lambdas, spectral_noise_scale
from clair_jax._src.clair.refinement import (
    Fit,
    fit_from_decomposition,
    majority_fit,
    refit_subspace,
    residual_noise,
)
from clair_jax._src.linalg import prox
from clair_jax._src.solvers.decompose import decompose
from clair_jax._src.solvers.decomposition import Decomposition

#: The noise passes stop once a pass changes σ̂ by less than this fraction.
NOISE_RTOL = 0.05


class _PassState(NamedTuple):
    """Carry of the noise passes' ``while_loop``."""

    sigma: Array  # σ̂ the pass's λ's were set from
    next_sigma: Array  # σ̂ re-estimated from the pass's residuals
    solution: Decomposition
    lams: tuple[Array, Array]
    fit: Fit
    collaborative: Array
    tau: Array
    count: Array  # passes run


@functools.partial(jax.jit, static_argnums=(0,))
def clair_core(
    cfg: Config, x, lam_nuc, lam_block, threshold, noise_scale, given, screened, typical
) -> ClairResult:
    """Steps 1-4 and 6 of CLAIR on unit-scale updates, jitted (``cfg`` static).

    Args:
      cfg: the static configuration.
      x: ``(n, p, q)`` updates, scaled to unit size, screened clients zeroed.
      lam_nuc: the given ``λ_*`` (used where ``given[0]``).
      lam_block: the given ``λ_S`` (used where ``given[1]``).
      threshold: the given ``τ`` (used where ``given[2]``).
      noise_scale: the given ``σ`` (used when ``cfg.given_noise``).
      given: ``(3,)`` bool, which of ``(λ_*, λ_S, τ)`` were given.
      screened: ``(n,)`` bool, the clients flagged by step 0.
      typical: the typical client size (sets the noise floor).

    Returns:
      A :class:`ClairResult` whose ``refined`` and ``consensus`` are None
      (step 5 is the caller's).
    """
    n, p, q = x.shape
    dtype = x.dtype
    solver = dict(cfg.solver)
    width = cfg.rank if cfg.rank is not None else cfg.max_rank
    # Step 0 (done by the caller, on the unscaled updates): clients far larger than
    # the typical one are flagged outright and fitted as zero blocks of weight zero
    # (they would swamp the float precision of everything below, or overflow it).
    x = jnp.where(screened[:, None, None], 0.0, x).astype(dtype)
    block_weights = jnp.where(screened, 0.0, 1.0).astype(dtype)
    centred = prox.center_clients(x) if cfg.offset else x
    centring = (n - 1) / n if cfg.offset else 1.0
    floor = NOISE_FLOOR * typical

    def solve(sigma, init):
        lams = lambdas(given, sigma, lam_nuc, lam_block, n, p, q)
        sol = decompose(
            x,
            lam_nuc=lams[0],
            lam_block=lams[1],
            offset=cfg.offset,
            weights=block_weights,
            init=init,
            **solver,
        )
        return sol, lams

    def detect(scores, sigma):
        scores = jnp.where(screened, jnp.inf, scores)
        tau = jnp.where(given[2], threshold, detection_threshold(scores, sigma))
        return scores <= tau, tau

    def one_pass(state: _PassState) -> _PassState:
        sigma = state.next_sigma
        sol, lams = solve(sigma, (state.solution.low_rank, state.solution.sparse))
        fit = fit_from_decomposition(cfg, x, sol, lams[0], width)
        collaborative, tau = detect(fit.scores, sigma)
        if cfg.given_noise:
            next_sigma = sigma
        else:
            # The lower half of the scores is benign whenever fewer than half of
            # the clients are contaminated, even while σ (hence τ) is too large.
            lower = collaborative & (fit.scores <= jnp.median(fit.scores))
            next_sigma = residual_noise(cfg, x, fit, lower, floor)
        return _PassState(sigma, next_sigma, sol, lams, fit, collaborative, tau, state.count + 1)

    given_sigma = jnp.maximum(noise_scale, floor)  # used when cfg.given_noise
    if cfg.given_noise:
        sigma = given_sigma
    else:
        sigma = spectral_noise_scale(centred, p, n * q) / float(np.sqrt(centring))
        sigma = jnp.maximum(sigma, floor)
    zeros = jnp.zeros_like(x)
    shapes = jax.eval_shape(lambda: solve(sigma, (zeros, zeros)))
    solution, lams = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    empty_fit = Fit(
        jnp.zeros((), jnp.int32), jnp.zeros((p, width), dtype), zeros[0], jnp.zeros((n,), dtype)
    )
    state = _PassState(
        sigma,
        sigma,
        solution,
        lams,
        empty_fit,
        jnp.zeros((n,), bool),
        jnp.zeros((), dtype),
        jnp.zeros((), jnp.int32),
    )
    # Up to noise_passes decompositions refine σ̂ before the final one (all
    # warm-started); stop as soon as a pass leaves σ̂ within NOISE_RTOL.
    max_passes = 1 if cfg.given_noise else cfg.noise_passes + 1

    def more(state: _PassState):
        moved = jnp.abs(state.next_sigma - state.sigma) > NOISE_RTOL * state.sigma
        return (state.count < 1) | ((state.count < max_passes) & moved)

    state = jax.lax.while_loop(more, one_pass, state)
    sol, fit, collaborative, tau = state.solution, state.fit, state.collaborative, state.tau
    lam_nuc_used, lam_block_used = state.lams
    sigma_hat = state.sigma
    if cfg.refit:
        fit = refit_subspace(cfg, x, fit.rank, collaborative, width)
        if not cfg.given_noise:
            sigma_hat = residual_noise(cfg, x, fit, collaborative, floor)
        collaborative, tau = detect(fit.scores, sigma_hat)

    majority_refit = jnp.zeros((), bool)
    if cfg.benign_majority:
        # Step 6: fewer than half collaborative contradicts the model (a benign
        # majority); refit on the flagged majority and keep that when it is one.
        def swap(_):
            members = ~collaborative & ~screened
            return majority_fit(cfg, x, members, width, floor, given_sigma, detect)

        def keep(_):
            return fit, sigma_hat, collaborative, tau

        minority = 2 * jnp.sum(collaborative) < n
        alt = jax.lax.cond(minority, swap, keep, None)
        majority_refit = minority & (2 * jnp.sum(alt[2]) > n)
        fit, sigma_hat, collaborative, tau = jax.tree.map(
            lambda a, b: jnp.where(majority_refit, a, b), alt, (fit, sigma_hat, collaborative, tau)
        )

    inside_scores = jnp.zeros((n,), dtype)
    inside_tau = jnp.full((), jnp.inf, dtype)
    if cfg.consensus == "robust":
        # Step 4b: detection inside the subspace, on the coordinates Û^T (X_i - c).
        coords = jnp.einsum("pk,npq->nkq", fit.basis, x - fit.center[None])
        # Clients sending nothing (zero updates; with an offset, the common part
        # unchanged) do not vote on the consensus, as they do not set the typical size.
        members = collaborative & ~screened & (client_sizes(x, cfg.offset) > 0)
        inliers, inside_scores, inside_tau = inside_detection(coords, members)
        collaborative = collaborative & inliers

    # Step 5 (refined, consensus) is left to the caller: it refines the updates as
    # given, whose screened blocks were zeroed here.
    return ClairResult(
        basis=fit.basis,
        rank=fit.rank,
        collaborative=collaborative,
        refined=None,
        consensus=None,
        scores=jnp.where(screened, jnp.inf, fit.scores),
        threshold=tau,
        noise_scale=sigma_hat,
        lam_nuc=lam_nuc_used,
        lam_block=lam_block_used,
        block_norms=prox.block_norms(sol.sparse),
        decomposition=sol,
        majority_refit=majority_refit,
        inside_scores=jnp.where(screened, jnp.inf, inside_scores),
        inside_threshold=inside_tau,
    )
