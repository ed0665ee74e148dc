"""Training budgets: the peak-memory estimate against PEFT and a worker's measured peak RSS, refusal at create and
at start naming the field, the RSS watchdog, the worker's threads and niceness, and their metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("peft")

from server.errors import FailedPrecondition  # noqa: E402
from server.metrics import Metrics  # noqa: E402
from server.training.budget import (  # noqa: E402
    CPU_RUNTIME_BYTES,
    JobBudget,
    ModelShape,
    apply_worker_budget,
    estimate_peak_bytes,
    read_rss,
)
from server.training.jobs import FAILED, JobRequest  # noqa: E402
from tests.training.conftest import wait_for, write_dataset  # noqa: E402
from tests.training.test_job_lifecycle import _manager, fake_python  # noqa: E402,F401
from trainer.config import TrainConfig  # noqa: E402

SMOL = ModelShape(hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
                  vocab_size=49152, compute_bytes=4, weight_bytes=100 * 2**20)


def _config(tmp_path: Path, **changes) -> TrainConfig:
    return TrainConfig(dataset=tmp_path / "d.jsonl", output_dir=tmp_path / "out", **changes)


def _big_llama(parent: Path) -> Path:
    """A float32 Llama whose activations and logits dwarf its weights (vocab 16384, 512 positions)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.tiny_tokenizer import save_byte_tokenizer

    torch.manual_seed(0)
    out = parent / "big-llama"
    LlamaForCausalLM(LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=16384, max_position_embeddings=512,
                                 tie_word_embeddings=False)).save_pretrained(out)
    save_byte_tokenizer(out)
    return out


def test_lora_part_counts_exactly_the_parameters_peft_trains(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from tests.tiny import save_tiny_base

    base = save_tiny_base(tmp_path)
    for targets in (["q_proj", "v_proj"], None, ".*\\.(k|down)_proj"):
        config = _config(tmp_path, r=4, target_modules=tuple(targets) if isinstance(targets, list) else targets)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                               LoraConfig(r=4, target_modules=targets or ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                          "gate_proj", "up_proj", "down_proj"]))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        shape = ModelShape.from_hf_config(AutoConfig.from_pretrained(base), "float32", 0)
        est = estimate_peak_bytes(config, shape)
        assert est.parts["lora"] == 8 * trainable  # float32 weight + gradient
        assert est.parts["optimizer"] == 8 * trainable  # paged_adamw_8bit: every tensor < 4096 elements stays 32-bit


def test_estimate_moves_the_way_each_setting_does(tmp_path):
    base = _config(tmp_path, batch_size=4, max_seq_length=256, gradient_checkpointing=False, optim="paged_adamw_32bit")
    est = estimate_peak_bytes(base, SMOL)
    assert est.total == sum(est.parts.values()) and est.parts["runtime"] == CPU_RUNTIME_BYTES
    assert est.parts["base_weights"] == SMOL.weight_bytes
    assert estimate_peak_bytes(base, SMOL, base_weight_bytes=0).total == est.total - SMOL.weight_bytes
    for change, parts in (({"batch_size": 8}, ("activations", "logits")),
                          ({"max_seq_length": 512}, ("activations", "logits")),
                          ({"r": 32}, ("lora", "optimizer"))):
        bigger = estimate_peak_bytes(_config(tmp_path, **{**_fields(base), **change}), SMOL)
        for part in parts:
            assert bigger.parts[part] > est.parts[part], (change, part)
    ckpt = estimate_peak_bytes(_config(tmp_path, **{**_fields(base), "gradient_checkpointing": True}), SMOL)
    assert ckpt.parts["activations"] < est.parts["activations"]
    # r 32: every LoRA tensor has ≥ 4096 elements (k_proj's B: 192 × 32), so 8-bit state is 2 vs 8 bytes each.
    wide = estimate_peak_bytes(_config(tmp_path, **{**_fields(base), "r": 32}), SMOL)
    eight = estimate_peak_bytes(_config(tmp_path, **{**_fields(base), "r": 32, "optim": "paged_adamw_8bit"}), SMOL)
    assert eight.parts["optimizer"] * 4 == wide.parts["optimizer"] == wide.parts["lora"]


def _fields(config: TrainConfig) -> dict:
    return {k: getattr(config, k) for k in ("batch_size", "max_seq_length", "gradient_checkpointing", "optim", "r")}


def _run_worker(job_dir: Path, config: dict, budget: dict | None) -> tuple[int, int, list[dict]]:
    """Run the real worker on ``config``; returns its exit status, its peak RSS (bytes) and progress.

    The peak is the worker's own ``VmHWM`` (``/proc/PID/status``, what the manager's watchdog reads), polled until it
    exits -- not ``wait4``'s ``ru_maxrss``: subprocess starts the child with vfork, and at exec Linux folds the
    borrowed (parent's) memory's high-water mark into the child's ``maxrss``, so late in a test session that number
    was pytest's own RSS (1.5 GB against the worker's ~0.85 GB)."""
    from server.training.budget import read_rss

    job_dir.mkdir(parents=True)
    (job_dir / "job.json").write_text(json.dumps({"config": config, **({"budget": budget} if budget else {})}))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen([sys.executable, "-m", "server.training.worker", str(job_dir)], env=env,
                            stdout=subprocess.DEVNULL, stderr=open(job_dir / "worker.log", "wb"))
    peak = 0
    while proc.poll() is None:
        rss = read_rss(proc.pid)
        if rss is not None:
            peak = max(peak, rss[1])
        time.sleep(0.02)
    lines = (job_dir / "progress.jsonl").read_text().splitlines()
    return proc.returncode, peak, [json.loads(line) for line in lines]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_workers_measured_peak_rss_lies_within_the_estimates_bounds(tmp_path, checkpointing):
    """The docstring's bound: for full-length batches, estimate / 2 <= measured peak RSS <= estimate."""
    from transformers import AutoConfig

    base = _big_llama(tmp_path)
    seq = 256
    data = tmp_path / "full.jsonl"  # every example cut to max_seq_length tokens: the estimate's worst case
    data.write_text("".join(json.dumps({"prompt": "x", "completion": "y" * (2 * seq)}) + "\n" for _ in range(8)))
    config = TrainConfig(model=str(base), dataset=data, output_dir=tmp_path / "job" / "output", r=8, batch_size=4,
                         max_seq_length=seq, truncate=True, max_steps=2, eval_fraction=0.0, compute_dtype="float32",
                         device="cpu", save_steps=1000, optim="paged_adamw_32bit", lora_dropout=0.0,
                         gradient_checkpointing=checkpointing)
    rc, peak, progress = _run_worker(tmp_path / "job", config.to_dict(), {"threads": 1, "nice": 0})
    assert rc == 0, (tmp_path / "job" / "worker.log").read_text()[-2000:]
    weights = (base / "model.safetensors").stat().st_size  # the float32 file the worker maps and quantizes
    est = estimate_peak_bytes(config, ModelShape.from_hf_config(AutoConfig.from_pretrained(base), "float32", weights))
    assert est.total / 2 <= peak <= est.total, (peak, est.parts)
    assert progress[0]["event"] == "started" and progress[0]["threads"] == 1


def test_create_refuses_a_job_over_the_budget_naming_the_field_and_stores_nothing(tmp_path, fake_python):
    budget = JobBudget(SMOL, "cpu", memory_bytes=2 * 2**30, free_memory=lambda _d: 64 * 2**30)
    manager = _manager(tmp_path / "state", fake_python)
    manager._budget = budget
    dataset = write_dataset(tmp_path / "d.jsonl")
    request = JobRequest("a1", str(dataset), False, {"batch_size": 16, "max_seq_length": 512})
    with pytest.raises(FailedPrecondition) as err:
        manager.create(request)
    assert err.value.field == "config.batch_size"
    text = str(err.value)
    assert "--training-memory-bytes" in text and str(2 * 2**30) in text
    suggested = int(text.split("; batch_size ")[1].split()[0])
    fits = _config(tmp_path, batch_size=suggested, max_seq_length=512)
    assert budget.estimate(fits).total <= 2 * 2**30 < budget.estimate(_config(tmp_path, batch_size=suggested + 1,
                                                                              max_seq_length=512)).total
    assert manager.list() == []
    # Over budget even at batch 1: the sequence length is the field to change.
    with pytest.raises(FailedPrecondition) as err:
        manager.create(JobRequest("a1", str(dataset), False, {"batch_size": 1, "max_seq_length": 2**15}))
    assert err.value.field == "config.max_seq_length"


def test_a_job_that_no_longer_fits_when_it_starts_fails_without_a_worker(tmp_path, fake_python, monkeypatch):
    free = iter([64 * 2**30])  # the check at create sees 64 GiB free; by the start, 1 GiB (less than the runtime)
    budget = JobBudget(SMOL, "cpu", free_memory=lambda _d: next(free, 2**30))
    monkeypatch.setenv("FAKE_WORKER_PLAN", json.dumps([["exit", 0]]))
    manager = _manager(tmp_path / "state", fake_python)
    manager._budget = budget
    manager.start()
    try:
        job = manager.create(JobRequest("a1", str(write_dataset(tmp_path / "d.jsonl")), False,
                                        {"batch_size": 1, "max_seq_length": 64}))
        wait_for(lambda: manager.get(job.job_id).terminal, what="job end")
        done = manager.get(job.job_id)
        assert done.state == FAILED and done.pid is None
        assert done.error.startswith("FAILED_PRECONDITION: config") and "checked when the job started" in done.error
    finally:
        manager.close()


def test_the_rss_watchdog_stops_a_worker_over_its_budget(tmp_path, fake_python, monkeypatch):
    metrics = Metrics()
    monkeypatch.setenv("FAKE_WORKER_PLAN", json.dumps([["wait", "never"]]))
    manager = _manager(tmp_path / "state", fake_python, metrics)
    manager._budget = JobBudget(None, "cpu", memory_bytes=2**20, free_memory=lambda _d: 2**40)  # 1 MiB: any Python
    manager.start()
    try:
        job = manager.create(JobRequest("a1", str(write_dataset(tmp_path / "d.jsonl")), False, {}))
        wait_for(lambda: manager.get(job.job_id).terminal, what="job end")
        done = manager.get(job.job_id)
        assert done.state == FAILED
        assert done.error.startswith("RESOURCE_EXHAUSTED: the worker's resident memory")
        assert f"budget ({2**20} bytes)" in done.error and "config.batch_size" in done.error
        assert read_rss(done.pid) is None  # the worker is gone
        budget = metrics.registry.get_sample_value("qlora_server_training_memory_bytes",
                                                   {"job_id": job.job_id, "kind": "budget"})
        current = metrics.registry.get_sample_value("qlora_server_training_memory_bytes",
                                                    {"job_id": job.job_id, "kind": "current"})
        assert budget == 2**20 and current > budget
    finally:
        manager.close()


def test_apply_worker_budget_sets_threads_niceness_and_thread_env_in_a_fresh_process():
    code = ("import json, os; from server.training.budget import apply_worker_budget as a; "
            "r = a({'threads': 1, 'nice': 7, 'memory_bytes': 123}); r['omp'] = os.environ['OMP_NUM_THREADS']; "
            "print(json.dumps(r))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    applied = json.loads(out.stdout.strip().splitlines()[-1])
    assert applied == {"threads": 1, "nice": max(7, os.getpriority(os.PRIO_PROCESS, 0)),
                       "memory_budget_bytes": 123, "omp": "1"}
    assert apply_worker_budget(None)["memory_budget_bytes"] == 0  # nothing asked, nothing changed


def test_a_served_job_runs_with_the_budgets_threads_and_niceness(served):
    from server.rpc.gen.qlora_server.v1 import qlora_server_pb2 as pb
    from tests.training.conftest import WAIT_S, fast_config

    budget = served.app.training._budget
    job = served.training.CreateTrainingJob(pb.CreateTrainingJobRequest(
        adapter_id="budgeted", dataset_path=str(served.dataset), config=fast_config()), timeout=WAIT_S)
    events = served.watch_to_end(job.job_id)
    assert events[-1].job.state == pb.JOB_STATE_SUCCEEDED, events[-1].job.error
    job_dir = Path(served.app.training.get(job.job_id).output_dir)
    started = json.loads((job_dir / "progress.jsonl").read_text().splitlines()[0])
    assert started["event"] == "started"
    assert started["threads"] == budget.threads and started["nice"] == budget.nice
    said = [e.message for e in events if e.message.startswith("worker running with")]  # what `jobs watch` prints
    assert said == [f"worker running with {budget.threads} CPU thread(s) at nice {budget.nice}, memory budget "
                    f"{started['memory_budget_bytes']} bytes"]
    sample = served.app.metrics.registry.get_sample_value
    assert sample("qlora_server_training_threads", {"job_id": job.job_id}) == budget.threads
    values = {k: sample("qlora_server_training_memory_bytes", {"job_id": job.job_id, "kind": k})
              for k in ("budget", "estimate", "current", "peak")}
    assert values["estimate"] <= values["budget"] and 0 < values["current"] <= values["peak"] <= values["estimate"]


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spelling=st.sampled_from(["cuda", "cuda:0", "cuda:1", "cuda:3"]), current=st.integers(0, 3),
       budget=st.integers(1, 2**40))
def test_cuda_cap_always_names_a_device_index(monkeypatch, spelling, current, budget):
    """Every spelling of a CUDA device caps an indexed device (torch refuses an index-less "cuda"), the current
    device for a bare "cuda", with the budget's share of that device's memory (found on an H200: "cuda" failed
    every job's worker before this)."""
    import torch

    from server.training.budget import apply_worker_budget

    calls = []
    total = 141 * 2**30
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda dev: type("Props", (), {"total_memory": total})())

    def cap(fraction, device):
        if not isinstance(device, int) and getattr(torch.device(device), "index", None) is None:
            raise ValueError(f"Expected a torch.device with a specified index or an integer, but got:{device}")
        calls.append((fraction, torch.device(device).index if not isinstance(device, int) else device))

    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", cap)
    applied = apply_worker_budget({"memory_bytes": budget, "device": spelling})
    want_index = current if spelling == "cuda" else int(spelling.split(":")[1])
    assert calls == [(min(1.0, budget / total), want_index)]
    assert applied["memory_budget_bytes"] == budget


@settings(max_examples=30, deadline=None)
@given(threads=st.integers(-3, 64), nice=st.integers(-2, 25), memory=st.integers(-5, 2**40))
def test_training_limits_accept_exactly_the_documented_ranges(threads, nice, memory):
    """``--training-threads`` 0..usable cores (a 999 was once accepted and ran the job ~100× slower), niceness
    0..19, memory >= 0; anything else is refused at start-up naming the flag's field."""
    from server.config import TrainingLimits, usable_cpus
    from server.errors import InvalidArgument

    ok = 0 <= threads <= usable_cpus() and 0 <= nice <= 19 and memory >= 0
    try:
        TrainingLimits(memory_bytes=memory, threads=threads, nice=nice)
    except InvalidArgument as exc:
        assert not ok and exc.field in ("training_threads", "training_nice", "training_memory_bytes")
        if exc.field == "training_threads":
            assert not 0 <= threads <= usable_cpus()
    else:
        assert ok
