"""Driving many rounds with checkpoint and resume."""

from __future__ import annotations

import numbers
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jaxtyping import PRNGKeyArray

from clair_jax._src.data import ClientData
from clair_jax._src.federated.checkpoint import load_tagged, run_identity, save_tagged
from clair_jax._src.federated.round import RoundMetrics, ServerState
from clair_jax._src.progress import ProgressBar


def run_rounds(
    round_fn: Callable,
    state: ServerState,
    client_data: ClientData,
    key: PRNGKeyArray,
    num_rounds: int,
    *,
    checkpoint: str | os.PathLike | None = None,
    run_id: str | None = None,
    progress: bool | None = None,
    desc: str = "rounds",
    callback: Callable[[ServerState, RoundMetrics], Any] | None = None,
) -> tuple[ServerState, list[RoundMetrics]]:
    """Runs rounds until ``num_rounds`` are done, checkpointing after each one.

    Round ``t`` uses the key ``jax.random.fold_in(key, t)``, so the result
    depends only on ``key`` and the initial state, whether the run was
    interrupted or not. If ``checkpoint`` exists it is loaded first (its
    structure must match ``state``) and the run resumes after its last
    completed round. The checkpoint records the run's key and ``run_id``;
    resuming from one written by another run (another seed, or another
    ``run_id``) is an error rather than a silent continuation of that run.

    Args:
      round_fn: from :func:`make_round`.
      state: the initial state (:func:`init_server_state`).
      client_data: the clients' training data.
      key: ``jax.random`` key of the whole run.
      num_rounds: total rounds (including those already in the checkpoint); a
        state (or checkpoint) already that far is returned as it is.
      checkpoint: file to resume from and to save to after every round.
      run_id: a string naming the run's configuration (e.g. the aggregator and
        its options), stored in the checkpoint and checked on resume, so that
        runs differing in more than their key cannot share a checkpoint by
        mistake. (A file written by :func:`save_checkpoint` has no run record
        and is resumed from unchecked.)
      progress: show a text progress bar (``None``: only on a terminal).
      desc: the progress bar's label.
      callback: called as ``callback(state, metrics)`` after every round run
        (and after its checkpoint is written), e.g. to evaluate the clients.

    Returns:
      The final state and the metrics of the rounds run by this call.

    Raises:
      ValueError: ``checkpoint`` does not fit ``state`` (entries, shapes, dtypes)
        or was written by a run with another key or ``run_id``; a negative
        ``num_rounds``.
      TypeError: a non-int ``num_rounds`` or a non-str ``run_id``.
    """
    if isinstance(num_rounds, bool) or not isinstance(num_rounds, numbers.Integral):
        raise TypeError(f"num_rounds must be an int, got {type(num_rounds).__name__}.")
    if num_rounds < 0:
        raise ValueError(f"num_rounds must be >= 0, got {num_rounds}.")
    num_rounds = int(num_rounds)
    if run_id is not None and not isinstance(run_id, str):
        raise TypeError(f"run_id must be a str or None, got {type(run_id).__name__}.")
    identity = run_identity(key, run_id)
    if checkpoint is not None and os.path.exists(checkpoint):
        state = load_tagged(checkpoint, state, run=identity)
    history = []
    start = int(state.round)
    with ProgressBar(max(num_rounds - start, 0), desc=desc, enabled=progress) as bar:
        for t in range(start, num_rounds):
            state, metrics = round_fn(state, client_data, jax.random.fold_in(key, t))
            if checkpoint is not None:
                save_tagged(checkpoint, state, run=identity)
            history.append(jax.device_get(metrics))
            if callback is not None:
                callback(state, metrics)
            bar.update(loss=float(np.mean(metrics.local_losses[:, -1])))
    return state, history
