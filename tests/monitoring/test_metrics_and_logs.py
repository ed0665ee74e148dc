"""Metric semantics (bounded labels, zero-initialised series, memory sampling, cache counting) and request logs."""

from __future__ import annotations

import io
import json
import logging

import pytest
import torch

from server.engine.types import ChatMessage, GenerationRequest, SamplingParams
from server.errors import DeadlineExceeded
from server.logs import REQUEST_LOGGER, JsonFormatter, RequestLog, configure_logging
from server.metrics import COMPONENTS, MEMORY_KINDS, PHASES, TIERS, Metrics
from tests.engine_harness import build_engine
from tests.tiny import make_adapter, save_tiny_base


def value(metrics: Metrics, name: str, **labels) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_adapter_label_is_bounded_and_sticky():
    m = Metrics(top_adapter_labels=2)
    assert [m.adapter_label(a) for a in ("", "a", "b", "c", "a", "d", "b")] == \
        ["base", "a", "b", "other", "a", "other", "b"]
    off = Metrics(top_adapter_labels=0)
    assert {off.adapter_label("a"), off.adapter_label("b")} == {"other"}


def test_known_label_values_exist_at_zero():
    m = Metrics()
    for tier in TIERS:
        for name in ("qlora_server_adapter_cache_hits_total", "qlora_server_adapter_cache_misses_total",
                     "qlora_server_adapter_loads_total", "qlora_server_adapter_evictions_total",
                     "qlora_server_adapter_load_seconds_count", "qlora_server_adapters_resident"):
            assert value(m, name, tier=tier) == 0.0, (name, tier)
    for phase in PHASES:
        assert value(m, "qlora_server_step_seconds_count", phase=phase) == 0.0
    for component in COMPONENTS:
        assert value(m, "qlora_server_component_memory_bytes", component=component) == 0.0
    # No adapter or status-code series before traffic: those label values are not known up front.
    assert value(m, "qlora_server_generations_total", adapter="base", finish_reason="length") is None


def test_process_collector_is_on_the_registry():
    m = Metrics()
    assert value(m, "process_resident_memory_bytes") > 0
    assert value(m, "process_cpu_seconds_total") >= 0


def test_sample_memory_on_cpu_reports_the_process_against_the_machine():
    m = Metrics()
    m.sample_memory("cpu")
    got = {kind: value(m, "qlora_server_accelerator_memory_bytes", device="cpu", kind=kind) for kind in MEMORY_KINDS}
    assert all(v is not None and v > 0 for v in got.values()), got
    assert got["allocated"] <= got["peak"] <= got["total"]
    assert got["reserved"] == got["allocated"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_sample_memory_for_cuda_without_cuda_sets_nothing():
    m = Metrics()
    m.sample_memory("cuda:0")
    assert not [s for f in m.registry.collect() if f.name == "qlora_server_accelerator_memory_bytes"
                for s in f.samples]


def test_json_formatter_merges_fields_without_overwriting_base_keys():
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "hello %s", ("world",), None)
    record.fields = {"request_id": "r1", "msg": "clobber?", "n": 3}
    line = json.loads(JsonFormatter().format(record))
    assert line["msg"] == "hello world" and line["request_id"] == "r1" and line["n"] == 3
    assert line["level"] == "INFO" and line["logger"] == "x" and isinstance(line["ts"], float)


def test_configure_logging_switches_format_and_replaces_handlers():
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    try:
        out = io.StringIO()
        configure_logging(json_lines=True, stream=out)
        logging.getLogger("t").warning("one")
        configure_logging(json_lines=False, stream=out)
        logging.getLogger("t").warning("two")
        assert len(root.handlers) == 1
        first, second = out.getvalue().splitlines()
        assert json.loads(first)["msg"] == "one"
        assert second.endswith("WARNING t: two")
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)


# --- the engine's request log and the adapter cache's counters, on a tiny NF4 model ---------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("monitoring-engine")
    base_dir = save_tiny_base(root)
    return base_dir, {name: make_adapter(base_dir, root / f"src-{name}", seed=seed, r=4)
                      for name, seed in (("alpha", 1), ("beta", 2))}


def build(tmp_path, files, request_log=None, **engine_kw):
    engine, _, metrics = build_engine(tmp_path, *files, request_log=request_log,
                                      **{"adapter_slots": 1, "cpu_adapter_cache": 2, "max_lora_rank": 8, **engine_kw})
    return engine, metrics


def req(rid, adapter="", prompt="hello there", messages=(), **params):
    return GenerationRequest(request_id=rid, adapter_id=adapter, prompt=prompt, messages=messages,
                             params=SamplingParams(**{"max_new_tokens": 6, **params}))


def test_cache_counts_each_lookup_once_per_tier(tmp_path, files):
    """One slot, two host entries: alpha (cold), alpha (in the slot), beta (cold, evicts alpha's slot), alpha
    (back from host memory)."""
    engine, m = build(tmp_path, files)
    try:
        for i, adapter in enumerate(("alpha", "alpha", "beta", "alpha")):
            engine.generate(req(f"r{i}", adapter))
    finally:
        engine.stop()
    counts = {(name, tier): value(m, f"qlora_server_adapter_{name}_total", tier=tier)
              for name in ("cache_hits", "cache_misses", "loads", "evictions") for tier in TIERS}
    assert counts == {
        ("cache_hits", "gpu"): 1, ("cache_misses", "gpu"): 3,  # 4 lookups
        ("cache_hits", "cpu"): 1, ("cache_misses", "cpu"): 2,  # 3 lookups: one per gpu miss
        ("loads", "gpu"): 3, ("loads", "cpu"): 2,
        ("evictions", "gpu"): 2, ("evictions", "cpu"): 0,
    }
    assert value(m, "qlora_server_adapters_resident", tier="cpu") == 2
    assert value(m, "qlora_server_component_memory_bytes", component="adapter_host_cache") > 0
    assert value(m, "qlora_server_generations_total", adapter="alpha", finish_reason="length") == 3


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def captured():
    handler = _Capture()
    logger = logging.getLogger(REQUEST_LOGGER)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler.records
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_request_log_has_ids_counts_timings_status_and_no_prompt(tmp_path, files, captured):
    engine, _ = build(tmp_path, files)
    try:
        result = engine.generate(req("ok-1", "beta", prompt="secret prompt text"))
        with pytest.raises(DeadlineExceeded):
            engine.generate(GenerationRequest(request_id="late-1", adapter_id="", prompt="secret prompt text",
                                              params=SamplingParams(max_new_tokens=6), deadline=0.0))
    finally:
        engine.stop()
    by_id = {r.fields["request_id"]: r for r in captured}
    assert set(by_id) == {"ok-1", "late-1"}
    ok = by_id["ok-1"].fields
    assert ok["adapter_id"] == "beta" and ok["status"] == "OK" and ok["finish_reason"] == result.finish_reason
    assert ok["prompt_tokens"] == result.prompt_tokens and ok["completion_tokens"] == result.completion_tokens == 6
    assert 0 <= ok["queue_seconds"] <= ok["ttft_seconds"] <= ok["total_seconds"] and ok["tpot_seconds"] >= 0
    late = by_id["late-1"].fields
    assert late["status"] == "DEADLINE_EXCEEDED" and late["finish_reason"] is None and "error" in late
    for record in captured:
        assert "secret" not in record.getMessage()
        assert "prompt" not in record.fields and "messages" not in record.fields
        assert "secret" not in JsonFormatter().format(record)


def test_request_log_includes_prompts_only_when_asked(tmp_path, files, captured):
    engine, _ = build(tmp_path, files, request_log=RequestLog(log_prompts=True))
    try:
        engine.generate(req("p-1", prompt="say hi"))
        engine.generate(req("p-2", prompt=None, messages=(ChatMessage("user", "chat hi"),)))
    finally:
        engine.stop()
    by_id = {r.fields["request_id"]: r.fields for r in captured}
    assert by_id["p-1"]["prompt"] == "say hi"
    assert by_id["p-2"]["messages"] == [{"role": "user", "content": "chat hi"}]
