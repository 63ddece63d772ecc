"""ADMM / inexact augmented Lagrangian for the low-rank + block-sparse problem.

Constraint ``X = c + L + S + N`` with multiplier ``Y`` and penalty ``mu``
(Lin, Chen & Ma 2010, arXiv:1009.5055, adapted to client blocks). Penalised
form: ``N`` carries the ``1/2 ||N||^2`` misfit and is minimised jointly with
``S`` in closed form; constrained form: ``N = 0``. One sweep:

.. math::

    L &\\leftarrow \\operatorname{SVT}_{\\lambda_*/\\mu}(X - c - S - N + Y/\\mu) \\\\
    V &= X - c - L + Y/\\mu \\\\
    S &\\leftarrow \\operatorname{BST}_{\\lambda_S w (1+\\mu)/\\mu}(V), \\quad
    N \\leftarrow \\tfrac{\\mu}{1+\\mu}(V - S)
    \\quad(\\text{constrained: } S \\leftarrow \\operatorname{BST}_{\\lambda_S w/\\mu}(V)) \\\\
    c &\\leftarrow \\operatorname{mean}_i(X_i - L_i - S_i - N_i + Y_i/\\mu)
      \\quad(\\text{offset only}) \\\\
    Y &\\leftarrow Y + \\mu (X - c - L - S - N)

The penalty adapts by residual balancing (Boyd et al. 2011, section 3.4.1):
``mu`` doubles when the primal residual exceeds 10x the dual one and halves in
the opposite case. Stopping: both relative residuals,
``||X - c - L - S - N||_F / ||X||_F`` and
``mu (||Δ(S + N + c)||_F^2 + n ||Δc||_F^2)^{1/2} / ||X||_F`` (the second term
with an offset only: ``S + N`` is updated with the old ``c``), below ``tol``.
In the constrained form the starting penalty is ``λ_* 1.25 / ||M||_2`` and the
dual residual is divided by ``λ_*``: its solution depends on ``λ_S / λ_*`` only,
and so do the iterates.

The iterates carry ``W = S + N``, not ``S`` and ``N``: the joint update splits
any ``W`` optimally, ``S = argmin_S λ_S w ||S|| + 1/2 ||W - S||^2 =
BST_{λ_S w}(W)`` (the penalty does not enter), so ``S`` and ``N = W - S`` are
read off the final ``W`` (:meth:`ADMM.postprocess`), and ``W`` is all the sweep needs:
one ``(n, p, q)`` array less to read and write per iteration. The update is
``W = (S + μ V) / (1 + μ)`` with ``S = BST_τ(V)``, ``τ = λ_S w (1 + μ)/μ``.
The multiplier update needs no other pass over ``X``, ``Y`` and ``L`` either:
``Y + μ (X - c' - L - W) = μ (V - W - (c' - c))``, and the primal residual is
``||Y' - Y||_F / μ``. The iterates are those of the sweep above.
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array

from clair_jax._src.linalg import prox, sparsity
from clair_jax._src.solvers import problem
from clair_jax._src.solvers.base import AbstractDecompositionSolver, Parts

BALANCE_RATIO = 10.0
PENALTY_FACTOR = 2.0


class AdmmState(NamedTuple):
    """ADMM's iterate: ``L``, ``W = S + N``, ``c``, the multiplier ``Y``, the penalty."""

    low_rank: Array
    sparse_plus_noise: Array  # W = S + N (constrained form: N = 0, W = S)
    offset: Array  # (p, q); stays zero without an offset
    dual: Array
    mu: Array
    num_iters: Array
    primal_residual: Array
    dual_residual: Array
    rank: Array
    basis: Array | None
    scale: Array  # problem.data_scale(data), computed once
    dual_unit: Array  # the dual residual's unit: λ_* (constrained form) or 1


def sweep(data: problem.Data, options: problem.Options, misfit, offset, dual, mu, basis):
    """One ADMM sweep at fixed penalty ``mu`` from ``(W, c, Y)``, ``W = S + N``.

    The sweep starts with the ``L``-update, so the previous ``L`` does not enter.

    Args:
      data: the problem data.
      options: static configuration.
      misfit: ``W = S + N``.
      offset: ``(p, q)``, ``c`` (zeros without an offset).
      dual: the multiplier ``Y``.
      mu: the penalty.
      basis: the rank-capped factorisation's basis, or ``None``.

    Returns:
      ``(L, W, c, Y, rank, basis)`` after the sweep.
    """
    x, inv_mu = data.updates, 1.0 / mu
    shifted = x + inv_mu * dual - offset[None]
    new_l, rank, basis = problem.svt_blocks(shifted - misfit, data.lam_nuc * inv_mu, options, basis)
    v = shifted - new_l
    if options.constrained:
        sparse = sparsity.prox(v, data.lam_block * data.weights * inv_mu, options.sparsity)
        gap = v - sparse  # V - W with W = S
        new_w = sparse
    else:
        tau = data.lam_block * data.weights * (1.0 + mu) * inv_mu
        sparse = sparsity.prox(v, tau, options.sparsity)
        gap = (v - sparse) / (1.0 + mu)  # V - W
        new_w = sparse + mu * gap  # W = S + N, N = mu / (1 + mu) (V - S)
    # Y + mu (X - c' - L - W) = mu (V - W - (c' - c)): the multiplier from V, without
    # another pass over X, Y and L.
    if options.offset:
        moved = jnp.mean(gap, axis=0)  # c' - c: the offset's own update
        new_c = offset + moved
        gap = gap - moved[None]
    else:
        new_c = offset
    return new_l, new_w, new_c, mu * gap, rank, basis


def sparse_part(data: problem.Data, options: problem.Options, misfit: Array) -> Array:
    """``S`` from ``W = S + N``: ``BST_{λ_S w}(W)`` (the constrained form's ``W`` is ``S``)."""
    if options.constrained:
        return misfit
    return sparsity.prox(misfit, data.lam_block * data.weights, options.sparsity)


def initial_penalty(data: problem.Data) -> Array:
    """``1.25 / ||M||_2`` (Lin et al.), spectral norm by 30 power iterations.

    With an offset, ``M`` holds the centred blocks
    (``decomposition.solve_decomposition``; the offset absorbs the rest).
    """
    m = prox.blocks_to_matrix(data.updates)
    v = jnp.ones((m.shape[1],), m.dtype) / jnp.sqrt(m.shape[1])
    for _ in range(30):
        v = m.T @ (m @ v)
        v = v / jnp.maximum(jnp.linalg.norm(v), jnp.finfo(m.dtype).tiny)
    sigma = jnp.linalg.norm(m @ v)
    return jnp.where(sigma > 0, 1.25 / jnp.where(sigma > 0, sigma, 1.0), 1.0)


class ADMM(AbstractDecompositionSolver):
    """Inexact ALM with residual-balanced penalty (module docstring).

    Solves the penalised and the constrained form. The penalised form is
    differentiated through the proximal-gradient map (the default
    :meth:`~base.AbstractDecompositionSolver.fixed_point`), the constrained form
    through the sweep itself at the final penalty.
    """

    solves_constrained: ClassVar[bool] = True

    def init(self, data, options, low_rank, sparse, basis, previous=None):
        """The feasible start; ``previous`` (an :class:`AdmmState`) lends its penalty.

        Penalised form: ``N = X - c - L - S`` and the multiplier ``Y = N`` that
        stationarity in ``N`` asks for; constrained form: ``N = 0``, ``Y = 0``.
        Without ``previous`` the penalty is :func:`initial_penalty` (times ``λ_*``
        in the constrained form).
        """
        x = data.updates
        dtype = x.dtype
        # The constrained problem depends on λ_S / λ_* only, and its multiplier scales
        # with λ_*: so do the penalty and the dual residual, and the iterates are the
        # same for every common scale of the λ's (the penalised form has a fixed
        # scale, that of its misfit term).
        if options.constrained:
            dual_unit = jnp.where(data.lam_nuc > 0, data.lam_nuc, 1.0)
        else:
            dual_unit = jnp.ones((), dtype)
        if options.offset:
            init_c = problem.optimal_offset(data, low_rank, sparse)
        else:
            init_c = jnp.zeros_like(x[0])
        if options.constrained:
            init_w, init_n = sparse, jnp.zeros_like(x)
        else:
            init_w = x - init_c[None] - low_rank  # S + N with N = X - c - L - S
            init_n = init_w - sparse
        if previous is None:
            # A starting value, not a function of the data to differentiate (its norm
            # has no derivative at zero data).
            mu = jax.lax.stop_gradient(initial_penalty(data) * dual_unit)
        else:
            mu = previous.mu
        return AdmmState(
            low_rank=low_rank,
            sparse_plus_noise=init_w,
            offset=init_c,
            dual=init_n,
            mu=mu.astype(dtype),
            num_iters=jnp.zeros((), jnp.int32),
            primal_residual=jnp.asarray(jnp.inf, dtype),
            dual_residual=jnp.asarray(jnp.inf, dtype),
            rank=jnp.zeros((), jnp.int32),
            basis=basis,
            scale=problem.data_scale(data),
            dual_unit=dual_unit.astype(dtype),
        )

    def step(self, data, options, state: AdmmState) -> AdmmState:
        mu, scale = state.mu, state.scale
        low_rank, misfit, offset, dual, rank, basis = sweep(
            data,
            options,
            state.sparse_plus_noise,
            state.offset,
            state.dual,
            mu,
            state.basis,
        )
        # X - c' - L - W = (Y' - Y) / mu.
        primal = _norm(dual - state.dual) / (mu * scale)
        # Stationarity of L after the sweep is off by mu Δ(W + c); with an offset, that
        # of W (updated before c, with the old c) is off by mu Δc in every block too:
        # W and c can drift by opposite amounts while W + c stands still.
        moved = (misfit + offset[None]) - (state.sparse_plus_noise + state.offset[None])
        squares = jnp.sum(moved * moved)
        if options.offset:
            shift = offset - state.offset
            squares = squares + data.updates.shape[0] * jnp.sum(shift * shift)
        dual_res = mu * jnp.sqrt(squares) / (scale * state.dual_unit)
        mu_next = jnp.where(
            primal > BALANCE_RATIO * dual_res,
            mu * PENALTY_FACTOR,
            jnp.where(dual_res > BALANCE_RATIO * primal, mu / PENALTY_FACTOR, mu),
        )
        return state._replace(
            low_rank=low_rank,
            sparse_plus_noise=misfit,
            offset=offset,
            dual=dual,
            mu=mu_next,
            num_iters=state.num_iters + 1,
            primal_residual=primal,
            dual_residual=dual_res,
            rank=rank,
            basis=basis,
        )

    def residual(self, state: AdmmState) -> Array:
        """``max(primal, dual)``, both relative residuals of the module docstring."""
        return jnp.maximum(state.primal_residual, state.dual_residual)

    def postprocess(self, data, options, state: AdmmState) -> Parts:
        """``L``, ``S = BST_{λ_S w}(W)`` and the offset ``c`` of the state."""
        sparse = sparse_part(data, options, state.sparse_plus_noise)
        return Parts(state.low_rank, sparse, state.offset)

    def svt_argument(self, data, options, state: AdmmState):
        """``(Z, tau)`` with ``L = SVT_tau(Z)`` at a minimiser, from the state's ``L``.

        Penalised form: the default. Constrained form: ``Y ∈ λ_* ∂||L||_*`` at a
        solution, i.e. ``L = SVT_{λ_*/μ}(L + Y/μ)`` for any ``μ > 0`` (the state's
        penalty is used).
        """
        if not options.constrained:
            return super().svt_argument(data, options, state)
        inv_mu = 1.0 / state.mu
        return state.low_rank + inv_mu * state.dual, data.lam_nuc * inv_mu

    def fixed_point_problem(self, data, options, state: AdmmState, parts: Parts):
        """Constrained form: ``z = (L, S, c or None, Y)``, ``params = (data, μ)``."""
        if not options.constrained:
            return super().fixed_point_problem(data, options, state, parts)
        offset = parts.offset if options.offset else None
        z = (parts.low_rank, parts.sparse, offset, state.dual)
        return z, (data, jax.lax.stop_gradient(state.mu))

    def fixed_point(self, options, z, params):
        """Constrained form: one :func:`sweep` at the final penalty (``W = S``)."""
        if not options.constrained:
            return super().fixed_point(options, z, params)
        data, mu = params
        low_rank, sparse, offset, dual = z
        if offset is None:  # no offset: it stays out of the fixed-point variable
            offset = jnp.zeros_like(sparse[0])
        low_rank, sparse, new_offset, dual, _, _ = sweep(
            data, options, sparse, offset, dual, mu, None
        )
        return low_rank, sparse, new_offset if options.offset else None, dual


def _norm(a: Array) -> Array:
    return jnp.sqrt(jnp.sum(a * a))
