"""A small decoder-only Transformer whose projections carry LoRA adapters (Flax NNX).

Every adapted projection is a :class:`LoRALinear`: a frozen base kernel ``W``
``(in, out)`` and bias, plus two :class:`flax.nnx.LoRAParam` factors, so that

.. math::

    y = x W + b + \\frac{\\alpha}{r}\\, (x\\, \\mathrm{lora\\_a})\\, \\mathrm{lora\\_b},
    \\qquad \\mathrm{lora\\_a} \\in \\mathbb{R}^{in \\times r},\\;
    \\mathrm{lora\\_b} \\in \\mathbb{R}^{r \\times out}.

Because the factors have their own variable type, ``nnx.split(model,
nnx.LoRAParam, ...)`` separates exactly what a federated client trains and
sends from the frozen base. The federated code works on pure pytrees:
:func:`split_lora` returns a static ``graphdef``, the base parameters as a pure
nested dict, and the adapters as an ``Adapters`` dict (module name ->
``LoRAFactors(B, A)``) in PEFT's orientation, by transposes: ``A = lora_a.T``
``(r, q = in)`` is PEFT's ``lora_A``, ``B = lora_b.T`` ``(p = out, r)`` its
``lora_B``; the ``out x in`` weight update of a module is ``(α / r) B A``
(``α / √r`` with rsLoRA), the transpose of ``(α / r) lora_a lora_b``.

Initialisation follows LoRA (Hu et al. 2021) and PEFT: the down-projection
``lora_a`` (``A``, PEFT's ``lora_A``) is random, Kaiming-uniform with
``a = √5`` as ``torch.nn.Linear`` and PEFT draw it, i.e. ``U(-1/√in, 1/√in)``;
the up-projection ``lora_b`` (``B``, PEFT's ``lora_B``) starts at zero, so the
adapted model starts equal to the base. FFA-LoRA (Sun et al. 2024) freezes the
random down-projection ``A`` and trains ``B`` only.

References:
  Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models",
  https://arxiv.org/abs/2106.09685.
  Sun et al., "Improving LoRA in Privacy-preserving Federated Learning",
  https://arxiv.org/abs/2403.12313.
  Kalajdzievski, "A Rank Stabilization Scaling Factor for Fine-Tuning with
  LoRA" (rsLoRA), https://arxiv.org/abs/2312.03732.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from clair_jax._src import validation

#: Projections that can carry adapters.
LORA_TARGETS = ("query", "key", "value", "out", "mlp_in", "mlp_out", "head")
#: Projections adapted by default (every one but the output head).
DEFAULT_TARGETS = ("query", "key", "value", "out", "mlp_in", "mlp_out")


class TransformerConfig(NamedTuple):
    """Architecture of :class:`LoRATransformer` (static, hashable).

    Attributes:
      vocab_size: number of tokens.
      max_len: longest input sequence (size of the learned position table).
      num_layers: Transformer blocks.
      width: model width ``d``.
      num_heads: attention heads (must divide ``width``).
      mlp_width: hidden width of each block's MLP.
      lora_rank: rank ``r`` of every adapter.
      lora_alpha: adapter scale numerator: the update is ``(alpha / r) B A``.
      lora_targets: which projections carry adapters, a subset of
        ``("query", "key", "value", "out", "mlp_in", "mlp_out", "head")``.
      use_rslora: scale by ``alpha / sqrt(r)`` (rsLoRA) instead of ``alpha / r``.
    """

    vocab_size: int = 32
    max_len: int = 32
    num_layers: int = 2
    width: int = 64
    num_heads: int = 4
    mlp_width: int = 128
    lora_rank: int = 4
    lora_alpha: float = 8.0
    lora_targets: tuple[str, ...] = DEFAULT_TARGETS
    use_rslora: bool = False

    @property
    def lora_scale(self) -> float:
        """``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA), the factor multiplying ``B A``."""
        return lora_scale(self.lora_alpha, self.lora_rank, use_rslora=self.use_rslora)


def lora_scale(alpha: float, rank: int, *, use_rslora: bool = False) -> float:
    """The adapter scale: ``alpha / rank``, or ``alpha / sqrt(rank)`` with rsLoRA.

    Args:
      alpha: the scale numerator.
      rank: the adapter rank ``r >= 1``.
      use_rslora: use rsLoRA's ``alpha / sqrt(r)`` (Kalajdzievski 2023).

    Returns:
      The scale as a Python float.
    """
    return float(alpha) / (math.sqrt(rank) if use_rslora else rank)


def check_config(config: TransformerConfig) -> TransformerConfig:
    """Checks a :class:`TransformerConfig`.

    Args:
      config: the configuration.

    Returns:
      The configuration with ``lora_targets`` as a tuple, so that it (and a
      model's ``graphdef``) stays hashable.

    Raises:
      ValueError: non-positive sizes or rank, ``num_heads`` not dividing
        ``width``, a non-finite or non-positive ``lora_alpha``, unknown or no
        ``lora_targets``.
      TypeError: not a :class:`TransformerConfig`, a non-int ``lora_rank``, a
        non-real ``lora_alpha``, a non-bool ``use_rslora``.
    """
    if not isinstance(config, TransformerConfig):
        raise TypeError(f"config must be a TransformerConfig, got {type(config).__name__}.")
    for name in ("vocab_size", "max_len", "num_layers", "width", "num_heads", "mlp_width"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"config.{name} must be an int >= 1, got {value!r}.")
    if isinstance(config.lora_rank, bool) or not isinstance(config.lora_rank, int):
        raise TypeError(f"config.lora_rank must be an int, got {config.lora_rank!r}.")
    if config.lora_rank < 1:
        raise ValueError(f"config.lora_rank must be >= 1, got {config.lora_rank}.")
    try:
        if isinstance(config.lora_alpha, (bool, str, bytes)):
            raise TypeError
        alpha = float(config.lora_alpha)  # ints, floats, NumPy and JAX scalars
    except (TypeError, ValueError):
        raise TypeError(
            f"config.lora_alpha must be a real number, got {config.lora_alpha!r}."
        ) from None
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"config.lora_alpha must be finite and > 0, got {config.lora_alpha!r}.")
    if not isinstance(config.use_rslora, bool):
        raise TypeError(f"config.use_rslora must be a bool, got {config.use_rslora!r}.")
    if config.width % config.num_heads:
        raise ValueError(
            f"config.num_heads ({config.num_heads}) must divide config.width ({config.width})."
        )
    targets = tuple(config.lora_targets)
    unknown = sorted(set(targets) - set(LORA_TARGETS))
    if unknown or not targets:
        raise ValueError(
            f"config.lora_targets must be a non-empty subset of {LORA_TARGETS}, got {targets!r}."
        )
    return config._replace(lora_targets=targets)


class LoRALinear(nnx.Module):
    """A dense layer ``x W + b`` with an optional LoRA adapter ``(α/r) x lora_a lora_b``.

    ``W`` and ``b`` are ``nnx.Param`` (frozen during federated fine-tuning);
    the down-projection ``lora_a`` (``(in, r)``, Kaiming-uniform
    ``U(-1/√in, 1/√in)`` as PEFT's ``lora_A``; the adapters' ``A = lora_a.T``)
    and the up-projection ``lora_b`` (``(r, out)``, zeros as PEFT's ``lora_B``;
    ``B = lora_b.T``) are ``nnx.LoRAParam``, so
    the adapter starts with a zero update. With ``lora_rank=0`` the layer has no
    adapter.

    Args:
      in_features: input width (``q`` of the adapters' ``B A``).
      out_features: output width (``p`` of the adapters' ``B A``).
      lora_rank: adapter rank ``r`` (0: no adapter).
      lora_alpha: the update is scaled by ``lora_alpha / lora_rank``.
      use_rslora: scale by ``lora_alpha / sqrt(lora_rank)`` instead (rsLoRA).
      param_dtype: storage dtype of all parameters.
      rngs: ``nnx.Rngs`` used for the initial values.

    Examples:
      >>> from flax import nnx
      >>> import jax.numpy as jnp
      >>> layer = LoRALinear(3, 2, lora_rank=1, lora_alpha=1.0, rngs=nnx.Rngs(0))
      >>> layer.lora_a.shape, layer.lora_b.shape
      ((3, 1), (1, 2))
      >>> layer(jnp.ones((5, 3))).shape
      (5, 2)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        lora_rank: int,
        lora_alpha: float,
        use_rslora: bool = False,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.in_features = in_features
        self.out_features = out_features
        self.lora_rank = lora_rank
        kernel_init = nnx.initializers.lecun_normal()
        shape = (in_features, out_features)
        self.kernel = nnx.Param(kernel_init(rngs.params(), shape, param_dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype))
        if lora_rank > 0:
            self.scale = lora_scale(lora_alpha, lora_rank, use_rslora=use_rslora)
            # PEFT: kaiming_uniform_(lora_A.weight, a=sqrt(5)) on a (r, in) weight,
            # i.e. gain sqrt(2 / (1 + a^2)) * sqrt(3 / in) = 1 / sqrt(in).
            bound = in_features**-0.5
            shape = (in_features, lora_rank)
            down = jax.random.uniform(rngs.params(), shape, param_dtype, -bound, bound)
            self.lora_a = nnx.LoRAParam(down)
            self.lora_b = nnx.LoRAParam(jnp.zeros((lora_rank, out_features), param_dtype))

    def __call__(self, x: Float[Array, "... in"]) -> Float[Array, "... out"]:
        y = x @ self.kernel[...]
        y = y + self.bias[...].reshape((1,) * (y.ndim - 1) + (-1,))
        if self.lora_rank > 0:
            y = y + self.scale * ((x @ self.lora_a[...]) @ self.lora_b[...])
        return y


def projection(
    config: TransformerConfig, name: str, p: int, q: int, *, param_dtype: Any, rngs: nnx.Rngs
) -> LoRALinear:
    """The ``p -> q`` projection ``name``, with the config's adapter if it is a LoRA target."""
    return LoRALinear(
        p,
        q,
        lora_rank=config.lora_rank if name in config.lora_targets else 0,
        lora_alpha=config.lora_alpha,
        use_rslora=config.use_rslora,
        param_dtype=param_dtype,
        rngs=rngs,
    )


class CausalSelfAttention(nnx.Module):
    """Multi-head causal self-attention with LoRA-capable projections."""

    def __init__(self, config: TransformerConfig, *, param_dtype: Any, rngs: nnx.Rngs):
        d = config.width
        self.num_heads = config.num_heads

        self.query, self.key, self.value, self.out = (
            projection(config, name, d, d, param_dtype=param_dtype, rngs=rngs)
            for name in ("query", "key", "value", "out")
        )

    def __call__(self, x: Float[Array, "b t d"]) -> Float[Array, "b t d"]:
        b, t, d = x.shape
        h = self.num_heads

        def heads(y):
            return y.reshape(b, t, h, d // h)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        scores = jnp.einsum("bshd,bthd->bhst", q, k) / jnp.sqrt(jnp.asarray(d // h, x.dtype))
        causal = jnp.tril(jnp.ones((t, t), bool))
        scores = jnp.where(causal[None, None], scores, jnp.finfo(scores.dtype).min)
        weights = jax.nn.softmax(scores, axis=-1)
        return self.out(jnp.einsum("bhst,bthd->bshd", weights, v).reshape(b, t, d))


class Block(nnx.Module):
    """Pre-norm Transformer block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))``."""

    def __init__(self, config: TransformerConfig, *, param_dtype: Any, rngs: nnx.Rngs):
        d = config.width

        def dense(name, p, q):
            return projection(config, name, p, q, param_dtype=param_dtype, rngs=rngs)

        self.ln1 = nnx.LayerNorm(d, param_dtype=param_dtype, rngs=rngs)
        self.attn = CausalSelfAttention(config, param_dtype=param_dtype, rngs=rngs)
        self.ln2 = nnx.LayerNorm(d, param_dtype=param_dtype, rngs=rngs)
        self.mlp_in = dense("mlp_in", d, config.mlp_width)
        self.mlp_out = dense("mlp_out", config.mlp_width, d)

    def __call__(self, x: Float[Array, "b t d"]) -> Float[Array, "b t d"]:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp_out(jax.nn.gelu(self.mlp_in(self.ln2(x))))


class LoRATransformer(nnx.Module):
    """Decoder-only Transformer with LoRA adapters on the chosen projections.

    Token and learned position embeddings, ``num_layers`` pre-norm blocks
    (causal multi-head attention with ``query``/``key``/``value``/``out``
    projections and a GELU MLP ``mlp_in``/``mlp_out``), a final LayerNorm and
    an output projection ``head``. Projections named in
    ``config.lora_targets`` carry ``nnx.LoRAParam`` adapters.

    Args:
      config: the architecture (:class:`TransformerConfig`).
      param_dtype: storage dtype of the parameters (computations follow it).
      rngs: ``nnx.Rngs`` for the initial values.

    Examples:
      >>> from flax import nnx
      >>> import jax.numpy as jnp
      >>> config = TransformerConfig(vocab_size=8, max_len=6, width=16, num_heads=2,
      ...                            mlp_width=32, lora_rank=2)
      >>> model = LoRATransformer(config, rngs=nnx.Rngs(0))
      >>> model(jnp.zeros((3, 6), jnp.int32)).shape
      (3, 6, 8)
      >>> from clair_jax import split_lora
      >>> graphdef, base, adapters = split_lora(model)
      >>> sorted(adapters)[:2]
      ['blocks/0/attn/key', 'blocks/0/attn/out']
      >>> adapters["blocks/0/mlp_in"].B.shape, adapters["blocks/0/mlp_in"].A.shape
      ((32, 2), (2, 16))
    """

    def __init__(
        self, config: TransformerConfig, *, param_dtype: Any = jnp.float32, rngs: nnx.Rngs
    ):
        config = check_config(config)
        self.config = config
        self.embed = nnx.Embed(config.vocab_size, config.width, param_dtype=param_dtype, rngs=rngs)
        self.position = nnx.Param(
            0.02 * jax.random.normal(rngs.params(), (config.max_len, config.width), param_dtype)
        )
        self.blocks = nnx.List(
            [Block(config, param_dtype=param_dtype, rngs=rngs) for _ in range(config.num_layers)]
        )
        self.ln_f = nnx.LayerNorm(config.width, param_dtype=param_dtype, rngs=rngs)
        self.head = projection(
            config, "head", config.width, config.vocab_size, param_dtype=param_dtype, rngs=rngs
        )

    def __call__(self, tokens: Int[Array, "b t"]) -> Float[Array, "b t v"]:
        """Next-token logits for every position of ``tokens``.

        Raises:
          ValueError: ``tokens`` not ``(batch, time)``, longer than
            ``config.max_len``, or holding ids outside ``[0, vocab_size)``
            (a runtime error when traced).
          TypeError: non-integer ``tokens``.
        """
        if tokens.ndim != 2:
            raise ValueError(f"tokens must have shape (batch, time), got {tuple(tokens.shape)}.")
        t = tokens.shape[1]
        if t > self.config.max_len:
            raise ValueError(
                f"tokens has length {t}, longer than config.max_len={self.config.max_len}."
            )
        tokens = validation.check_indices(tokens, self.config.vocab_size, "tokens")
        x = self.embed(tokens) + self.position[...][None, :t]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))
