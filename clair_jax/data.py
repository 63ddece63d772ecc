"""The text-copying task and federations of (partly contaminated) clients.

See ``clair_jax._src.data`` for the task; ``python -m clair_jax.experiments.text_copy``
runs the federated experiment on it.
"""

from clair_jax._src.data import CONTAMINATIONS as CONTAMINATIONS
from clair_jax._src.data import SEPARATOR as SEPARATOR
from clair_jax._src.data import ClientData as ClientData
from clair_jax._src.data import Federation as Federation
from clair_jax._src.data import FederationConfig as FederationConfig
from clair_jax._src.data import client_data as client_data
from clair_jax._src.data import copy_examples as copy_examples
from clair_jax._src.data import make_federation as make_federation
from clair_jax._src.data import num_contaminated as num_contaminated

__all__ = [
    "CONTAMINATIONS",
    "SEPARATOR",
    "ClientData",
    "Federation",
    "FederationConfig",
    "client_data",
    "copy_examples",
    "make_federation",
    "num_contaminated",
]
