"""Single-file checkpoints of pytrees of arrays (``.npz``), written atomically and read strictly.

A checkpoint is written to a temporary file, synced, renamed over its path, and
the directory is synced, so a crash leaves the old file or the new one (a
temporary file a killed writer left behind is removed by the next write of the
same path). Leaves of the ``ml_dtypes`` types NumPy cannot store (``bfloat16``,
the ``float8`` types, ...) are saved as their raw bits (unsigned integers of the
same width) together with their dtype name.

Reading never trusts the file: every entry's ``.npy`` header (shape, dtype) and
its uncompressed size are checked against the expected tree before any array
data is read, nothing is unpickled, and the values must be finite. Every
failure is a :class:`CheckpointError`, one line that names the file and says
what to do.
"""

from __future__ import annotations

import glob
import json
import os
import tempfile
import zipfile
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PRNGKeyArray

#: Entry of a checkpoint holding ``{entry: dtype name}`` (JSON) for leaves stored as raw bits.
_DTYPES_ENTRY = "__dtypes__"
#: Entry of a checkpoint written by run_rounds before it used Orbax: the run's identity.
_RUN_ENTRY = "__run__"
#: Entries that are not leaves of the saved pytree.
_RESERVED = frozenset({_DTYPES_ENTRY, _RUN_ENTRY})
#: Longest JSON text accepted in a reserved entry (characters).
_MAX_TEXT = 1 << 20
_TMP_PREFIX = ".tmp-"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, corrupt, of another run, or not writable.

    The message is one line that names the file or directory and says what to do.
    """


def first_line(err: BaseException) -> str:
    """``err`` as one short line: its type and the first line of its message."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200]}" if text else type(err).__name__


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
    """Saves a pytree of arrays (e.g. a :class:`ServerState`) to one ``.npz`` file.

    The file is written to a temporary name in the same directory, synced to
    disk and renamed over ``path``, and the directory is synced, so a crash
    never leaves a half-written checkpoint. The tree is gathered to this
    process (``numpy.asarray``): for the state of a sharded or multi-host run
    use the Orbax checkpoints of :func:`clair_jax.run_rounds`.

    Leaves of a dtype NumPy cannot store (``bfloat16``, ``float8_*``, ...:
    ``ml_dtypes`` types) are written as their raw bits, unsigned integers of the
    same width, with their dtype names in an extra entry; :func:`load_checkpoint`
    restores them exactly.

    Args:
      path: destination file (conventionally ``*.npz``).
      tree: a pytree whose leaves are arrays (no PRNG key arrays).

    Raises:
      CheckpointError: the directory cannot be created or written.
    """
    arrays = _flat_arrays(tree)
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


def sync_directory(directory: str) -> None:
    """``fsync`` a directory, so that a rename inside it survives a power loss (POSIX)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems do not sync directories
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], binary: bool) -> None:
    """Writes a file atomically: ``write(file)`` on a temporary file, renamed over ``path``.

    A crash leaves the old file or the new one, never half of one; the new file
    keeps the old one's permissions (the umask's for a new file). The temporary
    file is synced before the rename and the directory after it; temporary
    files of this path left by a killed writer are removed.

    Args:
      path: the destination (its directory is created if needed).
      write: called with the open temporary file.
      binary: open in binary mode.

    Raises:
      CheckpointError: the directory cannot be created or written (the
        exception raised by ``write`` itself passes through).
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    prefix = f"{_TMP_PREFIX}{os.path.basename(path)}-"
    try:
        os.makedirs(directory, exist_ok=True)
        for orphan in glob.glob(os.path.join(glob.escape(directory), glob.escape(prefix) + "*")):
            os.remove(orphan)  # left by a writer killed before its rename
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=prefix)
    except OSError as err:
        raise CheckpointError(
            f"cannot write checkpoint {path!r} ({first_line(err)}): choose a writable path."
        ) from None
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
    sync_directory(directory)


def _header(member, where: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """The ``.npy`` header (shape, Fortran order, dtype) of an open archive member."""
    version = np.lib.format.read_magic(member)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(member)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(member)
    raise ValueError(f"{where}: unsupported .npy format version {version}")


def _read_entry(archive: zipfile.ZipFile, name: str, where: str, check) -> np.ndarray:
    """Reads entry ``name`` after ``check(shape, dtype)`` accepted its header.

    The declared uncompressed size must be exactly the header plus the array's
    bytes, so no more data than the expected array is ever decompressed.
    """
    info = archive.getinfo(f"{name}.npy")
    with archive.open(info) as member:
        shape, fortran, dtype = _header(member, where)
        if dtype.hasobject or dtype.fields:
            raise ValueError(f"entry {name} has dtype {dtype} (objects are never unpickled)")
        check(shape, dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if info.file_size != member.tell() + nbytes:
            raise ValueError(
                f"entry {name} declares {info.file_size} bytes, its header {shape} {dtype} "
                f"needs {member.tell() + nbytes}"
            )
        data = member.read(nbytes)
    if len(data) != nbytes:
        raise ValueError(f"entry {name} is truncated")
    order = "F" if fortran else "C"
    return np.frombuffer(data, dtype).reshape(shape, order=order).copy(order="C")


def _read_text(archive: zipfile.ZipFile, name: str, where: str) -> str:
    """A reserved entry: a 0-d unicode array of bounded length."""

    def check(shape, dtype):
        if shape != () or dtype.kind != "U" or dtype.itemsize > 4 * _MAX_TEXT:
            raise ValueError(f"entry {name} is {shape} {dtype}, expected a string")

    return str(_read_entry(archive, name, where, check)[()])


def check_finite(leaves: list[tuple[str, Any]], where: str) -> None:
    """Raises a :class:`CheckpointError` naming the first leaf with a NaN or infinity."""
    for name, value in leaves:
        if jnp.issubdtype(value.dtype, jnp.inexact) and not bool(jnp.all(jnp.isfinite(value))):
            raise CheckpointError(
                f"checkpoint {where!r}: entry {name} holds NaN or infinite values (a diverged "
                "run or a corrupt file); delete it to start again, or restore a backup."
            )


def load_npz(path: str, like: Any) -> Any:
    """Reads a :func:`save_checkpoint` file into the structure of ``like``.

    See :func:`clair_jax.load_checkpoint` (which also reads Orbax directories).
    The ``__run__`` entry of the files ``run_rounds`` wrote before it kept Orbax
    directories is ignored.
    """
    leaves, _ = jax.tree_util.tree_flatten_with_path(like)
    expected = [jax.tree_util.keystr(p) for p, _ in leaves]
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile, EOFError, ValueError) as err:
        raise CheckpointError(
            f"checkpoint {path!r} is not a readable .npz file ({first_line(err)}); it may be "
            "truncated or corrupt: delete it to start again, or restore a backup."
        ) from None
    out = []
    try:
        with archive:
            names = {n[:-4] for n in archive.namelist() if n.endswith(".npy")}
            if len(names) != len(archive.namelist()):
                raise ValueError("the archive holds files other than .npy entries")
            dtypes = {}
            if _DTYPES_ENTRY in names:
                dtypes = json.loads(_read_text(archive, _DTYPES_ENTRY, path))
                if not isinstance(dtypes, dict):
                    raise ValueError(f"entry {_DTYPES_ENTRY} is not a JSON object")
            if names - _RESERVED != set(expected):
                missing = sorted(set(expected) - names)
                extra = sorted(names - _RESERVED - set(expected))
                raise CheckpointError(
                    f"checkpoint {path!r} does not match the expected structure: missing "
                    f"{missing[:5]}, unexpected {extra[:5]}; pass the tree it was saved from "
                    "as like=, or delete it."
                )
            for name, (_, leaf) in zip(expected, leaves, strict=True):
                out.append(_read_leaf(archive, name, np.asarray(leaf), dtypes.get(name), path))
    except CheckpointError:
        raise
    except Exception as err:  # zipfile, zlib, NumPy: whatever a damaged file raises
        raise CheckpointError(
            f"checkpoint {path!r} cannot be read ({first_line(err)}); delete it to start "
            "again, or restore a backup."
        ) from None
    check_finite(list(zip(expected, out, strict=True)), path)
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(like), out)


def _read_leaf(archive, name: str, leaf: np.ndarray, bits_of: str | None, path: str):
    """One leaf, its header checked against ``leaf`` (shape, dtype) before its data is read."""
    target = leaf.dtype
    if bits_of is not None:  # raw bits of an ml_dtypes type, with its name
        if bits_of != leaf.dtype.name:
            raise CheckpointError(
                f"checkpoint {path!r}: entry {name}: stored {bits_of}, expected {leaf.shape} "
                f"{leaf.dtype}; pass the tree it was saved from as like=."
            )
        target = np.dtype(f"u{leaf.dtype.itemsize}")

    def check(shape, dtype):
        # Written before the dtype names were stored: raw void of the same width.
        legacy_bits = dtype.kind == "V" and _stored_as_bits(leaf.dtype)
        if shape != leaf.shape or (dtype != target and not legacy_bits):
            raise CheckpointError(
                f"checkpoint {path!r}: entry {name}: stored {shape} {bits_of or dtype}, "
                f"expected {leaf.shape} {leaf.dtype}; pass the tree it was saved from as like=."
            )
        if legacy_bits and dtype.itemsize != leaf.dtype.itemsize:
            raise CheckpointError(
                f"checkpoint {path!r}: entry {name}: stored {dtype}, expected {leaf.dtype}."
            )

    value = _read_entry(archive, name, path, check)
    if value.dtype != leaf.dtype:
        value = value.view(leaf.dtype)
    return jnp.asarray(value)
