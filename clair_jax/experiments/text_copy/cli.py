"""The command line: ``python -m clair_jax.experiments.text_copy`` and ``clair-text-copy``."""

from __future__ import annotations

import argparse
import dataclasses

from clair_jax.experiments.text_copy.config import Config
from clair_jax.experiments.text_copy.report import format_table, format_token_table, write_outputs
from clair_jax.experiments.text_copy.run import run

PROG = "python -m clair_jax.experiments.text_copy"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, one flag per :class:`Config` field, every default in ``--help``."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Federated LoRA on the text-copying task: CLAIR against the baselines.",
    )
    for field in dataclasses.fields(Config):
        meta = field.metadata
        flag = "--" + field.name.replace("_", "-")
        shown = meta["shown"] if meta["shown"] is not None else field.default
        help_text = f"{meta['help']} (default: {shown})"
        if field.name == "progress":
            bar = parser.add_mutually_exclusive_group()
            bar.add_argument(
                flag, dest="progress", action="store_true", default=None, help=help_text
            )
            bar.add_argument("--no-progress", dest="progress", action="store_false")
        elif meta["type"] is bool:
            parser.add_argument(flag, action="store_true", help=help_text)
        else:
            parser.add_argument(
                flag,
                type=meta["type"],
                default=field.default,
                choices=meta["choices"],
                help=help_text,
            )
    return parser


def parse_args(argv=None) -> Config:
    """The resolved :class:`Config` of the command line ``argv`` (default ``sys.argv[1:]``).

    Raises:
      SystemExit: an unknown flag or a setting out of range (after a usage message).
    """
    parser = build_parser()
    config = Config(**vars(parser.parse_args(argv)))
    try:
        return config.resolved()
    except ValueError as err:
        parser.error(str(err))


def main(argv=None) -> None:
    """Runs the experiment of the command line ``argv`` (or a :class:`Config`) and reports it."""
    config = argv.resolved() if isinstance(argv, Config) else parse_args(argv)
    out = run(config)
    print()
    print(format_table(out["methods"]))
    print("\nbenign held-out accuracy by source token (re-mapped alike, per client, copied):")
    print(format_token_table(out["methods"]))
    for key, value in out["gaps"].items():
        print(f"{key.replace('_', ' ')}: {value:+.3f}")
    print(f"wall time {out['wall_seconds']:.1f} s")
    for path in write_outputs(out, config.out, config.name):
        print(f"wrote {path}")
