"""Root pytest configuration, loaded before any test module imports NumPy or JAX.

One OpenBLAS thread: on small CPU machines OpenBLAS's spinning worker threads
compete with XLA's thread pool and made JAX's CPU SVD 20-300x slower in our
measurements (2 cores). Users can still override it from the environment.
"""

import importlib.util
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# clair_jax.flower needs the optional `flower` extra (flwr); without it its modules are left
# out of the doctest collection (tests/test_flower.py skips itself).
collect_ignore_glob = [] if importlib.util.find_spec("flwr") else ["clair_jax/flower/*"]
