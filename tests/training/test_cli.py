"""``qlora-server train`` (local run, registration by path or upload) and ``qlora-server jobs`` against the server."""

from __future__ import annotations

import json

import grpc
import pytest

from server.cli import main
from server.rpc.gen.qlora_server.v1 import qlora_server_pb2 as pb


def train_config(served, tmp_path, name: str) -> str:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({
        "model": str(served.base_dir), "dataset": str(served.dataset), "output_dir": str(tmp_path / name),
        "device": "cpu", "max_steps": 2, "batch_size": 2, "r": 4, "lora_alpha": 8,
        "target_modules": ["q_proj", "v_proj"], "eval_fraction": 0, "max_seq_length": 32,
        "optim": "paged_adamw_32bit"}))
    return str(path)


@pytest.mark.parametrize("how", ["--register", "--upload"])
def test_train_then_register_with_the_server(served, tmp_path, capsys, how):
    adapter_id = f"cli{how.replace('-', '_')}"
    assert main(["train", train_config(served, tmp_path, "run"), how, "--target", served.target,
                 "--adapter-id", adapter_id]) == 0
    out = capsys.readouterr().out
    assert "adapter written to" in out and json.loads(out[out.index("{"):])["adapter_id"] == adapter_id
    assert served.adapters.GetAdapter(pb.GetAdapterRequest(adapter_id=adapter_id), timeout=30).rank == 4
    gen = served.generation.Generate(pb.GenerateRequest(adapter_id=adapter_id, prompt="say 1", max_new_tokens=3),
                                     timeout=60)
    assert gen.completion_tokens >= 1


def test_train_rejects_a_bad_config(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"dataset": "d.jsonl", "output_dir": "out", "r": 0}))
    assert main(["train", str(bad)]) == 2
    assert "INVALID_ARGUMENT: r: " in capsys.readouterr().err


def test_jobs_commands(served, capsys):
    target = ["--target", served.target]
    code = main(["jobs", "create", *target, "--adapter-id", "cli-job", "--dataset", str(served.dataset),
                 "--r", "4", "--lora-alpha", "8", "--target-modules", "q_proj,v_proj", "--max-steps", "1",
                 "--batch-size", "2", "--max-seq-length", "32", "--eval-fraction", "0", "--watch"])
    out = capsys.readouterr().out
    assert code == 0, out
    created = json.loads(out[:out.index("\n}\n") + 2])
    assert created["state"] == "queued" and created["adapter_id"] == "cli-job"
    assert out.rstrip().splitlines()[-1].startswith(f"{created['job_id']} succeeded 1/1")
    shown = [line.split()[1] for line in out.splitlines() if line.startswith(f"{created['job_id']} running/")]
    assert [p for i, p in enumerate(shown) if i == 0 or shown[i - 1] != p] == \
        ["running/loading", "running/training", "running/saving", "running/registering"]  # no eval split here

    assert main(["jobs", "get", *target, created["job_id"]]) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "succeeded"
    assert main(["jobs", "list", *target, "--json"]) == 0
    assert created["job_id"] in [j["job_id"] for j in json.loads(capsys.readouterr().out)]
    assert main(["jobs", "list", *target]) == 0
    assert capsys.readouterr().out.startswith("ID")
    assert main(["jobs", "watch", *target, created["job_id"]]) == 0
    assert main(["jobs", "cancel", *target, created["job_id"]]) == 1
    assert "error: FAILED_PRECONDITION: job_id: " in capsys.readouterr().err
    assert main(["jobs", "create", *target, "--adapter-id", "x", "--dataset", str(served.dataset),
                 "--optim", "sgd"]) == 1
    assert "error: INVALID_ARGUMENT: config.optim: " in capsys.readouterr().err
    with pytest.raises(grpc.RpcError):
        served.adapters.GetAdapter(pb.GetAdapterRequest(adapter_id="x"), timeout=30)


@pytest.mark.parametrize(("flags", "expected"), [([], True), (["--training-share-base", "on"], True),
                                                 (["--training-share-base", "off"], False)])
def test_serve_training_share_base_option(flags, expected):
    from server.cli import build_parser, config_from_args

    assert config_from_args(build_parser().parse_args(["serve", *flags])).training_share_base is expected


def test_serve_training_share_base_rejects_other_values(capsys):
    from server.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--training-share-base", "yes"])
    assert "--training-share-base" in capsys.readouterr().err
