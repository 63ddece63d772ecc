"""A Flower strategy that aggregates LoRA adapters with any :class:`clair_jax.Aggregator`.

:class:`AdapterStrategy` is a Flower message-API ``Strategy`` (``configure_train``,
``aggregate_train``, ...; start it with ``strategy.start(grid=..., ...)`` in a
``ServerApp``). It keeps what :func:`clair_jax.make_round` keeps between rounds, a
:class:`clair_jax.ServerState`: the global adapter and the adapter every client
starts its next round from, so CLAIR sends each node its own refined adapter and
a flagged node keeps the one it trained.

Clients are slots ``0 .. num_clients - 1``. A reply names its slot with the metric
``client_key`` (``"partition-id"`` by default, the partition a Flower
simulation gives a node); a node that names none gets the first free slot when
it first replies. A node whose slot is not yet known starts from the global
adapter.

Each round the strategy:

1. sends every sampled node its slot's adapter and, in the train config, the
   ``"train-key"`` (the ``uint32`` data of a ``jax.random`` key, of the
   implementation named by ``"train-key-impl"``) from which the node derives its
   training key with ``jax.random.fold_in(train_key, slot)``;
2. checks the replies (:mod:`clair_jax.flower.replies`): error replies
   (``failed``), replies that do not fit (``invalid``: no ``ArrayRecord``, other
   modules, shapes or dtypes, a non-finite factor, a bad weight or slot, a slot
   already taken this round) and nodes that did not answer in time
   (``missing``) are left out of the round and counted in its metrics;
3. stacks the valid replies on the client axis and runs the aggregator, jitted.
   With ``pad=True`` the stack always has ``num_clients`` rows, one per slot: a
   slot without a valid reply holds the adapter it started from (an update of
   zero) with weight zero, so the shapes, and the compiled aggregation, do not
   change with the number of replies. For the weighted rules (FedIT, FlexLoRA,
   FedRot-LoRA, FFA-LoRA, Multi-Krum's average, the geometric median) a zero
   weight removes the row; the unweighted ones (coordinate median, trimmed
   mean, Krum's scores, CLAIR's decomposition) still see it, as a client that
   did not move. ``pad=False`` aggregates the valid replies only (exact for
   every rule; one compilation per number of replies);
4. updates the state as :func:`clair_jax.make_round` does for the clients that
   took part: each gets the aggregator's adapter for it, the others keep
   theirs (under a broadcast rule such as FedIT they get the new global one).

Keys follow :func:`clair_jax.run_rounds` and :func:`clair_jax.make_round`: round
``t`` (Flower's ``server_round``, from 1) splits ``fold_in(key, t - 1)`` into
``(sample, train, aggregate)`` keys; the aggregator gets the third, the clients
the second. Clients that train with :func:`clair_jax.local_train` from the
adapter they receive, with that key, the same data and settings, therefore
reproduce :func:`clair_jax.make_round`'s round (up to float rounding of the
vmapped training).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from clair_jax._src import validation
from clair_jax._src.aggregators.base import Aggregator
from clair_jax._src.federated.state import ServerState, init_server_state, next_state
from clair_jax._src.lora.types import Adapters, LoRAFactors
from clair_jax.flower import replies as reply_io
from clair_jax.flower.serialization import adapters_to_arrays, arrays_to_adapters

logger = logging.getLogger("flwr")


class AdapterStrategy(Strategy):
    """Federated LoRA with a :class:`clair_jax.Aggregator`, as a Flower strategy.

    See the module docstring for the round. ``strategy.state`` is the
    :class:`clair_jax.ServerState` (``None`` before the first round) and
    ``strategy.history`` one dict per round: ``"flagged"`` (``(num_clients,)``
    bool), ``"replied"`` (the slots aggregated), ``"failed"``, ``"invalid"``,
    ``"missing"`` (counts) and ``"diagnostics"`` (the aggregator's, as NumPy).

    Args:
      aggregator: the server rule (e.g. :func:`clair_jax.clair_aggregator`).
      num_clients: the number of client slots (the padded client axis).
      key: ``jax.random`` key of the run (see the module docstring).
      pad: pad the client axis to ``num_clients`` with zero-weight rows.
      fraction_train: fraction of the connected nodes sampled for training.
      fraction_evaluate: fraction sampled for evaluation (0: no evaluation).
      min_available_nodes: nodes to wait for before sampling (default ``num_clients``).
      wait_timeout: seconds to wait for them; ``None`` waits as long as it takes (as
        Flower's strategies do); past it, ``configure_train`` raises ``RuntimeError``.
      client_key: the reply metric naming the node's slot.
      weighted_by_key: the reply metric with the node's aggregation weight.
      arrayrecord_key: the content key of the adapter in messages.
      configrecord_key: the content key of the config in messages.

    Raises:
      TypeError: ``aggregator`` is not an :class:`clair_jax.Aggregator`.
      ValueError: ``num_clients`` not a positive int, a fraction outside ``[0, 1]``.
    """

    def __init__(
        self,
        aggregator: Aggregator,
        *,
        num_clients: int,
        key: jax.Array,
        pad: bool = True,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 0.0,
        min_available_nodes: int | None = None,
        wait_timeout: float | None = None,
        client_key: str = "partition-id",
        weighted_by_key: str = "num-examples",
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
    ) -> None:
        if not isinstance(aggregator, Aggregator):
            raise TypeError(f"aggregator must be an Aggregator, got {type(aggregator).__name__}.")
        self.num_clients = validation.check_positive_int(num_clients, "num_clients")
        fractions = {"fraction_train": fraction_train, "fraction_evaluate": fraction_evaluate}
        for name, value in fractions.items():
            if not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value!r}.")
        self.aggregator = aggregator
        self.key = key
        self.pad = bool(pad)
        self.fraction_train = float(fraction_train)
        self.fraction_evaluate = float(fraction_evaluate)
        self.min_available_nodes = (
            self.num_clients if min_available_nodes is None else int(min_available_nodes)
        )
        self.wait_timeout = wait_timeout
        self.client_key = client_key
        self.weighted_by_key = weighted_by_key
        self.arrayrecord_key = arrayrecord_key
        self.configrecord_key = configrecord_key
        self.state: ServerState | None = None
        self.slots: dict[int, int] = {}
        self.history: list[dict[str, Any]] = []
        self._sent: dict[int, Adapters] = {}
        self._like: Adapters | None = None
        self._traces = 0
        self._aggregate = jax.jit(self._traced_aggregate)

    # --- bookkeeping ------------------------------------------------------------------------

    @property
    def num_traces(self) -> int:
        """How many times the aggregation was traced (each trace is one compilation)."""
        return self._traces

    def _traced_aggregate(self, clients, global_, weights, round_index, key, start):
        self._traces += 1  # runs at trace time only
        args = (clients, global_, weights, round_index, key)
        if self.aggregator.uses_start:
            return self.aggregator.aggregate(*args, start=start)
        return self.aggregator.aggregate(*args)

    def round_keys(self, server_round: int) -> tuple[jax.Array, jax.Array]:
        """``(train_key, aggregate_key)`` of Flower round ``server_round`` (from 1)."""
        round_key = jax.random.fold_in(self.key, server_round - 1)
        _, k_train, k_agg = jax.random.split(round_key, 3)
        return k_train, k_agg

    def _start_state(self, arrays: ArrayRecord) -> None:
        adapters = arrays_to_adapters(arrays)
        self._like = {k: LoRAFactors(*map(np.asarray, v)) for k, v in adapters.items()}
        self.state = init_server_state(adapters, self.num_clients)

    def _adapter_of(self, node_id: int) -> Adapters:
        slot = self.slots.get(node_id)
        if slot is None:
            return jax.tree.map(np.asarray, self.state.global_)
        return reply_io.row(self.state.clients, slot)

    def _sample(self, grid: Grid, fraction: float) -> list[int]:
        """``ceil(fraction * connected)`` nodes, once ``min_available_nodes`` are connected."""
        start = time.monotonic()
        while len(nodes := list(grid.get_node_ids())) < self.min_available_nodes:
            waited = time.monotonic() - start
            if self.wait_timeout is not None and waited > self.wait_timeout:
                raise RuntimeError(
                    f"{len(nodes)} nodes connected after {waited:.0f} s, "
                    f"min_available_nodes={self.min_available_nodes} (wait_timeout)."
                )
            logger.info("Waiting for nodes: %d of %d", len(nodes), self.min_available_nodes)
            time.sleep(1.0)
        size = max(1, min(len(nodes), math.ceil(fraction * len(nodes))))
        return nodes if size == len(nodes) else random.sample(nodes, size)

    def _messages(self, grid, fraction, message_type, config, extra) -> list[Message]:
        node_ids = self._sample(grid, fraction)
        messages, self._sent = [], {}
        for node_id in sorted(node_ids):
            adapter = self._adapter_of(node_id)
            if message_type == MessageType.TRAIN:
                self._sent[node_id] = adapter
            node_config = ConfigRecord(dict(config))
            for k, v in extra.items():
                node_config[k] = v
            arrays = adapters_to_arrays(adapter)
            content = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: node_config})
            messages.append(Message(content, dst_node_id=node_id, message_type=message_type))
        return messages

    # --- Strategy ---------------------------------------------------------------------------

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One train message per sampled node: its slot's adapter, the config, the train key."""
        if self.state is None:
            self._start_state(arrays)
        if self.fraction_train == 0.0:
            return []
        k_train, _ = self.round_keys(server_round)
        extra = {
            "server-round": server_round,
            "train-key": [int(v) for v in np.asarray(jax.random.key_data(k_train)).ravel()],
            "train-key-impl": str(jax.random.key_impl(k_train)),
        }
        return self._messages(grid, self.fraction_train, MessageType.TRAIN, config, extra)

    def _read_reply(self, msg: Message, taken: dict[int, int]) -> tuple[int, reply_io.Reply]:
        """``(slot, reply)`` of a valid reply; ``ValueError`` saying why not."""
        node_id = msg.metadata.src_node_id
        if node_id not in self._sent:
            raise ValueError(f"node {node_id} was not sent a train message this round")
        adapter, weight, metrics = reply_io.read_content(
            msg.content,
            like=self._like,
            arrayrecord_key=self.arrayrecord_key,
            weighted_by_key=self.weighted_by_key,
        )
        slot = reply_io.claim_slot(
            metrics.get(self.client_key, self.slots.get(node_id)),
            node_id,
            known=self.slots,
            taken=taken,
            num_clients=self.num_clients,
            client_key=self.client_key,
        )
        return slot, reply_io.Reply(adapter, weight, node_id)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregates the valid replies; returns the global adapter and the round's metrics."""
        replies = list(replies)
        n = self.num_clients
        failed = invalid = 0
        rows: dict[int, reply_io.Reply] = {}
        taken: dict[int, int] = {}
        answered = set()
        for msg in replies:
            node_id = msg.metadata.src_node_id
            answered.add(node_id)
            if msg.has_error():
                failed += 1
                logger.info("aggregate_train: node %d failed: %s", node_id, msg.error.reason)
                continue
            try:
                slot, reply = self._read_reply(msg, taken)
            except (KeyError, TypeError, ValueError) as err:
                invalid += 1
                logger.warning("aggregate_train: reply of node %d left out: %s", node_id, err)
                continue
            rows[slot] = reply
        missing = len(set(self._sent) - answered)
        record = {"failed": failed, "invalid": invalid, "missing": missing}
        flagged = np.zeros((n,), bool)
        replied = np.zeros((n,), bool)
        replied[list(rows)] = True
        metrics = {
            "num-replies": len(rows),
            "num-failed": failed,
            "num-invalid": invalid,
            "num-missing": missing,
        }
        if not rows or sum(r.weight for r in rows.values()) <= 0:
            logger.warning("aggregate_train: no valid reply with a positive weight; global kept")
            self.history.append(
                {**record, "flagged": flagged, "replied": replied, "diagnostics": {}}
            )
            return None, MetricRecord({**metrics, "num-flagged": 0})

        state = self.state
        slots = list(range(n)) if self.pad else sorted(rows)
        clients, starts, weights = reply_io.stack_rows(rows, slots, state.clients, self._sent)
        _, k_agg = self.round_keys(server_round)
        result = self._aggregate(clients, state.global_, weights, state.round, k_agg, starts)
        result = jax.device_get(result)
        idx = np.asarray([j for j, i in enumerate(slots) if i in rows])
        took_part = np.asarray([slots[j] for j in idx])
        new_global = {k: LoRAFactors(*map(jnp.asarray, v)) for k, v in result.global_.items()}
        flagged[took_part] = np.asarray(result.flagged, bool)[idx]
        result_clients = jax.tree.map(lambda x: np.asarray(x)[idx], dict(result.clients))
        self.state = next_state(state, took_part, result_clients, new_global, flagged)
        for i, reply in rows.items():
            self.slots[reply.node_id] = i
        diagnostics = {k: np.asarray(v) for k, v in result.diagnostics.items()}
        self.history.append(
            {**record, "flagged": flagged, "replied": replied, "diagnostics": diagnostics}
        )
        metrics["num-flagged"] = int(flagged.sum())
        if flagged.any():
            metrics["flagged-clients"] = [int(i) for i in np.flatnonzero(flagged)]
        for k, v in diagnostics.items():
            if v.ndim == 0 and np.issubdtype(v.dtype, np.number) and np.isfinite(v):
                metrics[k] = float(v)
        logger.info(
            "aggregate_train: %s on %d replies (%d failed, %d invalid, %d missing), flagged %s",
            self.aggregator.name,
            len(rows),
            failed,
            invalid,
            missing,
            np.flatnonzero(flagged).tolist(),
        )
        return adapters_to_arrays(new_global), MetricRecord(metrics)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One evaluate message per sampled node with its slot's current adapter."""
        if self.fraction_evaluate == 0.0 or self.state is None:
            return []
        sent = self._sent
        extra = {"server-round": server_round}
        messages = self._messages(grid, self.fraction_evaluate, MessageType.EVALUATE, config, extra)
        self._sent = sent
        return messages

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """The ``weighted_by_key``-weighted mean of the replies' metrics (errors left out)."""
        contents = [
            m.content
            for m in replies
            if not m.has_error()
            and m.content.metric_records
            and self.weighted_by_key in next(iter(m.content.metric_records.values()))
        ]
        if not contents:
            return None
        return aggregate_metricrecords(contents, self.weighted_by_key)

    def summary(self) -> None:
        """Logs the configuration."""
        logger.info(
            "\t├──> %s over %d client slots (pad=%s, uses_start=%s)",
            self.aggregator.name,
            self.num_clients,
            self.pad,
            self.aggregator.uses_start,
        )
        logger.info(
            "\t└──> fraction train %.2f | evaluate %.2f | min available nodes %d",
            self.fraction_train,
            self.fraction_evaluate,
            self.min_available_nodes,
        )
