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

    Multiplies by two factors ``2^{e/2}`` rather than ``2^e``, which can lie
    outside the dtype's range when ``x`` and the result do not.

    Args:
      x: an array.
      exponent: integer exponent ``e``, broadcastable against ``x``.

    Returns:
      ``x 2^e`` in ``x``'s dtype.
    """
    half = exponent // 2
    one = jnp.ones((), jnp.result_type(x))
    return x * jnp.ldexp(one, half) * jnp.ldexp(one, exponent - half)


def working_exponent(x: Array, axes=None, keepdims: bool = False) -> Array:
    """The exponent ``e`` that brings ``max |x| 2^-e`` into ``[1/2, 1)`` (0 for zero data).

    The solvers run on ``x 2^-e``: their iterations (squared norms, ADMM's
    ``(1 + μ) / μ``) lose precision or overflow far from unit scale, and a power
    of two scales exactly, so ``decompose(2^k X, 2^k λ)`` is ``2^k decompose(X, λ)``.
    The maximum is not differentiated (``stop_gradient``).

    Args:
      x: an array.
      axes: axes of the maximum (``None``: all entries).
      keepdims: as in ``jnp.max``.

    Returns:
      Integer exponents, one per slice over ``axes``.
    """
    largest = jax.lax.stop_gradient(jnp.max(jnp.abs(x), axis=axes, keepdims=keepdims))
    _, exponent = jnp.frexp(largest)  # largest = m 2^exponent, m in [1/2, 1)
    return exponent


def unit_size(x: Array, axes=None) -> Array:
    """``x 2^-e`` with ``e`` from :func:`working_exponent`: entries in ``[-1, 1)``.

    Args:
      x: an array.
      axes: axes over which ``max |x|`` is taken (``None``: all entries).

    Returns:
      ``x`` scaled exactly by a power of two per slice.
    """
    return times_power_of_two(x, -working_exponent(x, axes, keepdims=True))
