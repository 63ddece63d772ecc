"""The aggregation rules compared, with the experiment's settings."""

from __future__ import annotations

import clair_jax as cj
from clair_jax.experiments.text_copy.config import METHODS, byzantine_budget, clair_rank_kwargs


def make_aggregator(
    name: str,
    *,
    participants: int,
    fraction: float,
    clair_measure: str = "adapter",
    clair_detection: str = "module",
    clair_flagged: str = "trained",
    clair_space: str = "row",
    clair_rank: str = "lora",
) -> cj.Aggregator:
    """The rule ``name`` with the experiment's settings.

    The Byzantine rules get the contaminated fraction as their assumed attacker
    budget: trimmed mean ``β = fraction`` (capped below 1/2), Krum and
    Multi-Krum ``f = round(fraction * participants)`` (Multi-Krum averages the
    ``participants - f`` best). FedRot-LoRA uses strength ``0.4`` (soft;
    the best point for RTE in its paper's λ-sensitivity figure, while SST-2
    peaks at 0.6 and QNLI at 0–0.2; :func:`clair_jax.fedrot`'s default is the
    authors' 1.5, hard Procrustes over O(r)). CLAIR runs on the products with
    an unknown common offset: the
    mean benign update is common to all clients and the shared subspace is that
    of the variation around it (see :func:`clair_jax.clair`). ``clair_rank``:
    ``"lora"`` (the aggregator's default: detection on CLAIR's estimated
    subspace, refinement on at most its leading LoRA-rank directions),
    ``"estimate"`` (refinement on all of it) or a fixed rank for both (a string
    of digits).
    """
    f = byzantine_budget(fraction, participants)
    rank_kwargs = clair_rank_kwargs(clair_rank)
    factories = {
        "local_only": cj.local_only,
        "fedit": cj.fedit,
        "flexlora": cj.flexlora,
        "ffa_lora": cj.ffa_lora,
        "fedrot": lambda: cj.fedrot(0.4),
        "coordinate_median": cj.coordinate_median,
        "trimmed_mean": lambda: cj.trimmed_mean(min(fraction, 0.49)),
        "krum": lambda: cj.krum(f),
        "multi_krum": lambda: cj.multi_krum(f, max(participants - f, 1)),
        "geometric_median": cj.geometric_median,
        "clair": lambda: cj.clair_aggregator(
            offset=True,
            measure=clair_measure,
            detection=clair_detection,
            flagged=clair_flagged,
            shared_space=clair_space,
            **rank_kwargs,
        ),
    }
    if name not in factories:
        raise ValueError(f"unknown method {name!r}; choose from {METHODS}.")
    return factories[name]()
