"""gRPC servicers of Generation and Adapters: convert the request, call the engine or the store, convert back."""

from __future__ import annotations

import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import BinaryIO, Iterator

import grpc

from server.auth import check_path, require_adapter, visible
from server.config import ADAPTER_ID_RE
from server.engine.types import EndedEarly, GenerationResult
from server.errors import (
    AlreadyExists,
    Cancelled,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ServerError,
)
from server.rpc import convert
from server.rpc.auth import current_principal
from server.rpc.gen.qlora_server.v1 import qlora_server_pb2 as pb
from server.rpc.gen.qlora_server.v1 import qlora_server_pb2_grpc as pb_grpc
from server.rpc.interceptor import DeadlineClock, client_time_remaining

#: Prefix of the per-upload staging directories made inside the adapter store's root.
STAGING_PREFIX = ".upload-"


def new_request_id() -> str:
    """A fresh request id (32 hex characters)."""
    return uuid.uuid4().hex


def monotonic_deadline(context: grpc.ServicerContext) -> float | None:
    """The client's deadline as a ``time.monotonic()`` instant (seconds), or None when it set none."""
    remaining = client_time_remaining(context)
    return None if remaining is None else time.monotonic() + remaining


def _client_gone(clock: DeadlineClock, app=None) -> ServerError:
    """What a request whose RPC ended early ends with: its deadline, the server's shutdown (``app.shutting_down``
    set: gRPC cancelled the call when the grace period ran out), or the client's cancellation."""
    if clock.passed():
        return DeadlineExceeded("the client's deadline passed")
    shutting_down = getattr(app, "shutting_down", None)
    if shutting_down is not None and shutting_down.is_set():
        return Cancelled("the server shut down before the request finished")
    return Cancelled("the client cancelled the request")


class GenerationServicer(pb_grpc.GenerationServicer):
    """``qlora_server.v1.Generation`` on top of ``app.engine``.

    Errors are raised, never set on the context (the interceptor maps them): INVALID_ARGUMENT for a malformed
    request (naming the field), NOT_FOUND for an unknown adapter, RESOURCE_EXHAUSTED when the engine's queue is
    full or the prompt too long, and whatever error the engine puts on the request's last event (deadline,
    cancellation, adapter unregistered mid-request). A client that cancels or disconnects stops the work via
    ``stream.cancel``, with DEADLINE_EXCEEDED when its deadline passed (so the request log agrees with the RPC's
    status and ``qlora_server_requests_total``).
    """

    def __init__(self, app) -> None:
        self._app = app

    def _submit(self, request: pb.GenerateRequest, context: grpc.ServicerContext):
        """Submit ``request``; returns the engine's stream and the RPC's :class:`DeadlineClock`."""
        clock = DeadlineClock(context)
        if request.adapter_id:
            require_adapter(current_principal(), request.adapter_id)
        limits = self._app.config.engine
        req = convert.generation_request_from_proto(
            request, default_request_id=new_request_id(), max_new_tokens_limit=limits.max_new_tokens,
            deadline=monotonic_deadline(context), max_stop_strings=limits.max_stop_strings,
            max_stop_chars=limits.max_stop_chars)
        stream = self._app.engine.submit(req)

        def stop() -> None:
            _stop(stream, context, clock, self._app)

        if not context.add_callback(stop):  # the RPC already ended (client gone)
            stop()
        return stream, clock

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> pb.GenerateResponse:
        """Run the request to its end and return the whole answer."""
        stream, clock = self._submit(request, context)
        finished = False
        try:
            try:
                result = GenerationResult.from_events(stream, stream.request_id)
            except EndedEarly:
                raise _ended_early(context, clock, self._app) from None
            finished = True
            return convert.generate_response_to_proto(result)
        finally:
            if not finished:
                _stop(stream, context, clock, self._app)

    def GenerateStream(self, request: pb.GenerateRequest,
                       context: grpc.ServicerContext) -> Iterator[pb.GenerateStreamResponse]:
        """Stream the answer as text deltas; the last message carries finish reason, token counts and timings, the
        first the prompt's log-probabilities when the request asked (``prompt_logprobs``)."""
        stream, clock = self._submit(request, context)
        finished = False
        try:
            for event in stream:
                if event.error is not None:
                    raise event.error
                if event.finished:
                    finished = True
                    yield convert.stream_event_to_proto(event)
                    return
                # a chunk carries its tokens' log-probabilities; the first may carry only the prompt's
                if event.text or event.logprobs or event.prompt_logprobs:
                    yield convert.stream_event_to_proto(event)
            raise _ended_early(context, clock, self._app)
        finally:
            if not finished:
                _stop(stream, context, clock, self._app)


def _stop(stream, context: grpc.ServicerContext, clock: DeadlineClock, app=None) -> None:
    """Stop the engine's work for an RPC that ended (or is ending) before its final event; a no-op for a request
    that already finished."""
    stream.cancel(_client_gone(clock, app) if not context.is_active() else Cancelled("the RPC ended early"))


def _ended_early(context: grpc.ServicerContext, clock: DeadlineClock, app=None) -> ServerError:
    if not context.is_active():
        return _client_gone(clock, app)
    return ServerError("the engine ended the request without a final event")


class AdaptersServicer(pb_grpc.AdaptersServicer):
    """``qlora_server.v1.Adapters`` on top of ``app.store`` (validation, persistence) and ``app.adapter_cache``
    (residency). Store errors (INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS) pass through the interceptor."""

    def __init__(self, app) -> None:
        self._app = app

    def _to_proto(self, info) -> pb.Adapter:
        return convert.adapter_to_proto(info, self._app.adapter_cache.residency(info.adapter_id))

    def RegisterAdapter(self, request: pb.RegisterAdapterRequest, context: grpc.ServicerContext) -> pb.Adapter:
        """Register the adapter in ``request.path`` (a directory on the server). Raises InvalidArgument (field
        ``path``) when the path is empty."""
        principal = current_principal()
        require_adapter(principal, request.adapter_id)
        if not request.path:
            raise InvalidArgument("must name a directory on the server", field="path")
        path = check_path(request.path, self._app.config.allowed_paths, enforce=principal is not None, field="path")
        return self._to_proto(self._app.store.register(request.adapter_id, path, request.replace))

    def UnregisterAdapter(self, request: pb.UnregisterAdapterRequest,
                          context: grpc.ServicerContext) -> pb.UnregisterAdapterResponse:
        """Remove the adapter (NOT_FOUND when unknown)."""
        require_adapter(current_principal(), request.adapter_id)
        self._app.store.unregister(request.adapter_id)
        return pb.UnregisterAdapterResponse()

    def ListAdapters(self, request: pb.ListAdaptersRequest,
                     context: grpc.ServicerContext) -> pb.ListAdaptersResponse:
        """Every registered adapter, ordered by id."""
        infos = sorted(visible(current_principal(), self._app.store.list()), key=lambda i: i.adapter_id)
        return pb.ListAdaptersResponse(adapters=[self._to_proto(i) for i in infos])

    def GetAdapter(self, request: pb.GetAdapterRequest, context: grpc.ServicerContext) -> pb.Adapter:
        """One adapter (NOT_FOUND when unknown)."""
        require_adapter(current_principal(), request.adapter_id)
        return self._to_proto(self._app.store.get(request.adapter_id))

    def UploadAdapter(self, request_iterator: Iterator[pb.UploadAdapterRequest],
                      context: grpc.ServicerContext) -> pb.Adapter:
        """Receive a header and file chunks into a fresh staging directory ``.upload-*`` under the store's root,
        then hand it to ``store.register_files`` (which validates the content). The staging directory is removed
        whatever happens.

        Raises:
            InvalidArgument: missing or repeated header (field ``header``), bad adapter id
                (``header.adapter_id``), unknown file name (``chunk.filename``), a file never sent, a byte count
                different from ``header.total_bytes``, or invalid content (from the store).
            ResourceExhausted: more than ``app.config.max_upload_bytes`` bytes declared or received.
            AlreadyExists: the id is registered and ``replace`` is false.
        """
        store = self._app.store
        cap = self._app.config.max_upload_bytes
        root = Path(store.root)
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=root))
        try:
            header = _receive_upload(request_iterator, staging, cap, store)
            info = store.register_files(header.adapter_id, staging, header.replace)
            return self._to_proto(info)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _receive_upload(requests: Iterator[pb.UploadAdapterRequest], staging: Path, cap: int, store) -> pb.UploadHeader:
    """Write an upload stream's chunks into ``staging``; returns its header (see ``UploadAdapter`` for errors)."""
    requests = iter(requests)
    first = next(requests, None)
    if first is None or first.WhichOneof("part") != "header":
        raise InvalidArgument("the first message of an upload must be a header", field="header")
    header = first.header
    _check_header(header, cap, store)
    files: dict[str, BinaryIO] = {}
    received = 0
    try:
        for msg in requests:
            part = msg.WhichOneof("part")
            if part == "header":
                raise InvalidArgument("only the first message may be a header", field="header")
            if part != "chunk":
                raise InvalidArgument("every message after the header must carry a chunk", field="chunk")
            name = msg.chunk.filename
            if name not in convert.ADAPTER_FILES:
                raise InvalidArgument(f"must be one of {', '.join(convert.ADAPTER_FILES)}, got {name!r}",
                                      field="chunk.filename")
            received += len(msg.chunk.data)
            if received > cap:
                raise ResourceExhausted(f"upload exceeds the server's cap of {cap} bytes", field="chunk.data")
            if header.HasField("total_bytes") and received > header.total_bytes:
                raise InvalidArgument(f"more data than the declared {header.total_bytes} bytes",
                                      field="header.total_bytes")
            if name not in files:
                files[name] = open(staging / name, "wb")
            files[name].write(msg.chunk.data)
    finally:
        for f in files.values():
            f.close()
    if header.HasField("total_bytes") and received != header.total_bytes:
        raise InvalidArgument(f"truncated upload: received {received} of {header.total_bytes} bytes",
                              field="header.total_bytes")
    missing = [n for n in convert.ADAPTER_FILES if n not in files]
    if missing:
        raise InvalidArgument(f"missing file {missing[0]}", field="chunk.filename")
    return header


def _check_header(header: pb.UploadHeader, cap: int, store) -> None:
    if not ADAPTER_ID_RE.match(header.adapter_id):
        raise InvalidArgument(f"must match {ADAPTER_ID_RE.pattern}, got {header.adapter_id!r}",
                              field="header.adapter_id")
    require_adapter(current_principal(), header.adapter_id, field="header.adapter_id")
    if header.HasField("total_bytes"):
        if header.total_bytes < 0:
            raise InvalidArgument("must be >= 0", field="header.total_bytes")
        if header.total_bytes > cap:
            raise ResourceExhausted(f"{header.total_bytes} bytes exceed the server's cap of {cap} bytes",
                                    field="header.total_bytes")
    if not header.replace:
        try:
            store.get(header.adapter_id)
        except NotFound:
            return
        raise AlreadyExists(f"adapter {header.adapter_id!r} exists; set replace to overwrite it",
                            field="header.adapter_id")
