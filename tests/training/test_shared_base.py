"""Training jobs on the server's shared NF4 base: the rebuilt model equals a loaded one, reads no weight file, maps
the server's memory read-only, trains the same adapter as a job that loads its own base, and never alters serving."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from server.config import ModelConfig
from server.model.base import load_base_model
from server.rpc.gen.qlora_server.v1 import qlora_server_pb2 as pb
from server.training import shared_base
from server.training.jobs import JobRequest
from server.training.manager import build_train_config
from server.training.shared_base import HANDOFF_FILE, SharedBase, SharingUnavailable, attach, export_for_training
from tests.tiny import save_tiny_base
from tests.tiny_tokenizer import save_byte_tokenizer
from tests.training.conftest import WAIT_S, fast_config, wait_for

_ROOT = Path(__file__).resolve().parents[2]
IDS = torch.tensor([[1, 5, 9, 33, 70, 2, 200, 17]])


def _no_repack(model) -> None:
    # Keep both models on the plain dequantize+matmul path (as training does), so logits are comparable.
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _base_tensors(model) -> dict[str, torch.Tensor]:
    """Every parameter, buffer and 4-bit quantization-state tensor of ``model``, by name. Not ``state_dict()``:
    on a repacked ``Linear4bit`` that converts the weight back, i.e. changes the model it reads."""
    out = {name: t for name, t in [*model.named_parameters(), *model.named_buffers()]}
    for name, p in model.named_parameters():
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            out.update({f"{name}.qs.{k}": v for k, v in vars(qs).items() if isinstance(v, torch.Tensor)})
            if getattr(qs, "state2", None) is not None:
                out.update({f"{name}.qs2.{k}": v for k, v in vars(qs.state2).items() if isinstance(v, torch.Tensor)})
    return out


def _state_sha(model) -> str:
    """SHA-256 over :func:`_base_tensors` (names, dtypes, shapes and bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(_base_tensors(model).items()):
        h.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
        h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@pytest.fixture
def tiny_cfg(tmp_path) -> ModelConfig:
    base = save_tiny_base(tmp_path)
    save_byte_tokenizer(base)
    return ModelConfig(model=str(base), device="cpu")


def test_attached_base_is_the_loaded_model_bit_for_bit_without_its_weight_file(tiny_cfg, tmp_path, monkeypatch):
    served, _, info = load_base_model(tiny_cfg)
    reference, _, _ = load_base_model(tiny_cfg)  # an independent load: the oracle
    before = _state_sha(served)
    shared = export_for_training(served, info, tiny_cfg)
    assert isinstance(shared, SharedBase) and _state_sha(served) == before  # re-pointed, values unchanged
    (Path(tiny_cfg.model) / "model.safetensors").unlink()  # a path that read the weights would fail now
    shared.handoff(tmp_path)
    rebuilt, got_info, nbytes = attach(tmp_path, tiny_cfg)
    assert got_info == info and nbytes == shared.nbytes
    assert _state_sha(rebuilt) == _state_sha(reference)
    assert sorted(rebuilt.state_dict()) == sorted(reference.state_dict())
    assert [type(m).__name__ for m in rebuilt.modules()] == [type(m).__name__ for m in reference.modules()]
    assert rebuilt.is_loaded_in_4bit and not any(p.requires_grad for p in rebuilt.parameters())
    # Every tensor is a view of one mapping of nbytes (not copies scattered over the heap).
    ptrs = [t.data_ptr() for t in _base_tensors(rebuilt).values()]
    assert max(ptrs) - min(ptrs) < nbytes
    def no_loading(_cfg):
        raise AssertionError("the shared path loaded the base")

    monkeypatch.setattr("server.model.base.load_base_model", no_loading)
    events = []
    via_worker, _ = shared_base.worker_loader(tmp_path, events.append)(tiny_cfg)
    assert _state_sha(via_worker) == _state_sha(reference)
    assert [(e["source"], e["bytes"]) for e in events] == [("shared", shared.nbytes)]
    _no_repack(rebuilt)
    _no_repack(reference)
    with torch.no_grad():
        assert torch.equal(rebuilt(IDS).logits, reference(IDS).logits)


def test_a_base_repacked_by_a_forward_is_not_exported(tiny_cfg):
    # --cpu-4bit-kernel fused: bitsandbytes may repack (the default, exact, never does).
    model, _, info = load_base_model(dataclasses.replace(tiny_cfg, cpu_4bit_kernel="fused"))
    with torch.no_grad():
        model(IDS)  # an inference forward: bitsandbytes repacks the 4-bit weights on AVX512-BF16 CPUs
    if not any(getattr(getattr(m, "weight", None), "quant_state", None) is not None
               and getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in model.modules()):
        pytest.skip("this CPU does not repack 4-bit weights (no AVX512-BF16)")
    before = _state_sha(model)
    with pytest.raises(SharingUnavailable, match="repacked"):
        SharedBase.export(model, info, None)
    assert export_for_training(model, info, tiny_cfg) is None  # the server falls back: jobs load their own
    assert _state_sha(model) == before


def test_a_worker_cannot_write_the_shared_base(tiny_cfg, tmp_path):
    """The worker maps the arena read-only: a write kills it (SIGSEGV) instead of changing what the server
    serves; a read in the same script works."""
    model, _, info = load_base_model(tiny_cfg)
    shared = export_for_training(model, info, tiny_cfg)
    before = shared.checksum()
    fds = shared.handoff(tmp_path)
    script = textwrap.dedent(f"""
        import sys
        from server.config import ModelConfig
        from server.training.shared_base import attach
        model, _, _ = attach({str(tmp_path)!r}, ModelConfig(model="unused", device="cpu"))
        print(float(model.model.norm.weight.float().sum()), flush=True)
        model.model.norm.weight.data.fill_(7.0)
        print("wrote", flush=True)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=_ROOT, pass_fds=fds, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == -signal.SIGSEGV, proc.stderr[-2000:]
    assert float(proc.stdout.split()[0]) == float(model.model.norm.weight.float().sum())
    assert "wrote" not in proc.stdout
    assert shared.checksum() == before


def test_worker_loader_falls_back_to_loading_and_says_why(tiny_cfg, tmp_path, monkeypatch):
    loaded = []

    def fake_load(cfg):
        loaded.append(cfg)
        return "model", "tokenizer", type("Info", (), {"weight_bytes": 123})()

    monkeypatch.setattr("server.model.base.load_base_model", fake_load)
    events = []
    assert shared_base.worker_loader(tmp_path, events.append)(tiny_cfg)[0] == "model"  # no hand-off at all
    (tmp_path / HANDOFF_FILE).write_bytes(b"not a pickle")
    assert shared_base.worker_loader(tmp_path, events.append)(tiny_cfg)[0] == "model"
    assert len(loaded) == 2
    assert [e["source"] for e in events] == ["loaded", "loaded"]
    assert events[0]["message"] == "base: loaded (the server did not share its base)"
    assert events[1]["message"].startswith("base: loaded (sharing failed: FailedPrecondition")


def _adapter(job_output: Path) -> dict[str, torch.Tensor]:
    return load_file(str(next(job_output.rglob("adapter_model.safetensors"))))


def test_a_job_trains_on_the_shared_base_like_one_that_loads_it_and_leaves_it_unchanged(served, tmp_path):
    shared = served.app.training._shared_base
    assert shared is not None  # sharing is the default
    arena_before, model_before = shared.checksum(), _state_sha(served.app.model)
    config = fast_config(max_steps=3)
    job = served.training.CreateTrainingJob(pb.CreateTrainingJobRequest(
        adapter_id="on-shared", dataset_path=str(served.dataset), config=config), timeout=30)
    events = served.watch_to_end(job.job_id)
    assert events[-1].job.state == pb.JOB_STATE_SUCCEEDED, events[-1].job.error
    assert f"base: shared from the server ({shared.nbytes} bytes)" in [e.message for e in events]
    assert shared.checksum() == arena_before and _state_sha(served.app.model) == model_before

    # The oracle: the plain trainer, in this process, loading its own copy of the base.
    from trainer.train import train

    request = JobRequest("on-shared", str(served.dataset), config={
        "r": 4, "lora_alpha": 8.0, "target_modules": ["q_proj", "v_proj"], "max_steps": 3, "batch_size": 2,
        "max_seq_length": 32, "eval_fraction": 0.0, "seed": 0, "optim": "paged_adamw_32bit"})
    own = train(build_train_config(request, served.app.config.model, tmp_path / "own"))
    shared_adapter, own_adapter = _adapter(Path(events[-1].job.output_dir)), _adapter(own.adapter_dir)
    assert sorted(shared_adapter) == sorted(own_adapter)
    for name, value in own_adapter.items():
        torch.testing.assert_close(shared_adapter[name], value, rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in own_adapter.items() if "lora_B" in k)


def _mapping_of(pid: int, inode: int) -> list[str]:
    return [line for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
            if len(line.split()) >= 5 and line.split()[4] == str(inode)]


def test_the_worker_maps_the_servers_memory_and_a_sigkill_leaves_serving_intact(served):
    shared = served.app.training._shared_base
    inode = os.fstat(shared._fd).st_ino  # the server's shared-memory file holding the base
    before = shared.checksum()
    job = served.training.CreateTrainingJob(pb.CreateTrainingJobRequest(
        adapter_id="mapped", dataset_path=str(served.dataset), config=fast_config(max_steps=500)), timeout=30)
    wait_for(lambda: served.app.training.get(job.job_id).step >= 1, what="the first step")
    pid = served.app.training.get(job.job_id).pid
    lines = _mapping_of(pid, inode)
    assert lines, "the worker does not map the server's base"
    assert all(line.split()[1] == "r--s" for line in lines), lines  # shared, and read-only in the worker
    mapped = sum(int(end, 16) - int(start, 16) for start, end in (line.split()[0].split("-") for line in lines))
    assert mapped >= shared.nbytes
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: served.app.training.get(job.job_id).state == "failed", timeout_s=WAIT_S, what="the failure")
    assert "worker killed by signal 9 (SIGKILL)" in served.app.training.get(job.job_id).error
    assert shared.checksum() == before
    reply = served.generation.Generate(pb.GenerateRequest(prompt="say 3", max_new_tokens=4), timeout=60)
    assert reply.completion_tokens >= 1


def test_a_hand_off_that_cannot_be_written_leaves_nothing_and_passes_no_descriptor(tmp_path):
    shared = SharedBase(torch.zeros(8, dtype=torch.uint8), (), None, None, None)
    assert shared.handoff(tmp_path / "gone") == ()  # the worker then finds no hand-off and loads its own base
    assert not (tmp_path / "gone").exists()
    assert len(shared.handoff(tmp_path)) == 1 and (tmp_path / HANDOFF_FILE).is_file()
