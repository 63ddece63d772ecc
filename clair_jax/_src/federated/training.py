"""Local training of a client's adapter, the loss, and evaluation."""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jaxtyping import Array, Float, Int, PRNGKeyArray

from clair_jax._src import validation
from clair_jax._src.data import ClientData
from clair_jax._src.lora import conversion as lora
from clair_jax._src.lora.types import Adapters, LoRAFactors


class Evaluation(NamedTuple):
    """Per-client held-out metrics over the masked positions.

    Attributes:
      accuracy: ``(n,)`` token accuracy (argmax of the logits).
      loss: ``(n,)`` mean cross-entropy.
    """

    accuracy: Float[Array, " n"]
    loss: Float[Array, " n"]


def masked_cross_entropy(
    logits: Float[Array, "... t v"],
    targets: Int[Array, "... t"],
    mask: Float[Array, "... t"],
    *,
    strict: bool = True,
) -> Float[Array, ""]:
    """``Σ mask * CE(logits, targets) / Σ mask`` (0 when the mask is empty).

    Targets where ``mask`` is 0 are ignored (they may hold any padding value).

    Args:
      logits: ``(..., t, vocab)`` logits.
      targets: ``(..., t)`` int targets, in ``[0, vocab)`` where ``mask != 0``.
      mask: ``(..., t)`` non-negative weights.
      strict: raise on a target out of range; with False the loss (and so every
        gradient) is NaN instead, which is what a federated round wants: the
        client's non-finite update is screened out and the round goes on.

    Returns:
      The weighted mean cross-entropy, a scalar.

    Raises:
      ValueError: with ``strict``, a target outside ``[0, vocab)`` where
        ``mask != 0`` (traced: a runtime error rather than a NaN loss).
    """
    vocab = logits.shape[-1]
    targets = jnp.where(mask != 0, targets, 0)
    if strict:
        targets = validation.check_indices(targets, vocab, "targets (where mask != 0)")
        poison = 1.0
    else:
        bad = (targets < 0) | (targets >= vocab)
        poison = jnp.where(jnp.any(bad), jnp.nan, 1.0)  # a product: NaN reaches the gradients
        targets = jnp.where(bad, 0, targets)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return weighted_mean(ce, mask) * poison


def weighted_mean(values: Array, weights: Array) -> Array:
    """``Σ w v / Σ w``, and 0 when ``Σ w = 0`` (weights of any positive total, not only 0/1)."""
    total = jnp.sum(weights)
    nonempty = total > 0
    return jnp.where(nonempty, jnp.sum(weights * values) / jnp.where(nonempty, total, 1), 0)


def partition_adapters(adapters: Adapters, frozen_factor: str | None):
    """``(trainable, fixed)`` parts of the adapters; ``fixed`` is None without a frozen factor.

    Args:
      adapters: ``{module: LoRAFactors(B, A)}``.
      frozen_factor: ``"A"``, ``"B"`` or None.

    Returns:
      ``({module: trainable factor}, {module: frozen factor})``, or
      ``(adapters, None)`` when nothing is frozen.
    """
    if frozen_factor is None:
        return adapters, None
    if frozen_factor == "A":
        return {k: f.B for k, f in adapters.items()}, {k: f.A for k, f in adapters.items()}
    return {k: f.A for k, f in adapters.items()}, {k: f.B for k, f in adapters.items()}


def combine_adapters(trainable, fixed, frozen_factor: str | None) -> Adapters:
    """Inverse of :func:`partition_adapters`."""
    if frozen_factor is None:
        return trainable
    if frozen_factor == "A":
        return {k: LoRAFactors(B=trainable[k], A=fixed[k]) for k in trainable}
    return {k: LoRAFactors(B=fixed[k], A=trainable[k]) for k in trainable}


def check_train_args(
    steps, batch_size, frozen_factor, *, steps_name="steps", factor_name="frozen_factor"
) -> tuple[int, int]:
    """Checks the local-training settings; returns ``(steps, batch_size)`` as ints.

    Raises:
      ValueError: ``steps`` or ``batch_size`` not a positive int, or
        ``frozen_factor`` not None, ``"A"`` or ``"B"``.
    """
    steps = validation.check_positive_int(steps, steps_name)
    batch_size = validation.check_positive_int(batch_size, "batch_size")
    if frozen_factor not in (None, "A", "B"):
        raise ValueError(f"{factor_name} must be None, 'A' or 'B', got {frozen_factor!r}.")
    return steps, batch_size


def local_train(
    graphdef: nnx.GraphDef,
    base: Mapping,
    adapters: Adapters,
    inputs: Int[Array, "m t"],
    targets: Int[Array, "m t"],
    mask: Float[Array, "m t"],
    key: PRNGKeyArray,
    *,
    optimizer: optax.GradientTransformation,
    steps: int,
    batch_size: int,
    frozen_factor: str | None = None,
    strict: bool = True,
) -> tuple[Adapters, Float[Array, " s"]]:
    """One client's local fine-tuning of its adapters (base frozen), a pure function.

    ``steps`` optimiser steps, each on ``batch_size`` of the client's ``m``
    examples drawn without replacement from ``key`` (all of them when
    ``batch_size >= m``), minimising :func:`masked_cross_entropy`. The optimiser
    state starts fresh. Gradients reach only the adapter factors; the factor
    named ``frozen_factor`` stays fixed.

    Args:
      graphdef: the model's static part.
      base: frozen base parameters.
      adapters: the client's unstacked adapters.
      inputs: ``(m, t)`` int tokens.
      targets: ``(m, t)`` int targets.
      mask: ``(m, t)`` loss weights.
      key: ``jax.random`` key of the minibatches.
      optimizer: an ``optax`` transformation.
      steps: optimiser steps.
      batch_size: examples per step.
      frozen_factor: ``"A"``, ``"B"`` or None.
      strict: raise on an out-of-range token or target; with False such a
        client's loss, and so its trained adapter, is NaN (see
        :func:`masked_cross_entropy`; :func:`clair_jax.make_round` uses False,
        and screens the client out). Without ``strict`` input tokens are checked
        against the logits' size (a language model's vocabulary).

    Returns:
      The trained adapters and the ``(steps,)`` minibatch losses (before each step).

    Raises:
      ValueError: ``steps`` or ``batch_size`` not a positive int, ``frozen_factor``
        not ``None``, ``"A"`` or ``"B"``, or ``inputs``/``targets``/``mask`` not
        of one ``(m, t)`` shape.
    """
    steps, batch_size = check_train_args(steps, batch_size, frozen_factor)
    if inputs.ndim != 2 or targets.shape != inputs.shape or mask.shape != inputs.shape:
        raise ValueError(
            f"inputs, targets and mask must have one shape (examples, time), got inputs "
            f"{tuple(inputs.shape)}, targets {tuple(targets.shape)}, mask {tuple(mask.shape)}."
        )
    m = inputs.shape[0]
    trainable, fixed = partition_adapters(adapters, frozen_factor)
    opt_state = optimizer.init(trainable)
    poison = 1.0
    if not strict:  # out-of-vocabulary tokens: a NaN loss (screened out), not an error
        vocab = jax.eval_shape(
            lambda: lora.apply_lora(graphdef, base, adapters, jnp.zeros_like(inputs[:1]))
        ).shape[-1]
        bad = (inputs < 0) | (inputs >= vocab)
        poison = jnp.where(jnp.any(bad), jnp.nan, 1.0)
        inputs = jnp.where(bad, 0, inputs)

    def loss_fn(params, batch):
        x, y, w = batch
        logits = lora.apply_lora(graphdef, base, combine_adapters(params, fixed, frozen_factor), x)
        return masked_cross_entropy(logits, y, w, strict=strict) * poison

    def step(carry, step_key):
        params, opt_state = carry
        if batch_size >= m:
            batch = (inputs, targets, mask)
        else:
            idx = jax.random.choice(step_key, m, (batch_size,), replace=False)
            batch = (inputs[idx], targets[idx], mask[idx])
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    (trainable, _), losses = jax.lax.scan(
        step, (trainable, opt_state), jax.random.split(key, steps)
    )
    return combine_adapters(trainable, fixed, frozen_factor), losses


def evaluate_clients(
    graphdef: nnx.GraphDef, base: Mapping, adapters: Adapters, data: ClientData
) -> Evaluation:
    """Held-out accuracy and loss of each client's adapter on its own data (vmapped).

    Args:
      graphdef: the model's static part.
      base: frozen base parameters.
      adapters: ``(n, ...)`` stacked adapters, one per client.
      data: :class:`ClientData` with ``n`` clients.

    Returns:
      An :class:`Evaluation` of ``(n,)`` accuracies and losses.
    """

    def one(adapters_i, x, y, w):
        logits = lora.apply_lora(graphdef, base, adapters_i, x)
        correct = (jnp.argmax(logits, axis=-1) == y).astype(w.dtype)
        accuracy = weighted_mean(correct, w)
        return accuracy, masked_cross_entropy(logits, y, w)

    accuracy, loss = jax.vmap(one)(adapters, data.inputs, data.targets, data.mask)
    return Evaluation(accuracy, loss)
