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
from clair_jax._src.federated.checkpoint import CheckpointError, run_identity
from clair_jax._src.federated.run_checkpoint import RunCheckpoint
from clair_jax._src.federated.state import RoundMetrics, ServerState
from clair_jax._src.progress import ProgressBar


def _identity_check(identity: str):
    """A run-record check refusing a checkpoint written by another run."""

    def check(record: dict, where: str) -> None:
        stored = record.get("identity")
        if stored != identity:
            raise CheckpointError(
                f"checkpoint {where!r} was written by another run ({stored}), not this one "
                f"({identity}); delete it, use another directory, or pass the key and run_id "
                "it was written with."
            )

    return check


def _check_options(num_rounds, run_id, keep_checkpoints) -> int:
    """Validates run_rounds' options; returns ``num_rounds`` as an int."""
    if isinstance(num_rounds, bool) or not isinstance(num_rounds, numbers.Integral):
        raise TypeError(f"num_rounds must be an int, got {type(num_rounds).__name__}.")
    if num_rounds < 0:
        raise ValueError(f"num_rounds must be >= 0, got {num_rounds}.")
    if run_id is not None and not isinstance(run_id, str):
        raise TypeError(f"run_id must be a str or None, got {type(run_id).__name__}.")
    if (
        isinstance(keep_checkpoints, bool)
        or not isinstance(keep_checkpoints, numbers.Integral)
        or keep_checkpoints < 1
    ):
        raise ValueError(f"keep_checkpoints must be an int >= 1, got {keep_checkpoints!r}.")
    return int(num_rounds)


def run_rounds(
    round_fn: Callable,
    state: ServerState,
    client_data: ClientData,
    key: PRNGKeyArray,
    num_rounds: int,
    *,
    checkpoint: str | os.PathLike | None = None,
    run_id: str | None = None,
    keep_checkpoints: int = 2,
    async_checkpoint: bool = False,
    progress: bool | None = None,
    desc: str = "rounds",
    callback: Callable[[ServerState, RoundMetrics], Any] | None = None,
) -> tuple[ServerState, list[RoundMetrics]]:
    """Runs rounds until ``num_rounds`` are done, checkpointing after each one.

    Round ``t`` uses the key ``jax.random.fold_in(key, t)``, so the result
    depends only on ``key`` and the initial state, whether the run was
    interrupted or not.

    With ``checkpoint``, a directory, every round is saved there with
    ``orbax.checkpoint`` (one step directory per round, written atomically; the
    ``keep_checkpoints`` latest are kept) together with the metrics of every
    round so far. If the directory holds a step, the run resumes from the
    latest: its state (sharded leaves restored into the sharding of ``state``)
    and its history. The step records the run's key and ``run_id``; resuming
    from one written by another run (another seed, or another ``run_id``) is an
    error rather than a silent continuation of that run. The directory is
    created and checked to be writable before the first round; the temporary
    directories of a killed run are removed. A crash loses at most the round in
    flight (with ``async_checkpoint``, also the round being written). A
    single-file ``.npz`` checkpoint of an earlier clair_jax is refused with the
    way to continue its run (``cj.load_checkpoint`` it, and pass a new
    directory).

    Args:
      round_fn: from :func:`make_round`.
      state: the initial state (:func:`init_server_state`); also the template
        (structure, shapes, dtypes, shardings) of a restored state.
      client_data: the clients' training data.
      key: ``jax.random`` key of the whole run.
      num_rounds: total rounds (including those already in the checkpoint); a
        state (or checkpoint) already that far is returned as it is.
      checkpoint: the directory to resume from and to save to after every round.
      run_id: a string naming the run's configuration (e.g. the aggregator and
        its options), stored in the checkpoint and checked on resume, so that
        runs differing in more than their key cannot share a checkpoint by
        mistake.
      keep_checkpoints: how many of the latest rounds' steps to keep (``>= 1``).
      async_checkpoint: write each round's step in the background while the
        next round runs (worth it for large states on accelerators).
      progress: show a text progress bar (``None``: only on a terminal).
      desc: the progress bar's label.
      callback: called as ``callback(state, metrics)`` after every round run
        (and after its checkpoint is written, or started with
        ``async_checkpoint``), e.g. to evaluate the clients.

    Returns:
      The final state and the metrics of every round: those restored from the
      checkpoint followed by those run by this call (without a checkpoint, those
      of this call only).

    Raises:
      CheckpointError: (a ``ValueError``) the checkpoint does not fit ``state``
        (structure, shapes, dtypes), was written by a run with another key or
        ``run_id``, is unreadable or corrupt, holds non-finite values or a round
        beyond ``num_rounds``, or the directory is not writable; one line naming
        the step directory and what to do.
      ValueError: a negative ``num_rounds`` or ``keep_checkpoints < 1``.
      TypeError: a non-int ``num_rounds`` or a non-str ``run_id``.
    """
    num_rounds = _check_options(num_rounds, run_id, keep_checkpoints)
    identity = run_identity(key, run_id)
    store = None
    history: list[RoundMetrics] = []
    first_round = int(state.round)
    if checkpoint is not None:
        store = RunCheckpoint(
            os.fspath(checkpoint), keep=int(keep_checkpoints), async_save=bool(async_checkpoint)
        )
    try:
        if store is not None:
            restored = store.restore(state, _identity_check(identity), num_rounds)
            if restored is not None:
                state, history, record = restored
                first_round = record.get("first_round", 0)
        start = int(state.round)
        record = {"identity": identity, "first_round": first_round}
        with ProgressBar(max(num_rounds - start, 0), desc=desc, enabled=progress) as bar:
            for t in range(start, num_rounds):
                state, metrics = round_fn(state, client_data, jax.random.fold_in(key, t))
                history.append(jax.device_get(metrics))
                if store is not None:
                    store.save(state, history, record)
                if callback is not None:
                    callback(state, metrics)
                bar.update(loss=float(np.mean(metrics.local_losses[:, -1])))
    finally:
        if store is not None:
            store.close()
    return state, history
