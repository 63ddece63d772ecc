"""FISTA (Beck & Teboulle 2009) for the penalised low-rank + block-sparse problem.

The smooth part ``f(L, S) = 1/2 ||P(X - L - S)||_F^2`` (``P`` = centring over
clients when the offset is estimated, identity otherwise) has a 2-Lipschitz
gradient, so each iteration is

.. math::

    R &= P(X - Y_L - Y_S) \\\\
    L^{k+1} &= \\operatorname{SVT}_{\\lambda_*/2}(Y_L + R/2), \\qquad
    S^{k+1} = \\operatorname{BST}_{\\lambda_S w/2}(Y_S + R/2) \\\\
    t_{k+1} &= \\tfrac12(1 + \\sqrt{1 + 4 t_k^2}), \\qquad
    Y^{k+1} = X^{k+1} + \\tfrac{t_k - 1}{t_{k+1}} (X^{k+1} - X^k)

with the gradient-based adaptive restart of O'Donoghue & Candès (2015,
arXiv:1204.3982): momentum is reset whenever
:math:`\\langle Y^k - X^{k+1}, X^{k+1} - X^k\\rangle > 0`.

Stopping: the relative fixed-point residual
``||X^{k+1} - Y^k||_F / ||X||_F < tol`` (zero exactly at a minimiser).

Reference: A. Beck and M. Teboulle, "A fast iterative shrinkage-thresholding
algorithm for linear inverse problems", SIAM J. Imaging Sci. 2(1), 2009.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from jaxtyping import Array

from clair_jax._src.solvers import problem
from clair_jax._src.solvers.base import AbstractDecompositionSolver, Parts


class FistaState(NamedTuple):
    """FISTA's iterate: ``X^k = (L, S)``, the extrapolated ``Y^k``, ``t_k``."""

    low_rank: Array  # x^k
    sparse: Array
    y_low_rank: Array  # extrapolated point y^k
    y_sparse: Array
    t: Array
    num_iters: Array
    residual: Array
    rank: Array
    basis: Array | None
    scale: Array  # problem.data_scale(data), computed once


class FISTA(AbstractDecompositionSolver):
    """FISTA with adaptive restart, for the penalised problem (module docstring).

    Its fixed points are those of the proximal-gradient map, the default
    :meth:`~base.AbstractDecompositionSolver.fixed_point`. Not for the
    constrained form.
    """

    def init(self, data, options, low_rank, sparse, basis, previous=None):
        del options, previous
        dtype = data.updates.dtype
        return FistaState(
            low_rank=low_rank,
            sparse=sparse,
            y_low_rank=low_rank,
            y_sparse=sparse,
            t=jnp.ones((), dtype),
            num_iters=jnp.zeros((), jnp.int32),
            residual=jnp.asarray(jnp.inf, dtype),
            rank=jnp.zeros((), jnp.int32),
            basis=basis,
            scale=problem.data_scale(data),
        )

    def step(self, data, options, state: FistaState) -> FistaState:
        new_l, new_s, rank, new_basis = problem.prox_grad_map(
            data, state.y_low_rank, state.y_sparse, options, state.basis
        )
        dl, ds = new_l - state.y_low_rank, new_s - state.y_sparse
        ml, ms = new_l - state.low_rank, new_s - state.sparse
        # One sum per quantity over both parts (L and S have the same shape).
        residual = jnp.sqrt(jnp.sum(dl * dl + ds * ds)) / state.scale
        restart = jnp.sum(dl * ml + ds * ms) < 0
        t_next = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * state.t**2))
        beta = jnp.where(restart, 0.0, (state.t - 1.0) / t_next)
        t_next = jnp.where(restart, jnp.ones_like(t_next), t_next)
        return FistaState(
            low_rank=new_l,
            sparse=new_s,
            y_low_rank=new_l + beta * ml,
            y_sparse=new_s + beta * ms,
            t=t_next,
            num_iters=state.num_iters + 1,
            residual=residual.astype(data.updates.dtype),
            rank=rank,
            basis=new_basis,
            scale=state.scale,
        )

    def residual(self, state: FistaState) -> Array:
        """The relative fixed-point residual ``||X^{k+1} - Y^k||_F / ||X||_F``."""
        return state.residual

    def postprocess(self, data, options, state: FistaState) -> Parts:
        """``(L, S)`` of the iterate ``X^k``; no offset (the optimal one is used)."""
        del data, options
        return Parts(state.low_rank, state.sparse, None)
