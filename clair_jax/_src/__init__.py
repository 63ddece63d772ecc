"""Private implementation of clair_jax; import from ``clair_jax`` instead."""
