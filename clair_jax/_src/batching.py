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
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
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
