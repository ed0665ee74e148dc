"""Tests of trainer.config.TrainConfig: validation naming the field, YAML/JSON loading, relative paths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server.errors import InvalidArgument
from trainer.config import TrainConfig

BASE = {"dataset": "data.jsonl", "output_dir": "runs/x"}


def test_defaults_follow_qlora_paper():
    cfg = TrainConfig(dataset=Path("d.jsonl"), output_dir=Path("o"))
    assert (cfg.model, cfg.learning_rate, cfg.max_grad_norm, cfg.lr_scheduler, cfg.optim) == \
        ("smollm2", 2e-4, 0.3, "constant_with_warmup", "paged_adamw_8bit")
    assert cfg.target_modules is None and cfg.compute_dtype == "auto"
    assert cfg.adapter_dir == Path("o/adapter") and cfg.checkpoint_dir == Path("o/checkpoints")


@pytest.mark.parametrize("field,value", [
    ("r", 0), ("lora_dropout", 1.0), ("learning_rate", -1.0), ("optim", "sgd"), ("batch_size", 0),
    ("max_steps", -1), ("adapter_id", "bad id!"), ("compute_dtype", "int8"), ("eval_fraction", 1.0),
    ("target_modules", []), ("warmup_ratio", 1.5), ("truncate", "yes"), ("device", "tpu"),
    ("learning_rate", float("nan")), ("r", 2.5), ("lr_scheduler", "step"), ("max_seq_length", 1),
])
def test_invalid_values_name_their_field(field, value):
    with pytest.raises(InvalidArgument) as err:
        TrainConfig(dataset=Path("d.jsonl"), output_dir=Path("o"), **{field: value})
    assert err.value.field == field


def test_frozen():
    cfg = TrainConfig(dataset=Path("d.jsonl"), output_dir=Path("o"))
    with pytest.raises(AttributeError):
        cfg.r = 8  # type: ignore[misc]


def test_yaml_file_with_relative_paths_and_string_floats(tmp_path):
    (tmp_path / "cfg.yaml").write_text(
        "dataset: data.jsonl\noutput_dir: runs/x\nlearning_rate: 2e-4\nr: 8\n"
        "target_modules: [q_proj, v_proj]\nuse_rslora: true\n")
    cfg = TrainConfig.from_file(tmp_path / "cfg.yaml")
    assert cfg.dataset == tmp_path / "data.jsonl" and cfg.output_dir == tmp_path / "runs/x"
    assert cfg.learning_rate == 2e-4 and cfg.r == 8 and cfg.use_rslora
    assert cfg.target_modules == ("q_proj", "v_proj")


def test_json_file_round_trips_to_dict(tmp_path):
    (tmp_path / "cfg.json").write_text(json.dumps({**BASE, "max_steps": 5}))
    cfg = TrainConfig.from_file(tmp_path / "cfg.json")
    again = TrainConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.max_steps == 5


@pytest.mark.parametrize("text,field", [
    ("dataset: d\noutput_dir: o\nlearning_rat: 1\n", "learning_rat"),
    ("output_dir: o\n", "dataset"),
    ("dataset: d\noutput_dir: o\nlearning_rate: fast\n", "learning_rate"),
    ("dataset: [unclosed\n", "config"),
    ("- a\n- b\n", "config"),
])
def test_bad_files_name_the_field(tmp_path, text, field):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(InvalidArgument) as err:
        TrainConfig.from_file(tmp_path / "c.yaml")
    assert err.value.field == field


def test_missing_and_unknown_suffix_files(tmp_path):
    with pytest.raises(InvalidArgument) as err:
        TrainConfig.from_file(tmp_path / "nope.yaml")
    assert err.value.field == "config"
    (tmp_path / "c.toml").write_text("x = 1")
    with pytest.raises(InvalidArgument, match="yaml"):
        TrainConfig.from_file(tmp_path / "c.toml")


def test_a_string_target_is_a_regex_as_peft_reads_it_and_a_list_stays_names():
    """A YAML ``target_modules: ".*\\.(q|v)_proj"`` must reach PEFT as a regex (full match), not as one literal
    name; a list stays a list of names / suffixes."""
    from trainer.train import lora_config

    regex = r".*\.(q|v)_proj"
    cfg = TrainConfig(dataset=Path("d.jsonl"), output_dir=Path("o"), target_modules=regex)
    assert cfg.target_modules == regex and lora_config(cfg).target_modules == regex
    listed = TrainConfig(dataset=Path("d.jsonl"), output_dir=Path("o"), target_modules=["q_proj", "v_proj"])
    assert listed.target_modules == ("q_proj", "v_proj") and set(lora_config(listed).target_modules) == {"q_proj",
                                                                                                       "v_proj"}
    with pytest.raises(InvalidArgument) as err:
        TrainConfig(dataset=Path("d.jsonl"), output_dir=Path("o"), target_modules="(unclosed")
    assert err.value.field == "target_modules"


def test_a_regex_target_reaching_the_lm_head_is_refused_before_training():
    """The shared servability check sees the regex as PEFT will apply it: ".*lm_head" targets the LM head."""
    from server.adapters.types import BaseModelSpec
    from server.training.manager import check_servable

    linears = {f"model.layers.0.self_attn.{m}": (8, 8) for m in ("q_proj", "v_proj")}
    base = BaseModelSpec(name="m", linear_shapes=linears, other_modules=frozenset({"lm_head", "model.embed_tokens"}),
                         max_rank=64)
    check_servable(TrainConfig(dataset=Path("d.jsonl"), output_dir=Path("o"), model="m", r=4,
                               target_modules=r".*\.(q|v)_proj"), base)
    with pytest.raises(InvalidArgument) as err:
        check_servable(TrainConfig(dataset=Path("d.jsonl"), output_dir=Path("o"), model="m", r=4,
                                   target_modules=".*lm_head"), base)
    assert err.value.field == "config.target_modules" and "lm_head" in str(err.value).lower()
