"""LoRA factor types and the checks of stacked client factors.

A module's weight update is ``B A`` with ``B`` ``(p, r)`` and ``A`` ``(r, q)``;
clients' factors are stacked on a leading axis. The orientation is PEFT's (and
PyTorch's, whose weights are ``out x in``): ``B`` is PEFT's ``lora_B``
(``out x r``), ``A`` its ``lora_A`` (``r x in``), so ``p = out``, ``q = in`` and
``B A`` is the ``out x in`` weight delta before scaling. Flax NNX's ``nnx.LoRA``
(``y = x @ lora_a @ lora_b``, ``lora_a`` ``in x r``, ``lora_b`` ``r x out``)
maps by transposes, with no change of letter: ``A = lora_a.T``, ``B = lora_b.T``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array

from clair_jax._src import validation


class LoRAFactors(NamedTuple):
    """One adapted module's LoRA factors; the weight update is ``B @ A`` (``p x q``).

    PEFT's orientation: ``B`` is ``lora_B`` (``p = out``), ``A`` is ``lora_A``
    (``q = in``), so ``B @ A`` is the ``out x in`` delta (times the adapter scale).

    Attributes:
      B: ``(n, p, r)`` stacked over clients, or ``(p, r)`` for the global adapter.
      A: ``(n, r, q)`` stacked over clients, or ``(r, q)`` for the global adapter.
    """

    B: Array
    A: Array


Adapters = dict[str, LoRAFactors]
"""Module name -> :class:`LoRAFactors`."""


def check_adapters(
    clients: Mapping[str, LoRAFactors],
    global_: Mapping[str, LoRAFactors],
    weights,
    *,
    finite: bool = True,
) -> tuple[Adapters, Adapters, Array]:
    """Checks stacked client adapters against the global one; returns them and ``p``.

    Args:
      clients: ``{module: LoRAFactors(B (n, p, r), A (n, r, q))}`` (or ``{"B", "A"}``
        dicts / 2-tuples).
      global_: ``{module: LoRAFactors(B (p, r), A (r, q))}`` with the same modules.
      weights: ``(n,)`` non-negative client weights, not all zero, or None (equal).
      finite: reject NaN/inf in the clients' factors. The aggregation rules pass
        False: a non-finite client is screened out
        (:mod:`~clair_jax._src.aggregators.screening`), not a reason to stop the
        round. ``global_`` (the server's own state) is always checked.

    Returns:
      ``(clients, global_, p)``: the factors as arrays of one dtype per module,
      and the normalised weights ``p`` (:func:`check_weights`).

    Raises:
      ValueError: different module names, shapes that do not fit together, bad
        weights, or NaN/inf in ``global_`` (or, with ``finite``, in a client's
        factor; traced factors: a runtime error with the same message); the
        message names the module and the shapes.
      TypeError: non-mappings or non-numeric factors.
    """
    if not isinstance(clients, Mapping) or not isinstance(global_, Mapping):
        raise TypeError(
            "clients and global_ must be dicts {module name: LoRAFactors(B, A)}, got "
            f"{type(clients).__name__} and {type(global_).__name__}."
        )
    if not clients:
        raise ValueError("clients must hold at least one module.")
    if set(clients) != set(global_):
        raise ValueError(
            f"clients and global_ must have the same modules, got {sorted(clients)} and "
            f"{sorted(global_)}."
        )
    out_c, out_g = {}, {}
    n = None
    for name in clients:
        try:
            b, a = _factors(clients[name], f"clients[{name!r}]")
            b_g, a_g = _factors(global_[name], f"global_[{name!r}]")
            a, b, a_g, b_g = check_factors(a, b, a_g, b_g, None, " of global_", finite=finite)
        except ValueError as err:
            raise ValueError(f"module {name!r}: {err}") from None
        if n is None:
            n = a.shape[0]
        elif a.shape[0] != n:
            raise ValueError(
                f"module {name!r} has {a.shape[0]} clients (A {tuple(a.shape)}), other modules {n}."
            )
        out_c[name] = LoRAFactors(B=b, A=a)
        out_g[name] = LoRAFactors(B=b_g, A=a_g)
    dtype = jnp.result_type(*[f.A.dtype for f in out_c.values()])
    p = check_weights(weights, n, dtype)
    return out_c, out_g, p


def _factors(f, where: str) -> tuple:
    """``(B, A)`` of a :class:`LoRAFactors`, a ``{"B", "A"}`` dict or a 2-tuple."""
    if isinstance(f, Mapping) and set(f) == {"A", "B"}:
        return f["B"], f["A"]
    if isinstance(f, tuple) and len(f) == 2:
        return f[0], f[1]
    raise TypeError(f"{where} must be LoRAFactors(B, A), got {type(f).__name__}.")


def check_factors(
    A, B, A_ref, B_ref, factor: str | None, suffix: str = "_ref", *, finite: bool = True
):
    """Converts and checks stacked factors and (optional) references.

    Args:
      A: ``(n, r, q)`` factors.
      B: ``(n, p, r)`` factors.
      A_ref: ``(r, q)`` reference or None.
      B_ref: ``(p, r)`` reference or None.
      factor: the reference that must be present (``"A"``, ``"B"`` or None).
      suffix: appended to ``"A"``/``"B"`` in the references' error messages.
      finite: reject NaN/inf in ``A`` and ``B`` (the references are always checked).

    Returns:
      ``(A, B, A_ref, B_ref)`` as arrays of one float dtype (references may be None).

    Raises:
      ValueError: wrong ranks or shapes, a missing required reference, NaN/inf
        (traced: a runtime error).
      TypeError: non-numeric arrays.
    """
    a = validation.as_float_array(A, "A")
    b = validation.as_float_array(B, "B")
    dtype = jnp.result_type(a.dtype, b.dtype)
    a, b = a.astype(dtype), b.astype(dtype)
    if a.ndim != 3 or b.ndim != 3:
        raise ValueError(
            f"A must have shape (n, r, q) and B shape (n, p, r), got A {tuple(a.shape)} and "
            f"B {tuple(b.shape)}; align several modules with jax.vmap."
        )
    n, r, q = a.shape
    n_b, p, r_b = b.shape
    if n != n_b:
        raise ValueError(
            f"A and B must hold the same number of clients, got A {tuple(a.shape)} (n={n}) and "
            f"B {tuple(b.shape)} (n={n_b})."
        )
    if r != r_b:
        raise ValueError(
            f"rank mismatch: A {tuple(a.shape)} has rank r={r} (axis 1) but B {tuple(b.shape)} "
            f"has rank r={r_b} (axis 2)."
        )
    if min(n, p, r, q) < 1:
        raise ValueError(f"A and B must be non-empty, got A {tuple(a.shape)}, B {tuple(b.shape)}.")
    if finite:
        a, b = validation.check_finite(a, "A"), validation.check_finite(b, "B")
    out = []
    for name, ref, shape in ((f"A{suffix}", A_ref, (r, q)), (f"B{suffix}", B_ref, (p, r))):
        if ref is None:
            if factor is not None and name[0] == factor:
                raise ValueError(f'factor="{factor}" needs {name} of shape {shape}, got None.')
            out.append(None)
            continue
        ref = validation.as_float_array(ref, name, dtype)
        if ref.shape != shape:
            raise ValueError(
                f"{name} must have shape {shape} for A {tuple(a.shape)} and B {tuple(b.shape)}, "
                f"got {tuple(ref.shape)}."
            )
        out.append(validation.check_finite(ref, name))
    return a, b, out[0], out[1]


def check_weights(weights, n: int, dtype) -> Array:
    """Client weights ``(n,)``, non-negative and not all zero, normalised to sum to one.

    The weights are normalised in at least float32
    (``validation.working_dtype``), where sums of example counts do not overflow.

    Args:
      weights: ``(n,)`` weights, or None for equal weights.
      n: the number of clients.
      dtype: dtype of the factors.

    Returns:
      ``(n,)`` weights ``p_i = w_i / Σ_j w_j``.

    Raises:
      ValueError: a wrong shape, negative or non-finite weights, all zero
        (traced: a runtime error).
      TypeError: non-numeric weights.
    """
    dtype = validation.working_dtype(dtype)
    if weights is None:
        return jnp.full((n,), 1.0 / n, dtype)
    w = validation.as_float_array(weights, "weights", dtype)
    if w.shape != (n,):
        raise ValueError(f"weights must have shape (n,) = ({n},), got shape {tuple(w.shape)}.")
    w = validation.check_nonnegative(w, "weights")
    total = jnp.sum(w)
    msg = "weights must not all be zero"
    if validation.is_traced(total):
        total = eqx.error_if(total, total <= 0, msg + ".")
    elif not float(total) > 0:
        raise ValueError(f"{msg}, got {w!r}.")
    return w / total
