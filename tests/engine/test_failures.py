"""The engine's failure invariant: every accepted request gets exactly one terminal event whatever fails, a failure
ends only the requests it touched, and sampling is numerically safe for every accepted parameter value."""

from __future__ import annotations

import math
import queue
import time
from types import SimpleNamespace

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.config import ServerConfig
from server.engine import engine as engine_module
from server.engine.types import GenerationRequest, SamplingParams
from server.errors import Cancelled, InvalidArgument, ServerError, Unavailable
from server.rpc.gen.qlora_server.v1 import qlora_server_pb2 as pb
from server.rpc.gen.qlora_server.v1 import qlora_server_pb2_grpc as pbg
from server.rpc.server import build_grpc_server
from tests.engine_harness import build_engine
from tests.tiny import make_adapter, save_tiny_base

WAIT = 30.0  # seconds: bounded waits for liveness, never a timing assertion
SAMPLING_FIELDS = {"temperature", "top_p", "top_k", "repetition_penalty", "seed"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("failures")
    base = save_tiny_base(root)
    return base, {"alpha": make_adapter(base, root / "src-alpha", seed=11, r=2, lora_alpha=4)}


def build(root, files, **kw):
    """Float32 compute: a row's greedy answer does not depend on its batch neighbours."""
    return build_engine(root, *files, compute_dtype=torch.float32, **kw)


def req(rid, adapter="", prompt="hello there", **params):
    return GenerationRequest(request_id=rid, adapter_id=adapter, prompt=prompt,
                             params=SamplingParams(**{"max_new_tokens": 12, **params}))


def drain(stream, timeout=WAIT):
    """Every event of ``stream`` up to its terminal one; fails the test when none comes within ``timeout`` s."""
    events = []
    end = time.monotonic() + timeout
    while True:
        try:
            event = stream._events.get(timeout=max(0.01, end - time.monotonic()))
        except queue.Empty:
            pytest.fail(f"request {stream.request_id} got no terminal event within {timeout} s")
        events.append(event)
        if event.finished or event.error is not None:
            return events


def ids(events):
    assert events[-1].error is None, events[-1].error
    return [t for e in events for t in e.token_ids]


def wait_for(cond, timeout=WAIT):
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            pytest.fail("condition not reached in time")
        time.sleep(0.005)


def wait_running(eng, stream):
    """Wait until ``stream``'s request is in the running batch (decoding)."""
    wait_for(lambda: any(seq.stream is stream for seq in list(eng._running)))


def assert_clean(eng):
    """Nothing in flight, no slot pin left, no second terminal event queued anywhere."""
    wait_for(lambda: eng.counts() == (0, 0))
    assert not eng._by_id
    assert eng.cache._slot_refs == [0] * len(eng.cache._slot_refs)


# --- 9a: the issue's request, and a sweep over every sampling parameter ------------------------------------------

def test_issue_request_tiny_temperature_answers_and_spares_its_neighbour(tmp_path, files):
    """Issue 7, 9a: temperature 1e-40 made sampling fail on non-finite probabilities during prefill."""
    eng, _, _ = build(tmp_path, files, start=False)
    try:
        neighbour = eng.submit(req("nb", max_new_tokens=20))
        bad = eng.submit(GenerationRequest("bad", prompt="The capital of France is",
                                           params=SamplingParams(max_new_tokens=4, temperature=1e-40, seed=7)))
        eng.start()  # both are prefilled in one forward pass, then decoded together
        bad_events, nb_events = drain(bad), drain(neighbour)
        greedy = drain(eng.submit(GenerationRequest("greedy", prompt="The capital of France is",
                                                    params=SamplingParams(max_new_tokens=4))))
        alone = drain(eng.submit(req("alone", max_new_tokens=20)))
        # T -> 0 is greedy decoding (the argmax is the oracle), and the neighbour is untouched.
        assert bad_events[-1].finish_reason == "length" and ids(bad_events) == ids(greedy)
        assert ids(nb_events) == ids(alone)
        assert_clean(eng)
    finally:
        eng.stop()
    assert not eng._thread.is_alive()


def _accepted(p: dict) -> bool:
    """The documented ranges (proto comments / SamplingParams), written independently of the validation."""
    t, top_p, k, rp, seed = p["temperature"], p["top_p"], p["top_k"], p["repetition_penalty"], p["seed"]
    return (math.isfinite(t) and t >= 0 and math.isfinite(top_p) and 0 < top_p <= 1 and k >= 0
            and math.isfinite(rp) and rp > 0 and (seed is None or 0 <= seed < 2**64))


_EDGES = [0.0, -0.0, 5e-324, 1e-310, 1e-45, 1e-40, 1e-300, 1e-8, 0.5, 1.0, 2.0, 1e8, 1e40, 1e300,
          1.7976931348623157e308, -5e-324, -1.0, math.inf, -math.inf, math.nan]
SWEEP = st.fixed_dictionaries({
    "temperature": st.one_of(st.sampled_from(_EDGES), st.floats(min_value=0, max_value=1e6)),
    "top_p": st.one_of(st.sampled_from(_EDGES + [1.0000001, 0.9999999]), st.floats(min_value=0, max_value=1)),
    "top_k": st.one_of(st.sampled_from([0, 1, 2, 255, 256, 257, 2**31 - 1, -1]), st.integers(-3, 300)),
    "repetition_penalty": st.one_of(st.sampled_from(_EDGES), st.floats(min_value=1e-3, max_value=1e3)),
    "seed": st.one_of(st.none(), st.sampled_from([0, 1, 2**63 - 1, 2**63, 2**64 - 1, -1, 2**64]),
                      st.integers(0, 2**64 - 1)),
    "max_new_tokens": st.integers(1, 6),
    "prompt": st.sampled_from(["The capital of France is", "hi", "a longer prompt, to pad the others"]),
})


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, files):
    eng, _, _ = build(tmp_path_factory.mktemp("sweep"), files)
    neighbour_alone = ids(drain(eng.submit(req("ref", max_new_tokens=60))))
    yield eng, neighbour_alone
    eng.stop()
    assert not eng._thread.is_alive()  # shutdown completed


_counter = iter(range(10**9))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(p=SWEEP)
def test_sampling_sweep_with_a_neighbour_running(sweep, p):
    """Any accepted sampling value gives an answer (never an error) and leaves the running neighbour's greedy
    answer unchanged; a value outside the documented range is refused at submit, naming its field."""
    eng, neighbour_alone = sweep
    n = next(_counter)
    neighbour = eng.submit(req(f"nb{n}", max_new_tokens=60))
    wait_running(eng, neighbour)  # the neighbour is decoding when the swept request is prefilled
    params = {k: v for k, v in p.items() if k != "prompt"}
    try:
        swept = eng.submit(GenerationRequest(f"sw{n}", prompt=p["prompt"], params=SamplingParams(**params)))
    except InvalidArgument as err:
        assert not _accepted(params), params
        assert err.field in SAMPLING_FIELDS
        swept = None
    else:
        assert _accepted(params), params
    if swept is not None:
        events = drain(swept)
        assert events[-1].error is None, (params, events[-1].error)
        assert events[-1].finish_reason in ("length", "eos", "stop")
        assert all(0 <= t < 256 for t in ids(events))
    assert ids(drain(neighbour)) == neighbour_alone
    assert_clean(eng)
    assert neighbour._events.empty() and (swept is None or swept._events.empty())  # exactly one terminal event


# --- 10a: injected failures ------------------------------------------------------------------------------------

def _raiser(exc_type=RuntimeError, message="injected failure"):
    def boom(*args, **kwargs):
        raise exc_type(message)
    return boom


def test_failed_prefill_ends_only_the_requests_it_admitted(tmp_path, files, monkeypatch):
    eng, _, _ = build(tmp_path, files)
    try:
        want = ids(drain(eng.submit(req("ref", max_new_tokens=40))))
        neighbour = eng.submit(req("nb", max_new_tokens=40))
        wait_running(eng, neighbour)
        monkeypatch.setattr(eng.runner, "prefill", _raiser())
        victim = eng.submit(req("victim", "alpha"))
        last = drain(victim)[-1]
        assert isinstance(last.error, ServerError) and last.error.code == "INTERNAL"
        assert "prefill failed" in str(last.error) and "injected failure" in str(last.error)
        monkeypatch.undo()
        assert ids(drain(neighbour)) == want  # the running batch survived
        assert_clean(eng)  # the victim's adapter slot pin and request id were released
        assert drain(eng.submit(req("after", "alpha")))[-1].error is None
    finally:
        eng.stop()


def test_failed_decode_ends_the_running_batch_not_the_queue(tmp_path, files, monkeypatch):
    eng, _, _ = build(tmp_path, files, max_batch_size=1)
    try:
        want = ids(drain(eng.submit(req("ref", prompt="zz"))))
        running = eng.submit(req("run", max_new_tokens=60))
        wait_running(eng, running)
        waiting = eng.submit(req("wait", prompt="zz"))  # the batch is full: it waits
        calls = {"n": 0}
        real_decode = eng.runner.decode

        def decode_once_failing(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("injected decode failure")
            return real_decode(*args, **kwargs)

        monkeypatch.setattr(eng.runner, "decode", decode_once_failing)
        last = drain(running)[-1]
        assert last.error is not None and last.error.code == "INTERNAL" and "injected decode" in str(last.error)
        assert ids(drain(waiting)) == want
        assert_clean(eng)
    finally:
        eng.stop()


def test_failed_slot_acquisition_ends_that_request_only(tmp_path, files, monkeypatch):
    eng, _, _ = build(tmp_path, files)
    try:
        want = ids(drain(eng.submit(req("ref", max_new_tokens=40))))
        neighbour = eng.submit(req("nb", max_new_tokens=40))
        wait_running(eng, neighbour)
        monkeypatch.setattr(eng.cache, "acquire", _raiser(OSError, "injected slot failure"))
        last = drain(eng.submit(req("victim", "alpha")))[-1]
        assert last.error.code == "INTERNAL" and "injected slot failure" in str(last.error)
        assert ids(drain(neighbour)) == want
        assert_clean(eng)
    finally:
        eng.stop()


def test_submit_after_stop_is_refused(tmp_path, files):
    eng, _, _ = build(tmp_path, files)
    eng.stop()
    with pytest.raises(Unavailable) as err:
        eng.submit(req("late"))
    assert err.value.code == "UNAVAILABLE"


def test_stop_answers_every_waiting_request_even_before_start(tmp_path, files):
    eng, _, _ = build(tmp_path, files, start=False)
    streams = [eng.submit(req(f"w{i}")) for i in range(3)]
    eng.stop()
    for s in streams:
        assert isinstance(drain(s, timeout=5)[-1].error, Cancelled)
        assert s._events.empty()
    assert not eng._by_id


class _Die(BaseException):
    """Not an Exception: escapes the step's error handling and kills the loop thread."""


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_dead_engine_thread_ends_requests_and_reports_not_serving(tmp_path, files, monkeypatch):
    eng, store, metrics = build(tmp_path, files)
    app = SimpleNamespace(config=ServerConfig(engine=eng.config, grpc_workers=4), engine=eng, store=store,
                          adapter_cache=eng.cache, metrics=metrics)
    server, port = build_grpc_server(app, "127.0.0.1", 0)
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)

            def status(service):
                return health.Check(health_pb2.HealthCheckRequest(service=service), timeout=WAIT).status

            assert status("") == health_pb2.HealthCheckResponse.SERVING
            running = eng.submit(req("run", max_new_tokens=60))
            wait_running(eng, running)
            monkeypatch.setattr(eng.runner, "decode", _raiser(_Die))
            last = drain(running)[-1]
            assert last.error.code == "INTERNAL" and "stopped unexpectedly" in str(last.error)
            eng._thread.join(WAIT)
            assert not eng._thread.is_alive()
            assert status("") == health_pb2.HealthCheckResponse.NOT_SERVING
            assert status("qlora_server.v1.Generation") == health_pb2.HealthCheckResponse.NOT_SERVING
            assert status("qlora_server.v1.Adapters") == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(Unavailable):
                eng.submit(req("late"))
            with pytest.raises(grpc.RpcError) as err:
                pbg.GenerationStub(channel).Generate(pb.GenerateRequest(prompt="x", max_new_tokens=2), timeout=WAIT)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(None)
        eng.stop()


# --- 10a: a property sweep over which step fails, and on which call --------------------------------------------

MIX = [("", "hello there", 30), ("alpha", "hello there", 12), ("", "zz", 8), ("alpha", "a longer prompt", 20),
       ("", "hi", 16)]
FAULT_POINTS = ["prefill", "decode", "select_tokens", "acquire", "release", "request_log", "tokenizer_decode"]


@pytest.fixture(scope="module")
def faulty(tmp_path_factory, files):
    eng, _, _ = build(tmp_path_factory.mktemp("faulty"), files, max_batch_size=3, prefill_chunk=2)
    alone = [ids(drain(eng.submit(req(f"alone{i}", a, p, max_new_tokens=n)))) for i, (a, p, n) in enumerate(MIX)]
    yield eng, alone
    eng.stop()
    assert not eng._thread.is_alive()


def _patch_nth(owner, name, nth, times):
    """Make calls ``nth .. nth + times - 1`` (0-based) of ``owner.name`` raise; returns an undo function."""
    real = getattr(owner, name)
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        i = calls["n"]
        calls["n"] += 1
        if nth <= i < nth + times:
            raise RuntimeError(f"injected {name} failure")
        return real(*args, **kwargs)

    setattr(owner, name, wrapper)
    return lambda: setattr(owner, name, real)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(point=st.sampled_from(FAULT_POINTS), nth=st.integers(0, 12), times=st.integers(1, 3),
       stagger=st.booleans())
def test_any_failure_gives_every_request_exactly_one_terminal_event(faulty, point, nth, times, stagger):
    eng, alone = faulty
    real_log = eng.request_log
    eng.request_log = SimpleNamespace(finished=real_log.finished)  # RequestLog is frozen: patch a stand-in
    owner = {"prefill": eng.runner, "decode": eng.runner, "select_tokens": engine_module, "acquire": eng.cache,
             "release": eng.cache, "request_log": eng.request_log, "tokenizer_decode": eng.tokenizer}[point]
    name = {"request_log": "finished", "tokenizer_decode": "decode",
            "select_tokens": "select_tokens_logprobs"}.get(point, point)
    n = next(_counter)
    undo = _patch_nth(owner, name, nth, times)
    try:
        streams = []
        for i, (a, p, k) in enumerate(MIX):
            streams.append(eng.submit(req(f"f{n}-{i}", a, p, max_new_tokens=k)))
            if stagger and i == 1:
                wait_for(lambda: eng.counts()[0] >= 1 or not streams[0]._events.empty())
        results = [drain(s) for s in streams]
    finally:
        undo()
        eng.request_log = real_log
    for i, (events, stream) in enumerate(zip(results, streams)):
        last = events[-1]
        if last.error is None:
            assert ids(events) == alone[i], (point, nth, i)  # a request that succeeded got its true answer
        else:
            assert isinstance(last.error, ServerError) and last.error.code == "INTERNAL", last.error
            assert "injected" in str(last.error)
    wait_for(lambda: eng.counts() == (0, 0))
    assert not eng._by_id
    if point != "release":  # a release that raised cannot unpin; every other failure leaves no pin behind
        assert eng.cache._slot_refs == [0] * len(eng.cache._slot_refs)
    else:
        eng.cache._slot_refs[:] = [0] * len(eng.cache._slot_refs)  # undo the injected leak for later examples
    assert all(s._events.empty() for s in streams)  # exactly one terminal event each
    assert drain(eng.submit(req(f"after{n}", "alpha", max_new_tokens=3)))[-1].error is None  # still serving
