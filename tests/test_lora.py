"""The LoRA Transformer: NumPy reference forward pass, split/merge, adapter-only training."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import clair_jax as cj
from clair_jax._src.lora import conversion
from clair_jax._src.lora import model as lora_model

TINY = cj.TransformerConfig(
    vocab_size=7, max_len=6, num_layers=2, width=8, num_heads=2, mlp_width=12, lora_rank=2
)


def random_adapters(adapters, seed=0, scale=0.3):
    leaves, treedef = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    pairs = zip(keys, leaves, strict=True)
    new = [scale * jax.random.normal(k, x.shape, x.dtype) for k, x in pairs]
    return jax.tree.unflatten(treedef, new)


def tokens(shape, vocab, seed=1):
    return jax.random.randint(jax.random.key(seed), shape, 0, vocab, jnp.int32)


# --- an independent NumPy forward pass ---------------------------------------------------


def np_layer_norm(x, p, eps=1e-6):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def np_dense(x, base, adapters, name, scale):
    node = base
    for k in conversion.module_path(name):
        node = node[k]
    y = x @ np.asarray(node["kernel"]) + np.asarray(node["bias"])
    if name in adapters:
        f = adapters[name]
        # PEFT's orientation: B A is the (out, in) delta, so x moves by x (B A)^T.
        y = y + scale * x @ (np.asarray(f.B) @ np.asarray(f.A)).T
    return y


def np_gelu(x):  # jax.nn.gelu's default tanh approximation
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def np_forward(config, base, adapters, toks):
    base = jax.tree.map(np.asarray, base)
    scale = config.lora_alpha / config.lora_rank
    toks = np.asarray(toks)
    b, t = toks.shape
    h, d = config.num_heads, config.width
    x = base["embed"]["embedding"][toks] + base["position"][:t]
    for layer in range(config.num_layers):
        blk = base["blocks"][layer]
        pre = f"blocks/{layer}"
        y = np_layer_norm(x, blk["ln1"])
        q, k, v = (
            np_dense(y, base, adapters, f"{pre}/attn/{m}", scale).reshape(b, t, h, d // h)
            for m in ("query", "key", "value")
        )
        att = np.einsum("bshd,bthd->bhst", q, k) / np.sqrt(d // h)
        att = np.where(np.tril(np.ones((t, t), bool)), att, -np.inf)
        att = np.exp(att - att.max(-1, keepdims=True))
        att = att / att.sum(-1, keepdims=True)
        mixed = np.einsum("bhst,bthd->bshd", att, v).reshape(b, t, d)
        x = x + np_dense(mixed, base, adapters, f"{pre}/attn/out", scale)
        y = np_layer_norm(x, blk["ln2"])
        hidden = np_gelu(np_dense(y, base, adapters, f"{pre}/mlp_in", scale))
        x = x + np_dense(hidden, base, adapters, f"{pre}/mlp_out", scale)
    return np_dense(np_layer_norm(x, base["ln_f"]), base, adapters, "head", scale)


@pytest.mark.parametrize("targets", [lora_model.DEFAULT_TARGETS, ("value", "head")])
def test_forward_matches_numpy_reference(x64, targets):
    config = TINY._replace(lora_targets=targets, lora_alpha=3.0)
    model = cj.LoRATransformer(config, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    graphdef, base, adapters = cj.split_lora(model)
    if targets == lora_model.DEFAULT_TARGETS:
        expected = [f"blocks/{i}/attn/{m}" for i in range(2) for m in ("query", "key", "value")]
        expected += [f"blocks/{i}/{m}" for i in range(2) for m in ("attn/out", "mlp_in", "mlp_out")]
    else:
        expected = ["blocks/0/attn/value", "blocks/1/attn/value", "head"]
    assert sorted(adapters) == sorted(expected)
    adapters = random_adapters(adapters)
    toks = tokens((3, 6), config.vocab_size)
    logits = cj.apply_lora(graphdef, base, adapters, toks)
    assert logits.dtype == jnp.float64
    np.testing.assert_allclose(
        logits, np_forward(config, base, adapters, toks), rtol=1e-10, atol=1e-10
    )
    # The NNX model itself computes the same.
    np.testing.assert_allclose(cj.merge_lora(graphdef, base, adapters)(toks), logits, atol=1e-12)


def test_adapter_names_follow_targets():
    model = cj.LoRATransformer(TINY._replace(lora_targets=("value", "head")), rngs=nnx.Rngs(0))
    _, base, adapters = cj.split_lora(model)
    assert sorted(adapters) == ["blocks/0/attn/value", "blocks/1/attn/value", "head"]
    # head: width 8 -> vocab 7; B (out, r), A (r, in).
    assert adapters["head"].B.shape == (7, 2) and adapters["head"].A.shape == (2, 8)
    # The base holds no adapter factor; every adapter factor is an nnx.LoRAParam.
    flat = conversion.flatten_tree(base)
    assert not any(k[-1] in ("lora_a", "lora_b") for k in flat)
    lora_state = nnx.state(model, nnx.LoRAParam)
    assert len(jax.tree.leaves(lora_state)) == 2 * len(adapters)


def test_initial_adapters_are_a_no_op():
    graphdef, base, adapters = cj.split_lora(cj.LoRATransformer(TINY, rngs=nnx.Rngs(0)))
    for f in adapters.values():
        # PEFT's init: the up-projection B (lora_B = lora_b.T) is zero, the
        # down-projection A (lora_A = lora_a.T) random, so the product is zero.
        assert not np.any(np.asarray(f.B)) and np.all(np.abs(np.asarray(f.A)).sum(1) > 0)
        assert not np.any(np.asarray(f.B) @ np.asarray(f.A))
    toks = tokens((2, 6), TINY.vocab_size)
    zero = conversion.zeros_like_adapters(adapters)
    np.testing.assert_array_equal(
        cj.apply_lora(graphdef, base, adapters, toks), cj.apply_lora(graphdef, base, zero, toks)
    )


def test_merged_weights_give_the_adapter_model(x64):
    config = TINY._replace(lora_targets=lora_model.LORA_TARGETS, lora_alpha=5.0)
    model = cj.LoRATransformer(config, param_dtype=jnp.float64, rngs=nnx.Rngs(3))
    graphdef, base, adapters = cj.split_lora(model)
    adapters = random_adapters(adapters, seed=4)
    merged = cj.merge_adapters(base, adapters, config.lora_scale)
    toks = tokens((4, 5), config.vocab_size)
    zero = conversion.zeros_like_adapters(adapters)
    np.testing.assert_allclose(
        cj.apply_lora(graphdef, merged, zero, toks),
        cj.apply_lora(graphdef, base, adapters, toks),
        rtol=1e-11,
        atol=1e-11,
    )
    # Only the adapted kernels changed, by exactly scale * (B A)^T (kernels are (in, out)).
    name = "blocks/1/attn/key"
    f = adapters[name]
    np.testing.assert_allclose(
        merged["blocks"][1]["attn"]["key"]["kernel"] - base["blocks"][1]["attn"]["key"]["kernel"],
        config.lora_scale * (np.asarray(f.B) @ np.asarray(f.A)).T,
        atol=1e-13,
    )
    np.testing.assert_array_equal(merged["embed"]["embedding"], base["embed"]["embedding"])


def test_adapter_only_updates_leave_the_base_bit_identical():
    model = cj.LoRATransformer(TINY, rngs=nnx.Rngs(0))
    before_base = jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.LoRAParam))))
    before_lora = jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam)))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)
    toks = tokens((4, 6), TINY.vocab_size)
    targets = jnp.roll(toks, 1, axis=1)

    @nnx.jit
    def step(model, optimizer):
        def loss_fn(model):
            logits = model(toks)
            return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(5)]
    assert losses[-1] < losses[0]
    after_base = nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.LoRAParam)))
    after_lora = nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))
    jax.tree.map(np.testing.assert_array_equal, after_base, before_base)
    changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != b)), after_lora, before_lora)
    assert all(jax.tree.leaves(changed))


def test_lora_linear_initialises_as_peft():
    """Down-projection Kaiming-uniform (a = sqrt(5)): U(-1/sqrt(in), 1/sqrt(in)); up zero."""
    p, q, r = 400, 3, 64
    layer = lora_model.LoRALinear(p, q, lora_rank=r, lora_alpha=16.0, rngs=nnx.Rngs(0))
    down, up = np.asarray(layer.lora_a[...]), np.asarray(layer.lora_b[...])
    assert down.shape == (p, r) and up.shape == (r, q)
    assert not np.any(up)
    a = np.sqrt(5.0)
    bound = np.sqrt(2.0 / (1 + a**2)) * np.sqrt(3.0 / p)  # torch's kaiming_uniform_, fan_in = p
    assert np.max(np.abs(down)) <= bound
    assert np.max(np.abs(down)) > 0.99 * bound  # uniform over the whole interval
    np.testing.assert_allclose(down.std(), bound / np.sqrt(3.0), rtol=0.02)
    assert layer.scale == 16.0 / r
    rs = lora_model.LoRALinear(
        p, q, lora_rank=r, lora_alpha=16.0, use_rslora=True, rngs=nnx.Rngs(0)
    )
    assert rs.scale == 16.0 / np.sqrt(r)
    assert TINY._replace(use_rslora=True).lora_scale == TINY.lora_alpha / np.sqrt(TINY.lora_rank)
    assert TINY.lora_scale == TINY.lora_alpha / TINY.lora_rank


def test_adapter_state_conversion_round_trip():
    model = cj.LoRATransformer(TINY, rngs=nnx.Rngs(0))
    lora_state = nnx.state(model, nnx.LoRAParam)
    adapters = cj.lora_state_to_adapters(lora_state)
    assert all(isinstance(f, cj.LoRAFactors) for f in adapters.values())
    # No letter swap: A = lora_a^T (r, in), B = lora_b^T (out, r); mlp_out is 12 -> 8.
    mlp_out = model.blocks[1].mlp_out
    np.testing.assert_array_equal(adapters["blocks/1/mlp_out"].A, mlp_out.lora_a[...].T)
    np.testing.assert_array_equal(adapters["blocks/1/mlp_out"].B, mlp_out.lora_b[...].T)
    assert adapters["blocks/1/mlp_out"].B.shape == (8, 2)
    assert adapters["blocks/1/mlp_out"].A.shape == (2, 12)
    back = cj.adapters_to_lora_state(adapters)
    jax.tree.map(np.testing.assert_array_equal, back, nnx.to_pure_dict(lora_state))
    # Stacked (client-axis) adapters convert the same way.
    stacked = jax.tree.map(lambda x: jnp.stack([x, 2 * x]), adapters)
    again = cj.lora_state_to_adapters(cj.adapters_to_lora_state(stacked))
    jax.tree.map(np.testing.assert_array_equal, again, stacked)


def test_vmapped_apply_matches_per_client_apply():
    graphdef, base, adapters = cj.split_lora(cj.LoRATransformer(TINY, rngs=nnx.Rngs(0)))
    stacked = jax.tree.map(
        lambda *xs: jnp.stack(xs), *[random_adapters(adapters, seed=s) for s in range(3)]
    )
    toks = tokens((3, 2, 6), TINY.vocab_size)
    batched = jax.vmap(lambda a, t: cj.apply_lora(graphdef, base, a, t))(stacked, toks)
    for i in range(3):
        client = jax.tree.map(lambda x, i=i: x[i], stacked)
        one = cj.apply_lora(graphdef, base, client, toks[i])
        np.testing.assert_allclose(batched[i], one, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"num_heads": 3}, "num_heads"),
        ({"lora_targets": ("query", "bogus")}, "lora_targets"),
        ({"lora_targets": ()}, "lora_targets"),
        ({"lora_rank": 0}, "lora_rank"),
        ({"lora_alpha": 0.0}, "lora_alpha"),
        ({"lora_alpha": float("inf")}, "lora_alpha must be finite"),
        ({"lora_alpha": float("nan")}, "lora_alpha must be finite"),
        ({"width": 0}, "width"),
    ],
)
def test_bad_config(change, match):
    with pytest.raises(ValueError, match=match):
        cj.LoRATransformer(TINY._replace(**change), rngs=nnx.Rngs(0))


def test_config_targets_list_is_stored_as_a_tuple():
    model = cj.LoRATransformer(TINY._replace(lora_targets=["query"]), rngs=nnx.Rngs(0))
    assert model.config.lora_targets == ("query",)
    graphdef, base, adapters = cj.split_lora(model)
    hash(graphdef)  # static: usable as a jit static argument
    toks = tokens((2, 6), TINY.vocab_size)
    np.testing.assert_allclose(
        jax.jit(cj.apply_lora, static_argnums=0)(graphdef, base, adapters, toks),
        cj.apply_lora(graphdef, base, adapters, toks),
        atol=1e-5,
    )
    with pytest.raises(TypeError, match="lora_alpha must be a real number"):
        cj.LoRATransformer(TINY._replace(lora_alpha="x"), rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="use_rslora must be a bool"):
        cj.LoRATransformer(TINY._replace(use_rslora=1), rngs=nnx.Rngs(0))


def test_adapters_must_fit_the_model():
    config = TINY._replace(lora_targets=("query", "value"))
    graphdef, base, adapters = cj.split_lora(cj.LoRATransformer(config, rngs=nnx.Rngs(0)))
    toks = tokens((2, 6), TINY.vocab_size)
    # Rank 3 adapters in a rank-2 model (would be scaled by alpha / 2).
    rank3 = cj.split_lora(cj.LoRATransformer(config._replace(lora_rank=3), rngs=nnx.Rngs(0)))[2]
    with pytest.raises(ValueError, match=r"'blocks/0/attn/query': B \(8, 3\) and A \(3, 8\)"):
        cj.apply_lora(graphdef, base, rank3, toks)
    with pytest.raises(ValueError, match=r"missing \['blocks/1/attn/value'\], unexpected \[\]"):
        cj.merge_lora(
            graphdef, base, {k: v for k, v in adapters.items() if k != "blocks/1/attn/value"}
        )
    # Same number of modules, other names: nnx.merge alone would fill them in silently.
    swapped = {k.replace("value", "key"): v for k, v in adapters.items()}
    with pytest.raises(ValueError, match="missing .*blocks/0/attn/value.*unexpected .*attn/key"):
        jax.jit(cj.apply_lora, static_argnums=0)(graphdef, base, swapped, toks)
    stacked = jax.tree.map(lambda x: x[None], adapters)
    with pytest.raises(ValueError, match=r"B \(1, 8, 2\)"):
        cj.merge_lora(graphdef, base, stacked)
    assert conversion.adapter_shapes(graphdef)["blocks/1/attn/value"] == ((8, 2), (2, 8))
    full = cj.split_lora(cj.LoRATransformer(TINY, rngs=nnx.Rngs(0)))[0]
    # (B, A) shapes are ((out, r), (r, in)): mlp_in maps width 8 to mlp_width 12.
    assert conversion.adapter_shapes(full)["blocks/0/mlp_in"] == ((12, 2), (2, 8))


def test_flax_nnx_lora_maps_by_transposes(x64):
    """Flax's own nnx.LoRA (y = x lora_a lora_b) gives A = lora_a^T, B = lora_b^T: y = x (B A)^T."""

    class Holder(nnx.Module):
        def __init__(self):
            self.proj = nnx.LoRA(5, 2, 3, param_dtype=jnp.float64, rngs=nnx.Rngs(0))

    holder = Holder()
    holder.proj.lora_b[...] = jax.random.normal(jax.random.key(1), (2, 3), jnp.float64)
    adapters = cj.lora_state_to_adapters(nnx.state(holder, nnx.LoRAParam))
    f = adapters["proj"]
    assert f.B.shape == (3, 2) and f.A.shape == (2, 5)
    x = np.asarray(jax.random.normal(jax.random.key(2), (4, 5), jnp.float64))
    delta = np.asarray(f.B) @ np.asarray(f.A)  # (out, in)
    np.testing.assert_allclose(holder.proj(x), x @ delta.T, atol=1e-12)


def test_bad_inputs():
    model = cj.LoRATransformer(TINY, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="max_len"):
        model(jnp.zeros((1, 7), jnp.int32))
    with pytest.raises(ValueError, match="batch, time"):
        model(jnp.zeros((7,), jnp.int32))
    # Out-of-vocabulary ids used to give NaN logits silently (eagerly and under jit).
    with pytest.raises(ValueError, match=r"tokens must hold integers in \[0, 7\), got .* 7\]"):
        model(jnp.array([[1, 7]], jnp.int32))
    with pytest.raises(
        ValueError, match=r"tokens must hold integers in \[0, 7\), got values in \[-1, 2\]"
    ):
        model(jnp.array([[-1, 2]], jnp.int32))
    with pytest.raises(TypeError, match="tokens must be an integer array"):
        model(jnp.zeros((1, 2)))
    graphdef, state = nnx.split(model)
    jitted = jax.jit(lambda tok: nnx.merge(graphdef, state)(tok))
    assert np.isfinite(jitted(jnp.array([[0, 6]], jnp.int32))).all()
    with pytest.raises(Exception, match=r"tokens must hold integers in \[0, 7\)"):
        jax.block_until_ready(jitted(jnp.array([[0, 9]], jnp.int32)))
    with pytest.raises(TypeError, match="TransformerConfig"):
        cj.LoRATransformer({"width": 8}, rngs=nnx.Rngs(0))
    _, base, adapters = cj.split_lora(model)
    bad = dict(adapters)
    bad["blocks/0/attn/nothing"] = cj.LoRAFactors(B=jnp.zeros((8, 2)), A=jnp.zeros((2, 8)))
    with pytest.raises(ValueError, match="no kernel"):
        cj.merge_adapters(base, bad, 1.0)
    bad = {"blocks/0/mlp_in": cj.LoRAFactors(B=jnp.zeros((8, 2)), A=jnp.zeros((2, 5)))}
    with pytest.raises(ValueError, match="does not match the kernel"):
        cj.merge_adapters(base, bad, 1.0)
