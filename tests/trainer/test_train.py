"""End-to-end tests of trainer.train on a tiny random NF4 Llama: learning, guards, resume, output, PEFT round trips."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import learnable_rows, loss_fell, tiny_config, write_jsonl

from server.errors import AlreadyExists, Cancelled, FailedPrecondition
from trainer import fast
from trainer.adapter import inspect_adapter
from trainer.data import DataError
from trainer.train import (
    TrainingDiverged,
    TrainingSession,
    disable_cpu_weight_repacking,
    train,
)


def _adapter_tensors(adapter_dir):
    from safetensors.torch import load_file

    return load_file(str(adapter_dir / "adapter_model.safetensors"))


def _run_learn_check(cfg) -> bool:
    """Train and apply the does-it-learn check; a diverged run counts as not learning."""
    try:
        result = train(cfg)
    except TrainingDiverged:
        return False
    return loss_fell(result.loss_history)


# ---------------------------------------------------------------------------------------------------------------
# Does it learn (and is a broken recipe caught by the same check)?


def test_recipe_loss_falls_on_learnable_task(tiny_model_dir, learnable_data, tmp_path):
    events = []
    result = train(tiny_config(tiny_model_dir, learnable_data, tmp_path / "run"), on_progress=events.append)
    assert loss_fell(result.loss_history), result.loss_history
    assert result.steps == 30 and len(result.loss_history) == 30
    assert result.eval_loss is not None and result.eval_loss < 0.6 * result.loss_history[0]
    steps = [e for e in events if e["event"] == "step"]
    assert [e["step"] for e in steps] == list(range(1, 31))
    for e in steps:
        assert set(e) >= {"step", "total_steps", "loss", "eval_loss", "tokens_per_second", "learning_rate"}
        assert e["total_steps"] == 30 and e["tokens_per_second"] > 0 and e["learning_rate"] == pytest.approx(1e-2)
    assert any(e["event"] == "eval" and e["eval_loss"] == result.eval_loss for e in events)
    assert events[-1]["event"] == "done"


@pytest.mark.parametrize("broken", [{"learning_rate": 0.0}, {"learning_rate": 50.0, "max_grad_norm": 1e9}])
def test_learn_check_catches_broken_recipe(tiny_model_dir, learnable_data, tmp_path, broken):
    assert not _run_learn_check(tiny_config(tiny_model_dir, learnable_data, tmp_path / "run", **broken))


# ---------------------------------------------------------------------------------------------------------------
# Guards


def test_nan_loss_stops_with_clear_error_and_no_adapter(tiny_model_dir, learnable_data, tmp_path, monkeypatch):
    # The trainer's training loss is trainer.fast.chunked_causal_lm_loss (one call per micro-batch, here one per
    # step); poison it from the 4th step on.
    original = fast.chunked_causal_lm_loss
    calls = []

    def poisoned(model, inputs, num_items_in_batch=None):
        calls.append(1)
        out = original(model, inputs, num_items_in_batch)
        return out if len(calls) <= 3 else out * float("nan")

    monkeypatch.setattr(fast, "chunked_causal_lm_loss", poisoned)
    cfg = tiny_config(tiny_model_dir, learnable_data, tmp_path / "run", max_steps=10)
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 4"):
        train(cfg)
    assert not cfg.adapter_dir.exists()


def test_loss_stuck_at_zero_stops(tiny_model_dir, learnable_data, tmp_path, monkeypatch):
    original = fast.chunked_causal_lm_loss

    def zeroed(model, inputs, num_items_in_batch=None):
        return original(model, inputs, num_items_in_batch) * 0.0  # training loss exactly 0 (eval untouched)

    monkeypatch.setattr(fast, "chunked_causal_lm_loss", zeroed)
    cfg = tiny_config(tiny_model_dir, learnable_data, tmp_path / "run", max_steps=10, zero_loss_patience=3)
    with pytest.raises(TrainingDiverged, match="exactly 0 for 3 steps"):
        train(cfg)
    assert not cfg.adapter_dir.exists()


def test_huge_learning_rate_is_caught(tiny_model_dir, learnable_data, tmp_path):
    cfg = tiny_config(tiny_model_dir, learnable_data, tmp_path / "run", learning_rate=1e30, max_grad_norm=1e30,
                      max_steps=20)
    with pytest.raises(TrainingDiverged, match="loss is (nan|inf)"):
        train(cfg)


def test_bad_data_fails_before_the_model_is_loaded(tiny_model_dir, tmp_path, monkeypatch):
    import server.model.base

    def no_load(*a, **k):
        raise AssertionError("model loaded before the data was validated")

    monkeypatch.setattr(server.model.base, "load_base_model", no_load)
    data = write_jsonl(tmp_path / "d.jsonl", learnable_rows(20)[:10] + ["{oops"] + learnable_rows(5))
    with pytest.raises(DataError) as err:
        train(tiny_config(tiny_model_dir, data, tmp_path / "run"))
    assert err.value.errors[0][0] == 11


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints and resume


def test_resume_after_crash_matches_uninterrupted_run(tiny_model_dir, learnable_data, tmp_path):
    common = dict(max_steps=12, save_steps=4, lora_dropout=0.1, gradient_accumulation_steps=2, batch_size=4,
                  eval_steps=6)
    ref = train(tiny_config(tiny_model_dir, learnable_data, tmp_path / "ref", **common))

    cfg = tiny_config(tiny_model_dir, learnable_data, tmp_path / "crash", **common)

    def crash_at_10(ev):
        if ev["event"] == "step" and ev["step"] == 10:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg, on_progress=crash_at_10)
    assert not cfg.adapter_dir.exists()
    with pytest.raises(AlreadyExists):  # checkpoints exist: a fresh start would silently throw them away
        train(cfg)
    resumed = train(cfg, resume=True)
    assert resumed.resumed_from_step == 8 and resumed.steps == 12 and len(resumed.loss_history) == 4

    assert resumed.loss_history == pytest.approx(ref.loss_history[8:], rel=1e-6, abs=1e-7)
    assert resumed.train_loss == pytest.approx(ref.train_loss, rel=1e-6)
    assert resumed.eval_loss == pytest.approx(ref.eval_loss, rel=1e-6)
    a, b = _adapter_tensors(ref.adapter_dir), _adapter_tensors(resumed.adapter_dir)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-7, msg=k)
    assert any((a[k] != 0).any() for k in a if "lora_B" in k)  # it trained


def test_stop_request_checkpoints_and_resume_finishes(tiny_model_dir, learnable_data, tmp_path):
    ref = train(tiny_config(tiny_model_dir, learnable_data, tmp_path / "ref", max_steps=8, save_steps=100))
    cfg = tiny_config(tiny_model_dir, learnable_data, tmp_path / "stop", max_steps=8, save_steps=100)
    seen = []
    with pytest.raises(Cancelled, match="step 5"):
        train(cfg, on_progress=seen.append, should_stop=lambda: sum(e["event"] == "step" for e in seen) >= 5)
    assert all((cfg.checkpoint_dir / "checkpoint-5" / f).is_file()
               for f in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "adapter_model.safetensors"))
    resumed = train(cfg, resume=True)
    assert resumed.steps == 8 and resumed.resumed_from_step == 5
    a, b = _adapter_tensors(ref.adapter_dir), _adapter_tensors(resumed.adapter_dir)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-7, msg=k)


def test_resume_refuses_changed_settings_or_data(tiny_model_dir, learnable_data, tmp_path):
    cfg = tiny_config(tiny_model_dir, learnable_data, tmp_path / "run", max_steps=4, save_steps=2)
    seen = []
    with pytest.raises(Cancelled):  # after the first step, with a checkpoint
        train(cfg, on_progress=seen.append, should_stop=lambda: any(e["event"] == "step" for e in seen))
    with pytest.raises(FailedPrecondition) as err:
        train(cfg.replace(learning_rate=5e-3), resume=True)
    assert err.value.field == "learning_rate"
    write_jsonl(learnable_data, learnable_rows(128, seed=1))
    with pytest.raises(FailedPrecondition) as err:
        train(cfg, resume=True)
    assert err.value.field == "dataset"


# ---------------------------------------------------------------------------------------------------------------
# Output: atomic PEFT adapter directory, model card, round trips


def test_output_is_a_peft_adapter_with_same_logits_as_in_memory_model(tiny_model_dir, learnable_data, tmp_path):
    from peft import PeftModel

    from server.config import ModelConfig
    from server.model.base import load_base_model

    cfg = tiny_config(tiny_model_dir, learnable_data, tmp_path / "run", max_steps=6, use_rslora=True,
                      target_modules=("q_proj", "v_proj", "down_proj"))
    session = TrainingSession(cfg)
    result = session.run()
    assert sorted(p.name for p in result.adapter_dir.iterdir()) == \
        ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert not list(cfg.output_dir.glob(".adapter.tmp-*"))
    assert result.adapter_dir.stat().st_mode & 0o777 == 0o755  # readable by a server running as another user
    card = (result.adapter_dir / "README.md").read_text()
    assert result.data_sha256 in card and f"{result.train_loss:.4f}" in card and "use_rslora" in card
    served_dtype = str(session.model.get_base_model().model.norm.weight.dtype).removeprefix("torch.")
    assert f"| compute_dtype | {served_dtype} (auto: " in card  # the resolved dtype and why, not "auto"

    summary = inspect_adapter(result.adapter_dir)
    assert (summary.r, summary.lora_alpha, summary.use_rslora) == (8, 16.0, True)
    assert summary.scaling == pytest.approx(16 / math.sqrt(8))
    assert summary.target_modules == ("down_proj", "q_proj", "v_proj")
    assert summary.base_model == str(tiny_model_dir)

    ids = torch.tensor([[1, 33, 31, 17, 30, 98, 40, 41, 42, 2]])
    with torch.no_grad():
        mine = session.model(input_ids=ids).logits
    base, _, _ = load_base_model(ModelConfig(model=str(tiny_model_dir), device="cpu"))
    disable_cpu_weight_repacking(base)  # same matmul path as training (see trainer/NOTES.md)
    loaded = PeftModel.from_pretrained(base, str(result.adapter_dir)).eval()
    with torch.no_grad():
        theirs = loaded(input_ids=ids).logits
    torch.testing.assert_close(theirs, mine, rtol=0, atol=0)
    with torch.no_grad(), loaded.disable_adapter():
        assert not torch.equal(loaded(input_ids=ids).logits, mine)  # the adapter does something


def test_plain_peft_adapter_is_inspectable_and_trainable_from(tiny_model_dir, learnable_data, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    plain_dir = tmp_path / "plain"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"]))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    peft_model.save_pretrained(plain_dir)

    summary = inspect_adapter(plain_dir)
    assert (summary.r, summary.lora_alpha, summary.target_modules) == (4, 8.0, ("o_proj", "q_proj"))
    assert summary.num_parameters == sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)

    # lr 0: the trainer starts from exactly these weights and writes them back unchanged
    cfg = tiny_config(tiny_model_dir, learnable_data, tmp_path / "run", max_steps=2, learning_rate=0.0,
                      init_adapter=plain_dir)
    result = train(cfg)
    a, b = _adapter_tensors(plain_dir), _adapter_tensors(result.adapter_dir)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
    assert inspect_adapter(result.adapter_dir).r == 4


def test_failed_write_leaves_no_adapter(tiny_model_dir, learnable_data, tmp_path, monkeypatch):
    from peft import PeftModel

    def broken_save(self, save_directory, **kwargs):
        (Path(save_directory) / "adapter_config.json").write_text("{}")  # half written, then the disk fills
        raise OSError("disk full")

    monkeypatch.setattr(PeftModel, "save_pretrained", broken_save)
    cfg = tiny_config(tiny_model_dir, learnable_data, tmp_path / "run", max_steps=2)
    with pytest.raises(OSError, match="disk full"):
        train(cfg)
    assert not cfg.adapter_dir.exists()
    assert not [p for p in cfg.output_dir.iterdir() if p.name.startswith(".adapter")]


def test_finished_run_is_not_overwritten(tiny_model_dir, learnable_data, tmp_path):
    cfg = tiny_config(tiny_model_dir, learnable_data, tmp_path / "run", max_steps=2)
    train(cfg)
    with pytest.raises(AlreadyExists):
        train(cfg, resume=True)


# ---------------------------------------------------------------------------------------------------------------
# bitsandbytes CPU repacking hazard (why disable_cpu_weight_repacking exists)


def test_eval_pass_does_not_cut_gradients_through_base_layers(tiny_model_dir):
    """After a no-grad eval pass, training must still backpropagate through every Linear4bit."""
    import bitsandbytes as bnb

    from server.config import ModelConfig
    from server.model.base import load_base_model
    from trainer.train import prepare_for_qlora_training

    model, _, _ = load_base_model(ModelConfig(model=str(tiny_model_dir), device="cpu"))
    prepare_for_qlora_training(model, gradient_checkpointing=False)
    ids = torch.tensor([[1, 20, 21, 22, 23, 2]])

    def input_grad():
        model.train()
        emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        model(inputs_embeds=emb).logits.float().square().sum().backward()
        return emb.grad

    before = input_grad()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False)
                   for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    torch.testing.assert_close(input_grad(), before, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# Model preparation and optimizer


def test_preparation_keeps_served_dtypes_and_uses_non_reentrant_checkpointing(tiny_model_dir):
    import bitsandbytes as bnb
    from peft import get_peft_model

    from server.config import ModelConfig
    from server.model.base import load_base_model
    from trainer.config import TrainConfig
    from trainer.train import lora_config, prepare_for_qlora_training

    # bfloat16 explicitly (not "auto", which is float32 on CPUs without native bf16): the up-cast this guards against
    # only shows in a 16-bit model.
    model, _, _ = load_base_model(ModelConfig(model=str(tiny_model_dir), device="cpu", compute_dtype="bfloat16"))
    served = {n: p.dtype for n, p in model.named_parameters()}
    prepare_for_qlora_training(model, gradient_checkpointing=True)
    assert {n: p.dtype for n, p in model.named_parameters()} == served  # no float32 up-cast of norms/embeddings
    assert model.model.norm.weight.dtype == torch.bfloat16
    assert not any(p.requires_grad for p in model.parameters())
    layer = model.model.layers[0]
    assert layer.gradient_checkpointing and layer._gradient_checkpointing_func.keywords["use_reentrant"] is False
    assert all(not m.support_avx512bf16_for_cpu for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))

    cfg = TrainConfig(model=str(tiny_model_dir), dataset=Path("d.jsonl"), output_dir=Path("o"), r=4)
    peft_model = get_peft_model(model, lora_config(cfg))
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and p.dtype == torch.float32 for n, p in trainable.items())
    targeted = {n.split(".")[-4] for n in trainable}  # ...q_proj.lora_A.default.weight
    assert targeted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}  # not lm_head


@pytest.mark.parametrize("optim,state_dtype", [("paged_adamw_8bit", torch.uint8), ("paged_adamw_32bit", torch.float32)])
def test_bitsandbytes_paged_adamw_8_and_32_bit(tiny_model_dir, learnable_data, tmp_path, optim, state_dtype):
    import bitsandbytes as bnb

    session = TrainingSession(tiny_config(tiny_model_dir, learnable_data, tmp_path / "run", max_steps=2, optim=optim,
                                          r=64))
    session.run()
    opt = session.trainer.optimizer.optimizer  # accelerate wraps the bitsandbytes optimizer
    assert isinstance(opt, bnb.optim.optimizer.Optimizer8bit)
    states = [s["state1"] for s in opt.state.values() if "state1" in s]
    assert states and any(s.dtype == state_dtype for s in states)


# ---------------------------------------------------------------------------------------------------------------
# Progress a person can see: phases, bounded evaluation with progress, the CPU optimizer note


@pytest.mark.parametrize("cap,batch", [(5, 2), (3, 8)])
def test_evaluation_is_bounded_and_reports_progress_in_phases(tiny_model_dir, learnable_data, tmp_path, cap, batch):
    events = []
    cfg = tiny_config(tiny_model_dir, learnable_data, tmp_path / "run", max_steps=2, eval_fraction=0.5,
                      eval_max_examples=cap, batch_size=batch)  # 64 examples held out, `cap` evaluated
    result = train(cfg, on_progress=events.append)
    phases = [e["phase"] for e in events if e["event"] == "phase"]
    assert phases == ["loading", "training", "evaluating", "saving"]
    assert all(e["phase"] == "training" for e in events if e["event"] == "step")
    progress = [(e["eval_examples_done"], e["eval_examples_total"]) for e in events if e["event"] == "eval_progress"]
    expected = [min(cap, k * batch) for k in range(1, -(-cap // batch) + 1)]
    assert progress == [(n, cap) for n in expected]
    assert all(e["phase"] == "evaluating" for e in events if e["event"] == "eval_progress")
    assert f"| eval examples | {cap} |" in (result.adapter_dir / "README.md").read_text()
    assert result.eval_loss is not None


def test_eval_between_steps_returns_to_training(tiny_model_dir, learnable_data, tmp_path):
    events = []
    train(tiny_config(tiny_model_dir, learnable_data, tmp_path / "run", max_steps=4, eval_steps=2,
                      eval_max_examples=4), on_progress=events.append)
    phases = [e["phase"] for e in events if e["event"] == "phase"]
    # evaluations at steps 2 and 4 happen inside the training loop, which resumes (and ends) after each
    assert phases == ["loading", "training", "evaluating", "training", "evaluating", "training", "saving"]


def test_cpu_training_says_once_that_paged_adamw_is_not_paged(tiny_model_dir, learnable_data, tmp_path, caplog,
                                                              recwarn):
    caplog.set_level("INFO", logger="trainer.train")
    train(tiny_config(tiny_model_dir, learnable_data, tmp_path / "run", max_steps=2, device="cpu",
                      optim="paged_adamw_8bit"))
    notes = [r.getMessage() for r in caplog.records if "pages optimizer state only on CUDA" in r.getMessage()]
    assert notes == ["optimizer paged_adamw_8bit: bitsandbytes pages optimizer state only on CUDA; on the CPU it "
                     "keeps ordinary (non-paged) 8-bit state"]
    assert not [w for w in recwarn if "Paged optimizers are not supported on CPU" in str(w.message)]


# ---------------------------------------------------------------------------------------------------------------
# Files and metadata usable by others


def _modes(root: Path) -> dict[str, int]:
    import stat

    return {str(p.relative_to(root)): stat.S_IMODE(p.lstat().st_mode) for p in [root, *root.rglob("*")]}


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o027])
def test_adapter_and_checkpoints_get_the_umask_modes(tiny_model_dir, learnable_data, tmp_path, umask):
    import os

    cfg = tiny_config(tiny_model_dir, learnable_data, tmp_path / "run", max_steps=4, save_steps=2)
    previous = os.umask(umask)
    try:
        train(cfg)
    finally:
        os.umask(previous)
    modes = _modes(cfg.output_dir)
    assert any(k.startswith("checkpoints/checkpoint-4/") for k in modes) and "adapter" in modes
    assert any(k.endswith("adapter_model.safetensors") for k in modes)
    wrong = {k: oct(m) for k, m in modes.items()
             if m != ((0o777 if (cfg.output_dir / k).is_dir() else 0o666) & ~umask)}
    assert wrong == {}, f"umask {oct(umask)}"


def test_adapter_names_the_model_asked_for_not_the_path_it_was_loaded_from(tiny_model_dir, learnable_data, tmp_path,
                                                                           monkeypatch):
    """The embedded model is loaded from its converted copy in the cache but named by its hub id: every adapter the
    run writes (checkpoints included) must carry the hub id, and the server's check must accept it."""
    from types import SimpleNamespace

    import server.model.base as base_mod
    from server.adapters.validation import check_config
    from server.errors import InvalidArgument

    hub_id = "HuggingFaceTB/SmolLM2-135M-Instruct"
    # As resolve_source does for "smollm2": load from a local copy, name the hub id (the tiny model stands in).
    monkeypatch.setattr(base_mod, "resolve_source", lambda cfg: (str(tiny_model_dir), hub_id))
    # Naming a hub id must not make saving ask the hub anything (PEFT's "auto" embedding check would, at every
    # checkpoint): no network here, and a slow one would stall each save.
    import peft.utils.save_and_load as peft_save

    hub_lookups = []
    monkeypatch.setattr(peft_save, "check_file_exists_on_hf_hub", lambda *a, **k: hub_lookups.append(a))
    cfg = tiny_config(tiny_model_dir, learnable_data, tmp_path / "run", max_steps=4, save_steps=2, model="smollm2")
    result = train(cfg)
    assert hub_lookups == []
    configs = sorted(cfg.output_dir.rglob("adapter_config.json"))
    assert len(configs) == 3  # checkpoint-2, checkpoint-4, adapter
    for path in configs:
        adapter_cfg = json.loads(path.read_text())
        assert adapter_cfg["base_model_name_or_path"] == hub_id, path
        check_config(adapter_cfg, SimpleNamespace(name=hub_id))  # what the server reports for the embedded model
        with pytest.raises(InvalidArgument):
            check_config(adapter_cfg, SimpleNamespace(name="/models/another-model"))
    for path in cfg.output_dir.rglob("*"):  # no file names the local load path (model cards included)
        if path.is_file() and path.suffix in (".json", ".md"):
            assert str(tiny_model_dir) not in path.read_text(), path
    assert f"base_model: {hub_id}" in (result.adapter_dir / "README.md").read_text()
