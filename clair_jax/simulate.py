"""Synthetic federations for CLAIR: shared-subspace updates, regression clients, contamination.

``from clair_jax import simulate`` (or ``clair_jax.simulate.<name>``). Every
function is deterministic given its ``jax.random`` key; see
:func:`shared_subspace_updates` and :func:`linear_regression` for the models.
"""

from clair_jax._src.simulation.model import KIND_NAMES as KIND_NAMES
from clair_jax._src.simulation.model import REGRESSION_KINDS as REGRESSION_KINDS
from clair_jax._src.simulation.model import UPDATE_KINDS as UPDATE_KINDS
from clair_jax._src.simulation.regression import RegressionFederation as RegressionFederation
from clair_jax._src.simulation.regression import least_squares as least_squares
from clair_jax._src.simulation.regression import linear_regression as linear_regression
from clair_jax._src.simulation.updates import UpdateFederation as Federation
from clair_jax._src.simulation.updates import shared_subspace_updates as shared_subspace_updates

__all__ = [
    "KIND_NAMES",
    "REGRESSION_KINDS",
    "UPDATE_KINDS",
    "Federation",
    "RegressionFederation",
    "least_squares",
    "linear_regression",
    "shared_subspace_updates",
]
