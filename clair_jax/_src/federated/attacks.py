"""The attack model applied to what clients send.

Factor by factor, client ``i`` sends ``start_i + s_i (trained_i - start_i)``
(``s_i = update_scale``: 1 honest, ``> 1`` scaled, ``< 0`` sign flipped), and the
clients marked ``coordinated`` all send
``start_i + mean_{j coordinated} s_j (trained_j - start_j)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from clair_jax._src.lora.types import Adapters


def attack(start: Adapters, trained: Adapters, scale, coordinated) -> Adapters:
    """What clients send under the attack model (see the module docstring).

    Args:
      start: ``(n, ...)`` adapters the clients started the round from.
      trained: ``(n, ...)`` adapters after local training.
      scale: ``(n,)`` update multipliers ``s_i``.
      coordinated: ``(n,)`` bool, the coordinated group.

    Returns:
      The ``(n, ...)`` adapters sent.
    """

    def sent(x0, x1):
        shape = (-1,) + (1,) * (x0.ndim - 1)
        delta = scale.reshape(shape).astype(x0.dtype) * (x1 - x0)
        group = coordinated.reshape(shape)
        count = jnp.maximum(jnp.sum(coordinated), 1).astype(x0.dtype)
        common = jnp.sum(jnp.where(group, delta, 0.0), axis=0, keepdims=True) / count
        return x0 + jnp.where(group, common, delta)

    return jax.tree.map(sent, start, trained)
