"""PEFT LoRA adapters: read client adapter directories, aggregate, write them back.

The factors keep PEFT's names and orientation: ``B`` is ``lora_B`` (``out x r``),
``A`` is ``lora_A`` (``r x in``), unscaled; ``config.scale(module) · B @ A`` is
PEFT's weight delta (:func:`delta_weights`). Needs the ``peft`` extra
(``safetensors``); PyTorch and PEFT are not needed.

Examples:
  >>> import jax
  >>> import clair_jax as cj
  >>> from clair_jax import peft
  >>> dirs = [f"tests/fixtures/peft/llama/client_{i}" for i in range(3)]
  >>> clients, config = peft.read_clients(dirs)          # (3, out, r), (3, r, in)
  >>> clients["model.layers.0.self_attn.q_proj"].B.shape
  (3, 16, 4)
  >>> start = jax.tree.map(lambda x: x.mean(0), clients)  # the adapter the round started from
  >>> res = cj.flexlora().aggregate(clients, start, None, 0, jax.random.key(0))
  >>> import os, tempfile
  >>> out = os.path.join(tempfile.mkdtemp(), "global")
  >>> peft.write_adapter(out, res.global_, config)        # PeftModel.from_pretrained loads it
  >>> sorted(os.listdir(out))
  ['adapter_config.json', 'adapter_model.safetensors']
"""

from clair_jax._src.lora.peft_config import PeftAdapterConfig as PeftAdapterConfig
from clair_jax._src.lora.peft_io import delta_weights as delta_weights
from clair_jax._src.lora.peft_io import read_adapter as read_adapter
from clair_jax._src.lora.peft_io import read_clients as read_clients
from clair_jax._src.lora.peft_io import read_config as read_config
from clair_jax._src.lora.peft_io import write_adapter as write_adapter
from clair_jax._src.lora.peft_io import write_clients as write_clients

__all__ = [
    "PeftAdapterConfig",
    "delta_weights",
    "read_adapter",
    "read_clients",
    "read_config",
    "write_adapter",
    "write_clients",
]
