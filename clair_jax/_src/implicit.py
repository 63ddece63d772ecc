"""Implicit differentiation of a fixed point ``z* = T(z*, theta)``.

By the implicit function theorem, ``dz*/dtheta = (I - d_z T)^{-1} d_theta T``,
so a vector-Jacobian product needs one linear solve with the transposed
operator: ``(I - d_z T)^T u = v`` (matrix-free, by GMRES), then
``theta_bar = (d_theta T)^T u`` (the approach of jaxopt; Blondel et al. 2022,
arXiv:2105.15183). The solver itself is never differentiated.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
from jax.scipy.sparse.linalg import gmres


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
    return jax.tree.map(jnp.zeros_like, solution), params_bar


attach_fixed_point.defvjp(_attach_fwd, _attach_bwd)
