"""The committed Grafana dashboards are a fresh build of deploy/grafana/build_dashboards.py and fit the metrics."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest

from server.metrics import Metrics
from tests.monitoring.stack import DASHBOARD_DIR, REPO, dashboard_queries

pytest.importorskip("grafana_foundation_sdk", reason="dev extra (grafana-foundation-sdk) not installed")

_METRIC = re.compile(r"\b((?:qlora_server|process)_[a-z0-9_]+)")


@pytest.fixture(scope="module")
def builder():
    spec = importlib.util.spec_from_file_location("build_dashboards", REPO / "deploy/grafana/build_dashboards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def built(builder) -> dict[str, str]:
    return builder.build_all()


def test_committed_json_equals_a_fresh_build(built):
    committed = {p.name: p.read_text() for p in DASHBOARD_DIR.glob("*.json")}
    assert set(committed) == set(built) == {"overview.json", "adapters.json", "training.json"}
    for name, text in built.items():
        assert committed[name] == text, f"{name} is stale: run python deploy/grafana/build_dashboards.py"


def test_check_mode_reports_a_stale_file(builder, built, tmp_path, capsys):
    for name, text in built.items():
        (tmp_path / name).write_text(text)
    assert builder.main(["--check", "--out", str(tmp_path)]) == 0
    (tmp_path / "training.json").write_text("{}")
    assert builder.main(["--check", "--out", str(tmp_path)]) == 1
    assert "training.json" in capsys.readouterr().err


def test_dashboards_are_well_formed(built):
    uids = set()
    for name, text in built.items():
        d = json.loads(text)
        uids.add(d["uid"])
        assert d["title"].startswith("qlora-server / ") and "qlora-server" in d["tags"]
        assert [v["name"] for v in d["templating"]["list"]][:2] == ["datasource", "instance"]
        panels = d["panels"]
        ids = [p["id"] for p in panels]
        assert len(ids) == len(set(ids)), f"{name}: duplicate panel ids"
        for p in panels:
            if p["type"] == "row":
                continue
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
            assert p["targets"] and p.get("description"), p["title"]
            refs = [t["refId"] for t in p["targets"]]
            assert len(refs) == len(set(refs)), f"{name} / {p['title']}: duplicate refIds"
            assert 0 <= p["gridPos"]["x"] and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
            for t in p["targets"]:
                assert 'instance=~"$instance"' in t["expr"], f"{name} / {p['title']}: not filtered by instance"
    assert len(uids) == len(built)


def _exported_names(metrics: Metrics) -> dict[str, str]:
    """Every series name the registry can export → its family name (labelled families included before their
    first sample)."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "info": ("_info",),
                "summary": ("_sum", "_count", "")}
    return {family.name + suffix: family.name for family in metrics.registry.collect()
            for suffix in suffixes.get(family.type, ("",))}


def test_every_queried_metric_exists_and_every_metric_is_on_a_dashboard(built):
    exported = _exported_names(Metrics())
    queried = set()
    for text in built.values():
        for _, expr in dashboard_queries(json.loads(text)):
            queried.update(_METRIC.findall(expr))
    missing = sorted(m for m in queried if m not in exported)
    assert not missing, f"dashboards query metrics the server does not export: {missing}"
    ours = {f for f in exported.values() if f.startswith("qlora_server_")}
    unused = sorted(ours - {exported[m] for m in queried})
    assert not unused, f"metrics on no dashboard: {unused}"
