"""Implicit differentiation of a fixed point ``z* = T(z*, theta)``.

By the implicit function theorem, ``dz*/dtheta = (I - d_z T)^{-1} d_theta T``,
so a vector-Jacobian product needs one linear solve with the transposed
operator: ``(I - d_z T)^T u = v`` (matrix-free, by GMRES), then
``theta_bar = (d_theta T)^T u`` (the approach of jaxopt; Blondel et al. 2022,
arXiv:2105.15183). The solver itself is never differentiated. The derivative is
that of the fixed point: at a point where the solver stopped short of one it
describes no map, and where the system is singular it raises an error.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.scipy.sparse.linalg import gmres

from clair_jax._src import validation


def _solve_tol(tree) -> float:
    leaves = jax.tree.leaves(tree)
    return 1e-10 if leaves and leaves[0].dtype == jnp.float64 else 1e-6


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def attach_fixed_point(fixed_point_map: Callable, solution, params):
    """Returns ``solution``, differentiable in ``params`` through the fixed point.

    Args:
      fixed_point_map: ``(z, params) -> z``, a pure function (hashable: a
        module-level function or a ``functools.partial`` of one with static
        arguments) whose fixed points are the solutions.
      solution: ``z*`` as computed by any solver (its own derivatives are ignored).
      params: the pytree of arrays ``z*`` depends on.

    Returns:
      ``solution``, unchanged.
    """
    del fixed_point_map, params
    return solution


def _attach_fwd(fixed_point_map, solution, params):
    return solution, (solution, params)


def _attach_bwd(fixed_point_map, residuals, cotangent):
    solution, params = residuals
    _, vjp = jax.vjp(fixed_point_map, solution, params)

    def operator(u):
        return jax.tree.map(jnp.subtract, u, vjp(u)[0])

    u, _ = gmres(
        operator, cotangent, x0=cotangent, tol=_solve_tol(cotangent), restart=30, maxiter=20
    )
    params_bar = vjp(u)[1]
    # A singular system (the point is not a fixed point of T: a solve stopped by
    # max_iter; or the fixed point is not unique) breaks GMRES down into NaN: an
    # error naming the cause, not a silent NaN gradient.
    failed = validation.all_finite(cotangent) & ~validation.all_finite(u)
    params_bar = eqx.error_if(params_bar, failed, _SINGULAR)
    return jax.tree.map(jnp.zeros_like, solution), params_bar


_SINGULAR = (
    "implicit differentiation failed: the linear system (I - dT/dz)^T u = v at the "
    "solution is singular. The solve may not have converged (check `converged`), or "
    "the solution is not unique (e.g. both λ's zero); use diff='unrolled' there."
)


attach_fixed_point.defvjp(_attach_fwd, _attach_bwd)
