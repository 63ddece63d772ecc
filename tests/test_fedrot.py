"""FedRot-LoRA alignment against NumPy/SciPy references, brute force and closed forms."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

import clair_jax as cj
from clair_jax._src.aggregators import alignment as fedrot_module

KEY = jax.random.key(0)


def random_factors(seed, n=5, p=7, r=3, q=6):
    rng = np.random.default_rng(seed)
    return (
        rng.normal(size=(n, r, q)),
        rng.normal(size=(n, p, r)),
        rng.normal(size=(r, q)),
        rng.normal(size=(p, r)),
    )


def haar_rotations(rng, k, r):
    """``k`` random rotations (Haar on O(r), then the last column's sign fixed)."""
    z = rng.normal(size=(k, r, r))
    q, t = np.linalg.qr(z)
    q = q * np.sign(np.diagonal(t, axis1=1, axis2=2))[:, None, :]
    q[:, :, -1] *= np.sign(np.linalg.det(q))[:, None]
    return q


def np_procrustes(m, proper=True):
    """argmax_R tr(R^T M) over SO(r) (proper) or O(r), in NumPy."""
    u, _, vt = np.linalg.svd(m)
    if proper and np.linalg.det(u @ vt) < 0:
        u = u.copy()
        u[:, -1] *= -1
    return u @ vt


def np_rotation(a_i, b_i, a_ref, b_ref, strength, factor, proper=True):
    """Reference rotation: polar factor (SciPy) of (1 - λ) I + λ R*."""
    cross = a_i @ a_ref.T if factor == "A" else b_i.T @ b_ref
    hard = np_procrustes(cross, proper)
    mix = (1 - strength) * np.eye(len(hard)) + strength * hard
    return scipy.linalg.polar(mix)[0]


def np_align(A, B, A_ref, B_ref, strength, factor):
    rots = [np_rotation(A[i], B[i], A_ref, B_ref, strength, factor) for i in range(len(A))]
    return np.stack([R.T @ a for R, a in zip(rots, A, strict=True)]), np.stack(
        [b @ R for R, b in zip(rots, B, strict=True)]
    )


def np_fedit_error(A, B, p):
    exact = np.einsum("n,npr,nrq->pq", p, B, A)
    return np.linalg.norm(exact - np.tensordot(p, B, 1) @ np.tensordot(p, A, 1))


def rotated_clients(seed, n=8, p=16, r=4, q=12, heterogeneity=0.1):
    """One shared update ``b a`` in random bases, plus relative heterogeneity per client."""
    rng = np.random.default_rng(seed)
    b, a = rng.normal(size=(p, r)), rng.normal(size=(r, q))
    rots = haar_rotations(rng, n, r)
    B = b @ rots + heterogeneity * np.linalg.norm(b) / np.sqrt(p * r) * rng.normal(size=(n, p, r))
    A = np.swapaxes(rots, 1, 2) @ a
    A = A + heterogeneity * np.linalg.norm(a) / np.sqrt(r * q) * rng.normal(size=(n, r, q))
    return A, B, a, b


# --- optimality -------------------------------------------------------------------------------


@pytest.mark.parametrize("factor", ["A", "B"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hard_alignment_matches_numpy_procrustes(x64, factor, seed):
    A, B, A_ref, B_ref = random_factors(seed)
    A2, B2 = cj.fedrot_align(A, B, A_ref, B_ref, strength=1.0, factor=factor)
    ref_A, ref_B = np_align(A, B, A_ref, B_ref, 1.0, factor)
    np.testing.assert_allclose(A2, ref_A, atol=1e-10)
    np.testing.assert_allclose(B2, ref_B, atol=1e-10)


@pytest.mark.parametrize("factor", ["A", "B"])
def test_no_rotation_does_better_brute_force(x64, factor):
    """Against 4000 Haar rotations and small perturbations of the solution."""
    rng = np.random.default_rng(3)
    A, B, A_ref, B_ref = random_factors(4, r=3)
    A2, B2 = cj.fedrot_align(A, B, A_ref, B_ref, strength=1.0, factor=factor)
    candidates = haar_rotations(rng, 4000, 3)
    k = rng.normal(size=(50, 3, 3))
    k = k - np.swapaxes(k, 1, 2)
    perturbations = [scipy.linalg.expm(step * k) for step in (1e-3, 1e-1)]
    for i in range(len(A)):
        if factor == "A":
            ours = np.linalg.norm(np.asarray(A2[i]) - A_ref)
            others = np.linalg.norm(np.swapaxes(candidates, 1, 2) @ A[i] - A_ref, axis=(1, 2))
        else:
            ours = np.linalg.norm(np.asarray(B2[i]) - B_ref)
            others = np.linalg.norm(B[i] @ candidates - B_ref, axis=(1, 2))
        assert ours <= others.min() + 1e-12
        # Local optimality: rotate the solution by exp(eps K) for random skew K.
        for perturb in perturbations:
            if factor == "A":
                moved = np.swapaxes(perturb, 1, 2) @ np.asarray(A2[i])
                worse = np.linalg.norm(moved - A_ref, axis=(1, 2))
            else:
                worse = np.linalg.norm(np.asarray(B2[i]) @ perturb - B_ref, axis=(1, 2))
            assert ours <= worse.min() + 1e-12


def test_reflection_fix_gives_rotations(x64):
    """Clients whose best orthogonal map is a reflection still get det R = +1."""
    rng = np.random.default_rng(5)
    r = 3
    A_ref = rng.normal(size=(r, 6))
    flips = np.stack([np.diag([1.0, 1.0, -1.0]), np.diag([-1.0, 1.0, 1.0]), np.eye(r)])
    A = flips @ A_ref + 0.01 * rng.normal(size=(3, r, 6))
    B = rng.normal(size=(3, 5, r))
    for strength in (0.0, 0.2, 0.5, 0.8, 1.0):
        rot = fedrot_module.alignment_rotations(
            jnp.asarray(A), jnp.asarray(B), jnp.asarray(A_ref), None, strength, "A"
        )
        np.testing.assert_allclose(np.linalg.det(rot), 1.0, atol=1e-12)
        np.testing.assert_allclose(
            rot @ np.swapaxes(rot, 1, 2), np.eye(r)[None].repeat(3, 0), atol=1e-12
        )
    # The reflected clients are better served over O(r): allow_reflection finds it.
    A_free, _ = cj.fedrot_align(A, B, A_ref, None, strength=1.0, allow_reflection=True)
    A_rot, _ = cj.fedrot_align(A, B, A_ref, None, strength=1.0)
    free = np.linalg.norm(np.asarray(A_free) - A_ref, axis=(1, 2))
    proper = np.linalg.norm(np.asarray(A_rot) - A_ref, axis=(1, 2))
    assert np.all(free[:2] < 0.1) and np.all(proper[:2] > 1.0)
    np.testing.assert_allclose(free[2], proper[2], atol=1e-12)


@pytest.mark.parametrize("strength", [0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
@pytest.mark.parametrize("factor", ["A", "B"])
def test_soft_alignment_is_polar_factor_of_interpolation(x64, strength, factor):
    A, B, A_ref, B_ref = random_factors(6)
    A2, B2 = cj.fedrot_align(A, B, A_ref, B_ref, strength=strength, factor=factor)
    ref_A, ref_B = np_align(A, B, A_ref, B_ref, strength, factor)
    np.testing.assert_allclose(A2, ref_A, atol=1e-10)
    np.testing.assert_allclose(B2, ref_B, atol=1e-10)


# --- products, endpoints, the aggregation error -------------------------------------------------


@pytest.mark.parametrize("strength,factor", [(0.4, "A"), (1.0, "B")])
def test_products_preserved_to_machine_precision(strength, factor):
    for dtype, eps in ((np.float32, 1e-6), (np.float64, 1e-15)):
        with jax.enable_x64(dtype == np.float64):
            A, B, A_ref, B_ref = (x.astype(dtype) for x in random_factors(7))
            A2, B2 = cj.fedrot_align(A, B, A_ref, B_ref, strength=strength, factor=factor)
            assert A2.dtype == dtype and B2.dtype == dtype
            before = np.einsum("npr,nrq->npq", B.astype(np.float64), A.astype(np.float64))
            after = np.einsum("npr,nrq->npq", np.float64(B2), np.float64(A2))
            scale = np.linalg.norm(B, axis=(1, 2)) * np.linalg.norm(A, axis=(1, 2))
            rel = np.linalg.norm(after - before, axis=(1, 2)) / scale
            assert rel.max() < 20 * eps


def test_strength_zero_is_fedit_and_one_is_hard(x64):
    A, B, A_ref, B_ref = random_factors(8)
    A0, B0 = cj.fedrot_align(A, B, A_ref, B_ref, strength=0.0)
    np.testing.assert_allclose(A0, A, atol=1e-13)
    np.testing.assert_allclose(B0, B, atol=1e-13)
    A1, B1 = cj.fedrot_align(A, B, A_ref, B_ref, strength=1.0)
    rots = [np_procrustes(a @ A_ref.T) for a in A]
    np.testing.assert_allclose(A1, [R.T @ a for R, a in zip(rots, A, strict=True)], atol=1e-12)
    np.testing.assert_allclose(B1, [b @ R for R, b in zip(rots, B, strict=True)], atol=1e-12)


def test_zero_reference_leaves_factors_alone(x64):
    A, B, _, B_ref = random_factors(9)
    A2, B2 = cj.fedrot_align(A, B, np.zeros((3, 6)), B_ref, strength=1.0, factor="A")
    np.testing.assert_allclose(A2, A, atol=1e-13)
    np.testing.assert_allclose(B2, B, atol=1e-13)


def test_aggregation_error_matches_numpy(x64):
    A, B, A_ref, B_ref = random_factors(10)
    w = np.random.default_rng(0).uniform(0.1, 2.0, size=5)
    p = w / w.sum()
    np.testing.assert_allclose(cj.aggregation_error(A, B), np_fedit_error(A, B, np.full(5, 0.2)))
    np.testing.assert_allclose(cj.aggregation_error(A, B, w), np_fedit_error(A, B, p), rtol=1e-12)
    exact = np.einsum("n,npr,nrq->pq", p, B, A)
    np.testing.assert_allclose(
        cj.aggregation_error(A, B, w, A_global=A_ref, B_global=B_ref),
        np.linalg.norm(exact - B_ref @ A_ref),
        rtol=1e-12,
    )


def test_rotated_clients_error_reduced_tenfold():
    """The issue's target on small synthetic clients: one update, random bases, 10% noise."""
    ratios = []
    for seed in range(3):
        A, B, a, b = rotated_clients(seed)
        before = float(cj.aggregation_error(A, B))
        after = float(cj.aggregation_error(*cj.fedrot_align(A, B, a, b, strength=1.0)))
        ratios.append(before / after)
    assert min(ratios) >= 10.0, ratios


# --- transforms --------------------------------------------------------------------------------


class TestTransforms(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_jit_equals_no_jit(self):
        A, B, A_ref, B_ref = (jnp.asarray(x, jnp.float32) for x in random_factors(11))

        @self.variant
        def align(A, B, A_ref, B_ref, strength):
            return cj.fedrot_align(A, B, A_ref, B_ref, strength=strength, factor="B")

        got = align(A, B, A_ref, B_ref, 0.4)
        want = np_align(*(np.float64(x) for x in (A, B, A_ref, B_ref)), 0.4, "B")
        chex.assert_trees_all_close(got, want, atol=2e-5)

    def test_vmap_over_modules_equals_loop(self):
        mods = [random_factors(20 + m) for m in range(3)]
        stacked = [jnp.asarray(np.stack(x), jnp.float32) for x in zip(*mods, strict=True)]
        align = jax.vmap(lambda *args: cj.fedrot_align(*args, strength=0.6, factor="A"))
        got = align(*stacked)
        for m, args in enumerate(mods):
            want = cj.fedrot_align(*(np.float32(x) for x in args), strength=0.6, factor="A")
            chex.assert_trees_all_close((got[0][m], got[1][m]), want, atol=1e-5)

    def test_vmap_over_strength_grid(self):
        A, B, A_ref, B_ref = (np.float32(x) for x in random_factors(12))
        grid = jnp.array([0.0, 0.3, 1.0])
        got = jax.vmap(lambda s: cj.fedrot_align(A, B, A_ref, B_ref, strength=s))(grid)
        for k, s in enumerate(np.asarray(grid)):
            want = cj.fedrot_align(A, B, A_ref, B_ref, strength=float(s))
            chex.assert_trees_all_close((got[0][k], got[1][k]), want, atol=1e-5)

    def test_no_recompilation(self):
        @jax.jit
        @chex.assert_max_traces(n=1)
        def align(A, B, A_ref, strength):
            return cj.fedrot_align(A, B, A_ref, None, strength=strength)

        for seed in range(3):
            A, B, A_ref, _ = (np.float32(x) for x in random_factors(seed))
            align(A, B, A_ref, jnp.float32(0.1 * seed))


# --- bad input ---------------------------------------------------------------------------------

A0, B0, AR0, BR0 = random_factors(0)  # A (5, 3, 6), B (5, 7, 3), A_ref (3, 6), B_ref (7, 3)


@pytest.mark.parametrize(
    "args,kwargs,error,match",
    [
        ((A0, B0[:, :, :2], AR0, BR0), {}, ValueError, r"rank mismatch: A \(5, 3, 6\).*r=3.*r=2"),
        ((A0, B0[:4], AR0, BR0), {}, ValueError, r"same number of clients.*\(4, 7, 3\)"),
        ((A0[0], B0, AR0, BR0), {}, ValueError, r"A must have shape \(n, r, q\)"),
        ((A0, B0, AR0[:2], BR0), {}, ValueError, r"A_ref must have shape \(3, 6\).*got \(2, 6\)"),
        ((A0, B0, AR0, BR0[:, :2]), {}, ValueError, r"B_ref must have shape \(7, 3\)"),
        ((A0, B0, None, BR0), {}, ValueError, r'factor="A" needs A_ref of shape \(3, 6\)'),
        ((A0, B0, AR0, None), {"factor": "B"}, ValueError, r'factor="B" needs B_ref'),
        ((A0, B0, AR0, BR0), {"strength": -0.1}, ValueError, "strength must be finite and >= 0"),
        ((A0, B0, AR0, BR0), {"strength": np.inf}, ValueError, "strength must be finite and >= 0"),
        ((A0, B0, AR0, BR0), {"strength": np.nan}, ValueError, "strength must be finite and >= 0"),
        ((A0, B0, AR0, BR0), {"strength": np.ones(2)}, ValueError, "strength must be a scalar"),
        ((A0, B0, AR0, BR0), {"factor": "C"}, ValueError, "factor must be one of"),
        (("abc", B0, AR0, BR0), {}, TypeError, "A must be an array of real numbers"),
        ((A0, np.where(B0 > 1, np.nan, B0), AR0, BR0), {}, ValueError, "B contains NaN or inf"),
        ((A0, B0, np.full((3, 6), np.inf), BR0), {}, ValueError, "A_ref contains NaN or inf"),
        ((A0, B0, AR0, BR0), {"allow_reflection": "False"}, TypeError, "allow_reflection must"),
    ],
)
def test_bad_input_is_rejected(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        cj.fedrot_align(*args, **kwargs)


def test_traced_negative_strength_raises_at_run_time():
    align = jax.jit(lambda s: cj.fedrot_align(A0, B0, AR0, BR0, strength=s))
    align(0.5)
    align(1.5)  # the official default: hard alignment over O(r)
    with pytest.raises(Exception, match="strength must be finite and >= 0"):
        jax.block_until_ready(align(-0.5))


@pytest.mark.parametrize(
    "weights,match",
    [
        (np.ones(4), r"weights must have shape \(n,\) = \(5,\), got shape \(4,\)"),
        (-np.ones(5), "weights must be finite and non-negative"),
        (np.zeros(5), "weights must not all be zero"),
    ],
)
def test_aggregation_error_bad_weights(weights, match):
    with pytest.raises(ValueError, match=match):
        cj.aggregation_error(A0, B0, weights)


# --- the FedRot-LoRA aggregator ------------------------------------------------------------------


def fedrot_round(agg, A, B, A_ref, B_ref, w, t):
    clients = {"m": cj.LoRAFactors(B=B, A=A)}
    global_ = {"m": cj.LoRAFactors(B=B_ref, A=A_ref)}
    return agg.aggregate(clients, global_, w, jnp.int32(t), KEY)


@pytest.mark.parametrize(
    "kwargs,schedule",
    [
        ({}, [None, "A", "B", "A"]),
        ({"alternate": False, "factor": "B"}, [None, "B", "B", "B"]),
        ({"skip_first_round": False}, ["B", "A", "B", "A"]),
    ],
)
def test_fedrot_aggregator_schedule_and_diagnostics(x64, kwargs, schedule):
    A, B, a, b = rotated_clients(30, n=6, p=8, r=3, q=5)
    w = np.random.default_rng(1).uniform(0.5, 2.0, size=6)
    p = w / w.sum()
    agg = cj.fedrot(0.6, **kwargs)
    assert agg.name == "fedrot" and agg.frozen_factor is None
    for t, factor in enumerate(schedule):
        res = fedrot_round(agg, A, B, a, b, w, t)
        if factor is None:
            A2, B2 = A, B
        else:
            A2, B2 = np_align(A, B, a, b, 0.6, factor)
        g = res.global_["m"]
        np.testing.assert_allclose(g.A, np.tensordot(p, A2, 1), atol=1e-10)
        np.testing.assert_allclose(g.B, np.tensordot(p, B2, 1), atol=1e-10)
        np.testing.assert_allclose(res.clients["m"].A, np.broadcast_to(g.A, A.shape))
        d = res.diagnostics
        assert int(d["fedrot/aligned_factor"]) == {None: 0, "A": 1, "B": 2}[factor]
        np.testing.assert_allclose(d["aggregation_error/m"], np_fedit_error(A2, B2, p), rtol=1e-8)
        np.testing.assert_allclose(
            d["aggregation_error_unaligned/m"], np_fedit_error(A, B, p), rtol=1e-10
        )
        if factor is not None:
            assert float(d["aggregation_error/m"]) < 0.5 * float(d["aggregation_error_unaligned/m"])


def test_fedrot_aggregator_strength_zero_is_fedit(x64):
    A, B, a, b = rotated_clients(31, n=5, p=6, r=2, q=4)
    w = np.ones(5)
    for t in range(3):
        rot = fedrot_round(cj.fedrot(0.0), A, B, a, b, w, t)
        fedit = fedrot_round(cj.fedit(), A, B, a, b, w, t)
        chex.assert_trees_all_close(rot.global_, fedit.global_, atol=1e-12)


def test_aggregation_error_rejects_nan():
    with pytest.raises(ValueError, match="A contains NaN or inf"):
        cj.aggregation_error(np.full_like(A0, np.nan), B0)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_half_precision_is_aligned_in_float32(dtype):
    A, B, A_ref, B_ref = (jnp.asarray(x, jnp.float32) for x in random_factors(3))
    got = cj.fedrot_align(*(x.astype(dtype) for x in (A, B, A_ref, B_ref)), strength=0.4)
    want = cj.fedrot_align(*(x.astype(dtype).astype(jnp.float32) for x in (A, B, A_ref, B_ref)),
                           strength=0.4)  # fmt: skip
    for g, w in zip(got, want, strict=True):
        assert g.dtype == dtype
        np.testing.assert_allclose(np.asarray(g, np.float32), w, atol=0.05)


@pytest.mark.parametrize("factor", ["A", "B"])
def test_rotations_do_not_depend_on_the_factors_scale(factor):
    """The cross term ``A_i A_ref^T`` of finite factors used to overflow (one float32 client
    near 1e38, float16 factors of a few hundred: LAPACK's SVD of the inf then never
    returned, or gave NaN) or underflow (1e-19: no alignment at all)."""
    A, B, A_ref, B_ref = (np.asarray(x, np.float32) for x in random_factors(5))
    want = cj.fedrot_align(A, B, A_ref, B_ref, factor=factor)
    for mine, ref in ((1e-19, 1e-19), (1e18, 1.0), (1.0, 1e-30)):
        got = cj.fedrot_align(
            A * mine, B * mine, A_ref * ref, B_ref * ref, factor=factor
        )  # the same rotations
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(np.asarray(g) / mine, w, atol=1e-5)
    huge = A.copy(), B.copy()
    huge[0][0] *= 3e37
    huge[1][0] *= 3e37
    got = cj.fedrot_align(*huge, A_ref, B_ref, factor=factor)
    for g, w in zip(got, want, strict=True):
        assert np.isfinite(np.asarray(g)).all()
        np.testing.assert_allclose(np.asarray(g)[1:], w[1:], atol=1e-5)
        np.testing.assert_allclose(np.asarray(g)[0] / 3e37, w[0], atol=1e-5)
    half = [jnp.asarray(x * 300, jnp.float16) for x in (A, B, A_ref, B_ref)]
    got = cj.fedrot_align(*half, factor=factor)
    rounded = cj.fedrot_align(*(x.astype(jnp.float32) for x in half), factor=factor)
    for g, w in zip(got, rounded, strict=True):
        assert g.dtype == jnp.float16
        np.testing.assert_allclose(np.asarray(g, np.float32) / 300, np.asarray(w) / 300, atol=0.02)


def test_eager_calls_with_the_same_shapes_compile_once():
    """fedrot_align called outside jit re-traced and compiled its two lax.map scans
    on every call (about 260 ms each against 0.4 ms jitted)."""
    k1, k2 = jax.random.split(jax.random.key(3))
    a, b = jax.random.normal(k1, (5, 3, 7)), jax.random.normal(k2, (5, 6, 3))
    cj.fedrot_align(a, b, a[0], b[0])
    before = fedrot_module.alignment_rotations._cache_size()
    for scale in (2.0, 3.0):
        cj.fedrot_align(scale * a, b, a[1], b[1])
    assert fedrot_module.alignment_rotations._cache_size() == before
