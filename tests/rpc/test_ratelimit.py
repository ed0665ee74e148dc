"""Per-key rate limits (README: Security, Limits and overload): token buckets with a fake clock, and requests/s,
max_concurrent and tokens/min through the real gRPC server over the fakes."""

from __future__ import annotations

import json
import time
from pathlib import Path

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rpc_fakes import PROMPT_BLOCK, FakeApp, wait_for

from server.auth import KeyLimits, KeyStore, hash_key
from server.errors import FailedPrecondition, RateLimited
from server.rpc.gen.qlora_server.v1 import qlora_server_pb2 as pb
from server.rpc.gen.qlora_server.v1 import qlora_server_pb2_grpc as pb_grpc
from server.rpc.interceptor import RETRY_AFTER_METADATA_KEY
from server.ratelimit import KeyLimiter, TokenBucket
from server.rpc.server import build_grpc_server

WAIT = 10.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- the buckets, with a fake clock --------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(rate=st.floats(0.1, 50), gaps=st.lists(st.floats(0, 2), min_size=1, max_size=120))
def test_requests_bucket_never_admits_more_than_rate_times_t_plus_burst(rate, gaps):
    clock = FakeClock()
    limiter = KeyLimiter(clock)
    limits = KeyLimits(requests_per_second=rate)
    burst = max(1.0, rate)
    admitted = []
    for gap in gaps:
        clock.now += gap
        try:
            limiter.admit("k", limits)
            admitted.append(clock.now)
        except RateLimited as exc:
            assert exc.retry_after_ms >= 1
    for i in range(len(admitted)):
        for j in range(i, len(admitted)):
            window = admitted[j] - admitted[i]
            assert j - i + 1 <= rate * window + burst + 1e-6, (i, j, window)
    assert admitted or not gaps


@settings(max_examples=100, deadline=None)
@given(rate=st.floats(0.1, 50), waited=st.floats(0, 1))
def test_retry_hint_is_when_the_next_request_is_admitted(rate, waited):
    clock = FakeClock()
    limiter = KeyLimiter(clock)
    limits = KeyLimits(requests_per_second=rate)
    limiter.admit("k", limits)
    clock.now += waited  # a partly refilled bucket
    while True:  # empty it
        try:
            limiter.admit("k", limits)
        except RateLimited as exc:
            hint = exc.retry_after_ms
            break
    assert 1 <= hint <= max(1, 1000 / rate + 1)
    clock.now += hint / 1000
    limiter.admit("k", limits)  # admitted after the hint


def test_bucket_refills_to_capacity_and_may_go_negative_on_charge():
    clock = FakeClock()
    bucket = TokenBucket(rate=2.0, capacity=4.0, clock=clock)
    assert bucket.try_take(4) == 0 and bucket.level == 0
    assert bucket.try_take(1) == pytest.approx(0.5)
    clock.now += 100
    assert bucket.level == 4  # never above capacity
    bucket.charge(10)
    assert bucket.level == -6 and bucket.wait_time(1) == pytest.approx(3.5)


def test_limiter_tokens_and_concurrency_with_a_fake_clock():
    clock = FakeClock()
    limiter = KeyLimiter(clock)
    limits = KeyLimits(tokens_per_minute=60, max_concurrent=2)
    a = limiter.start_generation("k", limits)
    b = limiter.start_generation("k", limits)
    with pytest.raises(RateLimited, match="max_concurrent"):
        limiter.start_generation("k", limits)
    limiter.start_generation("other", limits).finish(0)  # another key has its own state
    a.finish(70)  # 60 - 70 = -10 tokens: refused for 11 s (one token per second)
    a.finish(70)  # finishing twice changes nothing
    with pytest.raises(RateLimited, match="tokens_per_minute") as info:
        limiter.start_generation("k", limits)
    assert info.value.retry_after_ms == 11000
    clock.now += 11
    c = limiter.start_generation("k", limits)
    b.finish(0)
    c.finish(0)
    # changed limits (a reload) start the key afresh
    limiter.start_generation("k", KeyLimits(tokens_per_minute=61, max_concurrent=2)).finish(0)


# --- the keys file -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value", [
    ("requests_per_second", 0), ("requests_per_second", -1.5), ("requests_per_second", "5"),
    ("requests_per_second", True), ("requests_per_second", float("inf")),
    ("tokens_per_minute", 0), ("tokens_per_minute", 1.5), ("tokens_per_minute", "100"), ("tokens_per_minute", -3),
    ("max_concurrent", 0), ("max_concurrent", 2.0), ("max_concurrent", False), ("max_concurrent", [1]),
])
def test_bad_limit_values_refuse_the_keys_file(tmp_path, field, value):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": [{"name": "a", "sha256": "0" * 64, "role": "admin", field: value}]}))
    with pytest.raises(FailedPrecondition) as info:
        KeyStore(path)
    assert field in str(info.value) and info.value.field == "api_keys_file"


def test_limits_load_from_yaml_and_reload(tmp_path):
    path = tmp_path / "keys.yaml"
    path.write_text(f"keys:\n  - {{name: a, sha256: {hash_key('k1')}, role: inference, requests_per_second: 2.5,"
                    f" tokens_per_minute: 100, max_concurrent: 3}}\n")
    keys = KeyStore(path)
    assert keys.resolve("k1").limits == KeyLimits(2.5, 100, 3)
    path.write_text(f"keys:\n  - {{name: a, sha256: {hash_key('k1')}, role: inference}}\n")
    assert keys.reload() and not keys.resolve("k1").limits
    path.write_text(f"keys:\n  - {{name: a, sha256: {hash_key('k1')}, role: inference, max_concurrent: 0}}\n")
    assert not keys.reload() and not keys.resolve("k1").limits  # a bad value keeps the keys in force


# --- through the real server ---------------------------------------------------------------------------------------

KEYS = {  # key -> (name, limits)
    "key-slow-0123456789": ("slow-app", {"requests_per_second": 1}),
    "key-free-0123456789": ("free-app", {}),
    "key-twin-0123456789": ("twin-app", {"requests_per_second": 1}),
    "key-one-stream-0123": ("one-stream", {"max_concurrent": 1}),
    "key-tokens-01234567": ("tokens-app", {"tokens_per_minute": 6}),
    "key-stoks-01234567": ("stream-tokens", {"tokens_per_minute": 6}),
}


@pytest.fixture
def served(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": [{"name": n, "sha256": hash_key(k), "role": "inference", **lim}
                                         for k, (n, lim) in KEYS.items()]}))
    app = FakeApp(tmp_path / "store")
    server, port = build_grpc_server(app, "127.0.0.1", 0, keys=KeyStore(path))
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield app, pb_grpc.GenerationStub(channel), pb_grpc.AdaptersStub(channel)
    channel.close()
    server.stop(None)


def md(key: str):
    return (("authorization", f"Bearer {key}"),)


def refusal(fn) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    err = info.value
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (err.code(), err.details())
    return err


def retry_after_ms(err: grpc.RpcError) -> int:
    values = [v for k, v in err.trailing_metadata() or () if k == RETRY_AFTER_METADATA_KEY]
    assert len(values) == 1, err.trailing_metadata()
    return int(values[0])


def test_a_key_over_its_requests_per_second_is_refused_with_a_retry_hint_and_others_are_not(served):
    app, generation, adapters = served
    listing = lambda key: adapters.ListAdapters(pb.ListAdaptersRequest(), metadata=md(key), timeout=WAIT)  # noqa
    listing("key-slow-0123456789")
    err = refusal(lambda: listing("key-slow-0123456789"))
    assert "key 'slow-app'" in err.details() and "requests_per_second" in err.details()
    assert 0 < retry_after_ms(err) <= 1000
    # Generation RPCs count too
    err = refusal(lambda: generation.Generate(pb.GenerateRequest(prompt="hi"), metadata=md("key-slow-0123456789"),
                                              timeout=WAIT))
    assert 0 < retry_after_ms(err) <= 1000
    for _ in range(10):  # a key without limits, and another limited key, are unaffected
        listing("key-free-0123456789")
    listing("key-twin-0123456789")
    time.sleep(retry_after_ms(err) / 1000 + 0.05)
    listing("key-slow-0123456789")  # admitted again after the hint


def test_max_concurrent_refuses_a_second_stream_of_the_key_while_one_is_held(served):
    app, generation, _ = served
    key = "key-one-stream-0123"
    held = generation.GenerateStream(pb.GenerateRequest(prompt=PROMPT_BLOCK), metadata=md(key), timeout=60)
    wait_for(lambda: len(app.engine.streams) == 1, "the held stream")
    for call in (lambda: list(generation.GenerateStream(pb.GenerateRequest(prompt="x"), metadata=md(key),
                                                        timeout=WAIT)),
                 lambda: generation.Generate(pb.GenerateRequest(prompt="x"), metadata=md(key), timeout=WAIT)):
        err = refusal(call)
        assert "key 'one-stream'" in err.details() and "max_concurrent" in err.details()
        assert retry_after_ms(err) > 0
    assert len(app.engine.streams) == 1  # nothing reached the engine
    other = list(generation.GenerateStream(pb.GenerateRequest(prompt="a b"), metadata=md("key-free-0123456789"),
                                           timeout=WAIT))
    assert other[-1].completion_tokens == 2
    held.cancel()

    def admitted() -> bool:
        try:
            return generation.Generate(pb.GenerateRequest(prompt="again"), metadata=md(key),
                                       timeout=WAIT).text == "again"
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            return False

    wait_for(admitted, "the slot to come back")


@pytest.mark.parametrize("streaming", [False, True])
def test_tokens_per_minute_are_charged_from_completion_tokens(served, streaming):
    app, generation, _ = served
    key = "key-stoks-01234567" if streaming else "key-tokens-01234567"

    def gen(prompt: str) -> int:
        req = pb.GenerateRequest(prompt=prompt, max_new_tokens=16)
        if streaming:
            return list(generation.GenerateStream(req, metadata=md(key), timeout=WAIT))[-1].completion_tokens
        return generation.Generate(req, metadata=md(key), timeout=WAIT).completion_tokens

    assert gen("a b") == 2  # 6 - 2 = 4 tokens left
    assert gen("a b c d e") == 5  # admitted with 4 left; the bucket goes to -1
    err = refusal(lambda: gen("a"))
    assert "tokens_per_minute" in err.details() and "6 tokens/min" in err.details()
    # two tokens to refill at 0.1 token/s: about 20 s
    assert 19_000 <= retry_after_ms(err) <= 20_000
    n = len(app.engine.submitted)
    refusal(lambda: gen("a"))
    assert len(app.engine.submitted) == n
