"""LoRA adapters to and from Flower's ``ArrayRecord``, keeping module names and dtypes.

An adapter ``{module: LoRAFactors(B, A)}`` becomes one ``ArrayRecord`` entry per
factor, keyed ``"<module>/B"`` and ``"<module>/A"`` (module names are
``"/"``-joined paths such as ``"blocks/0/attn/value"``), so a reply can be
checked entry by entry against the adapter the server expects. Each entry is
Flower's NumPy serialisation (``.npy`` bytes, no pickle) of the factor; a
dtype NumPy cannot store natively (``bfloat16``, from ``ml_dtypes``) travels as
its raw bits (``uint16``) with the entry's ``dtype`` field naming the real dtype,
and comes back bit-exact.
"""

from __future__ import annotations

import io
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flwr.app import Array, ArrayRecord

from clair_jax._src.lora.types import Adapters, LoRAFactors

FACTORS = ("B", "A")
"""The factor names, in the order entries are written."""


NUMPY_STYPE = Array(np.zeros(0, np.float32)).stype
"""Flower's serialisation type of NumPy arrays (``.npy`` bytes)."""


def _raw_bits(x: np.ndarray) -> np.ndarray | None:
    """``x`` viewed as unsigned integers when NumPy cannot serialise its dtype, else None."""
    if x.dtype.kind == "V" or type(x.dtype).__module__.startswith("ml_dtypes"):
        return x.view(np.dtype(f"u{x.dtype.itemsize}"))
    return None


def _to_array(x) -> Array:
    x = np.ascontiguousarray(np.asarray(x))
    bits = _raw_bits(x)
    if bits is None:
        return Array(x)
    buffer = io.BytesIO()
    np.save(buffer, bits, allow_pickle=False)
    return Array(
        dtype=str(x.dtype), shape=tuple(x.shape), stype=NUMPY_STYPE, data=buffer.getvalue()
    )


def _from_array(array: Array) -> np.ndarray:
    x = array.numpy()
    if str(x.dtype) != array.dtype:  # raw bits of a dtype NumPy does not serialise
        x = x.view(jnp.dtype(array.dtype))
    return x


def adapters_to_arrays(adapters: Mapping[str, LoRAFactors]) -> ArrayRecord:
    """An adapter as an ``ArrayRecord`` (entries ``"<module>/B"``, ``"<module>/A"``).

    Args:
      adapters: ``{module: LoRAFactors(B, A)}``, unstacked (one client's) or
        stacked; the arrays are copied to host memory.

    Returns:
      The ``ArrayRecord``, in the adapter's module order.

    Raises:
      TypeError: ``adapters`` is not a mapping of module names to factor pairs.

    Examples:
      >>> import numpy as np
      >>> from clair_jax import LoRAFactors
      >>> record = adapters_to_arrays({"mlp": LoRAFactors(np.ones((3, 2)), np.zeros((2, 4)))})
      >>> list(record), record["mlp/B"].shape
      (['mlp/B', 'mlp/A'], (3, 2))
    """
    if not isinstance(adapters, Mapping):
        raise TypeError(
            f"adapters must be a mapping of module names, got {type(adapters).__name__}."
        )
    record = ArrayRecord()
    for name, factors in adapters.items():
        if not isinstance(name, str) or len(factors) != 2:
            raise TypeError(
                f"adapters must map module names (str) to (B, A) pairs, got {name!r}: "
                f"{type(factors).__name__}."
            )
        b, a = factors
        record[f"{name}/B"] = _to_array(b)
        record[f"{name}/A"] = _to_array(a)
    return record


def arrays_to_adapters(
    record: ArrayRecord, like: Mapping[str, LoRAFactors] | None = None
) -> Adapters:
    """The adapter an ``ArrayRecord`` from :func:`adapters_to_arrays` holds.

    Args:
      record: the ``ArrayRecord``.
      like: the adapter expected (e.g. the one the server sent): with it, the
        record must hold exactly its modules, with the same shapes and dtypes.

    Returns:
      ``{module: LoRAFactors(B, A)}`` of NumPy arrays, in the record's order.

    Raises:
      ValueError: an entry not named ``"<module>/B"`` or ``"<module>/A"``, a
        module with one factor only, or (with ``like``) other modules, shapes or
        dtypes; the message names the module and the shapes.
    """
    parts: dict[str, dict[str, np.ndarray]] = {}
    for key, array in record.items():
        name, _, factor = key.rpartition("/")
        if not name or factor not in FACTORS:
            raise ValueError(
                f"ArrayRecord entry {key!r} is not '<module>/B' or '<module>/A' "
                f"(entries: {sorted(record)})."
            )
        parts.setdefault(name, {})[factor] = _from_array(array)
    adapters = {}
    for name, factors in parts.items():
        if set(factors) != set(FACTORS):
            raise ValueError(f"module {name!r} has factors {sorted(factors)}, expected ['A', 'B'].")
        adapters[name] = LoRAFactors(B=factors["B"], A=factors["A"])
    if like is not None:
        check_like(adapters, like)
    return adapters


def check_like(adapters: Mapping[str, LoRAFactors], like: Mapping[str, LoRAFactors]) -> None:
    """Raises ``ValueError`` unless ``adapters`` has ``like``'s modules, shapes and dtypes."""
    if set(adapters) != set(like):
        raise ValueError(
            f"adapter modules {sorted(adapters)} differ from the expected {sorted(like)}."
        )
    for name, expected in like.items():
        for factor, got, want in zip(FACTORS, adapters[name], expected, strict=True):
            got_shape, want_shape = tuple(np.shape(got)), tuple(np.shape(want))
            got_dtype, want_dtype = jnp.asarray(got).dtype, jnp.asarray(want).dtype
            if got_shape != want_shape or got_dtype != want_dtype:
                raise ValueError(
                    f"module {name!r} factor {factor}: got {got_dtype}{list(got_shape)}, "
                    f"expected {want_dtype}{list(want_shape)}."
                )
