"""The example's task: a LoRA Transformer fine-tuned on text copying by clients, some contaminated.

Everything here is a deterministic function of the run's settings, so the
ServerApp, every ClientApp (in whatever process Flower runs it) and the
in-process reference (:func:`clair_jax.make_round`) rebuild the same model,
the same federation and the same aggregation rule:

* the base model is the randomly initialised :class:`clair_jax.LoRATransformer`
  of ``model-seed`` (frozen; only the adapters train);
* the federation is :func:`clair_jax.data.make_federation` of ``data-seed``;
  client ``i`` (Flower's ``partition-id``) trains on row ``i`` of it;
* client ``i`` of round ``t`` (from 1) trains with the key
  ``fold_in(split(fold_in(key(seed), t - 1), 3)[1], i)``, the key
  :func:`clair_jax.run_rounds` and :func:`clair_jax.make_round` give it.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import clair_jax as cj
from clair_jax.experiments.text_copy.config import default_cache_dir
from clair_jax.experiments.text_copy.pretrain import pretrain
from clair_jax.experiments.text_copy.rules import make_aggregator

#: The run's settings (Flower's ``run_config`` keys) and their defaults: the CI run.
DEFAULTS: dict[str, Any] = {
    "num-clients": 8,
    "contaminated-fraction": 0.25,
    "contamination": "random",
    "num-rounds": 3,
    "aggregator": "clair",
    "local-steps": 20,
    "batch-size": 6,
    "learning-rate": 0.03,
    "train-examples": 6,
    "test-examples": 16,
    "vocab-size": 16,
    "length": 4,
    "width": 32,
    "mlp-width": 64,
    "num-heads": 2,
    "num-layers": 1,
    "lora-rank": 4,
    "lora-targets": "value,out",
    "pretrain-steps": 300,
    "seed": 0,
    "model-seed": 0,
    "data-seed": 1,
    "pad": True,
    "fraction-evaluate": 1.0,
    "wait-timeout": 600.0,
}

AGGREGATORS = (
    "clair",
    "fedit",
    "flexlora",
    "fedrot",
    "coordinate_median",
    "trimmed_mean",
    "krum",
    "multi_krum",
)
"""The rules the example can run (``aggregator`` setting)."""


def settings(run_config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """:data:`DEFAULTS` updated with ``run_config`` (Flower's), checked.

    Raises:
      ValueError: an unknown key, an unknown ``aggregator``, or the
        ``"coordinated"`` contamination (its clients pool their updates, which
        separate Flower nodes cannot do).
    """
    given = dict(run_config or {})
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown run_config keys {unknown}; known: {sorted(DEFAULTS)}.")
    out = {**DEFAULTS, **given}
    if out["aggregator"] not in AGGREGATORS:
        raise ValueError(f"aggregator must be one of {AGGREGATORS}, got {out['aggregator']!r}.")
    if out["contamination"] == "coordinated":
        raise ValueError(
            "contamination='coordinated' needs colluding clients; not in this example."
        )
    return out


def key_of(cfg: Mapping[str, Any]) -> tuple:
    """The settings as a hashable tuple (for the caches)."""
    return tuple(sorted(cfg.items()))


class Task(NamedTuple):
    """The model and data of a run (see the module docstring).

    Attributes:
      graphdef: the model's static part.
      base: frozen base parameters.
      adapters: the initial adapters (the server's first global adapter).
      federation: every client's data (:class:`clair_jax.data.Federation`).
      optimizer: the clients' local optimiser.
    """

    graphdef: nnx.GraphDef
    base: dict
    adapters: dict
    federation: cj.data.Federation
    optimizer: optax.GradientTransformation


@functools.lru_cache(maxsize=4)
def _task(frozen: tuple) -> Task:
    cfg = dict(frozen)
    length = cfg["length"]
    config = cj.TransformerConfig(
        vocab_size=cfg["vocab-size"],
        max_len=2 * length,
        num_layers=cfg["num-layers"],
        width=cfg["width"],
        num_heads=cfg["num-heads"],
        mlp_width=cfg["mlp-width"],
        lora_rank=cfg["lora-rank"],
        lora_alpha=2.0 * cfg["lora-rank"],
        lora_targets=tuple(cfg["lora-targets"].split(",")),
    )
    graphdef, base, adapters, _ = pretrain(
        config,
        length=length,
        steps=cfg["pretrain-steps"],
        seed=cfg["model-seed"],
        cache_dir=default_cache_dir(),
        progress=False,
    )
    federation = cj.data.make_federation(
        jax.random.key(cfg["data-seed"]),
        cj.data.FederationConfig(
            num_clients=cfg["num-clients"],
            contaminated_fraction=cfg["contaminated-fraction"],
            contamination=cfg["contamination"],
            vocab_size=cfg["vocab-size"],
            length=length,
            train_examples=cfg["train-examples"],
            test_examples=cfg["test-examples"],
        ),
    )
    return Task(graphdef, base, adapters, federation, optax.adam(cfg["learning-rate"]))


def task(cfg: Mapping[str, Any]) -> Task:
    """The run's :class:`Task` (cached per process: built once per ClientApp process)."""
    return _task(key_of(cfg))


def aggregator(cfg: Mapping[str, Any]) -> cj.Aggregator:
    """The server's rule with the text-copy experiment's settings
    (:func:`clair_jax.experiments.text_copy.rules.make_aggregator`): the robust ones
    assume ``f = round(fraction * clients)`` attackers; CLAIR runs with an offset and its
    shared subspace on the input side."""
    return make_aggregator(
        cfg["aggregator"], participants=cfg["num-clients"], fraction=cfg["contaminated-fraction"]
    )


def round_keys(cfg: Mapping[str, Any], server_round: int) -> tuple[jax.Array, jax.Array]:
    """``(train_key, aggregate_key)`` of Flower round ``server_round`` (from 1).

    The keys :func:`clair_jax.run_rounds` gives round ``server_round - 1`` of
    :func:`clair_jax.make_round` (its sampling key is unused: all clients train).
    """
    round_key = jax.random.fold_in(jax.random.key(cfg["seed"]), server_round - 1)
    _, k_train, k_agg = jax.random.split(round_key, 3)
    return k_train, k_agg


@functools.lru_cache(maxsize=4)
def _trainer(frozen: tuple):
    cfg = dict(frozen)
    t = _task(frozen)
    frozen_factor = aggregator(cfg).frozen_factor

    @jax.jit
    def train(start, x, y, w, scale, key):
        trained, losses = cj.local_train(
            t.graphdef,
            t.base,
            start,
            x,
            y,
            w,
            key,
            optimizer=t.optimizer,
            steps=cfg["local-steps"],
            batch_size=cfg["batch-size"],
            frozen_factor=frozen_factor,
        )
        # The attack model of clair_jax.make_round for one client: start + s (trained - start).
        sent = jax.tree.map(lambda a, b: a + scale.astype(a.dtype) * (b - a), start, trained)
        return sent, losses

    return train


def train_client(cfg: Mapping[str, Any], client: int, start: dict, train_key: jax.Array):
    """What client ``client`` sends after training from ``start``: ``(adapters, losses)``.

    Args:
      cfg: the run's settings.
      client: the client's index (its ``partition-id``).
      start: the adapters it received.
      train_key: the round's training key (:func:`round_keys`); the client folds
        in its index.
    """
    data = task(cfg).federation.train
    key = jax.random.fold_in(train_key, client)
    return _trainer(key_of(cfg))(
        start,
        data.inputs[client],
        data.targets[client],
        data.mask[client],
        data.update_scale[client],
        key,
    )


@functools.lru_cache(maxsize=4)
def _evaluator(frozen: tuple):
    t = _task(frozen)

    @jax.jit
    def evaluate(adapters, x, y, w):
        logits = cj.apply_lora(t.graphdef, t.base, adapters, x)
        correct = (jnp.argmax(logits, axis=-1) == y).astype(w.dtype)
        return jnp.sum(w * correct) / jnp.sum(w)

    return evaluate


def evaluate_client(cfg: Mapping[str, Any], client: int, adapters: dict) -> float:
    """Held-out token accuracy of ``adapters`` on client ``client``'s own test data."""
    data = task(cfg).federation.test
    return float(
        _evaluator(key_of(cfg))(
            adapters, data.inputs[client], data.targets[client], data.mask[client]
        )
    )
