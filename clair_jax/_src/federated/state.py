"""What the server carries from one round to the next, and what a round reports.

:class:`ServerState` is a pytree of arrays: the global adapter, every client's
adapter (stacked on a leading client axis) and counters. :func:`next_state`
advances it once an aggregator has combined a round's participants, the same way
for :func:`clair_jax.make_round` and for the Flower strategy
(:class:`clair_jax.flower.AdapterStrategy`): the participants take the adapters
the aggregator gave them, the others keep theirs, except under a broadcast rule
(one whose every participant's adapter equals its global adapter, e.g. FedIT),
where they receive the new global adapter too. :class:`RoundMetrics` is what a
round reports, and :func:`describe_screening` renders its screening reasons.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from clair_jax._src import validation
from clair_jax._src.aggregators import screening
from clair_jax._src.lora.types import Adapters


class ServerState(NamedTuple):
    """Everything the server carries from one round to the next (arrays only).

    Attributes:
      round: int32 scalar, rounds completed.
      global_: the global adapter (unstacked ``Adapters``).
      clients: ``(n, ...)`` the adapter each client starts its next round from.
      flag_counts: ``(n,)`` int32, rounds in which each client was flagged.
      participation_counts: ``(n,)`` int32, rounds each client took part in.
    """

    round: Int[Array, ""]
    global_: Adapters
    clients: Adapters
    flag_counts: Int[Array, " n"]
    participation_counts: Int[Array, " n"]


class RoundMetrics(NamedTuple):
    """What a round reports.

    Attributes:
      participants: ``(k,)`` int32 indices of the clients that took part (sorted).
      local_losses: ``(k, local_steps)`` each participant's minibatch loss per step.
      flagged: ``(n,)`` bool, clients the aggregator flagged this round (the
        screened-out ones included).
      diagnostics: the aggregator's diagnostics (the built-in rules' include
        ``screened/*`` over the participants, see
        :func:`~clair_jax._src.aggregators.base.make_aggregator`).
      screened: ``(n,)`` int32 screening reason of every client (0: not
        screened out, or did not take part), codes into
        :data:`~clair_jax._src.aggregators.screening.REASONS`; render them with
        :func:`describe_screening`.
      refused: bool scalar, the round kept the previous global adapter because
        the new one was non-finite (or no included client had a positive weight).
    """

    participants: Int[Array, " k"]
    local_losses: Float[Array, "k s"]
    flagged: Bool[Array, " n"]
    diagnostics: dict[str, Array]
    screened: Int[Array, " n"] | None = None
    refused: Bool[Array, ""] | None = None


def describe_screening(metrics: RoundMetrics, module_names=()) -> list[str]:
    """One line per client screened out this round, e.g. ``"client 3: non-finite B in
    module 'w'"``.

    Args:
      metrics: a round's :class:`RoundMetrics`.
      module_names: the adapter's module names (e.g. ``state.global_.keys()``),
        to name the module of a non-finite factor.

    Returns:
      The lines, in client order (empty when nobody was screened out).
    """
    if metrics.screened is None:
        return []
    n = np.asarray(metrics.screened).shape[0]
    idx = np.asarray(metrics.participants)
    module = np.full(n, -1)
    factor = np.full(n, -1)
    if "screened/module" in metrics.diagnostics:
        module[idx] = np.asarray(metrics.diagnostics["screened/module"])
        factor[idx] = np.asarray(metrics.diagnostics["screened/factor"])
    return screening.describe(metrics.screened, module, factor, list(module_names))


def init_server_state(adapters: Adapters, num_clients: int) -> ServerState:
    """The state before round 0: every client starts from the initial ``adapters``.

    Args:
      adapters: unstacked initial adapters (e.g. from :func:`clair_jax.split_lora`).
      num_clients: ``n``.

    Returns:
      A :class:`ServerState` at round 0 with zero counters.

    Raises:
      ValueError: ``num_clients`` not a positive int.
    """
    n = validation.check_positive_int(num_clients, "num_clients")
    clients = jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *x.shape)), adapters)
    return ServerState(
        round=jnp.zeros((), jnp.int32),
        global_=dict(adapters),
        clients=clients,
        flag_counts=jnp.zeros((n,), jnp.int32),
        participation_counts=jnp.zeros((n,), jnp.int32),
    )


def is_broadcast(result_clients: Adapters, result_global: Adapters) -> Bool[Array, ""]:
    """Whether every stacked client adapter equals the global one (a broadcast rule).

    Args:
      result_clients: ``(k, ...)`` the participants' adapters an aggregator returned.
      result_global: the (unstacked) global adapter it returned.

    Returns:
      A scalar bool (traceable).
    """
    same = jax.tree.map(lambda c, g: jnp.all(c == g[None]), result_clients, result_global)
    return jnp.all(jnp.stack(jax.tree.leaves(same)))


def next_state(
    state: ServerState,
    idx: Int[Array, " k"],
    result_clients: Adapters,
    new_global: Adapters,
    flagged: Bool[Array, " n"],
) -> ServerState:
    """The state after a round in which the clients ``idx`` took part.

    Participant ``idx[j]`` starts its next round from ``result_clients``'s row
    ``j``. The other clients keep their adapter, or receive ``new_global`` when
    every participant's adapter equals it (:func:`is_broadcast`). The round
    counter is incremented, ``flagged`` added to the flag counts and the
    participants' participation counts incremented.

    Args:
      state: the state the round started from (``n`` clients).
      idx: ``(k,)`` sorted, distinct indices of the participants (static ``k``).
      result_clients: ``(k, ...)`` the participants' next adapters, row ``j`` for
        client ``idx[j]``, finite (the caller's commit guard).
      new_global: the global adapter to commit.
      flagged: ``(n,)`` bool, the clients flagged this round.

    Returns:
      The next :class:`ServerState` (traceable; its arrays are ``jax.Array``).
    """
    n = state.flag_counts.shape[0]
    result_clients = jax.tree.map(jnp.asarray, result_clients)
    if idx.shape[0] == n:  # everyone took part: idx is 0 .. n-1
        clients = result_clients
    else:
        broadcast = is_broadcast(result_clients, new_global)
        kept = jax.tree.map(
            lambda old, g: jnp.where(broadcast, jnp.broadcast_to(g, old.shape), old),
            state.clients,
            new_global,
        )
        clients = jax.tree.map(lambda c, r: c.at[idx].set(r), kept, result_clients)
    return ServerState(
        round=state.round + 1,
        global_=new_global,
        clients=clients,
        flag_counts=state.flag_counts + jnp.asarray(flagged, bool).astype(jnp.int32),
        participation_counts=state.participation_counts.at[idx].add(1),
    )
