"""The compute-dtype choice: bfloat16 only where the device runs it natively, the same for server and trainer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from server.model import dtype as dtype_mod
from server.model.dtype import NATIVE_BF16_CPU_FLAGS, choose_compute_dtype, read_cpu_flags

# Flags seen on real x86 CPUs (an AVX2-only EPYC, an AVX512 Xeon without BF16, Zen 4, Sapphire Rapids) plus noise.
FLAG_POOL = ["fpu", "sse2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
             "avx512_fp16", "avx_vnni", "amx_tile", "amx_int8", "avx512_bf16", "amx_bf16", "bf16", "neon"]
DTYPES = ("bfloat16", "float16", "float32")

# /proc/cpuinfo of the AVX2-only AMD EPYC where bf16 ran ~40x slower than float32 (flags abridged).
AVX2_ONLY_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B12
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sse sse2 ht syscall nx lm avx f16c avx2 fma bmi1 bmi2 sha_ni
bogomips\t: 4499.99

processor\t: 1
flags\t\t: fpu avx2 avx512_bf16
"""


@settings(max_examples=200, deadline=None)
@given(flags=st.sets(st.sampled_from(FLAG_POOL)))
def test_auto_on_cpu_is_bf16_exactly_when_native(flags):
    choice = choose_compute_dtype("auto", "cpu", cpu_flags=flags)
    native = bool(flags & NATIVE_BF16_CPU_FLAGS)
    assert choice.dtype == ("bfloat16" if native else "float32")
    assert choice.requested == "auto" and not choice.slow and choice.reason.startswith("auto:")


@settings(max_examples=50, deadline=None)
@given(flags=st.sets(st.sampled_from(FLAG_POOL)), capability=st.sampled_from(["DEFAULT", "AVX2", "NO AVX"]))
def test_bf16_flags_do_not_count_when_torch_kernels_are_capped_below_avx512(flags, capability):
    assert choose_compute_dtype("auto", "cpu", cpu_flags=flags, cpu_capability=capability).dtype == "float32"


@settings(max_examples=100, deadline=None)
@given(requested=st.sampled_from(DTYPES), flags=st.sets(st.sampled_from(FLAG_POOL)),
       device=st.sampled_from(["cpu", "cuda", "mps"]), cuda_bf16=st.booleans())
def test_an_explicit_dtype_is_always_honoured_and_flagged_when_emulated(requested, flags, device, cuda_bf16):
    choice = choose_compute_dtype(requested, device, cuda_bf16=cuda_bf16, cpu_flags=flags)
    assert choice.dtype == requested
    emulated = device != "cuda" and (requested == "float16"
                                     or (requested == "bfloat16" and not flags & NATIVE_BF16_CPU_FLAGS))
    assert choice.slow == emulated
    assert ("much slower" in choice.reason) == emulated


@pytest.mark.parametrize("cuda_bf16,expected", [(True, "bfloat16"), (False, "float16")])
def test_auto_on_cuda_follows_bf16_support_and_ignores_cpu_flags(cuda_bf16, expected):
    for flags in (set(), {"avx512_bf16"}):
        assert choose_compute_dtype("auto", "cuda", cuda_bf16=cuda_bf16, cpu_flags=flags).dtype == expected


def test_unknown_request_is_refused():
    with pytest.raises(ValueError, match="compute dtype"):
        choose_compute_dtype("int8", "cpu")


def test_cpu_flags_come_from_the_first_processor(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text(AVX2_ONLY_CPUINFO)
    flags = read_cpu_flags(info)
    assert {"avx2", "fma", "sha_ni"} <= flags and "avx512_bf16" not in flags
    assert choose_compute_dtype("auto", "cpu", cpu_flags=flags).dtype == "float32"
    assert read_cpu_flags(tmp_path / "missing") == frozenset()
    (tmp_path / "noflags").write_text("processor\t: 0\nFeatures\t: neon\n")
    assert read_cpu_flags(tmp_path / "noflags") == frozenset()


def test_config_accepts_auto_by_default_and_names_the_field_on_a_bad_value():
    from server.config import ModelConfig
    from server.errors import InvalidArgument
    from trainer.config import TrainConfig

    assert ModelConfig().compute_dtype == "auto"
    assert TrainConfig(dataset=Path("d.jsonl"), output_dir=Path("o")).compute_dtype == "auto"
    with pytest.raises(InvalidArgument) as err:
        ModelConfig(compute_dtype="bf16")
    assert err.value.field == "compute_dtype"


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    from tests.tiny import save_tiny_base
    from tests.tiny_tokenizer import save_byte_tokenizer

    base = save_tiny_base(tmp_path_factory.mktemp("dtype"))
    save_byte_tokenizer(base)
    return base


@pytest.mark.parametrize("cpuinfo,expected", [(AVX2_ONLY_CPUINFO, torch.float32),
                                              ("flags\t: avx2 avx512f avx512_bf16\n", torch.bfloat16)])
def test_load_resolves_auto_from_the_cpu_and_reports_it(tiny_base, tmp_path, monkeypatch, cpuinfo, expected):
    """The loaded model's unquantized weights (the oracle) are in the dtype that ``BaseModelInfo`` reports."""
    from server.config import ModelConfig
    from server.model.base import load_base_model

    info_file = tmp_path / "cpuinfo"
    info_file.write_text(cpuinfo)
    real = read_cpu_flags
    monkeypatch.setattr(dtype_mod, "read_cpu_flags", lambda path=info_file: real(path))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")  # the same on any CI CPU
    model, _, info = load_base_model(ModelConfig(model=str(tiny_base), device="cpu"))
    assert model.model.embed_tokens.weight.dtype == expected and model.model.norm.weight.dtype == expected
    assert info.compute_dtype == str(expected).removeprefix("torch.")
    assert info.compute_dtype_reason.startswith("auto:")
    linear = model.model.layers[0].self_attn.q_proj
    assert linear.compute_dtype == expected  # bitsandbytes' Linear4bit computes in it too


def test_server_and_trainer_pick_the_same_dtype_on_this_machine(tiny_base, tmp_path):
    """Train/serve parity: the trainer's own load and a server-started job resolve "auto" to what the server runs."""
    from server.config import ModelConfig
    from server.model.base import load_base_model
    from server.training.jobs import JobRequest
    from server.training.manager import build_train_config
    from trainer.config import TrainConfig

    _, _, served = load_base_model(ModelConfig(model=str(tiny_base), device="cpu"))
    _, _, trained = load_base_model(TrainConfig(model=str(tiny_base), dataset=Path("d.jsonl"), output_dir=tmp_path,
                                                device="cpu").model_config())
    assert trained.compute_dtype == served.compute_dtype
    expected = choose_compute_dtype("auto", "cpu", cpu_flags=read_cpu_flags(),
                                    cpu_capability=torch.backends.cpu.get_cpu_capability()).dtype
    assert served.compute_dtype == expected
    # A job the server starts passes the server's own setting ("auto") to the worker, which resolves it with the same
    # code on the same machine: the same dtype, and the model card keeps the "auto: ..." reason.
    server_cfg = ModelConfig(model=str(tiny_base), device="cpu")
    job = build_train_config(JobRequest(adapter_id="a", dataset_path="d.jsonl", config={}), server_cfg, tmp_path)
    assert job.compute_dtype == "auto"
    _, _, job_loaded = load_base_model(job.model_config())
    assert job_loaded.compute_dtype == served.compute_dtype
    assert job_loaded.compute_dtype_reason.startswith("auto:")


@pytest.mark.parametrize("native,expected", [(True, "bfloat16"), (False, "float16")])
def test_auto_on_cuda_does_not_count_emulated_bf16(monkeypatch, native, expected):
    """torch.cuda.is_bf16_supported() says True on pre-Ampere GPUs by emulation; auto must pick float16 there."""
    import contextlib

    calls = []

    def is_bf16_supported(including_emulation=True):
        calls.append(including_emulation)
        return native or including_emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    monkeypatch.setattr(torch.cuda, "device", lambda _d: contextlib.nullcontext())
    choice = dtype_mod.resolve_compute_dtype("auto", torch.device("cuda", 0))
    assert choice.dtype == expected and calls == [False]
