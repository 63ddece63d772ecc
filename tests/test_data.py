"""The text-copying task: determinism from the key and the structure of the federation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clair_jax import data

CONFIG = data.FederationConfig(
    num_clients=10,
    contaminated_fraction=0.3,
    vocab_size=12,
    length=5,
    train_examples=7,
    test_examples=9,
    shared_tokens=3,
    specific_tokens=2,
)


def test_copy_examples_layout():
    mapping = jnp.array([0, 2, 3, 1, 4, 5], jnp.int32)
    inputs, targets, mask = data.copy_examples(jax.random.key(0), 50, mapping, length=4)
    inputs, targets, mask = map(np.asarray, (inputs, targets, mask))
    assert inputs.shape == targets.shape == mask.shape == (50, 8)
    x = inputs[:, :4]
    assert np.all((x >= 1) & (x <= 5))  # content tokens only
    assert np.all(inputs[:, 4] == data.SEPARATOR)
    # next-token targets: a shift of the full sequence x SEP φ(x)
    np.testing.assert_array_equal(targets[:, :-1], inputs[:, 1:])
    np.testing.assert_array_equal(targets[:, 4:], np.asarray(mapping)[x])
    np.testing.assert_array_equal(mask, np.tile([0, 0, 0, 0, 1, 1, 1, 1], (50, 1)))
    assert len(np.unique(x)) == 5  # every content token occurs in 200 draws


def test_federation_is_a_function_of_the_key():
    a = data.make_federation(jax.random.key(3), CONFIG)
    b = data.make_federation(jax.random.key(3), CONFIG)
    c = data.make_federation(jax.random.key(4), CONFIG)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert not np.array_equal(a.train.inputs, c.train.inputs)
    assert not np.array_equal(a.mappings, c.mappings)


def test_federation_structure():
    fed = data.make_federation(jax.random.key(5), CONFIG)
    n, v = CONFIG.num_clients, CONFIG.vocab_size
    maps = np.asarray(fed.mappings)
    bad = np.asarray(fed.contaminated)
    assert maps.shape == (n, v) and bad.sum() == data.num_contaminated(CONFIG) == 3
    s1, s2 = np.asarray(fed.shared_sources), np.asarray(fed.specific_sources)
    assert len(set(s1) | set(s2)) == 5 and data.SEPARATOR not in set(s1) | set(s2)
    others = np.setdiff1d(np.arange(1, v), np.concatenate([s1, s2]))
    benign = maps[~bad]
    # Shared re-mapping: all benign clients agree on s1 (and it moves at least one token).
    assert np.all(benign[:, s1] == benign[0, s1])
    assert np.any(benign[0, s1] != s1)
    # Client-specific parts live on the same sources s2, with targets that differ.
    assert len({tuple(row) for row in benign[:, s2]}) > 1
    # Every other token is copied.
    np.testing.assert_array_equal(benign[:, others], np.tile(others, (len(benign), 1)))
    # "random" contamination: own mappings, far from every benign one.
    for row in maps[bad]:
        assert np.sum(row[1:] != benign[0, 1:]) > v // 2
    # The data follow each client's mapping; the attack fields are honest ones.
    for split in (fed.train, fed.test):
        x, y = np.asarray(split.inputs), np.asarray(split.targets)
        length = CONFIG.length
        want = np.take_along_axis(maps[:, None, :], x[:, :, :length].reshape(n, -1)[:, None], 2)
        np.testing.assert_array_equal(y[:, :, length:].reshape(n, -1), want[:, 0])
    assert fed.train.inputs.shape == (n, 7, 10) and fed.test.inputs.shape == (n, 9, 10)
    np.testing.assert_array_equal(fed.train.update_scale, np.ones(n))
    assert not np.any(fed.train.coordinated)
    np.testing.assert_array_equal(fed.train.weight, np.full(n, 7.0))


@pytest.mark.parametrize("kind", ["adversarial", "scaled", "sign_flip", "coordinated"])
def test_contamination_kinds(kind):
    config = CONFIG._replace(contamination=kind, attack_scale=2.5)
    fed = data.make_federation(jax.random.key(6), config)
    bad = np.asarray(fed.contaminated)
    maps = np.asarray(fed.mappings)
    scale = np.asarray(fed.train.update_scale)
    np.testing.assert_array_equal(scale[~bad], 1.0)
    if kind in ("adversarial", "coordinated"):
        assert np.all(maps[bad] == maps[bad][0])  # one shared wrong mapping
        assert np.sum(maps[bad][0, 1:] != maps[~bad][0, 1:]) > config.vocab_size // 2
    else:  # update attacks: the data look benign
        benign = maps[~bad]
        s1 = np.asarray(fed.shared_sources)
        assert np.all(maps[bad][:, s1] == benign[0, s1])
    expected = {"adversarial": 1.0, "scaled": 2.5, "sign_flip": -2.5, "coordinated": 2.5}[kind]
    np.testing.assert_array_equal(scale[bad], expected)
    np.testing.assert_array_equal(np.asarray(fed.train.coordinated), bad & (kind == "coordinated"))


def test_no_contamination():
    fed = data.make_federation(jax.random.key(0), CONFIG._replace(contaminated_fraction=0.0))
    assert not np.any(fed.contaminated)


@pytest.mark.parametrize(
    "change, error, match",
    [
        ({"num_clients": 0}, ValueError, "num_clients"),
        ({"contaminated_fraction": 1.0}, ValueError, "contaminated_fraction"),
        ({"contamination": "bogus"}, ValueError, "contamination"),
        ({"shared_tokens": 8, "specific_tokens": 4}, ValueError, "shared_tokens"),
        ({"specific_tokens": -1}, ValueError, "specific_tokens"),
        ({"attack_scale": 0.0}, ValueError, "attack_scale"),
        ({"length": 2.5}, TypeError, "length"),
        ({"contaminated_fraction": float("nan")}, ValueError, "contaminated_fraction"),
        # Rounding must leave a benign client (0.9 * 4 -> 4, 0.75 * 2 -> 2 contaminated).
        ({"num_clients": 4, "contaminated_fraction": 0.9}, ValueError, "no benign client"),
        ({"num_clients": 2, "contaminated_fraction": 0.75}, ValueError, "no benign client"),
    ],
)
def test_bad_config(change, error, match):
    with pytest.raises(error, match=match):
        data.make_federation(jax.random.key(0), CONFIG._replace(**change))


def test_client_data_checks():
    x = jnp.zeros((3, 4, 6), jnp.int32)
    d = data.client_data(x, x)
    assert d.mask.shape == (3, 4, 6) and d.weight.shape == (3,)
    with pytest.raises(TypeError, match="integer"):
        data.client_data(x.astype(jnp.float32), x)
    with pytest.raises(ValueError, match="targets"):
        data.client_data(x, x[:, :, :5])
    with pytest.raises(ValueError, match=r"\(clients, examples, time\)"):
        data.client_data(x[0], x[0])
    with pytest.raises(ValueError, match="weight must have shape"):
        data.client_data(x, x, weight=jnp.ones(2))
    with pytest.raises(ValueError, match="mask"):
        data.client_data(x, x, jnp.ones((3, 4)))
