"""The text-copying task and a federation of clients with contaminated members.

A sequence is ``x_1 .. x_L  SEP  y_1 .. y_L`` with ``x`` random content tokens
and ``y_t = φ(x_t)`` for a token re-mapping ``φ``; the model reads the sequence
left to right and must produce ``y`` after the separator (the loss and the
accuracy count only those ``L`` positions). The generic task that pre-trains the
base model is plain copying (``φ`` the identity).

Federated clients fine-tune on client-specific variants that share structure:

* every benign client re-maps the same ``shared_tokens`` source tokens to the
  same targets (a shared re-mapping);
* every benign client also re-maps the same ``specific_tokens`` source tokens,
  each to its own targets (client-specific parts);
* all other tokens are copied unchanged.

So the benign clients' adaptations live on a common set of source tokens (a
shared subspace of the input side of the adapted projections), with
client-specific variation inside it. Each client has few examples
(``train_examples``), so local fine-tuning alone is noisy.

A fraction of clients is contaminated (``contamination``):

* ``"random"``: wrong targets, each contaminated client re-maps every content
  token at random (its own mapping);
* ``"adversarial"``: wrong targets, all contaminated clients share one
  adversarial mapping of every content token (a coordinated data attack);
* ``"scaled"``: benign-looking data, but the client sends ``attack_scale`` times
  its update (relative to the adapter it started the round from);
* ``"sign_flip"``: benign-looking data, the update is sent with its sign flipped
  and scaled by ``attack_scale``;
* ``"coordinated"``: the adversarial mapping, and the group sends one common
  update (the mean of its members' updates) scaled by ``attack_scale``, so the
  attackers look alike (the setting that defeats distance-based rules such as
  Krum).

The update attacks are applied by the federated round
(:func:`clair_jax.make_round`) from the ``update_scale`` and
``coordinated`` fields of :class:`ClientData`. Everything is generated from a
``jax.random`` key; nothing is downloaded.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from clair_jax._src import validation

SEPARATOR = 0
"""Token id of the separator; content tokens are ``1 .. vocab_size - 1``."""

CONTAMINATIONS = ("random", "adversarial", "scaled", "sign_flip", "coordinated")


class ClientData(NamedTuple):
    """Examples of ``n`` clients, stacked on a leading client axis.

    Attributes:
      inputs: ``(n, m, t)`` int32 model inputs.
      targets: ``(n, m, t)`` int32 next tokens.
      mask: ``(n, m, t)`` loss weights (1 on the positions to predict, else 0).
      weight: ``(n,)`` aggregation weight of each client (its number of examples).
      update_scale: ``(n,)`` attack model: a client sends
        ``start + update_scale * (trained - start)``; 1 for honest clients.
      coordinated: ``(n,)`` bool, attack model: these clients all send the
        group's mean (scaled) update instead of their own.
    """

    inputs: Int[Array, "n m t"]
    targets: Int[Array, "n m t"]
    mask: Float[Array, "n m t"]
    weight: Float[Array, " n"]
    update_scale: Float[Array, " n"]
    coordinated: Bool[Array, " n"]


def client_data(inputs, targets, mask=None, *, weight=None, update_scale=None, coordinated=None):
    """Builds a :class:`ClientData`, checking shapes; honest clients by default.

    Args:
      inputs: ``(n, m, t)`` integer tokens.
      targets: ``(n, m, t)`` integer next tokens.
      mask: ``(n, m, t)`` loss weights (default: all ones).
      weight: ``(n,)`` aggregation weights (default: ``m`` for every client).
      update_scale: ``(n,)`` update multipliers (default ones).
      coordinated: ``(n,)`` bool (default all False).

    Raises:
      ValueError: shapes that do not fit together.
      TypeError: non-integer tokens.
    """
    inputs, targets = jnp.asarray(inputs), jnp.asarray(targets)
    for name, x in (("inputs", inputs), ("targets", targets)):
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise TypeError(f"{name} must hold integer tokens, got dtype {x.dtype}.")
        if x.ndim != 3:
            raise ValueError(f"{name} must have shape (clients, examples, time), got {x.shape}.")
    if targets.shape != inputs.shape:
        raise ValueError(
            f"targets {tuple(targets.shape)} must have the shape of inputs {tuple(inputs.shape)}."
        )
    n, m, _ = inputs.shape
    dtype = jnp.result_type(float)
    mask = jnp.ones(inputs.shape, dtype) if mask is None else jnp.asarray(mask, dtype)
    if mask.shape != inputs.shape:
        raise ValueError(f"mask {tuple(mask.shape)} must have the shape of inputs {inputs.shape}.")
    weight = jnp.full((n,), float(m), dtype) if weight is None else jnp.asarray(weight, dtype)
    scale = jnp.ones((n,), dtype) if update_scale is None else jnp.asarray(update_scale, dtype)
    coordinated = jnp.zeros((n,), bool) if coordinated is None else jnp.asarray(coordinated, bool)
    for name, x in (("weight", weight), ("update_scale", scale), ("coordinated", coordinated)):
        if x.shape != (n,):
            raise ValueError(f"{name} must have shape ({n},) (one per client), got {x.shape}.")
    return ClientData(
        inputs.astype(jnp.int32), targets.astype(jnp.int32), mask, weight, scale, coordinated
    )


def copy_examples(
    key: PRNGKeyArray, num: int, mapping: Int[Array, " v"], *, length: int
) -> tuple[Int[Array, "m t"], Int[Array, "m t"], Float[Array, "m t"]]:
    """``num`` sequences ``x SEP φ(x)`` as (inputs, targets, mask), ``t = 2 * length``.

    Args:
      key: ``jax.random`` key.
      num: number of sequences.
      mapping: ``(vocab_size,)`` int array, ``φ`` (``mapping[SEPARATOR]`` unused).
      length: content tokens per sequence ``L``.

    Returns:
      ``inputs`` = the sequence without its last token, ``targets`` = without its
      first, ``mask`` = 1 on the ``L`` positions that predict ``y`` (from the
      separator on).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> inputs, targets, mask = copy_examples(jax.random.key(0), 2, jnp.arange(6), length=3)
      >>> inputs.shape, bool(jnp.all(inputs[:, 3] == SEPARATOR))
      ((2, 6), True)
      >>> bool(jnp.all(targets[:, 3:] == inputs[:, :3])), mask[0].tolist()
      (True, [0.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    """
    vocab_size = mapping.shape[0]
    x = jax.random.randint(key, (num, length), 1, vocab_size, jnp.int32)
    sep = jnp.full((num, 1), SEPARATOR, jnp.int32)
    seq = jnp.concatenate([x, sep, mapping[x].astype(jnp.int32)], axis=1)
    mask = (jnp.arange(2 * length) >= length).astype(jnp.result_type(float))
    return seq[:, :-1], seq[:, 1:], jnp.broadcast_to(mask, (num, 2 * length))


class FederationConfig(NamedTuple):
    """Static description of a text-copying federation.

    Attributes:
      num_clients: ``n``.
      contaminated_fraction: fraction of contaminated clients (rounded; at least
        one client must stay benign).
      contamination: one of ``"random"``, ``"adversarial"``, ``"scaled"``,
        ``"sign_flip"``, ``"coordinated"`` (see the module docstring).
      vocab_size: tokens, the separator included.
      length: content tokens per sequence (model inputs have ``2 * length``).
      train_examples: training sequences per client (scarce on purpose).
      test_examples: held-out sequences per client.
      shared_tokens: source tokens every benign client re-maps the same way.
      specific_tokens: source tokens every benign client re-maps its own way.
      attack_scale: update multiplier of ``"scaled"``, ``"sign_flip"`` (negated)
        and ``"coordinated"`` clients.
    """

    num_clients: int = 20
    contaminated_fraction: float = 0.3
    contamination: str = "random"
    vocab_size: int = 32
    length: int = 8
    train_examples: int = 16
    test_examples: int = 64
    shared_tokens: int = 4
    specific_tokens: int = 4
    attack_scale: float = 3.0


class Federation(NamedTuple):
    """A generated federation.

    Attributes:
      train: :class:`ClientData` for local training (with the attack fields).
      test: held-out :class:`ClientData` from each client's own mapping.
      contaminated: ``(n,)`` bool, the ground truth.
      mappings: ``(n, vocab_size)`` each client's token re-mapping ``φ_i``.
      shared_sources: ``(shared_tokens,)`` tokens re-mapped alike by benign clients.
      specific_sources: ``(specific_tokens,)`` tokens re-mapped per client.
    """

    train: ClientData
    test: ClientData
    contaminated: Bool[Array, " n"]
    mappings: Int[Array, "n v"]
    shared_sources: Int[Array, " s1"]
    specific_sources: Int[Array, " s2"]


def check_federation_config(config: FederationConfig) -> FederationConfig:
    """Raises a clear ``ValueError``/``TypeError`` for an invalid configuration."""
    if not isinstance(config, FederationConfig):
        raise TypeError(f"config must be a FederationConfig, got {type(config).__name__}.")
    for name in ("num_clients", "vocab_size", "length", "train_examples", "test_examples"):
        validation.check_positive_int(getattr(config, name), f"config.{name}")
    for name in ("shared_tokens", "specific_tokens"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"config.{name} must be an int >= 0, got {value!r}.")
    validation.check_choice(config.contamination, "config.contamination", CONTAMINATIONS)
    num_contaminated(config)
    content = config.vocab_size - 1
    if content < 2 or config.shared_tokens + config.specific_tokens > content:
        raise ValueError(
            f"config.shared_tokens + config.specific_tokens "
            f"({config.shared_tokens} + {config.specific_tokens}) must not exceed the "
            f"{content} content tokens of vocab_size={config.vocab_size} (need >= 2)."
        )
    validation.check_positive_float(config.attack_scale, "config.attack_scale")
    return config


def num_contaminated(config: FederationConfig) -> int:
    """``round(contaminated_fraction * num_clients)`` (round half to even).

    Raises:
      ValueError: the fraction is outside ``[0, 1)`` or leaves no benign client.
    """
    return validation.contaminated_count(
        config.contaminated_fraction,
        config.num_clients,
        "config.contaminated_fraction",
        "config.num_clients",
    )


def _random_targets(key, shape, vocab_size):
    return jax.random.randint(key, shape, 1, vocab_size, jnp.int32)


def make_federation(key: PRNGKeyArray, config: FederationConfig) -> Federation:
    """Generates every client's mapping, training and held-out data.

    Args:
      key: ``jax.random`` key; the same key gives the same federation.
      config: :class:`FederationConfig`.

    Returns:
      A :class:`Federation`. Contaminated clients are a random subset of size
      :func:`num_contaminated`.

    Examples:
      >>> import jax
      >>> fed = make_federation(jax.random.key(0), FederationConfig(num_clients=5))
      >>> fed.train.inputs.shape, fed.test.inputs.shape, int(fed.contaminated.sum())
      ((5, 16, 16), (5, 64, 16), 2)
    """
    check_federation_config(config)
    n, v = config.num_clients, config.vocab_size
    s1, s2 = config.shared_tokens, config.specific_tokens
    keys = jax.random.split(key, 7)
    sources = 1 + jax.random.permutation(keys[0], v - 1)[: s1 + s2]
    shared_sources, specific_sources = sources[:s1], sources[s1:]
    identity = jnp.arange(v, dtype=jnp.int32)

    shared = identity.at[shared_sources].set(_random_targets(keys[1], (s1,), v))
    specific = _random_targets(keys[2], (n, s2), v)
    benign_maps = jax.vmap(lambda t: shared.at[specific_sources].set(t))(specific)

    n_bad = num_contaminated(config)
    bad = jax.random.permutation(keys[3], n)[:n_bad]
    contaminated = jnp.zeros((n,), bool).at[bad].set(True)
    kind = config.contamination
    if kind == "random":
        bad_maps = _random_targets(keys[4], (n, v), v).at[:, SEPARATOR].set(SEPARATOR)
    elif kind in ("adversarial", "coordinated"):
        adversarial = _random_targets(keys[4], (v,), v).at[SEPARATOR].set(SEPARATOR)
        bad_maps = jnp.broadcast_to(adversarial, (n, v))
    else:  # update attacks: the data look benign
        bad_maps = benign_maps
    mappings = jnp.where(contaminated[:, None], bad_maps, benign_maps)

    scale = {"scaled": config.attack_scale, "sign_flip": -config.attack_scale}
    scale = scale.get(kind, config.attack_scale if kind == "coordinated" else 1.0)
    dtype = jnp.result_type(float)
    update_scale = jnp.where(contaminated, jnp.asarray(scale, dtype), jnp.ones((n,), dtype))
    coordinated = contaminated & (kind == "coordinated")

    def examples(k, num):
        return jax.vmap(lambda kk, phi: copy_examples(kk, num, phi, length=config.length))(
            jax.random.split(k, n), mappings
        )

    train = client_data(
        *examples(keys[5], config.train_examples),
        update_scale=update_scale,
        coordinated=coordinated,
    )
    test = client_data(*examples(keys[6], config.test_examples))
    return Federation(train, test, contaminated, mappings, shared_sources, specific_sources)
