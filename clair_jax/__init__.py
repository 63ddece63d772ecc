"""clair_jax: robust federated LoRA fine-tuning in JAX.

Low-rank + block-sparse decomposition of client updates (FISTA and ADMM,
jitted, vmapped, differentiable), CLAIR, FedRot-LoRA and federated baselines.
"""

from clair_jax import data as data
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
from clair_jax._src.factored_aggregators import (
    clair_aggregator_factored as clair_aggregator_factored,
)
from clair_jax._src.factored_aggregators import flexlora_factored as flexlora_factored
from clair_jax._src.factored_aggregators import product_error_factored as product_error_factored
from clair_jax._src.factored_aggregators import with_factored_errors as with_factored_errors
from clair_jax._src.factored_clair import FactoredClairResult as FactoredClairResult
from clair_jax._src.factored_clair import FactoredUpdates as FactoredUpdates
from clair_jax._src.factored_clair import clair_factored as clair_factored
from clair_jax._src.factored_decompose import FactoredDecomposition as FactoredDecomposition
from clair_jax._src.factored_decompose import decompose_factored as decompose_factored
from clair_jax._src.federated import Evaluation as Evaluation
from clair_jax._src.federated import RoundMetrics as RoundMetrics
from clair_jax._src.federated import ServerState as ServerState
from clair_jax._src.federated import evaluate_clients as evaluate_clients
from clair_jax._src.federated import init_server_state as init_server_state
from clair_jax._src.federated import load_checkpoint as load_checkpoint
from clair_jax._src.federated import local_train as local_train
from clair_jax._src.federated import make_round as make_round
from clair_jax._src.federated import run_rounds as run_rounds
from clair_jax._src.federated import save_checkpoint as save_checkpoint
from clair_jax._src.fedrot import aggregation_error as aggregation_error
from clair_jax._src.fedrot import fedrot_align as fedrot_align
from clair_jax._src.lora import LoRALinear as LoRALinear
from clair_jax._src.lora import LoRATransformer as LoRATransformer
from clair_jax._src.lora import TransformerConfig as TransformerConfig
from clair_jax._src.lora import adapters_to_lora_state as adapters_to_lora_state
from clair_jax._src.lora import apply_lora as apply_lora
from clair_jax._src.lora import lora_state_to_adapters as lora_state_to_adapters
from clair_jax._src.lora import merge_adapters as merge_adapters
from clair_jax._src.lora import merge_lora as merge_lora
from clair_jax._src.lora import split_lora as split_lora
from clair_jax._src.metrics import DetectionMetrics as DetectionMetrics
from clair_jax._src.metrics import detection_metrics as detection_metrics
from clair_jax._src.metrics import subspace_distance as subspace_distance
from clair_jax._src.prox import block_soft_threshold as block_soft_threshold
from clair_jax._src.prox import blocks_to_matrix as blocks_to_matrix
from clair_jax._src.prox import matrix_to_blocks as matrix_to_blocks
from clair_jax._src.rpca import RobustPCA as RobustPCA
from clair_jax._src.rpca import rpca as rpca
from clair_jax._src.sharding import client_mesh as client_mesh
from clair_jax._src.sharding import client_sharding as client_sharding
from clair_jax._src.sharding import make_sharded_round as make_sharded_round
from clair_jax._src.sharding import replicate as replicate
from clair_jax._src.sharding import shard_batch as shard_batch
from clair_jax._src.sharding import shard_clients as shard_clients
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
    "flexlora_factored",
    "with_factored_errors",
    "product_error_factored",
    "clair_aggregator_factored",
    "geometric_median",
    "krum",
    "local_only",
    "multi_krum",
    "trimmed_mean",
    "Decomposition",
    "block_soft_threshold",
    "blocks_to_matrix",
    "decompose",
    "decompose_factored",
    "FactoredDecomposition",
    "RobustPCA",
    "matrix_to_blocks",
    "rpca",
    "singular_value_threshold",
    "ClairResult",
    "DetectionMetrics",
    "clair",
    "clair_factored",
    "FactoredClairResult",
    "FactoredUpdates",
    "detection_metrics",
    "simulate",
    "subspace_distance",
    "Evaluation",
    "LoRALinear",
    "LoRATransformer",
    "RoundMetrics",
    "ServerState",
    "TransformerConfig",
    "adapters_to_lora_state",
    "apply_lora",
    "data",
    "evaluate_clients",
    "init_server_state",
    "load_checkpoint",
    "local_train",
    "lora_state_to_adapters",
    "make_round",
    "merge_adapters",
    "merge_lora",
    "run_rounds",
    "save_checkpoint",
    "split_lora",
    "client_mesh",
    "client_sharding",
    "make_sharded_round",
    "replicate",
    "shard_batch",
    "shard_clients",
]
