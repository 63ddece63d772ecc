"""Mapping a per-matrix linear-algebra routine over a batch on every backend.

With jaxlib older than 0.11, batched LAPACK calls (QR, Cholesky, SVD, eigh) that
XLA:CPU runs concurrently can exhaust its intra-op thread pool and deadlock,
while single-matrix calls run inline. The helpers here therefore map over a
batch with :func:`jax.lax.map` on CPU with those jaxlibs, and with
:func:`jax.vmap` everywhere else, where batched kernels are the fast path
(``benchmarks/lapack_batch_hang.py`` checks a jaxlib for the deadlock).

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

#: Whether this jaxlib's batched CPU LAPACK kernels can deadlock under concurrency.
BATCHED_LAPACK_CAN_DEADLOCK = tuple(int(v) for v in jax.lib.__version__.split(".")[:2]) < (0, 11)


def sequential_batches() -> bool:
    """Whether batches of factorisations run one problem at a time (CPU, jaxlib < 0.11)."""
    return BATCHED_LAPACK_CAN_DEADLOCK and jax.default_backend() == "cpu"


def map_matrices(fn: Callable[..., Any], *batched: Array) -> Any:
    """``fn`` applied to every element of the leading axis of ``batched``.

    Equivalent to ``jax.vmap(fn)(*batched)``: computed with ``jax.lax.map``
    (sequentially) where concurrent batched LAPACK calls can deadlock (CPU with
    jaxlib < 0.11, see the module docstring), and with ``jax.vmap`` elsewhere.

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
    if sequential_batches():
        return jax.lax.map(lambda args: fn(*args), batched)
    return jax.vmap(fn)(*batched)


def sequential_on_cpu(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with a ``jax.vmap`` rule that computes a batch one problem at a time on CPU.

    Under ``jax.vmap`` where :func:`sequential_batches` holds, the wrapped
    function maps ``fn`` over the batch with ``jax.lax.map`` (unbatched
    arguments are broadcast; an outer vmap maps again), so LAPACK only sees
    single matrices; elsewhere it vmaps ``fn``.
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
        if sequential_batches():
            out = jax.lax.map(lambda xs: wrapped(*xs), args)
        else:
            out = jax.vmap(fn)(*args)
        return out, jax.tree.map(lambda _: True, out)

    wrapped.def_vmap(rule)
    return wrapped
