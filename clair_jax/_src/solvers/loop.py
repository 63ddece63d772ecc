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
    give_up: Callable[[State], jax.Array] | None = None,
    patience: int = 1,
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
      give_up: optional ``state -> bool`` scalar (``while_loop`` only): the loop
        also stops once it has been True after ``patience`` consecutive steps
        (e.g. a rank cap that binds: going on cannot reach the minimiser).
      patience: consecutive ``give_up`` steps that stop the loop.

    Returns:
      The final state.
    """
    if not unrolled and give_up is None:

        def cond(s):
            return jnp.logical_and(jnp.logical_not(done(s)), num_iters(s) < max_iter)

        return lax.while_loop(cond, step, state)
    if not unrolled:

        def cond_streak(carry):
            s, streak = carry
            going = jnp.logical_and(jnp.logical_not(done(s)), num_iters(s) < max_iter)
            return jnp.logical_and(going, streak < patience)

        def step_streak(carry):
            s = step(carry[0])
            return s, jnp.where(give_up(s), carry[1] + 1, 0)

        return lax.while_loop(cond_streak, step_streak, (state, jnp.zeros((), jnp.int32)))[0]

    def body(s, _):
        active = jnp.logical_not(done(s))
        new = step(s)
        return jax.tree.map(lambda a, b: jnp.where(active, a, b), new, s), None

    return lax.scan(body, state, None, length=max_iter)[0]
