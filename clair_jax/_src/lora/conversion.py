"""Pure-pytree view of a LoRA model: ``(graphdef, base, adapters)`` and back.

The model stores Flax NNX factors (``y = x @ lora_a @ lora_b``, ``lora_a``
``in x r``, ``lora_b`` ``r x out``); the adapters follow the library's (PEFT's)
orientation, ``A = lora_a.T`` ``(r, in)`` and ``B = lora_b.T`` ``(out, r)``, so
``B A`` is the ``out x in`` update and the ``in x out`` kernel moves by its
transpose, ``lora_a @ lora_b``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from clair_jax._src.lora.model import LoRALinear, LoRATransformer
from clair_jax._src.lora.types import Adapters, LoRAFactors


def flatten_tree(tree: Mapping, prefix: tuple = ()) -> dict[tuple, Any]:
    """A nested dict as ``{path tuple: leaf}`` (paths prefixed by ``prefix``)."""
    flat = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            flat.update(flatten_tree(v, (*prefix, k)))
        else:
            flat[(*prefix, k)] = v
    return flat


def unflatten_tree(flat: Mapping[tuple, Any]) -> dict:
    """Inverse of :func:`flatten_tree`: ``{path tuple: leaf}`` as a nested dict."""
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return tree


def module_name(path: tuple) -> str:
    """``("blocks", 0, "attn", "query")`` -> ``"blocks/0/attn/query"``."""
    return "/".join(str(k) for k in path)


def module_path(name: str) -> tuple:
    """Inverse of :func:`module_name` (list indices come back as ints)."""
    return tuple(int(k) if k.isdigit() else k for k in name.split("/"))


def lora_state_to_adapters(lora_state: nnx.State | Mapping) -> Adapters:
    """``nnx.LoRAParam`` state (or its pure dict) -> ``{module name: LoRAFactors(B, A)}``.

    ``B = lora_b.T`` ``(out, r)`` and ``A = lora_a.T`` ``(r, in)`` (the last two
    axes swapped); any leading (client) axes are kept.

    Args:
      lora_state: the ``nnx.LoRAParam`` state of a model, or its pure nested dict.

    Returns:
      The adapters, keyed by ``"/"``-joined module paths.

    Raises:
      ValueError: a module without both ``lora_a`` and ``lora_b``.
    """
    pure = nnx.to_pure_dict(lora_state) if isinstance(lora_state, nnx.State) else lora_state
    flat = flatten_tree(pure)
    names = sorted({module_name(path[:-1]) for path in flat})
    out = {}
    for name in names:
        path = module_path(name)
        try:
            lora_a, lora_b = flat[(*path, "lora_a")], flat[(*path, "lora_b")]
        except KeyError as err:
            raise ValueError(f"module {name!r} lacks lora_a or lora_b in the LoRA state.") from err
        out[name] = LoRAFactors(B=jnp.swapaxes(lora_b, -1, -2), A=jnp.swapaxes(lora_a, -1, -2))
    return out


def adapters_to_lora_state(adapters: Adapters) -> dict:
    """Inverse of :func:`lora_state_to_adapters`: a pure nested dict for ``nnx.merge``.

    Args:
      adapters: ``{module name: LoRAFactors(B, A)}``.

    Returns:
      ``{..path..: {"lora_a": A.T, "lora_b": B.T}}`` (the last two axes swapped).
    """
    flat = {}
    for name, factors in adapters.items():
        path = module_path(name)
        flat[(*path, "lora_a")] = jnp.swapaxes(factors.A, -1, -2)
        flat[(*path, "lora_b")] = jnp.swapaxes(factors.B, -1, -2)
    return unflatten_tree(flat)


def split_lora(model: LoRATransformer) -> tuple[nnx.GraphDef, dict, Adapters]:
    """Splits a model into ``(graphdef, base, adapters)``, all pure pytrees.

    ``base`` holds every non-adapter variable (a pure nested dict); ``adapters``
    the ``nnx.LoRAParam`` factors as an ``Adapters`` dict. :func:`apply_lora` and
    :func:`merge_lora` invert it.

    Args:
      model: a :class:`LoRATransformer` (or any NNX module with ``nnx.LoRAParam``).

    Returns:
      ``(graphdef, base, adapters)``.
    """
    graphdef, lora_state, base_state = nnx.split(model, nnx.LoRAParam, ...)
    return graphdef, nnx.to_pure_dict(base_state), lora_state_to_adapters(lora_state)


def _compute_adapter_shapes(graphdef: nnx.GraphDef) -> dict[str, tuple[tuple, tuple]] | None:
    # nnx.merge fills the variables from the states' leaves in order (their paths are not
    # compared), so placeholders rebuild the modules, whose static attributes give the
    # adapter shapes. None (no check) when some adapter is not a LoRALinear's.
    try:
        model = nnx.merge(graphdef, [None] * graphdef.num_leaves)
        nodes = list(nnx.iter_graph(model))
    except Exception:  # noqa: BLE001 - a graphdef this cannot rebuild is left unchecked
        return None
    shapes = {
        module_name(path): ((m.out_features, m.lora_rank), (m.lora_rank, m.in_features))
        for path, m in nodes
        if isinstance(m, LoRALinear) and m.lora_rank > 0
    }
    num_lora = sum(isinstance(node, nnx.LoRAParam) for _, node in nodes)
    return shapes if num_lora == 2 * len(shapes) else None


_cached_adapter_shapes = functools.lru_cache(maxsize=64)(_compute_adapter_shapes)


def adapter_shapes(graphdef: nnx.GraphDef) -> dict[str, tuple[tuple, tuple]] | None:
    """The adapters a model's ``graphdef`` holds: ``{module name: (B shape, A shape)}``.

    Args:
      graphdef: the static part of a model.

    Returns:
      The shapes, or ``None`` when the graphdef has adapters other than
      :class:`LoRALinear`'s (nothing to check against).
    """
    try:
        return _cached_adapter_shapes(graphdef)
    except TypeError:  # an unhashable graphdef (a static attribute holds a list)
        return _compute_adapter_shapes(graphdef)


def check_adapter_shapes(graphdef: nnx.GraphDef, adapters: Adapters) -> None:
    """Checks that ``adapters`` fit the model ``graphdef``.

    The module names must be those of the model's adapters, and every module's
    ``B`` and ``A`` must have the model's ``(out, r)`` and ``(r, in)`` shapes
    (unstacked: no leading client axis).

    Args:
      graphdef: the static part of a model.
      adapters: ``{module name: LoRAFactors(B, A)}``.

    Raises:
      ValueError: missing or unexpected modules, or misshapen factors.
      TypeError: ``adapters`` is not a mapping.
    """
    if not isinstance(adapters, Mapping):
        raise TypeError(
            f"adapters must be a dict of module name -> LoRAFactors, got {type(adapters).__name__}."
        )
    expected = adapter_shapes(graphdef)
    if expected is None:
        return
    if set(adapters) != set(expected):
        missing = sorted(set(expected) - set(adapters))
        extra = sorted(set(adapters) - set(expected))
        raise ValueError(
            f"adapters do not match the model's adapted modules: missing {missing}, "
            f"unexpected {extra}."
        )
    for name, (b_shape, a_shape) in expected.items():
        b, a = adapters[name]
        if tuple(b.shape) != b_shape or tuple(a.shape) != a_shape:
            raise ValueError(
                f"adapter {name!r}: B {tuple(b.shape)} and A {tuple(a.shape)}, the model "
                f"expects B {b_shape} and A {a_shape} (rank {b_shape[1]})."
            )


def merge_lora(graphdef: nnx.GraphDef, base: Mapping, adapters: Adapters) -> LoRATransformer:
    """Rebuilds the NNX model from :func:`split_lora`'s pieces.

    Args:
      graphdef: the static part of the model.
      base: the base parameters (pure nested dict).
      adapters: unstacked adapters.

    Returns:
      The NNX model.

    Raises:
      ValueError: the adapters' modules or shapes differ from the model's
        (see :func:`check_adapter_shapes`).
    """
    check_adapter_shapes(graphdef, adapters)
    return nnx.merge(graphdef, adapters_to_lora_state(adapters), base)


def apply_lora(
    graphdef: nnx.GraphDef, base: Mapping, adapters: Adapters, tokens: Int[Array, "b t"]
) -> Float[Array, "b t v"]:
    """Pure forward pass: logits of the model ``(graphdef, base, adapters)`` on ``tokens``.

    Args:
      graphdef: the static part of the model.
      base: the base parameters.
      adapters: unstacked adapters.
      tokens: ``(batch, time)`` int tokens.

    Returns:
      ``(batch, time, vocab)`` logits.

    Raises:
      ValueError: the adapters do not fit the model (see :func:`check_adapter_shapes`).
    """
    return merge_lora(graphdef, base, adapters)(tokens)


def merge_adapters(base: Mapping, adapters: Adapters, scale: float) -> dict:
    """Folds the adapters into the base kernels: ``W <- W + scale * (B A)^T``.

    The kernels are Flax's ``(in, out)``, the transpose of the ``(out, in)``
    update ``B A``.

    The model ``(graphdef, merge_adapters(base, adapters, scale), zero adapters)``
    computes the same function as ``(graphdef, base, adapters)`` when ``scale``
    is the model's ``lora_alpha / lora_rank`` (:attr:`TransformerConfig.lora_scale`).

    Args:
      base: the base parameters from :func:`split_lora`.
      adapters: unstacked adapters, ``B (out, r)``, ``A (r, in)`` per module.
      scale: ``alpha / r``.

    Returns:
      A new base dict (the input is not modified).
    """
    flat = flatten_tree(base)
    for name, factors in adapters.items():
        key = (*module_path(name), "kernel")
        if key not in flat:
            raise ValueError(f"adapter {name!r} has no kernel in the base parameters.")
        kernel = flat[key]
        if factors.B.ndim != 2 or (factors.B @ factors.A).T.shape != kernel.shape:
            raise ValueError(
                f"adapter {name!r}: (B {tuple(factors.B.shape)} @ A {tuple(factors.A.shape)})^T "
                f"does not match the kernel {tuple(kernel.shape)} (in, out)."
            )
        flat[key] = kernel + scale * (factors.B @ factors.A).T
    return unflatten_tree(flat)


def zeros_like_adapters(adapters: Adapters) -> Adapters:
    """Adapters with every factor zero (the base model's function)."""
    return jax.tree.map(jnp.zeros_like, adapters)
