"""FedRot-LoRA against a NumPy transcription of the authors' code (tests/fedrot_reference.py).

Every case uses one shape per rank so the jitted alignment compiles once per
(shape, factor). Where the optimum is unique (a nonsingular cross term for the
hard path over O(r), also with repeated singular values: the polar factor is
unique; a simple smallest singular value when the SO(r) fix applies) the factors
are compared directly; where it is not, the objective values are.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import clair_jax as cj
from tests import fedrot_reference as ref

LAMBDAS = [0.0, 0.2, 0.4, 0.6, 1.0, 1.5]
TOL = 1e-6  # the target; float64 cases agree to ~1e-12
N, P, R, Q = 6, 7, 4, 5


def random_case(seed, n=N, p=P, r=R, q=Q):
    rng = np.random.default_rng(seed)
    return (
        rng.normal(size=(n, r, q)),
        rng.normal(size=(n, p, r)),
        rng.normal(size=(r, q)),
        rng.normal(size=(p, r)),
    )


def sign_flip_case(seed, noise=1e-3, n=N, p=P, r=R, q=Q):
    """Clients hold the reference update ``B_ref A_ref`` with latent directions' signs
    flipped (``D_i`` diagonal ±1; odd numbers of flips are reflections), plus noise."""
    rng = np.random.default_rng(seed)
    a_ref, b_ref = rng.normal(size=(r, q)), rng.normal(size=(p, r))
    flips = np.ones((n, r))
    flips[1:, :] = rng.choice([-1.0, 1.0], size=(n - 1, r))
    flips[1, :] = [-1.0] + [1.0] * (r - 1)  # one reflection for sure
    flips[2, :] = [-1.0, -1.0] + [1.0] * (r - 2)  # one proper rotation (by pi) for sure
    A = flips[:, :, None] * a_ref + noise * rng.normal(size=(n, r, q))
    B = b_ref * flips[:, None, :] + noise * rng.normal(size=(n, p, r))
    return A, B, a_ref, b_ref


def assert_matches_transcription(A, B, A_ref, B_ref, lam, factor, tol=TOL, **kwargs):
    want_A, want_B, _ = ref.align_clients(A, B, A_ref, B_ref, factor, lam)
    got_A, got_B = cj.fedrot_align(A, B, A_ref, B_ref, strength=lam, factor=factor, **kwargs)
    diff = max(np.abs(np.asarray(got_A) - want_A).max(), np.abs(np.asarray(got_B) - want_B).max())
    assert diff < tol, (lam, factor, diff)
    return diff


@pytest.mark.parametrize("factor", ["A", "B"])
def test_random_cases_match_transcription(x64, factor):
    for seed in range(4):
        A, B, A_ref, B_ref = random_case(seed)
        for lam in LAMBDAS:
            assert_matches_transcription(A, B, A_ref, B_ref, lam, factor)


@pytest.mark.parametrize("factor", ["A", "B"])
def test_default_is_the_official_default(x64, factor):
    """No strength given: rotate_lambda = 1.5, hard Procrustes over O(r)."""
    A, B, A_ref, B_ref = sign_flip_case(7)
    want_A, want_B, rots = ref.align_clients(A, B, A_ref, B_ref, factor)
    got_A, got_B = cj.fedrot_align(A, B, A_ref, B_ref, factor=factor)
    np.testing.assert_allclose(got_A, want_A, atol=TOL)
    np.testing.assert_allclose(got_B, want_B, atol=TOL)
    assert (np.linalg.det(rots) < 0).any()  # the default does use reflections here


def test_float32_matches_transcription():
    """The official code computes in float32; ours too for float32 factors."""
    A, B, A_ref, B_ref = (np.float32(x) for x in random_case(11))
    for factor in ("B",):  # one factor: the float64 cases cover both
        for lam in (0.4, 1.0, 1.5):
            want = ref.align_clients(*(np.float64(x) for x in (A, B, A_ref, B_ref)), factor, lam)
            got = cj.fedrot_align(A, B, A_ref, B_ref, strength=lam, factor=factor)
            np.testing.assert_allclose(got[0], want[0], atol=2e-5)
            np.testing.assert_allclose(got[1], want[1], atol=2e-5)


@pytest.mark.parametrize("factor", ["A", "B"])
def test_sign_flips_match_transcription(x64, factor):
    for seed in range(3):
        A, B, A_ref, B_ref = sign_flip_case(seed)
        for lam in LAMBDAS:
            assert_matches_transcription(A, B, A_ref, B_ref, lam, factor)


@pytest.mark.parametrize("factor", ["A", "B"])
def test_sign_flips_aggregation_error(x64, factor):
    """Over O(r) the sign flips are undone (error ~ noise); rotation only leaves the
    reflected clients misaligned."""
    A, B, A_ref, B_ref = sign_flip_case(3)
    w = np.ones(N)
    fedit = ref.relative_aggregation_error(A, B, w)
    errors = {}
    for lam in (1.0, 1.5):
        A2, B2 = cj.fedrot_align(A, B, A_ref, B_ref, strength=lam, factor=factor)
        errors[lam] = ref.relative_aggregation_error(np.asarray(A2), np.asarray(B2), w)
        # cj.aggregation_error agrees with the reference's numerator
        exact = np.linalg.norm(np.einsum("npr,nrq->pq", B, A) / N)
        np.testing.assert_allclose(cj.aggregation_error(A2, B2) / exact, errors[lam], rtol=1e-8)
    assert errors[1.5] < 1e-2, errors
    assert errors[1.0] > 0.1 and fedit > 0.3, (errors, fedit)
    assert errors[1.0] > 30 * errors[1.5]


def test_reflection_is_undone_only_over_O_r(x64):
    """A client that is the reference reflected in a random hyperplane (Householder)."""
    rng = np.random.default_rng(5)
    _, B, A_ref, B_ref = random_case(5)
    v = rng.normal(size=(R, 1))
    house = np.eye(R) - 2 * v @ v.T / (v.T @ v)
    A = np.stack([house @ A_ref] * N) + 1e-4 * rng.normal(size=(N, R, Q))
    for lam in LAMBDAS:
        assert_matches_transcription(A, B, A_ref, B_ref, lam, "A")
    hard, _ = cj.fedrot_align(A, B, A_ref, B_ref, factor="A")
    rotation, _ = cj.fedrot_align(A, B, A_ref, B_ref, strength=1.0, factor="A")
    assert np.linalg.norm(np.asarray(hard) - A_ref, axis=(1, 2)).max() < 1e-3
    assert np.linalg.norm(np.asarray(rotation) - A_ref, axis=(1, 2)).min() > 0.1


@pytest.mark.parametrize("factor", ["A", "B"])
def test_repeated_singular_values(x64, factor):
    """Cross term ``c Q_i`` (all singular values equal): U and V are not unique but the
    polar factor is. SO(r) clients (det Q_i = +1) are unique at every λ; for det -1 the
    SO(r) fix is not (any singular pair could be flipped), so objectives are compared."""
    rng = np.random.default_rng(6)
    Q_ref = np.linalg.qr(rng.normal(size=(Q, R)))[0].T  # orthonormal rows: A A^T = I
    P_ref = np.linalg.qr(rng.normal(size=(P, R)))[0]  # orthonormal columns: B^T B = I
    rots = np.linalg.qr(rng.normal(size=(N, R, R)))[0]
    rots[::2, :, 0] *= -1  # half reflections, half rotations
    dets = np.linalg.det(rots)
    A = np.swapaxes(rots, 1, 2) @ Q_ref * 2.0
    B = P_ref @ rots * 3.0
    assert (dets < 0).any() and (dets > 0).any()
    # Hard over O(r) (λ = 1.5): unique for every client.
    assert_matches_transcription(A, B, Q_ref, P_ref, 1.5, factor)
    proper = dets > 0
    k, target = (0, Q_ref) if factor == "A" else (1, P_ref)
    for lam in LAMBDAS:
        got = cj.fedrot_align(A, B, Q_ref, P_ref, strength=lam, factor=factor)
        want = ref.align_clients(A, B, Q_ref, P_ref, factor, lam)
        for g, w in zip(got, want, strict=False):
            np.testing.assert_allclose(np.asarray(g)[proper], w[proper], atol=TOL)
        if lam == 1.0:  # det -1: same objective as the transcription, a proper rotation
            np.testing.assert_allclose(
                np.linalg.norm(np.asarray(got[k]) - target, axis=(1, 2)),
                np.linalg.norm(want[k] - target, axis=(1, 2)),
                atol=TOL,
            )


@pytest.mark.parametrize("factor", ["A", "B"])
def test_near_degenerate_singular_values(x64, factor):
    """Singular values 1, 1 + 1e-9, ... of a nonsingular cross term: the polar factor is
    well conditioned (it depends on sums of singular values, not their gaps)."""
    rng = np.random.default_rng(8)
    u = np.linalg.qr(rng.normal(size=(N, R, R)))[0]
    v = np.linalg.qr(rng.normal(size=(N, R, R)))[0]
    # det(U V^T) > 0 so the SO(r) fix (which needs a gap below) does not apply.
    u[:, :, -1] *= np.sign(np.linalg.det(u) * np.linalg.det(v))[:, None]
    s = np.array([1.0 + 1e-9, 1.0, 1.0 - 1e-9, 0.5])
    cross = u * s[None, None, :] @ np.swapaxes(v, 1, 2)
    # Realise the cross term: A_ref with orthonormal rows, A_i = cross_i A_ref.
    A_ref = np.linalg.qr(rng.normal(size=(Q, R)))[0].T
    B_ref = np.linalg.qr(rng.normal(size=(P, R)))[0]
    A = cross @ A_ref
    B = B_ref @ np.swapaxes(cross, 1, 2)  # B_i^T B_ref = cross_i
    for lam in LAMBDAS:
        assert_matches_transcription(A, B, A_ref, B_ref, lam, factor)


@pytest.mark.parametrize("factor", ["A", "B"])
def test_rank_deficient_cross_term_objective(x64, factor):
    """A reference of rank r - 1: the hard optimum is not unique; its objective is."""
    A, B, A_ref, B_ref = random_case(9)
    A_ref = A_ref.copy()
    A_ref[-1] = 0.0
    B_ref = B_ref.copy()
    B_ref[:, -1] = 0.0
    for lam in (1.0, 1.5):
        got = cj.fedrot_align(A, B, A_ref, B_ref, strength=lam, factor=factor)
        want = ref.align_clients(A, B, A_ref, B_ref, factor, lam)
        k, target = (0, A_ref) if factor == "A" else (1, B_ref)
        np.testing.assert_allclose(
            np.linalg.norm(np.asarray(got[k]) - target, axis=(1, 2)),
            np.linalg.norm(want[k] - target, axis=(1, 2)),
            atol=TOL,
        )
        products = np.einsum("npr,nrq->npq", np.asarray(got[1]), np.asarray(got[0]))
        np.testing.assert_allclose(products, np.einsum("npr,nrq->npq", B, A), atol=1e-10)


def test_traced_strength_grid_crosses_the_hard_threshold(x64):
    """λ is traced: one compiled function serves soft, λ = 1 and hard strengths."""
    A, B, A_ref, B_ref = sign_flip_case(4)
    grid = jnp.asarray(LAMBDAS)
    align = jax.vmap(lambda s: cj.fedrot_align(A, B, A_ref, B_ref, strength=s, factor="B"))
    got_A, got_B = align(grid)
    for k, lam in enumerate(LAMBDAS):
        want_A, want_B, _ = ref.align_clients(A, B, A_ref, B_ref, "B", lam)
        np.testing.assert_allclose(got_A[k], want_A, atol=TOL)
        np.testing.assert_allclose(got_B[k], want_B, atol=TOL)


def test_allow_reflection_overrides(x64):
    """False: SO(r) at every λ (λ > 1 equals the official λ = 1); True: O(r) at λ = 1."""
    A, B, A_ref, B_ref = sign_flip_case(5)
    want_so = ref.align_clients(A, B, A_ref, B_ref, "A", 1.0)
    got = cj.fedrot_align(A, B, A_ref, B_ref, strength=1.5, allow_reflection=False)
    np.testing.assert_allclose(got[0], want_so[0], atol=TOL)
    want_o = ref.align_clients(A, B, A_ref, B_ref, "A", 1.5)
    got = cj.fedrot_align(A, B, A_ref, B_ref, strength=1.0, allow_reflection=True)
    np.testing.assert_allclose(got[0], want_o[0], atol=TOL)


def test_aggregator_default_is_the_official_round(x64):
    """cj.fedrot(): round 0 unaligned, then A on odd and B on even rounds at λ = 1.5,
    reference = the broadcast global adapter, then the weighted factor average."""
    A, B, A_ref, B_ref = sign_flip_case(6)
    w = np.random.default_rng(0).uniform(0.5, 2.0, size=N)
    agg = cj.fedrot()
    global_ = {"m": cj.LoRAFactors(B=B_ref, A=A_ref)}
    for t in range(5):
        factor = ref.aligned_factor(t)
        if factor is None:
            A2, B2 = A, B
        else:
            A2, B2, _ = ref.align_clients(A, B, A_ref, B_ref, factor)
        want_A, want_B = ref.fedavg(A2, B2, w)
        clients = {"m": cj.LoRAFactors(B=B, A=A)}
        res = agg.aggregate(clients, global_, w, jnp.int32(t), jax.random.key(0))
        np.testing.assert_allclose(res.global_["m"].A, want_A, atol=TOL)
        np.testing.assert_allclose(res.global_["m"].B, want_B, atol=TOL)
        assert int(res.diagnostics["fedrot/aligned_factor"]) == {None: 0, "A": 1, "B": 2}[factor]
