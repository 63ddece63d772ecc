"""clair_jax: robust federated LoRA fine-tuning in JAX.

Low-rank + block-sparse decomposition of client updates (FISTA and ADMM,
jitted, vmapped, differentiable), CLAIR, FedRot-LoRA and federated baselines.
"""

from clair_jax._src.decompose import Decomposition as Decomposition
from clair_jax._src.decompose import decompose as decompose
from clair_jax._src.prox import block_soft_threshold as block_soft_threshold
from clair_jax._src.prox import blocks_to_matrix as blocks_to_matrix
from clair_jax._src.prox import matrix_to_blocks as matrix_to_blocks
from clair_jax._src.svd import singular_value_threshold as singular_value_threshold

__version__ = "0.1.0"

__all__ = [
    "Decomposition",
    "block_soft_threshold",
    "blocks_to_matrix",
    "decompose",
    "matrix_to_blocks",
    "singular_value_threshold",
]
