"""Loop driver shared by the solvers: a fast ``while_loop`` or a differentiable ``scan``.

``lax.while_loop`` stops as soon as the solver has converged but cannot be
reverse-differentiated; a ``lax.scan`` over ``max_iter`` steps that freezes the
state once converged can (the unrolled mode, in the spirit of jaxopt's loop
helper).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import jax
import jax.numpy as jnp
from jax import lax

State = TypeVar("State")


def run_iterations(
    step: Callable[[State], State],
    state: State,
    *,
    done: Callable[[State], jax.Array],
    num_iters: Callable[[State], jax.Array],
    max_iter: int,
    unrolled: bool,
) -> State:
    """Applies ``step`` until ``done(state)`` or ``max_iter`` steps.

    Args:
      step: one solver iteration, ``state -> state`` (pure).
      state: initial state (a pytree of arrays).
      done: ``state -> bool`` scalar, the stopping test.
      num_iters: ``state -> int32`` scalar, the iteration counter kept by ``step``.
      max_iter: static bound on the number of iterations.
      unrolled: ``False`` for ``lax.while_loop``; ``True`` for a ``lax.scan`` of
        ``max_iter`` steps (reverse-mode differentiable), where steps after
        convergence leave the state unchanged.

    Returns:
      The final state.
    """
    if not unrolled:

        def cond(s):
            return jnp.logical_and(jnp.logical_not(done(s)), num_iters(s) < max_iter)

        return lax.while_loop(cond, step, state)

    def body(s, _):
        active = jnp.logical_not(done(s))
        new = step(s)
        return jax.tree.map(lambda a, b: jnp.where(active, a, b), new, s), None

    return lax.scan(body, state, None, length=max_iter)[0]
