"""The PEFT bridge (clair_jax.peft) against adapters and merged weights made by real PEFT.

The fixtures in tests/fixtures/peft/ were written by make_fixtures.py there (tiny
randomly initialised transformers models, PEFT LoRA adapters with random factors, PEFT's
merged weights and logits). The first part needs only safetensors; the second loads
written adapters in PEFT itself and is skipped without torch, transformers and peft.
"""

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import clair_jax as cj
from clair_jax import peft as cjp

safetensors_numpy = pytest.importorskip("safetensors.numpy")

FIXTURES = Path(__file__).parent / "fixtures" / "peft"
LLAMA = [FIXTURES / "llama" / f"client_{i}" for i in range(3)]
GPT2 = [FIXTURES / "gpt2" / f"client_{i}" for i in range(2)]
PATTERN = FIXTURES / "llama" / "pattern"
ALL = [*LLAMA, PATTERN, *GPT2]
TOL = 1e-6  # float32


def expected(adapter_dir):
    return safetensors_numpy.load_file(adapter_dir.parent / "expected.safetensors")


def stored(adapter_dir):
    return safetensors_numpy.load_file(adapter_dir / "adapter_model.safetensors")


def copy_adapter(src, dst, **changes):
    shutil.copytree(src, dst)
    if changes:
        file = dst / "adapter_config.json"
        data = json.loads(file.read_text())
        data.update(changes)
        file.write_text(json.dumps(data))
    return dst


# --- reading: PEFT's deltas --------------------------------------------------------------


@pytest.mark.parametrize("path", ALL, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_deltas_equal_peft_merged_weights(path):
    adapters, config = cjp.read_adapter(path)
    exp = expected(path)
    modules = sorted(k.split("/", 1)[1] for k in exp if k.startswith("base/"))
    assert sorted(adapters) == modules
    deltas = cjp.delta_weights(adapters, config, base_layout=True)
    for module, f in adapters.items():
        merged = exp[f"merged/{path.name}/{module}"]
        base = exp[f"base/{module}"]
        np.testing.assert_allclose(deltas[module], merged - base, rtol=0, atol=TOL)
        # PEFT's orientation: B (out, r), A (r, in), whatever the base layer's layout.
        out_in = base.T.shape if config.fan_in_fan_out else base.shape
        assert (f.B.shape[0], f.A.shape[1]) == out_in
        assert np.any(np.abs(merged - base) > 1e-3)  # the fixture's deltas are not zero


def test_scales_follow_r_alpha_rslora_and_patterns():
    llama = cjp.read_config(LLAMA[0])
    assert (llama.r, llama.lora_alpha, llama.use_rslora, llama.fan_in_fan_out) == (
        4,
        8,
        False,
        False,
    )
    assert llama.scale("model.layers.1.self_attn.q_proj") == 8 / 4
    pattern = cjp.read_config(PATTERN)
    assert pattern.rank("model.layers.0.self_attn.q_proj") == 2
    assert pattern.scale("model.layers.0.self_attn.q_proj") == 8 / 2
    assert pattern.scale("model.layers.0.self_attn.v_proj") == 3 / 4
    assert pattern.scale("model.layers.0.mlp.down_proj") == 8 / 4
    gpt2 = cjp.read_config(GPT2[0])
    assert gpt2.use_rslora and gpt2.fan_in_fan_out
    assert gpt2.scale("transformer.h.0.attn.c_attn") == pytest.approx(4 / np.sqrt(2), rel=1e-15)
    # target_modules "attn.c_proj" matches the attention's c_proj only.
    assert gpt2.targets("transformer.h.1.attn.c_proj")
    assert not gpt2.targets("transformer.h.1.mlp.c_proj")


@pytest.mark.parametrize("path", [LLAMA[0], GPT2[0]], ids=["llama", "gpt2"])
def test_factors_are_the_stored_tensors(path):
    adapters, _ = cjp.read_adapter(path)
    tensors = stored(path)
    assert len(tensors) == 2 * len(adapters)
    for module, f in adapters.items():
        key = f"base_model.model.{module}"
        np.testing.assert_array_equal(f.A, tensors[f"{key}.lora_A.weight"])
        np.testing.assert_array_equal(f.B, tensors[f"{key}.lora_B.weight"])
        assert f.A.dtype == jnp.float32


def test_module_names_are_peft_names_in_natural_order():
    adapters, _ = cjp.read_adapter(LLAMA[0])
    assert list(adapters) == [
        f"model.layers.{i}.{m}"
        for i in range(2)
        for m in ("mlp.down_proj", "self_attn.q_proj", "self_attn.v_proj")
    ]


# --- writing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [LLAMA[0], PATTERN, GPT2[0]], ids=["llama", "pattern", "gpt2"])
def test_write_read_round_trip_is_exact(path, tmp_path):
    adapters, config = cjp.read_adapter(path)
    cjp.write_adapter(tmp_path / "out", adapters, config)
    assert sorted(os.listdir(tmp_path / "out")) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    again, config2 = cjp.read_adapter(tmp_path / "out")
    assert config2 == config
    assert list(again) == list(adapters)
    jax.tree.map(np.testing.assert_array_equal, again, adapters)
    # PEFT's key names, and the JSON object unchanged.
    assert set(stored(tmp_path / "out")) == set(stored(path))
    written = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    original = json.loads((path / "adapter_config.json").read_text())
    written["target_modules"] = sorted(written["target_modules"])
    original["target_modules"] = sorted(original["target_modules"])
    assert written == original


def test_read_clients_stacks_and_aggregates_round_trip(tmp_path):
    clients, config = cjp.read_clients(LLAMA)
    singles = [cjp.read_adapter(p)[0] for p in LLAMA]
    for module, f in clients.items():
        assert f.B.shape[0] == 3 and f.A.shape[0] == 3
        for i in range(3):
            np.testing.assert_array_equal(f.B[i], singles[i][module].B)
            np.testing.assert_array_equal(f.A[i], singles[i][module].A)
    start = jax.tree.map(lambda x: x.mean(0), clients)
    w = jnp.array([1.0, 2.0, 3.0])
    res = cj.flexlora().aggregate(clients, start, w, jnp.int32(0), jax.random.key(0))
    cjp.write_adapter(tmp_path / "global", res.global_, config)
    again, _ = cjp.read_adapter(tmp_path / "global")
    jax.tree.map(np.testing.assert_array_equal, again, res.global_)
    # FlexLoRA's global delta: the best rank-r approximation of the weighted mean delta,
    # from the stored tensors with NumPy.
    p = np.asarray(w) / np.sum(np.asarray(w))
    deltas = cjp.delta_weights(again, config)
    for module in clients:
        mean = sum(
            p[i]
            * config.scale(module)
            * stored(LLAMA[i])[f"base_model.model.{module}.lora_B.weight"]
            @ stored(LLAMA[i])[f"base_model.model.{module}.lora_A.weight"]
            for i in range(3)
        )
        u, s, vt = np.linalg.svd(mean.astype(np.float64))
        best = (u[:, :4] * s[:4]) @ vt[:4]
        np.testing.assert_allclose(deltas[module], best, atol=1e-5)
    # Per-client adapters (FedIT broadcasts its global one) written and read back.
    res = cj.fedit().aggregate(clients, start, w, jnp.int32(0), jax.random.key(0))
    dirs = [tmp_path / f"c{i}" for i in range(3)]
    cjp.write_clients(dirs, res.clients, config)
    back, config2 = cjp.read_clients(dirs)
    assert config2 == config
    jax.tree.map(np.testing.assert_array_equal, back, res.clients)


def test_write_a_new_rank_through_the_config(tmp_path):
    adapters, config = cjp.read_adapter(LLAMA[0])
    wider = {m: cj.LoRAFactors(B=jnp.pad(f.B, ((0, 0), (0, 2))), A=jnp.pad(f.A, ((0, 2), (0, 0))))
             for m, f in adapters.items()}  # fmt: skip
    with pytest.raises(ValueError, match=r"has rank 6 .* the config gives it r=4"):
        cjp.write_adapter(tmp_path / "a", wider, config)
    cjp.write_adapter(tmp_path / "a", wider, dataclasses.replace(config, r=6, lora_alpha=12))
    again, config6 = cjp.read_adapter(tmp_path / "a")
    assert config6.r == 6 and config6.lora_alpha == 12
    for m in adapters:  # same scale, zero padding: same deltas
        np.testing.assert_allclose(
            cjp.delta_weights(again, config6)[m], cjp.delta_weights(adapters, config)[m], atol=1e-6
        )


# --- bad input -------------------------------------------------------------------------------


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json not found"):
        cjp.read_adapter(tmp_path)
    only_config = tmp_path / "only_config"
    only_config.mkdir()
    shutil.copy(LLAMA[0] / "adapter_config.json", only_config)
    with pytest.raises(FileNotFoundError, match=r"adapter_model.safetensors not found\.$"):
        cjp.read_adapter(only_config)
    (only_config / "adapter_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="safe_serialization=True"):
        cjp.read_adapter(only_config)
    (only_config / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        cjp.read_adapter(only_config)
    (only_config / "adapter_config.json").write_text("{")
    with pytest.raises(ValueError, match="adapter_config.json: not valid JSON"):
        cjp.read_adapter(only_config)


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"lora_alpha": 16}, r"lora_alpha: 8 != 16"),
        ({"use_rslora": True}, r"use_rslora: False != True"),
        ({"target_modules": ["q_proj", "v_proj", "down_proj", "k_proj"]}, "target_modules"),
        ({"alpha_pattern": {"q_proj": 3}}, "alpha_pattern"),
    ],
)
def test_read_clients_rejects_configs_that_disagree(tmp_path, changes, match):
    other = copy_adapter(LLAMA[1], tmp_path / "other", **changes)
    where = re.escape(f"{other} and {LLAMA[0]}")
    with pytest.raises(ValueError, match=rf"{where}: adapter configs differ.*{match}"):
        cjp.read_clients([LLAMA[0], other])


def test_a_config_rank_the_tensors_do_not_have(tmp_path):
    other = copy_adapter(LLAMA[1], tmp_path / "other", r=2)
    match = r"other/adapter_model.safetensors: module .* has rank 4 .* r=2"
    with pytest.raises(ValueError, match=match):
        cjp.read_clients([LLAMA[0], other])


def test_read_clients_rejects_other_modules_and_shapes(tmp_path):
    with pytest.raises(ValueError, match=r"configs differ \(r: 4 != 2; lora_alpha: 8 != 4"):
        cjp.read_clients([LLAMA[0], GPT2[0]])
    tensors = stored(LLAMA[1])
    fewer = copy_adapter(LLAMA[1], tmp_path / "fewer")
    keep = {k: v for k, v in tensors.items() if "layers.1.mlp.down_proj" not in k}
    safetensors_numpy.save_file(keep, fewer / "adapter_model.safetensors")
    with pytest.raises(
        ValueError, match=r"different modules .*lacks \['model.layers.1.mlp.down_proj'\]"
    ):
        cjp.read_clients([LLAMA[0], fewer])
    # Same config and modules, another input width (another base model).
    wider = copy_adapter(LLAMA[1], tmp_path / "wider")
    q = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    safetensors_numpy.save_file(
        {**tensors, q: np.zeros((4, 20), np.float32)}, wider / "adapter_model.safetensors"
    )
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.q_proj' has B \(16, 4\), A "
                       r"\(4, 20\) against B \(16, 4\), A \(4, 16\)"):  # fmt: skip
        cjp.read_clients([LLAMA[0], wider])
    # The pattern client has rank 2 on q_proj, so its patterns differ first.
    with pytest.raises(ValueError, match="rank_pattern"):
        cjp.read_clients([LLAMA[0], PATTERN])
    with pytest.raises(ValueError, match="non-empty list"):
        cjp.read_clients(str(LLAMA[0]))
    with pytest.raises(ValueError, match="non-empty list"):
        cjp.read_clients([])


def test_bad_tensors_in_the_file(tmp_path):
    tensors = stored(LLAMA[0])
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    cases = {
        "extra": ({**tensors, "base_model.model.lm_head.weight": np.zeros((64, 16), np.float32)},
                  "'base_model.model.lm_head.weight' is not a LoRA factor"),
        "half": ({k: v for k, v in tensors.items() if k != f"{q}.lora_B.weight"},
                 "'model.layers.0.self_attn.q_proj' has no lora_B.weight"),
        "rank": ({**tensors, f"{q}.lora_B.weight": np.zeros((16, 3), np.float32)},
                 r"lora_B \(16, 3\) \(out, r\) and lora_A \(4, 16\) \(r, in\) do not fit"),
        "ints": ({**tensors, f"{q}.lora_A.weight": np.zeros((4, 16), np.int32)},
                 "A must be floats"),
        "empty": ({}, "holds no LoRA factors"),
    }  # fmt: skip
    for name, (content, match) in cases.items():
        bad = copy_adapter(LLAMA[0], tmp_path / name)
        safetensors_numpy.save_file(content, bad / "adapter_model.safetensors")
        with pytest.raises(ValueError, match=match):
            cjp.read_adapter(bad)
    # A module the config does not target.
    untargeted = copy_adapter(
        LLAMA[0], tmp_path / "untargeted", target_modules=["q_proj", "v_proj"]
    )
    with pytest.raises(ValueError, match="'model.layers.0.mlp.down_proj' is not targeted"):
        cjp.read_adapter(untargeted)


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"use_dora": True}, "use_dora=True is not supported"),
        ({"lora_bias": True}, "lora_bias=True is not supported"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"peft_type": "IA3"}, "peft_type must be 'LORA'"),
        ({"init_lora_weights": "pissa_niter_4"}, "init_lora_weights='pissa_niter_4' changes"),
        ({"r": 0}, "r must be an int >= 1"),
        ({"lora_alpha": "8"}, "lora_alpha must be a number"),
        ({"use_rslora": 1}, "use_rslora must be true or false"),
        ({"rank_pattern": {"q_proj": 2.5}}, r"rank_pattern\['q_proj'\] must be an int"),
    ],
)
def test_unsupported_or_invalid_configs(tmp_path, changes, match):
    bad = copy_adapter(LLAMA[0], tmp_path / "bad", **changes)
    with pytest.raises(ValueError, match=rf"adapter_config.json: {match}"):
        cjp.read_adapter(bad)


def test_write_rejects_bad_adapters(tmp_path):
    adapters, config = cjp.read_adapter(LLAMA[0])
    clients, _ = cjp.read_clients(LLAMA)
    with pytest.raises(ValueError, match="must be 2-D .* write_clients"):
        cjp.write_adapter(tmp_path / "a", clients, config)
    name = "model.layers.0.mlp.up_proj"
    extra = {**adapters, name: adapters["model.layers.0.mlp.down_proj"]}
    with pytest.raises(ValueError, match=f"'{name}' is not targeted"):
        cjp.write_adapter(tmp_path / "a", extra, config)
    m = "model.layers.0.self_attn.q_proj"
    nan = {**adapters, m: adapters[m]._replace(A=adapters[m].A.at[0, 0].set(jnp.nan))}
    with pytest.raises(ValueError, match="NaN or inf"):
        cjp.write_adapter(tmp_path / "a", nan, config)
    with pytest.raises(TypeError, match="PeftAdapterConfig"):
        cjp.write_adapter(tmp_path / "a", adapters, config.to_dict())
    with pytest.raises(TypeError, match="non-empty dict"):
        cjp.write_adapter(tmp_path / "a", {}, config)
    with pytest.raises(ValueError, match="paths has 2 directories for \\[3\\] clients"):
        cjp.write_clients([tmp_path / "x", tmp_path / "y"], clients, config)
    assert not (tmp_path / "a").exists()  # nothing written on error


# --- PEFT itself loads what the bridge writes ------------------------------------------------


@pytest.fixture(scope="module")
def hf():
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    return torch, peft, transformers


def peft_model(hf, adapter_dir, base_dir):
    torch, peft, transformers = hf
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir).eval()
    return peft.PeftModel.from_pretrained(base, adapter_dir).eval()


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
@pytest.mark.parametrize("path", [LLAMA[0], PATTERN, GPT2[0]], ids=["llama", "pattern", "gpt2"])
def test_written_adapter_loads_in_peft_with_the_same_logits(hf, path, tmp_path):
    torch = hf[0]
    adapters, config = cjp.read_adapter(path)
    cjp.write_adapter(tmp_path / "out", adapters, config)
    model = peft_model(hf, tmp_path / "out", path.parent / "base")
    exp = expected(path)
    with torch.no_grad():
        logits = model(torch.from_numpy(exp["input_ids"])).logits.numpy()
    np.testing.assert_allclose(logits, exp[f"logits/{path.name}"], rtol=0, atol=1e-6)


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
def test_aggregated_adapter_means_the_same_in_peft(hf, tmp_path):
    """FedIT's global adapter written, loaded in PEFT: PEFT's deltas are ours."""
    torch = hf[0]
    clients, config = cjp.read_clients(LLAMA)
    start = jax.tree.map(lambda x: x[0], clients)
    res = cj.fedit().aggregate(clients, start, None, jnp.int32(0), jax.random.key(0))
    cjp.write_adapter(tmp_path / "global", res.global_, config)
    model = peft_model(hf, tmp_path / "global", FIXTURES / "llama" / "base")
    ours = cjp.delta_weights(res.global_, config, base_layout=True)
    prefix = "base_model.model."
    layers = {n[len(prefix) :]: m for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert sorted(layers) == sorted(ours)
    for module, layer in layers.items():
        with torch.no_grad():
            theirs = layer.get_delta_weight("default").numpy()
        np.testing.assert_allclose(theirs, ours[module], rtol=0, atol=TOL)
