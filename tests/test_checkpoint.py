"""Checkpoints: run_rounds' Orbax directories, the single-file .npz format, and their faults.

Every fault must give a one-line :class:`clair_jax.CheckpointError` naming the
file or directory, or a clean resume: truncated, corrupted and tampered files,
a directory that cannot be written, and a run killed with SIGKILL at random
moments (in a subprocess), after which resuming loses at most the round in
flight and ends with the state and history of an uninterrupted run.
"""

import functools
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import clair_jax as cj
from clair_jax._src.federated.run_checkpoint import RunCheckpoint

# The tiny federation of a run (also executed by the killed subprocesses).
SETUP = """
import jax, optax
from flax import nnx
import clair_jax as cj

N = 6
CONFIG = cj.TransformerConfig(vocab_size=8, max_len=6, num_layers=1, width=8, num_heads=2,
                              mlp_width=8, lora_rank=2)
FED = cj.data.FederationConfig(num_clients=N, contaminated_fraction=0.0, vocab_size=8, length=3,
                               train_examples=4, test_examples=5, shared_tokens=2,
                               specific_tokens=1)
graphdef, base, adapters = cj.split_lora(cj.LoRATransformer(CONFIG, rngs=nnx.Rngs(0)))
fed = cj.data.make_federation(jax.random.key(1), FED)
round_fn = cj.make_round(graphdef, base, cj.fedit(), local_steps=2, batch_size=3,
                         optimizer=optax.adam(0.05), participation=4)
init = cj.init_server_state(adapters, N)
key = jax.random.key(11)
"""

CHILD = (
    SETUP
    + """
import sys
rounds = int(sys.argv[2])
cj.run_rounds(round_fn, init, fed.train, key, rounds, checkpoint=sys.argv[1], run_id="kill",
              callback=lambda state, m: print("done", int(state.round), flush=True))
print("finished", flush=True)
"""
)


@functools.lru_cache(maxsize=1)
def setup() -> dict:
    scope: dict = {}
    exec(SETUP, scope)
    return scope


@functools.lru_cache(maxsize=4)
def reference(rounds: int):
    s = setup()
    return cj.run_rounds(s["round_fn"], s["init"], s["fed"].train, s["key"], rounds)


def trees_equal(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(
        np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(x, y)
        for x, y in zip(la, lb, strict=True)
    )


def run(rounds, checkpoint, **kwargs):
    s = setup()
    return cj.run_rounds(
        s["round_fn"], s["init"], s["fed"].train, s["key"], rounds, checkpoint=checkpoint, **kwargs
    )


def one_line(err, path) -> str:
    message = str(err.value)
    assert "\n" not in message and str(path) in message, message
    return message


# --- run_rounds: Orbax directories ----------------------------------------------------------


def test_resume_equals_an_uninterrupted_run(tmp_path):
    full, history = reference(3)
    assert len(history) == 3 and int(full.round) == 3
    path = tmp_path / "run"
    part, first = run(1, path)
    assert int(part.round) == 1 and len(first) == 1
    # A fresh process would start again from the initial state: the checkpoint wins, and
    # one restore gives the state and the history of the rounds already done.
    resumed, history2 = run(3, path)
    assert trees_equal(resumed, full) and trees_equal(history2, history)
    assert sorted(os.listdir(path)) == ["2", "3"]  # keep_checkpoints=2, no temporaries
    assert trees_equal(cj.load_checkpoint(path, like=setup()["init"]), full)
    # Nothing left to do: the state and the history come back unchanged.
    calls = []
    again, history3 = run(3, path, callback=lambda *a: calls.append(a))
    assert calls == [] and trees_equal(again, full) and trees_equal(history3, history)
    with pytest.raises(cj.CheckpointError, match="beyond num_rounds=2: pass num_rounds >= 3"):
        run(2, path)
    with pytest.raises(ValueError, match="num_rounds must be >= 0, got -1"):
        run(-1, None)
    with pytest.raises(TypeError, match="num_rounds must be an int, got float"):
        run(2.5, None)
    with pytest.raises(ValueError, match="keep_checkpoints must be an int >= 1, got 0"):
        run(2, path, keep_checkpoints=0)


def test_async_checkpoint_and_keep(tmp_path):
    full, history = reference(3)
    state, got = run(3, tmp_path / "a", async_checkpoint=True, keep_checkpoints=1)
    assert trees_equal(state, full) and trees_equal(got, history)
    assert os.listdir(tmp_path / "a") == ["3"]


def test_checkpoint_of_another_run_is_refused(tmp_path):
    s = setup()
    path = tmp_path / "run"
    run(1, path, run_id="fedit")
    args = (s["round_fn"], s["init"], s["fed"].train)
    # Another seed, or the same seed under another run_id, must not continue this run.
    with pytest.raises(cj.CheckpointError, match="written by another run") as err:
        cj.run_rounds(*args, jax.random.key(12), 2, checkpoint=path, run_id="fedit")
    one_line(err, path / "1")
    with pytest.raises(cj.CheckpointError, match="written by another run"):
        run(2, path, run_id="krum")
    with pytest.raises(TypeError, match="run_id must be a str"):
        run(2, path, run_id=3)
    state, history = run(2, path, run_id="fedit")
    assert int(state.round) == 2 and len(history) == 2


def test_state_that_does_not_fit_is_refused_before_reading(tmp_path):
    s = setup()
    path = tmp_path / "run"
    run(1, path)
    other = cj.init_server_state(s["adapters"], 7)
    with pytest.raises(cj.CheckpointError, match=r"\.B: stored \(6, 8, 2\) float32, expected \(7,"):
        cj.run_rounds(s["round_fn"], other, s["fed"].train, s["key"], 2, checkpoint=path)
    with pytest.raises(cj.CheckpointError, match="holds another structure"):
        cj.load_checkpoint(path, like={"x": jnp.zeros(3)})


def tampered(tmp_path, step, change):
    """A directory whose step ``step`` holds round 1's state changed by ``change``."""
    path = tmp_path / "t"
    run(1, path, run_id=None)
    state = cj.load_checkpoint(path, like=setup()["init"])
    history = reference(1)[1]
    shutil.rmtree(path / str(step), ignore_errors=True)
    record = {"identity": cj._src.federated.checkpoint.run_identity(setup()["key"], None)}
    with RunCheckpoint(str(path)) as store:
        store.save(change(state), history, {**record, "first_round": 0}, step=step)
    return path


@pytest.mark.parametrize(
    "step, change, message",
    [
        (5, lambda s: s._replace(round=jnp.int32(-5)), "holds round -5 in step 5"),
        (10**9, lambda s: s._replace(round=jnp.int32(10**9)), "holds round 1000000000 with 1"),
        (3, lambda s: s, "holds round 1 in step 3"),
        (1, lambda s: s._replace(flag_counts=s.flag_counts.at[0].set(-1)), None),
        (1, lambda s: s._replace(round=jnp.int32(1)), None),
    ],
)
def test_tampered_counters_are_refused(tmp_path, step, change, message):
    path = tampered(tmp_path, step, change)
    if message is None:  # a legitimate step resumes
        state, history = run(3, path)
        assert int(state.round) == 3 and len(history) == 3
        return
    with pytest.raises(cj.CheckpointError, match=message) as err:
        run(3, path)
    one_line(err, path / str(step))


def test_non_finite_state_is_refused(tmp_path):
    def nan(state):
        name = sorted(state.global_)[0]
        bad = state.global_[name]._replace(A=state.global_[name].A.at[0, 0].set(jnp.nan))
        return state._replace(global_={**state.global_, name: bad})

    path = tampered(tmp_path, 1, nan)
    with pytest.raises(cj.CheckpointError, match="NaN or infinite") as err:
        run(3, path)
    one_line(err, path / "1")


# A failed tensorstore read leaves callbacks that fire on Orbax's closed event loop
# ("Exception ignored", printed at garbage collection): noise, not a failure.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_every_corrupted_or_truncated_file_fails_cleanly(tmp_path):
    """Damage each file of the latest step: a one-line error naming the step, or a clean resume."""
    full, history = reference(2)
    clean = tmp_path / "clean"
    run(2, clean, keep_checkpoints=1)
    files = sorted(
        os.path.relpath(os.path.join(d, f), clean / "2")
        for d, _, fs in os.walk(clean / "2")
        for f in fs
    )
    assert any(f.startswith("state") for f in files) and "run/metadata" in files
    rng = random.Random(0)
    outcomes = {}
    for i, name in enumerate(files):
        for damage in ("truncate", "garbage"):
            path = tmp_path / f"c{i}{damage}"
            shutil.copytree(clean, path)
            target = path / "2" / name
            data = target.read_bytes()
            if damage == "truncate":
                target.write_bytes(data[: len(data) // 2])
            else:
                target.write_bytes(bytes(rng.randrange(256) for _ in range(max(len(data), 16))))
            try:
                state, got = run(2, path)
            except cj.CheckpointError as err:
                message = str(err)
                assert "\n" not in message and str(path / "2") in message, (name, message)
                outcomes[name, damage] = "error"
            else:  # the damage did not matter (e.g. Orbax's own step metadata)
                assert trees_equal(state, full) and trees_equal(got, history), (name, damage)
                outcomes[name, damage] = "resumed"
    # The state's arrays, the history and the run record are all guarded.
    assert outcomes["run/metadata", "garbage"] == "error"
    assert outcomes["history/metadata", "truncate"] == "error"
    assert any(o == "error" for (n, _), o in outcomes.items() if n.startswith("state/"))


def test_unwritable_directory_is_found_before_round_zero(tmp_path):
    s = setup()
    calls = []

    def round_fn(*args):
        calls.append(args)
        return s["round_fn"](*args)

    blocker = tmp_path / "file"
    blocker.write_text("x")
    for path in (blocker / "run", blocker):
        with pytest.raises(cj.CheckpointError) as err:
            cj.run_rounds(round_fn, s["init"], s["fed"].train, s["key"], 2, checkpoint=path)
        one_line(err, path)
    # A read-only location: /proc refuses new directories even to root.
    readonly = tmp_path / "ro"
    if os.geteuid() != 0:
        readonly.mkdir()
        os.chmod(readonly, 0o500)
    else:
        readonly = "/proc/clair_jax_checkpoint"
    with pytest.raises(cj.CheckpointError, match="not writable") as err:
        cj.run_rounds(round_fn, s["init"], s["fed"].train, s["key"], 2, checkpoint=readonly)
    one_line(err, readonly)
    assert calls == []


def test_old_single_file_checkpoint_says_what_to_do(tmp_path):
    s = setup()
    old = tmp_path / "run.npz"
    cj.save_checkpoint(old, s["init"])
    with pytest.raises(cj.CheckpointError, match=r"cj.load_checkpoint\(.*\) and pass a new") as e:
        run(2, old)
    one_line(e, old)
    # Doing what it says continues the run.
    state = cj.load_checkpoint(old, like=s["init"])
    final, history = cj.run_rounds(
        s["round_fn"], state, s["fed"].train, s["key"], 2, checkpoint=tmp_path / "new"
    )
    assert trees_equal(final, reference(2)[0]) and len(history) == 2


# --- SIGKILL at random moments -------------------------------------------------------------


def run_and_kill(path, rounds: int, delay: float) -> tuple[int, int]:
    """Runs CHILD until round 1 is done, SIGKILLs it ``delay`` seconds later.

    Returns the rounds it reported done (a round is reported after its
    checkpoint is written) and the latest step in the directory afterwards.
    """
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), str(rounds)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    done = 0
    try:
        for line in proc.stdout:  # the first line after a resume may report a later round
            if line.startswith("done"):
                done = int(line.split()[1])
                break
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        for line in proc.stdout:
            if line.startswith("done"):
                done = int(line.split()[1])
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    with RunCheckpoint(str(path), read_only=True) as store:
        latest = store.manager.latest_step()
    return done, latest


def kill_and_resume(tmp_path, seed: int, kills: int, rounds: int = 12) -> None:
    """Kills ``kills`` runs of CHILD at random moments (each resuming the last), then resumes."""
    path = tmp_path / f"kill{seed}"
    rng = random.Random(seed)
    for _ in range(kills):
        done, latest = run_and_kill(path, rounds, rng.uniform(0.0, 1.5))
        assert latest is not None and latest >= done, (latest, done)  # only the round in flight
    s = setup()
    state, history = cj.run_rounds(
        s["round_fn"], s["init"], s["fed"].train, s["key"], rounds, checkpoint=path, run_id="kill"
    )
    full, expected = reference(rounds)
    assert trees_equal(state, full) and trees_equal(history, expected)
    assert all(name.isdigit() for name in os.listdir(path)), os.listdir(path)  # no temporaries


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_at_most_the_round_in_flight(tmp_path):
    kill_and_resume(tmp_path, seed=0, kills=1)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(1, 9))
def test_sigkill_sweep(tmp_path, seed):
    kill_and_resume(tmp_path, seed, kills=3)


# --- single-file checkpoints (.npz) --------------------------------------------------------


def test_checkpoint_files_get_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        path = tmp_path / "a.npz"
        cj.save_checkpoint(path, {"x": jnp.zeros(2)})
        assert path.stat().st_mode & 0o777 == 0o644  # not mkstemp's private 0600
        os.chmod(path, 0o640)
        cj.save_checkpoint(path, {"x": jnp.ones(2)})  # rewriting keeps the file's mode
        assert path.stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)


def test_orphan_temporary_files_are_removed(tmp_path):
    path = tmp_path / "a.npz"
    orphan = tmp_path / ".tmp-a.npz-abc123"  # what a writer killed before its rename leaves
    orphan.write_bytes(b"partial")
    other = tmp_path / ".tmp-b.npz-abc123"  # another file's: left alone
    other.write_bytes(b"partial")
    cj.save_checkpoint(path, {"x": jnp.zeros(2)})
    assert sorted(os.listdir(tmp_path)) == [".tmp-b.npz-abc123", "a.npz"]


def test_checkpoint_mismatch_is_an_error(tmp_path):
    s = setup()
    path = tmp_path / "state.npz"
    cj.save_checkpoint(path, s["init"])
    stored = r"\.B: stored \(6, 8, 2\) float32, expected \(7,"
    with pytest.raises(cj.CheckpointError, match=stored) as e:
        cj.load_checkpoint(path, like=cj.init_server_state(s["adapters"], 7))
    one_line(e, path)
    with pytest.raises(cj.CheckpointError, match="structure"):
        cj.load_checkpoint(path, like={"other": jnp.zeros(3)})
    with pytest.raises(cj.CheckpointError, match="does not exist"):
        cj.load_checkpoint(tmp_path / "missing.npz", like={"other": jnp.zeros(3)})


def test_half_precision_checkpoints_round_trip_exactly(tmp_path):
    s = setup()
    tree = {
        "state": cj.init_server_state(
            jax.tree.map(lambda x: x.astype(jnp.bfloat16), s["adapters"]), 2
        ),
        "f16": jnp.linspace(-1, 1, 5).astype(jnp.float16) / 3,
        "bf16": jnp.linspace(-1, 1, 5).astype(jnp.bfloat16) / 3,
        "scalar": jnp.asarray(1 / 3, jnp.bfloat16),
    }
    path = tmp_path / "half.npz"
    cj.save_checkpoint(path, tree)
    loaded = cj.load_checkpoint(path, like=tree)
    for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(loaded), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()  # bit for bit
    with pytest.raises(ValueError, match=r"stored bfloat16, expected \(5,\) float16"):
        cj.load_checkpoint(path, like={**tree, "bf16": tree["f16"]})
    # Checkpoints written by plain numpy.savez still load (bfloat16 there is raw void '|V2').
    old = tmp_path / "old.npz"
    np.savez(old, **{"['a']": np.arange(3, dtype=np.float32), "['b']": np.asarray(tree["bf16"])})
    like = {"a": jnp.zeros(3), "b": jnp.zeros(5, jnp.bfloat16)}
    got = cj.load_checkpoint(old, like=like)
    np.testing.assert_array_equal(got["a"], np.arange(3))
    np.testing.assert_array_equal(np.asarray(got["b"]), np.asarray(tree["bf16"]))


def test_damaged_npz_files_give_one_line_errors(tmp_path):
    s = setup()
    path = tmp_path / "state.npz"
    cj.save_checkpoint(path, s["init"])
    data = path.read_bytes()
    rng = random.Random(0)
    cases = {
        "empty": b"",
        "random": bytes(rng.randrange(256) for _ in range(4096)),
        **{f"cut{k}": data[: len(data) * k // 8] for k in range(1, 8)},
    }
    for i in range(4):  # flipped bytes inside the archive
        pos = rng.randrange(len(data))
        cases[f"flip{i}"] = data[:pos] + bytes([data[pos] ^ 0xFF]) + data[pos + 1 :]
    for name, content in cases.items():
        bad = tmp_path / f"{name}.npz"
        bad.write_bytes(content)
        try:
            got = cj.load_checkpoint(bad, like=s["init"])
        except cj.CheckpointError as err:
            message = str(err)
            assert "\n" not in message and str(bad) in message, (name, message)
            assert "allow_pickle" not in message
        else:  # a flip in a part the reader ignores (e.g. a zip comment field)
            assert name.startswith("flip") and trees_equal(got, s["init"]), name


def test_npz_headers_are_checked_before_the_data(tmp_path):
    # A small file whose entry expands to 20 MB: refused from its header, never decompressed.
    bomb = tmp_path / "bomb.npz"
    np.savez_compressed(bomb, **{"['x']": np.zeros(5_000_000, np.float32)})
    assert bomb.stat().st_size < 100_000
    with pytest.raises(cj.CheckpointError, match=r"stored \(5000000,\) float32, expected \(5,\)"):
        cj.load_checkpoint(bomb, like={"x": jnp.zeros(5)})
    # A header that lies about the entry's size.
    liar = tmp_path / "liar.npz"
    with zipfile.ZipFile(liar, "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("['x'].npy", "w") as member:
            np.lib.format.write_array_header_1_0(
                member, {"descr": "<f4", "fortran_order": False, "shape": (5,)}
            )
            member.write(np.zeros(1_000_000, np.float32).tobytes())
    with pytest.raises(cj.CheckpointError, match="declares .* bytes"):
        cj.load_checkpoint(liar, like={"x": jnp.zeros(5)})
    # Objects are never unpickled; NaN and infinite values are refused.
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, **{"['x']": np.array([{"a": 1}] * 5, dtype=object)})
    with pytest.raises(cj.CheckpointError, match="never unpickled"):
        cj.load_checkpoint(pickled, like={"x": jnp.zeros(5)})
    nan = tmp_path / "nan.npz"
    cj.save_checkpoint(nan, {"x": jnp.array([0.0, jnp.nan, 1.0, 2.0, 3.0])})
    with pytest.raises(cj.CheckpointError, match=r"entry \['x'\] holds NaN"):
        cj.load_checkpoint(nan, like={"x": jnp.zeros(5)})
    # The reserved entries are bounded strings.
    odd = tmp_path / "odd.npz"
    np.savez(odd, **{"['x']": np.zeros(5, np.float32), "__dtypes__": np.zeros(3)})
    with pytest.raises(cj.CheckpointError, match="expected a string"):
        cj.load_checkpoint(odd, like={"x": jnp.zeros(5)})
