"""API keys, roles, tenants, per-key limits and TLS on the HTTP API, through the official openai client; the gRPC
port over the same app and :class:`server.access.Gate` is the oracle (README: OpenAI-compatible API, Security)."""

from __future__ import annotations

import json
import logging
import re
import ssl
import string
from contextlib import contextmanager
from pathlib import Path

import grpc
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rpc_fakes import PROMPT_BLOCK, FakeApp, serving, wait_for, write_adapter_dir
from test_auth import IN, KEYS, MISSING, OUT, md, write_keys
from test_cli_startup import _error_line, _serve
from test_ratelimit import FakeClock
from test_tls import OPENSSL, pki  # noqa: F401 (pki is a fixture)

from server.access import Gate, bearer_token
from server.auth import KeyStore, hash_key
from server.errors import Unauthenticated
from server.http.api import ROLES_BY_ROUTE
from server.http.server import HttpServer, bind_http_socket
from server.ratelimit import KeyLimiter
from server.rpc.auth import ROLES_BY_METHOD
from server.rpc.client import Client
from server.rpc.gen.qlora_server.v1 import qlora_server_pb2 as pb
from server.rpc.gen.qlora_server.v1 import qlora_server_pb2_grpc as pb_grpc
from server.rpc.server import build_grpc_server
from server.rpc.tls import ClientTLS

try:  # the openai client's HTTP library (httpx2 where installed, else httpx)
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx

BASE = "fake/base"
ADMIN, INFER, TRAIN = "key-admin-0123456789", "key-inference-acme-0123", "key-trainer-acme-0123"
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="needs the openssl command line")
#: gRPC status of the oracle -> the HTTP status the same request must get.
HTTP_STATUS = {grpc.StatusCode.OK: 200, grpc.StatusCode.UNAUTHENTICATED: 401, grpc.StatusCode.PERMISSION_DENIED: 403,
               grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.RESOURCE_EXHAUSTED: 429}


def oai(base_url: str, key: str, verify=None) -> openai.OpenAI:
    """The official client with ``key`` (``verify``: an ``ssl.SSLContext`` for HTTPS)."""
    http_client = None if verify is None else httpx.Client(verify=verify)
    return openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=30, http_client=http_client)


def trusting(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """A client TLS context trusting ``ca`` (and presenting ``cert``/``key`` for mutual TLS)."""
    ctx = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


class Both:
    """One fake app served over gRPC and HTTP behind one :class:`Gate` (keys of ``keys``, ``limiter``)."""

    def __init__(self, tmp_path: Path, keys_file: Path, limiter: KeyLimiter | None = None, **config) -> None:
        self.app = FakeApp(tmp_path / "store", **config)
        src = write_adapter_dir(tmp_path / "src")
        for aid in (IN, OUT):
            self.app.store.register(aid, src, False)
        self.gate = Gate(KeyStore(keys_file), limiter)
        self.grpc, port = build_grpc_server(self.app, "127.0.0.1", 0, keys=self.gate)
        self.grpc.start()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.generation = pb_grpc.GenerationStub(self.channel)
        self.adapters = pb_grpc.AdaptersStub(self.channel)
        self.http = HttpServer(self.app, bind_http_socket("127.0.0.1", 0), self.gate).start()
        self.base_url = f"{self.http.scheme}://127.0.0.1:{self.http.port}/v1"

    def client(self, key: str, verify=None) -> openai.OpenAI:
        return oai(self.base_url, key, verify)

    def close(self) -> None:
        self.http.stop()
        self.channel.close()
        self.grpc.stop(None)


@pytest.fixture
def both(tmp_path):
    b = Both(tmp_path, write_keys(tmp_path / "keys.json", KEYS))
    yield b
    b.close()


def http_status(fn) -> tuple[int, dict | None]:
    """(HTTP status, error object) of calling ``fn`` with the openai client: 200 and None when it succeeds."""
    try:
        fn()
    except openai.APIStatusError as exc:
        return exc.status_code, exc.body
    return 200, None


def grpc_code(fn) -> tuple[grpc.StatusCode, str]:
    try:
        fn()
    except grpc.RpcError as err:
        return err.code(), err.details()
    return grpc.StatusCode.OK, ""


# --- keys and roles ------------------------------------------------------------------------------------------------


def test_the_right_key_works_and_a_wrong_or_missing_one_is_401_in_openais_shape(both, caplog):
    caplog.set_level(logging.DEBUG)
    client = both.client(ADMIN)
    assert [m.id for m in client.models.list()] == [BASE, IN, OUT]
    assert client.completions.create(model=IN, prompt="hello there").choices[0].text == "hello there"
    n = len(both.app.engine.submitted)
    wrong = "not-a-known-key-zzz"
    for call in (lambda c: c.models.list(), lambda c: c.completions.create(model=IN, prompt="hi"),
                 lambda c: c.chat.completions.create(model=IN, messages=[{"role": "user", "content": "hi"}],
                                                     stream=True)):
        with pytest.raises(openai.AuthenticationError) as info:
            call(both.client(wrong))
        assert info.value.status_code == 401
        assert info.value.body == {"message": "unknown API key", "type": "invalid_request_error", "param": None,
                                   "code": "invalid_api_key"}
        assert info.value.response.headers["www-authenticate"] == "Bearer"
    # no header at all, a header without the Bearer scheme, an empty key
    for headers in ({}, {"Authorization": ADMIN}, {"Authorization": "Bearer"}, {"Authorization": f"Basic {ADMIN}"}):
        resp = httpx.post(f"{both.base_url}/completions", json={"model": IN, "prompt": "hi"}, headers=headers)
        assert resp.status_code == 401, headers
        assert resp.json()["error"]["code"] == "invalid_api_key"
        assert "Authorization: Bearer <key>" in resp.json()["error"]["message"]
    # checked before the body is read: a malformed body without a key is still 401
    assert httpx.post(f"{both.base_url}/completions", content=b"{not json").status_code == 401
    assert httpx.get(f"{both.base_url}/no-such-route").status_code == 401  # every /v1/ path needs a key
    assert httpx.get(f"{both.base_url}/no-such-route", headers={"Authorization": f"Bearer {ADMIN}"}).status_code == 404
    assert len(both.app.engine.submitted) == n  # nothing reached the engine
    server_logs = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith(("server", "uvicorn")))
    assert "unknown API key on GET /v1/models from 127.0.0.1:" in server_logs  # the peer, never the key
    assert wrong not in server_logs and ADMIN not in server_logs


def test_a_role_that_may_not_generate_is_403_and_may_still_list(both):
    client = both.client(TRAIN)  # trainer: ListAdapters yes, Generate no (as gRPC)
    assert [m.id for m in client.models.list()] == [BASE, IN]
    n = len(both.app.engine.submitted)
    for call in (lambda: client.completions.create(model=IN, prompt="hi"),
                 lambda: client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "hi"}]),
                 lambda: client.completions.create(model=IN, prompt="hi", stream=True)):
        with pytest.raises(openai.PermissionDeniedError) as info:
            call()
        assert info.value.status_code == 403 and info.value.code == "permission_denied"
        assert "role 'trainer' may not call POST /v1/" in info.value.message and TRAIN not in info.value.message
    assert len(both.app.engine.submitted) == n


def test_routes_take_the_roles_of_the_grpc_methods_they_mirror():
    assert ROLES_BY_ROUTE == {
        "GET /v1/models": ROLES_BY_METHOD["qlora_server.v1.Adapters/ListAdapters"],
        "POST /v1/completions": ROLES_BY_METHOD["qlora_server.v1.Generation/Generate"],
        "POST /v1/chat/completions": ROLES_BY_METHOD["qlora_server.v1.Generation/GenerateStream"],
    }


# --- tenants: gRPC is the oracle -----------------------------------------------------------------------------------


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("key", [*sorted(KEYS), "not-a-known-key", None])
def test_generation_answers_as_grpc_does_for_the_same_key_and_model(both, key, streaming):
    for model in (IN, OUT, MISSING, BASE):
        req = pb.GenerateRequest(adapter_id="" if model == BASE else model, prompt="hi there", max_new_tokens=4)
        if streaming:
            code, details = grpc_code(lambda: list(both.generation.GenerateStream(req, metadata=md(key),
                                                                                  timeout=10)))
        else:
            code, details = grpc_code(lambda: both.generation.Generate(req, metadata=md(key), timeout=10))
        body = {"model": model, "prompt": "hi there", "max_tokens": 4, "stream": streaming}
        if key is None:
            resp = httpx.post(f"{both.base_url}/completions", json=body)
            status, error = resp.status_code, resp.json().get("error")
        else:
            status, error = http_status(lambda: both.client(key).completions.create(**body))
        assert status == HTTP_STATUS[code], (key, model, code, details, error)
        if code == grpc.StatusCode.NOT_FOUND:  # an adapter outside the scope looks exactly like a missing one
            assert error["code"] == "model_not_found" and error["param"] == "model"
            assert error["message"] == f"the model {model!r} does not exist (not the base model nor a registered " \
                                       "adapter)"


@pytest.mark.parametrize("key", [*sorted(KEYS), "not-a-known-key"])
def test_models_lists_what_list_adapters_lists_for_the_key(both, key):
    code, _ = grpc_code(lambda: both.adapters.ListAdapters(pb.ListAdaptersRequest(), metadata=md(key), timeout=10))
    status, _ = http_status(lambda: both.client(key).models.list())
    assert status == HTTP_STATUS[code]
    if code == grpc.StatusCode.OK:
        listed = both.adapters.ListAdapters(pb.ListAdaptersRequest(), metadata=md(key), timeout=10).adapters
        assert [m.id for m in both.client(key).models.list()] == [BASE] + [a.adapter_id for a in listed]


def test_a_reload_applies_to_http_at_once(both):
    write_keys(both.gate.keys.path, {"brand-new-key-42": ("inference", [])})
    assert [m.id for m in both.client(ADMIN).models.list()] == [BASE, IN, OUT]  # not reloaded yet
    assert both.gate.keys.reload()
    with pytest.raises(openai.AuthenticationError):
        both.client(ADMIN).models.list()
    assert both.client("brand-new-key-42").completions.create(model=OUT, prompt="x y").choices[0].text == "x y"


# --- per-key limits: one state for both ports ----------------------------------------------------------------------

LIMITED = {  # key -> (name, limits)
    "key-slow-0123456789": ("slow-app", {"requests_per_second": 1}),
    "key-one-stream-0123": ("one-stream", {"max_concurrent": 1}),
    "key-tokens-01234567": ("tokens-app", {"tokens_per_minute": 6}),
    "key-stoks-01234567": ("stream-tokens", {"tokens_per_minute": 6}),
}


@pytest.fixture
def limited(tmp_path):
    """Both ports with the keys of :data:`LIMITED` and a clock that never moves (no refill: no timing)."""
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": [{"name": n, "sha256": hash_key(k), "role": "inference", **lim}
                                         for k, (n, lim) in LIMITED.items()]}))
    b = Both(tmp_path, path, KeyLimiter(FakeClock()))
    yield b
    b.close()


def test_requests_per_second_is_shared_with_grpc_and_over_it_is_429_with_a_retry_hint(limited):
    key = "key-slow-0123456789"
    limited.client(key).models.list()  # the one request of this second
    with pytest.raises(openai.RateLimitError) as info:
        limited.client(key).completions.create(model=IN, prompt="hi")
    assert info.value.code == "rate_limit_exceeded" and info.value.type == "rate_limit_error"
    assert "key 'slow-app'" in info.value.message and "requests_per_second" in info.value.message
    assert info.value.response.headers["retry-after-ms"] == "1000"
    assert info.value.response.headers["retry-after"] == "1"
    code, details = grpc_code(lambda: limited.adapters.ListAdapters(pb.ListAdaptersRequest(), metadata=md(key),
                                                                    timeout=10))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "requests_per_second" in details


def test_max_concurrent_counts_an_http_stream_and_its_slot_comes_back_when_the_client_leaves(limited):
    key = "key-one-stream-0123"
    client = limited.client(key)
    held = client.completions.create(model=IN, prompt=PROMPT_BLOCK, stream=True)
    wait_for(lambda: len(limited.app.engine.streams) == 1, "the held stream")
    with pytest.raises(openai.RateLimitError, match="max_concurrent"):
        client.chat.completions.create(model=IN, messages=[{"role": "user", "content": "hi"}])
    code, _ = grpc_code(lambda: limited.generation.Generate(pb.GenerateRequest(prompt="x"), metadata=md(key),
                                                            timeout=10))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(limited.app.engine.streams) == 1  # nothing more reached the engine
    held.close()  # the client goes away mid-stream: the request is cancelled and the slot given back
    wait_for(lambda: limited.app.engine.streams[0].cancelled.is_set(), "the engine request to be cancelled")

    def admitted() -> bool:
        status, _ = http_status(lambda: client.completions.create(model=IN, prompt="again"))
        assert status in (200, 429)
        return status == 200

    wait_for(admitted, "the slot to come back")


@pytest.mark.parametrize("streaming", [False, True])
def test_tokens_per_minute_are_charged_from_http_completions_and_hold_on_grpc(limited, streaming):
    key = "key-stoks-01234567" if streaming else "key-tokens-01234567"
    client = limited.client(key)

    def gen(prompt: str) -> int:
        if streaming:
            chunks = list(client.completions.create(model=IN, prompt=prompt, stream=True))
            return chunks[-1].usage.completion_tokens
        return client.completions.create(model=IN, prompt=prompt).usage.completion_tokens

    assert gen("a b") == 2  # 6 - 2 = 4 tokens left
    assert gen("a b c d e") == 5  # admitted with 4 left; the bucket goes to -1
    with pytest.raises(openai.RateLimitError, match="tokens_per_minute"):
        gen("a")
    code, _ = grpc_code(lambda: limited.generation.Generate(pb.GenerateRequest(prompt="a"), metadata=md(key),
                                                            timeout=10))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


# --- the Authorization header, swept -------------------------------------------------------------------------------

_VALID = sorted(KEYS)
_WS = st.text(" \t", max_size=2)
_NEAR_KEYS = st.sampled_from(_VALID).flatmap(lambda k: st.sampled_from(
    [k, k[:-1], k + "x", k.upper(), "x" + k, k[:5] + " " + k[5:], k + " " + k]))
_HEADERS = st.one_of(
    st.text(),
    st.builds(lambda a, scheme, sep, key, b: a + scheme + sep + key + b, _WS,
              st.sampled_from(["Bearer", "bearer", "BEARER", "Basic", "Bearer:", "Token", ""]),
              st.sampled_from([" ", "  ", "\t", " \t", ""]), _NEAR_KEYS, _WS),
)


def _authorizes(header: str) -> str | None:
    """The independent oracle: the key ``header`` authorizes: ``Bearer`` (any case), one space, then exactly a
    valid key (case and all), with whitespace around it allowed; else None."""
    for key in _VALID:
        if re.fullmatch(rf"\s*(?i:bearer) \s*{re.escape(key)}\s*", header, flags=re.DOTALL):
            return key
    return None


@pytest.fixture(scope="module")
def sweep_gate(tmp_path_factory) -> Gate:
    return Gate(KeyStore(write_keys(tmp_path_factory.mktemp("sweep") / "keys.json", KEYS)))


@settings(max_examples=500, deadline=None)
@given(values=st.lists(_HEADERS, max_size=3))
def test_arbitrary_authorization_values_never_crash_and_only_a_valid_key_authorizes(sweep_gate, values):
    try:
        principal = sweep_gate.authorize(bearer_token(values), "POST /v1/completions", frozenset(
            {"admin", "inference", "trainer"}), hint="h")
    except Unauthenticated:
        principal = None
    # the first value of the Bearer scheme with a non-blank token is the one that counts
    first = next((v for v in values if re.fullmatch(r"\s*(?i:bearer) \s*\S.*", v, flags=re.DOTALL)), None)
    expected = None if first is None else _authorizes(first)
    assert (principal is None) == (expected is None), (values, principal)
    if expected is not None:
        assert principal == sweep_gate.keys.resolve(expected)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=st.one_of(st.text(string.printable.strip() + " \t", max_size=60), _HEADERS.filter(str.isprintable)))
def test_arbitrary_authorization_headers_over_http_are_200_or_401_never_a_crash(both, header):
    try:
        resp = httpx.get(f"{both.base_url}/models", headers={"Authorization": header})
    except (httpx.LocalProtocolError, UnicodeEncodeError):
        return  # not a header value HTTP can carry: the client refuses to send it
    assert resp.status_code == (200 if _authorizes(header) else 401), (header, resp.text)
    if resp.status_code == 401:
        assert resp.json()["error"]["code"] == "invalid_api_key"


# --- TLS -----------------------------------------------------------------------------------------------------------


@contextmanager
def serving_https(app: FakeApp):
    """``serve(app.config)`` in a thread with ``app`` as the built app; yields ``(grpc target, http port)``."""
    with serving(app) as (target, line):
        yield target, int(re.search(r"OpenAI-compatible HTTPS on :(\d+)", line).group(1))


@needs_openssl
def test_serve_gives_the_http_api_the_grpc_keys_and_certificate(tmp_path, pki, caplog):  # noqa: F811
    caplog.set_level(logging.INFO, logger="qlora_server")
    app = FakeApp(tmp_path / "adapters", host="127.0.0.1", port=0, metrics_port=-1, http_port=0,
                  api_keys_file=write_keys(tmp_path / "keys.json", KEYS), tls_cert=pki / "server.pem",
                  tls_key=pki / "server.key")
    app.store.register(IN, write_adapter_dir(tmp_path / "src"), False)
    app.store.register(OUT, write_adapter_dir(tmp_path / "src"), False)
    ca = trusting(pki / "ca.pem")
    with serving_https(app) as (target, http_port):
        url = f"https://127.0.0.1:{http_port}/v1"
        client = oai(url, INFER, ca)
        assert [m.id for m in client.models.list()] == [BASE, IN]
        assert client.completions.create(model=IN, prompt="over tls").choices[0].text == "over tls"
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model=OUT, prompt="x")
        with Client(target, timeout=10, api_key=INFER, tls=ClientTLS(ca=pki / "ca.pem")) as rpc:
            assert [info.adapter_id for info, _ in rpc.list_adapters()] == [IN]  # the same key, the same scope
        with pytest.raises(openai.AuthenticationError):
            oai(url, "not-a-known-key", ca).models.list()
        with pytest.raises(openai.APIConnectionError):  # plaintext HTTP to the HTTPS port
            oai(f"http://127.0.0.1:{http_port}/v1", INFER).models.list()
        with pytest.raises(openai.APIConnectionError):  # a certificate the client does not trust
            oai(url, INFER, trusting(pki / "other-ca.pem")).models.list()
    lines = [r.getMessage() for r in caplog.records if "OpenAI-compatible HTTP API on" in r.getMessage()]
    assert len(lines) == 1 and f"on https://127.0.0.1:{http_port}/v1: TLS (cert" in lines[0]
    assert "API keys required" in lines[0]


@needs_openssl
def test_mutual_tls_requires_a_client_certificate_the_ca_signed(tmp_path, pki):  # noqa: F811
    both = Both(tmp_path, write_keys(tmp_path / "keys.json", KEYS), tls_cert=pki / "server.pem",
                tls_key=pki / "server.key", tls_client_ca=pki / "ca.pem")
    try:
        assert both.base_url.startswith("https://")
        good = trusting(pki / "ca.pem", pki / "client.pem", pki / "client.key")
        assert [m.id for m in both.client(ADMIN, good).models.list()] == [BASE, IN, OUT]
        with pytest.raises(openai.AuthenticationError):  # a certificate does not replace the key
            both.client("not-a-known-key", good).models.list()
        for ctx in (trusting(pki / "ca.pem"), trusting(pki / "ca.pem", pki / "rogue.pem", pki / "rogue.key")):
            with pytest.raises(openai.APIConnectionError):  # no client certificate, or one of another CA
                both.client(ADMIN, ctx).models.list()
    finally:
        both.close()


# --- the command line ----------------------------------------------------------------------------------------------


def test_serve_accepts_http_port_with_an_api_keys_file(tmp_path):
    """No longer refused: start-up gets past the options, the keys and the ports, and stops at the (missing)
    model, which is checked in seconds without loading anything."""
    keys = write_keys(tmp_path / "keys.json", KEYS)
    proc = _serve(tmp_path, "--port", "0", "--metrics-port", "-1", "--http-port", "0", "--api-keys-file",
                  str(keys), "--model", str(tmp_path / "no" / "such" / "model"))
    line = _error_line(proc)
    assert "NOT_FOUND: model: " in line and "does not exist" in line
    assert "API keys on: 4 keys" in proc.stderr and "OpenAI-compatible HTTP on :" in proc.stderr
