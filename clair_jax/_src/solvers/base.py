"""The protocol every decomposition solver follows, in the manner of optimistix.

A solver is an immutable :class:`equinox.Module` holding no arrays (its
configuration is static; data and λ's are traced :class:`problem.Data`). Its
iterations run on a *state*: a ``NamedTuple`` of arrays with fixed dtypes that
has at least the fields

- ``low_rank``: ``(n, p, q)``, the current ``L``;
- ``num_iters``: int32 scalar, iterations run;
- ``rank``: int32 scalar, rank of the last singular value thresholding;
- ``basis``: the rank-capped factorisation's warm-started basis, or ``None``.

One generic loop (:func:`loop.iterate`) drives any solver::

    state = solver.init(data, options, low_rank, sparse, basis)
    while not solver.terminate(data, options, state)[0] and num_iters < max_iter:
        state = solver.step(data, options, state)
    parts = solver.postprocess(data, options, state)

and one driver (:func:`decomposition.solve_decomposition`) adds what every
method shares: scaling, the rank-capped continuation and certificate, and the
derivatives, chosen by an adjoint object (:mod:`adjoint`).
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from clair_jax._src.solvers import problem


class Parts(NamedTuple):
    """The solution a solver state stands for (in the solver's working scale).

    Attributes:
      low_rank: ``(n, p, q)``, ``L``.
      sparse: ``(n, p, q)``, ``S``.
      offset: ``(p, q)``, the offset the solver carries, or ``None`` when it carries
        none (the driver then uses the optimal one, :func:`problem.optimal_offset`).
    """

    low_rank: Float[Array, "n p q"]
    sparse: Float[Array, "n p q"]
    offset: Float[Array, "p q"] | None


class AbstractDecompositionSolver(eqx.Module):
    """A solver of the low-rank + block-sparse problem (:mod:`problem`).

    Subclasses implement :meth:`init`, :meth:`step`, :meth:`residual` and
    :meth:`postprocess`; the others have defaults that fit a solver of the
    penalised problem. Every method is pure and traceable; ``options`` is static.
    """

    #: Whether the solver handles ``options.constrained`` (the equality-constrained form).
    solves_constrained: ClassVar[bool] = False

    @abc.abstractmethod
    def init(
        self,
        data: problem.Data,
        options: problem.Options,
        low_rank: Array,
        sparse: Array,
        basis: Array | None,
        previous: Any | None = None,
    ) -> Any:
        """The state before the first iteration.

        Args:
          data: the (scaled) problem data.
          options: static configuration.
          low_rank: ``(n, p, q)`` starting ``L``.
          sparse: ``(n, p, q)`` starting ``S``.
          basis: starting basis of the rank-capped factorisation, or ``None``.
          previous: a state of this solver to continue from (the exact
            continuation of a rank-capped solve); the solver may keep its
            adapted parameters (ADMM: the penalty). ``None`` for a fresh start.

        Returns:
          A state whose residual is ``inf`` (so that :meth:`terminate` is False).
        """

    @abc.abstractmethod
    def step(self, data: problem.Data, options: problem.Options, state: Any) -> Any:
        """One iteration: ``state -> state`` (same structure and dtypes)."""

    @abc.abstractmethod
    def residual(self, state: Any) -> Float[Array, ""]:
        """The stopping residual of ``state``, relative to :func:`problem.data_scale`."""

    @abc.abstractmethod
    def postprocess(self, data: problem.Data, options: problem.Options, state: Any) -> Parts:
        """The solution ``(L, S, c)`` that ``state`` stands for."""

    def terminate(
        self, data: problem.Data, options: problem.Options, state: Any
    ) -> tuple[Bool[Array, ""], Bool[Array, ""]]:
        """``(done, converged)``: whether to stop, and whether the stop is a solution.

        Default: both are ``residual(state) < options.tol`` (the loop also stops at
        ``options.max_iter``, which is then not converged).
        """
        del data
        converged = self.residual(state) < options.tol
        return converged, converged

    def svt_argument(
        self, data: problem.Data, options: problem.Options, state: Any
    ) -> tuple[Array, Array]:
        """``(Z, tau)`` with ``L = SVT_tau(Z)`` at a minimiser, from the state's ``L``.

        Certifies a rank-capped solve (:func:`svt_capped.capped_svt_certified`).
        Default: stationarity of the penalised problem,
        :func:`problem.penalised_svt_argument`.
        """
        parts = self.postprocess(data, options, state)
        return problem.penalised_svt_argument(data, parts.low_rank, parts.sparse, options)

    def fixed_point_problem(
        self, data: problem.Data, options: problem.Options, state: Any, parts: Parts
    ) -> tuple[Any, Any]:
        """``(z, params)``: the variable and parameters of :meth:`fixed_point`.

        ``z`` starts with ``(L, S)``; a third element, when present, is the offset
        ``c`` (or ``None``) the solution keeps. ``params`` holds ``data`` (not
        stopped: the derivatives flow to it) and anything else the map needs.
        Default: ``((L, S), data)``, for the proximal-gradient map.

        Args:
          data: the problem data, differentiable.
          options: static configuration.
          state: the final state.
          parts: :meth:`postprocess` of ``state`` (computed with the data stopped).
        """
        del options, state
        return (parts.low_rank, parts.sparse), data

    def fixed_point(self, options: problem.Options, z: Any, params: Any) -> Any:
        """``T(z, params)``, whose fixed points are the solutions (same structure as ``z``).

        Implicit differentiation linearises this map (:mod:`implicit`). Default: one
        proximal-gradient step of the penalised problem,
        :func:`problem.prox_grad_map`, whose fixed points are its minimisers.
        """
        low_rank, sparse = z
        new_l, new_s, _, _ = problem.prox_grad_map(params, low_rank, sparse, options)
        return new_l, new_s


def continue_state(state, more, saturated: Array):
    """``more`` (a continuation run from ``state``) where ``saturated``, else ``state``.

    The continuation's iteration count adds to the first phase's, and the first
    phase's basis is kept (the continuation factorises exactly, without one).
    """
    more = more._replace(basis=state.basis, num_iters=state.num_iters + more.num_iters)
    return jax.tree.map(lambda a, b: jnp.where(saturated, a, b), more, state)
