"""clair_jax: robust federated LoRA fine-tuning in JAX.

Low-rank + block-sparse decomposition of client updates (FISTA and ADMM,
jitted, vmapped, differentiable), CLAIR, FedRot-LoRA and federated baselines.
"""

from clair_jax import data as data
from clair_jax import peft as peft
from clair_jax import simulate as simulate
from clair_jax._src import lapack_threads as _lapack_threads
from clair_jax._src.aggregators.alignment import aggregation_error as aggregation_error
from clair_jax._src.aggregators.alignment import fedrot_align as fedrot_align
from clair_jax._src.aggregators.averaging import fedit as fedit
from clair_jax._src.aggregators.averaging import fedrot as fedrot
from clair_jax._src.aggregators.averaging import ffa_lora as ffa_lora
from clair_jax._src.aggregators.averaging import flexlora as flexlora
from clair_jax._src.aggregators.averaging import local_only as local_only
from clair_jax._src.aggregators.base import AggregateResult as AggregateResult
from clair_jax._src.aggregators.base import Aggregator as Aggregator
from clair_jax._src.aggregators.clair_rule import clair_aggregator as clair_aggregator
from clair_jax._src.aggregators.factored import (
    clair_aggregator_factored as clair_aggregator_factored,
)
from clair_jax._src.aggregators.factored import flexlora_factored as flexlora_factored
from clair_jax._src.aggregators.factored import product_error_factored as product_error_factored
from clair_jax._src.aggregators.factored import with_factored_errors as with_factored_errors
from clair_jax._src.aggregators.robust import coordinate_median as coordinate_median
from clair_jax._src.aggregators.robust import geometric_median as geometric_median
from clair_jax._src.aggregators.robust import krum as krum
from clair_jax._src.aggregators.robust import multi_krum as multi_krum
from clair_jax._src.aggregators.robust import trimmed_mean as trimmed_mean
from clair_jax._src.aggregators.screening import REASONS as SCREEN_REASONS
from clair_jax._src.aggregators.screening import Screening as Screening
from clair_jax._src.aggregators.screening import screen_clients as screen_clients
from clair_jax._src.clair.base import ClairResult as ClairResult
from clair_jax._src.clair.factored import FactoredClairResult as FactoredClairResult
from clair_jax._src.clair.factored import FactoredUpdates as FactoredUpdates
from clair_jax._src.clair.factored import clair_factored as clair_factored
from clair_jax._src.clair.pipeline import clair as clair
from clair_jax._src.federated.checkpoint import CheckpointError as CheckpointError
from clair_jax._src.federated.checkpoint import save_checkpoint as save_checkpoint
from clair_jax._src.federated.round import make_round as make_round
from clair_jax._src.federated.run import run_rounds as run_rounds
from clair_jax._src.federated.run_checkpoint import load_checkpoint as load_checkpoint
from clair_jax._src.federated.sharding import client_mesh as client_mesh
from clair_jax._src.federated.sharding import client_sharding as client_sharding
from clair_jax._src.federated.sharding import make_sharded_round as make_sharded_round
from clair_jax._src.federated.sharding import replicate as replicate
from clair_jax._src.federated.sharding import shard_batch as shard_batch
from clair_jax._src.federated.sharding import shard_clients as shard_clients
from clair_jax._src.federated.state import RoundMetrics as RoundMetrics
from clair_jax._src.federated.state import ServerState as ServerState
from clair_jax._src.federated.state import describe_screening as describe_screening
from clair_jax._src.federated.state import init_server_state as init_server_state
from clair_jax._src.federated.training import Evaluation as Evaluation
from clair_jax._src.federated.training import evaluate_clients as evaluate_clients
from clair_jax._src.federated.training import local_train as local_train
from clair_jax._src.lapack_threads import lapack_threadpool_info as lapack_threadpool_info
from clair_jax._src.lapack_threads import limit_lapack_threads as limit_lapack_threads
from clair_jax._src.linalg.prox import block_soft_threshold as block_soft_threshold
from clair_jax._src.linalg.prox import blocks_to_matrix as blocks_to_matrix
from clair_jax._src.linalg.prox import matrix_to_blocks as matrix_to_blocks
from clair_jax._src.linalg.svt import singular_value_threshold as singular_value_threshold
from clair_jax._src.lora.conversion import adapters_to_lora_state as adapters_to_lora_state
from clair_jax._src.lora.conversion import apply_lora as apply_lora
from clair_jax._src.lora.conversion import lora_state_to_adapters as lora_state_to_adapters
from clair_jax._src.lora.conversion import merge_adapters as merge_adapters
from clair_jax._src.lora.conversion import merge_lora as merge_lora
from clair_jax._src.lora.conversion import split_lora as split_lora
from clair_jax._src.lora.model import LoRALinear as LoRALinear
from clair_jax._src.lora.model import LoRATransformer as LoRATransformer
from clair_jax._src.lora.model import TransformerConfig as TransformerConfig
from clair_jax._src.lora.types import LoRAFactors as LoRAFactors
from clair_jax._src.metrics import DetectionMetrics as DetectionMetrics
from clair_jax._src.metrics import detection_metrics as detection_metrics
from clair_jax._src.metrics import subspace_distance as subspace_distance
from clair_jax._src.solvers.adjoint import AbstractAdjoint as AbstractAdjoint
from clair_jax._src.solvers.adjoint import ImplicitAdjoint as ImplicitAdjoint
from clair_jax._src.solvers.adjoint import UnrolledAdjoint as UnrolledAdjoint
from clair_jax._src.solvers.admm import ADMM as ADMM
from clair_jax._src.solvers.base import AbstractDecompositionSolver as AbstractDecompositionSolver
from clair_jax._src.solvers.decompose import decompose as decompose
from clair_jax._src.solvers.decomposition import Decomposition as Decomposition
from clair_jax._src.solvers.factored import FactoredDecomposition as FactoredDecomposition
from clair_jax._src.solvers.factored import decompose_factored as decompose_factored
from clair_jax._src.solvers.fista import FISTA as FISTA
from clair_jax._src.solvers.rpca import RobustPCA as RobustPCA
from clair_jax._src.solvers.rpca import rpca as rpca
from clair_jax._version import __version__ as __version__

_lapack_threads.apply_default()  # one thread for jaxlib's CPU LAPACK (see that module)

__all__ = [
    "ADMM",
    "FISTA",
    "AbstractDecompositionSolver",
    "AbstractAdjoint",
    "ImplicitAdjoint",
    "UnrolledAdjoint",
    "clair_aggregator_factored",
    "flexlora_factored",
    "product_error_factored",
    "with_factored_errors",
    "FactoredClairResult",
    "FactoredUpdates",
    "clair_factored",
    "FactoredDecomposition",
    "decompose_factored",
    "lapack_threadpool_info",
    "limit_lapack_threads",
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
    "SCREEN_REASONS",
    "Screening",
    "screen_clients",
    "describe_screening",
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
    "Evaluation",
    "LoRALinear",
    "LoRATransformer",
    "RoundMetrics",
    "ServerState",
    "TransformerConfig",
    "adapters_to_lora_state",
    "apply_lora",
    "data",
    "peft",
    "evaluate_clients",
    "init_server_state",
    "CheckpointError",
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
