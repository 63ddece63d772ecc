"""Flower bridge: run any :class:`clair_jax.Aggregator` as a Flower strategy.

Needs the ``flower`` extra (``pip install 'clair_jax[flower]'``).
:class:`AdapterStrategy` is a Flower message-API strategy (start it in a
``ServerApp``); :func:`adapters_to_arrays` and :func:`arrays_to_adapters`
convert adapters to and from Flower's ``ArrayRecord``. A runnable example app
(text copying, 8 clients of which 2 contaminated) is in
:mod:`clair_jax.flower.example`.
"""

from clair_jax.flower.serialization import adapters_to_arrays as adapters_to_arrays
from clair_jax.flower.serialization import arrays_to_adapters as arrays_to_adapters
from clair_jax.flower.strategy import AdapterStrategy as AdapterStrategy

__all__ = ["AdapterStrategy", "adapters_to_arrays", "arrays_to_adapters"]
