"""One federated round with the client axis vmapped against a Python loop over clients.

Both variants run the same round (:func:`clair_jax.make_round` with
``client_map="vmap"`` or ``"loop"``): the same model as the text-copying
experiment (2 layers, width 64, LoRA rank 8 on every projection), the same data,
keys and aggregator (FedIT by default), ``--local-steps`` Adam steps per client.
The vmapped round is one jitted call; the looped round calls a jitted
single-client trainer once per client, then a jitted aggregation. Each variant is
compiled (and checked to agree with the other) before timing; the figure is the
median wall time of ``--repeats`` rounds.

Run ``python benchmarks/federated_round.py`` (``--quick`` for fewer repeats);
writes ``benchmarks/out/federated_round.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np
import optax
from _environment import environment, write_json
from flax import nnx

import clair_jax as cj


def time_round(round_fn, state, data, repeats: int) -> list[float]:
    times = []
    for k in range(repeats):
        start = time.perf_counter()
        out = round_fn(state, data, jax.random.key(100 + k))
        jax.block_until_ready(out)
        times.append(time.perf_counter() - start)
    return times


def round_flops(round_fn, state, data) -> float | None:
    """XLA's cost-analysis FLOP count of the compiled vmapped round (None if unavailable).

    XLA counts a loop's body once, so this is one local step of every client
    (plus the aggregation): the count is the same for 1 and 10 local steps.
    """
    compiled = jax.jit(round_fn).lower(state, data, jax.random.key(0)).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return None if not cost or "flops" not in cost else float(cost["flops"])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[64])
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--examples", type=int, default=6, help="training sequences per client")
    parser.add_argument("--rank", type=int, default=8)
    aggregators = ["fedit", "local_only", "flexlora"]
    parser.add_argument("--aggregator", default="fedit", choices=aggregators)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="3 repeats")
    parser.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"),
        help="output folder (default: benchmarks/out/)",
    )
    args = parser.parse_args(argv)
    repeats = 3 if args.quick else args.repeats

    config = cj.TransformerConfig(
        vocab_size=32, max_len=16, lora_rank=args.rank, lora_alpha=2.0 * args.rank
    )
    graphdef, base, adapters = cj.split_lora(cj.LoRATransformer(config, rngs=nnx.Rngs(0)))
    aggregator = getattr(cj, args.aggregator)()
    rows = []
    for n in args.clients:
        fed = cj.data.make_federation(
            jax.random.key(1),
            cj.data.FederationConfig(num_clients=n, length=8, train_examples=args.examples),
        )
        state = cj.init_server_state(adapters, n)
        rounds = {
            mode: cj.make_round(
                graphdef,
                base,
                aggregator,
                local_steps=args.local_steps,
                batch_size=args.batch_size,
                optimizer=optax.adam(1e-2),
                client_map=mode,
            )
            for mode in ("vmap", "loop")
        }
        compile_s, outs = {}, {}
        for mode, round_fn in rounds.items():
            start = time.perf_counter()
            outs[mode] = jax.block_until_ready(round_fn(state, fed.train, jax.random.key(0)))
            compile_s[mode] = time.perf_counter() - start
        diff = max(
            float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
            for a, b in zip(
                jax.tree.leaves(outs["vmap"][0]), jax.tree.leaves(outs["loop"][0]), strict=True
            )
        )
        times = {mode: time_round(fn, state, fed.train, repeats) for mode, fn in rounds.items()}
        flops = round_flops(rounds["vmap"], state, fed.train)
        vmap_s, loop_s = float(np.median(times["vmap"])), float(np.median(times["loop"]))
        row = {
            "clients": n,
            "vmap_s": vmap_s,
            "loop_s": loop_s,
            "speedup": loop_s / vmap_s,
            "first_call_s": compile_s,
            "times": times,
            "max_abs_state_difference": diff,
            "xla_flops_one_local_step": flops,
            "gflops_per_s": {
                mode: None if flops is None else flops * args.local_steps / t / 1e9
                for mode, t in (("vmap", vmap_s), ("loop", loop_s))
            },
        }
        rows.append(row)
        print(
            f"n={n:4d}  vmap {1e3 * vmap_s:8.1f} ms  loop {1e3 * loop_s:8.1f} ms  "
            f"speedup {row['speedup']:5.1f}x  (first calls: vmap {compile_s['vmap']:.1f} s, "
            f"loop {compile_s['loop']:.1f} s; max |state difference| {diff:.1e}; "
            f"XLA flops of one local step {flops or float('nan'):.3g})",
            flush=True,
        )

    out = {
        "command": "python benchmarks/federated_round.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "settings": {
            "model": config._asdict(),
            "local_steps": args.local_steps,
            "batch_size": args.batch_size,
            "examples": args.examples,
            "aggregator": args.aggregator,
            "repeats": repeats,
            "adapter_parameters": int(sum(x.size for x in jax.tree.leaves(adapters))),
            "base_parameters": int(sum(x.size for x in jax.tree.leaves(base))),
            "modules": len(adapters),
        },
        "results": rows,
        "environment": environment(),
    }
    write_json(out, args.out, "federated_round.json")


if __name__ == "__main__":
    main()
