"""trainer.step_graph and the CUDA levers of trainer.fast against the eager PEFT step (CUDA only; skipped on CPU)."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs and Liger need a GPU"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]


def _nf4_peft(seed: int, levers: bool):
    """A small Llama (hidden 256, 2 blocks), NF4 + double quant in bf16, LoRA r=8 on every linear, checkpointed."""
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    from trainer import fast
    from trainer.train import prepare_for_qlora_training

    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=1024, max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(seed)
    sd = LlamaForCausalLM(cfg).to(torch.bfloat16).state_dict()
    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                            bnb_4bit_compute_dtype=torch.bfloat16)
    model = LlamaForCausalLM.from_pretrained(None, state_dict=sd, config=cfg, quantization_config=qc,
                                             dtype=torch.bfloat16, device_map={"": "cuda"})
    prepare_for_qlora_training(model, True, preserve_rng_state=False)
    torch.manual_seed(seed + 1)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    model.train()
    if levers:
        fast.apply_training_levers(model, torch.device("cuda"))
    return model


def _step(model, loss_fn, ids):
    loss = loss_fn(ids)
    loss.backward()
    value = loss.detach().clone()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return value, grads


def _close(a, b, what, rel: float = 2 ** -7):
    """Within ``rel`` of the largest value of ``b``."""
    scale = max(float(b.abs().max()), 1e-12)
    assert float((a - b).abs().max()) <= rel * scale, what


def test_levers_and_graph_replay_match_the_plain_peft_step():
    from trainer.fast import chunked_causal_lm_loss
    from trainer.step_graph import GraphedLoss

    ids = torch.randint(1, 1000, (2, 128), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    plain = _nf4_peft(0, levers=False)
    ref_loss, ref_grads = _step(plain, lambda x: plain(input_ids=x, labels=x).loss, ids)
    ours = _nf4_peft(0, levers=True)
    loss, grads = _step(ours, lambda x: chunked_causal_lm_loss(ours, {"input_ids": x, "labels": x}), ids)
    _close(loss, ref_loss, "eager loss")
    graph = GraphedLoss(ours, chunked_causal_lm_loss, ids)
    for _ in range(2):  # replays reuse the same static buffers
        g_loss, g_grads = _step(ours, lambda x: graph(x, x), ids)
        _close(g_loss, loss, "graph loss")
        for n in grads:
            _close(g_grads[n], grads[n], n)
    # Against PEFT's float32 LoRA math the fused path computes LoRA in bf16 (as bf16 autocast would): measured on
    # an H200, up to ~1 % of the largest gradient entry; a wrong scale or a missing term is off by 100 %.
    for n in ref_grads:
        _close(grads[n], ref_grads[n], n, rel=2 ** -5)
    other = torch.randint(1, 1000, (2, 128), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    assert float(graph(other, other)) != float(g_loss)  # the new batch is really read
    with pytest.raises(ValueError, match="shape"):
        graph(ids[:, :64], ids[:, :64])
