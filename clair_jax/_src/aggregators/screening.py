"""Screening of clients' factors before any aggregation rule runs.

Every rule of :mod:`clair_jax` screens the clients it receives
(:func:`screen_clients`) before its own arithmetic, so that one client cannot
stop the round or poison the server's state. A client is **excluded** when

* its factors hold NaN or inf, in any module (reason ``"non-finite"``); or
* its size is far above the other clients' (reason ``"norm outlier"``): on the
  log scale, either statistic

  .. math::

      f_i = \\log \\big\\|(B_{ik}, A_{ik})_{k}\\big\\|_F, \\qquad
      g_i = \\log \\Big(\\sum_k \\|B_{ik} A_{ik}\\|_F^2\\Big)^{1/2}

  (over the modules ``k``: the factors the client sends, and the weight update
  they make) exceeds the median over the clients by more than
  ``max(k_MAD · 1.4826 · MAD, log max_ratio)`` for ``f`` and
  ``max(k_MAD · 1.4826 · MAD, 2 log max_ratio)`` for ``g`` (factors ``c``
  times larger make a product ``c^2`` times larger); ``MAD`` is the median
  absolute deviation, ``1.4826 · MAD`` the normal-consistent robust scale. The
  median and MAD are taken over the finite clients with a non-zero statistic,
  so a minority cannot move them. Defaults: ``max_ratio = 1e3`` (a client is
  excluded only when its factors are more than a thousand times the median
  size, or its update a million times: heavy enough to dominate or overflow an
  average, far beyond the spread of benign clients' updates, and far beyond the
  ``update_scale`` of the attacks the robust rules are meant to handle) and
  ``k_MAD = 5`` (in a population whose sizes spread over orders of magnitude,
  only clients far out in that spread).
  Only large sizes are excluded: a small or zero update cannot dominate a mean.

Shapes and dtypes are checked for the stacked input as a whole (a stacked
array cannot hold one client of another shape): a mismatch raises a
``ValueError`` naming the module and the shapes, before screening.

The statistics are computed at a safe scale: each factor is divided by its
largest absolute entry before squaring, and ``||B A||_F^2 = tr((B^T B)(A A^T))``
is formed from ``r x r`` Gram matrices of the rescaled factors, so no finite
input overflows and no ``p x q`` product is formed.

An excluded client's factors are replaced (by ``jnp.where``, before any
arithmetic: ``0 * inf`` is NaN) by the adapter it started the round from (the
global adapter, or ``start=`` where the rule takes it) and its weight set to
zero; the rule then runs on the others. Reason codes are in :data:`REASONS`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from clair_jax._src import validation
from clair_jax._src.lora.types import Adapters

#: Names of the screening reason codes (``diagnostics["screened/reason"]``,
#: ``RoundMetrics.screened``): index 0 is a client that passed.
REASONS = ("ok", "non-finite", "norm outlier", "non-finite result")
OK, NON_FINITE, NORM_OUTLIER, NON_FINITE_RESULT = range(4)
#: ``screen=`` choices of every rule: exclude and go on, raise, or no screening.
SCREEN_MODES = ("exclude", "raise", "off")
MAX_RATIO = 1e3
MAD_FACTOR = 5.0
_MAD_SCALE = 1.4826
#: Largest number of (client, reason, module) messages a traced strict check carries.
_MAX_MESSAGES = 4096


class Screening(NamedTuple):
    """What :func:`screen_clients` found, per client.

    Attributes:
      excluded: ``(n,)`` bool, clients the rule must not use.
      reason: ``(n,)`` int32 codes into :data:`REASONS` (0 for included clients).
      module: ``(n,)`` int32, index (into the sorted module names) of the first
        module holding a non-finite factor, -1 otherwise.
      factor: ``(n,)`` int32, 0 (``B``) or 1 (``A``): which factor of that module
        is non-finite, -1 otherwise.
      log_factor_norm: ``(n,)`` the statistic ``f_i`` (``-inf`` for zero factors,
        ``nan`` for non-finite clients).
      log_product_norm: ``(n,)`` the statistic ``g_i``.
      threshold: ``(2,)`` the largest ``f_i`` and ``g_i`` that pass.
    """

    excluded: Bool[Array, " n"]
    reason: Int[Array, " n"]
    module: Int[Array, " n"]
    factor: Int[Array, " n"]
    log_factor_norm: Float[Array, " n"]
    log_product_norm: Float[Array, " n"]
    threshold: Float[Array, " 2"]


def check_screen(screen) -> str:
    """``screen`` if it is one of :data:`SCREEN_MODES` (ValueError otherwise)."""
    return validation.check_choice(screen, "screen", SCREEN_MODES)


def _log_norm(x: Array, axes: tuple[int, ...]) -> tuple[Array, Array]:
    """``(log max|x|, x / max|x|)`` over ``axes`` (``-inf`` and zeros for a zero block)."""
    m = jnp.max(jnp.abs(x), axis=axes, keepdims=True)
    scaled = x / jnp.where(m > 0, m, 1)
    return jnp.log(jnp.squeeze(m, axes)), scaled


def _logsumexp(values: Sequence[Array]) -> Array:
    """``log Σ exp(v)`` over a list of ``(n,)`` arrays, ``-inf`` when all are ``-inf``."""
    return jax.nn.logsumexp(jnp.stack(values), axis=0, where=None)


def masked_median(values: Array, mask: Array) -> Array:
    """Median of ``values[mask]`` (mean of the two middle ones; 0 when ``mask`` is empty)."""
    count = jnp.sum(mask)
    s = jnp.sort(jnp.where(mask, values, jnp.inf))
    lo, hi = s[jnp.maximum(count - 1, 0) // 2], s[count // 2]
    return jnp.where(count > 0, 0.5 * (lo + hi), 0)


def _outliers(stat: Array, usable: Array, log_ratio: float, mad_factor: float):
    """Clients whose statistic is far above the median of the ``usable`` ones."""
    usable = usable & jnp.isfinite(stat)
    med = masked_median(stat, usable)
    mad = masked_median(jnp.abs(stat - med), usable)
    allowance = jnp.maximum(mad_factor * _MAD_SCALE * mad, log_ratio)
    return usable & (stat > med + allowance), med + allowance


def screen_clients(
    clients: Adapters, *, max_ratio: float = MAX_RATIO, mad_factor: float = MAD_FACTOR
) -> Screening:
    """Screens stacked client adapters (see the module docstring for the rule).

    Pure and jittable. Modules are visited in sorted name order (the order of
    ``Screening.module``).

    Args:
      clients: ``{module: LoRAFactors(B (n, p, r), A (n, r, q))}``, already
        checked (:func:`clair_jax._src.lora.types.check_adapters`).
      max_ratio: a client passes while its factors are at most ``max_ratio``
        times the median size, and its update ``max_ratio^2`` times (``> 1``).
      mad_factor: robust standard deviations allowed above the median (``> 0``).

    Returns:
      A :class:`Screening`.

    Raises:
      ValueError: ``max_ratio <= 1`` or ``mad_factor <= 0``.
    """
    max_ratio = validation.check_positive_float(max_ratio, "max_ratio")
    mad_factor = validation.check_positive_float(mad_factor, "mad_factor")
    if max_ratio <= 1:
        raise ValueError(f"max_ratio must be > 1, got {max_ratio!r}.")
    names = sorted(clients)
    n = clients[names[0]].A.shape[0]
    module = jnp.full((n,), -1, jnp.int32)
    factor = jnp.full((n,), -1, jnp.int32)
    factor_logs, product_logs = [], []
    for k in reversed(range(len(names))):  # the first bad module wins
        f = clients[names[k]]
        work = validation.working_dtype(f.B.dtype)
        b, a = f.B.astype(work), f.A.astype(work)
        bad_b = ~jnp.all(jnp.isfinite(b), axis=(1, 2))
        bad_a = ~jnp.all(jnp.isfinite(a), axis=(1, 2))
        module = jnp.where(bad_b | bad_a, k, module)
        factor = jnp.where(bad_b, 0, jnp.where(bad_a, 1, factor))
        b = jnp.where(jnp.isfinite(b), b, 0)
        a = jnp.where(jnp.isfinite(a), a, 0)
        log_b, b_s = _log_norm(b, (1, 2))
        log_a, a_s = _log_norm(a, (1, 2))
        sq_b = jnp.sum(b_s * b_s, axis=(1, 2))
        sq_a = jnp.sum(a_s * a_s, axis=(1, 2))
        factor_logs += [2 * log_b + jnp.log(sq_b), 2 * log_a + jnp.log(sq_a)]
        gram_b = jnp.einsum("npr,nps->nrs", b_s, b_s, precision=jax.lax.Precision.HIGHEST)
        gram_a = jnp.einsum("nrq,nsq->nrs", a_s, a_s, precision=jax.lax.Precision.HIGHEST)
        trace = jnp.maximum(jnp.sum(gram_b * gram_a, axis=(1, 2)), 0)
        product_logs.append(2 * (log_b + log_a) + jnp.log(trace))
    finite = module < 0
    f_stat = 0.5 * _logsumexp(factor_logs)
    g_stat = 0.5 * _logsumexp(product_logs)
    out_f, thr_f = _outliers(f_stat, finite, float(np.log(max_ratio)), mad_factor)
    out_g, thr_g = _outliers(g_stat, finite, 2 * float(np.log(max_ratio)), mad_factor)
    outlier = out_f | out_g
    reason = jnp.where(~finite, NON_FINITE, jnp.where(outlier, NORM_OUTLIER, OK)).astype(jnp.int32)
    return Screening(
        excluded=reason > 0,
        reason=reason,
        module=module,
        factor=factor,
        log_factor_norm=jnp.where(finite, f_stat, jnp.nan),
        log_product_norm=jnp.where(finite, g_stat, jnp.nan),
        threshold=jnp.stack([thr_f, thr_g]),
    )


def no_screening(n: int, dtype=jnp.float32) -> Screening:
    """The :class:`Screening` of ``screen="off"``: nobody excluded, statistics not computed."""
    minus = jnp.full((n,), -1, jnp.int32)
    nan = jnp.full((n,), jnp.nan, validation.working_dtype(dtype))
    zeros = jnp.zeros((n,), jnp.int32)
    return Screening(zeros > 0, zeros, minus, minus, nan, nan, jnp.full((2,), jnp.inf, nan.dtype))


def describe(
    reason, module=None, factor=None, module_names: Sequence[str] = (), log_norms=None
) -> list[str]:
    """Human-readable lines, one per screened client: ``"client 3: non-finite B in module 'w'"``.

    Args:
      reason: ``(n,)`` reason codes (:data:`REASONS`), e.g.
        ``diagnostics["screened/reason"]`` or ``RoundMetrics.screened``.
      module: ``(n,)`` module indices (``diagnostics["screened/module"]``), optional.
      factor: ``(n,)`` factor codes (``diagnostics["screened/factor"]``), optional.
      module_names: the module names (sorted, as the rule visits them).
      log_norms: ``(n,)`` optional natural logs of the update norms
        (``diagnostics["screened/log_product_norm"]``), quoted for norm outliers.

    Returns:
      One string per client whose code is not 0, in client order.
    """
    reason = np.asarray(reason)
    names = sorted(module_names)
    lines = []
    for i in np.flatnonzero(reason):
        code = int(reason[i])
        text = REASONS[code] if 0 <= code < len(REASONS) else f"reason {code}"
        if code == NON_FINITE and module is not None and factor is not None:
            k, which = int(np.asarray(module)[i]), int(np.asarray(factor)[i])
            if 0 <= k < len(names) and which in (0, 1):
                text = f"non-finite {'BA'[which]} in module {names[k]!r}"
        elif code == NORM_OUTLIER and log_norms is not None:
            size = float(np.asarray(log_norms)[i]) / np.log(10.0)
            text += f" (update norm 10^{size:.1f})"
        lines.append(f"client {int(i)}: {text}")
    return lines


def _messages(n: int, names: Sequence[str]) -> tuple[list[str], bool]:
    """Messages of a traced strict check, indexed by :func:`_message_index`."""
    per_module = n * (2 * len(names) + 2) <= _MAX_MESSAGES
    out = []
    for i in range(n):
        if per_module:
            out += [f"client {i}: non-finite {w} in module {m!r}" for m in names for w in "BA"]
        out += [f"client {i}: non-finite factors", f"client {i}: norm outlier"]
    prefix = "screen='raise': "
    return [prefix + m for m in out], per_module


def raise_if_excluded(screening: Screening, module_names: Sequence[str], like: Array) -> Array:
    """Strict mode: raise when a client was excluded, naming the client and the reason.

    Concrete values raise a ``ValueError`` at once; traced ones go through
    ``equinox.branched_error_if`` (a runtime error whose message names the first
    excluded client, its reason and, for a non-finite factor, the module).

    Args:
      screening: the result of :func:`screen_clients`.
      module_names: the module names.
      like: an array threaded through the runtime check (returned).

    Returns:
      ``like`` (with the runtime check attached when traced).

    Raises:
      ValueError: a client was excluded (concrete input).
    """
    names = sorted(module_names)
    if not validation.is_traced(screening.excluded):
        lines = describe(
            screening.reason,
            screening.module,
            screening.factor,
            names,
            screening.log_product_norm,
        )
        if lines:
            raise ValueError(
                "screen='raise': " + "; ".join(lines) + " (screen='exclude' leaves such clients "
                "out and goes on)."
            )
        return like
    n = screening.excluded.shape[0]
    messages, per_module = _messages(n, names)
    first = jnp.argmax(screening.excluded)
    width = 2 * len(names) + 2 if per_module else 2
    code = screening.reason[first]
    where = screening.module[first] * 2 + screening.factor[first]
    offset = jnp.where(code == NON_FINITE, 0, 1)
    if per_module:
        offset = jnp.where(code == NON_FINITE, jnp.maximum(where, 0), 2 * len(names) + 1)
        offset = jnp.where((code == NON_FINITE) & (where < 0), 2 * len(names), offset)
    index = first * width + offset
    return eqx.branched_error_if(like, jnp.any(screening.excluded), index, messages)
