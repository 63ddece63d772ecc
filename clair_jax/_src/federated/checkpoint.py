"""Atomic checkpoints of pytrees of arrays (``numpy.savez``), loaded back bit for bit.

A checkpoint is written to a temporary file and renamed over its path, so a
crash leaves the old file or the new one. Leaves of the ``ml_dtypes`` types
NumPy cannot store (``bfloat16``, the ``float8`` types, ...) are saved as their
raw bits (unsigned integers of the same width) together with their dtype name.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PRNGKeyArray

#: Entry of a checkpoint holding ``{entry: dtype name}`` (JSON) for leaves stored as raw bits.
_DTYPES_ENTRY = "__dtypes__"
#: Entry of a checkpoint written by :func:`run_rounds`: the run's identity (run_identity),
#: checked by load_tagged when it resumes.
_RUN_ENTRY = "__run__"
#: Entries that are not leaves of the saved pytree.
_RESERVED = frozenset({_DTYPES_ENTRY, _RUN_ENTRY})


def _stored_as_bits(dtype: np.dtype) -> bool:
    """Whether ``numpy.savez`` cannot store ``dtype`` (ml_dtypes types: void to NumPy)."""
    return dtype.kind == "V" and not dtype.fields


def _flat_arrays(tree: Any) -> dict[str, np.ndarray]:
    """``{key path: NumPy array}`` of ``tree``'s leaves, ml_dtypes leaves as raw bits."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    arrays, dtypes = {}, {}
    for path, leaf in leaves:
        name = jax.tree_util.keystr(path)
        value = np.asarray(leaf)
        if _stored_as_bits(value.dtype):  # e.g. bfloat16: NumPy would write raw void '|V2'
            dtypes[name] = value.dtype.name
            value = value.view(np.dtype(f"u{value.dtype.itemsize}"))
        arrays[name] = value
    if dtypes:
        arrays[_DTYPES_ENTRY] = np.asarray(json.dumps(dtypes, sort_keys=True))
    return arrays


def save_checkpoint(path: str | os.PathLike, tree: Any) -> None:
    """Saves a pytree of arrays (e.g. a :class:`ServerState`) with ``numpy.savez``.

    The file is written to a temporary name in the same directory and renamed
    over ``path``, so a crash never leaves a half-written checkpoint.

    Leaves of a dtype NumPy cannot store (``bfloat16``, ``float8_*``, ...:
    ``ml_dtypes`` types) are written as their raw bits, unsigned integers of the
    same width, with their dtype names in an extra entry; :func:`load_checkpoint`
    restores them exactly.

    Args:
      path: destination file (conventionally ``*.npz``).
      tree: a pytree whose leaves are arrays (no PRNG key arrays).
    """
    save_tagged(path, tree, run=None)


def save_tagged(path: str | os.PathLike, tree: Any, run: str | None) -> None:
    """:func:`save_checkpoint`, recording the run identity ``run`` when not None."""
    arrays = _flat_arrays(tree)
    if run is not None:
        arrays[_RUN_ENTRY] = np.asarray(run)
    atomic_write(path, lambda f: np.savez(f, **arrays), binary=True)


def run_identity(key: PRNGKeyArray, run_id: str | None) -> str:
    """What makes a :func:`run_rounds` run: the raw bits of its key and the caller's ``run_id``."""
    bits = np.asarray(jax.random.key_data(key)).ravel().tolist()
    return json.dumps({"key": bits, "run_id": run_id}, sort_keys=True)


def _file_mode(path: str) -> int:
    """Permissions for a file written over ``path``: its own if it exists, else the umask's."""
    try:
        return os.stat(path).st_mode & 0o777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], binary: bool) -> None:
    """Writes a file atomically: ``write(file)`` on a temporary file, renamed over ``path``.

    A crash leaves the old file or the new one, never half of one; the new file
    keeps the old one's permissions (the umask's for a new file).

    Args:
      path: the destination (its directory is created if needed).
      write: called with the open temporary file.
      binary: open in binary mode.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.splitext(path)[1])
    try:
        # mkstemp makes the file private (0600); give it the mode a plain open() would.
        os.chmod(tmp, _file_mode(path))
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_checkpoint(path: str | os.PathLike, like: Any) -> Any:
    """Loads a checkpoint written by :func:`save_checkpoint` into the structure of ``like``.

    Args:
      path: the checkpoint file.
      like: a pytree with the expected structure, shapes and dtypes (e.g. the
        initial state); its values are not used.

    Returns:
      A pytree of ``like``'s structure holding the stored arrays.

    Raises:
      ValueError: the file's entries, shapes or dtypes differ from ``like``'s.
    """
    return load_tagged(path, like, run=None)


def load_tagged(path: str | os.PathLike, like: Any, run: str | None) -> Any:
    """:func:`load_checkpoint`; with ``run``, also an error if the file records another run."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
    with np.load(os.fspath(path)) as stored:
        stored_run = str(stored[_RUN_ENTRY]) if _RUN_ENTRY in stored.files else None
        if run is not None and stored_run is not None and stored_run != run:
            raise ValueError(
                f"checkpoint {os.fspath(path)!r} was written by another run ({stored_run}), "
                f"not this one ({run}); delete it, use another path, or pass the key and "
                "run_id it was written with."
            )
        names = set(stored.files) - _RESERVED
        dtypes = json.loads(str(stored[_DTYPES_ENTRY])) if _DTYPES_ENTRY in stored.files else {}
        expected = [jax.tree_util.keystr(p) for p, _ in leaves]
        if names != set(expected):
            missing, extra = sorted(set(expected) - names), sorted(names - set(expected))
            raise ValueError(
                f"checkpoint {os.fspath(path)!r} does not match the expected structure: "
                f"missing {missing[:5]}, unexpected {extra[:5]}."
            )
        out = []
        for name, (_, leaf) in zip(expected, leaves, strict=True):
            value = stored[name]
            leaf = np.asarray(leaf)
            if name in dtypes:  # raw bits of an ml_dtypes type, with its name
                if dtypes[name] != leaf.dtype.name:
                    raise ValueError(
                        f"checkpoint entry {name}: stored {value.shape} {dtypes[name]}, "
                        f"expected {leaf.shape} {leaf.dtype}."
                    )
                value = value.view(leaf.dtype)
            elif value.dtype.kind == "V" and _stored_as_bits(leaf.dtype):
                # Written before the dtype names were stored: raw void of the same width.
                if value.dtype.itemsize == leaf.dtype.itemsize:
                    value = value.view(leaf.dtype)
            if value.shape != leaf.shape or value.dtype != leaf.dtype:
                raise ValueError(
                    f"checkpoint entry {name}: stored {value.shape} {value.dtype}, expected "
                    f"{leaf.shape} {leaf.dtype}."
                )
            out.append(jnp.asarray(value))
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(like), out)
