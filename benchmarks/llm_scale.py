"""Server aggregation at LLM scale: factored CLAIR and every rule on Llama-2-7B LoRA shapes.

Two parts, one run:

1. **Dense vs factored CLAIR** at ``p = q`` in ``--sizes``, ``n = 16``, ``r = 8``:
   clients share one ``B`` (plus 1% noise) with their own ``A``, 4 have unrelated
   random ``B``'s (the issue-26 construction, ``n r < p`` from 256 on). Runs
   ``clair_factored`` (its own statistics), dense ``cj.clair`` on the products with
   its default statistics (up to ``--dense-default-max``: the measured failure),
   and dense ``cj.clair`` with the factored run's ``λ_*``, ``λ_S``, ``σ̂`` (same
   problem: flags must be identical, refined updates equal). Reports times of the
   second calls (compiled), the speed ratio, flags and the largest refined-update
   difference.
2. **A whole 7B-shaped model**: ``--layers`` layers of q, k, v, o (4096 x 4096),
   gate, up (4096 x 11008), down (11008 x 4096), LoRA rank ``--rank``, ``--clients``
   clients, of which 8 contaminated: 2 with unrelated random ``B``'s, 3 coordinated
   (one identical update), 2 with half of ``B``'s columns replaced, 1 random ``B``
   scaled 10x. Modules are generated lazily from their own keys, ``--chunk``
   modules of one shape at a time (the whole federation is 5 GB in float32), and
   every rule aggregates one chunk per call: exactly the whole-model rule for the
   per-module rules (FedIT, FlexLoRA, FFA-LoRA, FedRot, coordinate median, trimmed
   mean, CLAIR with module detection). JAX is given ``--cpu-devices`` CPU devices
   (one per core by default) and CLAIR runs with ``devices=jax.devices()``: each
   device solves one module of the chunk (by default as many modules as
   devices); the other rules run on the first device. Multi-Krum and Krum
   accumulate the clients' exact squared distances over all modules (the
   library's ``log_squared_distances``, summed by ``logaddexp``), score them with
   the library's Krum scores, and a second pass averages the selected clients
   (the library's ``selected_mean``);
   the geometric median runs ``--gm-iters`` Weiszfeld passes over all modules.
   Times exclude generating the data (timed apart); memory is the process's peak
   RSS over the whole pass (``VmHWM``, reset at its start through
   ``/proc/self/clear_refs``). Detection: CLAIR's module rule (flagged in any
   module), the fraction of modules flagging each kind, and the client-level
   pooled rule (median over modules of the score relative to the module's median,
   thresholded robustly, as ``detection="client"``), with F1 per contamination
   kind.

Run ``python benchmarks/llm_scale.py`` (``--quick``: one layer at a quarter of the
width, sizes 128 and 256); writes ``<out>/llm_scale.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from _environment import environment

import clair_jax as cj
from clair_jax._src.aggregators import factored as fag
from clair_jax._src.aggregators import robust
from clair_jax._src.aggregators.distances import log_squared_distances
from clair_jax._src.aggregators.factor_algebra import selected_mean
from clair_jax._src.clair.detection import detection_threshold
from clair_jax._src.clair.factored import clair_factored

KINDS = ("random",) * 2 + ("coordinated",) * 3 + ("partial",) * 2 + ("large",)
LLAMA = (("q", 4096, 4096), ("k", 4096, 4096), ("v", 4096, 4096), ("o", 4096, 4096))
LLAMA += (("gate", 4096, 11008), ("up", 4096, 11008), ("down", 11008, 4096))


# --- memory --------------------------------------------------------------------------------


def _status(field: str) -> float:
    """``VmRSS``/``VmHWM`` of this process in MiB (NaN off Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def reset_peak() -> bool:
    """Resets the peak RSS (``VmHWM``) to the current RSS; False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# --- part 1: dense vs factored at one size ---------------------------------------------------


def issue_federation(key, n, p, q, r, bad=4, noise=0.01):
    k = jax.random.split(key, 4)
    shared = jax.random.normal(k[0], (p, r))
    b = shared[None] + noise * jax.random.normal(k[1], (n, p, r))
    b = b.at[:bad].set(jax.random.normal(k[2], (bad, p, r)))
    a = jax.random.normal(k[3], (n, r, q))
    return b, a


def timed(fn, repeats=1):
    """(result, seconds of the first call, seconds of the best later call)."""
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    first = time.perf_counter() - start
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return out, first, best


def compare(size: int, args) -> dict:
    n, r = args.compare_clients, args.compare_rank
    b, a = issue_federation(jax.random.key(size), n, size, size, r)
    truth = np.arange(n) < 4
    fac, fac_first, fac_time = timed(
        lambda: clair_factored(cj.LoRAFactors(b, a), benign_majority=True), args.repeats
    )
    row = {
        "p": size,
        "q": size,
        "n": n,
        "r": r,
        "factored_first_s": fac_first,
        "factored_s": fac_time,
        "factored_flagged": np.flatnonzero(~np.asarray(fac.collaborative)).tolist(),
        "factored_rank": int(fac.rank),
        "factored_noise_scale": float(fac.noise_scale),
        "factored_correct": bool((~np.asarray(fac.collaborative) == truth).all()),
    }
    print(f"[{size}] factored {fac_time:.3f} s (first {fac_first:.1f} s)", row, flush=True)
    x = jnp.einsum("npr,nrq->npq", b, a)
    if size <= args.dense_default_max:
        dd, dd_first, dd_time = timed(lambda: cj.clair(x, benign_majority=True), 0)
        row.update(
            dense_default_s=dd_first,
            dense_default_flagged=np.flatnonzero(~np.asarray(dd.collaborative)).tolist(),
            dense_default_rank=int(dd.rank),
            dense_default_noise_scale=float(dd.noise_scale),
        )
        print(f"[{size}] dense default statistics {dd_first:.1f} s (incl. compile)", flush=True)
    if size <= args.dense_max:
        stats = {
            "lam_nuc": fac.lam_nuc,
            "lam_block": fac.lam_block,
            "noise_scale": fac.noise_scale,
            "threshold": fac.threshold,
        }
        dense, d_first, d_time = timed(
            lambda: cj.clair(x, benign_majority=True, **stats), args.dense_repeats
        )
        refined_f = fac.refined.dense()
        scale = float(jnp.max(jnp.abs(dense.refined)))
        row.update(
            dense_same_stats_first_s=d_first,
            dense_same_stats_s=d_time if args.dense_repeats else d_first,
            dense_same_stats_flagged=np.flatnonzero(~np.asarray(dense.collaborative)).tolist(),
            flags_identical=bool((dense.collaborative == fac.collaborative).all()),
            refined_max_rel_diff=float(jnp.max(jnp.abs(refined_f - dense.refined))) / scale,
            rank_identical=int(dense.rank) == int(fac.rank),
        )
        row["speed_ratio"] = row["dense_same_stats_s"] / fac_time
        print(
            f"[{size}] dense same statistics {row['dense_same_stats_s']:.2f} s, ratio "
            f"{row['speed_ratio']:.0f}x, flags identical {row['flags_identical']}, "
            f"refined diff {row['refined_max_rel_diff']:.2e}",
            flush=True,
        )
    return row


# --- part 2: the 7B-shaped model --------------------------------------------------------------


def modules(layers: int, divisor: int):
    for layer in range(layers):
        for j, (name, p, q) in enumerate(LLAMA):
            yield layer * len(LLAMA) + j, f"{layer}.{name}", p // divisor, q // divisor


@partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def make_module(index, p, q, n, r, noise):
    """Clients' factors and a global adapter of one module (deterministic in ``index``)."""
    dtype = jnp.float32
    k = jax.random.split(jax.random.fold_in(jax.random.key(2026), index), 8)
    shared = jax.random.normal(k[0], (p, r)) / np.sqrt(p)
    b = shared[None] + noise / np.sqrt(p) * jax.random.normal(k[1], (n, p, r))
    a = jax.random.normal(k[2], (n, r, q)) / np.sqrt(q)
    c = len(KINDS)
    rand = jax.random.normal(k[3], (c, p, r)) / np.sqrt(p)
    kinds = np.array(KINDS)
    for i, kind in enumerate(KINDS):
        if kind == "random":
            b = b.at[i].set(rand[i])
        elif kind == "large":
            b = b.at[i].set(10.0 * rand[i])
        elif kind == "partial":
            b = b.at[i, :, : r // 2].set(rand[i, :, : r // 2])
    coord = np.flatnonzero(kinds == "coordinated")
    if coord.size:
        b_c = jax.random.normal(k[4], (p, r)) / np.sqrt(p)
        a_c = jax.random.normal(k[5], (r, q)) / np.sqrt(q)
        b = b.at[coord].set(b_c)
        a = a.at[coord].set(a_c)
    glob = cj.LoRAFactors(
        shared.astype(dtype), (jax.random.normal(k[6], (r, q)) / np.sqrt(q)).astype(dtype)
    )
    return cj.LoRAFactors(b.astype(dtype), a.astype(dtype)), glob


def f1(flagged, positive):
    tp = np.sum(flagged & positive)
    fp = np.sum(flagged & ~positive)
    fn = np.sum(~flagged & positive)
    return float(2 * tp / max(2 * tp + fp + fn, 1))


def detection_report(flagged, n):
    kinds = np.array(list(KINDS) + ["benign"] * (n - len(KINDS)))
    contaminated = kinds != "benign"
    out = {"f1": f1(flagged, contaminated), "flagged": np.flatnonzero(flagged).tolist()}
    for kind in sorted(set(KINDS)):
        subset = (kinds == kind) | ~contaminated
        out[f"f1/{kind}"] = f1(flagged[subset], contaminated[subset])
    out["benign_flagged"] = int(np.sum(flagged & ~contaminated))
    return out


def model_run(args) -> dict:
    """One pass over the modules: each is generated once and every rule runs on it."""
    n, r = args.clients, args.rank
    mods = list(modules(args.layers, args.divisor))
    w = jnp.ones((n,), jnp.float32)
    key = jax.random.key(0)
    rnd = jnp.int32(1)

    def jitted(agg, keep=()):
        """The rule on a dict of modules, returning the global adapters, the client adapters,
        the flags and the diagnostics whose keys start with one of ``keep`` (the others are
        dead code XLA removes: the dense aggregation errors of the cj rules)."""

        def fn(c, g, w):
            res = agg.aggregate(c, g, w, rnd, key)
            diag = {k: v for k, v in res.diagnostics.items() if k.startswith(keep)}
            return res.global_, res.clients, res.flagged, diag

        return jax.jit(fn)

    error = ("aggregation_error/",)
    rules = {
        "fedit": jitted(cj.fedit()),
        "flexlora": jitted(fag.flexlora_factored(), error),
        "ffa_lora": jitted(cj.ffa_lora()),
        "fedrot": jitted(cj.fedrot(1.0)),
        "coordinate_median": jitted(cj.coordinate_median()),
        "trimmed_mean": jitted(cj.trimmed_mean(0.25)),
        # factored by default
        "clair": jitted(
            cj.clair_aggregator(devices=jax.devices()), error + ("scores/", "flagged/")
        ),
    }
    rules = {k: v for k, v in rules.items() if k in args.rules}
    flat = jax.jit(lambda c: jnp.concatenate([c.B.reshape(n, -1), c.A.reshape(n, -1)], axis=1))
    dist_fn = jax.jit(log_squared_distances)
    err_fn = jax.jit(
        lambda c, w: fag.product_error_factored(
            c, w / jnp.sum(w), cj.LoRAFactors(jnp.mean(c.B, axis=0), jnp.mean(c.A, axis=0))
        )
    )
    krum_wanted = any(x in args.rules for x in ("krum", "multi_krum", "geometric_median"))
    names = list(rules) + (["krum_distances"] if krum_wanted else []) + ["factored_error"]
    seconds = dict.fromkeys(names, 0.0)
    first_calls = dict.fromkeys(names, 0.0)
    t_gen, errors, seen, signatures = 0.0, {k: [] for k in rules}, set(), set()
    flags = {k: [] for k in rules}
    scores, log_d = [], np.full((n, n), -np.inf)
    first_layer = mods[: len(LLAMA)]
    # Modules of one shape side by side, args.chunk of them per call (one per device by
    # default: the CLAIR rule gives each device one).
    by_shape = sorted(mods, key=lambda m: (m[2], m[3]))
    chunks, size = [], max(args.chunk, 1)
    for shape in dict.fromkeys((p, q) for _, _, p, q in by_shape):
        same = [m for m in by_shape if (m[2], m[3]) == shape]
        chunks += [same[i : i + size] for i in range(0, len(same), size)]
    reset_peak()
    done = 0
    for chunk in chunks:
        start = time.perf_counter()
        # Keys by position in the chunk: every chunk has the same pytree structure, so the
        # jitted rules compile once (a dict's keys are part of what jit specialises on).
        chunk = [(index, f"{j}", p, q) for j, (index, _, p, q) in enumerate(chunk)]
        made = jax.block_until_ready(
            {name: make_module(index, p, q, n, r, args.noise) for index, name, p, q in chunk}
        )
        t_gen += time.perf_counter() - start
        clients = {name: c for name, (c, _) in made.items()}
        glob = {name: g for name, (_, g) in made.items()}
        seen.update((p, q) for _, _, p, q in chunk)
        calls = [(k, None, partial(fn, clients, glob, w)) for k, fn in rules.items()]
        for index, name, p, q in chunk:
            if krum_wanted:
                calls.append(("krum_distances", (p, q), partial(dist_fn, clients[name])))
            if index < len(first_layer):  # the first layer only (extrapolated)
                calls.append(("factored_error", (p, q), partial(err_fn, clients[name], w)))
        for name, shape, call in calls:
            # Compile outside the timing (once per chunk structure, or per module shape).
            signature = (name, shape or tuple((p, q) for _, _, p, q in chunk))
            if signature not in signatures:
                signatures.add(signature)
                start = time.perf_counter()
                jax.block_until_ready(call())
                first_calls[name] += time.perf_counter() - start
            start = time.perf_counter()
            out = jax.block_until_ready(call())
            seconds[name] += time.perf_counter() - start
            if name in rules:
                _, _, flagged, diag = out
                for _, module, _, _ in chunk:
                    if f"aggregation_error/{module}" in diag:
                        errors[name].append(float(diag[f"aggregation_error/{module}"]))
                    if name == "clair":
                        flags[name].append(np.asarray(diag[f"flagged/{module}"]))
                        scores.append(np.asarray(diag[f"scores/{module}"]))
            elif name == "krum_distances":
                log_d = np.logaddexp(log_d, np.asarray(out, np.float64))
        done += len(chunk)
        if done % len(LLAMA) < len(chunk):
            print(
                f"  {done}/{len(mods)} modules, "
                + ", ".join(f"{k} {v:.1f}s" for k, v in seconds.items()),
                flush=True,
            )
        del made, clients, glob, calls
    report = {
        "modules": len(mods),
        "chunk": size,
        "shapes": sorted(seen),
        "generation_s": t_gen,
        "peak_rss_mib_whole_pass": _status("VmHWM"),
        "seconds": seconds,
        "first_calls_s": first_calls,
        "factored_error_whole_model_estimate_s": seconds["factored_error"]
        * len(mods)
        / max(len(first_layer), 1),
        "rules": {},
    }
    kinds = np.array(list(KINDS) + ["benign"] * (n - len(KINDS)))
    for name in rules:
        entry = {"seconds": seconds[name], "first_calls_s": first_calls[name]}
        if errors[name]:
            entry["mean_aggregation_error"] = float(np.mean(errors[name]))
        if name == "clair":
            f = np.stack(flags[name])
            entry["module_rule"] = detection_report(f.any(axis=0), n)
            entry["fraction_of_modules_flagging"] = {
                str(kind): float(f[:, kinds == kind].mean()) for kind in sorted(set(kinds))
            }
            s = np.stack(scores)
            rel = s / np.maximum(np.median(s, axis=1, keepdims=True), 1e-30)
            client_scores = np.median(rel, axis=0)
            tau = float(detection_threshold(jnp.asarray(client_scores), jnp.zeros((), jnp.float32)))
            entry["client_rule"] = detection_report(client_scores > tau, n)
        report["rules"][name] = entry

    # Krum / Multi-Krum: selection from the summed distances; the average of the selected
    # clients is timed on the first layer and extrapolated.
    if krum_wanted:
        f_byz = len(KINDS)
        layer = [make_module(i, p, q, n, r, args.noise)[0] for i, _, p, q in first_layer]
        for name, m in (("multi_krum", n - f_byz), ("krum", 1)):
            if name not in args.rules:
                continue
            log_scores = robust.log_krum_scores_from_distances(
                jnp.asarray(log_d, jnp.float32), f_byz
            )
            sel = np.zeros(n, bool)
            sel[np.argsort(np.asarray(log_scores), kind="stable")[:m]] = True
            sel_j = jnp.asarray(sel)
            p_sel = jnp.asarray(sel / sel.sum(), jnp.float32)
            mean_fn = jax.jit(lambda c, p=p_sel, s=sel_j, m=m: selected_mean(c, p, s, m))
            t_avg = 0.0
            for c in layer:
                jax.block_until_ready(mean_fn(c))
                start = time.perf_counter()
                jax.block_until_ready(mean_fn(c))
                t_avg += time.perf_counter() - start
            t_avg *= len(mods) / len(layer)
            report["rules"][name] = {
                "seconds": seconds["krum_distances"] + t_avg,
                "distances_s": seconds["krum_distances"],
                "average_s_estimate": t_avg,
                "detection": detection_report(~sel, n),
            }
        # Geometric median: Weiszfeld on the first layer (in memory), extrapolated.
        if "geometric_median" in args.rules:
            rows = [flat(c) for c in layer]
            sq = jax.jit(lambda x, v: jnp.sum((x - v[None]) ** 2, axis=1))
            wmean = jax.jit(lambda x, b: jnp.einsum("n,nd->d", b, x))
            centers = [jnp.mean(x, axis=0) for x in rows]
            for x, c in zip(rows, centers, strict=True):  # compile
                jax.block_until_ready((sq(x, c), wmean(x, jnp.ones(n) / n)))
            start = time.perf_counter()
            for _ in range(args.gm_iters):
                dist2 = sum(np.asarray(sq(x, c)) for x, c in zip(rows, centers, strict=True))
                beta = 1.0 / np.maximum(np.sqrt(dist2), 1e-6)
                beta = jnp.asarray(beta / beta.sum(), jnp.float32)
                centers = jax.block_until_ready([wmean(x, beta) for x in rows])
            t_gm = (time.perf_counter() - start) * len(mods) / len(layer)
            report["rules"]["geometric_median"] = {
                "seconds_estimate": t_gm,
                "iterations": args.gm_iters,
                "note": "Weiszfeld on the first layer in memory, times modules / 7",
            }
    for name, entry in report["rules"].items():
        print(name, {k: v for k, v in entry.items()}, flush=True)
    print("peak RSS of the pass (MiB):", report["peak_rss_mib_whole_pass"], flush=True)
    return report


def main(argv=None) -> None:
    from _environment import RULES

    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="*",
        default=[256, 512, 1024],
        help="p = q of the dense-vs-factored comparison",
    )
    parser.add_argument("--compare-clients", type=int, default=16)
    parser.add_argument("--compare-rank", type=int, default=8)
    parser.add_argument(
        "--dense-max", type=int, default=1024, help="largest size at which the dense path runs"
    )
    parser.add_argument(
        "--dense-default-max",
        type=int,
        default=256,
        help="largest size at which dense CLAIR also runs with its own statistics",
    )
    parser.add_argument("--repeats", type=int, default=2, help="timed calls of the factored path")
    parser.add_argument(
        "--dense-repeats",
        type=int,
        default=1,
        help="timed calls of the dense path after the first (0: first call only)",
    )
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument(
        "--chunk",
        type=int,
        default=None,
        help="modules of one shape aggregated per call of a rule (default: --cpu-devices)",
    )
    parser.add_argument(
        "--cpu-devices",
        type=int,
        default=os.cpu_count() or 1,
        help="CPU devices JAX is given (jax_num_cpu_devices): CLAIR spreads modules over them",
    )
    parser.add_argument("--divisor", type=int, default=1, help="divide the Llama widths by this")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument(
        "--noise", type=float, default=0.01, help="relative noise of the benign clients' B"
    )
    parser.add_argument("--gm-iters", type=int, default=5, help="Weiszfeld passes")
    parser.add_argument("--rules", nargs="*", default=list(RULES))
    parser.add_argument("--skip-model", action="store_true")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="1 layer at a quarter of the width, sizes 128 256, 16 clients, rank 8",
    )
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out"))
    args = parser.parse_args(argv)
    # Before anything starts JAX's backend: the device count is fixed from then on.
    jax.config.update("jax_num_cpu_devices", max(args.cpu_devices, 1))
    args.chunk = args.chunk or max(args.cpu_devices, 1)
    if args.quick:
        args.sizes, args.layers, args.divisor = [128, 256], 1, 4
        args.clients, args.rank, args.gm_iters = 16, 8, 2
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    record = {
        "environment": environment(),
        "argv": sys.argv[1:] if argv is None else list(argv),
        "load_average_start": load,
        "compare": [compare(size, args) for size in args.sizes],
    }
    if not args.skip_model:
        record["model"] = model_run(args)
    record["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "llm_scale.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=1, default=str)
    print("wrote", path)


if __name__ == "__main__":
    main()
