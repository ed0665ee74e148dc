"""``jobs create`` offers every ``TrainConfig`` field a job may set — every field its validation can name — and
each value reaches the server's job request intact."""

from __future__ import annotations

import dataclasses

import pytest

from server.cli import build_parser, main
from server.rpc.gen.qlora_server.v1 import qlora_server_pb2 as pb
from server.training.commands import CONFIG_FLAGS
from server.training.manager import JOB_FIXED_FIELDS, TRAINING_CONFIG_FIELDS
from trainer.config import OPTIMIZERS, SCHEDULERS, TrainConfig

SETTABLE = [f for f in dataclasses.fields(TrainConfig) if f.name not in JOB_FIXED_FIELDS]
#: Values the trainer refuses, tried in turn on every field to find the ones its validation names.
BAD_VALUES = ("-5", "0", "1.5", "bogus", "99999", "-0.5")


def _create_options() -> set[str]:
    jobs = build_parser()._subparsers._group_actions[0].choices["jobs"]
    create = jobs._subparsers._group_actions[0].choices["create"]
    return {opt for action in create._actions for opt in action.option_strings}


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _other_value(f: dataclasses.Field) -> tuple[list[str], object]:
    """Command-line words setting ``f`` to a valid non-default value, and that value as the job request holds it."""
    flag = "--" + f.name.replace("_", "-")
    default = _default(f)
    if f.name == "target_modules":
        return [flag, "q_proj,v_proj"], ["q_proj", "v_proj"]
    if f.name in ("optim", "lr_scheduler"):
        value = next(v for v in (OPTIMIZERS if f.name == "optim" else SCHEDULERS) if v != default)
        return [flag, value], value
    if isinstance(default, bool):
        return [flag if not default else "--no-" + f.name.replace("_", "-")], not default
    if isinstance(default, int):
        return [flag, str(default + 2)], default + 2
    if isinstance(default, float):
        value = 0.25 if default != 0.25 else 0.5  # exact in float32 and valid for every float field here
        return [flag, repr(value)], value
    raise AssertionError(f"no sample value for {f.name} ({default!r})")


def test_every_settable_field_is_offered_end_to_end():
    names = [f.name for f in SETTABLE]
    flags = {name for name, _, _ in CONFIG_FLAGS}
    wire = set(pb.TrainingConfig.DESCRIPTOR.fields_by_name)
    options = _create_options()
    for name in names:
        assert name in flags and name in TRAINING_CONFIG_FIELDS and name in wire, name
        assert "--" + name.replace("_", "-") in options, name
    assert set(TRAINING_CONFIG_FIELDS) == set(names) == flags == wire


@pytest.mark.parametrize("field", SETTABLE, ids=lambda f: f.name)
def test_each_option_reaches_the_job_request(address, training, capsys, field):
    words, expected = _other_value(field)
    argv = ["jobs", "create", "--target", address, "--adapter-id", "a", "--dataset", "/srv/d.jsonl", *words]
    assert main(argv) == 0, capsys.readouterr().err
    config = dict(training.requests[-1].config)
    assert config == {field.name: expected}


def test_every_field_an_error_names_has_an_option(address, capsys):
    """Drive each option with values the trainer refuses; every ``config.<field>`` an error names is an option."""
    options = _create_options()
    named = set()
    for f in SETTABLE:
        if f.name in ("target_modules",) or isinstance(_default(f), bool):
            continue
        for bad in BAD_VALUES:
            flag = "--" + f.name.replace("_", "-")
            try:
                code = main(["jobs", "create", "--target", address, "--adapter-id", "a", "--dataset", "/srv/d.jsonl",
                             f"{flag}={bad}"])
            except SystemExit as exc:  # not a number of the option's type: a usage error
                code = exc.code
            err = capsys.readouterr().err
            if code == 1 and "INVALID_ARGUMENT: config." in err:
                named.add(err.split("config.", 1)[1].split(":", 1)[0])
    assert named, "no value was refused"
    for name in named:
        assert "--" + name.replace("_", "-") in options, name
    # the refusals cover the fields the trainer checks: ranks, rates, ratios, counts, schedules, optimizers
    assert {"r", "lora_dropout", "warmup_ratio", "max_grad_norm", "optim", "lr_scheduler", "save_steps"} <= named


def test_truncate_as_the_data_error_suggests(address, training, capsys):
    # trainer/data.py refuses a long example with "... (set truncate: true to cut ...)".
    argv = ["jobs", "create", "--target", address, "--adapter-id", "a", "--dataset", "/srv/d.jsonl", "--truncate",
            "--max-seq-length", "64"]
    assert main(argv) == 0, capsys.readouterr().err
    assert dict(training.requests[-1].config) == {"truncate": True, "max_seq_length": 64}


def test_a_trainer_recipe_works_as_a_job_config(address, training, capsys):
    """examples/extraction/train.yaml as it is: its hyper-parameters reach the job, the keys a job cannot set
    (model, paths, adapter_id) are left out with one note naming them."""
    from pathlib import Path

    import yaml

    recipe = Path(__file__).resolve().parents[2] / "examples" / "extraction" / "train.yaml"
    argv = ["jobs", "create", "--target", address, "--adapter-id", "a", "--dataset", "/srv/d.jsonl",
            "--config", str(recipe)]
    assert main(argv) == 0
    err = capsys.readouterr().err.strip().splitlines()
    data = yaml.safe_load(recipe.read_text())
    fixed = sorted(k for k in data if k in JOB_FIXED_FIELDS)
    assert fixed and len(err) == 1 and err[0].startswith("note: ") and all(k in err[0] for k in fixed), err
    sent = dict(training.requests[-1].config)
    expected = {k: v for k, v in data.items() if k not in JOB_FIXED_FIELDS and v is not None}
    assert {k: sent[k] for k in expected} == pytest.approx(expected)
