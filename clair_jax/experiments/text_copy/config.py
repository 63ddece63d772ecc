"""The experiment's settings: one dataclass for the command line and the Python API."""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import optax

from clair_jax._src import data as data_lib
from clair_jax._src import validation

METHODS = (
    "local_only",
    "fedit",
    "flexlora",
    "ffa_lora",
    "fedrot",
    "coordinate_median",
    "trimmed_mean",
    "krum",
    "multi_krum",
    "geometric_median",
    "clair",
)
"""Every rule the experiment knows, in table order."""

KRUM_METHODS = ("krum", "multi_krum")
"""The rules that need ``participants >= 2 f + 3`` (:func:`byzantine_budget`)."""

#: Local optimiser name -> (optax factory, default learning rate; Adam's: package docstring).
OPTIMIZERS = {"adam": (optax.adam, 5e-3), "sgd": (optax.sgd, 0.3)}

#: Presets of the settings left unset (``None``): ``--quick`` and the full run.
QUICK = {"clients": 20, "rounds": 6, "local_steps": 10, "pretrain_steps": 800}
FULL = {"clients": 40, "rounds": 12, "local_steps": 10, "pretrain_steps": 1500}

CACHE_ENV = "CLAIR_JAX_CACHE"

#: Smallest accepted value of each integer setting.
MINIMUMS = {
    "clients": 2,
    "rounds": 1,
    "rank": 1,
    "layers": 1,
    "local_steps": 1,
    "batch_size": 1,
    "train_examples": 1,
    "test_examples": 1,
    "pretrain_steps": 0,
}


def default_cache_dir() -> str:
    """``$CLAIR_JAX_CACHE``, else ``~/.cache/clair_jax``."""
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "clair_jax")


def _setting(default, help, *, type=str, choices=None, shown=None):  # noqa: A002
    """A dataclass field with what the command line needs: converter, choices, help."""
    meta = {"help": help, "type": type, "choices": choices, "shown": shown}
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings of the text-copying experiment (the flags of its command line).

    Each field is the flag ``--<name with dashes>``; settings left ``None`` take
    the ``--quick`` (:data:`QUICK`) or full (:data:`FULL`) preset, or the
    optimiser's default learning rate, in :meth:`resolved`.
    """

    quick: bool = _setting(False, "the small default run", type=bool)
    clients: int | None = _setting(None, "number of clients", type=int, shown="quick 20, full 40")
    fraction: float = _setting(0.3, "contaminated fraction", type=float)
    kind: str = _setting("random", "contamination", choices=data_lib.CONTAMINATIONS)
    rounds: int | None = _setting(None, "federated rounds", type=int, shown="quick 6, full 12")
    rank: int = _setting(8, "LoRA rank", type=int)
    layers: int = _setting(2, "Transformer blocks", type=int)
    methods: str | Sequence[str] = _setting(
        "all", f"comma-separated subset of {','.join(METHODS)}, or all"
    )
    seed: int = _setting(0, "federation and training seed", type=int)
    local_steps: int | None = _setting(
        None, "local optimiser steps per round", type=int, shown="10"
    )
    batch_size: int = _setting(8, "local minibatch size", type=int)
    optimizer: str = _setting("adam", "local optimiser", choices=tuple(sorted(OPTIMIZERS)))
    lr: float | None = _setting(
        None, "local learning rate", type=float, shown="adam 0.005, sgd 0.3"
    )
    clair_measure: str = _setting(
        "adapter",
        "CLAIR on the clients' adapters or on their round updates",
        choices=("adapter", "update"),
    )
    clair_detection: str = _setting(
        "module",
        "flag per module (any) or on the client score pooled over modules",
        choices=("module", "client"),
    )
    clair_flagged: str = _setting(
        "trained",
        "what a client CLAIR flags holds next: the adapter it trained or the global one",
        choices=("global", "trained"),
    )
    clair_space: str = _setting(
        "row",
        "CLAIR's shared subspace: row space (of the A factors: input side, the "
        "down-projections clients share after one broadcast start) or column space (of B)",
        choices=("column", "row"),
    )
    clair_rank: str = _setting(
        "lora",
        "CLAIR's refinement rank: 'lora' (at most the LoRA rank), 'estimate' (CLAIR's "
        "estimate) or a fixed integer (detection and refinement)",
    )
    train_examples: int = _setting(6, "sequences per client", type=int)
    test_examples: int = _setting(64, "held-out sequences per client", type=int)
    participation: int | None = _setting(
        None, "clients sampled per round", type=int, shown="all clients"
    )
    pretrain_steps: int | None = _setting(
        None, "base pre-training steps", type=int, shown="quick 800, full 1500"
    )
    pretrain_seed: int = _setting(0, "base model seed", type=int)
    cache_dir: str | None = _setting(
        None, "base-model cache", shown=f"${CACHE_ENV} or ~/.cache/clair_jax"
    )
    no_cache: bool = _setting(False, "do not read/write the base-model cache", type=bool)
    checkpoint_dir: str | None = _setting(
        None,
        "checkpoint each method's state and per-round results here and resume",
        shown="no checkpoints",
    )
    out: str = _setting(os.path.join("benchmarks", "out", "text_copy"), "output folder")
    name: str = _setting("text_copy", "output file stem")
    progress: bool | None = _setting(
        None, "show progress bars", type=bool, shown="on a terminal or in a notebook"
    )

    def resolved(self) -> Config:
        """The settings with the presets filled in and the methods as a list, checked.

        With ``methods="all"``, Krum and Multi-Krum are left out (with a note on
        stderr) when there are too few participants for them.

        Raises:
          ValueError: a setting out of range (the message names its flag).
        """
        preset = QUICK if self.quick else FULL
        changes: dict[str, Any] = {k: v for k, v in preset.items() if getattr(self, k) is None}
        if self.lr is None:
            changes["lr"] = OPTIMIZERS[self.optimizer][1]
        config = dataclasses.replace(self, **changes)
        if config.optimizer not in OPTIMIZERS:
            raise ValueError(f"--optimizer must be one of {sorted(OPTIMIZERS)}")
        try:
            clair_rank_kwargs(config.clair_rank)
        except ValueError as err:
            raise ValueError(f"--{err}".replace("clair_rank", "clair-rank", 1)) from None
        check_numbers(config)
        default_methods = isinstance(config.methods, str) and config.methods == "all"
        if default_methods:
            methods = list(METHODS)
        else:
            given = config.methods.split(",") if isinstance(config.methods, str) else config.methods
            methods = [m.strip() for m in given if m.strip()]
            unknown = sorted(set(methods) - set(METHODS))
            if unknown:
                raise ValueError(f"unknown methods {unknown}; choose from {','.join(METHODS)}")
            if not methods:
                raise ValueError(f"--methods is empty; choose from {','.join(METHODS)} (or 'all')")
        participants = config.participation or config.clients
        f = byzantine_budget(config.fraction, participants)
        krum = [m for m in methods if m in KRUM_METHODS]
        if krum and participants < 2 * f + 3:
            why = (
                f"{' and '.join(krum)} need{'s' * (len(krum) == 1)} at least 2f + 3 = {2 * f + 3} "
                f"participants per round, with f = round(--fraction * participants) = {f}; got "
                f"{participants} (--participation, or --clients)"
            )
            if not default_methods:
                raise ValueError(why)
            print(f"note: skipping {', '.join(krum)}: {why}.", file=sys.stderr)
            methods = [m for m in methods if m not in KRUM_METHODS]
        return dataclasses.replace(config, methods=methods)


def check_numbers(config: Config) -> None:
    """Raises ``ValueError`` for numeric settings out of range (before anything runs)."""
    for name, minimum in MINIMUMS.items():
        value = getattr(config, name)
        if value < minimum:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {minimum}, got {value}")
    validation.contaminated_count(config.fraction, config.clients, "--fraction", "--clients")
    if not (np.isfinite(config.lr) and config.lr > 0):
        raise ValueError(f"--lr must be finite and > 0, got {config.lr}")
    if config.participation is not None and not 1 <= config.participation <= config.clients:
        raise ValueError(
            f"--participation must be in [1, --clients = {config.clients}], "
            f"got {config.participation}"
        )


def byzantine_budget(fraction: float, participants: int) -> int:
    """Krum's and Multi-Krum's assumed attacker count ``f = round(fraction * participants)``."""
    return int(np.round(fraction * participants))


def clair_rank_kwargs(clair_rank: str) -> dict[str, Any]:
    """:func:`clair_jax.clair_aggregator` keywords for a ``--clair-rank`` value.

    Raises:
      ValueError: ``clair_rank`` is not ``"lora"``, ``"estimate"`` or a positive
        integer (as a string of digits).
    """
    if clair_rank == "lora":
        return {}
    if clair_rank == "estimate":
        return {"refine_rank": None}
    if str(clair_rank).isdigit() and int(clair_rank) > 0:
        return {"rank": int(clair_rank), "refine_rank": None}
    raise ValueError(
        f"clair_rank must be 'lora', 'estimate' or a positive integer, got {clair_rank!r}."
    )
