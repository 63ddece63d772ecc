"""PEFT LoRA adapter directories in and out: adapter_config.json, adapter_model.safetensors.

A PEFT adapter directory holds, for every adapted module ``m``, the tensors
``base_model.model.<m>.lora_A.weight`` (``r x in``) and ``...lora_B.weight``
(``out x r``). :func:`read_adapter` returns them as this package's adapters,
``{m: LoRAFactors(B=lora_B, A=lora_A)}``, bit for bit and under PEFT's module
names, with the configuration; the factors carry no scale, as PEFT's do not:
``config.scale(m) · B @ A`` is PEFT's weight delta (:func:`delta_weights`).
Keeping the scale out makes writing back exact, and the aggregation rules see
the tensors clients send. :func:`write_adapter` writes a directory PEFT loads
(``PeftModel.from_pretrained``).

The files are read and written with ``safetensors.numpy`` (the ``peft`` extra:
``pip install clair_jax[peft]``); neither PyTorch nor PEFT is needed.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from clair_jax._src.lora.peft_config import PeftAdapterConfig, differences
from clair_jax._src.lora.types import Adapters, LoRAFactors

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<factor>[AB])\.weight$")


def _safetensors():
    try:
        import safetensors.numpy
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "reading and writing PEFT adapters needs safetensors: pip install 'clair_jax[peft]'."
        ) from err
    return safetensors.numpy


def _natural(name: str) -> tuple:
    """Sort key putting ``layers.2`` before ``layers.10``."""
    return tuple((0, int(t)) if t.isdigit() else (1, t) for t in re.split(r"(\d+)", name))


def read_config(path: str | os.PathLike) -> PeftAdapterConfig:
    """The :class:`PeftAdapterConfig` of the adapter directory ``path``.

    Raises:
      FileNotFoundError: no ``adapter_config.json`` in ``path``.
      ValueError: invalid JSON or an unsupported configuration (the message names the file).
    """
    file = os.path.join(os.fspath(path), CONFIG_NAME)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file} not found: {path!s} is not a PEFT adapter directory.")
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{file}: not valid JSON ({err}).") from None
    return PeftAdapterConfig.from_dict(data, file)


def read_adapter(path: str | os.PathLike, dtype=None) -> tuple[Adapters, PeftAdapterConfig]:
    """Reads a PEFT LoRA adapter directory.

    Args:
      path: a directory with ``adapter_config.json`` and
        ``adapter_model.safetensors`` (what ``PeftModel.save_pretrained`` writes).
      dtype: cast the factors to this dtype (default: as stored).

    Returns:
      ``(adapters, config)``: ``{module: LoRAFactors(B, A)}`` with ``B`` PEFT's
      ``lora_B`` ``(out, r)`` and ``A`` its ``lora_A`` ``(r, in)`` (unscaled,
      keyed by PEFT's module names, e.g. ``"model.layers.0.self_attn.q_proj"``,
      in natural order), and the configuration.

    Raises:
      FileNotFoundError: a missing file (a ``.bin``-only adapter included).
      ValueError: a key that is not a LoRA factor of a linear layer, a module
        missing one factor, not targeted by the configuration, or whose shapes
        disagree with each other or with the configured rank; the message names
        the file and the module.
    """
    config = read_config(path)
    file = os.path.join(os.fspath(path), WEIGHTS_NAME)
    if not os.path.isfile(file):
        extra = ""
        if os.path.isfile(os.path.join(os.fspath(path), "adapter_model.bin")):
            extra = " (only adapter_model.bin: save with safe_serialization=True)"
        raise FileNotFoundError(f"{file} not found{extra}.")
    try:
        tensors = _safetensors().load_file(file)
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        raise ValueError(f"{file}: not a readable safetensors file ({err}).") from None
    factors: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise ValueError(
                f"{file}: tensor {key!r} is not a LoRA factor of a linear layer "
                "('<module>.lora_A.weight' / '<module>.lora_B.weight'); embedding LoRA, DoRA "
                "and saved modules are not supported."
            )
        factors.setdefault(match["module"], {})[match["factor"]] = value
    if not factors:
        raise ValueError(f"{file} holds no LoRA factors.")
    adapters = {}
    for module in sorted(factors, key=_natural):
        pair = factors[module]
        if set(pair) != {"A", "B"}:
            missing = "lora_A" if "A" not in pair else "lora_B"
            raise ValueError(f"{file}: module {module!r} has no {missing}.weight.")
        b, a = check_module(module, pair["B"], pair["A"], config, file)
        if dtype is not None:
            b, a = b.astype(dtype), a.astype(dtype)
        adapters[module] = LoRAFactors(B=jnp.asarray(b), A=jnp.asarray(a))
    return adapters, config


def read_clients(
    paths: Sequence[str | os.PathLike], dtype=None
) -> tuple[Adapters, PeftAdapterConfig]:
    """Reads one PEFT adapter directory per client and stacks them on a leading axis.

    Args:
      paths: ``n`` adapter directories.
      dtype: cast the factors to this dtype (default: the stored dtypes' common type).

    Returns:
      ``(clients, config)``: ``{module: LoRAFactors(B (n, out, r), A (n, r, in))}``,
      the input of every aggregation rule, and the first client's configuration.

    Raises:
      ValueError: no paths, or clients whose configurations disagree on a field
        that changes the weight delta (``r``, ``lora_alpha``, ``use_rslora``,
        ``fan_in_fan_out``, ``target_modules``, patterns), adapt other modules,
        or whose factors have other shapes; the message names both files. And
        everything :func:`read_adapter` raises.
    """
    if isinstance(paths, (str, os.PathLike)) or len(paths) == 0:
        raise ValueError("paths must be a non-empty list of adapter directories, one per client.")
    first, config = read_adapter(paths[0], dtype)
    others = [first]
    for path in paths[1:]:
        adapters, other = read_adapter(path, dtype)
        where = f"{path!s} and {paths[0]!s}"
        diff = differences(config, other)
        if diff:
            raise ValueError(f"{where}: adapter configs differ ({'; '.join(diff)}).")
        if set(adapters) != set(first):
            extra = sorted(set(adapters) - set(first))
            missing = sorted(set(first) - set(adapters))
            raise ValueError(
                f"{where}: different modules ({path!s} has {extra} extra and lacks {missing})."
            )
        for module, f in adapters.items():
            g = first[module]
            if f.B.shape != g.B.shape or f.A.shape != g.A.shape:
                raise ValueError(
                    f"{where}: module {module!r} has B {f.B.shape}, A {f.A.shape} against "
                    f"B {g.B.shape}, A {g.A.shape}."
                )
        others.append(adapters)
    stacked = {
        module: LoRAFactors(
            B=jnp.stack([c[module].B for c in others]), A=jnp.stack([c[module].A for c in others])
        )
        for module in first
    }
    return stacked, config


def write_adapter(path: str | os.PathLike, adapters: Adapters, config: PeftAdapterConfig) -> None:
    """Writes one adapter as a PEFT adapter directory (created if missing, files replaced).

    Writes ``adapter_config.json`` (``config.to_dict()``) and
    ``adapter_model.safetensors`` with PEFT's keys
    ``base_model.model.<module>.lora_A.weight`` / ``...lora_B.weight``, so that
    ``PeftModel.from_pretrained(base_model, path)`` loads it.

    Args:
      path: the directory.
      adapters: ``{module: LoRAFactors(B (out, r), A (r, in))}``, one adapter
        (not stacked), unscaled, keyed by PEFT's module names; e.g. an
        aggregator's ``global_`` or one client of its ``clients``.
      config: the configuration (from :func:`read_adapter` or :func:`read_clients`;
        to change the rank, ``dataclasses.replace(config, r=...)``).

    Raises:
      ValueError: stacked or misshapen factors, a rank other than
        ``config.rank(module)``, a module ``config`` does not target, NaN or inf.
      TypeError: ``adapters`` not a mapping or ``config`` not a :class:`PeftAdapterConfig`.
    """
    if not isinstance(config, PeftAdapterConfig):
        raise TypeError(f"config must be a PeftAdapterConfig, got {type(config).__name__}.")
    if not isinstance(adapters, Mapping) or not adapters:
        raise TypeError("adapters must be a non-empty dict {module name: LoRAFactors(B, A)}.")
    tensors = {}
    for module, f in adapters.items():
        b, a = (np.asarray(x) for x in f)
        if b.ndim != 2 or a.ndim != 2:
            raise ValueError(
                f"module {module!r}: B {b.shape} and A {a.shape} must be 2-D (one adapter); "
                "write stacked clients with write_clients."
            )
        b, a = check_module(module, b, a, config, "adapters")
        if not (np.isfinite(b).all() and np.isfinite(a).all()):
            raise ValueError(f"module {module!r}: the factors hold NaN or inf.")
        tensors[f"{PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(a)
        tensors[f"{PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(b)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(os.fspath(path), CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(config.to_dict(), f, indent=2, sort_keys=True)
        f.write("\n")
    _safetensors().save_file(
        tensors, os.path.join(os.fspath(path), WEIGHTS_NAME), metadata={"format": "pt"}
    )


def write_clients(
    paths: Sequence[str | os.PathLike], clients: Adapters, config: PeftAdapterConfig
) -> None:
    """Writes stacked client adapters (``(n, ...)`` factors) to ``n`` PEFT adapter directories.

    Raises:
      ValueError: ``len(paths)`` is not the number of clients, and everything
        :func:`write_adapter` raises.
    """
    n = {int(np.shape(x)[0]) for f in clients.values() for x in f}
    if len(n) != 1 or n != {len(paths)}:
        raise ValueError(
            f"paths has {len(paths)} directories for {sorted(n)} clients (leading axis)."
        )
    for i, path in enumerate(paths):
        write_adapter(path, jax.tree.map(lambda x, i=i: x[i], dict(clients)), config)


def delta_weights(
    adapters: Adapters, config: PeftAdapterConfig, *, base_layout: bool = False
) -> dict[str, jax.Array]:
    """PEFT's weight deltas ``scale(m) · B @ A`` (``out x in``) of every module ``m``.

    Args:
      adapters: unstacked or stacked (leading client axes) adapters.
      config: their configuration (the scales).
      base_layout: transpose the deltas when ``config.fan_in_fan_out`` (the base
        layer stores ``in x out``, as GPT-2's ``Conv1D``), which is what PEFT's
        ``get_delta_weight`` returns and what merging adds to the weight.

    Returns:
      ``{module: delta}``.
    """
    out = {}
    for module, f in adapters.items():
        product = jnp.einsum("...pr,...rq->...pq", f.B, f.A, precision=jax.lax.Precision.HIGHEST)
        delta = config.scale(module) * product
        out[module] = (
            jnp.swapaxes(delta, -1, -2) if base_layout and config.fan_in_fan_out else delta
        )
    return out


def check_module(module: str, b, a, config: PeftAdapterConfig, where: str):
    """Checks one module's ``(B, A)`` against each other and the configuration.

    Returns:
      ``(b, a)`` as NumPy arrays.

    Raises:
      ValueError: non-float, non-2-D or mismatched shapes, a rank other than
        ``config.rank(module)``, or a module not targeted by ``config``.
    """
    b, a = np.asarray(b), np.asarray(a)
    for name, x in (("B", b), ("A", a)):
        if not (np.issubdtype(x.dtype, np.floating) or x.dtype.name == "bfloat16"):
            raise ValueError(f"{where}: module {module!r}: {name} must be floats, got {x.dtype}.")
    if b.ndim != 2 or a.ndim != 2 or b.shape[1] != a.shape[0]:
        raise ValueError(
            f"{where}: module {module!r}: lora_B {b.shape} (out, r) and lora_A {a.shape} (r, in) "
            "do not fit together."
        )
    rank = config.rank(module)
    if b.shape[1] != rank:
        raise ValueError(
            f"{where}: module {module!r} has rank {b.shape[1]} (B {b.shape}, A {a.shape}), "
            f"the config gives it r={rank}."
        )
    if not config.targets(module):
        raise ValueError(
            f"{where}: module {module!r} is not targeted by the config "
            f"(target_modules={config.target_modules!r})."
        )
    return b, a
