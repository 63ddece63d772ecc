"""The generic loop: any :class:`base.AbstractDecompositionSolver` to its stopping rule.

``lax.while_loop`` stops as soon as the solver has converged but cannot be
reverse-differentiated; a ``lax.scan`` over ``max_iter`` steps that freezes the
state once converged can (the unrolled mode, in the spirit of jaxopt's loop
helper). The adjoint object (:mod:`adjoint`) picks one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
from jax import lax

from clair_jax._src.solvers import problem

State = TypeVar("State")


def iterate(
    solver,
    data: problem.Data,
    options: problem.Options,
    state: Any,
    *,
    unrolled: bool,
    skip: jax.Array | None = None,
) -> Any:
    """Runs ``solver.step`` from ``state`` until ``solver.terminate`` or ``max_iter``.

    A ``"rank_capped"`` solve (``while_loop`` only) also stops once the
    thresholded rank has stayed at the cap for :data:`problem.SATURATION_PATIENCE`
    iterations (:func:`problem.saturation_stop`).

    Args:
      solver: an :class:`base.AbstractDecompositionSolver`.
      data: the problem data.
      options: static configuration (``tol``, ``max_iter``, the backend).
      state: the solver's initial state.
      unrolled: ``False`` for ``lax.while_loop``; ``True`` for a differentiable
        ``lax.scan`` of ``options.max_iter`` steps.
      skip: optional traced bool (``while_loop`` only): when True no iteration
        runs, also for one element of a ``vmap`` batch.

    Returns:
      The final state.
    """

    def done(s):
        return solver.terminate(data, options, s)[0]

    stop = {} if unrolled else problem.saturation_stop(options)
    return run_iterations(
        lambda s: solver.step(data, options, s),
        state,
        done=done,
        num_iters=lambda s: s.num_iters,
        max_iter=options.max_iter,
        unrolled=unrolled,
        skip=skip,
        **stop,
    )


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
    skip: jax.Array | None = None,
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
      skip: optional traced bool (``while_loop`` only): no step runs when True.

    Returns:
      The final state.
    """
    if unrolled:

        def body(s, _):
            active = jnp.logical_not(done(s))
            new = step(s)
            return jax.tree.map(lambda a, b: jnp.where(active, a, b), new, s), None

        return lax.scan(body, state, None, length=max_iter)[0]

    def going(s):
        go = jnp.logical_and(jnp.logical_not(done(s)), num_iters(s) < max_iter)
        return go if skip is None else jnp.logical_and(go, jnp.logical_not(skip))

    if give_up is None:
        return lax.while_loop(going, step, state)

    def cond_streak(carry):
        s, streak = carry
        return jnp.logical_and(going(s), streak < patience)

    def step_streak(carry):
        s = step(carry[0])
        return s, jnp.where(give_up(s), carry[1] + 1, 0)

    return lax.while_loop(cond_streak, step_streak, (state, jnp.zeros((), jnp.int32)))[0]
