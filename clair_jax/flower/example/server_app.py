"""The example's ServerApp: CLAIR (or another rule) over the nodes' LoRA adapters.

It builds the run's task (:mod:`clair_jax.flower.example.task`), starts an
:class:`~clair_jax.flower.AdapterStrategy` with the initial adapters and runs
``num-rounds`` rounds. The finished run (strategy, Flower result, settings and
the detection scores against the federation's ground truth) is kept in
:data:`LAST_RUN` (read it when the ServerApp runs in your process, e.g. under
the simulation runtime) and logged.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

import clair_jax as cj
from clair_jax.flower.example import task
from clair_jax.flower.serialization import adapters_to_arrays
from clair_jax.flower.strategy import AdapterStrategy

LAST_RUN: dict[str, Any] = {}
"""The last run of a ServerApp in this process (``"strategy"``, ``"result"``,
``"settings"``, ``"detection"``)."""

logger = logging.getLogger("flwr")


def make_server_app(overrides: Mapping[str, Any] | None = None) -> ServerApp:
    """The ServerApp; ``overrides`` update the run config (see :data:`task.DEFAULTS`)."""
    overrides = dict(overrides or {})
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = task.settings({**context.run_config, **overrides})
        run = task.task(cfg)
        strategy = AdapterStrategy(
            task.aggregator(cfg),
            num_clients=cfg["num-clients"],
            key=jax.random.key(cfg["seed"]),
            pad=cfg["pad"],
            fraction_evaluate=cfg["fraction-evaluate"],
            wait_timeout=cfg["wait-timeout"],
        )
        result = strategy.start(
            grid=grid,
            initial_arrays=adapters_to_arrays(run.adapters),
            num_rounds=cfg["num-rounds"],
            train_config=ConfigRecord({"aggregator": cfg["aggregator"]}),
        )
        flagged = strategy.history[-1]["flagged"]
        truth = np.asarray(run.federation.contaminated)
        detection = {k: float(v) for k, v in cj.detection_metrics(flagged, truth)._asdict().items()}
        logger.info(
            "clair_jax example: flagged %s, contaminated %s, %s",
            np.flatnonzero(flagged).tolist(),
            np.flatnonzero(truth).tolist(),
            detection,
        )
        LAST_RUN.clear()
        LAST_RUN.update(strategy=strategy, result=result, settings=cfg, detection=detection)

    return app


app = make_server_app()
"""The ServerApp of ``flwr run`` (``clair_jax.flower.example.server_app:app``)."""
