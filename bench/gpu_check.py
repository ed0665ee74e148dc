"""One accelerator run: oracle vs PEFT on the device, the real server with mixed adapters, metrics, decode timings.

Usage (the GPU machine has no hub access and no SmolLM2 weights, so the base model is random weights in a real
model's shape — SmolLM2-135M by default, from config + tokenizer files carried in ``--config-dir``):

    python bench/gpu_check.py --config-dir .gpu/smollm2 --out "$OUT"

Prints a summary and writes ``metrics.txt`` (the server's exposition after traffic) and ``summary.json``.
Runs on the CPU too (slowly) for a dry run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import threading
import time
import urllib.request
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {
    "r8-attn": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "r16-all": dict(r=16, lora_alpha=32, target_modules=ALL_LINEAR),
    "r64-mlp": dict(r=64, lora_alpha=64, use_rslora=True, target_modules=["gate_proj", "up_proj", "down_proj"],
                    rank_pattern={"down_proj": 32}),
}


def make_base(config_dir: Path, out: Path, layers: int | None) -> Path:
    """Random bf16 weights in the shape of ``config_dir``'s model, saved with its tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if (out / "config.json").exists():
        return out
    config = AutoConfig.from_pretrained(config_dir)
    if layers:
        config.num_hidden_layers = layers
    torch.manual_seed(0)
    # Initialise on the accelerator when there is one: an 8B model's random init takes minutes on the CPU.
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    del model
    for f in config_dir.iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "special_tokens", "generation_config")):
            shutil.copy(f, out / f.name)
    return out


def make_adapters(base: Path, root: Path) -> dict[str, Path]:
    """PEFT adapters with random (non-zero) A and B, saved as PEFT saves them."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dirs = {}
    for i, (name, kw) in enumerate(ADAPTERS.items()):
        out = root / name
        dirs[name] = out
        if (out / "adapter_config.json").exists():
            continue
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16, device_map={"": device})
        peft_model = get_peft_model(model, LoraConfig(**kw))
        gen = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for pname, p in peft_model.named_parameters():
                if "lora_" in pname:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        peft_model.save_pretrained(out)
        del model, peft_model
    return dirs


def load_nf4(base: Path, device: str):
    from transformers import AutoModelForCausalLM

    from server.config import ModelConfig
    from server.model.base import quantization_config

    return AutoModelForCausalLM.from_pretrained(
        base, quantization_config=quantization_config(ModelConfig(model=str(base)), "bfloat16"), dtype=torch.bfloat16,
        device_map={"": device}, attn_implementation="sdpa").eval().requires_grad_(False)


def oracle(base: Path, dirs: dict[str, Path], device: str) -> dict:
    """Mixed batch through our LoRA banks vs PeftModel per adapter, on ``device``; max |logit error|."""
    from peft import PeftModel

    from server.adapters.types import BaseModelSpec
    from server.adapters.validation import validate_adapter_dir
    from server.engine import batch as kv
    from server.model.lora import attach_router

    model = load_nf4(base, device)
    router = attach_router(model, 4, 64, torch.float32, 8)
    spec = BaseModelSpec.from_model(model, str(base), 64)
    slots = {}
    for s, (name, d) in enumerate(dirs.items()):
        router.load(s, validate_adapter_dir(d, spec))
        slots[name] = s
    rows = [None, *dirs, None]
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(5, 1000, (n,), generator=gen).tolist() for n in (9, 17, 5, 12, 7)]
    forced = [torch.randint(5, 1000, (3,), generator=gen).tolist() for _ in rows]
    ours = [[] for _ in rows]
    state = None
    for b, ids in enumerate(prompts):
        router.set_rows([slots.get(rows[b], -1)])
        one, logits = kv.prefill(model, [ids])
        ours[b].append(logits[0].float())
        state = kv.concatenate(state, one)
    for step in range(3):
        router.set_rows([slots.get(r, -1) for r in rows])
        logits = kv.decode(model, state, [f[step] for f in forced])
        for b in range(len(rows)):
            ours[b].append(logits[b].float())
    del model, router, state
    worst, rel, effect = 0.0, 0.0, float("inf")
    plain = load_nf4(base, device)
    for b, name in enumerate(rows):
        ref_model = plain if name is None else PeftModel.from_pretrained(load_nf4(base, device), dirs[name]).eval()
        for step in range(4):
            ids = torch.tensor([prompts[b] + forced[b][:step]], device=device)
            with torch.inference_mode():
                ref = ref_model(input_ids=ids).logits[0, -1].float()
                if name is not None and step == 0:
                    effect = min(effect, (plain(input_ids=ids).logits[0, -1].float() - ref).abs().max().item())
            err = (ours[b][step] - ref).abs().max().item()
            worst = max(worst, err)
            rel = max(rel, err / ref.abs().max().item())
        if name is not None:
            del ref_model
    return {"oracle_max_abs_err": worst, "oracle_max_rel_err": rel, "smallest_adapter_effect": effect}


def serve_and_query(base: Path, dirs: dict[str, Path], work: Path, device: str, out: Path,
                    concurrency: list[int]) -> dict:
    """Start ``qlora-server serve`` as a subprocess, register the adapters, generate with a mixed batch over
    gRPC, and read the metrics endpoint."""
    import grpc

    from server.rpc.gen.qlora_server.v1 import qlora_server_pb2 as pb
    from server.rpc.gen.qlora_server.v1 import qlora_server_pb2_grpc as pbg

    from bench.serve_bench import run as load_test
    from tests.server_process import start_server

    server = start_server(str(base), work / "store", work / "server.log", "--max-lora-rank", "64", device=device)
    port, mport = server.port, server.metrics_port
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        adapters = pbg.AdaptersStub(channel)
        gen = pbg.GenerationStub(channel)
        for name, d in dirs.items():
            adapters.RegisterAdapter(pb.RegisterAdapterRequest(adapter_id=name, path=str(d), replace=True))
        answers = {}

        def ask(i: int, adapter: str) -> None:
            r = gen.Generate(pb.GenerateRequest(adapter_id=adapter, prompt=f"Question {i}: say something.",
                                                max_new_tokens=24))
            answers[(i, adapter)] = (r.text, r.completion_tokens, r.timings.ttft_seconds, r.timings.tpot_seconds)

        threads = [threading.Thread(target=ask, args=(i, a)) for i in range(2) for a in ["", *dirs]]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        listing = adapters.ListAdapters(pb.ListAdaptersRequest())
        time.sleep(1.5)  # one memory-sampler period
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics").read().decode()
        (out / "metrics.txt").write_text(metrics)
        memory = [l for l in metrics.splitlines()
                  if l.startswith(("qlora_server_accelerator_memory_bytes", "qlora_server_component_memory_bytes",
                                   "qlora_server_adapters_resident", "qlora_server_adapter_loads_total"))]
        return {
            "answers": {f"{a or 'base'}#{i}": v for (i, a), v in sorted(answers.items())},
            "distinct_texts_for_prompt0": len({v[0] for (i, _), v in answers.items() if i == 0}),
            "residency": {a.adapter_id: pb.Residency.Name(a.residency) for a in listing.adapters},
            "memory_metrics": memory,
            "load": [load_test(f"127.0.0.1:{port}", list(dirs), requests=4 * c, concurrency=c, max_new_tokens=64)
                     for c in concurrency],
        }
    finally:
        server.stop()


def decode_timings(base: Path, dirs: dict[str, Path], device: str, steps: int) -> list[dict]:
    """Median decode-step time (ms) at several batch sizes, all rows on the base model vs all on adapters."""
    from server.adapters.types import BaseModelSpec
    from server.adapters.validation import validate_adapter_dir
    from server.engine import batch as kv
    from server.model.lora import attach_router

    model = load_nf4(base, device)
    router = attach_router(model, 4, 64, torch.bfloat16 if device != "cpu" else torch.float32, 32)
    spec = BaseModelSpec.from_model(model, str(base), 64)
    for s, d in enumerate(dirs.values()):
        router.load(s, validate_adapter_dir(d, spec))
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    rows = []
    if device.startswith("cuda"):
        print(f"resident after load: {torch.cuda.memory_allocated() / 2**30:.2f} GiB "
              f"(adapter banks {router.bank_bytes() / 2**30:.2f} GiB)", flush=True)
    for bs in (1, 8, 16, 32):
        for mode in ("base", "mixed-adapters", "base-again"):
            state = None
            for b in range(bs):
                slot = -1 if mode.startswith("base") else b % len(dirs)
                router.set_rows([slot])
                one, _ = kv.prefill(model, [list(range(10, 10 + 64))])
                state = kv.concatenate(state, one)
            slots = [-1 if mode.startswith("base") else b % len(dirs) for b in range(bs)]
            times = []
            for i in range(steps):
                router.set_rows(slots)
                sync()
                t = time.perf_counter()
                logits = kv.decode(model, state, [11] * bs)
                logits.argmax(-1).tolist()  # the engine's one host sync per step
                times.append(time.perf_counter() - t)
            times.sort()
            rows.append({"batch": bs, "mode": mode, "median_ms": 1000 * times[len(times) // 2],
                         "tokens_per_s": bs / times[len(times) // 2]})
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config-dir", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--work", type=Path, default=Path("/tmp/gpu-check"))
    p.add_argument("--layers", type=int, default=0, help="override num_hidden_layers (0 = keep)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--no-oracle", action="store_true")
    p.add_argument("--no-server", action="store_true")
    p.add_argument("--concurrency", default="1,8,32", help="load-test concurrency levels against the server")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
               "torch": torch.__version__}
    import transformers
    summary["transformers"] = transformers.__version__
    t = time.time()
    base = make_base(args.config_dir, args.work / "model", args.layers or None)
    dirs = make_adapters(base, args.work / "adapters")
    summary["setup_s"] = round(time.time() - t, 1)
    if not args.no_oracle:
        summary.update(oracle(base, dirs, device))
    print(json.dumps({k: v for k, v in summary.items()}, indent=1), flush=True)
    if not args.no_server:
        levels = [int(c) for c in args.concurrency.split(",") if c]
        summary["server"] = serve_and_query(base, dirs, args.work, device, args.out, levels)
        print(json.dumps(summary["server"], indent=1), flush=True)
    summary["decode"] = decode_timings(base, dirs, device, args.steps)
    for row in summary["decode"]:
        print(f"batch {row['batch']:>3} {row['mode']:<15} {row['median_ms']:8.2f} ms/step "
              f"{row['tokens_per_s']:9.1f} tok/s", flush=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
