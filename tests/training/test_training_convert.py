"""Pure proto <-> plain conversions of the Training service."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.errors import InvalidArgument
from server.rpc import training as conv
from server.rpc.gen.qlora_server.v1 import qlora_server_pb2 as pb
from server.training.jobs import STATES, Job, JobEvent, JobRequest
from server.training.manager import TRAINING_CONFIG_FIELDS


def test_states_round_trip():
    for state in STATES:
        assert conv.job_state_from_proto(conv.job_state_to_proto(state)) == state
    assert conv.job_state_to_proto("paused") == pb.JOB_STATE_UNSPECIFIED
    assert conv.job_state_from_proto(pb.JOB_STATE_UNSPECIFIED) == conv.UNSPECIFIED_STATE


def test_training_config_only_carries_set_fields():
    assert conv.training_config_from_proto(pb.TrainingConfig()) == {}
    msg = pb.TrainingConfig(r=8, lora_alpha=16.0, lora_dropout=0.1, target_modules=["q_proj"], use_rslora=False,
                            max_steps=0, learning_rate=2e-4, optim="paged_adamw_32bit", seed=0)
    plain = conv.training_config_from_proto(msg)
    assert plain == {"r": 8, "lora_alpha": 16.0, "lora_dropout": 0.1, "target_modules": ["q_proj"],
                     "use_rslora": False, "max_steps": 0, "learning_rate": 2e-4, "optim": "paged_adamw_32bit",
                     "seed": 0}  # float32 0.1 comes back as 0.1; explicit zeros / False stay set
    assert conv.training_config_to_proto(plain) == msg
    # The wire fields are exactly what the manager accepts.
    assert set(pb.TrainingConfig.DESCRIPTOR.fields_by_name) == set(TRAINING_CONFIG_FIELDS)


def test_training_config_to_proto_rejects_unknown_keys_and_types():
    with pytest.raises(InvalidArgument) as info:
        conv.training_config_to_proto({"model": "other/model"})  # the server's own setting
    assert info.value.field == "config.model"
    with pytest.raises(InvalidArgument) as info:
        conv.training_config_to_proto({"r": "eight"})
    assert info.value.field == "config.r"
    assert conv.training_config_to_proto({"target_modules": "q_proj", "r": None}).target_modules == ["q_proj"]


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(sorted(n for n, f32 in conv._SCALAR_CONFIG_FIELDS.items() if f32)),
       value=st.floats(allow_nan=False, allow_infinity=False))
def test_float32_fields_refuse_what_would_arrive_as_infinity(name, value):
    if abs(value) > 3.4028234663852886e38:
        with pytest.raises(InvalidArgument) as info:
            conv.training_config_to_proto({name: value})
        assert info.value.field == f"config.{name}"
    else:
        sent = getattr(conv.training_config_to_proto({name: value}), name)
        assert sent == pytest.approx(value, rel=1e-6, abs=1e-38)


def test_request_job_and_event_round_trip():
    req = JobRequest(adapter_id="a", dataset_path="/d.jsonl", replace=True, config={"max_steps": 3})
    assert conv.job_request_from_proto(conv.job_request_to_proto(req)) == req
    job = Job(job_id="job-1", state="running", adapter_id="a", step=3, total_steps=10, loss=1.25, error="",
              phase="evaluating", resumed_from_step=2, restarts=1, created_at=100.5, started_at=101.0,
              output_dir="/s/jobs/job-1", replace=True, dataset_path="/d.jsonl", config={"r": 4}, pid=42)
    msg = conv.job_to_proto(job)
    assert not msg.HasField("eval_loss") and not msg.HasField("finished_at") and msg.HasField("loss")
    back = conv.job_from_proto(msg)
    assert back == Job(job_id="job-1", state="running", adapter_id="a", step=3, total_steps=10, loss=1.25,
                       phase="evaluating", resumed_from_step=2, restarts=1, created_at=100.5,
                       started_at=101.0, output_dir="/s/jobs/job-1")  # server-only fields dropped
    event = JobEvent(back, "step 3/10")
    assert conv.job_event_from_proto(conv.job_event_to_proto(event)) == event


def test_phases_round_trip():
    from server.training.jobs import PHASES

    for phase in PHASES:
        assert conv.job_phase_from_proto(conv.job_phase_to_proto(phase)) == phase
    assert conv.job_phase_to_proto("") == 0 and conv.job_phase_from_proto(0) == ""
    assert len({conv.job_phase_to_proto(p) for p in PHASES}) == len(PHASES)
