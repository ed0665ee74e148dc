"""Tests of ``python -m trainer``: JSON progress lines, summary, exit codes for bad configs."""

from __future__ import annotations

import json

import yaml

from trainer.__main__ import main


def test_cli_trains_and_prints_events_and_summary(tiny_model_dir, learnable_data, tmp_path, capsys):
    cfg = {"model": str(tiny_model_dir), "dataset": str(learnable_data), "output_dir": "out", "max_steps": 3,
           "batch_size": 4, "learning_rate": 1e-3, "eval_fraction": 0.1}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main([str(tmp_path / "c.yaml"), "--json", "--log-level", "WARNING"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    steps = [ev for ev in lines if ev.get("event") == "step"]
    assert [ev["step"] for ev in steps] == [1, 2, 3]
    summary = lines[-1]
    assert summary["steps"] == 3 and summary["adapter_dir"] == str(tmp_path / "out" / "adapter")
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()


def test_cli_bad_config_exits_2_naming_the_field(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("dataset: d.jsonl\noutput_dir: o\nr: 0\n")
    assert main([str(tmp_path / "c.yaml")]) == 2
    assert "r: must be >= 1" in capsys.readouterr().err


def test_cli_bad_data_exits_2_with_line_number(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "d.jsonl").write_text('{"prompt": "a", "completion": "b"}\nnot json\n')
    (tmp_path / "c.yaml").write_text(f"model: {tiny_model_dir}\ndataset: d.jsonl\noutput_dir: o\n")
    assert main([str(tmp_path / "c.yaml"), "--log-level", "WARNING"]) == 2
    assert "line 2: invalid JSON" in capsys.readouterr().err
