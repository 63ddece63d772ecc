"""Experiments: ``python -m clair_jax.experiments.text_copy`` (``--help`` for the flags)."""
