"""Argument checks with errors that name the argument and the shapes.

Concrete values are checked in Python and raise ``ValueError``/``TypeError``
at once. Traced values (inside ``jit``/``vmap``/``grad``) cannot be inspected
at trace time; their value checks run on device through ``equinox.error_if``,
which raises a runtime error carrying the same message instead of returning
NaNs.
"""

from __future__ import annotations

import numbers

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np


def is_traced(x) -> bool:
    """Whether ``x`` is a tracer (inside ``jit``/``vmap``/``grad``)."""
    return isinstance(x, jax.core.Tracer)


def as_float_array(x, name: str, dtype=None) -> jax.Array:
    """Converts to a JAX floating array; integers and bools become the default float.

    Args:
      x: an array-like of real numbers.
      name: its argument name, for the messages.
      dtype: cast to this dtype (default: keep a floating dtype).

    Returns:
      A JAX array.

    Raises:
      TypeError: strings, None, non-numeric or complex input.
    """
    if isinstance(x, (str, bytes)) or x is None:
        raise TypeError(f"{name} must be an array of real numbers, got {type(x).__name__}.")
    try:
        arr = jnp.asarray(x)
    except TypeError as err:
        raise TypeError(
            f"{name} must be an array of real numbers, got {type(x).__name__}."
        ) from err
    if jnp.issubdtype(arr.dtype, jnp.complexfloating):
        raise TypeError(f"{name} must be real, got dtype {arr.dtype}.")
    if dtype is not None:
        return arr.astype(dtype)
    if not jnp.issubdtype(arr.dtype, jnp.floating):
        arr = arr.astype(jnp.result_type(float))
    return arr


def working_dtype(dtype) -> jnp.dtype:
    """The dtype factorisations run in: float32 for half precision, else ``dtype``.

    LAPACK (and so ``jnp.linalg.svd``/``qr``/``eigh`` on CPU) has no float16 or
    bfloat16 routines; half-precision inputs are factorised in float32.
    """
    return jnp.promote_types(dtype, jnp.float32)


def as_factorisable(x, name: str, ndim: int, layout: str, hint: str) -> jax.Array:
    """Converts an input that will be factorised: checks its rank and size.

    Args:
      x: the array-like input.
      name: its argument name, for the messages.
      ndim: its expected number of axes.
      layout: its expected shape for the message, e.g.
        ``"(n, p, q) (clients, rows, cols)"``.
      hint: how to pass more than one, appended to the rank error.

    Returns:
      A floating JAX array in its :func:`working_dtype` (half precision becomes
      float32), with ``ndim`` axes, none of them empty.

    Raises:
      ValueError: another number of axes, or an empty axis.
      TypeError: as :func:`as_float_array`.
    """
    arr = as_float_array(x, name)
    arr = arr.astype(working_dtype(arr.dtype))
    if arr.ndim != ndim:
        raise ValueError(f"{name} must have shape {layout}, got shape {tuple(arr.shape)}; {hint}.")
    if min(arr.shape) < 1:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(arr.shape)}.")
    return arr


def check_finite(x: jax.Array, name: str) -> jax.Array:
    """Rejects NaN or inf entries (ValueError now, or a runtime error when traced)."""
    if is_traced(x):
        return eqx.error_if(x, ~jnp.all(jnp.isfinite(x)), f"{name} contains NaN or inf.")
    if not bool(np.all(np.isfinite(np.asarray(x)))):
        raise ValueError(f"{name} contains NaN or inf (shape {tuple(x.shape)}).")
    return x


def all_finite(tree) -> jax.Array:
    """Whether every entry of every leaf of ``tree`` is finite (a scalar bool, traceable)."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]))


def finite_rows(stacked) -> jax.Array:
    """``(n,)`` bool: whether each row (leading axis) of ``stacked``'s leaves is all finite.

    For stacked per-client pytrees such as adapters ``B (n, p, r)``, ``A (n, r, q)``.
    """
    rows = [
        jnp.all(jnp.isfinite(x.reshape(x.shape[0], -1)), axis=1) for x in jax.tree.leaves(stacked)
    ]
    return jnp.all(jnp.stack(rows), axis=0)


def check_indices(x: jax.Array, size: int, name: str) -> jax.Array:
    """Rejects a non-integer array or entries outside ``[0, size)`` (token ids, labels).

    Out-of-range ids would otherwise give NaN embeddings or losses silently.

    Raises:
      TypeError: a non-integer dtype.
      ValueError: an entry outside ``[0, size)`` (traced: a runtime error).
    """
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"{name} must be an integer array, got dtype {x.dtype}.")
    msg = f"{name} must hold integers in [0, {size})"
    if is_traced(x):
        return eqx.error_if(x, jnp.any((x < 0) | (x >= size)), msg + ".")
    value = np.asarray(x)
    if value.size and (value.min() < 0 or value.max() >= size):
        raise ValueError(f"{msg}, got values in [{value.min()}, {value.max()}].")
    return x


def check_nonnegative(x: jax.Array, name: str) -> jax.Array:
    """Rejects negative or non-finite entries (ValueError now, or a runtime error when traced)."""
    msg = f"{name} must be finite and non-negative"
    if is_traced(x):
        return eqx.error_if(x, jnp.any(~(jnp.isfinite(x) & (x >= 0))), msg + ".")
    # A concrete array: checked with NumPy (jnp operations would be staged out, and so
    # traced, when the caller is being traced, e.g. a jax.Array closed over by a jit).
    value = np.asarray(x)
    if np.any(~(np.isfinite(value) & (value >= 0))):
        raise ValueError(f"{msg}, got {value!r}.")
    return x


def check_scalar(x: jax.Array, name: str) -> jax.Array:
    """Rejects a non-scalar array (ValueError, suggesting ``jax.vmap`` for a grid)."""
    if x.ndim != 0:
        raise ValueError(
            f"{name} must be a scalar, got shape {tuple(x.shape)} "
            "(use jax.vmap to solve for a grid of values)."
        )
    return x


def check_positive_float(x, name: str) -> float:
    """A static positive Python float (configuration, not a traced array).

    Raises:
      TypeError: a traced or non-real value.
      ValueError: a non-finite or non-positive value.
    """
    if is_traced(x):
        raise TypeError(f"{name} must be a static Python number, not a traced array.")
    if isinstance(x, bool) or not isinstance(x, (numbers.Real, np.ndarray, jax.Array)):
        raise TypeError(f"{name} must be a real number, got {type(x).__name__}.")
    value = float(x)
    if not (np.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be finite and > 0, got {value!r}.")
    return value


def check_positive_int(x, name: str) -> int:
    """A static Python int ``>= 1`` (TypeError for a non-int, ValueError below 1)."""
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(x).__name__}.")
    if int(x) < 1:
        raise ValueError(f"{name} must be >= 1, got {int(x)}.")
    return int(x)


def check_bool(x, name: str) -> bool:
    """A static Python (or NumPy) bool (TypeError otherwise: ``"no"`` is not a flag)."""
    if not isinstance(x, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(x).__name__} {x!r}.")
    return bool(x)


def check_choice(x, name: str, choices: tuple) -> str:
    """``x`` if it is one of ``choices`` (ValueError listing them otherwise)."""
    if x not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {x!r}.")
    return x


def contaminated_count(fraction, num_clients: int, fraction_name: str, clients_name: str) -> int:
    """``round(fraction * num_clients)`` (round half to even), the contaminated clients.

    Args:
      fraction: the contaminated fraction.
      num_clients: the number of clients.
      fraction_name: how messages name ``fraction`` (e.g. a command-line flag).
      clients_name: how messages name ``num_clients``.

    Returns:
      The number of contaminated clients.

    Raises:
      ValueError: ``fraction`` outside ``[0, 1)`` (NaN included), or a count
        that leaves no benign client.
    """
    value = float(fraction)
    if not 0.0 <= value < 1.0:  # NaN fails too
        raise ValueError(f"{fraction_name} must be in [0, 1), got {value!r}.")
    count = int(round(value * num_clients))
    if count >= num_clients:
        raise ValueError(
            f"{fraction_name}={value!r} of {clients_name}={num_clients} rounds to {count} "
            "contaminated clients, leaving no benign client; lower the fraction or add clients."
        )
    return count
