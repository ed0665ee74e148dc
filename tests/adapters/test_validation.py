"""Tests of server.adapters.validation: every refusal (type and field) and every supported LoRA form against PEFT."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file

from server.adapters.validation import validate_adapter_dir
from server.errors import InvalidArgument
from tests.tiny import edit_config, make_adapter, save_tiny_base

WEIGHTS = "adapter_model.safetensors"


def refused(path, spec, field: str, *words: str) -> InvalidArgument:
    """Assert validation refuses ``path`` with InvalidArgument on ``field`` and a message containing ``words``."""
    with pytest.raises(InvalidArgument) as info:
        validate_adapter_dir(path, spec)
    assert info.value.field == field, str(info.value)
    for word in words:
        assert word.lower() in str(info.value).lower()
    return info.value


def rewrite_weights(path, change) -> None:
    """Apply ``change(dict of tensors) -> dict`` to the adapter's safetensors file."""
    tensors = load_file(path / WEIGHTS)
    save_file(change(tensors), path / WEIGHTS, metadata={"format": "pt"})


# ----------------------------------------------------------------------------------------------------- files


def test_missing_directory(tmp_path, spec):
    refused(tmp_path / "nope", spec, "path", "does not exist")


def test_missing_config(adapter, spec):
    path = adapter()
    (path / "adapter_config.json").unlink()
    refused(path, spec, "adapter_config.json", "missing")


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", ""])
def test_unparseable_config(adapter, spec, text):
    path = adapter()
    (path / "adapter_config.json").write_text(text)
    refused(path, spec, "adapter_config.json")


def test_missing_weights(adapter, spec):
    path = adapter()
    (path / WEIGHTS).unlink()
    refused(path, spec, "weights", "missing")


def test_empty_weights_file(adapter, spec):
    path = adapter()
    (path / WEIGHTS).write_bytes(b"")
    refused(path, spec, "weights", "empty")


def test_pickle_only_weights_are_refused_unread(adapter, spec, monkeypatch):
    path = adapter(safe_serialization=False)
    assert (path / "adapter_model.bin").exists() and not (path / WEIGHTS).exists()

    def no_unpickling(*args, **kwargs):
        raise AssertionError("validation must never unpickle")

    monkeypatch.setattr(torch, "load", no_unpickling)
    refused(path, spec, "weights", "pickle")


def test_truncated_weights(adapter, spec):
    path = adapter()
    data = (path / WEIGHTS).read_bytes()
    (path / WEIGHTS).write_bytes(data[: len(data) // 2])
    refused(path, spec, "weights", "safetensors")


def test_corrupt_weights(adapter, spec):
    path = adapter()
    (path / WEIGHTS).write_bytes(bytes(range(256)) * 4)
    refused(path, spec, "weights", "safetensors")


def test_weights_without_tensors(adapter, spec):
    path = adapter()
    save_file({}, path / WEIGHTS)
    refused(path, spec, "weights", "no tensors")


# ----------------------------------------------------------------------------------------------------- config


def test_not_lora(adapter, spec):
    path = edit_config(adapter(), peft_type="IA3")
    refused(path, spec, "peft_type", "IA3")


def test_base_model_mismatch(adapter, spec):
    path = edit_config(adapter(), base_model_name_or_path="meta-llama/Llama-3.2-1B")
    refused(path, spec, "base_model_name_or_path", "Llama-3.2-1B", "tiny-llama")


@pytest.mark.parametrize("name", [None, "", "Other-Org/TINY-Llama", "/some/dir/tiny-llama/"])
def test_base_model_name_accepted(adapter, spec, name):
    path = edit_config(adapter(), base_model_name_or_path=name)
    assert validate_adapter_dir(path, spec).info.module_count == 4


def test_architecture_mismatch(tmp_path, spec):
    other = save_tiny_base(tmp_path, hidden=32, intermediate=64)  # same name, other shapes
    path = make_adapter(other, tmp_path / "a")
    refused(path, spec, "weights", "in_features")


def test_target_module_absent(adapter, spec):
    path = edit_config(adapter(), target_modules=["q_proj", "v_proj", "c_attn"])
    refused(path, spec, "target_modules", "c_attn")


def test_regex_target_matches_nothing(adapter, spec):
    path = edit_config(adapter(), target_modules=r".*\.attn\.c_attn")
    refused(path, spec, "target_modules", "matches no module")


@pytest.mark.parametrize("target", [[], None, 3, ["q_proj", 5], "(unclosed"])
def test_malformed_target_modules(adapter, spec, target):
    path = edit_config(adapter(), target_modules=target)
    refused(path, spec, "target_modules")


def test_weights_match_zero_modules(adapter, spec):
    path = adapter()
    rewrite_weights(path, lambda t: {k.replace("model.layers.", "transformer.h."): v for k, v in t.items()})
    refused(path, spec, "weights", "zero modules")


def test_weights_for_module_the_base_lacks(adapter, spec):
    path = adapter()
    extra = {"base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64),
             "base_model.model.model.layers.7.self_attn.q_proj.lora_B.weight": torch.zeros(64, 4)}
    rewrite_weights(path, lambda t: {**t, **extra})
    refused(path, spec, "weights", "layers.7")


def test_weights_for_untargeted_module(adapter, spec):
    path = edit_config(adapter(), target_modules=["q_proj"])
    refused(path, spec, "weights", "v_proj")


def test_rank_disagrees_with_r(adapter, spec):
    path = edit_config(adapter(), r=8)
    refused(path, spec, "r", "rank 8")


def test_rank_disagrees_with_rank_pattern(adapter, spec):
    path = edit_config(adapter(rank_pattern={"v_proj": 2}), rank_pattern={"v_proj": 3})
    refused(path, spec, "rank_pattern", "rank 3")


def test_rank_above_max_rank(adapter, spec):
    refused(adapter(r=32, lora_alpha=32), spec, "r", "max_lora_rank")


def test_pattern_rank_above_max_rank(adapter, spec):
    refused(adapter(rank_pattern={"model.layers.1.self_attn.v_proj": 24}), spec, "r", "max_lora_rank")


@pytest.mark.parametrize("key,value", [("r", 0), ("r", "4"), ("lora_alpha", None), ("lora_alpha", float("nan")),
                                       ("rank_pattern", {"v_proj": 0}), ("alpha_pattern", {"v_proj": "x"}),
                                       ("rank_pattern", {"(v_proj": 4}), ("use_rslora", "yes")])
def test_malformed_numbers(adapter, spec, key, value):
    refused(edit_config(adapter(), **{key: value}), spec, key)


def test_lora_a_without_b(adapter, spec):
    path = adapter()
    rewrite_weights(path, lambda t: {k: v for k, v in t.items() if not k.endswith("layers.1.self_attn.q_proj.lora_B.weight")})
    refused(path, spec, "weights", "no lora_B")


def test_lora_b_without_a(adapter, spec):
    path = adapter()
    rewrite_weights(path, lambda t: {k: v for k, v in t.items() if not k.endswith("layers.0.self_attn.v_proj.lora_A.weight")})
    refused(path, spec, "weights", "no lora_A")


def test_non_finite_weights(adapter, spec):
    path = adapter()
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    rewrite_weights(path, lambda t: {**t, key: torch.full_like(t[key], float("inf"))})
    refused(path, spec, "weights", "nan or infinity")


def test_integer_weights(adapter, spec):
    path = adapter()
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    rewrite_weights(path, lambda t: {**t, key: torch.ones(t[key].shape, dtype=torch.int32)})
    refused(path, spec, "weights", "float")


# ----------------------------------------------------------------------------------------------------- unsupported features


def test_dora(adapter, spec):
    refused(adapter(use_dora=True), spec, "use_dora", "DoRA")


def test_dora_magnitude_keys_without_flag(adapter, spec):
    path = edit_config(adapter(use_dora=True), use_dora=False)
    refused(path, spec, "use_dora", "magnitude")


def test_modules_to_save(adapter, spec):
    refused(adapter(modules_to_save=["lm_head"]), spec, "modules_to_save")


def test_modules_to_save_keys_without_flag(adapter, spec):
    path = edit_config(adapter(modules_to_save=["lm_head"]), modules_to_save=None)
    refused(path, spec, "modules_to_save")


def test_embedding_target(adapter, spec):
    refused(adapter(target_modules=["q_proj", "embed_tokens"]), spec, "target_modules", "embedding")


def test_embedding_keys_without_target(adapter, spec):
    path = edit_config(adapter(target_modules=["q_proj", "embed_tokens"]), target_modules=["q_proj"])
    refused(path, spec, "target_modules", "embedding")


def test_lm_head_target(adapter, spec):
    refused(adapter(target_modules=["q_proj", "lm_head"]), spec, "target_modules", "LM head")


def test_other_non_routable_target(adapter, spec):
    path = edit_config(adapter(), target_modules=["q_proj", "input_layernorm"])
    refused(path, spec, "target_modules", "non-routable", "input_layernorm")


def test_lora_bias(adapter, spec):
    refused(adapter(lora_bias=True), spec, "lora_bias")


def test_lora_bias_keys_without_flag(adapter, spec):
    path = edit_config(adapter(lora_bias=True), lora_bias=False)
    refused(path, spec, "lora_bias", "lora_B.bias")


def test_trainable_token_indices(adapter, spec):
    refused(adapter(trainable_token_indices=[1, 2, 3]), spec, "trainable_token_indices")


def test_trainable_token_keys_without_flag(adapter, spec):
    path = edit_config(adapter(trainable_token_indices=[1, 2, 3]), trainable_token_indices=None)
    refused(path, spec, "trainable_token_indices")


def test_base_bias_keys(adapter, spec):
    path = adapter()
    key = "base_model.model.model.layers.0.self_attn.q_proj.bias"
    rewrite_weights(path, lambda t: {**t, key: torch.zeros(64)})
    refused(path, spec, "bias")


def test_unexpected_lora_key(adapter, spec):
    path = adapter()
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_diag.weight"
    rewrite_weights(path, lambda t: {**t, key: torch.zeros(4)})
    refused(path, spec, "weights", "lora_diag")


@pytest.mark.parametrize("key,value", [
    ("target_parameters", ["mlp.gate_proj.weight"]),
    ("use_qalora", True),
    ("alora_invocation_tokens", [5, 6]),
    ("layer_replication", [[0, 2], [1, 2]]),
    ("megatron_config", {"tensor_model_parallel_size": 2}),
    ("loftq_config", {"loftq_bits": 4}),
    ("velora_config", {"num_groups": 2}),
    ("monteclora_config", {"n": 2}),
    ("use_bdlora", {"target_modules_bd_a": ["q_proj"]}),
    ("arrow_config", {"top_k": 2}),
    ("kasa_config", {"beta": 1.0}),
    ("bias", "all"),
    ("bias", "lora_only"),
    ("some_future_feature", {"on": True}),
])
def test_unsupported_config_feature(adapter, spec, key, value):
    refused(edit_config(adapter(), **{key: value}), spec, key)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "corda", "loftq", "lora_ga"])
def test_base_mutating_init(adapter, spec, init):
    refused(edit_config(adapter(), init_lora_weights=init), spec, "init_lora_weights", "path_initial_model")


@pytest.mark.parametrize("init", [True, False, "gaussian", "eva", "orthogonal", "mica"])
def test_plain_inits_accepted(adapter, spec, init):
    assert validate_adapter_dir(edit_config(adapter(), init_lora_weights=init), spec).modules


# ----------------------------------------------------------------------------------------------------- accepted forms

CASES = {
    "list": dict(target_modules=["q_proj", "v_proj"]),
    "regex": dict(target_modules=r".*layers\.1\.(self_attn\.k_proj|mlp\.(gate|down)_proj)"),
    "patterns": dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                     rank_pattern={"v_proj": 2, "model.layers.1.mlp.down_proj": 8},
                     alpha_pattern={"model.layers.0.self_attn.q_proj": 3, "down_proj": 5}),
    "rslora": dict(r=8, lora_alpha=4, use_rslora=True, target_modules=["o_proj", "up_proj"]),
    "rslora_patterns": dict(use_rslora=True, target_modules=["q_proj", "k_proj"], rank_pattern={"k_proj": 2}),
    "bf16": dict(dtype=torch.bfloat16, target_modules=["q_proj", "gate_proj"]),
    "fp16": dict(dtype=torch.float16),
    "layers_to_transform": dict(target_modules=["q_proj", "down_proj"], layers_to_transform=[1],
                                layers_pattern="layers"),
    "exclude": dict(target_modules=["q_proj", "v_proj"], exclude_modules=["model.layers.0.self_attn.v_proj"]),
    "all_linear": dict(target_modules="all-linear", lora_dropout=0.1),
}


@pytest.fixture(scope="module")
def peft_oracle(base_dir):
    """``oracle(adapter_dir) -> PeftModel`` on the float32 tiny base, loaded by PEFT itself."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    def load(path):
        return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), path)

    return load


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_peft(adapter, spec, peft_oracle, case):
    """Modules, factors, scales and the LoRA forward agree with PEFT's own loading of the same directory."""
    kwargs = dict(CASES[case])
    dtype = kwargs.get("dtype", torch.float32)
    path = adapter(seed=sorted(CASES).index(case), **kwargs)
    loaded = validate_adapter_dir(path, spec, adapter_id="x", registered_at=12.5)
    model = peft_oracle(path)
    peft_layers = {n.removeprefix("base_model.model."): m for n, m in model.named_modules()
                   if isinstance(m, LoraLayer)}
    assert set(loaded.modules) == set(peft_layers) and loaded.modules
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(1))
    for name, lora in loaded.modules.items():
        layer = peft_layers[name]
        assert lora.A.dtype == dtype and lora.B.dtype == dtype
        assert lora.scale == pytest.approx(layer.scaling["default"], rel=1e-12)
        torch.testing.assert_close(lora.A.float(), layer.lora_A["default"].weight.float(), rtol=0, atol=0)
        torch.testing.assert_close(lora.B.float(), layer.lora_B["default"].weight.float(), rtol=0, atol=0)
        xi = x[:, : lora.A.shape[1]]
        with torch.no_grad():
            delta = layer(xi) - layer.get_base_layer()(xi)
        torch.testing.assert_close(delta, lora.scale * (xi @ lora.A.float().T) @ lora.B.float().T)
    info = loaded.info
    assert info.adapter_id == "x" and info.registered_at == 12.5 and info.module_count == len(loaded.modules)
    assert info.size_bytes == (path / WEIGHTS).stat().st_size and len(info.sha256) == 64
    assert info.base_model.endswith("tiny-llama")


def test_patterns_info(adapter, spec):
    path = adapter(**CASES["patterns"])
    info = validate_adapter_dir(path, spec).info
    assert (info.rank, info.lora_alpha, info.max_rank) == (4, 16.0, 8)
    assert info.ranks == {"model.layers.0.self_attn.v_proj": 2, "model.layers.1.self_attn.v_proj": 2,
                          "model.layers.1.mlp.down_proj": 8}
    assert info.alphas == {"model.layers.0.self_attn.q_proj": 3.0, "model.layers.0.mlp.down_proj": 5.0,
                           "model.layers.1.mlp.down_proj": 5.0}
    assert sorted(info.target_modules) == ["down_proj", "q_proj", "v_proj"]  # PEFT saves a set as a list


def test_rslora_scale(adapter, spec):
    loaded = validate_adapter_dir(adapter(**CASES["rslora"]), spec)
    assert loaded.info.use_rslora
    assert all(m.scale == pytest.approx(4 / math.sqrt(8)) for m in loaded.modules.values())


def test_regex_info_and_modules(adapter, spec):
    loaded = validate_adapter_dir(adapter(**CASES["regex"]), spec)
    assert loaded.info.target_modules == (CASES["regex"]["target_modules"],)
    assert set(loaded.modules) == {"model.layers.1.self_attn.k_proj", "model.layers.1.mlp.gate_proj",
                                   "model.layers.1.mlp.down_proj"}


def test_targeted_module_without_weights_is_a_no_op(adapter, spec):
    path = adapter()
    rewrite_weights(path, lambda t: {k: v for k, v in t.items() if "layers.1.self_attn.v_proj" not in k})
    assert "model.layers.1.self_attn.v_proj" not in validate_adapter_dir(path, spec).modules


def test_extra_files_are_ignored(adapter, spec):
    path = adapter()
    (path / "README.md").write_text("hello")
    shutil.copy(path / WEIGHTS, path / "adapter_model.bin")  # a stale pickle next to safetensors is never read
    assert len(validate_adapter_dir(path, spec).modules) == 4


def test_config_is_peft_output(adapter):
    """Guards the fixtures: PEFT writes the config keys validation reads, and B is not PEFT's zero init."""
    path = adapter()
    cfg = json.loads((path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4
    assert all(v.abs().sum() > 0 for k, v in load_file(path / WEIGHTS).items() if "lora_B" in k)


def test_loaded_adapter_routes_like_peft(base_dir, adapter):
    """End to end on NF4: the engine's routed banks fed with a LoadedAdapter give PEFT's logits for that row and the
    base model's for a row without an adapter."""
    from peft import PeftModel

    from server.adapters.types import BaseModelSpec
    from server.config import EngineConfig
    from server.model.runner import StepRow, build_runner
    from tests.tiny import TINY_NAME, load_nf4

    path = adapter(seed=7, target_modules="all-linear", rank_pattern={"down_proj": 2}, use_rslora=True)
    model = load_nf4(base_dir)
    runner = build_runner(model, EngineConfig(adapter_slots=2, max_lora_rank=16, max_batch_size=2), torch.float32,
                          128)
    runner.banks.load(1, validate_adapter_dir(path, BaseModelSpec.from_model(model, TINY_NAME, 16)))
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(0))
    routed = runner.prefill([StepRow(tuple(ids[0].tolist()), 0, (1,), 1),
                             StepRow(tuple(ids[1].tolist()), 0, (2,), -1)]).float()
    peft_model = PeftModel.from_pretrained(load_nf4(base_dir), path).eval()
    with torch.no_grad():
        expected = peft_model(ids).logits[:, -1].float()
        with peft_model.disable_adapter():
            plain = peft_model(ids).logits[:, -1].float()
    effect = (expected[0] - plain[0]).abs().max().item()
    errors = [(routed[0] - expected[0]).abs().max().item(), (routed[1] - plain[1]).abs().max().item()]
    assert effect > 20 * max(errors), (effect, errors)  # the adapter matters far more than the tolerance
    assert max(errors) <= 0.05 * expected.abs().max().item(), errors
