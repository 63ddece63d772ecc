"""The experiment's report: Markdown tables, the JSON file and the plot."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from clair_jax.experiments.text_copy.metrics import TOKEN_KINDS


def fmt(x, spec=".3f") -> str:
    """``x`` formatted with ``spec``, or ``"-"`` for ``None`` and non-finite floats."""
    return "-" if x is None or (isinstance(x, float) and not np.isfinite(x)) else format(x, spec)


def format_token_table(results: dict[str, dict]) -> str:
    """A Markdown table of the benign accuracy per kind of source token."""
    header = "| method | " + " | ".join(TOKEN_KINDS) + " |\n|---|" + "---|" * len(TOKEN_KINDS)
    rows = [
        f"| {name} | " + " | ".join(fmt(r["accuracy_by_token"][k]) for k in TOKEN_KINDS) + " |"
        for name, r in results.items()
    ]
    return "\n".join([header, *rows])


# --- the experiment ---------------------------------------------------------------------


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
            f"{fmt(d['precision'], '.2f')} | {fmt(d['recall'], '.2f')} | "
            f"{fmt(d['f1'], '.2f')} | {fmt(mean_round_f1(r), '.2f')} | {r['seconds']:.1f} |"
        )
    return "\n".join([header, *rows])


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
