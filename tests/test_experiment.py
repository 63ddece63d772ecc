"""The text-copying experiment end to end on a tiny configuration, and its pieces."""

import json
import re

import jax
import numpy as np
import pytest

import clair_jax as cj
from clair_jax import demo
from clair_jax._src import data as data_lib
from clair_jax.experiments import text_copy

TINY = [
    "--clients", "6",
    "--layers", "1",
    "--rounds", "2",
    "--local-steps", "2",
    "--pretrain-steps", "20",
    "--test-examples", "8",
    "--no-progress",
]  # fmt: skip


def test_detection_counts_majority_flags():
    # Client 0 flagged in 2 of 3 rounds (majority), client 1 in 1 of 3, client 2
    # in 1 of 2 (not a majority), client 3 never took part.
    d = text_copy.detection([2, 1, 1, 0], [3, 3, 2, 0], [True, True, False, False])
    assert d["flagged"] == [True, False, False, False]
    assert d["precision"] == 1.0 and d["recall"] == 0.5
    assert d["f1"] == pytest.approx(2 / 3)
    nothing = text_copy.detection([0, 0], [1, 1], [True, False])
    assert nothing["precision"] is None and nothing["f1"] == 0.0
    clean = text_copy.detection([0, 0], [1, 1], [False, False])
    assert clean["f1"] is None


def test_parse_args_defaults_and_errors(capsys):
    quick = text_copy.parse_args(["--quick"])
    assert quick.clients == text_copy.QUICK["clients"] >= 20
    assert quick.fraction == 0.3 and quick.methods == list(text_copy.METHODS)
    assert text_copy.parse_args(["--methods", "clair, fedit"]).methods == ["clair", "fedit"]
    with pytest.raises(SystemExit):
        text_copy.parse_args(["--methods", "fedit,nope"])
    assert "unknown methods" in capsys.readouterr().err
    assert (quick.optimizer, quick.lr, quick.clair_measure) == ("adam", 5e-3, "adapter")
    assert (quick.clair_flagged, quick.clair_space) == ("trained", "row")
    assert text_copy.parse_args(["--clair-space", "column"]).clair_space == "column"
    assert (quick.clair_rank, text_copy.parse_args(["--clair-rank", "4"]).clair_rank) == (
        "lora",
        "4",
    )
    with pytest.raises(SystemExit):
        text_copy.parse_args(["--clair-rank", "-2"])
    assert "--clair-rank must be" in capsys.readouterr().err
    with pytest.raises(ValueError, match="clair_rank must be"):
        text_copy.make_aggregator("clair", participants=4, fraction=0.25, clair_rank="wide")
    assert text_copy.parse_args(["--clair-flagged", "global"]).clair_flagged == "global"
    sgd = text_copy.parse_args(["--optimizer", "sgd", "--clair-detection", "client"])
    assert (sgd.lr, sgd.clair_detection) == (0.3, "client")
    assert text_copy.parse_args(["--optimizer", "sgd", "--lr", "0.1"]).lr == 0.1
    with pytest.raises(SystemExit):
        text_copy.parse_args(["--optimizer", "lbfgs"])
    rule = text_copy.make_aggregator(
        "clair", participants=4, fraction=0.25, clair_measure="update", clair_detection="client"
    )
    assert rule.uses_start


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--clients", "1"], "--clients must be >= 2, got 1"),
        (["--rounds", "0"], "--rounds must be >= 1"),
        (["--rank", "0"], "--rank must be >= 1"),
        (["--layers", "0"], "--layers must be >= 1"),
        (["--local-steps", "0"], "--local-steps must be >= 1"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--train-examples", "0"], "--train-examples must be >= 1"),
        (["--test-examples", "0"], "--test-examples must be >= 1"),
        (["--pretrain-steps", "-5"], "--pretrain-steps must be >= 0"),
        (["--fraction", "1.5"], r"--fraction must be in \[0, 1\)"),
        (["--fraction", "nan"], r"--fraction must be in \[0, 1\)"),
        (["--fraction", "-0.1"], r"--fraction must be in \[0, 1\)"),
        (["--clients", "4", "--fraction", "0.9"], "leaving no benign client"),
        (["--lr", "0"], "--lr must be finite and > 0"),
        (["--lr", "nan"], "--lr must be finite and > 0"),
        (["--lr", "-1"], "--lr must be finite and > 0"),
        (["--clients", "4", "--participation", "0"], r"--participation must be in \[1, "),
        (["--clients", "4", "--participation", "5"], r"--participation must be in \[1, "),
        (["--methods", ""], "--methods is empty"),
        (["--methods", " , "], "--methods is empty"),
        # Krum named explicitly: f = round(0.3 * 5) = 2 needs 7 participants.
        (["--clients", "5", "--methods", "fedit,krum"], "krum needs at least 2f \\+ 3 = 7"),
        (["--participation", "2", "--methods", "multi_krum"], "got 2 \\(--participation"),
    ],
)
def test_parse_args_rejects_bad_numbers(argv, message, capsys):
    with pytest.raises(SystemExit):
        text_copy.parse_args(argv)
    err = capsys.readouterr().err
    assert "usage:" in err and re.search(message, err), err


def test_parse_args_krum_in_the_default_methods(capsys):
    # All methods by default: Krum and Multi-Krum are left out, with a note, when they
    # cannot run (f = 2 of 5 clients), and kept when they can.
    args = text_copy.parse_args(["--clients", "5"])
    assert args.methods == [m for m in text_copy.METHODS if m not in text_copy.KRUM_METHODS]
    assert "note: skipping krum, multi_krum" in capsys.readouterr().err
    assert text_copy.parse_args(["--clients", "7"]).methods == list(text_copy.METHODS)
    zero = text_copy.parse_args(["--clients", "3", "--fraction", "0", "--methods", "krum"])
    assert zero.methods == ["krum"]  # f = 0 needs 3
    assert text_copy.parse_args(["--pretrain-steps", "0"]).pretrain_steps == 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--rank", "100"], r"--rank \(100\) must not exceed --rows \(64\)"),
        (["--rank", "0"], "--rank must be >= 1"),
        (["--noise", "-1"], "--noise must be finite and >= 0"),
        (["--noise", "inf"], "--noise must be finite and >= 0"),
        (["--fraction", "1.5"], r"--fraction must be in \[0, 1\)"),
        (["--clients", "2", "--fraction", "0.75"], "leaving no benign client"),
        (["--clients", "0"], "--clients must be >= 1"),
    ],
)
def test_demo_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        demo.main(argv)
    err = capsys.readouterr().err
    assert "usage:" in err and re.search(message, err), err


def test_demo_recovers_the_planted_federation(capsys):
    """Both solvers and CLAIR find the 4 contaminated clients of 12; CLAIR estimates the
    planted rank 2 (the solvers' L keeps noise directions at the fixed λ's)."""
    demo.main(["--clients", "12", "--rows", "10", "--cols", "3", "--rank", "2", "--seed", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert "4 contaminated" in lines[0]
    rows = {line.split()[0]: line.split() for line in lines[3:]}
    assert list(rows) == ["fista", "admm", "clair"]
    for name, (_, iters, conv, _rank, err, flagged, precision, recall, *_) in rows.items():
        assert conv == "True" and int(iters) > 0, name
        assert (flagged, precision, recall) == ("4", "1.00", "1.00"), name
        assert float(err) < 0.05, name
    assert rows["clair"][3] == "2"


@pytest.mark.slow
def test_token_kinds_and_accuracy_by_token():
    config = data_lib.FederationConfig(num_clients=3, vocab_size=12, length=4, test_examples=5)
    fed = data_lib.make_federation(jax.random.key(3), config)
    kinds = text_copy.token_kinds(fed, 4)
    inputs, targets = np.asarray(fed.test.inputs), np.asarray(fed.test.targets)
    maps = np.asarray(fed.mappings)
    assert kinds.shape == inputs.shape and np.all(kinds[..., :4] == -1)
    for i in range(3):
        source = inputs[i, :, :4]
        np.testing.assert_array_equal(targets[i, :, 4:], maps[i][source])  # t copies t - 4
        expected = np.where(
            np.isin(source, np.asarray(fed.shared_sources)),
            0,
            np.where(np.isin(source, np.asarray(fed.specific_sources)), 1, 2),
        )
        np.testing.assert_array_equal(kinds[i, :, 4:], expected)
    # Right exactly on the shared tokens of the benign clients (client 1, contaminated,
    # is right everywhere and must not count).
    correct = (kinds == 0) | (np.arange(3) == 1)[:, None, None]
    got = text_copy.accuracy_by_token(correct, kinds, np.array([True, False, True]))
    assert got == {"shared": 1.0, "specific": 0.0, "other": 0.0}


def test_unknown_method_is_a_value_error():
    with pytest.raises(ValueError, match="unknown method"):
        text_copy.make_aggregator("nope", participants=4, fraction=0.25)


@pytest.mark.slow
def test_pretrain_cache_round_trip(tmp_path):
    config = cj.TransformerConfig(vocab_size=16, max_len=8, lora_rank=2)
    _, base, _, info = text_copy.pretrain(
        config, length=4, steps=5, cache_dir=str(tmp_path), progress=False
    )
    assert not info["loaded"] and np.isfinite(info["loss"])
    _, again, _, info2 = text_copy.pretrain(
        config, length=4, steps=5, cache_dir=str(tmp_path), progress=False
    )
    assert info2["loaded"] and info2["cache_file"] == info["cache_file"]
    for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Another setting is another cache entry.
    _, _, _, info3 = text_copy.pretrain(
        config, length=4, steps=6, cache_dir=str(tmp_path), progress=False
    )
    assert not info3["loaded"] and info3["cache_file"] != info["cache_file"]
    with pytest.raises(ValueError, match="max_len"):
        text_copy.pretrain(config, length=5, steps=1, cache_dir=None)


@pytest.mark.slow
def test_tiny_run_writes_table_json_and_plot(tmp_path, capsys):
    out_dir = tmp_path / "out"
    argv = TINY + [
        "--methods", "local_only,fedit,clair",
        "--cache-dir", str(tmp_path / "cache"),
        "--out", str(out_dir),
    ]  # fmt: skip
    text_copy.main(argv)
    printed = capsys.readouterr().out
    assert "| method | benign acc" in printed and "| clair |" in printed
    result = json.loads((out_dir / "text_copy.json").read_text())
    assert list(result["methods"]) == ["local_only", "fedit", "clair"]
    truth = np.asarray(result["contaminated"])
    assert truth.sum() == 2  # 30% of 6, rounded
    for name, r in result["methods"].items():
        assert 0.0 <= r["accuracy"] <= 1.0 and np.isfinite(r["loss"])
        assert len(r["curve"]) == 2 and len(r["accuracy_per_client"]) == 6
        assert len(r["detection"]["flagged"]) == 6, name
        assert set(r["accuracy_by_token"]) == set(text_copy.TOKEN_KINDS)
        # Decompositions that stopped unconverged, per round (CLAIR's; none for the others).
        assert len(r["unconverged_decompositions"]) == 2
        assert all(0 <= k <= 6 for k in r["unconverged_decompositions"]), name
    # Local-only and FedIT never flag anybody.
    assert result["methods"]["fedit"]["detection"]["num_flagged"] == 0
    assert set(result["gaps"]) == {"clair_minus_local_only", "clair_minus_fedit"}
    assert (out_dir / "text_copy.png").stat().st_size > 0


class _Interrupted(Exception):
    pass


@pytest.mark.slow
def test_runs_are_deterministic_and_checkpoints_resume(tmp_path, monkeypatch):
    common = TINY + ["--methods", "fedit", "--cache-dir", str(tmp_path / "cache")]
    first = text_copy.run(text_copy.parse_args(common))
    ckpt = str(tmp_path / "ckpt")
    with_ckpt = text_copy.parse_args(common + ["--checkpoint-dir", ckpt])

    # Interrupted after round 1 of 2 (its checkpoint and history written) ...
    run_rounds = cj.run_rounds

    def interrupted(*args, callback, **kwargs):
        def stop(state, metrics):
            callback(state, metrics)
            raise _Interrupted

        return run_rounds(*args, callback=stop, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(cj, "run_rounds", interrupted)
        with pytest.raises(_Interrupted):
            text_copy.run(with_ckpt)
    # ... then resumed, and resumed again once finished (no more rounds run).
    second = text_copy.run(with_ckpt)
    third = text_copy.run(with_ckpt)
    expected = first["methods"]["fedit"]
    assert len(expected["curve"]) == len(expected["round_f1"]) == 2
    for other in (second, third):
        got = other["methods"]["fedit"]
        np.testing.assert_array_equal(expected["accuracy_per_client"], got["accuracy_per_client"])
        # The per-round results of the earlier runs are kept, not only this call's rounds.
        assert got["curve"] == expected["curve"] and got["round_f1"] == expected["round_f1"]
    (history_file,) = (tmp_path / "ckpt").glob("*/fedit.history.json")
    history = json.loads(history_file.read_text())
    assert history["curve"] == expected["curve"] and len(history["seconds"]) == 2
    assert history["unconverged"] == [0, 0]  # FedIT solves nothing
    assert third["methods"]["fedit"]["seconds"] >= history["seconds"][-1] > 0


def test_config_dataclass_is_the_command_line(capsys):
    """One dataclass for the CLI and the Python API; --help shows every default."""
    import dataclasses
    import importlib
    import pathlib
    import tomllib

    assert text_copy.parse_args(["--quick"]) == text_copy.Config(quick=True).resolved()
    config = text_copy.Config(methods="fedit, clair", rounds=3).resolved()
    assert config.methods == ["fedit", "clair"] and config.rounds == 3 and config.clients == 40
    assert config.resolved() == config  # idempotent
    assert text_copy.Config().out == str(pathlib.Path("benchmarks", "out", "text_copy"))
    with pytest.raises(ValueError, match="--clients must be >= 2"):
        text_copy.Config(clients=1).resolved()
    with pytest.raises(SystemExit):
        text_copy.parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for field in dataclasses.fields(text_copy.Config):
        flag = "--" + field.name.replace("_", "-")
        assert re.search(re.escape(flag) + r"\b(?:(?! --).)*?\(default: ", help_text), flag
    pyproject = pathlib.Path(__file__).parents[1] / "pyproject.toml"
    target = tomllib.loads(pyproject.read_text())["project"]["scripts"]["clair-text-copy"]
    module, name = target.split(":")
    assert getattr(importlib.import_module(module), name) is text_copy.main
