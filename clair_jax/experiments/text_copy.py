"""Federated LoRA fine-tuning of a small Transformer on the text-copying task.

Run ``python -m clair_jax.experiments.text_copy --quick`` (``--help`` for the
flags). The pipeline:

1. **Base model.** A :class:`~clair_jax.LoRATransformer` is pre-trained on the
   generic task (plain copying, ``y = x``), all base parameters trained, the
   adapters left at their initial value (``B = 0``: no effect). The result is
   cached in ``--cache-dir`` (default ``$CLAIR_JAX_CACHE`` or
   ``~/.cache/clair_jax``) under a name derived from every setting that
   affects it, as a ``numpy.savez`` file.
2. **Federation.** :func:`clair_jax.data.make_federation`: clients re-map a
   shared set of source tokens, some the same way, some their own way, with
   few examples each; a fraction is contaminated (``--kind``).
3. **Methods.** For every aggregation rule the same federation is trained for
   ``--rounds`` rounds from the same initial adapters with the same keys
   (:func:`clair_jax.run_rounds`; each client's local training is
   ``--local-steps`` steps of ``--optimizer`` (Adam by default, or plain SGD)
   on minibatches of its own examples). Adam's default learning rate, 5e-3, is
   the value of the grid {1e-3, 2e-3, 3e-3, 5e-3, 1e-2} with the best mean
   final benign accuracy of the two plain baselines, local-only and FedIT,
   over seeds 0-4 (``benchmarks/results/text_copy_lr_sweep.json``; CLAIR is
   not part of the criterion). At 1e-2 local training over-fits the few
   examples: local accuracy falls after round 2-3. CLAIR runs on the clients'
   adapters per module by default, refining on at most the LoRA rank's worth
   of its subspace (``--clair-rank``); ``--clair-measure update`` feeds it
   each client's round update instead and ``--clair-detection client`` pools
   the module scores per client (see :func:`clair_jax.clair_aggregator`).
4. **Report.** For each rule: the benign clients' held-out token accuracy and
   loss (each client evaluated with the adapter it holds after the last round:
   the broadcast global adapter for FedIT-like rules, its own for local-only
   and CLAIR), that accuracy split by the kind of token copied (re-mapped alike
   by benign clients, re-mapped per client, copied as is), the precision /
   recall / F1 of the clients the rule flagged in the majority of the rounds
   they took part in, the mean over rounds of each
   round's F1 ("F1 per round"), and the wall time (compilation included). A
   table is printed; JSON and a plot (if matplotlib is installed) are written
   to ``--out``.

Every random choice comes from ``--seed`` (and ``--pretrain-seed`` for the base).
"""

from __future__ import annotations

import argparse
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
import optax
from flax import nnx

import clair_jax as cj
from clair_jax._src import data as data_lib
from clair_jax._src import validation
from clair_jax._src.federated.checkpoint import atomic_write
from clair_jax._src.federated.training import masked_cross_entropy
from clair_jax._src.progress import ProgressBar

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

CACHE_ENV = "CLAIR_JAX_CACHE"


def default_cache_dir() -> str:
    """``$CLAIR_JAX_CACHE``, else ``~/.cache/clair_jax``."""
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "clair_jax")


# --- the pre-trained base ----------------------------------------------------------------


def pretrain(
    config: cj.TransformerConfig,
    *,
    length: int,
    steps: int,
    batch_size: int = 64,
    learning_rate: float = 3e-3,
    seed: int = 0,
    cache_dir: str | None = None,
    progress: bool | None = None,
) -> tuple[nnx.GraphDef, dict, dict, dict]:
    """A base model pre-trained on plain copying, loaded from the cache when present.

    Adam with linear warm-up and cosine decay over ``steps`` steps of
    ``batch_size`` fresh random sequences; only the base parameters are trained.

    Args:
      config: model architecture (``max_len >= 2 * length``).
      length: content tokens per sequence.
      steps: optimiser steps.
      batch_size: sequences per step.
      learning_rate: peak learning rate.
      seed: initialisation and data seed.
      cache_dir: where to read/write the cached base (``None``: no cache).
      progress: show a progress bar (``None``: on a terminal).

    Returns:
      ``(graphdef, base, adapters, info)`` with the initial adapters and a dict
      describing the run (cache file, whether it was loaded, final loss/accuracy).
    """
    if config.max_len < 2 * length:
        raise ValueError(f"config.max_len ({config.max_len}) must be >= 2 * length ({2 * length}).")
    model = cj.LoRATransformer(config, rngs=nnx.Rngs(seed))
    graphdef, base, adapters = cj.split_lora(model)
    settings = {
        "config": config._asdict(),
        "length": length,
        "steps": steps,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "seed": seed,
        "dtype": str(jax.tree.leaves(base)[0].dtype),
        "format": 1,
    }
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    path = None if cache_dir is None else os.path.join(cache_dir, f"text_copy_base_{digest}.npz")
    info = {"cache_file": path, "settings": settings}
    if path is not None and os.path.exists(path):
        info["loaded"] = True
        return graphdef, cj.load_checkpoint(path, like=base), adapters, info

    identity = jnp.arange(config.vocab_size, dtype=jnp.int32)
    warmup = max(1, min(100, steps // 10))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, warmup, max(steps, warmup + 1), learning_rate / 30
    )
    optimizer = optax.adam(schedule)

    def loss_fn(params, key):
        x, y, w = data_lib.copy_examples(key, batch_size, identity, length=length)
        logits = cj.apply_lora(graphdef, params, adapters, x)
        accuracy = jnp.sum(w * (jnp.argmax(logits, -1) == y)) / jnp.sum(w)
        return masked_cross_entropy(logits, y, w), accuracy

    @jax.jit
    def chunk(params, opt_state, keys):
        def step(carry, key):
            params, opt_state = carry
            (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, key)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), (loss, acc)

        (params, opt_state), (loss, acc) = jax.lax.scan(step, (params, opt_state), keys)
        return params, opt_state, loss, acc

    opt_state = optimizer.init(base)
    keys = jax.random.split(jax.random.fold_in(jax.random.key(seed), 1), steps)
    per_chunk = 100
    start = time.perf_counter()
    loss = acc = np.nan
    bar = ProgressBar(-(-steps // per_chunk), desc="pre-training", enabled=progress)
    with bar:
        for i in range(0, steps, per_chunk):
            base, opt_state, losses, accs = chunk(base, opt_state, keys[i : i + per_chunk])
            loss, acc = float(losses[-1]), float(accs[-1])
            bar.update(loss=loss, acc=acc)
    info.update(loaded=False, seconds=time.perf_counter() - start, loss=loss, accuracy=acc)
    if path is not None:
        cj.save_checkpoint(path, base)
    return graphdef, base, adapters, info


# --- methods ----------------------------------------------------------------------------


def make_aggregator(
    name: str,
    *,
    participants: int,
    fraction: float,
    clair_measure: str = "adapter",
    clair_detection: str = "module",
    clair_flagged: str = "trained",
    clair_space: str = "column",
    clair_rank: str = "lora",
) -> cj.Aggregator:
    """The rule ``name`` with the experiment's settings.

    The Byzantine rules get the contaminated fraction as their assumed attacker
    budget: trimmed mean ``β = fraction`` (capped below 1/2), Krum and
    Multi-Krum ``f = round(fraction * participants)`` (Multi-Krum averages the
    ``participants - f`` best). FedRot-LoRA uses strength ``0.4`` (soft;
    the best point for RTE in its paper's λ-sensitivity figure, while SST-2
    peaks at 0.6 and QNLI at 0–0.2; the authors' default is 1.5, hard
    Procrustes over O(r), :func:`clair_jax.fedrot`'s default). CLAIR runs on
    the products with an unknown common offset: the
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


def byzantine_budget(fraction: float, participants: int) -> int:
    """Krum's and Multi-Krum's assumed attacker count ``f = round(fraction * participants)``."""
    return int(np.round(fraction * participants))


KRUM_METHODS = ("krum", "multi_krum")
"""The rules that need ``participants >= 2 f + 3`` (:func:`byzantine_budget`)."""


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


def detection(flag_counts, participation_counts, truth) -> dict[str, float | None]:
    """Precision/recall/F1 of the clients flagged in most of the rounds they joined.

    Precision is ``None`` when nothing is flagged (and F1 then 0 if something
    was to be found).
    """
    flag_counts, participation_counts = np.asarray(flag_counts), np.asarray(participation_counts)
    truth = np.asarray(truth, bool)
    flagged = 2 * flag_counts > np.maximum(participation_counts, 1)
    tp = int(np.sum(flagged & truth))
    fp = int(np.sum(flagged & ~truth))
    fn = int(np.sum(~flagged & truth))
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / (tp + fn) if tp + fn else None
    if precision is None or recall is None:
        f1 = 0.0 if tp + fn else None
    else:
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "flagged": flagged.tolist(),
        "num_flagged": int(flagged.sum()),
    }


TOKEN_KINDS = ("shared", "specific", "other")
"""Kinds of source tokens: re-mapped alike by benign clients, per client, or copied."""


def token_kinds(fed: data_lib.Federation, length: int) -> np.ndarray:
    """Kind of the source token behind every held-out target position.

    Returns:
      ``(n, m, 2 * length)`` ints: the index in :data:`TOKEN_KINDS` of the token
      that target position copies (0: one of ``fed.shared_sources``, 1: one of
      ``fed.specific_sources``, 2: any other token), ``-1`` where nothing is
      scored (the mask is 0).
    """
    inputs = np.asarray(fed.test.inputs)
    source = np.full(inputs.shape, -1)
    source[..., length:] = inputs[..., :length]  # target t copies input t - length
    kinds = np.where(
        np.isin(source, np.asarray(fed.shared_sources)),
        0,
        np.where(np.isin(source, np.asarray(fed.specific_sources)), 1, 2),
    )
    return np.where(np.asarray(fed.test.mask) > 0, kinds, -1)


def accuracy_by_token(correct, kinds, benign) -> dict[str, float | None]:
    """Mean over benign clients of each client's accuracy on each kind of token.

    Args:
      correct: ``(n, m, t)`` bool, whether each prediction is right.
      kinds: ``(n, m, t)`` from :func:`token_kinds`.
      benign: ``(n,)`` bool.
    """
    correct, kinds = np.asarray(correct), np.asarray(kinds)
    out = {}
    for k, name in enumerate(TOKEN_KINDS):
        per_client = [
            correct[i][kinds[i] == k].mean()
            for i in np.flatnonzero(benign)
            if np.any(kinds[i] == k)
        ]
        out[name] = float(np.mean(per_client)) if per_client else None
    return out


def format_token_table(results: dict[str, dict]) -> str:
    """A Markdown table of the benign accuracy per kind of source token."""
    header = "| method | " + " | ".join(TOKEN_KINDS) + " |\n|---|" + "---|" * len(TOKEN_KINDS)
    rows = [
        f"| {name} | " + " | ".join(_fmt(r["accuracy_by_token"][k]) for k in TOKEN_KINDS) + " |"
        for name, r in results.items()
    ]
    return "\n".join([header, *rows])


# --- the experiment ---------------------------------------------------------------------

#: Local optimiser name -> (optax factory, default learning rate; Adam's: module docstring).
OPTIMIZERS = {"adam": (optax.adam, 5e-3), "sgd": (optax.sgd, 0.3)}

QUICK = {
    "clients": 20,
    "rounds": 6,
    "local_steps": 10,
    "pretrain_steps": 800,
}
FULL = {
    "clients": 40,
    "rounds": 12,
    "local_steps": 10,
    "pretrain_steps": 1500,
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m clair_jax.experiments.text_copy",
        description="Federated LoRA on the text-copying task: CLAIR against the baselines.",
    )
    parser.add_argument("--quick", action="store_true", help="the small default run")
    parser.add_argument("--clients", type=int, help="number of clients (quick 20, full 40)")
    parser.add_argument("--fraction", type=float, default=0.3, help="contaminated fraction")
    parser.add_argument(
        "--kind", default="random", choices=data_lib.CONTAMINATIONS, help="contamination"
    )
    parser.add_argument("--rounds", type=int, help="federated rounds (quick 6, full 12)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--layers", type=int, default=2, help="Transformer blocks")
    parser.add_argument(
        "--methods",
        default="all",
        help=f"comma-separated subset of {','.join(METHODS)} (default: all)",
    )
    parser.add_argument("--seed", type=int, default=0, help="federation and training seed")
    parser.add_argument("--local-steps", type=int, help="local optimiser steps per round")
    parser.add_argument("--batch-size", type=int, default=8, help="local minibatch size")
    parser.add_argument(
        "--optimizer", default="adam", choices=sorted(OPTIMIZERS), help="local optimiser"
    )
    parser.add_argument("--lr", type=float, help="local learning rate (adam 0.005, sgd 0.3)")
    parser.add_argument(
        "--clair-measure",
        default="adapter",
        choices=("adapter", "update"),
        help="CLAIR on the clients' adapters or on their round updates",
    )
    parser.add_argument(
        "--clair-detection",
        default="module",
        choices=("module", "client"),
        help="flag per module (any) or on the client score pooled over modules",
    )
    parser.add_argument(
        "--clair-flagged",
        default="trained",
        choices=("global", "trained"),
        help="what a client CLAIR flags holds next: the adapter it trained or the global one",
    )
    parser.add_argument(
        "--clair-space",
        default="column",
        choices=("column", "row"),
        help="CLAIR's shared subspace: column space (of the B factors) or row space (of A)",
    )
    parser.add_argument(
        "--clair-rank",
        default="lora",
        help="CLAIR's refinement rank: 'lora' (at most the LoRA rank), 'estimate' (CLAIR's "
        "estimate) or a fixed integer (detection and refinement)",
    )
    parser.add_argument("--train-examples", type=int, default=6, help="sequences per client")
    parser.add_argument("--test-examples", type=int, default=64, help="held-out per client")
    parser.add_argument("--participation", type=int, help="clients sampled per round (all)")
    parser.add_argument("--pretrain-steps", type=int, help="base pre-training steps")
    parser.add_argument("--pretrain-seed", type=int, default=0, help="base model seed")
    parser.add_argument("--cache-dir", default=None, help=f"base cache (${CACHE_ENV})")
    parser.add_argument("--no-cache", action="store_true", help="do not read/write the cache")
    parser.add_argument(
        "--checkpoint-dir",
        default=None,
        help="checkpoint each method's state and per-round results here and resume",
    )
    parser.add_argument("--out", default=os.path.join("benchmarks", "results"))
    parser.add_argument("--name", default="text_copy", help="output file stem")
    bar = parser.add_mutually_exclusive_group()
    bar.add_argument("--progress", dest="progress", action="store_true", default=None)
    bar.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    if args.lr is None:
        args.lr = OPTIMIZERS[args.optimizer][1]
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        clair_rank_kwargs(args.clair_rank)
    except ValueError as err:
        parser.error(f"--{err}".replace("clair_rank", "clair-rank", 1))
    _check_numbers(parser, args)
    default_methods = args.methods == "all"
    if default_methods:
        args.methods = list(METHODS)
    else:
        args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = sorted(set(args.methods) - set(METHODS))
        if unknown:
            parser.error(f"unknown methods {unknown}; choose from {','.join(METHODS)}")
        if not args.methods:
            parser.error(f"--methods is empty; choose from {','.join(METHODS)} (or 'all')")
    participants = args.participation or args.clients
    f = byzantine_budget(args.fraction, participants)
    krum = [m for m in args.methods if m in KRUM_METHODS]
    if krum and participants < 2 * f + 3:
        why = (
            f"{' and '.join(krum)} need{'s' * (len(krum) == 1)} at least 2f + 3 = {2 * f + 3} "
            f"participants per round, with f = round(--fraction * participants) = {f}; got "
            f"{participants} (--participation, or --clients)"
        )
        if not default_methods:
            parser.error(why)
        print(f"note: skipping {', '.join(krum)}: {why}.", file=sys.stderr)
        args.methods = [m for m in args.methods if m not in KRUM_METHODS]
    return args


#: Smallest accepted value of each integer flag.
_MINIMUMS = {
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


def _check_numbers(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``parser.error`` for numeric flags out of range (before anything runs)."""
    for name, minimum in _MINIMUMS.items():
        value = getattr(args, name)
        if value < minimum:
            parser.error(f"--{name.replace('_', '-')} must be >= {minimum}, got {value}")
    try:
        validation.contaminated_count(args.fraction, args.clients, "--fraction", "--clients")
    except ValueError as error:
        parser.error(str(error))
    if not (np.isfinite(args.lr) and args.lr > 0):
        parser.error(f"--lr must be finite and > 0, got {args.lr}")
    if args.participation is not None and not 1 <= args.participation <= args.clients:
        parser.error(
            f"--participation must be in [1, --clients = {args.clients}], got {args.participation}"
        )


def _fmt(x, spec=".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and not np.isfinite(x)) else format(x, spec)


def mean_round_f1(result: dict) -> float | None:
    """Mean over rounds of the F1 of each round's flags (rounds without a score skipped)."""
    scores = [f for f in result.get("round_f1", []) if f is not None]
    return float(np.mean(scores)) if scores else None


def format_table(results: dict[str, dict]) -> str:
    """A Markdown table of the per-method results."""
    header = (
        "| method | benign acc | benign loss | precision | recall | F1 | F1 per round |"
        " time (s) |\n|---|---|---|---|---|---|---|---|"
    )
    rows = []
    for name, r in results.items():
        d = r["detection"]
        rows.append(
            f"| {name} | {r['accuracy']:.3f} ± {r['accuracy_std']:.3f} | {r['loss']:.3f} | "
            f"{_fmt(d['precision'], '.2f')} | {_fmt(d['recall'], '.2f')} | "
            f"{_fmt(d['f1'], '.2f')} | {_fmt(mean_round_f1(r), '.2f')} | {r['seconds']:.1f} |"
        )
    return "\n".join([header, *rows])


HISTORY_KEYS = ("curve", "round_f1", "seconds", "unconverged")
"""Per-round results kept beside a method's checkpoint: benign accuracy, F1, elapsed time,
and how many of the aggregator's decompositions stopped unconverged (CLAIR; 0 otherwise)."""


def unconverged_count(diagnostics) -> int:
    """Modules whose decomposition did not converge (``"converged/<module>"`` diagnostics)."""
    return int(sum(not bool(v) for k, v in diagnostics.items() if k.startswith("converged/")))


def _write_json(path: str, obj: Any) -> None:
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


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the experiment described by ``args`` (see :func:`parse_args`); returns the results."""
    start = time.perf_counter()
    length = 8
    model_config = cj.TransformerConfig(
        vocab_size=32,
        max_len=2 * length,
        num_layers=args.layers,
        lora_rank=args.rank,
        lora_alpha=2.0 * args.rank,
    )
    cache_dir = None if args.no_cache else (args.cache_dir or default_cache_dir())
    graphdef, base, adapters, pre = pretrain(
        model_config,
        length=length,
        steps=args.pretrain_steps,
        seed=args.pretrain_seed,
        cache_dir=cache_dir,
        progress=args.progress,
    )
    where = "loaded from" if pre["loaded"] else "trained, cached in"
    print(f"base model: {where} {pre['cache_file']}", flush=True)

    fed_config = data_lib.FederationConfig(
        num_clients=args.clients,
        contaminated_fraction=args.fraction,
        contamination=args.kind,
        vocab_size=model_config.vocab_size,
        length=length,
        train_examples=args.train_examples,
        test_examples=args.test_examples,
    )
    key = jax.random.key(args.seed)
    fed = data_lib.make_federation(jax.random.fold_in(key, 0), fed_config)
    round_key = jax.random.fold_in(key, 1)
    truth = np.asarray(fed.contaminated)
    benign = ~truth
    participants = args.participation or args.clients
    optimizer = OPTIMIZERS[args.optimizer][0](args.lr)
    evaluate = jax.jit(cj.evaluate_clients, static_argnums=0)
    kinds = token_kinds(fed, length)

    @jax.jit
    def correct(base, adapters, data):
        def one(adapters_i, x, y):
            return jnp.argmax(cj.apply_lora(graphdef, base, adapters_i, x), -1) == y

        return jax.vmap(one)(adapters, data.inputs, data.targets)

    base_eval = evaluate(
        graphdef, base, cj.init_server_state(adapters, args.clients).clients, fed.test
    )
    print(
        f"{args.clients} clients ({int(truth.sum())} contaminated, {args.kind}), "
        f"{args.rounds} rounds, rank {args.rank}; base model benign accuracy "
        f"{float(np.mean(np.asarray(base_eval.accuracy)[benign])):.3f}",
        flush=True,
    )

    run_id = hashlib.sha256(
        json.dumps(
            {k: v for k, v in vars(args).items() if k != "progress"}, sort_keys=True
        ).encode()
    ).hexdigest()[:12]
    results = {}
    for name in args.methods:
        aggregator = make_aggregator(
            name,
            participants=participants,
            fraction=args.fraction,
            clair_measure=args.clair_measure,
            clair_detection=args.clair_detection,
            clair_flagged=args.clair_flagged,
            clair_space=args.clair_space,
            clair_rank=args.clair_rank,
        )
        round_fn = cj.make_round(
            graphdef,
            base,
            aggregator,
            local_steps=args.local_steps,
            batch_size=args.batch_size,
            optimizer=optimizer,
            participation=args.participation,
        )
        state = cj.init_server_state(adapters, args.clients)
        checkpoint = history_file = None
        if args.checkpoint_dir:
            checkpoint = os.path.join(args.checkpoint_dir, run_id, f"{name}.npz")
            history_file = os.path.join(args.checkpoint_dir, run_id, f"{name}.history.json")
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
                _write_json(
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
            args.rounds,
            progress=args.progress,
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
            f"  {name:>17s}: benign acc {r['accuracy']:.3f}, F1 {_fmt(r['detection']['f1'], '.2f')}"
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
        "args": {k: v for k, v in vars(args).items()},
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


def write_outputs(out: dict[str, Any], directory: str, name: str) -> list[str]:
    """Writes ``<name>.json`` and, with matplotlib, ``<name>.png``; returns the paths."""
    os.makedirs(directory, exist_ok=True)
    paths = [os.path.join(directory, f"{name}.json")]
    with open(paths[0], "w") as f:
        json.dump(out, f, indent=1)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot written.")
        return paths
    methods = list(out["methods"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    acc = [out["methods"][m]["accuracy"] for m in methods]
    std = [out["methods"][m]["accuracy_std"] for m in methods]
    colors = ["tab:red" if m == "clair" else "tab:blue" for m in methods]
    ax1.bar(range(len(methods)), acc, yerr=std, color=colors)
    ax1.axhline(out["base_accuracy"], color="gray", ls="--", label="base model")
    ax1.set_xticks(range(len(methods)), methods, rotation=45, ha="right")
    ax1.set_ylabel("benign held-out token accuracy")
    ax1.set_ylim(min(acc + [out["base_accuracy"]]) - 0.05, 1.0)
    ax1.legend()
    for m in methods:
        curve = out["methods"][m]["curve"]
        if curve:
            ax2.plot(range(1, len(curve) + 1), curve, label=m, lw=2.5 if m == "clair" else 1.2)
    ax2.set_xlabel("round")
    ax2.set_ylabel("benign held-out token accuracy")
    ax2.legend(fontsize=7, ncol=2)
    fed = out["federation"]
    fig.suptitle(
        f"text copying: {fed['num_clients']} clients, "
        f"{fed['contaminated_fraction']:.0%} contaminated ({fed['contamination']})"
    )
    fig.tight_layout()
    paths.append(os.path.join(directory, f"{name}.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def single_threaded_blas() -> None:
    """Runs the LAPACK calls of JAX's CPU backend on one OpenBLAS thread.

    jaxlib's CPU SVD/eigh/QR go through SciPy's OpenBLAS, loaded at the first
    such call. OpenBLAS's worker threads spin while waiting; on a machine with
    few cores that is busy with anything else (XLA's own threads included) they
    slow the small factorisations of the aggregators by one to two orders of
    magnitude. One thread avoids that; the matrices here are small. Set
    ``OPENBLAS_NUM_THREADS`` yourself to override (it must be set before the
    first factorisation).
    """
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def main(argv=None) -> None:
    single_threaded_blas()
    args = parse_args(argv)
    out = run(args)
    print()
    print(format_table(out["methods"]))
    print("\nbenign held-out accuracy by source token (re-mapped alike, per client, copied):")
    print(format_token_table(out["methods"]))
    for key, value in out["gaps"].items():
        print(f"{key.replace('_', ' ')}: {value:+.3f}")
    print(f"wall time {out['wall_seconds']:.1f} s")
    for path in write_outputs(out, args.out, args.name):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
