"""Running the experiment: every rule on the same federation, with checkpoint and resume."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import clair_jax as cj
from clair_jax._src import data as data_lib
from clair_jax._src.federated.checkpoint import atomic_write
from clair_jax.experiments.text_copy.config import OPTIMIZERS, Config, default_cache_dir
from clair_jax.experiments.text_copy.metrics import accuracy_by_token, detection, token_kinds
from clair_jax.experiments.text_copy.pretrain import pretrain
from clair_jax.experiments.text_copy.report import fmt
from clair_jax.experiments.text_copy.rules import make_aggregator

HISTORY_KEYS = ("curve", "round_f1", "seconds", "unconverged")
"""Per-round results kept beside a method's checkpoint: benign accuracy, F1, elapsed time,
and how many of the aggregator's decompositions stopped unconverged (CLAIR; 0 otherwise)."""


def unconverged_count(diagnostics) -> int:
    """Modules whose decomposition did not converge (``"converged/<module>"`` diagnostics)."""
    return int(sum(not bool(v) for k, v in diagnostics.items() if k.startswith("converged/")))


def write_json(path: str, obj: Any) -> None:
    """Writes ``obj`` as JSON to ``path`` atomically (a temporary file renamed over it)."""
    atomic_write(path, lambda f: json.dump(obj, f), binary=False)


def resume(
    checkpoint: str | None, history_file: str | None, state: cj.ServerState
) -> tuple[cj.ServerState, dict[str, list]]:
    """The state and per-round history a method's earlier run saved, else a fresh start.

    After every round the experiment writes the history (``HISTORY_KEYS``: the
    benign accuracy curve, each round's F1, the seconds elapsed since the method
    started and the unconverged decompositions) and then the state's checkpoint,
    so the history covers at least the checkpoint's rounds; it is cut to them. A
    checkpoint without its history (e.g. written by an older version) is not
    used: the method restarts from ``state`` (with the same keys, so with the
    same results).

    Args:
      checkpoint: the method's checkpoint file (``None``: no checkpointing).
      history_file: the JSON file of its per-round history.
      state: the initial state (also the structure the checkpoint must have).

    Returns:
      ``(state, history)`` with ``history`` a dict of lists, one entry per round done.
    """
    fresh = {k: [] for k in HISTORY_KEYS}
    if checkpoint is None or not os.path.exists(checkpoint):
        return state, fresh
    loaded = cj.load_checkpoint(checkpoint, like=state)
    done = int(loaded.round)
    try:
        with open(history_file) as f:
            history = json.load(f)
    except (OSError, ValueError):
        history = {}
    if not all(isinstance(history.get(k), list) and len(history[k]) >= done for k in HISTORY_KEYS):
        print(
            f"  {checkpoint}: no per-round history for its {done} rounds; starting from round 0",
            flush=True,
        )
        return state, fresh
    return loaded, {k: list(history[k][:done]) for k in HISTORY_KEYS}


def run(config: Config) -> dict[str, Any]:
    """Runs the experiment described by ``config``; returns the results.

    Args:
      config: the settings (:class:`Config`, resolved here if it is not yet).

    Returns:
      A JSON-ready dict: the settings, the model and federation, the base
      model's accuracy, per method its accuracy, loss, detection scores,
      per-round curves and seconds, and the environment.
    """
    config = config.resolved()
    start = time.perf_counter()
    length = 8
    model_config = cj.TransformerConfig(
        vocab_size=32,
        max_len=2 * length,
        num_layers=config.layers,
        lora_rank=config.rank,
        lora_alpha=2.0 * config.rank,
    )
    cache_dir = None if config.no_cache else (config.cache_dir or default_cache_dir())
    graphdef, base, adapters, pre = pretrain(
        model_config,
        length=length,
        steps=config.pretrain_steps,
        seed=config.pretrain_seed,
        cache_dir=cache_dir,
        progress=config.progress,
    )
    where = "loaded from" if pre["loaded"] else "trained, cached in"
    print(f"base model: {where} {pre['cache_file']}", flush=True)

    fed_config = data_lib.FederationConfig(
        num_clients=config.clients,
        contaminated_fraction=config.fraction,
        contamination=config.kind,
        vocab_size=model_config.vocab_size,
        length=length,
        train_examples=config.train_examples,
        test_examples=config.test_examples,
    )
    key = jax.random.key(config.seed)
    fed = data_lib.make_federation(jax.random.fold_in(key, 0), fed_config)
    round_key = jax.random.fold_in(key, 1)
    truth = np.asarray(fed.contaminated)
    benign = ~truth
    participants = config.participation or config.clients
    optimizer = OPTIMIZERS[config.optimizer][0](config.lr)
    evaluate = jax.jit(cj.evaluate_clients, static_argnums=0)
    kinds = token_kinds(fed, length)

    @jax.jit
    def correct(base, adapters, data):
        def one(adapters_i, x, y):
            return jnp.argmax(cj.apply_lora(graphdef, base, adapters_i, x), -1) == y

        return jax.vmap(one)(adapters, data.inputs, data.targets)

    base_eval = evaluate(
        graphdef, base, cj.init_server_state(adapters, config.clients).clients, fed.test
    )
    print(
        f"{config.clients} clients ({int(truth.sum())} contaminated, {config.kind}), "
        f"{config.rounds} rounds, rank {config.rank}; base model benign accuracy "
        f"{float(np.mean(np.asarray(base_eval.accuracy)[benign])):.3f}",
        flush=True,
    )

    run_id = hashlib.sha256(
        json.dumps(
            {k: v for k, v in dataclasses.asdict(config).items() if k != "progress"},
            sort_keys=True,
        ).encode()
    ).hexdigest()[:12]
    results = {}
    for name in config.methods:
        aggregator = make_aggregator(
            name,
            participants=participants,
            fraction=config.fraction,
            clair_measure=config.clair_measure,
            clair_detection=config.clair_detection,
            clair_flagged=config.clair_flagged,
            clair_space=config.clair_space,
            clair_rank=config.clair_rank,
        )
        round_fn = cj.make_round(
            graphdef,
            base,
            aggregator,
            local_steps=config.local_steps,
            batch_size=config.batch_size,
            optimizer=optimizer,
            participation=config.participation,
        )
        state = cj.init_server_state(adapters, config.clients)
        checkpoint = history_file = None
        if config.checkpoint_dir:
            checkpoint = os.path.join(config.checkpoint_dir, run_id, f"{name}.npz")
            history_file = os.path.join(config.checkpoint_dir, run_id, f"{name}.history.json")
        state, history = resume(checkpoint, history_file, state)
        curve, round_f1, elapsed = history["curve"], history["round_f1"], history["seconds"]
        unconverged = history["unconverged"]
        earlier = elapsed[-1] if elapsed else 0.0  # seconds spent by the runs resumed from
        t0 = time.perf_counter()

        def record(
            state,
            metrics,
            curve=curve,
            round_f1=round_f1,
            elapsed=elapsed,
            unconverged=unconverged,
            t0=t0,
            earlier=earlier,
            checkpoint=checkpoint,
            history_file=history_file,
        ):
            ev = evaluate(graphdef, base, state.clients, fed.test)
            curve.append(float(np.mean(np.asarray(ev.accuracy)[benign])))
            joined = np.zeros(len(truth), int)
            joined[np.asarray(metrics.participants)] = 1
            flags = np.asarray(metrics.flagged, int) * joined
            round_f1.append(detection(flags, joined, truth & (joined > 0))["f1"])
            unconverged.append(unconverged_count(metrics.diagnostics))
            elapsed.append(earlier + time.perf_counter() - t0)
            if checkpoint is not None:
                # The history first: it is never behind the state (resume() truncates it).
                write_json(
                    history_file,
                    {
                        "curve": curve,
                        "round_f1": round_f1,
                        "seconds": elapsed,
                        "unconverged": unconverged,
                    },
                )
                cj.save_checkpoint(checkpoint, state)

        state, _ = cj.run_rounds(
            round_fn,
            state,
            fed.train,
            round_key,
            config.rounds,
            progress=config.progress,
            desc=f"{name:>17s}",
            callback=record,
        )
        final = evaluate(graphdef, base, state.clients, fed.test)
        jax.block_until_ready(final)
        seconds = earlier + time.perf_counter() - t0
        accuracy = np.asarray(final.accuracy)[benign]
        results[name] = {
            "accuracy": float(accuracy.mean()),
            "accuracy_std": float(accuracy.std()),
            "loss": float(np.mean(np.asarray(final.loss)[benign])),
            "accuracy_per_client": np.asarray(final.accuracy).tolist(),
            "accuracy_by_token": accuracy_by_token(
                correct(base, state.clients, fed.test), kinds, benign
            ),
            "detection": detection(state.flag_counts, state.participation_counts, truth),
            "seconds": seconds,
            "curve": curve,
            "round_f1": round_f1,
            "unconverged_decompositions": unconverged,
        }
        r = results[name]
        print(
            f"  {name:>17s}: benign acc {r['accuracy']:.3f}, F1 {fmt(r['detection']['f1'], '.2f')}"
            f", {seconds:.1f} s",
            flush=True,
        )
        if sum(unconverged):
            print(
                f"  {name:>17s}: {sum(unconverged)} module decompositions stopped unconverged "
                f"(per round: {unconverged})",
                flush=True,
            )

    gaps = {}
    if "clair" in results:
        for other in ("local_only", "fedit"):
            if other in results:
                gaps[f"clair_minus_{other}"] = (
                    results["clair"]["accuracy"] - results[other]["accuracy"]
                )
    out = {
        "command": "python -m clair_jax.experiments.text_copy " + " ".join(sys.argv[1:]),
        "args": dataclasses.asdict(config),
        "model": model_config._asdict(),
        "federation": fed_config._asdict(),
        "contaminated": truth.tolist(),
        "base_accuracy": float(np.mean(np.asarray(base_eval.accuracy)[benign])),
        "pretraining": {k: v for k, v in pre.items() if k != "settings"},
        "methods": results,
        "gaps": gaps,
        "wall_seconds": time.perf_counter() - start,
        "environment": {
            "jax": jax.__version__,
            "backend": jax.default_backend(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
        },
    }
    return out
