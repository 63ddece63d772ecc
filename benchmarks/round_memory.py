"""Device memory of one federated round as the number of clients grows, and sharded throughput.

**Memory sweep** (default). For each client count ``n`` the jitted round of
:func:`clair_jax.make_round` (the text-copying experiment's model: 2 layers,
width 64, LoRA rank 8 on the 6 projections of each block; FedIT; ``--local-steps``
Adam steps per client on minibatches of ``--batch-size``) is lowered and compiled
ahead of time, with the base parameters as an argument exactly as ``make_round``
passes them, and XLA's ``memory_analysis()`` gives the sizes of the program's
arguments (state, data, base, key), outputs and temporaries. The peak estimate is
``arguments + outputs + temporaries - aliased``. Where the backend reports it
(GPU, TPU; not CPU), the round is also run once and ``device.memory_stats()``'s
``peak_bytes_in_use`` is recorded. A least-squares line ``bytes = a + b n`` gives the
bytes per client ``b`` and the largest relative deviation of the measurements from
the line (0 for exactly linear growth).

**Sharded throughput** (``--devices 8``). Re-runs itself with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` when fewer devices are
visible, then times the single-device round against
:func:`clair_jax.make_sharded_round` over the 8 devices (median of
``--repeats`` rounds after a first, compiling call; both must agree), and reports
each program's memory per device. Simulated CPU devices share the machine's
cores, so no speed-up is to be expected from them: the mode checks the
mechanics and the per-device memory; the speed-up needs real devices.

Run ``python benchmarks/round_memory.py`` (64 .. 1024 clients; ``--quick``: 64 ..
256); writes ``benchmarks/out/round_memory.json`` (``round_memory_quick.json``,
``round_memory_devices8.json``).
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

FLAG = "--xla_force_host_platform_device_count"
REEXEC_MARK = "CLAIR_JAX_ROUND_MEMORY_REEXEC"


def setup(args):
    config = cj.TransformerConfig(
        vocab_size=32, max_len=16, lora_rank=args.rank, lora_alpha=2.0 * args.rank
    )
    graphdef, base, adapters = cj.split_lora(cj.LoRATransformer(config, rngs=nnx.Rngs(0)))
    return config, graphdef, base, adapters


def federation(n: int, args):
    return cj.data.make_federation(
        jax.random.key(1),
        cj.data.FederationConfig(num_clients=n, length=8, train_examples=args.examples),
    )


def round_kwargs(args) -> dict:
    return dict(
        local_steps=args.local_steps, batch_size=args.batch_size, optimizer=optax.adam(1e-2)
    )


def lowered_round(graphdef, base, state, data, args, mesh=None):
    """The jitted round's lowering, ``base`` an argument as in ``make_round``'s own jit."""

    def round_of(base, state, data, key):
        kwargs = round_kwargs(args)
        if mesh is not None:
            kwargs["client_sharding"] = cj.client_sharding(mesh)
        round_fn = cj.make_round(graphdef, base, cj.fedit(), jit=False, **kwargs)
        return round_fn(state, data, key)

    return jax.jit(round_of).lower(base, state, data, jax.random.key(0))


def memory_row(compiled) -> dict:
    m = compiled.memory_analysis()
    row = {
        "argument_bytes": int(m.argument_size_in_bytes),
        "output_bytes": int(m.output_size_in_bytes),
        "temp_bytes": int(m.temp_size_in_bytes),
        "alias_bytes": int(m.alias_size_in_bytes),
        "code_bytes": int(m.generated_code_size_in_bytes),
    }
    row["peak_estimate_bytes"] = (
        row["argument_bytes"] + row["output_bytes"] + row["temp_bytes"] - row["alias_bytes"]
    )
    return row


def linear_fit(ns, ys) -> dict:
    """``y = a + b n`` by least squares; the largest relative deviation from the line."""
    ns, ys = np.asarray(ns, float), np.asarray(ys, float)
    b, a = np.polyfit(ns, ys, 1)
    fit = a + b * ns
    return {
        "bytes_per_client": float(b),
        "intercept_bytes": float(a),
        "max_relative_deviation": float(np.max(np.abs(fit - ys) / ys)),
    }


def mib(x) -> str:
    return "-" if x is None else f"{x / 2**20:9.1f}"


def memory_sweep(args) -> dict:
    config, graphdef, base, adapters = setup(args)
    device = jax.devices()[0]
    has_stats = device.memory_stats() is not None
    rows = []
    print(
        "| clients | arguments (MiB) | outputs (MiB) | temporaries (MiB) | peak estimate (MiB) "
        "| measured peak (MiB) | compile (s) |\n|---|---|---|---|---|---|---|",
        flush=True,
    )
    for n in args.clients:
        data = federation(n, args).train
        state = cj.init_server_state(adapters, n)
        start = time.perf_counter()
        compiled = lowered_round(graphdef, base, state, data, args).compile()
        row = {"clients": n, **memory_row(compiled), "compile_s": time.perf_counter() - start}
        row["measured_peak_bytes"] = None
        if has_stats:
            jax.block_until_ready(compiled(base, state, data, jax.random.key(0)))
            row["measured_peak_bytes"] = int(device.memory_stats().get("peak_bytes_in_use", 0))
        rows.append(row)
        print(
            f"| {n} | {mib(row['argument_bytes'])} | {mib(row['output_bytes'])} | "
            f"{mib(row['temp_bytes'])} | {mib(row['peak_estimate_bytes'])} | "
            f"{mib(row['measured_peak_bytes'])} | {row['compile_s']:.1f} |",
            flush=True,
        )
        del compiled
    ns = [r["clients"] for r in rows]
    fits = {
        key: linear_fit(ns, [r[f"{key}_bytes"] for r in rows])
        for key in ("peak_estimate", "temp", "argument", "output")
    }
    if has_stats:
        fits["measured_peak"] = linear_fit(ns, [r["measured_peak_bytes"] for r in rows])
    else:
        print(f"({device.platform}: device.memory_stats() is not available; no measured peak)")
    for key, fit in fits.items():
        print(
            f"{key:>14s}: {fit['bytes_per_client'] / 2**10:8.1f} KiB per client, intercept "
            f"{fit['intercept_bytes'] / 2**20:6.1f} MiB, max relative deviation from the line "
            f"{fit['max_relative_deviation']:.2e}"
        )
    state_bytes = [
        sum(x.nbytes for x in jax.tree.leaves(cj.init_server_state(adapters, k))) for k in (1, 2)
    ]
    return {
        "results": rows,
        "linear_fits": fits,
        "memory_stats_available": has_stats,
        "sizes": {
            "adapter_bytes_per_client": int(sum(x.nbytes for x in jax.tree.leaves(adapters))),
            "state_bytes_per_client": int(state_bytes[1] - state_bytes[0]),
            "base_bytes": int(sum(x.nbytes for x in jax.tree.leaves(base))),
        },
        "model": config._asdict(),
    }


def time_rounds(round_fn, state, data, repeats: int) -> tuple[list[float], float, object]:
    start = time.perf_counter()
    out = jax.block_until_ready(round_fn(state, data, jax.random.key(0)))
    first = time.perf_counter() - start
    times = []
    for k in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(round_fn(state, data, jax.random.key(100 + k)))
        times.append(time.perf_counter() - start)
    return times, first, out


def device_throughput(args) -> dict:
    config, graphdef, base, adapters = setup(args)
    mesh = cj.client_mesh(jax.devices()[: args.devices])
    rows = []
    for n in args.clients:
        data = federation(n, args).train
        state = cj.init_server_state(adapters, n)
        single = cj.make_round(graphdef, base, cj.fedit(), **round_kwargs(args))
        sharded = cj.make_sharded_round(graphdef, base, cj.fedit(), mesh, **round_kwargs(args))
        t1, first1, out1 = time_rounds(single, state, data, args.repeats)
        state_s, data_s = cj.shard_clients(state, mesh), cj.shard_clients(data, mesh)
        t8, first8, out8 = time_rounds(sharded, state_s, data_s, args.repeats)
        diff = max(
            float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
            for a, b in zip(jax.tree.leaves(out1[0]), jax.tree.leaves(out8[0]), strict=True)
        )
        mem1 = memory_row(lowered_round(graphdef, base, state, data, args).compile())
        mem8 = memory_row(lowered_round(graphdef, base, state_s, data_s, args, mesh).compile())
        s1, s8 = float(np.median(t1)), float(np.median(t8))
        row = {
            "clients": n,
            "single_device_s": s1,
            "sharded_s": s8,
            "speedup": s1 / s8,
            "single_clients_per_s": n / s1,
            "sharded_clients_per_s": n / s8,
            "first_call_s": {"single": first1, "sharded": first8},
            "times": {"single": t1, "sharded": t8},
            "max_abs_state_difference": diff,
            "memory_single_device": mem1,
            "memory_per_device_sharded": mem8,
        }
        rows.append(row)
        print(
            f"n={n:5d}  one device {1e3 * s1:8.1f} ms ({n / s1:7.1f} clients/s)  "
            f"{args.devices} devices {1e3 * s8:8.1f} ms ({n / s8:7.1f} clients/s)  "
            f"speed-up {s1 / s8:4.2f}x  max |state difference| {diff:.1e}\n"
            f"         temporaries: one device {mib(mem1['temp_bytes'])} MiB, per device "
            f"when sharded {mib(mem8['temp_bytes'])} MiB (first calls {first1:.1f} s, "
            f"{first8:.1f} s)",
            flush=True,
        )
    return {"results": rows, "model": config._asdict(), "devices": args.devices}


def reexec_with_devices(count: int, argv: list[str]) -> None:
    """Restarts this script with ``count`` simulated CPU devices (the flag must precede JAX)."""
    if os.environ.get(REEXEC_MARK):
        raise SystemExit(f"asked for {count} devices, found {jax.device_count()} after re-exec.")
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {FLAG}={count}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env[REEXEC_MARK] = "1"
    print(f"re-running with {count} simulated CPU devices ({FLAG}={count})", flush=True)
    os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *argv], env)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", help="client counts")
    parser.add_argument("--quick", action="store_true", help="64, 128, 256 clients")
    parser.add_argument("--devices", type=int, default=1, help="sharded throughput on N devices")
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--examples", type=int, default=6, help="training sequences per client")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (--devices)")
    parser.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"),
        help="output folder (default: benchmarks/out/)",
    )
    args = parser.parse_args(argv)
    if args.devices > 1:
        if jax.device_count() < args.devices:
            reexec_with_devices(args.devices, argv)
        args.clients = args.clients or [64, 256]
        for n in args.clients:
            if n % args.devices:
                parser.error(f"--clients {n} is not divisible by --devices {args.devices}")
        body = device_throughput(args)
        name = f"round_memory_devices{args.devices}"
    else:
        default = [64, 128, 256] if args.quick else [64, 128, 256, 512, 1024]
        args.clients = args.clients or default
        body = memory_sweep(args)
        name = "round_memory_quick" if args.quick else "round_memory"
    out = {
        "command": "python benchmarks/round_memory.py " + " ".join(argv),
        "settings": {
            "aggregator": "fedit",
            "local_steps": args.local_steps,
            "batch_size": args.batch_size,
            "examples": args.examples,
            "clients": args.clients,
        },
        **body,
        "environment": environment(),
    }
    write_json(out, args.out, f"{name}.json")


if __name__ == "__main__":
    main()
