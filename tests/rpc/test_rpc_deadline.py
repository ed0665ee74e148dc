"""Issue 7, 4a: an RPC that ends on the client's deadline counts as DEADLINE_EXCEEDED, also when the client's own
deadline timer cancels the call a moment before the server's copy of the deadline passes."""

from __future__ import annotations

import time

import grpc
import pytest
from rpc_fakes import PROMPT_BLOCK  # tests/rpc is on sys.path (pytest's default "prepend" import mode)

from server.errors import Cancelled, DeadlineExceeded
from server.rpc.gen.qlora_server.v1 import qlora_server_pb2 as pb
from server.rpc.interceptor import DeadlineClock

WAIT = 30.0  # upper bound on waits for another thread; never asserted on
METHODS = {"unary": "qlora_server.v1.Generation/Generate", "stream": "qlora_server.v1.Generation/GenerateStream"}


class _Context:
    """A servicer context whose remaining time the test sets."""

    def __init__(self, remaining):
        self.remaining = remaining

    def time_remaining(self):
        return self.remaining


@pytest.mark.parametrize("budget,left,passed", [
    (None, None, False),            # no deadline
    (1e12, 1e12, False),            # gRPC's "infinite" deadline
    (30.0, 0.0, True),              # at the deadline
    (30.0, 0.5, True),              # the client's timer fired first: within the slack
    (30.0, 5.0, False),             # a real cancel, well before the deadline
    (0.4, 0.05, True),              # short timeout: slack is a fraction of it
    (0.4, 0.2, False),
])
def test_deadline_clock(budget, left, passed):
    ctx = _Context(budget)
    clock = DeadlineClock(ctx)
    ctx.remaining = left
    assert clock.passed() is passed


def _count(app, method, code):
    return app.metrics.registry.get_sample_value("qlora_server_requests_total",
                                                 {"method": method, "code": code}) or 0.0


def _wait_for(predicate):
    end = time.monotonic() + WAIT
    while time.monotonic() < end and not predicate():
        time.sleep(0.01)
    return predicate()


def _call(generation, kind, timeout):
    req = pb.GenerateRequest(prompt=PROMPT_BLOCK)
    return generation.Generate.future(req, timeout=timeout) if kind == "unary" else \
        generation.GenerateStream(req, timeout=timeout)


@pytest.mark.parametrize("kind", ["unary", "stream"])
def test_client_cancel_just_before_its_deadline_is_deadline_exceeded(generation, app, kind):
    """What a client's deadline timer does when it fires before the server's copy of the deadline: cancel."""
    timeout = 2.0
    call = _call(generation, kind, timeout)
    assert app.engine.stream_started.wait(WAIT)
    time.sleep(timeout - 0.1 * timeout)  # inside the slack (min(1 s, 25 % of 2 s) = 0.5 s before the deadline)
    call.cancel()
    assert app.engine.streams[0].cancelled.wait(WAIT)
    assert _wait_for(lambda: _count(app, METHODS[kind], "DEADLINE_EXCEEDED") == 1)
    assert _count(app, METHODS[kind], "CANCELLED") == 0
    assert isinstance(app.engine.streams[0].cancel_error, DeadlineExceeded)  # what the request log will say


@pytest.mark.parametrize("kind", ["unary", "stream"])
def test_client_cancel_well_before_its_deadline_is_cancelled(generation, app, kind):
    call = _call(generation, kind, 60.0)
    assert app.engine.stream_started.wait(WAIT)
    call.cancel()
    assert app.engine.streams[0].cancelled.wait(WAIT)
    assert _wait_for(lambda: _count(app, METHODS[kind], "CANCELLED") == 1)
    assert _count(app, METHODS[kind], "DEADLINE_EXCEEDED") == 0
    assert isinstance(app.engine.streams[0].cancel_error, Cancelled)


@pytest.mark.parametrize("kind", ["unary", "stream"])
def test_expired_deadline_is_deadline_exceeded_on_both_paths(generation, app, kind):
    call = _call(generation, kind, 0.5)
    with pytest.raises(grpc.RpcError) as info:
        call.result() if kind == "unary" else list(call)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert _wait_for(lambda: _count(app, METHODS[kind], "DEADLINE_EXCEEDED") == 1)
    assert _count(app, METHODS[kind], "CANCELLED") == 0
    assert isinstance(app.engine.streams[0].cancel_error, DeadlineExceeded)


def test_a_call_cancelled_during_shutdown_is_the_servers_shutdown_not_the_clients():
    import threading
    from types import SimpleNamespace

    from server.rpc.service import _client_gone

    clock = SimpleNamespace(passed=lambda: False)
    app = SimpleNamespace(shutting_down=threading.Event())
    assert "client" in str(_client_gone(clock, app))
    app.shutting_down.set()
    error = _client_gone(clock, app)
    assert error.code == "CANCELLED" and "shut down" in str(error) and "client" not in str(error)
    assert _client_gone(SimpleNamespace(passed=lambda: True), app).code == "DEADLINE_EXCEEDED"  # a deadline wins
