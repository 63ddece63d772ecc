"""Applying a per-matrix linear-algebra routine over a batch, safely on every backend.

jaxlib 0.10's CPU LAPACK kernels (SVD, eigh, QR, ...) split a *batched* call
into chunks on XLA's intra-op thread pool and block until the chunks finish.
When XLA runs as many independent batched calls concurrently as the pool has
threads (two on a 2-core machine: e.g. the per-client SVDs of two adapted
modules in one aggregation), every pool thread blocks waiting for chunks that no
thread is free to run, and the program hangs at 0% CPU. Calls on a single matrix
run inline and are not affected, and XLA's scheduling barriers
(``lax.optimization_barrier``) do not survive to the CPU runtime, so the routine
is mapped over the batch with :func:`jax.lax.map` on CPU (one matrix at a time:
this costs the batch's intra-op parallelism, small for the matrices the
aggregators factorise) and with :func:`jax.vmap` elsewhere, where the batched
kernels are the fast path.

Two entry points: :func:`map_matrices` for a batch the library itself forms
(differentiable: ``lax.map`` is), and :func:`sequential_on_cpu` for the
factorisations inside the solvers, which a *caller's* ``jax.vmap`` batches (a
``custom_vmap`` rule; it also keeps nested vmaps sequential).

The hang, as seen with ``gdb`` (jaxlib 0.10.2, 2 cores): two ``jnp.linalg.qr`` of
``(16, 256, 16)`` float64 batches, independent, in one ``fori_loop`` body: both
``tf_XLAEigen`` threads wait in ``jax::ParallelBatchMap`` (under
``QrFactorization::Kernel``) for chunks queued on the pool itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array


def map_matrices(fn: Callable[..., Any], *batched: Array) -> Any:
    """``fn`` applied to every element of the leading axis of ``batched``.

    Equivalent to ``jax.vmap(fn)(*batched)``: on CPU it is computed with
    ``jax.lax.map`` (sequentially), to avoid the jaxlib 0.10 CPU thread-pool
    deadlock of concurrent batched LAPACK calls described in this module's
    docstring; on GPU/TPU with ``jax.vmap``.

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

    ``fn`` takes unbatched arrays (positional) and returns a pytree of arrays.
    Under ``jax.vmap`` on CPU the wrapped function maps ``fn`` over the batch
    with ``jax.lax.map`` (unbatched arguments are broadcast; an outer vmap maps
    again), so LAPACK only ever sees single matrices; elsewhere it vmaps ``fn``.
    Values equal ``jax.vmap(fn)``'s up to LAPACK's batched-versus-single rounding.

    The rule is a :func:`jax.custom_batching.custom_vmap`, which has no
    reverse-mode derivative: use it where no cotangent flows through ``fn``, e.g.
    in the primal computation of a ``jax.custom_jvp`` whose rule does not
    differentiate ``fn`` (the solvers' thresholding maps).

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
