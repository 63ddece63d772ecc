"""The example's ClientApp: a node fine-tunes the LoRA adapter it receives on its own data.

A node is client ``partition-id`` of the federation (Flower's simulation sets
it in the node config; a SuperNode gets it with
``--node-config "partition-id=<i>"``). It trains with
:func:`clair_jax.local_train` from the adapter the server sent, with the key
``fold_in(train_key, partition-id)`` (``train_key`` from the train config), and
replies with the adapter it sends (a contaminated client of an update attack
scales its update), its weight (``num-examples``) and its ``partition-id``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clair_jax.flower.example import task
from clair_jax.flower.serialization import adapters_to_arrays, arrays_to_adapters


def _received(msg: Message, cfg: Mapping[str, Any]):
    like = task.task(cfg).adapters
    return arrays_to_adapters(msg.content.array_records["arrays"], like=like)


def make_client_app(overrides: Mapping[str, Any] | None = None) -> ClientApp:
    """The ClientApp; ``overrides`` update the run config (see :data:`task.DEFAULTS`)."""
    overrides = dict(overrides or {})
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        cfg = task.settings({**context.run_config, **overrides})
        client = int(context.node_config["partition-id"])
        config = msg.content.config_records["config"]
        key_data = jnp.asarray(np.asarray(config["train-key"], np.uint32))
        train_key = jax.random.wrap_key_data(key_data, impl=config["train-key-impl"])
        sent, losses = task.train_client(cfg, client, _received(msg, cfg), train_key)
        metrics = MetricRecord(
            {
                "num-examples": cfg["train-examples"],
                "partition-id": client,
                "train-loss": float(losses[-1]),
            }
        )
        content = RecordDict({"arrays": adapters_to_arrays(sent), "metrics": metrics})
        return Message(content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        cfg = task.settings({**context.run_config, **overrides})
        client = int(context.node_config["partition-id"])
        accuracy = task.evaluate_client(cfg, client, _received(msg, cfg))
        metrics = MetricRecord({"num-examples": cfg["test-examples"], "accuracy": accuracy})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    return app


app = make_client_app()
"""The ClientApp of ``flwr run`` (``clair_jax.flower.example.client_app:app``)."""

__all__ = ["app", "make_client_app"]
