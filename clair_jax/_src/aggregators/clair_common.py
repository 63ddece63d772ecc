"""What the CLAIR aggregation rules share: their options, the detection pooled over
modules, and one compiled solve per module shape.

Used by the rule on products (:mod:`~clair_jax._src.aggregators.clair_rule`) and on
factors (:mod:`~clair_jax._src.aggregators.factored`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from clair_jax._src import validation
from clair_jax._src.clair.detection import detection_threshold
from clair_jax._src.device_split import line_mesh, pad_index, padded_size

#: Relative tolerance of the rules' decompositions (``tol=`` of :func:`clair_jax.clair`,
#: whose own default is 1e-6). The rules return what the refit gives: the basis and
#: ``σ̂`` recomputed from the data on the collaborative set, so the decomposition
#: enters only through its rank and the first collaborative set: discrete outputs, which
#: do not need the solve's last digits in float32.
ROUND_TOL = 1e-5


def rule_defaults(clair_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``clair_kwargs`` with the rules' defaults for what the caller did not give:
    ``consensus="robust"`` (the global adapter is a location estimate; cj.clair's own
    default, ``"rank"``, keeps heterogeneous benign coordinates unflagged) and
    ``tol=ROUND_TOL`` (``refit=False`` keeps cj.clair's 1e-6: the basis is then the
    decomposition's)."""
    defaults = {"consensus": "robust"}
    if clair_kwargs.get("refit", True):
        defaults["tol"] = ROUND_TOL
    return {**defaults, **clair_kwargs}


def check_rule_options(
    shared_space: str, measure: str, detection: str, flagged: str, refine_rank, clair_kwargs
) -> None:
    """Checks the options of :func:`clair_aggregator` (and of its factored twin).

    Raises:
      ValueError: an option outside its choices, ``refine_rank`` not ``"lora"``,
        ``None`` or an int ``>= 1``, or ``contaminated=`` among ``clair_kwargs``.
    """
    validation.check_choice(shared_space, "shared_space", ("column", "row"))
    validation.check_choice(measure, "measure", ("adapter", "update"))
    validation.check_choice(detection, "detection", ("module", "client"))
    validation.check_choice(flagged, "flagged", ("global", "trained"))
    if not (refine_rank is None or refine_rank == "lora"):
        if isinstance(refine_rank, bool) or not isinstance(refine_rank, int) or refine_rank < 1:
            raise ValueError(
                f"refine_rank must be 'lora', None or an int >= 1, got {refine_rank!r}."
            )
    if "contaminated" in clair_kwargs:
        raise ValueError(
            "contaminated= has no effect in clair_aggregator: what a flagged client holds "
            "next is set by flagged= ('trained' or 'global')."
        )


def pooled_detection(scores: Array) -> tuple[Array, Array, Array]:
    """``detection="client"``: ``(outliers, client_scores, client_threshold)``.

    The client score is the median over modules of the CLAIR score relative to
    the module's median score; CLAIR's robust threshold (with no noise floor)
    flags the outliers.

    Args:
      scores: ``(K, n)`` CLAIR scores of the ``n`` clients in each of ``K`` modules.
    """
    typical = jnp.median(scores, axis=1, keepdims=True)
    relative = scores / jnp.maximum(typical, jnp.finfo(scores.dtype).tiny)
    client_scores = jnp.median(relative, axis=0)
    client_threshold = detection_threshold(client_scores, jnp.zeros((), scores.dtype))
    return client_scores > client_threshold, client_scores, client_threshold


def module_mesh(devices) -> jax.sharding.Mesh | None:
    """The mesh :func:`map_modules` splits modules over, from a CLAIR rule's ``devices``.

    Args:
      devices: None (no mesh: modules are mapped on one device) or a sequence of
        ``jax.Device``.

    Returns:
      None, or a one-axis mesh ``"modules"`` over ``devices``.

    Raises:
      TypeError: ``devices`` is not None or a sequence.
      ValueError: an empty sequence, an entry that is not a ``jax.Device``, or a
        device listed twice.
    """
    if devices is None:
        return None
    if isinstance(devices, jax.Device) or not isinstance(devices, Sequence | np.ndarray):
        raise TypeError(
            f"devices must be None or a sequence of jax.Device (e.g. jax.devices()), got "
            f"{type(devices).__name__}."
        )
    devices = list(np.asarray(devices, dtype=object).ravel())
    if not devices or not all(isinstance(d, jax.Device) for d in devices):
        raise ValueError(f"devices must be a non-empty sequence of jax.Device, got {devices!r}.")
    return line_mesh(devices, "modules")


def map_modules(
    fn: Callable, inputs: Mapping[str, Any], mesh: jax.sharding.Mesh | None = None
) -> dict:
    """``{name: fn(inputs[name])}``, modules of one shape solved by one compiled ``fn``.

    Modules whose inputs (pytrees of arrays) have the same structure, shapes and
    dtypes are stacked and mapped with ``jax.lax.map``: one copy of ``fn`` per
    shape in the compiled program instead of one per module, which keeps the
    compilation of a many-module round short. With a ``mesh`` of two or more
    devices (:func:`module_mesh`), each shape's stack is split over them with
    ``jax.shard_map`` and every device maps its share, so the per-module solves
    (sequential LAPACK calls on CPU) run side by side; a stack the devices do
    not divide is padded with copies of its last module, whose results are
    dropped (:mod:`~clair_jax._src.device_split`). ``fn`` must map one module's
    inputs to a pytree of arrays.
    """
    groups: dict[tuple, list[str]] = {}
    for name, tree in inputs.items():
        leaves, structure = jax.tree.flatten(tree)
        signature = (structure, *((x.shape, jnp.result_type(x)) for x in leaves))
        groups.setdefault(signature, []).append(name)
    out = {}
    for names in groups.values():
        if len(names) == 1:
            out[names[0]] = fn(inputs[names[0]])
            continue
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *(inputs[name] for name in names))
        mapped = _spread_map(fn, stacked, len(names), mesh)
        for i, name in enumerate(names):
            out[name] = jax.tree.map(lambda a, i=i: a[i], mapped)
    return {name: out[name] for name in inputs}


def _spread_map(fn: Callable, stacked, count: int, mesh: jax.sharding.Mesh | None):
    """``jax.lax.map(fn, stacked)`` (``count`` modules), split over ``mesh``'s devices."""
    if mesh is None or mesh.size < 2:
        return jax.lax.map(fn, stacked)
    if padded_size(count, mesh.size) != count:
        lanes = pad_index(count, mesh.size)
        stacked = jax.tree.map(lambda x: x[lanes], stacked)
    spec = jax.sharding.PartitionSpec("modules")
    mapped = jax.shard_map(
        lambda share_of_modules: jax.lax.map(fn, share_of_modules),
        mesh=mesh,
        in_specs=spec,
        out_specs=spec,
        check_vma=False,
    )(stacked)
    return jax.tree.map(lambda x: x[:count], mapped)


def refine_width(refine_rank, lora_rank: int, width: int) -> int:
    """Columns of CLAIR's basis the refinement keeps (static): ``width`` for ``None``,
    at most the LoRA rank for ``"lora"``, at most ``refine_rank`` for an int."""
    if refine_rank is None:
        return width
    return min(width, lora_rank if refine_rank == "lora" else refine_rank)


def module_diagnostics(name: str, res, decomposition, width: int) -> dict[str, Array]:
    """A module's CLAIR diagnostics, keyed ``"<quantity>/<name>"``.

    Args:
      name: the module's name.
      res: its CLAIR result (``collaborative``, ``scores``, ``threshold``, ``rank``,
        ``majority_refit``).
      decomposition: the final decomposition CLAIR solved (``converged``, ``num_iters``).
      width: the columns of the basis the refinement keeps.
    """
    return {
        f"flagged/{name}": ~res.collaborative,
        f"scores/{name}": res.scores,
        f"threshold/{name}": res.threshold,
        f"rank/{name}": res.rank,
        f"refine_rank/{name}": jnp.minimum(res.rank, width),
        f"majority_refit/{name}": res.majority_refit,
        f"converged/{name}": decomposition.converged,
        f"num_iters/{name}": decomposition.num_iters,
    }
