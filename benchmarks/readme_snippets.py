"""Times the README's Python snippets as a user runs them: each pasted into a fresh interpreter.

Every ```` ```python ```` block of ``README.md`` runs in its own ``python -c`` process
(imports and compilation included, as a user sees it), in four settings:

* the environment as it is, and with ``OPENBLAS_NUM_THREADS=1`` (the library limits
  the LAPACK threads itself, so the two should agree);
* on an otherwise idle machine, and beside a CPU-bound process (``--hog``: one
  busy Python loop per core), the case of a laptop or a shared server.

Reports each snippet's wall time, whether it exited 0, and the ratio of the time
without the variable to the time with it. Snippets that need an optional extra
that is not installed are reported as skipped.

Run ``python benchmarks/readme_snippets.py [--hog] [--repeats 2]``; writes
``<out>/readme_snippets.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing
import os
import re
import subprocess
import sys
import time

from _environment import environment, write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXTRAS = {"safetensors": "peft", "flwr": "flower"}


def snippets(readme: str) -> list[str]:
    """The ```` ```python ```` blocks of ``readme``, in order."""
    return re.findall(r"^```python\n(.*?)^```", readme, flags=re.M | re.S)


def title(code: str) -> str:
    """The snippet's first line that is not an import, a comment or blank (its subject)."""
    for line in code.splitlines():
        text = line.split("  #")[0].strip()
        if text and not text.startswith(("import ", "from ", "#")):
            return text if len(text) <= 60 else text[:57] + "..."
    return ""


def missing_extra(code: str) -> str | None:
    """The optional extra a snippet needs and that is not installed, else None."""
    for module, extra in EXTRAS.items():
        if re.search(rf"\b{module}\b", code) and importlib.util.find_spec(module) is None:
            return extra
    return None


def run_once(code: str, env: dict, cwd: str, timeout: float) -> tuple[float, int, str]:
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    return time.perf_counter() - start, proc.returncode, proc.stderr[-2000:]


def _busy() -> None:  # pragma: no cover - runs in the hog processes
    x = 0
    while True:
        x += 1


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hog", action="store_true", help="run beside CPU-bound processes")
    parser.add_argument("--repeats", type=int, default=1, help="runs per setting (best kept)")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out"))
    args = parser.parse_args(argv)
    with open(os.path.join(ROOT, "README.md")) as f:
        blocks = snippets(f.read())
    base_env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    settings = {
        "as is": base_env,
        "OPENBLAS_NUM_THREADS=1": {**base_env, "OPENBLAS_NUM_THREADS": "1"},
    }
    hogs = []
    if args.hog:
        hogs = [
            multiprocessing.Process(target=_busy, daemon=True) for _ in range(os.cpu_count() or 1)
        ]
        for h in hogs:
            h.start()
    rows = []
    # The snippets run where a user's clone is, but what they write lands in the output
    # folder: a scratch directory whose tests/ is the repository's (the PEFT fixtures).
    workdir = os.path.join(args.out, "readme_snippets_cwd")
    os.makedirs(workdir, exist_ok=True)
    if not os.path.exists(os.path.join(workdir, "tests")):
        os.symlink(os.path.join(ROOT, "tests"), os.path.join(workdir, "tests"))
    try:
        for i, code in enumerate(blocks):
            first = title(code)
            extra = missing_extra(code)
            if extra:
                rows.append({"snippet": i, "first_line": first, "skipped": f"needs [{extra}]"})
                print(f"snippet {i}: skipped (needs the {extra} extra)", flush=True)
                continue
            row = {"snippet": i, "first_line": first}
            for name, env in settings.items():
                runs = [run_once(code, env, workdir, args.timeout) for _ in range(args.repeats)]
                row[name] = {
                    "seconds": min(t for t, _, _ in runs),
                    "ok": all(rc == 0 for _, rc, _ in runs),
                }
                if not row[name]["ok"]:
                    row[name]["stderr"] = runs[-1][2]
            row["ratio"] = row["as is"]["seconds"] / row["OPENBLAS_NUM_THREADS=1"]["seconds"]
            rows.append(row)
            print(
                f"snippet {i}: {row['as is']['seconds']:.1f} s as is, "
                f"{row['OPENBLAS_NUM_THREADS=1']['seconds']:.1f} s with OPENBLAS_NUM_THREADS=1 "
                f"(ratio {row['ratio']:.2f}), ok={all(row[k]['ok'] for k in settings)}",
                flush=True,
            )
    finally:
        for h in hogs:
            h.terminate()
    result = {
        "hog": args.hog,
        "repeats": args.repeats,
        "snippets": rows,
        "environment": environment(),
    }
    write_json(result, args.out, "readme_snippets.json")
    return result


if __name__ == "__main__":
    main()
