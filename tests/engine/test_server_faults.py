"""The issue's bad sampling request against the real ``qlora-server serve`` process (tiny model): the stream beside
it finishes OK, the bad request gets an answer, and SIGTERM still stops the server."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import grpc
import pytest

from server.rpc.gen.qlora_server.v1 import qlora_server_pb2 as pb
from tests.server_process import start_server, stop_process
from tests.tiny import save_tiny_base
from tests.tiny_tokenizer import save_byte_tokenizer

WAIT = 60.0  # seconds: bounded waits for liveness


@pytest.fixture
def server(tmp_path):
    base = save_tiny_base(tmp_path)
    save_byte_tokenizer(base)
    srv = start_server(str(base), tmp_path / "store", tmp_path / "server.log", "--compute-dtype", "float32",
                       "--log-json")
    yield srv
    stop_process(srv.proc, timeout_s=5)


def test_bad_sampling_request_beside_a_stream_then_sigterm(server):
    gen, _ = server.stubs()
    neighbour = pb.GenerateRequest(prompt="hello there", max_new_tokens=60)
    alone = gen.Generate(neighbour, timeout=WAIT).text
    stream = gen.GenerateStream(neighbour, timeout=WAIT)
    first = next(stream)  # the neighbour is decoding
    bad = gen.Generate(pb.GenerateRequest(prompt="The capital of France is", max_new_tokens=4, temperature=1e-40,
                                          seed=7), timeout=WAIT)
    assert bad.finish_reason == pb.FINISH_REASON_LENGTH and bad.completion_tokens == 4
    rest = list(stream)
    assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert first.text + "".join(p.text for p in rest) == alone

    server.proc.send_signal(signal.SIGTERM)
    try:
        code = server.proc.wait(timeout=WAIT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the server was still up {WAIT} s after SIGTERM")
    assert code == 0
    lines = [json.loads(line) for line in server.log_path.read_text().splitlines() if line.startswith("{")]
    requests = [r for r in lines if r.get("event") == "request"]
    assert [r["status"] for r in requests] == ["OK"] * 3  # alone, the bad one, the stream: one line each


def test_requests_cut_off_by_shutdown_are_logged_as_shutdown_not_as_client_cancels(tmp_path):
    """SIGTERM with a short grace while a long stream runs: the client sees the call end, and the request log says
    the server shut down (the request was not cancelled by its client)."""
    # No grace at all, and a deeper tiny model (slower steps): the stream (at most ~117 tokens in a 128-token
    # context) is certainly still running when SIGTERM arrives right after its first message.
    base = save_tiny_base(tmp_path, layers=8)
    save_byte_tokenizer(base)
    srv = start_server(str(base), tmp_path / "store", tmp_path / "server.log", "--compute-dtype", "float32",
                       "--log-json", "--shutdown-grace", "0")
    try:
        gen, _ = srv.stubs()
        stream = gen.GenerateStream(pb.GenerateRequest(prompt="hello there", max_new_tokens=1000),
                                    timeout=WAIT)
        next(stream)  # it is decoding
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(timeout=WAIT) == 0
    finally:
        stop_process(srv.proc, timeout_s=5)
    lines = [json.loads(line) for line in srv.log_path.read_text().splitlines() if line.startswith("{")]
    requests = [r for r in lines if r.get("event") == "request"]
    assert len(requests) == 1, requests
    error = requests[0].get("error", "")
    assert requests[0]["status"] == "CANCELLED" and "shut" in error and "client" not in error, requests[0]


def test_sigterm_drains_the_in_flight_stream_and_refuses_new_requests_with_unavailable(tmp_path):
    """SIGTERM with a grace period while a long stream runs: new requests are UNAVAILABLE at once, the stream
    still finishes (OK, every token) within the grace period, and the server exits 0."""
    base = save_tiny_base(tmp_path, layers=16)  # deeper: slower steps, so the stream outlives the refusal
    save_byte_tokenizer(base)
    srv = start_server(str(base), tmp_path / "store", tmp_path / "server.log", "--compute-dtype", "float32",
                       "--log-json", "--shutdown-grace", "60")
    try:
        gen, _ = srv.stubs()
        stream = gen.GenerateStream(pb.GenerateRequest(prompt="hello there", max_new_tokens=1000, ignore_eos=True),
                                    timeout=WAIT)
        first = next(stream)  # it is decoding
        srv.proc.send_signal(signal.SIGTERM)
        refused, end = None, time.monotonic() + WAIT
        while refused is None and time.monotonic() < end:
            fresh, _ = srv.stubs()  # a new connection each time, as a new client would open
            try:
                fresh.Generate(pb.GenerateRequest(prompt="late", max_new_tokens=1), timeout=5)
            except grpc.RpcError as exc:
                refused = exc
            else:
                time.sleep(0.05)  # SIGTERM not acted on yet
        assert refused is not None and refused.code() == grpc.StatusCode.UNAVAILABLE, refused
        assert "shutting down" in refused.details()  # refused by the server, which still listens
        assert not stream.done(), "the stream ended before the refusal: nothing was drained"
        rest = list(stream)  # the in-flight one completes
        assert rest and rest[-1].finish_reason == pb.FINISH_REASON_LENGTH
        assert first.text or any(r.text for r in rest)
        assert srv.proc.wait(timeout=WAIT) == 0
    finally:
        stop_process(srv.proc, timeout_s=5)
    lines = [json.loads(line) for line in srv.log_path.read_text().splitlines() if line.startswith("{")]
    statuses = [r["status"] for r in lines if r.get("event") == "request"]
    assert statuses == ["OK"], statuses  # the refused request never reached the engine
