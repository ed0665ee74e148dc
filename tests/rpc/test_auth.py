"""API keys, roles, tenant scopes and allowed paths over the real gRPC server and the fakes (README: Security)."""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rpc_fakes import ADAPTER_CONFIG, FakeApp, FakeTrainingManager, write_adapter_dir

from server.auth import KeyStore, Principal, check_path, hash_key, reload_on_sighup, require_adapter
from server.config import ADAPTER_ID_RE
from server.errors import NotFound, PermissionDenied
from server.rpc.gen.qlora_server.v1 import qlora_server_pb2 as pb
from server.rpc.gen.qlora_server.v1 import qlora_server_pb2_grpc as pb_grpc
from server.rpc.server import build_grpc_server
from server.rpc.training import TrainingServicer
from server.training.jobs import Job

KEYS = {  # role, scopes
    "key-admin-0123456789": ("admin", []),
    "key-inference-acme-0123": ("inference", ["acme-"]),
    "key-trainer-acme-0123": ("trainer", ["acme-"]),
    "key-trainer-all-0123": ("trainer", []),
}
ROLES_OK = {  # rpc -> roles that may call it
    "Generate": {"inference", "admin"}, "GenerateStream": {"inference", "admin"},
    "ListAdapters": {"inference", "trainer", "admin"}, "GetAdapter": {"inference", "trainer", "admin"},
    "RegisterAdapter": {"trainer", "admin"}, "UploadAdapter": {"trainer", "admin"},
    "UnregisterAdapter": {"trainer", "admin"},
    "CreateTrainingJob": {"trainer", "admin"}, "GetTrainingJob": {"trainer", "admin"},
    "ListTrainingJobs": {"trainer", "admin"}, "CancelTrainingJob": {"trainer", "admin"},
    "WatchTrainingJob": {"trainer", "admin"},
}
IN, OUT, MISSING = "acme-a", "other-b", "acme-missing"


def write_keys(path: Path, keys: dict) -> Path:
    path.write_text(json.dumps({"keys": [{"name": f"n{i}", "sha256": hash_key(k), "role": r, "scopes": s}
                                         for i, (k, (r, s)) in enumerate(keys.items())]}))
    return path


class Served:
    def __init__(self, tmp_path: Path, keys_file: Path | None, allowed: tuple[Path, ...]) -> None:
        self.root = allowed[0] if allowed else tmp_path / "allowed"
        self.root.mkdir(parents=True, exist_ok=True)
        self.src = write_adapter_dir(self.root / "src")
        self.dataset = self.root / "data.jsonl"
        self.dataset.write_text('{"prompt": "a", "completion": "b"}\n')
        self.app = FakeApp(tmp_path / "store", allowed_paths=allowed)
        for aid in (IN, OUT):
            self.app.store.register(aid, self.src, False)
        self.training = FakeTrainingManager()
        for aid in (IN, OUT):
            self.training.jobs[f"job-{aid}"] = Job(job_id=f"job-{aid}", state="queued", adapter_id=aid,
                                                   created_at=1.0, output_dir="/x")
        self.keys = KeyStore(keys_file) if keys_file else None
        self.server, port = build_grpc_server(self.app, "127.0.0.1", 0, keys=self.keys,
                                              training_servicer=TrainingServicer(self.training, allowed))
        self.server.start()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.generation = pb_grpc.GenerationStub(self.channel)
        self.adapters = pb_grpc.AdaptersStub(self.channel)
        self.jobs = pb_grpc.TrainingStub(self.channel)
        self.address = f"127.0.0.1:{port}"

    def close(self) -> None:
        self.channel.close()
        self.server.stop(None)


@pytest.fixture
def served(tmp_path):
    s = Served(tmp_path, write_keys(tmp_path / "keys.json", KEYS), (tmp_path / "allowed",))
    yield s
    s.close()


def md(key: str | None):
    return None if key is None else (("authorization", f"Bearer {key}"),)


def upload_requests(aid: str, src: Path):
    yield pb.UploadAdapterRequest(header=pb.UploadHeader(adapter_id=aid, replace=True))
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        yield pb.UploadAdapterRequest(chunk=pb.FileChunk(filename=name, data=(src / name).read_bytes()))


def call(s: Served, rpc: str, key: str | None, aid: str):
    """Run ``rpc`` naming adapter ``aid`` (or the job of ``aid``) with ``key``."""
    m, t = md(key), 10
    job = f"job-{aid}"
    gen = pb.GenerateRequest(adapter_id=aid, prompt="hi there", max_new_tokens=4)
    calls = {
        "Generate": lambda: s.generation.Generate(gen, metadata=m, timeout=t),
        "GenerateStream": lambda: list(s.generation.GenerateStream(gen, metadata=m, timeout=t)),
        "ListAdapters": lambda: s.adapters.ListAdapters(pb.ListAdaptersRequest(), metadata=m, timeout=t),
        "GetAdapter": lambda: s.adapters.GetAdapter(pb.GetAdapterRequest(adapter_id=aid), metadata=m, timeout=t),
        "RegisterAdapter": lambda: s.adapters.RegisterAdapter(pb.RegisterAdapterRequest(
            adapter_id=aid, path=str(s.src), replace=True), metadata=m, timeout=t),
        "UploadAdapter": lambda: s.adapters.UploadAdapter(upload_requests(aid, s.src), metadata=m, timeout=t),
        "UnregisterAdapter": lambda: s.adapters.UnregisterAdapter(pb.UnregisterAdapterRequest(adapter_id=aid),
                                                                  metadata=m, timeout=t),
        "CreateTrainingJob": lambda: s.jobs.CreateTrainingJob(pb.CreateTrainingJobRequest(
            adapter_id=aid + "-new", dataset_path=str(s.dataset)), metadata=m, timeout=t),
        "GetTrainingJob": lambda: s.jobs.GetTrainingJob(pb.GetTrainingJobRequest(job_id=job), metadata=m, timeout=t),
        "ListTrainingJobs": lambda: s.jobs.ListTrainingJobs(pb.ListTrainingJobsRequest(), metadata=m, timeout=t),
        "CancelTrainingJob": lambda: s.jobs.CancelTrainingJob(pb.CancelTrainingJobRequest(job_id=job), metadata=m,
                                                              timeout=t),
        "WatchTrainingJob": lambda: list(s.jobs.WatchTrainingJob(pb.WatchTrainingJobRequest(job_id=job), metadata=m,
                                                                 timeout=t)),
    }
    return calls[rpc]()


def code_of(fn) -> tuple[grpc.StatusCode, str]:
    try:
        fn()
    except grpc.RpcError as err:
        return err.code(), err.details()
    return grpc.StatusCode.OK, ""


@pytest.mark.parametrize("rpc", sorted(ROLES_OK))
@pytest.mark.parametrize("key", [None, "not-a-known-key", ""])
def test_missing_or_unknown_key_is_unauthenticated(served, rpc, key):
    code, details = code_of(lambda: call(served, rpc, key, IN))
    assert code == grpc.StatusCode.UNAUTHENTICATED, (rpc, code, details)
    assert served.app.store.adapters.keys() == {IN, OUT} and len(served.training.jobs) == 2  # nothing happened


@pytest.mark.parametrize("rpc", sorted(ROLES_OK))
@pytest.mark.parametrize("key", sorted(KEYS))
def test_role_and_tenant_matrix(served, rpc, key):
    role, scopes = KEYS[key]
    code, details = code_of(lambda: call(served, rpc, key, IN))
    if role not in ROLES_OK[rpc]:
        assert code == grpc.StatusCode.PERMISSION_DENIED, (rpc, key, code, details)
        assert key not in details
        assert served.app.store.adapters.keys() == {IN, OUT} and len(served.training.jobs) == 2
        return
    assert code == grpc.StatusCode.OK, (rpc, key, details)
    if rpc in ("ListAdapters", "ListTrainingJobs"):
        return  # test_lists_show_only_the_scope
    code, details = code_of(lambda: call(served, rpc, key, OUT))
    if not scopes:
        assert code == grpc.StatusCode.OK, (rpc, key, details)
        return
    # out of scope: exactly what a missing id answers, and nothing happened to it
    assert code == grpc.StatusCode.NOT_FOUND, (rpc, key, details)
    job_rpc = rpc in ("GetTrainingJob", "CancelTrainingJob", "WatchTrainingJob")
    field = "header.adapter_id" if rpc == "UploadAdapter" else "adapter_id"
    oid = f"job-{OUT}" if job_rpc else OUT + ("-new" if rpc == "CreateTrainingJob" else "")
    expected = f"job_id: no training job {oid!r}" if job_rpc else f"{field}: adapter {oid!r} is not registered"
    assert details == expected
    assert OUT in served.app.store.adapters and served.training.jobs[f"job-{OUT}"].state == "queued"
    assert all(r.adapter_id.startswith("acme-") for r in served.training.requests)
    # and a genuinely missing id answers with the same shape
    if rpc in ("GetAdapter", "UnregisterAdapter", "Generate", "GenerateStream") or job_rpc:
        mcode, mdetails = code_of(lambda: call(served, rpc, key, MISSING))
        assert mcode == grpc.StatusCode.NOT_FOUND
        assert mdetails.replace(MISSING, OUT) == details


def test_lists_show_only_the_scope(served):
    def ids(key):
        a = [x.adapter_id for x in served.adapters.ListAdapters(pb.ListAdaptersRequest(), metadata=md(key)).adapters]
        return a
    assert ids("key-inference-acme-0123") == [IN] and ids("key-trainer-acme-0123") == [IN]
    assert ids("key-admin-0123456789") == [IN, OUT] and ids("key-trainer-all-0123") == [IN, OUT]
    jobs = served.jobs.ListTrainingJobs(pb.ListTrainingJobsRequest(), metadata=md("key-trainer-acme-0123")).jobs
    assert [j.adapter_id for j in jobs] == [IN]
    jobs = served.jobs.ListTrainingJobs(pb.ListTrainingJobsRequest(), metadata=md("key-admin-0123456789")).jobs
    assert sorted(j.adapter_id for j in jobs) == [IN, OUT]


def test_health_and_reflection_stay_open(served):
    health = health_pb2_grpc.HealthStub(served.channel)
    assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status == \
        health_pb2.HealthCheckResponse.SERVING
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(served.channel)
    [resp] = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                            timeout=10))
    assert "qlora_server.v1.Generation" in {s.name for s in resp.list_services_response.service}


def test_bearer_scheme_is_required(served):
    m = (("authorization", "key-admin-0123456789"),)  # no "Bearer "
    code, _ = code_of(lambda: served.adapters.ListAdapters(pb.ListAdaptersRequest(), metadata=m, timeout=10))
    assert code == grpc.StatusCode.UNAUTHENTICATED


def test_keys_never_reach_logs_or_details(served, caplog):
    caplog.set_level(logging.DEBUG)
    secrets = [*KEYS, "not-a-known-key-zzz"]
    for key in secrets:
        for rpc in ("Generate", "RegisterAdapter", "WatchTrainingJob"):
            _, details = code_of(lambda: call(served, rpc, key, OUT))
            assert key not in details
    served.keys.reload()
    (served.keys.path).write_text("{broken")
    assert not served.keys.reload()
    assert caplog.records  # the refusals and reloads were logged
    for key in secrets:
        assert key not in caplog.text
    assert all(key not in served.keys.path.read_text() for key in KEYS)


def test_reload_swaps_the_keys_and_a_bad_file_keeps_the_old_ones(served):
    admin = "key-admin-0123456789"
    list_ok = lambda key: code_of(lambda: served.adapters.ListAdapters(  # noqa: E731
        pb.ListAdaptersRequest(), metadata=md(key), timeout=10))[0]
    write_keys(served.keys.path, {"brand-new-key-42": ("admin", [])})
    assert list_ok(admin) == grpc.StatusCode.OK  # not reloaded yet
    assert served.keys.reload()
    assert list_ok(admin) == grpc.StatusCode.UNAUTHENTICATED
    assert list_ok("brand-new-key-42") == grpc.StatusCode.OK
    served.keys.path.write_text(json.dumps({"keys": [{"name": "x", "sha256": "abc", "role": "admin"}]}))
    assert not served.keys.reload()
    assert list_ok("brand-new-key-42") == grpc.StatusCode.OK


def test_sighup_reloads_the_keys_file(tmp_path):
    path = write_keys(tmp_path / "keys.json", {"old-key-1": ("admin", [])})
    keys = KeyStore(path)
    restore = reload_on_sighup(keys)
    try:
        write_keys(path, {"new-key-2": ("inference", ["acme-"])})
        os.kill(os.getpid(), signal.SIGHUP)
        deadline = time.monotonic() + 10
        while keys.resolve("new-key-2") is None and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        restore()
    assert keys.resolve("new-key-2") == Principal("n0", "inference", ("acme-",))
    assert keys.resolve("old-key-1") is None


@pytest.mark.parametrize("entry, what", [
    ({"name": "a", "sha256": "0" * 63, "role": "admin"}, "sha256"),
    ({"name": "a", "sha256": "0" * 64, "role": "root"}, "role"),
    ({"name": "a", "sha256": "0" * 64, "role": "admin", "scopes": ["acme"]}, "scopes"),
    ({"name": "a", "sha256": "0" * 64, "role": "admin", "key": "plain"}, "unknown field"),
])
def test_bad_keys_files_are_refused(tmp_path, entry, what):
    from server.errors import FailedPrecondition

    path = tmp_path / "keys.yaml"
    path.write_text(json.dumps({"keys": [entry]}))  # JSON is YAML
    with pytest.raises(FailedPrecondition) as info:
        KeyStore(path)
    assert what in str(info.value) and info.value.field == "api_keys_file"


# --- paths ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def outside(tmp_path) -> Path:
    out = write_adapter_dir(tmp_path / "outside" / "adp")
    (tmp_path / "outside" / "data.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    return out


def escapes(s: Served, outside: Path, tmp_path: Path) -> dict[str, tuple[str, str]]:
    """name -> (adapter dir, dataset path) that lead out of the allowed root."""
    (s.root / "link-out").symlink_to(outside)
    (s.root / "data-link.jsonl").symlink_to(outside.parent / "data.jsonl")
    inner = s.root / "inner"
    inner.mkdir()
    (inner / "adapter_config.json").write_text(json.dumps(ADAPTER_CONFIG))
    (inner / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    rel = os.path.relpath(outside, s.root)
    return {
        "dotdot": (f"{s.root}/{rel}", f"{s.root}/../outside/data.jsonl"),
        "absolute": (str(outside), str(outside.parent / "data.jsonl")),
        "symlink": (str(s.root / "link-out"), str(s.root / "data-link.jsonl")),
        "file-symlink": (str(inner), str(s.root / "link-out" / ".." / "data.jsonl")),
    }


@pytest.mark.parametrize("case", ["dotdot", "absolute", "symlink", "file-symlink"])
def test_path_escapes_are_permission_denied(served, outside, tmp_path, case):
    adapter_dir, dataset = escapes(served, outside, tmp_path)[case]
    m = md("key-admin-0123456789")
    code, details = code_of(lambda: served.adapters.RegisterAdapter(pb.RegisterAdapterRequest(
        adapter_id="acme-x", path=adapter_dir), metadata=m, timeout=10))
    assert (code, details.split(":")[0]) == (grpc.StatusCode.PERMISSION_DENIED, "path"), details
    code, details = code_of(lambda: served.jobs.CreateTrainingJob(pb.CreateTrainingJobRequest(
        adapter_id="acme-x", dataset_path=dataset), metadata=m, timeout=10))
    assert (code, details.split(":")[0]) == (grpc.StatusCode.PERMISSION_DENIED, "dataset_path"), details
    assert "acme-x" not in served.app.store.adapters and not served.training.requests


def test_paths_inside_the_root_work_and_are_read_resolved(served):
    (served.root / "alias").symlink_to(served.src)  # a link that stays inside is fine
    m = md("key-trainer-acme-0123")
    served.adapters.RegisterAdapter(pb.RegisterAdapterRequest(adapter_id="acme-y", path=str(served.root / "alias")),
                                    metadata=m, timeout=10)
    served.jobs.CreateTrainingJob(pb.CreateTrainingJobRequest(
        adapter_id="acme-z", dataset_path=f"{served.root}/src/../data.jsonl"), metadata=m, timeout=10)
    assert served.training.requests[-1].dataset_path == str(served.dataset.resolve())


def test_keys_without_allowed_paths_mean_upload_only(tmp_path):
    s = Served(tmp_path, write_keys(tmp_path / "keys.json", KEYS), ())
    try:
        m = md("key-admin-0123456789")
        code, _ = code_of(lambda: s.adapters.RegisterAdapter(pb.RegisterAdapterRequest(
            adapter_id="acme-x", path=str(s.src)), metadata=m, timeout=10))
        assert code == grpc.StatusCode.PERMISSION_DENIED
        code, _ = code_of(lambda: s.jobs.CreateTrainingJob(pb.CreateTrainingJobRequest(
            adapter_id="acme-x", dataset_path=str(s.dataset)), metadata=m, timeout=10))
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert s.adapters.UploadAdapter(upload_requests("acme-x", s.src), metadata=m, timeout=10).adapter_id == \
            "acme-x"
    finally:
        s.close()


def test_allowed_paths_hold_without_keys_and_no_keys_is_todays_behaviour(tmp_path, outside):
    s = Served(tmp_path, None, (tmp_path / "allowed",))
    try:
        code, _ = code_of(lambda: s.adapters.RegisterAdapter(pb.RegisterAdapterRequest(
            adapter_id="x", path=str(outside)), timeout=10))
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert s.adapters.GetAdapter(pb.GetAdapterRequest(adapter_id=OUT), timeout=10).adapter_id == OUT
    finally:
        s.close()


# --- properties ----------------------------------------------------------------------------------------------------

_ID_CHARS = "abcmeACME-._0123"


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.from_regex(ADAPTER_ID_RE, fullmatch=True), st.text(_ID_CHARS, max_size=12)),
       st.lists(st.sampled_from(["acme-", "acme.", "ac-", "acme-x_"]), max_size=3))
def test_scope_never_lets_an_outside_id_through(adapter_id, scopes):
    principal = Principal("p", "trainer", tuple(scopes))
    try:
        require_adapter(principal, adapter_id)
    except NotFound as exc:
        assert str(exc) == f"adapter_id: adapter {adapter_id!r} is not registered"
        assert scopes and not any(adapter_id.startswith(s) for s in scopes)
    else:
        assert not scopes or any(adapter_id.startswith(s) for s in scopes)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(["..", ".", "a", "b", "link-out", "link-in", "", "/", "data.jsonl", "nope"]),
                max_size=6), st.booleans())
def test_check_path_never_lets_an_outside_path_through(tmp_path, parts, absolute):
    root, out = tmp_path / "root", tmp_path / "out"
    if not root.exists():
        (root / "a" / "b").mkdir(parents=True)
        out.mkdir()
        (out / "data.jsonl").write_text("x")
        (root / "link-out").symlink_to(out)
        (root / "link-in").symlink_to(root / "a")
    candidate = ("/" if absolute else f"{root}/") + "/".join(parts)
    real_root = os.path.realpath(root)
    try:
        got = check_path(candidate, (root,), enforce=True, field="path")
    except PermissionDenied:
        real = os.path.realpath(candidate)
        assert not (real == real_root or real.startswith(real_root + os.sep)) or os.path.isdir(real)
    else:
        assert str(got) == real_root or str(got).startswith(real_root + os.sep)
        if got.is_dir():
            assert all(os.path.realpath(got / n).startswith(real_root) for n in os.listdir(got))


# --- the command line ----------------------------------------------------------------------------------------------


def test_cli_sends_api_key(served, capsys, monkeypatch):
    import io

    from server.cli import main

    assert main(["adapters", "list", "--target", served.address, "--api-key", "key-inference-acme-0123"]) == 0
    out = capsys.readouterr().out
    assert IN in out and OUT not in out
    assert main(["jobs", "list", "--target", served.address, "--api-key", "key-trainer-acme-0123", "--json"]) == 0
    assert IN in capsys.readouterr().out
    assert main(["adapters", "list", "--target", served.address]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", io.StringIO("key-admin-0123456789\n"))
    assert main(["keys", "hash"]) == 0
    assert capsys.readouterr().out.strip() == hash_key("key-admin-0123456789")
    assert main(["keys", "generate"]) == 0
    made = json.loads(capsys.readouterr().out)
    assert hash_key(made["key"]) == made["sha256"] and len(made["key"]) >= 40



@pytest.mark.parametrize("what", ["api_keys_file", "allowed_path"])
def test_serve_refuses_a_bad_keys_file_or_root_at_start_up(tmp_path, capsys, what):
    import threading

    from server.cli import EXIT_STARTUP, serve
    from server.config import ServerConfig

    bad = tmp_path / "keys.json"
    bad.write_text("{not json")
    kw = {"api_keys_file": bad} if what == "api_keys_file" else {"allowed_paths": (tmp_path / "missing",)}
    config = ServerConfig(port=0, metrics_port=-1, adapters_dir=tmp_path / "a", **kw)
    assert serve(config, threading.Event(), app_factory=lambda *a: pytest.fail("must not load")) == EXIT_STARTUP
    assert f"FAILED_PRECONDITION: {what}: " in capsys.readouterr().err
