"""The base model: a LoRA Transformer pre-trained on plain copying, cached on disk."""

from __future__ import annotations

import hashlib
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import clair_jax as cj
from clair_jax._src import data as data_lib
from clair_jax._src.federated.training import masked_cross_entropy
from clair_jax._src.progress import ProgressBar


def pretrain(
    config: cj.TransformerConfig,
    *,
    length: int,
    steps: int,
    batch_size: int = 64,
    learning_rate: float = 3e-3,
    seed: int = 0,
    cache_dir: str | None = None,
    progress: bool | None = None,
) -> tuple[nnx.GraphDef, dict, dict, dict]:
    """A base model pre-trained on plain copying, loaded from the cache when present.

    Adam with linear warm-up and cosine decay over ``steps`` steps of
    ``batch_size`` fresh random sequences; only the base parameters are trained.

    Args:
      config: model architecture (``max_len >= 2 * length``).
      length: content tokens per sequence.
      steps: optimiser steps.
      batch_size: sequences per step.
      learning_rate: peak learning rate.
      seed: initialisation and data seed.
      cache_dir: where to read/write the cached base (``None``: no cache).
      progress: show a progress bar (``None``: on a terminal).

    Returns:
      ``(graphdef, base, adapters, info)`` with the initial adapters and a dict
      describing the run (cache file, whether it was loaded, final loss/accuracy).
    """
    if config.max_len < 2 * length:
        raise ValueError(f"config.max_len ({config.max_len}) must be >= 2 * length ({2 * length}).")
    model = cj.LoRATransformer(config, rngs=nnx.Rngs(seed))
    graphdef, base, adapters = cj.split_lora(model)
    settings = {
        "config": config._asdict(),
        "length": length,
        "steps": steps,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "seed": seed,
        "dtype": str(jax.tree.leaves(base)[0].dtype),
        "format": 1,
    }
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    path = None if cache_dir is None else os.path.join(cache_dir, f"text_copy_base_{digest}.npz")
    info = {"cache_file": path, "settings": settings}
    if path is not None and os.path.exists(path):
        info["loaded"] = True
        return graphdef, cj.load_checkpoint(path, like=base), adapters, info

    identity = jnp.arange(config.vocab_size, dtype=jnp.int32)
    warmup = max(1, min(100, steps // 10))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, warmup, max(steps, warmup + 1), learning_rate / 30
    )
    optimizer = optax.adam(schedule)

    def loss_fn(params, key):
        x, y, w = data_lib.copy_examples(key, batch_size, identity, length=length)
        logits = cj.apply_lora(graphdef, params, adapters, x)
        accuracy = jnp.sum(w * (jnp.argmax(logits, -1) == y)) / jnp.sum(w)
        return masked_cross_entropy(logits, y, w), accuracy

    @jax.jit
    def chunk(params, opt_state, keys):
        def step(carry, key):
            params, opt_state = carry
            (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, key)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), (loss, acc)

        (params, opt_state), (loss, acc) = jax.lax.scan(step, (params, opt_state), keys)
        return params, opt_state, loss, acc

    opt_state = optimizer.init(base)
    keys = jax.random.split(jax.random.fold_in(jax.random.key(seed), 1), steps)
    per_chunk = 100
    start = time.perf_counter()
    loss = acc = np.nan
    bar = ProgressBar(-(-steps // per_chunk), desc="pre-training", enabled=progress)
    with bar:
        for i in range(0, steps, per_chunk):
            base, opt_state, losses, accs = chunk(base, opt_state, keys[i : i + per_chunk])
            loss, acc = float(losses[-1]), float(accs[-1])
            bar.update(loss=loss, acc=acc)
    info.update(loaded=False, seconds=time.perf_counter() - start, loss=loss, accuracy=acc)
    if path is not None:
        cj.save_checkpoint(path, base)
    return graphdef, base, adapters, info
