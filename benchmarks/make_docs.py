"""Regenerates the docs' benchmark tables and figures from the benchmark scripts.

``python benchmarks/make_docs.py --quick`` runs every benchmark in its quick form
(``OPENBLAS_NUM_THREADS=1``, one after the other, outputs in ``benchmarks/out/``),
copies each result (JSON, PNG) to ``docs/assets/benchmarks/`` and rewrites the
generated blocks of ``docs/benchmarks.md`` (between ``<!-- BEGIN name -->`` and
``<!-- END name -->``), each with the command and the machine that produced it.

* ``--only text_copy,rpca`` runs some sections only (``--list`` names them);
* without ``--quick`` the sections run their full forms (an hour or more on 2 cores);
* ``--no-run`` re-renders the page from the results already in ``docs/assets/benchmarks/``.

Run it on an otherwise idle machine: the tables report timings.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "out"
ASSETS = ROOT / "docs" / "assets" / "benchmarks"
PAGE = ROOT / "docs" / "benchmarks.md"
ENV = {"OPENBLAS_NUM_THREADS": "1"}


# --- rendering ---------------------------------------------------------------------------


def _f(x, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def text_copy(d: dict) -> str:
    rows = []
    for name, r in d["methods"].items():
        det = r["detection"]
        rounds = [f for f in r.get("round_f1", []) if f is not None]
        per_round = sum(rounds) / len(rounds) if rounds else None
        rows.append(
            [
                name,
                f"{r['accuracy']:.3f} ± {r['accuracy_std']:.3f}",
                f"{r['loss']:.3f}",
                _f(det["precision"], ".2f"),
                _f(det["recall"], ".2f"),
                _f(det["f1"], ".2f"),
                _f(per_round, ".2f"),
                f"{r['seconds']:.1f}",
            ]
        )
    head = ["method", "benign acc", "benign loss", "precision", "recall", "F1"]
    main = _table(head + ["F1 per round", "time (s)"], rows)
    tokens = _table(
        ["method", "shared", "specific", "other"],
        [
            [name, *(f"{r['accuracy_by_token'][k]:.3f}" for k in ("shared", "specific", "other"))]
            for name, r in d["methods"].items()
        ],
    )
    gaps = d["gaps"]
    return (
        f"{main}\n\nBase model before fine-tuning: {d['base_accuracy']:.3f}. "
        f"CLAIR − local-only = {gaps['clair_minus_local_only']:+.3f}, "
        f"CLAIR − FedIT = {gaps['clair_minus_fedit']:+.3f}. "
        f"Wall time {d['wall_seconds']:.0f} s.\n\n"
        "Benign held-out accuracy by the token copied (re-mapped alike by every benign "
        "client, re-mapped per client, copied as is):\n\n" + tokens
    )


def _solver_row(r: dict) -> list:
    backend = r["backend"] + (f" = {r['resolved']}" if r["backend"] == "auto" else "")
    frac = f"{r['floor_fraction']:.2f}" if "floor_fraction" in r else "-"
    return [
        r["n"],
        r["solver"],
        backend,
        r["iters"],
        f"{r['time_s'] * 1e3:.1f}",
        f"{r['ratio_vs_numpy']:.1f}x",
        frac,
        f"{r['objective_gap']:.1e}",
    ]


SOLVER_HEAD = ["n", "solver", "backend", "iters", "time (ms)", "vs NumPy", "floor fraction"]


def solver_scaling(d: dict) -> str:
    parts = []
    if "headline" in d:
        parts.append("Headline, n=32, p=256, q=16, tol 1e-6:\n")
        parts.append(
            _table(SOLVER_HEAD + ["objective gap"], [_solver_row(r) for r in d["headline"]])
        )
    if "equal_accuracy" in d:
        parts.append(
            "\nAt equal accuracy (each JAX solver at the loosest tol in {1e-4, 1e-5, 1e-6} "
            "whose objective gap is at most the NumPy baseline's):\n"
        )
        rows = [
            [
                r["solver"],
                r["backend"],
                f"{r['tol']:.0e}",
                r["iters"],
                f"{r['time_s'] * 1e3:.1f}",
                f"{r['objective_gap']:.1e}",
                f"{r['ratio_vs_numpy']:.1f}x",
            ]
            for r in d["equal_accuracy"]
        ]
        head = ["solver", "backend", "tol", "iters", "time (ms)", "objective gap", "vs NumPy"]
        parts.append(_table(head, rows))
    if "sweep_n" in d:
        parts.append("\nSweep over the number of clients n (p=256, q=16):\n")
        parts.append(
            _table(SOLVER_HEAD + ["objective gap"], [_solver_row(r) for r in d["sweep_n"]])
        )
    return "\n".join(parts)


def batch_table(d: dict) -> str:
    rows = [
        [
            r["batch"],
            r["mode"],
            f"{r['numpy_loop_s']:.2f}",
            f"{r['jax_s']:.2f}",
            f"{r['ratio']:.1f}x",
            "{}–{}".format(*r["iters_min_max"]),
            r["all_converged"],
        ]
        for r in d["batch"]
    ]
    head = ["batch", "JAX batching", "NumPy loop (s)", "JAX (s)", "speed-up", "iters"]
    return _table(head + ["all converged"], rows)


def rpca(d: dict) -> str:
    rows = []
    ref = {}
    for r in d["rows"]:
        size = (r["m"], r["N"])
        if r["library"] == "tensorly":
            ref[size] = r["time_s"]
        ratio = (
            f"{ref[size] / r['time_s']:.0f}x" if r["library"] != "tensorly" and size in ref else "-"
        )
        rows.append(
            [
                f"{r['m']} x {r['N']}",
                r["rank"],
                f"{r['fraction']:.0%}",
                r["library"],
                r["backend"],
                r["iters"],
                f"{r['time_s']:.3f}",
                f"{r['rel_error']:.1e}",
                ratio,
            ]
        )
    head = ["m x N", "rank", "corrupted", "library", "backend", "iters", "time (s)"]
    return _table(head + ["rel. error of L", "tensorly / ours"], rows)


def clair_simulations(d: dict) -> str:
    spec = importlib.util.spec_from_file_location(
        "clair_simulations", HERE / "clair_simulations.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = module.markdown(d)
    lines = text.splitlines()
    # Drop the title and the command line (the caption gives both); one heading level down.
    while lines and not lines[0].startswith("## "):
        lines.pop(0)
    return "\n".join("#" + line if line.startswith("#") else line for line in lines)


def robustness(d: dict) -> str:
    spec = importlib.util.spec_from_file_location("robustness", HERE / "robustness.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.markdown(d)


def clair_departures(d: dict) -> str:
    spec = importlib.util.spec_from_file_location("clair_departures", HERE / "clair_departures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.markdown(d)


def fedrot_alignment(d: dict) -> str:
    s = d["setup"]
    rows = []
    for a, b in zip(d["random_bases"], d["near_bases"], strict=True):
        rows.append(
            [
                f"{a['strength']:g}" + (" (FedIT)" if a["strength"] == 0 else ""),
                f"{a['align_A']['mean']:.4f}",
                f"{a['align_A']['reduction']:.1f}x",
                f"{b['align_A']['mean']:.4f}",
                f"{b['align_A']['reduction']:.1f}x",
            ]
        )
    head = ["λ", "random bases", "reduction", "bases near the reference", "reduction"]
    sweep = _table(
        ["heterogeneity", "FedIT", "FedRot λ=0.4", "FedRot λ=1", "reduction λ=1"],
        [
            [
                f"{r['heterogeneity']:g}",
                f"{r['fedit']:.4f}",
                f"{r['fedrot_0.4_A']:.4f}",
                f"{r['fedrot_1.0_A']:.2e}",
                f"{r['reduction_1.0_A']:.3g}x",
            ]
            for r in d["heterogeneity_sweep"]
        ],
    )
    t = d["timing"]
    return (
        f"Relative aggregation error, n={s['n']}, p={s['p']}, q={s['q']}, r={s['r']}, "
        f"10% heterogeneity, mean over {s['seeds']} seeds ({d['dtype']}):\n\n"
        + _table(head, rows)
        + "\n\nAcross heterogeneity levels (align A):\n\n"
        + sweep
        + f"\n\n`fedrot_align` on n, p, r, q = {t['n_p_r_q']}: {t['fedrot_align_ms']:.2f} ms "
        f"(the factor mean alone: {t['factor_mean_ms']:.2f} ms)."
    )


def federated_round(d: dict) -> str:
    s = d["settings"]
    rows = [
        [
            r["clients"],
            f"{r['vmap_s'] * 1e3:.0f}",
            f"{r['loop_s'] * 1e3:.0f}",
            f"{r['speedup']:.2f}x",
        ]
        for r in d["results"]
    ]
    return (
        f"{s['aggregator']}, {s['local_steps']} local steps, batch {s['batch_size']}, "
        f"{s['modules']} adapted modules; median of {s['repeats']} rounds after compilation:\n\n"
        + _table(["clients", "vmap (ms)", "Python loop (ms)", "speed-up"], rows)
    )


def round_memory(d: dict) -> str:
    mib = 2.0**20
    rows = [
        [
            r["clients"],
            f"{r['argument_bytes'] / mib:.1f}",
            f"{r['output_bytes'] / mib:.1f}",
            f"{r['temp_bytes'] / mib:.1f}",
            f"{r['peak_estimate_bytes'] / mib:.1f}",
        ]
        for r in d["results"]
    ]
    fit = d["linear_fits"]["peak_estimate"]
    head = ["clients", "arguments (MiB)", "outputs (MiB)", "temporaries (MiB)", "peak (MiB)"]
    return (
        _table(head, rows)
        + f"\n\nLeast-squares line: {fit['bytes_per_client'] / mib:.2f} MiB per client "
        f"(largest relative deviation {fit['max_relative_deviation']:.1e}), "
        f"intercept {fit['intercept_bytes'] / mib:.1f} MiB."
    )


def round_memory_devices(d: dict) -> str:
    rows = [
        [
            r["clients"],
            f"{r['single_device_s'] * 1e3:.0f} ms ({r['single_clients_per_s']:.0f} clients/s)",
            f"{r['sharded_s'] * 1e3:.0f} ms ({r['sharded_clients_per_s']:.0f} clients/s)",
            f"{r['speedup']:.2f}x",
        ]
        for r in d["results"]
    ]
    head = ["clients", "one device", f"{d['devices']} simulated devices", "ratio"]
    return _table(head, rows)


def llm_scale_model(d: dict) -> str:
    m = d["model"]
    names = {
        "clair": "CLAIR (factored)",
        "fedit": "FedIT",
        "ffa_lora": "FFA-LoRA",
        "fedrot": "FedRot-LoRA",
        "flexlora": "FlexLoRA (factored, error included)",
        "coordinate_median": "coordinate median",
        "trimmed_mean": "trimmed mean",
        "multi_krum": "Multi-Krum",
        "krum": "Krum",
        "geometric_median": "geometric median (estimate from the first layer)",
    }
    rows = []
    for key, label in names.items():
        r = m["rules"].get(key)
        if r is None:
            continue
        det = r.get("module_rule") or r.get("detection") or {}
        f1 = _f(det["f1"], ".2f") if "f1" in det else "–"
        seconds = r.get("seconds", r.get("seconds_estimate"))
        first = r.get("first_calls_s")
        first = f"{first:.1f} s" if first is not None else "–"
        rows.append([label, f"{seconds:.1f} s", first, f1])
    shapes = ", ".join(f"{p} × {q}" for p, q in m["shapes"])
    head = [
        "rule",
        "one aggregation of the model",
        "first calls (compiling, one per shape)",
        "detection F1",
    ]
    devices = len(d["environment"]["devices"])
    chunk = m.get("chunk", 1)
    return (
        f"{m['modules']} modules ({shapes}), {chunk} of one shape per call; {devices} CPU "
        f"device{'s' if devices > 1 else ''} (CLAIR with `devices=jax.devices()`); peak RSS "
        f"of the whole pass {m['peak_rss_mib_whole_pass'] / 1024:.1f} GiB.\n\n" + _table(head, rows)
    )


def readme_snippets(d: dict) -> str:
    rows = []
    for r in d["snippets"]:
        if "skipped" in r:
            rows.append([r["snippet"] + 1, f"`{r['first_line']}`", r["skipped"], "", ""])
            continue
        rows.append(
            [
                r["snippet"] + 1,
                f"`{r['first_line']}`",
                f"{r['as is']['seconds']:.1f} s",
                f"{r['OPENBLAS_NUM_THREADS=1']['seconds']:.1f} s",
                f"{r['ratio']:.2f}",
            ]
        )
    head = ["README snippet", "first statement", "as is", "OPENBLAS_NUM_THREADS=1", "ratio"]
    where = "beside one busy process per core" if d["hog"] else "on an otherwise idle machine"
    return f"Each snippet in a fresh interpreter, {where}:\n\n" + _table(head, rows)


# --- sections ----------------------------------------------------------------------------


class Section:
    """One generated block: how to run it, what it produces, how to render it."""

    def __init__(
        self,
        name: str,
        script: list[str],
        quick: list[str],
        full: list[str],
        produces: dict[str, str],
        render: Callable[[dict], str],
        full_produces: dict[str, str] | None = None,
    ):
        self.name, self.script, self.quick, self.full = name, script, quick, full
        self.produces, self.render = produces, render
        self.full_produces = full_produces or produces

    def command(self, quick: bool, out: Path) -> list[str]:
        return [*self.script, *(self.quick if quick else self.full), "--out", str(out)]

    def shown(self, quick: bool) -> str:
        """The command as a reader would type it (default output folder)."""
        args = " ".join(
            shlex.quote(a) for a in (*self.script, *(self.quick if quick else self.full))
        )
        return "OPENBLAS_NUM_THREADS=1 python " + args


def json_and_png(src: str, dst: str) -> dict[str, str]:
    """A section's JSON and PNG, ``<src>.json`` and ``<src>.png``, copied as ``<dst>.*``."""
    return {f"{src}.{ext}": f"{dst}.{ext}" for ext in ("json", "png")}


PNG_CLAIR = ["phase_transition", "noise_stability", "samples", "refinement", "clients_samples"]
SECTIONS = [
    Section(
        "text_copy",
        ["-m", "clair_jax.experiments.text_copy", "--no-progress"],
        ["--quick"],
        [],
        json_and_png("text_copy", "text_copy"),
        text_copy,
    ),
    Section(
        "solver_scaling",
        ["benchmarks/solver_scaling.py", "--sections", "headline,n"],
        ["--quick", "--repeats", "7"],
        ["--repeats", "3"],
        json_and_png("solver_scaling_headline_n", "solver_scaling"),
        solver_scaling,
    ),
    Section(
        "solver_batch",
        ["benchmarks/solver_scaling.py", "--sections", "batch"],
        ["--quick", "--repeats", "7"],
        ["--repeats", "3"],
        json_and_png("solver_scaling_batch", "solver_batch"),
        batch_table,
    ),
    Section(
        "rpca",
        ["benchmarks/rpca_vs_tensorly.py"],
        ["--quick"],
        [],
        json_and_png("rpca_vs_tensorly", "rpca"),
        rpca,
    ),
    Section(
        "clair_simulations",
        ["benchmarks/clair_simulations.py"],
        ["--quick"],
        [],
        {
            "clair_simulations.json": "clair_simulations.json",
            **{f"clair_{k}.png": f"clair_{k}.png" for k in PNG_CLAIR},
        },
        clair_simulations,
    ),
    Section(
        "clair_departures",
        ["benchmarks/clair_departures.py"],
        ["--quick"],
        [],
        {"clair_departures.json": "clair_departures.json"},
        clair_departures,
    ),
    Section(
        "robustness",
        ["benchmarks/robustness.py"],
        ["--quick"],
        [],
        json_and_png("robustness", "robustness"),
        robustness,
    ),
    Section(
        "fedrot_alignment",
        ["benchmarks/fedrot_alignment.py"],
        ["--tc-seeds", "0"],
        [],
        {"fedrot_alignment.json": "fedrot_alignment.json"},
        fedrot_alignment,
    ),
    Section(
        "llm_scale_model",
        ["benchmarks/llm_scale.py", "--sizes"],
        ["--quick"],
        [],
        {"llm_scale.json": "llm_scale_model.json"},
        llm_scale_model,
    ),
    Section(
        "readme_snippets",
        ["benchmarks/readme_snippets.py"],
        [],
        [],
        {"readme_snippets.json": "readme_snippets.json"},
        readme_snippets,
    ),
    Section(
        "readme_snippets_hog",
        ["benchmarks/readme_snippets.py", "--hog"],
        [],
        [],
        {"readme_snippets.json": "readme_snippets_hog.json"},
        readme_snippets,
    ),
    Section(
        "federated_round",
        ["benchmarks/federated_round.py", "--clients", "64"],
        ["--repeats", "5"],
        ["--repeats", "5"],
        {"federated_round.json": "federated_round.json"},
        federated_round,
    ),
    Section(
        "round_memory",
        ["benchmarks/round_memory.py"],
        ["--quick"],
        [],
        {"round_memory_quick.json": "round_memory.json"},
        round_memory,
        full_produces={"round_memory.json": "round_memory.json"},
    ),
    Section(
        "round_memory_devices",
        ["benchmarks/round_memory.py", "--devices", "8"],
        [],
        [],
        {"round_memory_devices8.json": "round_memory_devices.json"},
        round_memory_devices,
    ),
]


def machine(d: dict) -> str:
    """``"2-core AMD EPYC CPU"`` from a result's recorded environment."""
    env = d.get("environment") or d.get("machine") or {}
    if not isinstance(env, dict):
        return str(env)
    cores = env.get("cpu_affinity") or env.get("cpu_count")
    model = env.get("cpu_model", "")
    backend = env.get("backend", "cpu")
    if backend != "cpu":
        return f"{backend.upper()}: {', '.join(env.get('devices', []))}"
    return f"{cores}-core {model} CPU".replace("  ", " ") if cores else f"{model} CPU"


def caption(d: dict) -> str:
    cmd = d.get("docs_command", "")
    where = d.get("docs_machine") or machine(d)
    env = d.get("environment") or d.get("machine")
    jax_version = (env.get("jax") if isinstance(env, dict) else None) or d.get("jax")
    if not jax_version and isinstance(d.get("meta"), dict):
        jax_version = d["meta"].get("jax")
    jax_note = f", jax {jax_version}" if jax_version else ""
    return f"`{cmd}` on a {where}{jax_note}."


def run_section(section: Section, quick: bool) -> None:
    out = OUT / section.name
    if out.exists():
        shutil.rmtree(out)
    cmd = [sys.executable, *section.command(quick, out)]
    print(f"[make_docs] {section.name}: {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env={**os.environ, **ENV}, check=True)
    print(f"[make_docs] {section.name}: {time.perf_counter() - start:.0f} s", flush=True)
    produces = section.produces if quick else section.full_produces
    ASSETS.mkdir(parents=True, exist_ok=True)
    for src, dst in produces.items():
        if dst.endswith(".json"):
            d = json.loads((out / src).read_text())
            d["docs_command"] = section.shown(quick)
            d["docs_machine"] = local_machine()
            (ASSETS / dst).write_text(json.dumps(d, indent=1) + "\n")
        else:
            shutil.copyfile(out / src, ASSETS / dst)


def local_machine() -> str:
    sys.path.insert(0, str(HERE))
    from _environment import cpu_model

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cores}-core {cpu_model()} CPU"


def render_page(sections: list[Section]) -> None:
    page = PAGE.read_text()
    for section in sections:
        source = ASSETS / next(v for v in section.produces.values() if v.endswith(".json"))
        d = json.loads(source.read_text())
        block = f"{caption(d)}\n\n{section.render(d)}"
        pattern = re.compile(
            rf"(<!-- BEGIN {section.name} -->\n).*?(<!-- END {section.name} -->)", re.S
        )
        if not pattern.search(page):
            raise SystemExit(f"{PAGE}: no <!-- BEGIN/END {section.name} --> markers")
        page = pattern.sub(lambda m, b=block: m.group(1) + b + "\n" + m.group(2), page)
    PAGE.write_text(page)
    print(f"[make_docs] wrote {PAGE.relative_to(ROOT)} ({len(sections)} sections)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="the benchmarks' quick forms")
    parser.add_argument("--only", default="", help="comma-separated sections (default: all)")
    parser.add_argument("--no-run", action="store_true", help="re-render from docs/assets only")
    parser.add_argument("--list", action="store_true", help="list the sections and exit")
    args = parser.parse_args(argv)
    if args.list:
        for s in SECTIONS:
            print(f"{s.name:22s} {s.shown(True)}")
        return
    names = [n for n in args.only.split(",") if n]
    unknown = set(names) - {s.name for s in SECTIONS}
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; --list names them")
    chosen = [s for s in SECTIONS if not names or s.name in names]
    if not args.no_run:
        for section in chosen:
            run_section(section, args.quick)
    render_page(chosen)


if __name__ == "__main__":
    main()
