"""A small blocking gRPC client of qlora-server that speaks plain Python types (used by the CLI)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import grpc

from server.adapters.types import AdapterInfo
from server.argtypes import MAX_TIMEOUT_S
from server.config import DEFAULT_MAX_MESSAGE_BYTES
from server.engine.types import GenerationEvent, GenerationRequest, GenerationResult
from server.errors import ServerError
from server.rpc import convert
from server.rpc import training as training_convert
from server.rpc.gen.qlora_server.v1 import qlora_server_pb2 as pb
from server.rpc.gen.qlora_server.v1 import qlora_server_pb2_grpc as pb_grpc
from server.rpc.tls import ClientTLS
from server.training.jobs import Job, JobEvent, JobRequest

#: Size of one ``UploadAdapter`` chunk (bytes), or half of ``max_message_bytes`` when that is smaller.
UPLOAD_CHUNK_BYTES = 1024 * 1024


class ClientError(Exception):
    """An RPC failed: ``code`` is the gRPC status name (e.g. ``NOT_FOUND``), ``message`` the server's details."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{code}: {message}")

    @classmethod
    def from_rpc_error(cls, err: grpc.RpcError) -> "ClientError":
        code = err.code() if hasattr(err, "code") else None
        details = err.details() if hasattr(err, "details") else str(err)
        return cls(code.name if code is not None else "UNKNOWN", details or "")


class Client:
    """Blocking client over one channel to ``target`` (``host:port``): plaintext, or TLS when ``tls`` is given
    (:class:`server.rpc.tls.ClientTLS`: the CA to trust, a client certificate for mutual TLS).

    ``timeout`` is every call's deadline in seconds (None = none; at most ``MAX_TIMEOUT_S``, else
    :class:`ClientError` INVALID_ARGUMENT). ``api_key`` (optional) goes with every call as ``authorization: Bearer
    <key>`` metadata. Every method raises :class:`ClientError` when the RPC fails, or with
    INVALID_ARGUMENT naming the field when a value does not fit the wire (e.g. ``max_new_tokens`` past int32).
    ``max_message_bytes`` caps messages both ways (the server's ``--max-message-bytes`` default); upload chunks
    stay at most half of it. Use as a context manager or call :meth:`close`.
    """

    def __init__(self, target: str, timeout: float | None = None, api_key: str | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, tls: ClientTLS | None = None) -> None:
        if timeout is not None and not (isinstance(timeout, (int, float)) and 0 < timeout <= MAX_TIMEOUT_S):
            raise ClientError("INVALID_ARGUMENT", f"timeout: must be a number of seconds in (0, {MAX_TIMEOUT_S:g}], "
                                                  f"got {timeout!r}")
        options = [("grpc.max_receive_message_length", max_message_bytes),
                   ("grpc.max_send_message_length", max_message_bytes)]
        if tls is None:
            self._channel = grpc.insecure_channel(target, options=options)
        else:
            try:
                self._channel = tls.channel(target, options=options)
            except ValueError as exc:
                raise ClientError("INVALID_ARGUMENT", str(exc)) from None
        self._timeout = timeout
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None
        self._chunk_cap = max(1, max_message_bytes // 2)  # room for the chunk message's own fields
        self._generation = pb_grpc.GenerationStub(self._channel)
        self._adapters = pb_grpc.AdaptersStub(self._channel)
        self._training = pb_grpc.TrainingStub(self._channel)

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method, request):
        try:
            return method(request, timeout=self._timeout, metadata=self._metadata)
        except grpc.RpcError as err:
            raise ClientError.from_rpc_error(err) from None

    def health(self, service: str = "") -> str:
        """The ``grpc.health.v1`` status of ``service`` (``""`` = the server), e.g. ``"SERVING"`` (needs
        ``grpcio-health-checking``, part of the server extra)."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        request = health_pb2.HealthCheckRequest(service=service)
        resp = self._call(health_pb2_grpc.HealthStub(self._channel).Check, request)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    def generate(self, request: GenerationRequest) -> GenerationResult:
        """Run ``request`` (``deadline`` is ignored; use ``timeout``) and return the whole answer."""
        return convert.generation_result_from_proto(self._call(self._generation.Generate, _request_proto(request)))

    def generate_stream(self, request: GenerationRequest) -> Iterator[GenerationEvent]:
        """Yield the answer's events; the last has ``finished`` set. Closing the iterator early cancels the RPC."""
        call = self._generation.GenerateStream(_request_proto(request), timeout=self._timeout,
                                               metadata=self._metadata)
        try:
            for msg in call:
                yield convert.stream_event_from_proto(msg)
        except grpc.RpcError as err:
            raise ClientError.from_rpc_error(err) from None
        finally:
            call.cancel()

    def list_adapters(self) -> list[tuple[AdapterInfo, str]]:
        """Every adapter as ``(info, residency)``."""
        resp = self._call(self._adapters.ListAdapters, pb.ListAdaptersRequest())
        return [convert.adapter_from_proto(a) for a in resp.adapters]

    def get_adapter(self, adapter_id: str) -> tuple[AdapterInfo, str]:
        """One adapter as ``(info, residency)``."""
        return convert.adapter_from_proto(
            self._call(self._adapters.GetAdapter, pb.GetAdapterRequest(adapter_id=adapter_id)))

    def register_adapter(self, adapter_id: str, path: str, replace: bool = False) -> tuple[AdapterInfo, str]:
        """Register the adapter in ``path``, a directory on the server."""
        return convert.adapter_from_proto(self._call(
            self._adapters.RegisterAdapter,
            pb.RegisterAdapterRequest(adapter_id=adapter_id, path=path, replace=replace)))

    def unregister_adapter(self, adapter_id: str) -> None:
        """Remove an adapter."""
        self._call(self._adapters.UnregisterAdapter, pb.UnregisterAdapterRequest(adapter_id=adapter_id))

    def upload_adapter(self, adapter_id: str, directory: Path, replace: bool = False,
                       chunk_bytes: int = UPLOAD_CHUNK_BYTES) -> tuple[AdapterInfo, str]:
        """Stream ``directory``'s ``adapter_config.json`` and ``adapter_model.safetensors`` in ``chunk_bytes``
        pieces and register them. Raises :class:`ClientError` (INVALID_ARGUMENT, raised locally) when a file is
        missing."""
        files = [Path(directory) / name for name in convert.ADAPTER_FILES]
        for f in files:
            if not f.is_file():
                raise ClientError("INVALID_ARGUMENT", f"dir: {f} does not exist")
        total = sum(f.stat().st_size for f in files)
        chunk_bytes = max(1, min(chunk_bytes, self._chunk_cap))
        return convert.adapter_from_proto(
            self._call(self._adapters.UploadAdapter, _upload_requests(adapter_id, files, replace, total, chunk_bytes)))

    def create_training_job(self, request: JobRequest) -> Job:
        """Queue a training job; returns it (state ``queued``). A config key that is not a ``TrainingConfig``
        field raises :class:`ClientError` INVALID_ARGUMENT locally."""
        try:
            msg = training_convert.job_request_to_proto(request)
        except ServerError as exc:
            raise ClientError(exc.code, str(exc)) from None
        return training_convert.job_from_proto(self._call(self._training.CreateTrainingJob, msg))

    def get_training_job(self, job_id: str) -> Job:
        """One training job."""
        return training_convert.job_from_proto(
            self._call(self._training.GetTrainingJob, pb.GetTrainingJobRequest(job_id=job_id)))

    def list_training_jobs(self) -> list[Job]:
        """Every training job, newest first."""
        resp = self._call(self._training.ListTrainingJobs, pb.ListTrainingJobsRequest())
        return [training_convert.job_from_proto(j) for j in resp.jobs]

    def cancel_training_job(self, job_id: str) -> Job:
        """Cancel a queued or running job; returns it (state ``cancelled``)."""
        return training_convert.job_from_proto(
            self._call(self._training.CancelTrainingJob, pb.CancelTrainingJobRequest(job_id=job_id)))

    def watch_training_job(self, job_id: str) -> Iterator[JobEvent]:
        """Yield the job's events (its current state first) until a terminal state. Closing the iterator early
        cancels the RPC."""
        call = self._training.WatchTrainingJob(pb.WatchTrainingJobRequest(job_id=job_id), timeout=self._timeout,
                                               metadata=self._metadata)
        try:
            for msg in call:
                yield training_convert.job_event_from_proto(msg)
        except grpc.RpcError as err:
            raise ClientError.from_rpc_error(err) from None
        finally:
            call.cancel()


def _request_proto(request: GenerationRequest) -> pb.GenerateRequest:
    try:
        return convert.generate_request_to_proto(request)
    except ServerError as exc:
        raise ClientError(exc.code, str(exc)) from None


def _upload_requests(adapter_id: str, files: list[Path], replace: bool, total: int,
                     chunk_bytes: int) -> Iterator[pb.UploadAdapterRequest]:
    yield pb.UploadAdapterRequest(header=pb.UploadHeader(adapter_id=adapter_id, replace=replace, total_bytes=total))
    for path in files:
        with open(path, "rb") as f:
            data = f.read(chunk_bytes)
            yield pb.UploadAdapterRequest(chunk=pb.FileChunk(filename=path.name, data=data))  # even when empty
            while data := f.read(chunk_bytes):
                yield pb.UploadAdapterRequest(chunk=pb.FileChunk(filename=path.name, data=data))
