"""clair_jax: robust federated LoRA fine-tuning in JAX.

Low-rank + block-sparse decomposition of client updates (FISTA and ADMM,
jitted, vmapped, differentiable), CLAIR, FedRot-LoRA and federated baselines.
"""

from clair_jax import simulate as simulate
from clair_jax._src.aggregators import AggregateResult as AggregateResult
from clair_jax._src.aggregators import Aggregator as Aggregator
from clair_jax._src.aggregators import LoRAFactors as LoRAFactors
from clair_jax._src.aggregators import clair_aggregator as clair_aggregator
from clair_jax._src.aggregators import coordinate_median as coordinate_median
from clair_jax._src.aggregators import fedit as fedit
from clair_jax._src.aggregators import fedrot as fedrot
from clair_jax._src.aggregators import ffa_lora as ffa_lora
from clair_jax._src.aggregators import flexlora as flexlora
from clair_jax._src.aggregators import geometric_median as geometric_median
from clair_jax._src.aggregators import krum as krum
from clair_jax._src.aggregators import local_only as local_only
from clair_jax._src.aggregators import multi_krum as multi_krum
from clair_jax._src.aggregators import trimmed_mean as trimmed_mean
from clair_jax._src.clair import ClairResult as ClairResult
from clair_jax._src.clair import clair as clair
from clair_jax._src.decompose import Decomposition as Decomposition
from clair_jax._src.decompose import decompose as decompose
from clair_jax._src.fedrot import aggregation_error as aggregation_error
from clair_jax._src.fedrot import fedrot_align as fedrot_align
from clair_jax._src.metrics import DetectionMetrics as DetectionMetrics
from clair_jax._src.metrics import detection_metrics as detection_metrics
from clair_jax._src.metrics import subspace_distance as subspace_distance
from clair_jax._src.prox import block_soft_threshold as block_soft_threshold
from clair_jax._src.prox import blocks_to_matrix as blocks_to_matrix
from clair_jax._src.prox import matrix_to_blocks as matrix_to_blocks
from clair_jax._src.rpca import RobustPCA as RobustPCA
from clair_jax._src.rpca import rpca as rpca
from clair_jax._src.svd import singular_value_threshold as singular_value_threshold

__version__ = "0.1.0"

__all__ = [
    "AggregateResult",
    "Aggregator",
    "LoRAFactors",
    "aggregation_error",
    "clair_aggregator",
    "coordinate_median",
    "fedit",
    "fedrot",
    "fedrot_align",
    "ffa_lora",
    "flexlora",
    "geometric_median",
    "krum",
    "local_only",
    "multi_krum",
    "trimmed_mean",
    "Decomposition",
    "block_soft_threshold",
    "blocks_to_matrix",
    "decompose",
    "RobustPCA",
    "matrix_to_blocks",
    "rpca",
    "singular_value_threshold",
    "ClairResult",
    "DetectionMetrics",
    "clair",
    "detection_metrics",
    "simulate",
    "subspace_distance",
]
