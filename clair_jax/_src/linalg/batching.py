"""Mapping a per-matrix linear-algebra routine over a batch on every backend.

On CPU, batched LAPACK calls (SVD, eigh, QR) that XLA runs concurrently can
exhaust the intra-op thread pool and deadlock, while single-matrix calls run
inline. The helpers here therefore map over a batch with :func:`jax.lax.map` on
CPU and with :func:`jax.vmap` on GPU/TPU, where batched kernels are the fast path.

:func:`map_matrices` maps over a batch the library forms itself (it is
differentiable); :func:`sequential_on_cpu` gives a function a ``jax.vmap`` rule,
for the factorisations a caller's ``jax.vmap`` batches.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array


def map_matrices(fn: Callable[..., Any], *batched: Array) -> Any:
    """``fn`` applied to every element of the leading axis of ``batched``.

    Equivalent to ``jax.vmap(fn)(*batched)``: computed with ``jax.lax.map``
    (sequentially) on CPU, where concurrent batched LAPACK calls can deadlock
    (see the module docstring), and with ``jax.vmap`` on GPU/TPU.

    Args:
      fn: a function of unbatched arrays returning a pytree of arrays.
      *batched: arrays sharing the leading (batch) axis.

    Returns:
      ``fn``'s outputs stacked along a new leading axis.

    Examples:
      >>> import jax.numpy as jnp
      >>> x = jnp.stack([jnp.eye(2), 2 * jnp.eye(2)])
      >>> map_matrices(lambda m: jnp.linalg.svd(m, compute_uv=False), x).tolist()
      [[1.0, 1.0], [2.0, 2.0]]
    """
    if jax.default_backend() == "cpu":
        return jax.lax.map(lambda args: fn(*args), batched)
    return jax.vmap(fn)(*batched)


def sequential_on_cpu(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with a ``jax.vmap`` rule that computes a batch one problem at a time on CPU.

    Under ``jax.vmap`` on CPU the wrapped function maps ``fn`` over the batch
    with ``jax.lax.map`` (unbatched arguments are broadcast; an outer vmap maps
    again), so LAPACK only sees single matrices; elsewhere it vmaps ``fn``.
    Values equal ``jax.vmap(fn)``'s up to LAPACK's batched-versus-single rounding.
    The rule is a :func:`jax.custom_batching.custom_vmap`, which has no
    reverse-mode derivative: use it where no cotangent flows through ``fn``
    (e.g. the primal of a ``jax.custom_jvp`` whose rule does not differentiate it).

    Args:
      fn: a function of unbatched positional arrays returning a pytree of arrays.

    Returns:
      ``fn`` with the ``jax.vmap`` rule above; unbatched calls are ``fn``'s.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> q_factor = sequential_on_cpu(lambda z: jnp.linalg.qr(z)[0])
      >>> jax.vmap(q_factor)(jnp.stack([jnp.eye(3, 2), 2 * jnp.eye(3, 2)])).shape
      (2, 3, 2)
    """
    wrapped = jax.custom_batching.custom_vmap(fn)

    def rule(axis_size, in_batched, *args):
        if not any(in_batched):
            out = wrapped(*args)
            return out, jax.tree.map(lambda _: False, out)
        args = tuple(
            a if b else jnp.broadcast_to(a, (axis_size, *jnp.shape(a)))
            for a, b in zip(args, in_batched, strict=True)
        )
        if jax.default_backend() == "cpu":
            out = jax.lax.map(lambda xs: wrapped(*xs), args)
        else:
            out = jax.vmap(fn)(*args)
        return out, jax.tree.map(lambda _: True, out)

    wrapped.def_vmap(rule)
    return wrapped
