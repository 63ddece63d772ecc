"""Checkpoints of a :func:`clair_jax.run_rounds` run: Orbax step directories.

A run's checkpoint is a directory managed by an ``orbax.checkpoint``
``CheckpointManager``: after round ``t`` a step directory ``<directory>/<t>``
is written (to a temporary directory first, renamed when complete, so a crash
leaves whole steps only; temporary directories of a killed run are removed when
the next run opens the directory) holding three items:

* ``state``: the :class:`~clair_jax.ServerState` leaves (``StandardSave``, so a
  sharded array is written by the devices holding it and restored into the
  sharding of the template state);
* ``history``: every round's :class:`~clair_jax.RoundMetrics` (JSON, exact for
  the float32 values: a float64 decimal round-trips them);
* ``run``: the run record (JSON): the run's key and ``run_id``, the first round
  of its history, and the state's leaf paths, shapes and dtypes.

Restoring checks the run record, then the state's shapes and dtypes from the
Orbax metadata, before any array is read; then the values (finite, a round
counter equal to the step, not beyond the run's rounds, a history of the right
length). Every failure is a :class:`CheckpointError`, one line naming the step
directory and saying what to do. ``orbax.checkpoint`` is imported on first use
(it is slow to import).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
import zipfile
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from clair_jax._src.federated.checkpoint import (
    CheckpointError,
    check_finite,
    first_line,
    load_npz,
    sync_directory,
)
from clair_jax._src.federated.state import RoundMetrics, ServerState

#: Version of the step layout written here (in the run record).
FORMAT = 1
_TMP_MARK = ".orbax-checkpoint-tmp"


def _ocp():
    """``orbax.checkpoint``, imported on first use (it is slow to import).

    orbax-checkpoint 0.12 reads, when imported, names that JAX 0.12 deprecates
    (``jax.sharding.SingleDeviceSharding``); that ``DeprecationWarning`` is about
    orbax's code, not the caller's, and is silenced for the import.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"orbax\.")
        import orbax.checkpoint as ocp

    return ocp


def _leaf_table(tree: Any) -> tuple[list[str], list[Any]]:
    """The key paths and leaves of ``tree``."""
    pairs = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [jax.tree_util.keystr(p) for p, _ in pairs], [x for _, x in pairs]


def _names(count: int) -> list[str]:
    """Orbax item keys of the flattened state (paths are kept in the run record)."""
    return [f"leaf_{i:05d}" for i in range(count)]


def _encode(value: Any) -> Any:
    """A metrics field as JSON: ``{"dict": ...}`` or ``{"array": [dtype, shape, values]}``."""
    if isinstance(value, Mapping):
        return {"dict": {str(k): _encode(v) for k, v in value.items()}}
    x = np.asarray(value)
    flat = x.astype(np.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x
    return {"array": [x.dtype.name, list(x.shape), flat.ravel().tolist()]}


def _decode(obj: Any) -> Any:
    if set(obj) == {"dict"}:
        return {k: _decode(v) for k, v in obj["dict"].items()}
    dtype, shape, values = obj["array"]
    return np.asarray(values, dtype=jnp.dtype(dtype)).reshape(shape)


def encode_history(history: list[RoundMetrics]) -> list[dict]:
    """JSON-ready rounds: ``{field: encoded value}`` per :class:`RoundMetrics`."""
    return [{f: _encode(v) for f, v in m._asdict().items()} for m in history]


def decode_history(rounds: list, where: str) -> list[RoundMetrics]:
    """The inverse of :func:`encode_history` (NumPy arrays)."""
    out = []
    for entry in rounds:
        if not isinstance(entry, dict) or set(entry) != set(RoundMetrics._fields):
            fields = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
            raise CheckpointError(
                f"checkpoint {where!r}: its history holds {fields}, not the fields of "
                f"RoundMetrics {sorted(RoundMetrics._fields)} (another version of clair_jax?); "
                "delete the directory to start again."
            )
        out.append(RoundMetrics(**{f: _decode(v) for f, v in entry.items()}))
    return out


def prepare_directory(directory: str) -> str:
    """Creates ``directory``, checks it is writable, removes the temporaries of killed runs.

    Raises:
      CheckpointError: ``directory`` is a file (an ``.npz`` checkpoint of an
        earlier clair_jax, or anything else), or cannot be created or written.
    """
    directory = os.path.abspath(os.fspath(directory))
    if os.path.isfile(directory):
        if zipfile.is_zipfile(directory):
            raise CheckpointError(
                f"checkpoint {directory!r} is a single-file checkpoint of an earlier clair_jax; "
                "run_rounds now keeps a checkpoint directory: continue that run with "
                f"state = cj.load_checkpoint({directory!r}, like=state) and pass a new "
                "directory as checkpoint=."
            )
        raise CheckpointError(
            f"checkpoint {directory!r} is a file, not a checkpoint directory: pass a directory."
        )
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory) as probe:
            probe.write(b"0")
            probe.flush()
            os.fsync(probe.fileno())
        for entry in os.listdir(directory):
            if _TMP_MARK in entry:  # a step a killed run was writing
                shutil.rmtree(os.path.join(directory, entry), ignore_errors=True)
    except OSError as err:
        raise CheckpointError(
            f"checkpoint directory {directory!r} is not writable ({first_line(err)}): "
            "choose another checkpoint= path or fix its permissions."
        ) from None
    return directory


class RunCheckpoint:
    """The Orbax ``CheckpointManager`` of one run's checkpoint directory.

    Args:
      directory: the checkpoint directory (created; it must be writable).
      keep: how many of the latest steps to keep (``>= 1``).
      async_save: write each step in the background while the next round runs.
      read_only: only restore (the directory must exist; nothing is removed).
    """

    def __init__(
        self, directory: str, *, keep: int = 2, async_save: bool = False, read_only: bool = False
    ):
        ocp = _ocp()
        if read_only:
            self.directory = os.path.abspath(os.fspath(directory))
        else:
            self.directory = prepare_directory(directory)
        self.async_save = async_save
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(keep),
            enable_async_checkpointing=async_save,
            create=not read_only,
            read_only=read_only,
        )
        try:
            handlers = {
                "state": ocp.StandardCheckpointHandler(),
                "history": ocp.JsonCheckpointHandler(),
                "run": ocp.JsonCheckpointHandler(),
            }
            self.manager = ocp.CheckpointManager(
                self.directory, options=options, item_handlers=handlers
            )
        except Exception as err:  # any Orbax/tensorstore failure, one line
            raise CheckpointError(
                f"checkpoint directory {self.directory!r} cannot be opened "
                f"({first_line(err)}): choose another checkpoint= path."
            ) from None

    def close(self) -> None:
        """Waits for a background write and releases Orbax's threads."""
        try:
            self.manager.wait_until_finished()
        finally:
            self.manager.close()
        sync_directory(self.directory)

    def __enter__(self) -> RunCheckpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def save(self, state: ServerState, history: list, record: dict, step: int | None = None):
        """Saves step ``state.round`` (or ``step``): the state, the history and ``record``."""
        ocp = _ocp()
        paths, leaves = _leaf_table(state)
        record = {
            **record,
            "format": FORMAT,
            "paths": paths,
            "shapes": [list(np.shape(x)) for x in leaves],
            "dtypes": [jnp.dtype(x.dtype).name for x in leaves],
        }
        step = int(state.round) if step is None else step
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(dict(zip(_names(len(leaves)), leaves, strict=True))),
            history=ocp.args.JsonSave(encode_history(history)),
            run=ocp.args.JsonSave(record),
        )
        try:
            self.manager.save(step, args=args, force=True)
            if not self.async_save:
                self.manager.wait_until_finished()
        except Exception as err:  # any Orbax/tensorstore failure, one line
            where = os.path.join(self.directory, str(step))
            raise CheckpointError(
                f"cannot write checkpoint {where!r} ({first_line(err)}): check the disk "
                "space and permissions of the checkpoint directory."
            ) from None
        sync_directory(self.directory)

    def restore(self, like: Any, check_record=None, num_rounds: int | None = None):
        """The latest step: ``(state, history, record)``, or None for an empty directory.

        Args:
          like: the template state (structure, shapes, dtypes, shardings).
          check_record: called with the run record before any array is read
            (e.g. to compare the run identity); it raises to refuse the step.
          num_rounds: the run's rounds; a step beyond them is refused.

        Raises:
          CheckpointError: an unreadable or corrupt step, a state that does not
            fit ``like``, non-finite values, or an impossible round counter.
        """
        ocp = _ocp()
        self.manager.reload()
        step = self.manager.latest_step()
        if step is None:
            return None
        where = os.path.join(self.directory, str(step))
        paths, leaves = _leaf_table(like)
        try:
            record = self.manager.restore(step, args=ocp.args.Composite(run=ocp.args.JsonRestore()))
            record = record["run"]
            if not isinstance(record, dict):
                raise ValueError("the run record is not a JSON object")
            if check_record is not None:
                check_record(record, where)
            if record.get("format") != FORMAT:
                raise CheckpointError(
                    f"checkpoint {where!r} has format {record.get('format')!r}, this clair_jax "
                    f"reads {FORMAT}: delete the directory to start again."
                )
            self._check_layout(step, where, record, paths, leaves)
            targets = dict(zip(_names(len(leaves)), map(_target, leaves), strict=True))
            items = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(targets), history=ocp.args.JsonRestore()
                ),
            )
            restored = [jnp.asarray(items["state"][name]) for name in _names(len(leaves))]
            rounds = items["history"]
            if not isinstance(rounds, list):
                raise ValueError("the history is not a JSON list")
            history = decode_history(rounds, where)
        except CheckpointError:
            raise
        except Exception as err:  # any Orbax/tensorstore/JSON failure, one line
            raise CheckpointError(
                f"checkpoint {where!r} cannot be read ({first_line(err)}); it may be "
                "truncated or corrupt: delete that step directory to resume from the one "
                "before it, or the whole directory to start again."
            ) from None
        check_finite(list(zip(paths, restored, strict=True)), where)
        state = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(like), restored)
        _check_counters(state, step, history, record, num_rounds, where)
        return state, history, record

    def _check_layout(self, step, where, record, paths, leaves) -> None:
        """Compares the stored shapes and dtypes (record and Orbax metadata) with the template."""
        if record.get("paths") != paths:
            raise CheckpointError(
                f"checkpoint {where!r} holds another structure ({len(record.get('paths', []))} "
                f"leaves, expected {len(paths)}); pass the state it was written from, or "
                "delete the directory to start again."
            )
        metadata = self.manager.item_metadata(step)["state"]
        tree = getattr(metadata, "tree", metadata)
        names = _names(len(leaves))
        if tree is None or sorted(tree) != names:
            raise ValueError("the state's metadata does not list its leaves")
        for path, name, x in zip(paths, names, leaves, strict=True):
            stored = tree[name]
            got = (tuple(stored.shape), jnp.dtype(stored.dtype))
            if got != (tuple(np.shape(x)), jnp.dtype(x.dtype)):
                raise CheckpointError(
                    f"checkpoint {where!r}: entry {path}: stored {got[0]} {got[1]}, expected "
                    f"{tuple(np.shape(x))} {jnp.dtype(x.dtype)}; pass the state it was "
                    "written from, or delete the directory to start again."
                )


def _target(x: Any) -> Any:
    """What Orbax restores a leaf like ``x`` into.

    A committed ``jax.Array`` (placed on devices, e.g. sharded) comes back with
    its sharding; anything else as a host array, made an uncommitted
    ``jax.Array`` like those of :func:`clair_jax.init_server_state` (so a
    jitted round is not compiled again for a committed input).
    """
    if isinstance(x, jax.Array) and x.committed:
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return np.empty(np.shape(x), jnp.dtype(x.dtype))


def _check_counters(state, step: int, history: list, record: dict, num_rounds, where) -> None:
    """The round counter must be the step, within the run, and match the history's length."""
    rounds = np.asarray(getattr(state, "round", step))
    first = record.get("first_round", 0)
    if rounds.shape != () or not np.issubdtype(rounds.dtype, np.integer):
        raise CheckpointError(f"checkpoint {where!r}: the round counter is not an integer.")
    done = int(rounds)
    problem = None
    if done != step:
        problem = f"holds round {done} in step {step}"
    elif done < 0:
        problem = f"holds round {done}"
    elif not isinstance(first, int) or not 0 <= first <= done or len(history) != done - first:
        problem = f"holds round {done} with {len(history)} rounds of history from {first!r}"
    if problem is not None:
        raise CheckpointError(
            f"checkpoint {where!r} {problem}, which is impossible (tampered or corrupt): "
            "delete that step directory to resume from the one before it."
        )
    if num_rounds is not None and done > num_rounds:
        raise CheckpointError(
            f"checkpoint {where!r} holds round {done}, beyond num_rounds={num_rounds}: pass "
            f"num_rounds >= {done}, or another checkpoint directory."
        )


def load_checkpoint(path: str | os.PathLike, like: Any) -> Any:
    """Loads a checkpoint into the structure of ``like``: a file or a run's directory.

    * a file written by :func:`clair_jax.save_checkpoint` (``.npz``; also those
      ``run_rounds`` wrote before it kept checkpoint directories);
    * a checkpoint directory of :func:`clair_jax.run_rounds`: the state of its
      latest round (``like`` is then the run's state; sharded leaves are
      restored into their sharding).

    Everything is checked before it is used: the structure, shapes and dtypes
    (from the file's headers or the Orbax metadata, before any array is read),
    and the values (finite; for a run, a round counter matching its step).

    Args:
      path: the checkpoint file or directory.
      like: a pytree with the expected structure, shapes and dtypes (e.g. the
        initial state); its values are not used.

    Returns:
      A pytree of ``like``'s structure holding the stored arrays.

    Raises:
      CheckpointError: (a ``ValueError``) a missing, unreadable or corrupt
        checkpoint, entries, shapes or dtypes that differ from ``like``'s, or
        non-finite values; the message names the file and says what to do.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        checkpoint = RunCheckpoint(path, read_only=True)
        try:
            restored = checkpoint.restore(like)
        finally:
            checkpoint.close()
        if restored is None:
            raise CheckpointError(f"checkpoint directory {path!r} holds no completed round.")
        return restored[0]
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist.")
    return load_npz(path, like)
