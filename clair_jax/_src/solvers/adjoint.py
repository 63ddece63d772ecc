"""Differentiation modes of a decomposition solve, as objects (cf. optimistix adjoints).

- :class:`ImplicitAdjoint`: the loop is a ``lax.while_loop`` that is never
  differentiated; reverse-mode derivatives come from the implicit function
  theorem at the solver's fixed point (:mod:`implicit`).
- :class:`UnrolledAdjoint`: the loop is a ``lax.scan`` of ``max_iter`` steps and
  is differentiated itself, in both modes.
"""

from __future__ import annotations

import abc
from functools import partial
from typing import Any, ClassVar

import equinox as eqx

from clair_jax._src.solvers import problem
from clair_jax._src.solvers.implicit import attach_fixed_point


class AbstractAdjoint(eqx.Module):
    """How derivatives of a solve are computed.

    Attributes:
      unrolled: whether the loop itself is differentiated (a ``lax.scan`` of
        ``max_iter`` steps, no exact continuation of a rank-capped solve) rather
        than a ``lax.while_loop`` whose derivatives are attached afterwards.
    """

    unrolled: ClassVar[bool]

    @abc.abstractmethod
    def apply(self, solver, options: problem.Options, z: Any, params: Any) -> Any:
        """Returns ``z`` (the solution), with this mode's derivatives in ``params``.

        Args:
          solver: the :class:`base.AbstractDecompositionSolver` that computed ``z``.
          options: static configuration, with the exact backend the fixed-point
            map is linearised with.
          z: the fixed-point variable (the solver's ``fixed_point_problem``).
          params: the parameters ``z`` depends on.
        """


class ImplicitAdjoint(AbstractAdjoint):
    """Implicit differentiation at the fixed point (``diff="implicit"``).

    Reverse mode only (``jax.grad``, ``jax.vjp``): forward mode is not defined for
    the ``custom_vjp`` and raises a TypeError. Derivatives are those of the
    minimiser, meaningful when the solve converged; a singular fixed-point
    system raises an error.
    """

    unrolled: ClassVar[bool] = False

    def apply(self, solver, options, z, params):
        return attach_fixed_point(partial(_fixed_point, solver, options), z, params)


class UnrolledAdjoint(AbstractAdjoint):
    """Differentiation through ``max_iter`` unrolled iterations (``diff="unrolled"``).

    Both modes; memory grows with ``max_iter``. Iterations after convergence leave
    the state unchanged.
    """

    unrolled: ClassVar[bool] = True

    def apply(self, solver, options, z, params):
        del solver, options, params
        return z


def _fixed_point(solver, options, z, params):
    return solver.fixed_point(options, z, params)


#: ``diff=`` strings of :func:`clair_jax.decompose` and the adjoints they name.
ADJOINTS = {"implicit": ImplicitAdjoint, "unrolled": UnrolledAdjoint}
