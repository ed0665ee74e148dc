"""QLoRA training speed and memory: the plain stack vs our trainer's path, in one process, on one GPU.

    python bench/train_gpu.py --out "$OUT"                 # Llama-3-8B shape, random weights -> NF4 (GPU, < 9 min)
    python bench/train_gpu.py --out /tmp/tg --tiny         # 2 layers, hidden 256: a CPU dry run of the code
    options: --batches 1,4  --seq 2048  --steps 24  --rounds 4  --profile  --explore

Both stacks get the same NF4 + double-quant base (random bf16 weights made here with seed 0, quantized by
bitsandbytes through ``BitsAndBytesConfig``), LoRA r=16, alpha 32, dropout 0 on every linear layer of the blocks,
bitsandbytes' paged AdamW 8-bit (lr 2e-4 constant, grad-norm clip 0.3), and the same batches: synthetic sequences
of exactly ``--seq`` tokens drawn from 256 ids (learnable: the loss falls from ln(vocab) toward ln 256), every
token supervised. The only difference is how the step is computed:

* **plain**: ``peft.prepare_model_for_kbit_training`` (norms, embeddings, LM head up-cast to float32, gradient
  checkpointing), ``get_peft_model``, a bf16 autocast forward with transformers' loss — the common QLoRA recipe.
* **ours**: the trainer's own path (``trainer.train.prepare_for_qlora_training``: base kept in bf16, no autocast)
  plus ``trainer.fast``: fused LoRA forward, Liger RMSNorm/SwiGLU, fused linear cross-entropy, and checkpointing
  on the first k blocks (k = all at batch 1, chosen to fit the memory target; see ``--ckpt``).

Timing: the two stacks run in alternating rounds of ``--steps / --rounds`` optimizer steps (the GPU host has slow
phases), tokens/s per round, medians and p10 over rounds. Peak memory per stack = its resident tensors (weights,
quantization state, LoRA, optimizer state) + the largest rise of ``torch.cuda.max_memory_allocated`` within one
of its rounds. Loss curves: per-step losses of both stacks on the same batches (same seed for LoRA init); the bench
reports the largest per-step difference. Writes ``$OUT/train_gpu.json`` after every section.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SUBSET = 256  # synthetic tokens come from this many ids
LR = [2e-4]  # set from --lr before the stacks are built


def llama_config(tiny: bool, seq: int):
    """Llama-3-8B's shape (or a tiny one)."""
    from transformers import LlamaConfig

    size = (dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024) if tiny else
            dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256))
    return LlamaConfig(**size, max_position_embeddings=max(seq, 2048),
                       rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, rms_norm_eps=1e-5,
                       tie_word_embeddings=False, bos_token_id=None, eos_token_id=size["vocab_size"] - 1,
                       pad_token_id=0)


def quantized_copies(config, device: str, compute: torch.dtype, n: int) -> list:
    """``n`` copies of one random model (seed 0), each quantized to NF4 + double quant by bitsandbytes."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=compute)
    sd = dict(model.state_dict())
    del model
    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                            bnb_4bit_compute_dtype=compute, bnb_4bit_quant_storage=torch.uint8)
    out = []
    for _ in range(n):
        out.append(LlamaForCausalLM.from_pretrained(None, state_dict=dict(sd), config=config, quantization_config=qc,
                                                    dtype=compute, device_map={"": device},
                                                    attn_implementation="sdpa"))
    del sd
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def batches(n: int, batch: int, seq: int, vocab: int, seed: int, device: str) -> list[torch.Tensor]:
    """``n`` batches ``[batch, seq]`` int64 of ids drawn uniformly from a fixed random subset of 256 ids."""
    g = torch.Generator().manual_seed(seed)
    subset = torch.randperm(vocab - 2, generator=g)[:SUBSET] + 1
    return [subset[torch.randint(0, SUBSET, (batch, seq), generator=g)].to(device) for _ in range(n)]


class Stack:
    """One training stack: a PEFT model, its optimizer, and how a step computes the loss."""

    def __init__(self, name: str, model, loss_fn, autocast: bool, compute: torch.dtype, graph: bool = False,
                 ckpt: dict | None = None):
        import bitsandbytes as bnb

        self.name, self.model, self.loss_fn, self.autocast, self.compute = name, model, loss_fn, autocast, compute
        self.graph, self.graphed = graph, None
        self.ckpt = ckpt or {}
        self.device = next(model.parameters()).device.type
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        self.params = params
        self.opt = bnb.optim.PagedAdamW8bit(params, lr=LR[0], weight_decay=0.0)
        self.losses: list[float] = []
        self.tps: dict[int, list[float]] = {}
        self.peak: dict[int, int] = {}

    def step(self, ids: torch.Tensor) -> float:
        """One optimizer step on ``ids`` ``[B, T]`` (labels = ids); returns the loss (one host sync)."""
        if self.graphed is not None:
            loss = self.graphed(ids, ids)
        elif self.autocast:
            with torch.autocast(ids.device.type, dtype=self.compute):
                loss = self.loss_fn(self.model, {"input_ids": ids, "labels": ids})
        else:
            loss = self.loss_fn(self.model, {"input_ids": ids, "labels": ids})
        loss.backward()
        value = float(loss)  # read before the next replay overwrites the graph's output
        torch.nn.utils.clip_grad_norm_(self.params, 0.3)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return value

    def prepare(self, blocks: int, k: int, sample: torch.Tensor) -> int:
        """Checkpoint the first ``k`` of ``blocks`` decoder blocks; capture the step for ``sample``'s shape when
        this stack uses graphs. Returns the blocks checkpointed."""
        from trainer.fast import checkpoint_first_layers

        self.graphed = None
        if self.device == "cuda":
            torch.cuda.empty_cache()
        prepare_ckpt(self.model)
        k = checkpoint_first_layers(self.model, k)
        if self.graph:
            from trainer.step_graph import GraphedLoss

            self.graphed = GraphedLoss(self.model, self.loss_fn, sample)
        return k

    def resident_bytes(self) -> int:
        """Bytes of the model's parameters and buffers (4-bit weights at their packed size, with their
        quantization state) and the optimizer state, each storage counted once."""
        seen: dict[int, int] = {}

        def add(t):
            if isinstance(t, torch.Tensor) and t.device.type != "cpu":
                s = t.untyped_storage()
                seen[s.data_ptr()] = s.nbytes()

        for t in list(self.model.parameters()) + list(self.model.buffers()):
            add(t)
            qs = getattr(t, "quant_state", None)
            if qs is not None:
                for v in (qs.absmax, qs.code, getattr(qs, "offset", None)):
                    add(v)
                if qs.state2 is not None:
                    add(qs.state2.absmax)
                    add(qs.state2.code)
        for state in self.opt.state.values():
            for v in state.values():
                add(v)
        return sum(seen.values())


def plain_loss(model, inputs):
    return model(**inputs).loss


def make_plain(model, compute):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(1)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    return Stack("plain", model, plain_loss, autocast=True, compute=compute, ckpt={})


def make_ours(name: str, model, compute, device, graph: bool, ckpt: dict):
    from peft import get_peft_model

    from trainer import fast
    from trainer.config import TrainConfig
    from trainer.train import lora_config, prepare_for_qlora_training

    prepare_for_qlora_training(model, gradient_checkpointing=True)
    # A captured graph cannot read the RNG state; with no dropout, checkpointing has none to restore.
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False,
                                                                       "preserve_rng_state": False})
    torch.manual_seed(1)
    cfg = TrainConfig(dataset="x.jsonl", output_dir="/tmp/x", r=16, lora_alpha=32, lora_dropout=0.0)
    model = get_peft_model(model, lora_config(cfg))
    levers = {"fused_lora": fast.fuse_lora_forward(model), "chunked_loss": True, "cuda_graph": graph}
    reason = fast.liger_unavailable_reason(torch.device(device))
    if reason is None:
        levers.update(fast.apply_liger(model))
    else:
        levers["liger"] = reason
    stack = Stack(name, model, fast.chunked_causal_lm_loss, autocast=False, compute=compute,
                  graph=graph and device == "cuda", ckpt=ckpt)
    stack.levers = levers
    return stack


def run_round(stack: Stack, data: list[torch.Tensor], device: str) -> tuple[float, int]:
    """Steps over ``data``; returns (tokens/s, peak bytes above the round's start)."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for ids in data:
        stack.losses.append(stack.step(ids))
    if device == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    extra = (torch.cuda.max_memory_allocated() - base) if device == "cuda" else 0
    return sum(ids.numel() for ids in data) / dt, extra


def summarize(xs: list[float]) -> dict:
    xs = sorted(xs)
    return {"median": statistics.median(xs), "p10": xs[max(0, math.ceil(0.1 * len(xs)) - 1)], "n": len(xs)}


def profile_step(stack: Stack, ids: torch.Tensor, out: Path, device: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        stack.step(ids)
        if device == "cuda":
            torch.cuda.synchronize()
    key = "cuda_time_total" if device == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=60)
    (out / f"profile_{stack.name}_b{ids.shape[0]}.txt").write_text(table)
    print(f"--- profile {stack.name} b{ids.shape[0]}\n{table[:6000]}", flush=True)


def parse_ckpt(spec: str, blocks: int) -> dict[int, int]:
    """``"1:all,4:none"`` → ``{1: blocks, 4: 0}`` (blocks checkpointed per batch size)."""
    out = {}
    for item in spec.split(","):
        b, k = item.split(":")
        out[int(b)] = {"all": blocks, "none": 0}.get(k, None if k not in ("all", "none") else 0)
        if out[int(b)] is None:
            out[int(b)] = int(k)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=24, help="timed steps per stack and batch size")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--ours", default="ours=graph:1:all,4:none",
                    help="our stacks, ';'-separated NAME=graph|eager:CKPT (CKPT: batch:all|none|N,...)")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--lr", type=float, default=2e-4, help="constant learning rate (QLoRA's 2e-4 by default)")
    args = ap.parse_args()
    LR[0] = args.lr
    args.out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    compute = torch.bfloat16 if device == "cuda" else torch.float32
    config = llama_config(args.tiny, args.seq)
    blocks = config.num_hidden_layers
    specs = []
    for item in args.ours.split(";"):
        name, rest = item.split("=")
        mode, ckpt = rest.split(":", 1)
        specs.append((name, mode == "graph", parse_ckpt(ckpt, blocks)))
    res: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "seq": args.seq,
                 "model": "tiny" if args.tiny else "llama-3-8b-shape", "versions": versions(), "batches": {},
                 "command": " ".join(sys.argv)}

    def save():
        (args.out / "train_gpu.json").write_text(json.dumps(res, indent=2))

    t = time.perf_counter()
    models = quantized_copies(config, device, compute, 1 + len(specs))
    res["load_s"] = time.perf_counter() - t
    stacks = [make_plain(models[0], compute)]
    for (name, graph, ckpt), model in zip(specs, models[1:]):
        stacks.append(make_ours(name, model, compute, device, graph, ckpt))
    res["levers"] = {s.name: s.levers for s in stacks[1:]}
    per_round = max(1, args.steps // args.rounds)
    save()
    for b in [int(x) for x in args.batches.split(",")]:
        data = batches(args.rounds * per_round + 1, b, args.seq, config.vocab_size, seed=b, device=device)
        rec: dict = {}
        for s in stacks:
            s.graphed = None
        for s in stacks:
            rec[s.name] = {"tokens_per_s": [], "peak_bytes": 0}
            try:
                if device == "cuda":
                    torch.cuda.synchronize()
                    base = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                resident = s.resident_bytes()
                k = s.prepare(blocks, s.ckpt.get(b, blocks) if s.name != "plain" else blocks, data[0])
                s.losses = []
                s.step(data[0])  # warm-up (autotuning, optimizer state) on the same batch for every stack
                s.losses = []
                if device == "cuda":
                    torch.cuda.synchronize()
                    rec[s.name]["peak_bytes"] = resident + torch.cuda.max_memory_allocated() - base
                rec[s.name]["checkpointed_blocks"] = k
            except Exception as exc:  # noqa: BLE001 - a stack that cannot run is reported, the others go on
                rec[s.name]["error"] = f"{type(exc).__name__}: {exc}"
                print(f"b{b} {s.name}: {rec[s.name]['error']}", flush=True)
                s.graphed = None
        live = [s for s in stacks if "error" not in rec[s.name]]
        if args.profile:
            for s in live:
                profile_step(s, data[0], args.out, device)
        for r in range(args.rounds):
            chunk = data[1 + r * per_round: 1 + (r + 1) * per_round]
            order = live if r % 2 == 0 else live[::-1]
            for s in order:
                resident = s.resident_bytes()
                tps, extra = run_round(s, chunk, device)
                rec[s.name]["tokens_per_s"].append(tps)
                rec[s.name]["peak_bytes"] = max(rec[s.name]["peak_bytes"], resident + extra)
            print(f"b{b} round {r}: " + ", ".join(f"{s.name} {rec[s.name]['tokens_per_s'][-1]:.0f}" for s in live),
                  flush=True)
        plain = rec["plain"]
        for s in live:
            rec[s.name]["summary"] = summarize(rec[s.name]["tokens_per_s"])
            rec[s.name]["losses"] = s.losses
        for s in live[1:]:
            r_ = rec[s.name]
            diffs = [abs(a - c) for a, c in zip(stacks[0].losses, s.losses)]
            r_["loss_max_abs_diff"] = max(diffs) if diffs else None
            r_["speedup"] = r_["summary"]["median"] / plain["summary"]["median"]
            r_["memory_ratio"] = r_["peak_bytes"] / max(1, plain["peak_bytes"])
        res["batches"][str(b)] = rec
        save()
        for s in live:
            r_ = rec[s.name]
            extra = (f" | {r_['speedup']:.2f}x speed, {r_['memory_ratio']:.2f}x memory, loss |diff| max "
                     f"{r_['loss_max_abs_diff']:.4f}" if s is not live[0] else "")
            print(f"b{b} {s.name:12s} {r_['summary']['median']:7.0f} tok/s (p10 {r_['summary']['p10']:.0f}) "
                  f"peak {r_['peak_bytes'] / 2**30:6.2f} GiB, {r_['checkpointed_blocks']}/{blocks} blocks "
                  f"checkpointed{extra}", flush=True)
            print("   losses " + " ".join(f"{x:.3f}" for x in s.losses), flush=True)
        for s in stacks:
            s.graphed = None
        if device == "cuda":
            torch.cuda.empty_cache()
    save()


def prepare_ckpt(model) -> None:
    """Re-enable checkpointing on every block (``checkpoint_first_layers`` only turns blocks off)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    for m in model.modules():
        if isinstance(m, GradientCheckpointingLayer):
            m.gradient_checkpointing = True


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "transformers", "peft", "bitsandbytes", "liger-kernel", "triton"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


if __name__ == "__main__":
    main()
