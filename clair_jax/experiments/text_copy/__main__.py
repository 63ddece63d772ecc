"""``python -m clair_jax.experiments.text_copy``."""

from clair_jax.experiments.text_copy.cli import main

if __name__ == "__main__":
    main()
