"""Federated LoRA fine-tuning of a small Transformer on the text-copying task.

Run ``python -m clair_jax.experiments.text_copy --quick`` (or ``clair-text-copy
--quick``; ``--help`` lists the flags and their defaults). From Python, the same
settings are a :class:`Config`::

    from clair_jax.experiments import text_copy
    out = text_copy.run(text_copy.Config(quick=True))
    print(text_copy.format_table(out["methods"]))

The pipeline:

1. **Base model.** A :class:`~clair_jax.LoRATransformer` is pre-trained on the
   generic task (plain copying, ``y = x``), all base parameters trained, the
   adapters left at their initial value (``A = 0``: no effect). The result is
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
   over seeds 0-4 (CLAIR is not part of the criterion). At 1e-2 local training over-fits the few
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
   to ``--out`` (default ``benchmarks/out/text_copy``).

Every random choice comes from ``--seed`` (and ``--pretrain-seed`` for the base).
"""

from clair_jax.experiments.text_copy.cli import build_parser as build_parser
from clair_jax.experiments.text_copy.cli import main as main
from clair_jax.experiments.text_copy.cli import parse_args as parse_args
from clair_jax.experiments.text_copy.config import CACHE_ENV as CACHE_ENV
from clair_jax.experiments.text_copy.config import FULL as FULL
from clair_jax.experiments.text_copy.config import KRUM_METHODS as KRUM_METHODS
from clair_jax.experiments.text_copy.config import METHODS as METHODS
from clair_jax.experiments.text_copy.config import OPTIMIZERS as OPTIMIZERS
from clair_jax.experiments.text_copy.config import QUICK as QUICK
from clair_jax.experiments.text_copy.config import Config as Config
from clair_jax.experiments.text_copy.config import byzantine_budget as byzantine_budget
from clair_jax.experiments.text_copy.config import clair_rank_kwargs as clair_rank_kwargs
from clair_jax.experiments.text_copy.config import default_cache_dir as default_cache_dir
from clair_jax.experiments.text_copy.metrics import TOKEN_KINDS as TOKEN_KINDS
from clair_jax.experiments.text_copy.metrics import accuracy_by_token as accuracy_by_token
from clair_jax.experiments.text_copy.metrics import detection as detection
from clair_jax.experiments.text_copy.metrics import token_kinds as token_kinds
from clair_jax.experiments.text_copy.pretrain import pretrain as pretrain
from clair_jax.experiments.text_copy.report import format_table as format_table
from clair_jax.experiments.text_copy.report import format_token_table as format_token_table
from clair_jax.experiments.text_copy.report import mean_round_f1 as mean_round_f1
from clair_jax.experiments.text_copy.report import write_outputs as write_outputs
from clair_jax.experiments.text_copy.rules import make_aggregator as make_aggregator
from clair_jax.experiments.text_copy.run import HISTORY_KEYS as HISTORY_KEYS
from clair_jax.experiments.text_copy.run import resume as resume
from clair_jax.experiments.text_copy.run import run as run
from clair_jax.experiments.text_copy.run import unconverged_count as unconverged_count

__all__ = [
    "CACHE_ENV",
    "FULL",
    "HISTORY_KEYS",
    "KRUM_METHODS",
    "METHODS",
    "OPTIMIZERS",
    "QUICK",
    "TOKEN_KINDS",
    "Config",
    "accuracy_by_token",
    "build_parser",
    "byzantine_budget",
    "clair_rank_kwargs",
    "default_cache_dir",
    "detection",
    "format_table",
    "format_token_table",
    "main",
    "make_aggregator",
    "mean_round_f1",
    "parse_args",
    "pretrain",
    "resume",
    "run",
    "token_kinds",
    "unconverged_count",
    "write_outputs",
]
