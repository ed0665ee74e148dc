"""gRPC servicer of qlora_server.v1.Training over a TrainingManager, and the proto <-> plain job conversions."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterator, Mapping

import grpc

from server.argtypes import FLOAT32_MAX  # the wire type of TrainingConfig's float fields
from server.auth import check_path, require_adapter, require_job, visible
from server.errors import InvalidArgument
from server.rpc.convert import _f32  # float32 wire value -> the shortest decimal that rounds to it
from server.rpc.gen.qlora_server.v1 import qlora_server_pb2 as pb
from server.rpc.auth import current_principal
from server.rpc.gen.qlora_server.v1 import qlora_server_pb2_grpc as pb_grpc
from server.training.jobs import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, Job, JobEvent, JobRequest

_STATE_TO_PROTO = {QUEUED: pb.JOB_STATE_QUEUED, RUNNING: pb.JOB_STATE_RUNNING, SUCCEEDED: pb.JOB_STATE_SUCCEEDED,
                   FAILED: pb.JOB_STATE_FAILED, CANCELLED: pb.JOB_STATE_CANCELLED}
_STATE_FROM_PROTO = {v: k for k, v in _STATE_TO_PROTO.items()}
_PHASE_TO_PROTO = {"loading": pb.JOB_PHASE_LOADING, "training": pb.JOB_PHASE_TRAINING,
                   "evaluating": pb.JOB_PHASE_EVALUATING, "saving": pb.JOB_PHASE_SAVING,
                   "registering": pb.JOB_PHASE_REGISTERING}
_PHASE_FROM_PROTO = {v: k for k, v in _PHASE_TO_PROTO.items()}
#: ``TrainingConfig`` scalar fields (all ``optional`` on the wire) and whether the wire type is float32.
_SCALAR_CONFIG_FIELDS = {"r": False, "lora_alpha": True, "lora_dropout": True, "use_rslora": False,
                         "learning_rate": False, "max_steps": False, "num_epochs": False, "batch_size": False,
                         "gradient_accumulation_steps": False, "max_seq_length": False, "optim": False,
                         "seed": False, "eval_fraction": False, "warmup_ratio": False, "lr_scheduler": False,
                         "max_grad_norm": False, "weight_decay": False, "truncate": False, "eval_steps": False,
                         "save_steps": False, "save_total_limit": False, "logging_steps": False,
                         "zero_loss_patience": False, "gradient_checkpointing": False,
                         "eval_max_examples": False, "packing": False}
#: State name of ``JOB_STATE_UNSPECIFIED`` (or an unknown value) read from the wire.
UNSPECIFIED_STATE = "unspecified"


# --- conversions (pure) --------------------------------------------------------------------------------------------


def job_state_to_proto(state: str) -> int:
    """``"queued"`` … ``"cancelled"`` → ``JobState`` value; anything else → ``JOB_STATE_UNSPECIFIED``."""
    return _STATE_TO_PROTO.get(state, pb.JOB_STATE_UNSPECIFIED)


def job_state_from_proto(value: int) -> str:
    """``JobState`` value → ``"queued"`` … ``"cancelled"``; UNSPECIFIED or unknown → ``"unspecified"``."""
    return _STATE_FROM_PROTO.get(value, UNSPECIFIED_STATE)


def job_phase_to_proto(phase: str) -> int:
    """``"loading"`` … ``"registering"`` → ``JobPhase`` value; ``""`` (never ran) or anything else →
    ``JOB_PHASE_UNSPECIFIED``."""
    return _PHASE_TO_PROTO.get(phase, pb.JOB_PHASE_UNSPECIFIED)


def job_phase_from_proto(value: int) -> str:
    """``JobPhase`` value → ``"loading"`` … ``"registering"``; UNSPECIFIED or unknown → ``""``."""
    return _PHASE_FROM_PROTO.get(value, "")


def training_config_from_proto(msg: pb.TrainingConfig) -> dict[str, Any]:
    """The fields set in ``msg`` as ``TrainConfig`` overrides (unset fields are absent; an empty
    ``target_modules`` is absent too). float32 fields come back as the shortest decimal (0.1, not
    0.10000000149011612). Values are not validated here (the manager does that)."""
    out: dict[str, Any] = {}
    for name, is_f32 in _SCALAR_CONFIG_FIELDS.items():
        if msg.HasField(name):
            value = getattr(msg, name)
            out[name] = _f32(value) if is_f32 else value
    if msg.target_modules:
        out["target_modules"] = list(msg.target_modules)
    return out


def training_config_to_proto(config: Mapping[str, Any]) -> pb.TrainingConfig:
    """``TrainConfig`` overrides → ``TrainingConfig``; a None value is left unset.

    Raises:
        InvalidArgument: a key that is not a ``TrainingConfig`` field (``field="config.<key>"``), or a value of
            the wrong type for it or out of its wire type's range (int32, float32).
    """
    msg = pb.TrainingConfig()
    for name, value in config.items():
        if value is None:
            continue
        try:
            if name == "target_modules":
                msg.target_modules.extend([value] if isinstance(value, str) else list(value))
            elif name in _SCALAR_CONFIG_FIELDS:
                if (_SCALAR_CONFIG_FIELDS[name] and isinstance(value, (int, float)) and math.isfinite(value)
                        and abs(value) > FLOAT32_MAX):
                    raise InvalidArgument(f"{value!r} is out of float32 range (|x| <= {FLOAT32_MAX:g})",
                                          field=f"config.{name}")
                setattr(msg, name, value)
            else:
                raise InvalidArgument(f"not a training setting (known: {', '.join(sorted(_SCALAR_CONFIG_FIELDS))}, "
                                      "target_modules)", field=f"config.{name}")
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(f"wrong type: {exc}", field=f"config.{name}") from None
    return msg


def job_request_from_proto(msg: pb.CreateTrainingJobRequest) -> JobRequest:
    """``CreateTrainingJobRequest`` → :class:`JobRequest` (validated later by the manager)."""
    return JobRequest(adapter_id=msg.adapter_id, dataset_path=msg.dataset_path, replace=msg.replace,
                      config=training_config_from_proto(msg.config))


def job_request_to_proto(req: JobRequest) -> pb.CreateTrainingJobRequest:
    """:class:`JobRequest` → ``CreateTrainingJobRequest`` (see :func:`training_config_to_proto` for errors)."""
    return pb.CreateTrainingJobRequest(adapter_id=req.adapter_id, dataset_path=req.dataset_path,
                                       replace=req.replace, config=training_config_to_proto(req.config))


def job_to_proto(job: Job) -> pb.TrainingJob:
    """:class:`Job` → ``TrainingJob`` (server-only fields — dataset, config, pid, replace — are not sent)."""
    msg = pb.TrainingJob(job_id=job.job_id, state=job_state_to_proto(job.state), adapter_id=job.adapter_id,
                         step=job.step, total_steps=job.total_steps, error=job.error, created_at=job.created_at,
                         output_dir=job.output_dir, phase=job_phase_to_proto(job.phase),
                         resumed_from_step=job.resumed_from_step, restarts=job.restarts)
    for name in ("loss", "eval_loss", "started_at", "finished_at"):
        value = getattr(job, name)
        if value is not None:
            setattr(msg, name, value)
    return msg


def job_from_proto(msg: pb.TrainingJob) -> Job:
    """``TrainingJob`` → :class:`Job`; unset optional fields become None, server-only fields take defaults."""
    def opt(name: str) -> float | None:
        return getattr(msg, name) if msg.HasField(name) else None

    return Job(job_id=msg.job_id, state=job_state_from_proto(msg.state), adapter_id=msg.adapter_id, step=msg.step,
               total_steps=msg.total_steps, loss=opt("loss"), eval_loss=opt("eval_loss"), error=msg.error,
               phase=job_phase_from_proto(msg.phase), created_at=msg.created_at, started_at=opt("started_at"),
               finished_at=opt("finished_at"), output_dir=msg.output_dir,
               resumed_from_step=msg.resumed_from_step, restarts=msg.restarts)


def job_event_to_proto(event: JobEvent) -> pb.TrainingJobEvent:
    """:class:`JobEvent` → ``TrainingJobEvent``."""
    return pb.TrainingJobEvent(job=job_to_proto(event.job), message=event.message)


def job_event_from_proto(msg: pb.TrainingJobEvent) -> JobEvent:
    """``TrainingJobEvent`` → :class:`JobEvent`."""
    return JobEvent(job=job_from_proto(msg.job), message=msg.message)


# --- servicer ------------------------------------------------------------------------------------------------------


def _require_job_id(job_id: str) -> None:
    if not job_id:
        raise InvalidArgument("is required", field="job_id")


class TrainingServicer(pb_grpc.TrainingServicer):
    """``qlora_server.v1.Training`` on top of a ``server.training.manager.TrainingManager``.

    Errors are raised for the interceptor to map: INVALID_ARGUMENT naming the field (``adapter_id``,
    ``dataset_path``, ``config.<name>``, an empty ``job_id``), ALREADY_EXISTS (adapter taken and replace false),
    NOT_FOUND (unknown job id), FAILED_PRECONDITION (cancelling a finished job), CANCELLED (server shutting down).
    """

    def __init__(self, manager, allowed_paths: tuple = ()) -> None:
        self._manager = manager
        self._allowed_paths = tuple(allowed_paths)  # roots dataset paths must lie under (see server.auth.check_path)

    def _job(self, job_id: str):
        """The job, NOT_FOUND (as for an unknown id) when it is outside the caller's scope."""
        _require_job_id(job_id)
        return require_job(current_principal(), self._manager.get(job_id))

    def CreateTrainingJob(self, request: pb.CreateTrainingJobRequest,
                          context: grpc.ServicerContext) -> pb.TrainingJob:
        """Validate and queue a job; returns it (state QUEUED)."""
        principal = current_principal()
        require_adapter(principal, request.adapter_id)
        job_request = job_request_from_proto(request)
        if job_request.dataset_path and (self._allowed_paths or principal is not None):
            path = check_path(job_request.dataset_path, self._allowed_paths, enforce=principal is not None,
                              field="dataset_path")
            job_request = dataclasses.replace(job_request, dataset_path=str(path))
        return job_to_proto(self._manager.create(job_request))

    def GetTrainingJob(self, request: pb.GetTrainingJobRequest, context: grpc.ServicerContext) -> pb.TrainingJob:
        """One job."""
        return job_to_proto(self._job(request.job_id))

    def ListTrainingJobs(self, request: pb.ListTrainingJobsRequest,
                         context: grpc.ServicerContext) -> pb.ListTrainingJobsResponse:
        """Every job, newest first."""
        return pb.ListTrainingJobsResponse(jobs=[job_to_proto(j) for j in visible(current_principal(),
                                                                                   self._manager.list())])

    def CancelTrainingJob(self, request: pb.CancelTrainingJobRequest,
                          context: grpc.ServicerContext) -> pb.TrainingJob:
        """Cancel a queued or running job (blocks until a running worker is gone); returns it CANCELLED."""
        self._job(request.job_id)
        return job_to_proto(self._manager.cancel(request.job_id))

    def WatchTrainingJob(self, request: pb.WatchTrainingJobRequest,
                         context: grpc.ServicerContext) -> Iterator[pb.TrainingJobEvent]:
        """Stream the job as it is now, then every change until a terminal state. A client that cancels or
        disconnects ends the watch at once."""
        self._job(request.job_id)
        watch = self._manager.watch(request.job_id)
        if not context.add_callback(watch.close):  # the RPC already ended
            watch.close()
        for event in watch:
            yield job_event_to_proto(event)
