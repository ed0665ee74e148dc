"""A real Prometheus scrapes a live qlora-server; every dashboard panel's PromQL must return data, and the
exposition must pass ``promtool check metrics``."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.engine.types import GenerationRequest, SamplingParams
from server.rpc.client import Client, ClientError
from tests.monitoring.stack import (
    DASHBOARD_DIR,
    Prometheus,
    dashboard_queries,
    has_finite_value,
    prometheus_tools,
    substitute,
)
from tests.server_process import ServerProcess as Server
from tests.server_process import start_server
from tests.tiny import make_adapter, save_tiny_base
from tests.tiny_tokenizer import save_byte_tokenizer

TRAINING_SERVICE = "qlora_server.v1.Training"


@dataclass
class Stack:
    server: Server
    prometheus: Prometheus
    promtool: str
    training_served: bool
    traffic: dict
    training_error: Exception | None = None


def _generate(client: Client, adapter: str = "", prompt: str = "hello there", **params):
    return client.generate(GenerationRequest(request_id="", adapter_id=adapter, prompt=prompt,
                                             params=SamplingParams(**{"max_new_tokens": 8, **params})))


def _training_served(target: str) -> bool:
    with grpc.insecure_channel(target) as channel:
        try:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=TRAINING_SERVICE),
                                                      timeout=10)
            return True
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:
                return False
            raise


def _run_training_job(target: str, workdir: Path) -> None:
    """Train a tiny adapter for a few steps through the Training service and wait for it to finish."""
    from server.rpc.gen.qlora_server.v1 import qlora_server_pb2 as pb
    from server.rpc.gen.qlora_server.v1 import qlora_server_pb2_grpc as pb_grpc

    data = workdir / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"say {w}", "completion": f" {w}!"}) + "\n"
                            for w in ("hi", "yes", "no", "ok", "red", "blue", "one", "two")))
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.TrainingStub(channel)
        job = stub.CreateTrainingJob(pb.CreateTrainingJobRequest(
            adapter_id="trained", dataset_path=str(data),
            config=pb.TrainingConfig(r=4, max_steps=3, batch_size=2, max_seq_length=64, seed=0)), timeout=30)
        final = None
        for event in stub.WatchTrainingJob(pb.WatchTrainingJobRequest(job_id=job.job_id), timeout=90):
            final = event.job
        assert final is not None and final.state == pb.JOB_STATE_SUCCEEDED, final


def _traffic_round(client: Client, traffic: dict) -> None:
    """Generations on the base model and both adapters (alternating, so the one-slot cache loads and evicts), one
    streamed, and two that fail (unknown adapter, invalid sampling); counts them into ``traffic``."""
    for adapter in ("", "alpha", "alpha", "beta", "", "alpha", "beta"):
        _generate(client, adapter)
        traffic["ok"] += 1
    events = list(client.generate_stream(GenerationRequest(
        request_id=f"stream-{traffic['ok']}", adapter_id="beta", prompt="a streamed one",
        params=SamplingParams(max_new_tokens=6))))
    assert events[-1].finished
    traffic["ok"] += 1
    traffic.setdefault("streamed", []).append(events[-1].request_id)
    for adapter, params in (("no-such-adapter", {}), ("", {"temperature": -1.0})):
        with pytest.raises(ClientError) as err:
            _generate(client, adapter, **params)
        traffic["failed"][err.value.code] = traffic["failed"].get(err.value.code, 0) + 1


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Stack:
    prometheus_bin, promtool = prometheus_tools()
    root = tmp_path_factory.mktemp("monitoring")
    base = save_tiny_base(root)
    save_byte_tokenizer(base)
    sources = {name: make_adapter(base, root / f"src-{name}", seed=seed, r=4)
               for name, seed in (("alpha", 1), ("beta", 2))}
    # One accelerator slot and one host entry: alternating adapters evict in both tiers.
    server = start_server(base, root / "adapters", root / "server.log", "--adapter-slots", "1",
                          "--cpu-adapter-cache", "1", "--log-json")
    prometheus = None
    try:
        prometheus = Prometheus(prometheus_bin, root / "prometheus", [f"127.0.0.1:{server.metrics_port}"])
        prometheus.wait_ready()
        prometheus.wait_scraped_after(time.time(), scrapes=1)
        traffic = {"ok": 0, "failed": {}}
        with Client(server.target, timeout=60) as client:
            for name, src in sources.items():
                client.register_adapter(name, str(src))
            # Two rounds with scrapes in between: a counter's first appearance is no increase to rate(), so every
            # series must be seen before the round that moves it.
            for _ in range(2):
                _traffic_round(client, traffic)
                prometheus.wait_scraped_after(time.time(), scrapes=2)
        training_served = _training_served(server.target)
        training_error = None
        if training_served:
            try:
                _run_training_job(server.target, root)
            except Exception as exc:  # noqa: BLE001 - reported by the training test only
                training_error = exc
        prometheus.wait_scraped_after(time.time(), scrapes=3)
        yield Stack(server, prometheus, promtool, training_served, traffic, training_error)
    finally:
        if prometheus is not None:
            prometheus.stop()
        server.stop()


def _load(name: str) -> dict:
    return json.loads((DASHBOARD_DIR / f"{name}.json").read_text())


def _check_panels(stack: Stack, name: str) -> list[str]:
    """Evaluate every panel query of dashboard ``name``; return a description of each one without data."""
    queries = dashboard_queries(_load(name))
    assert queries, f"{name} has no queries"
    empty = []
    for title, expr in queries:
        result = stack.prometheus.query(substitute(expr))  # raises on invalid PromQL
        if not result or not has_finite_value(result):
            empty.append(f"{name} / {title}: {expr} -> {result}")
    return empty


def test_prometheus_scraped_the_traffic(stack):
    got = {s["metric"]["code"]: float(s["value"][1]) for s in stack.prometheus.query(
        'sum by (code) (qlora_server_requests_total{method="qlora_server.v1.Generation/Generate"})')}
    assert got.get("OK") == stack.traffic["ok"] - len(stack.traffic["streamed"])  # the rest are GenerateStream
    assert {code: got.get(code) for code in stack.traffic["failed"]} == \
        {code: float(n) for code, n in stack.traffic["failed"].items()}
    assert set(stack.traffic["failed"]) == {"NOT_FOUND", "INVALID_ARGUMENT"}


@pytest.mark.parametrize("dashboard", ["overview", "adapters"])
def test_every_serving_panel_returns_data(stack, dashboard):
    assert _check_panels(stack, dashboard) == []


def test_every_training_panel_returns_data(stack):
    if not stack.training_served:
        for _, expr in dashboard_queries(_load("training")):
            stack.prometheus.query(substitute(expr))  # the queries are valid PromQL all the same
        pytest.xfail(f"{TRAINING_SERVICE} is not served by `qlora-server serve` yet, so no training job can run "
                     "and qlora_server_training_* have no data")
    assert stack.training_error is None, f"the training job failed: {stack.training_error!r}"
    assert _check_panels(stack, "training") == []


def test_exposition_passes_promtool(stack):
    text = stack.server.exposition()
    assert "qlora_server_build_info{" in text
    # "auto" is resolved at start-up: build_info names the dtype in use and why.
    assert 'compute_dtype_reason="auto: ' in text and 'compute_dtype="auto"' not in text
    run = subprocess.run([stack.promtool, "check", "metrics"], input=text, capture_output=True, text=True,
                         timeout=60)
    assert (run.returncode, run.stdout + run.stderr) == (0, "")


def test_request_log_lines_are_json_without_prompts(stack):
    lines = [json.loads(line) for line in stack.server.log_path.read_text().splitlines() if line.startswith("{")]
    requests = [line for line in lines if line.get("logger") == "qlora_server.requests"]
    by_id = {line["request_id"]: line for line in requests}
    streamed = by_id[stack.traffic["streamed"][0]]
    assert streamed["adapter_id"] == "beta" and streamed["status"] == "OK"
    assert streamed["completion_tokens"] == 6 and streamed["prompt_tokens"] > 0
    assert len(requests) >= stack.traffic["ok"]
    assert all("prompt" not in line and "messages" not in line for line in requests)
    assert not any("hello there" in line or "a streamed one" in line
                   for line in stack.server.log_path.read_text().splitlines())


def test_dockerfile_healthcheck_passes_against_the_live_server(stack):
    from tests.monitoring.test_deploy import GRPC_PORT, healthcheck_command

    python, flag, code = healthcheck_command()
    code = code.replace(f"127.0.0.1:{GRPC_PORT}", stack.server.target)
    run = subprocess.run([sys.executable, flag, code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
