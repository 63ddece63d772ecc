"""FedRot-LoRA solver check (by construction): FedIT vs FedRot on clients that share one update.

This checks the alignment solver, not the paper's effect: every client holds the
same update in a random basis, so an exact rotation exists by construction and
full alignment removes almost all the error (the 150-1200x reductions). The
paper's Table 2 (9-27x lower aggregation error from real local training) is
measured in its own regime by ``benchmarks/fedrot_table2.py``. The strengths
here are at most 1 (soft, and ``λ = 1`` over SO(r)); the authors' default is
``λ = 1.5`` (hard, over O(r)).

Synthetic clients share one rank-``r`` update ``b a`` (``b`` ``p x r``, ``a`` ``r x q``,
standard normal entries), each in its own random basis, plus heterogeneity:

    B_i = b R_i + h ||b||_F G_i / sqrt(p r),   A_i = R_i^T a + h ||a||_F H_i / sqrt(r q),

with ``R_i`` Haar-random rotations and ``G_i, H_i`` standard normal, so each factor
carries noise of relative Frobenius size about ``h`` (``h = 0.1``: "10 %
heterogeneity"). The reference (the broadcast global adapter) is the shared update
in yet another random basis, ``(b R_0, R_0^T a)``. Clients have equal weights.

Reported: the relative aggregation error ``||Σ p_i B_i A_i - B̄ Ā||_F / ||Σ p_i B_i A_i||_F``
of factor-wise averaging after ``cj.fedrot_align`` with strength
``λ ∈ {0, 0.2, 0.4, 0.6, 0.8, 1}`` (``λ = 0`` is FedIT), aligning ``A`` or ``B``;
mean (and min/max) over ``--seeds`` draws, and the reduction factor FedIT / FedRot
(ratio of the means). A heterogeneity sweep follows, and the time of one alignment
of a larger module next to the FedIT average it precedes.

Text copying (``clair_jax.experiments.text_copy``, its ``--quick`` setting without
contamination: 20 clients, 6 rounds of 10 local Adam steps, LoRA rank 8): FedIT
and the FedRot-LoRA aggregator (``cj.fedrot``, alternating A/B, round 0 unaligned)
at several strengths train the same federation from the same keys, for
``--tc-seeds`` seeds. Reported: the benign clients' held-out token accuracy after
the last round, and the aggregation error of rounds 1..T-1 (root of the sum over
modules of the squared per-module error, averaged over those rounds) with and
without alignment, and the same per round (round ``t`` aligns ``A`` when ``t``
is odd, ``B`` when it is even and positive).

Usage::

    python benchmarks/fedrot_alignment.py              # a few minutes on 2 CPU cores
    python benchmarks/fedrot_alignment.py --tc-seeds 0 # synthetic part only (seconds)

Writes ``benchmarks/out/fedrot_alignment.json`` and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

import clair_jax as cj

STRENGTHS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


def haar_rotations(rng: np.random.Generator, k: int, r: int) -> np.ndarray:
    q, t = np.linalg.qr(rng.normal(size=(k, r, r)))
    q = q * np.sign(np.diagonal(t, axis1=1, axis2=2))[:, None, :]
    q[:, :, -1] *= np.sign(np.linalg.det(q))[:, None]
    return q


def small_rotations(rng: np.random.Generator, k: int, r: int, sigma: float) -> np.ndarray:
    """``expm(K)`` for skew-symmetric ``K`` with N(0, sigma^2) entries: rotations near I."""
    z = sigma * rng.normal(size=(k, r, r))
    skew = (z - np.swapaxes(z, 1, 2)) / np.sqrt(2)
    return np.stack([scipy.linalg.expm(x) for x in skew])


def make_clients(seed: int, n: int, p: int, r: int, q: int, h: float, sigma: float | None = None):
    """Clients' (A, B) and the reference (A_ref, B_ref), float32.

    ``sigma=None``: Haar-random bases; otherwise bases ``R_0 expm(K_i)`` near the
    reference's ``R_0`` (clients that drifted from a common broadcast).
    """
    rng = np.random.default_rng(seed)
    b, a = rng.normal(size=(p, r)), rng.normal(size=(r, q))
    rots = haar_rotations(rng, n + 1, r)
    if sigma is not None:
        rots[1:] = rots[0] @ small_rotations(rng, n, r, sigma)
    B = b @ rots[1:] + h * np.linalg.norm(b) / np.sqrt(p * r) * rng.normal(size=(n, p, r))
    A = np.swapaxes(rots[1:], 1, 2) @ a
    A = A + h * np.linalg.norm(a) / np.sqrt(r * q) * rng.normal(size=(n, r, q))
    cast = np.float32
    return cast(A), cast(B), cast(rots[0].T @ a), cast(b @ rots[0])


@jax.jit
def relative_errors(A, B, A_ref, B_ref, strengths):
    """Relative aggregation error for every strength (rows) and factor (cols A, B)."""
    exact = jnp.linalg.norm(jnp.mean(jnp.einsum("npr,nrq->npq", B, A), axis=0))

    def one(strength, factor):
        A2, B2 = cj.fedrot_align(A, B, A_ref, B_ref, strength=strength, factor=factor)
        return cj.aggregation_error(A2, B2) / exact

    return jnp.stack([jax.vmap(lambda s, f=f: one(s, f))(strengths) for f in ("A", "B")], axis=1)


def error_table(seeds, n, p, r, q, h, sigma=None) -> np.ndarray:
    """(seeds, strengths, factors) relative errors."""
    strengths = jnp.asarray(STRENGTHS, jnp.float32)
    return np.stack(
        [
            np.asarray(relative_errors(*make_clients(s, n, p, r, q, h, sigma), strengths))
            for s in range(seeds)
        ]
    )


def summarise(errs: np.ndarray) -> list[dict]:
    mean = errs.mean(axis=0)
    return [
        {
            "strength": s,
            **{
                f"align_{f}": {
                    "mean": float(mean[k, j]),
                    "min": float(errs[:, k, j].min()),
                    "max": float(errs[:, k, j].max()),
                    "reduction": float(mean[0, j] / mean[k, j]),
                }
                for j, f in enumerate("AB")
            },
        }
        for k, s in enumerate(STRENGTHS)
    ]


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n### {title}\n")
    print("| λ | align A | reduction | align B | reduction |")
    print("|---|---|---|---|---|")
    for row in rows:
        cells = [
            f"{row[f'align_{f}']['mean']:.4f} [{row[f'align_{f}']['min']:.4f}, "
            f"{row[f'align_{f}']['max']:.4f}] | {row[f'align_{f}']['reduction']:.3g}×"
            for f in "AB"
        ]
        label = f"{row['strength']:.1f}" + (" (FedIT)" if row["strength"] == 0 else "")
        print(f"| {label} | {cells[0]} | {cells[1]} |")


def timing(n: int, p: int, r: int, q: int, repeats: int) -> dict:
    A, B, A_ref, B_ref = make_clients(0, n, p, r, q, 0.1)
    align = jax.jit(lambda A, B: cj.fedrot_align(A, B, A_ref, B_ref, strength=0.4))
    mean = jax.jit(lambda A, B: (jnp.mean(A, axis=0), jnp.mean(B, axis=0)))
    out = {}
    for name, fn in (("fedrot_align", align), ("factor_mean", mean)):
        jax.block_until_ready(fn(A, B))
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(fn(A, B))
            times.append(time.perf_counter() - start)
        out[name + "_ms"] = 1e3 * statistics.median(times)
    return out


def text_copy_runs(seeds: int, strengths: tuple[float, ...]) -> dict:
    """FedIT vs FedRot-LoRA on the uncontaminated text-copying federation."""
    import optax

    from clair_jax._src import data as data_lib
    from clair_jax.experiments import text_copy

    length, rounds, local_steps, clients = 8, 6, 10, 20
    config = cj.TransformerConfig(vocab_size=32, max_len=2 * length, lora_rank=8, lora_alpha=16.0)
    graphdef, base, adapters, _ = text_copy.pretrain(
        config, length=length, steps=800, seed=0, cache_dir=text_copy.default_cache_dir()
    )
    evaluate = jax.jit(cj.evaluate_clients, static_argnums=0)
    methods = {"fedit": cj.fedit()} | {f"fedrot_{s:g}": cj.fedrot(s) for s in strengths}
    rows = {
        name: {"accuracy": [], "error": [], "error_unaligned": [], "per_round": []}
        for name in methods
    }
    for seed in range(seeds):
        key = jax.random.key(seed)
        fed = data_lib.make_federation(
            jax.random.fold_in(key, 0),
            data_lib.FederationConfig(
                num_clients=clients,
                contaminated_fraction=0.0,
                vocab_size=32,
                length=length,
                train_examples=6,
                test_examples=64,
            ),
        )
        for name, aggregator in methods.items():
            round_fn = cj.make_round(
                graphdef,
                base,
                aggregator,
                local_steps=local_steps,
                batch_size=8,
                optimizer=optax.adam(1e-2),
            )
            state, history = cj.run_rounds(
                round_fn,
                cj.init_server_state(adapters, clients),
                fed.train,
                jax.random.fold_in(key, 1),
                rounds,
                progress=False,
            )
            acc = float(np.mean(np.asarray(evaluate(graphdef, base, state.clients, fed.test)[0])))

            def total(metrics, prefix):
                d = metrics.diagnostics
                keys = [k for k in d if k.startswith(prefix + "/")]
                return float(np.sqrt(sum(float(d[k]) ** 2 for k in keys)))

            unaligned_key = (
                "aggregation_error_unaligned" if name != "fedit" else "aggregation_error"
            )
            later = history[1:]
            rows[name]["per_round"].append(
                [[total(m, "aggregation_error"), total(m, unaligned_key)] for m in history]
            )
            rows[name]["accuracy"].append(acc)
            rows[name]["error"].append(
                float(np.mean([total(m, "aggregation_error") for m in later]))
            )
            rows[name]["error_unaligned"].append(
                float(np.mean([total(m, unaligned_key) for m in later]))
            )
            err, raw = rows[name]["error"][-1], rows[name]["error_unaligned"][-1]
            print(
                f"  text copy seed {seed} {name:>11s}: benign acc {acc:.4f}, "
                f"aggregation error {err:.4f} (unaligned {raw:.4f})",
                flush=True,
            )
    return {
        "setup": {
            "clients": clients,
            "rounds": rounds,
            "local_steps": local_steps,
            "rank": 8,
            "contaminated_fraction": 0.0,
            "train_examples": 6,
            "seeds": seeds,
        },
        "methods": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--p", type=int, default=64)
    parser.add_argument("--q", type=int, default=64)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tc-seeds", type=int, default=3, help="text-copy seeds (0: skip)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "out"), help="output folder")
    args = parser.parse_args()
    n, p, r, q = args.n, args.p, args.r, args.q
    results = {
        "machine": f"{platform.processor() or platform.machine()}, {jax.devices()[0]}",
        "jax": jax.__version__,
        "dtype": "float32",
        "setup": {"n": n, "p": p, "q": q, "r": r, "seeds": args.seeds},
    }

    print(f"# machine: {results['machine']}, jax {jax.__version__}, float32")
    setup = f"n={n} clients, p={p}, q={q}, r={r}, 10% heterogeneity"
    results["random_bases"] = summarise(error_table(args.seeds, n, p, r, q, 0.1))
    print_table(
        f"Random bases: relative aggregation error, {setup}, mean [min, max] over "
        f"{args.seeds} seeds",
        results["random_bases"],
    )
    results["near_bases"] = summarise(error_table(args.seeds, n, p, r, q, 0.1, sigma=0.3))
    print_table(
        f"Bases near the reference (expm of skew, entries N(0, 0.3^2)): {setup}, "
        f"mean [min, max] over {args.seeds} seeds",
        results["near_bases"],
    )

    sweep = []
    for h in (0.0, 0.05, 0.1, 0.2, 0.4):
        m = error_table(args.seeds, n, p, r, q, h).mean(axis=0)
        sweep.append(
            {
                "heterogeneity": h,
                "fedit": float(m[0, 0]),
                "fedrot_0.4_A": float(m[2, 0]),
                "fedrot_1.0_A": float(m[5, 0]),
                "reduction_1.0_A": float(m[0, 0] / m[5, 0]),
                "reduction_0.4_A": float(m[0, 0] / m[2, 0]),
            }
        )
    results["heterogeneity_sweep"] = sweep
    print(f"\n### Heterogeneity sweep (align A, mean over {args.seeds} seeds)\n")
    print("| h | FedIT | FedRot λ=0.4 | FedRot λ=1 | reduction λ=1 |")
    print("|---|---|---|---|---|")
    for row in sweep:
        print(
            f"| {row['heterogeneity']:.2f} | {row['fedit']:.4f} | {row['fedrot_0.4_A']:.4f} | "
            f"{row['fedrot_1.0_A']:.2e} | {row['reduction_1.0_A']:.3g}× |"
        )

    big = (10, 1024, 16, 1024)
    results["timing"] = {"n_p_r_q": big, **timing(*big, args.repeats)}
    t = results["timing"]
    print(
        f"\nOne module n={big[0]}, p={big[1]}, r={big[2]}, q={big[3]} (jitted, median of "
        f"{args.repeats}): fedrot_align {t['fedrot_align_ms']:.2f} ms, "
        f"factor-wise mean {t['factor_mean_ms']:.2f} ms"
    )

    if args.tc_seeds > 0:
        print("\nText copying (no contamination):", flush=True)
        start = time.perf_counter()
        tc = text_copy_runs(args.tc_seeds, (0.4, 1.0))
        tc["seconds"] = time.perf_counter() - start
        results["text_copy"] = tc
        print(
            f"\n### Text copying, no contamination ({tc['setup']['clients']} clients, "
            f"{tc['setup']['rounds']} rounds, rank 8), {args.tc_seeds} seeds\n"
        )
        print(
            "| rule | benign held-out accuracy, mean (per seed) | aggregation error, "
            "rounds 1-5 | unaligned |"
        )
        print("|---|---|---|---|")
        for name, row in tc["methods"].items():
            per_seed = ", ".join(f"{a:.4f}" for a in row["accuracy"])
            print(
                f"| {name} | {np.mean(row['accuracy']):.4f} ({per_seed}) | "
                f"{np.mean(row['error']):.4f} | {np.mean(row['error_unaligned']):.4f} |"
            )
        rounds = tc["setup"]["rounds"]
        print("\nAggregation error per round (mean over seeds), aligned / unaligned:\n")
        print("| rule | " + " | ".join(f"round {t}" for t in range(rounds)) + " |")
        print("|---|" + "---|" * rounds)
        for name, row in tc["methods"].items():
            per = np.mean(np.asarray(row["per_round"]), axis=0)
            print(f"| {name} | " + " | ".join(f"{a:.3f} / {u:.3f}" for a, u in per) + " |")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fedrot_alignment.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
