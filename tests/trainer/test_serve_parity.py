"""Train/serve parity: an adapter the trainer wrote, registered with the server's adapter store and served by the
model runner, gives the logits the trainer's own model gives for the same tokens."""

from __future__ import annotations

import shutil

import pytest
import torch

from tests.tiny import edit_config
from tests.trainer.conftest import tiny_config

ADAPTER_ID = "trained"
#: Tolerance on ``max |served - trainer|`` as a share of the row's largest |logit|, per compute dtype.
#: float32: both sides compute the same float32 products in different kernels and orders (PEFT's module hooks and
#: SDPA vs the runner's banks and paged attention); measured 1.3e-6 on this model, so 1e-4 leaves a wide margin.
#: bfloat16: every base matmul output and the residual stream are rounded to bf16 (8 significant bits, one step =
#: 2^-8 of the value) on both sides but at different points (PEFT adds the float32 LoRA term to the bf16 base
#: output; the runner's order differs), and a one-step difference early can grow through two blocks; measured at
#: most 0.0043 (about one step of the largest logit), so the bound is 4 steps, 2^-6. bitsandbytes' fused CPU kernel
#: (bf16 scales; off since server.model.base.keep_plain_cpu_4bit_matmul) was 0.03-0.06 and fails both bounds.
#: On CUDA both sides compute LoRA in bf16 (the trainer's fused LoRA forward; the server's ``lora_dtype`` auto = the
#: compute dtype). Measured on an H200 (bench/RESULTS.md): 0.044-0.046 of the largest logit, because bitsandbytes
#: 0.50.2 multiplies inputs of at most 1,536 tokens with its fused ``gemm_4bit`` CUDA kernel, whose numerics differ
#: from its dequantize-then-matmul path (a training batch uses the latter); with that kernel switched off the served
#: and trainer logits were identical (0.0). Known gap, so strict xfail: it fails loudly once the kernels agree.
REL_TOL = {"float32": 1e-4, "bfloat16": 2.0**-6}
_GPU_GAP = pytest.mark.xfail(strict=True, reason="bitsandbytes' fused small-batch gemm_4bit CUDA kernel differs from "
                                                 "its dequantize path by ~4.6 % of the largest logit (bench/RESULTS.md)")
CASES = [("cpu", "float32"), ("cpu", "bfloat16"),
         pytest.param("cuda", "bfloat16", marks=[pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"),
                                                 _GPU_GAP])]


def _prompts(tok) -> list[list[int]]:
    chats = ["<|im_start|>user\nup abc<|im_end|>\n<|im_start|>assistant\n",
             "<|im_start|>user\nup hgf<|im_end|>\n<|im_start|>assistant\nHGF HGF <|im_end|>\n",
             "plain text, no template: 0123456789"]
    return [tok(c, add_special_tokens=False)["input_ids"] for c in chats]


def _trainer_logits(model, ids: list[int]) -> torch.Tensor:
    """The trained PeftModel (eval mode), whole sequence at once: ``[len(ids), V]`` float32, on the CPU."""
    device = next(model.parameters()).device
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids], device=device)).logits[0].float().cpu()


def _served_logits(runner, ids: list[int], slot: int) -> torch.Tensor:
    """The model runner's prefill logits of every prefix of ``ids`` (each a fresh prefill from position 0):
    ``[len(ids), V]`` float32."""
    blocks = tuple(range(1, 1 + -(-len(ids) // runner.pool.block_size)))
    from server.model.runner import StepRow

    return torch.stack([runner.prefill([StepRow(tuple(ids[:k]), 0, blocks, slot)])[0].float().cpu()
                        for k in range(1, len(ids) + 1)])


def _rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest ``|got - want|`` of a position, over that position's largest ``|want|``; worst position."""
    return float(((got - want).abs().amax(-1) / want.abs().amax(-1)).max())


@pytest.mark.parametrize(("device", "compute_dtype"), CASES)
def test_served_logits_equal_trainer_logits(tiny_model_dir, learnable_data, tmp_path, device, compute_dtype):
    from server.adapters.store import AdapterStore
    from server.adapters.types import BaseModelSpec
    from server.config import EngineConfig, ModelConfig
    from server.model.base import load_base_model
    from server.model.runner import build_runner
    from trainer.train import TrainingSession

    # Train: rank 8, alpha 16 (scale 2, so a scaling mistake shows), a few steps at a high LR so B is far from 0.
    cfg = tiny_config(tiny_model_dir, learnable_data, tmp_path / "run", max_steps=6, compute_dtype=compute_dtype,
                      eval_fraction=0.0, r=8, lora_alpha=16, device=device)
    session = TrainingSession(cfg)
    result = session.run()
    prompts = _prompts(session.tokenizer)
    want = [_trainer_logits(session.model, ids) for ids in prompts]

    # Serve: the server's base loader, runner and adapter store; the adapter goes in through registration.
    model, _, info = load_base_model(ModelConfig(model=str(tiny_model_dir), device=device,
                                                 compute_dtype=compute_dtype))
    assert info.compute_dtype == compute_dtype
    engine_cfg = EngineConfig(adapter_slots=2, max_lora_rank=16, cpu_adapter_cache=2)
    lora_dtype = torch.float32 if device == "cpu" else getattr(torch, compute_dtype)  # the server's lora_dtype auto
    runner = build_runner(model, engine_cfg, lora_dtype, 128)
    store = AdapterStore(tmp_path / "store", BaseModelSpec.from_model(model, info.name, engine_cfg.max_lora_rank))
    store.register(ADAPTER_ID, result.adapter_dir)
    runner.banks.load(0, store.load(ADAPTER_ID))

    tol = REL_TOL[compute_dtype]
    errors = [_rel_error(_served_logits(runner, ids, 0), w) for ids, w in zip(prompts, want)]
    print(f"{device} {compute_dtype}: worst relative |served - trainer| per prompt = {[f'{e:.3g}' for e in errors]}")
    assert max(errors) <= tol, (errors, tol)

    # The comparison can fail: served without the adapter, or with a wrong scaling (alpha/r = 1 instead of 2;
    # rsLoRA's alpha/sqrt(r)), the logits are far outside the tolerance.
    wrong = {}
    for name, changes in {"alpha-equals-r": dict(lora_alpha=8), "rslora": dict(use_rslora=True)}.items():
        edit_config(shutil.copytree(result.adapter_dir, tmp_path / name), **changes)
        store.register(name, tmp_path / name)
        runner.banks.load(1, store.load(name))
        wrong[name] = max(_rel_error(_served_logits(runner, ids, 1), w) for ids, w in zip(prompts, want))
    wrong["no adapter"] = max(_rel_error(_served_logits(runner, ids, -1), w) for ids, w in zip(prompts, want))
    print(f"{device} {compute_dtype}: relative error when served wrongly: {wrong}")
    for name, err in wrong.items():
        assert err > 5 * tol, (name, err, tol)


@pytest.mark.parametrize("kernel", ["exact", "fused"])
def test_cpu_4bit_kernel_option_chooses_the_path(tiny_model_dir, kernel):
    """``--cpu-4bit-kernel exact`` (the default, what the parity test above serves with) turns bitsandbytes' fused
    AVX512-BF16 CPU kernel off on every 4-bit layer; ``fused`` leaves bitsandbytes' own choice for this CPU."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import has_avx512bf16

    from server.cli import build_parser, config_from_args
    from server.model.base import load_base_model

    args = build_parser().parse_args(["serve", "--model", str(tiny_model_dir), "--device", "cpu",
                                      "--cpu-4bit-kernel", kernel])
    cfg = config_from_args(args).model
    assert cfg.cpu_4bit_kernel == kernel
    model, _, _ = load_base_model(cfg)
    flags = {m.support_avx512bf16_for_cpu for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert flags == ({False} if kernel == "exact" else {bool(has_avx512bf16())})
