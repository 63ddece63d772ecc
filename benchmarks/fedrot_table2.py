"""FedRot-LoRA's Table 2 in its own regime: aggregation error of locally trained clients.

The paper (arXiv:2602.23638, Table 2) reports that FedRot-LoRA lowers the
aggregation error ``||Σ p_i B_i A_i - B̄ Ā||_F`` of clients trained locally from a
common broadcast adapter 9-27x against FedIT (SST-2 15.9x, QNLI 14.8x, QQP 12.0x,
RTE 9.1x, MNLI 26.9x). This benchmark measures the same quantity on the library's
text-copying federation (``clair_jax.experiments.text_copy``: a small pre-trained
Transformer, LoRA on every projection, clients re-mapping tokens), through the
public API (``cj.make_round``, ``cj.run_rounds``, ``cj.fedrot``, ``cj.fedrot_align``).

For each task and seed, FedIT and FedRot-LoRA at ``λ ∈ --lambdas`` (the official
``rotate_lambda``: 0.4 soft, 1 rotation only, 1.5 the authors' default, hard over
O(r)) each train their own trajectory (round 0 unaligned, then A on odd and B on
even rounds, as the official client). Every round, per module, the server also
records on the clients it receives:

* ``exact``: ``||Σ p_i B_i A_i||_F`` (for the relative error);
* ``fedit``: FedIT's error on these clients;
* ``paired``: the error after ``cj.fedrot_align`` on these same clients at every
  ``λ``, aligning the factor of the round (the paired comparison: same clients,
  only the alignment differs).

Reported (mean over seeds, per round, per module and totals: the root of the sum
over modules of the squares): absolute and relative error of each method on its
own trajectory, A-rounds and B-rounds separately, the reduction FedIT / FedRot,
and the paired reduction on the same clients.

Tasks: ``copy`` is the main experiment's federation without contamination (four
source tokens re-mapped alike by all clients, four per client); ``disjoint`` is
more heterogeneous: no shared re-mapping, every client re-maps twelve tokens its
own way.

Usage::

    python benchmarks/fedrot_table2.py --quick     # 1 seed, 6 rounds, both tasks
    python benchmarks/fedrot_table2.py             # 3 seeds, 10 rounds

Writes ``<out>/fedrot_table2.json`` and ``<out>/fedrot_table2.md`` (``--out``,
default ``benchmarks/out/``, git-ignored) and prints the markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import clair_jax as cj
from clair_jax.experiments import text_copy

PAPER = {"SST-2": 15.9, "QNLI": 14.8, "QQP": 12.0, "RTE": 9.1, "MNLI": 26.9}
TASKS = {
    "copy": {"shared_tokens": 4, "specific_tokens": 4},
    "disjoint": {"shared_tokens": 0, "specific_tokens": 12},
}


def measured(inner: cj.Aggregator, lambdas: tuple[float, ...]) -> cj.Aggregator:
    """``inner`` with per-module diagnostics of the clients it receives.

    Adds ``exact/<m>``, ``fedit/<m>`` and ``paired_<λ>/<m>`` (the error after
    aligning the round's factor at strength ``λ``; round 0 unaligned) to the
    diagnostics; the aggregation itself is ``inner``'s.
    """

    def aggregate(clients, global_, weights, round_index, key, **kwargs):
        result = inner.aggregate(clients, global_, weights, round_index, key, **kwargs)
        w = jnp.asarray(weights, jnp.float32)
        p = w / jnp.sum(w)
        extra = {}
        for name, f in clients.items():
            g = global_[name]
            exact = jnp.einsum("n,npr,nrq->pq", p, f.B, f.A)
            extra[f"exact/{name}"] = jnp.linalg.norm(exact)
            fedit_error = cj.aggregation_error(f.A, f.B, w)
            extra[f"fedit/{name}"] = fedit_error
            # Why alignment helps or not: the reference's size against the clients'
            # spread around it (the cross term's signal and noise), and how far the
            # hard alignment moves the aligned factor.
            for factor, mine, ref in (("A", f.A, g.A), ("B", f.B, g.B)):
                extra[f"ref_norm_{factor}/{name}"] = jnp.linalg.norm(ref)
                extra[f"spread_{factor}/{name}"] = jnp.mean(
                    jnp.linalg.norm(mine - ref, axis=(1, 2))
                )
                a2, b2 = cj.fedrot_align(f.A, f.B, g.A, g.B, strength=1.5, factor=factor)
                moved = a2 if factor == "A" else b2
                extra[f"moved_{factor}/{name}"] = jnp.mean(
                    jnp.linalg.norm(moved - mine, axis=(1, 2)) / jnp.linalg.norm(mine, axis=(1, 2))
                )
            for lam in lambdas:
                per_factor = []
                for factor in ("A", "B"):
                    a2, b2 = cj.fedrot_align(f.A, f.B, g.A, g.B, strength=lam, factor=factor)
                    per_factor.append(cj.aggregation_error(a2, b2, w))
                odd = round_index % 2 == 1
                aligned = jnp.where(odd, per_factor[0], per_factor[1])
                extra[f"paired_{lam:g}/{name}"] = jnp.where(round_index == 0, fedit_error, aligned)
        return result._replace(diagnostics={**result.diagnostics, **extra})

    return cj.Aggregator(inner.name, aggregate, inner.frozen_factor, inner.uses_start)


def run_task(task: str, seed: int, args, graphdef, base, adapters) -> dict:
    """Every method's per-round, per-module diagnostics on one federation."""
    key = jax.random.key(seed)
    fed = cj.data.make_federation(
        jax.random.fold_in(key, 0),
        cj.data.FederationConfig(
            num_clients=args.clients,
            contaminated_fraction=0.0,
            vocab_size=args.vocab,
            length=args.length,
            train_examples=args.train_examples,
            test_examples=64,
            **TASKS[task],
        ),
    )
    methods = {"fedit": cj.fedit()} | {f"fedrot_{lam:g}": cj.fedrot(lam) for lam in args.lambdas}
    out = {}
    for name, rule in methods.items():
        start = time.perf_counter()
        round_fn = cj.make_round(
            graphdef,
            base,
            measured(rule, tuple(args.lambdas)),
            local_steps=args.local_steps,
            batch_size=8,
            optimizer=optax.adam(args.lr),
        )
        state, history = cj.run_rounds(
            round_fn,
            cj.init_server_state(adapters, args.clients),
            fed.train,
            jax.random.fold_in(key, 1),
            args.rounds,
            progress=False,
        )
        accuracy = cj.evaluate_clients(graphdef, base, state.clients, fed.test)
        diag = [{k: np.asarray(v).tolist() for k, v in m.diagnostics.items()} for m in history]
        out[name] = {
            "diagnostics": diag,
            "accuracy": float(np.mean(np.asarray(accuracy.accuracy))),
            "seconds": time.perf_counter() - start,
        }
        print(f"  {task} seed {seed} {name:>11s}: {out[name]['seconds']:.0f} s", flush=True)
    return out


def total(diag: dict, prefix: str) -> float:
    """Root of the sum over modules of the squared ``prefix/<module>`` values."""
    return float(np.sqrt(sum(v**2 for k, v in diag.items() if k.startswith(prefix + "/"))))


def summarise(runs: list[dict], lambdas) -> dict:
    """Per-round means over seeds, and A-round / B-round means of them."""
    methods = list(runs[0])
    rounds = len(runs[0]["fedit"]["diagnostics"])
    modules = sorted(
        k.split("/", 1)[1] for k in runs[0]["fedit"]["diagnostics"][0] if k.startswith("exact/")
    )

    def mean_over_seeds(fn):
        return [float(np.mean([fn(run, t) for run in runs])) for t in range(rounds)]

    summary = {"rounds": rounds, "modules": modules, "methods": {}}
    for m in methods:

        def own(run, t, m=m, key="aggregation_error"):
            return total(run[m]["diagnostics"][t], key)

        def exact(run, t, m=m):
            return total(run[m]["diagnostics"][t], "exact")

        row = {
            "abs": mean_over_seeds(own),
            "rel": mean_over_seeds(lambda run, t, m=m: own(run, t, m) / exact(run, t, m)),
            "paired_fedit": mean_over_seeds(lambda run, t, m=m: own(run, t, m, "fedit")),
            "accuracy": float(np.mean([run[m]["accuracy"] for run in runs])),
        }
        for lam in lambdas:
            row[f"paired_{lam:g}"] = mean_over_seeds(
                lambda run, t, m=m, lam=lam: own(run, t, m, f"paired_{lam:g}")
            )
        for factor in ("A", "B"):

            def ratio(run, t, m=m, factor=factor):
                d = run[m]["diagnostics"][t]
                return float(
                    np.mean(
                        [d[f"spread_{factor}/{mod}"] / d[f"ref_norm_{factor}/{mod}"]
                         if d[f"ref_norm_{factor}/{mod}"] > 0 else np.inf
                         for mod in modules]
                    )
                )  # fmt: skip

            def moved(run, t, m=m, factor=factor):
                d = run[m]["diagnostics"][t]
                return float(np.mean([d[f"moved_{factor}/{mod}"] for mod in modules]))

            row[f"spread_over_ref_{factor}"] = mean_over_seeds(ratio)
            row[f"moved_{factor}"] = mean_over_seeds(moved)
        last = runs[0][m]["diagnostics"][-1]
        row["per_module_last_round"] = {
            mod: {
                "abs": float(
                    np.mean([r[m]["diagnostics"][-1][f"aggregation_error/{mod}"] for r in runs])
                ),
                "rel": float(
                    np.mean(
                        [
                            r[m]["diagnostics"][-1][f"aggregation_error/{mod}"]
                            / r[m]["diagnostics"][-1][f"exact/{mod}"]
                            for r in runs
                        ]
                    )
                ),
            }
            for mod in modules
            if f"exact/{mod}" in last
        }
        summary["methods"][m] = row
    return summary


def rounds_of(kind: str, rounds: int) -> list[int]:
    """Rounds aligning A (odd) or B (even, > 0), as the official schedule."""
    return [t for t in range(1, rounds) if (t % 2 == 1) == (kind == "A")]


def markdown(task: str, s: dict, lambdas) -> str:
    rounds = s["rounds"]
    lines = [
        f"### Task `{task}`",
        "",
        "Own trajectories (each method trains its own run; mean over seeds of the per-round "
        "total over modules); reduction = FedIT / method.",
        "",
        "| method | A-rounds abs | A-rounds rel | B-rounds abs | B-rounds rel | reduction A | "
        "reduction B | held-out acc |",
        "|---|---|---|---|---|---|---|---|",
    ]
    fedit = s["methods"]["fedit"]
    for name, row in s["methods"].items():
        cells = []
        for kind in ("A", "B"):
            ts = rounds_of(kind, rounds)
            cells += [np.mean([row["abs"][t] for t in ts]), np.mean([row["rel"][t] for t in ts])]
        red = [
            np.mean([fedit["abs"][t] for t in rounds_of(k, rounds)])
            / np.mean([row["abs"][t] for t in rounds_of(k, rounds)])
            for k in ("A", "B")
        ]
        lines.append(
            f"| {name} | {cells[0]:.4f} | {cells[1]:.4f} | {cells[2]:.4f} | {cells[3]:.4f} | "
            f"{red[0]:.2f}x | {red[1]:.2f}x | {row['accuracy']:.4f} |"
        )
    lines += [
        "",
        "Paired (the same clients, FedIT's trajectory): FedIT error / error after aligning the "
        "round's factor at λ.",
        "",
        "| λ | A-rounds | B-rounds |",
        "|---|---|---|",
    ]
    for lam in lambdas:
        red = [
            np.mean([fedit["paired_fedit"][t] for t in rounds_of(k, rounds)])
            / np.mean([fedit[f"paired_{lam:g}"][t] for t in rounds_of(k, rounds)])
            for k in ("A", "B")
        ]
        lines.append(f"| {lam:g} | {red[0]:.2f}x | {red[1]:.2f}x |")
    lines += [
        "",
        "Why (FedIT's trajectory, per round, mean over modules): the clients' spread around "
        "the reference relative to its norm, mean_i ||X_i - X_ref|| / ||X_ref||, and how far "
        "hard alignment (λ = 1.5) moves the aligned factor, mean_i ||X_i' - X_i|| / ||X_i||.",
        "",
        "| round | aligned | spread/ref A | spread/ref B | moved A | moved B |",
        "|---|---|---|---|---|---|",
    ]
    for t in range(rounds):
        kind = "-" if t == 0 else ("A" if t % 2 else "B")
        lines.append(
            f"| {t} | {kind} | {fedit['spread_over_ref_A'][t]:.3g} | "
            f"{fedit['spread_over_ref_B'][t]:.3g} | {fedit['moved_A'][t]:.3g} | "
            f"{fedit['moved_B'][t]:.3g} |"
        )
    lines += ["", "Per round (relative error, own trajectory):", ""]
    names = list(s["methods"])
    lines.append("| round | aligned | " + " | ".join(names) + " |")
    lines.append("|---|---|" + "---|" * len(names))
    for t in range(rounds):
        kind = "-" if t == 0 else ("A" if t % 2 else "B")
        cells = " | ".join(f"{s['methods'][n]['rel'][t]:.4f}" for n in names)
        lines.append(f"| {t} | {kind} | {cells} |")
    lines += ["", "Per module, last round (relative error, own trajectory):", ""]
    lines.append("| module | " + " | ".join(names) + " |")
    lines.append("|---|" + "---|" * len(names))
    for mod in s["modules"]:
        cells = " | ".join(
            f"{s['methods'][n]['per_module_last_round'][mod]['rel']:.4f}" for n in names
        )
        lines.append(f"| {mod} | {cells} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="1 seed, 6 rounds")
    parser.add_argument("--seeds", type=int, default=3, help="federation seeds (quick: 1)")
    parser.add_argument("--rounds", type=int, default=10, help="federated rounds (quick: 6)")
    parser.add_argument("--tasks", default="copy,disjoint", help=f"subset of {','.join(TASKS)}")
    parser.add_argument(
        "--lambdas", default="0.4,1,1.5", help="FedRot strengths (official rotate_lambda)"
    )
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--lr", type=float, default=5e-3, help="local Adam learning rate")
    parser.add_argument("--train-examples", type=int, default=6, help="sequences per client")
    parser.add_argument("--vocab", type=int, default=32)
    parser.add_argument("--length", type=int, default=8)
    parser.add_argument("--pretrain-steps", type=int, default=800)
    parser.add_argument("--out", default=os.path.join("benchmarks", "out"))
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.rounds = 1, 6
    args.lambdas = [float(x) for x in args.lambdas.split(",")]
    args.tasks = [t.strip() for t in args.tasks.split(",")]
    unknown = set(args.tasks) - set(TASKS)
    if unknown:
        parser.error(f"unknown tasks {sorted(unknown)}; choose from {','.join(TASKS)}")
    if args.rounds < 3:
        parser.error("--rounds must be >= 3 (one A-round and one B-round)")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    config = cj.TransformerConfig(
        vocab_size=args.vocab, max_len=2 * args.length, lora_rank=args.rank, lora_alpha=16.0
    )
    graphdef, base, adapters, info = text_copy.pretrain(
        config,
        length=args.length,
        steps=args.pretrain_steps,
        seed=0,
        cache_dir=text_copy.default_cache_dir(),
        progress=False,
    )
    print(f"base: {'loaded' if info.get('loaded') else 'pre-trained'} {info['cache_file']}")
    results = {
        "setup": {k: v for k, v in vars(args).items()},
        "paper_table2_reduction": PAPER,
        "platform": {
            "jax": jax.__version__,
            "backend": jax.default_backend(),
            "machine": platform.machine(),
        },  # fmt: skip
        "tasks": {},
    }
    text = [
        "## FedRot-LoRA Table 2 regime (aggregation error of locally trained clients)",
        "",
        f"Paper's reductions (FedIT / FedRot): {', '.join(f'{k} {v}x' for k, v in PAPER.items())}.",
        f"Setup: {args.clients} clients, {args.rounds} rounds, {args.local_steps} local Adam "
        f"steps (lr {args.lr:g}), rank {args.rank}, {args.seeds} seed(s).",
        "",
    ]
    for task in args.tasks:
        runs = [run_task(task, seed, args, graphdef, base, adapters) for seed in range(args.seeds)]
        summary = summarise(runs, args.lambdas)
        results["tasks"][task] = {"summary": summary, "runs": runs}
        text += [markdown(task, summary, args.lambdas), ""]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "fedrot_table2.json"), "w") as fh:
        json.dump(results, fh)
    with open(os.path.join(args.out, "fedrot_table2.md"), "w") as fh:
        fh.write("\n".join(text))
    print("\n".join(text))


if __name__ == "__main__":
    main()
