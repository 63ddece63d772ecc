"""Exact scaling by powers of two.

The solvers and CLAIR are equivariant to the scale of the data (a scaled
problem has the scaled solution), but floating-point iterations are not: squares
underflow or overflow, and a penalty such as ADMM's ``1 + μ`` rounds. They run
on data brought to unit size by a power of two, which scales exactly (no
rounding while the results are normal numbers), and scale the results back.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array


def times_power_of_two(x: Array, exponent: Array) -> Array:
    """``x 2^e``, exact while the result is a normal number.

    Two factors ``2^{e/2}``, not ``2^e``, which may itself lie outside the dtype's
    range (``2^128`` is ``inf`` in float32) when ``x`` and the result do not.
    """
    half = exponent // 2
    one = jnp.ones((), jnp.result_type(x))
    return x * jnp.ldexp(one, half) * jnp.ldexp(one, exponent - half)


def working_exponent(x: Array, axes=None, keepdims: bool = False) -> Array:
    """The exponent ``e`` that brings ``max |X_ij| 2^-e`` into ``[1/2, 1)`` (0 for zero data).

    Over all entries, or per slice with ``axes`` (``keepdims`` as in ``jnp.max``).

    The problem is equivariant: ``(a X, a λ_*, a λ_S)`` has the solution
    ``a (L, S, c)`` and the objective ``a^2`` times that of ``(X, λ_*, λ_S)``. The
    iterations are not, unless the data have a fixed scale: ADMM's penalty starts at
    ``1.25 / ||M||_2`` and enters the penalised sweep as ``(1 + μ) / μ``, which
    rounds to 1 once ``μ`` exceeds ``1 / eps`` (float32 data of spectral norm below
    about ``1e-7``): the sweep then solves the constrained problem, and stops
    there as if converged. Residual norms square the entries, which overflow
    for float32 data of size ``1e20`` and underflow at ``tol=1e-6`` for data of
    size ``1e-15``. Solving for ``X 2^-e`` avoids all three, and a power of two
    divides and multiplies exactly: ``decompose(2^k X, 2^k λ)`` is ``2^k`` times
    ``decompose(X, λ)``, bit for bit. (``2^e`` itself is never formed: for data
    above ``2^127`` in float32 it would be ``inf``.)
    """
    largest = jax.lax.stop_gradient(jnp.max(jnp.abs(x), axis=axes, keepdims=keepdims))
    _, exponent = jnp.frexp(largest)  # largest = m 2^exponent, m in [1/2, 1)
    return exponent


def unit_size(x: Array, axes=None) -> Array:
    """``x 2^-e``, ``e`` the exponent of ``max |x|`` over ``axes``: entries in ``[-1, 1)``."""
    return times_power_of_two(x, -working_exponent(x, axes, keepdims=True))
