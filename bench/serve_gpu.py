"""Our engine vs the plain Hugging Face stack in one process on one GPU: decode speed, adapters, start-up, gRPC load.

    python bench/serve_gpu.py --out "$OUT"                    # Llama-3-8B shape, random bf16 weights -> NF4 (GPU)
    python bench/serve_gpu.py --out /tmp/sg --tiny            # 2 layers, hidden 256, vocab 1024: a CPU dry run
    options: --skip eager,compiled,peft,cb,decode,coldload,resident,grpc   --budget-s 525   --rounds 3

Stacks timed in alternating short rounds (the GPU host has slow phases), medians and p10 over rounds of each round's
TPOT: ours (``build_app`` + ``engine.submit``), HF ``generate`` eager (+ PEFT mixed-batch ``adapter_names``), HF
``generate`` with a static cache and its decode step compiled, and transformers' ``generate_batch``. Then the real
gRPC server in this process, driven by ``bench/load_gen.py`` in another process. Writes ``$OUT/serve_gpu.json``
after every section, so a partial run still leaves its numbers.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the GPU host reaches no hub: never wait on a lookup
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

NAME = "bench-llama-3-8b-random"  # base model id: adapters' base_model_name_or_path matches it
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SECTIONS = ("decode", "eager", "compiled", "peft", "coldload", "resident", "grpc", "cb")  # run in this order
#: Seconds a section needs on the 8B model (rough); it is skipped when less than that is left of --budget-s.
NEEDS = {"decode1": 150, "peft": 80, "coldload": 10, "resident": 45, "grpc": 120, "cb": 45}
GRPC_PEAK_REF = 157.0  # tok/s: the target's reference for 32 streams over 32 adapters


class Bench:
    """Holds the run's results, the time budget and the output file."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.t0, self.skipped = args, time.monotonic(), []
        self.res: dict = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "errors": {},
                          "skipped": self.skipped, "section_s": {}}

    def left(self) -> float:
        """Seconds left of the budget."""
        return self.args.budget_s - (time.monotonic() - self.t0)

    def wants(self, section: str, need_key: str | None = None) -> bool:
        """Whether to run ``section``: not in --skip and (on the full model) enough budget left for it."""
        if section in self.args.skip:
            self.skipped.append(f"{section} (--skip)")
            return False
        need = 0 if self.args.tiny else NEEDS.get(need_key or section, 0)
        if self.left() < need:
            self.skipped.append(f"{section} (budget: {self.left():.0f} s left, needs ~{need} s)")
            print(f"== skipping {section}: {self.left():.0f} s of budget left", flush=True)
            return False
        return True

    def guarded(self, name: str, fn, *a, **kw):
        """Run ``fn``; an exception is recorded under errors[name] and the run goes on (returns None)."""
        t = time.monotonic()
        try:
            return fn(*a, **kw)
        except Exception as exc:  # noqa: BLE001 - one failing stack must not end the benchmark
            import traceback
            self.res["errors"][name] = f"{type(exc).__name__}: {exc}"[:2000]
            print(f"== {name} FAILED: {type(exc).__name__}: {exc}", flush=True)
            traceback.print_exc()
        finally:
            self.res["section_s"][name] = round(time.monotonic() - t, 1)
            self.write()

    def write(self) -> None:
        self.args.out.mkdir(parents=True, exist_ok=True)
        (self.args.out / "serve_gpu.json").write_text(json.dumps(self.res, indent=1, default=str))


def summarize(samples: list[float], batch: int = 1) -> dict:
    """Median and p10 (seconds) of per-round TPOT samples, and ``batch / median`` tokens/s."""
    s = sorted(samples)
    med = statistics.median(s) if s else float("nan")
    return {"tpot_median_s": med, "tpot_p10_s": s[int(0.1 * (len(s) - 1))] if s else float("nan"),
            "tok_s": batch / med if s and med > 0 else float("nan"), "rounds": len(s), "samples_s": s}


# --- model, tokenizer, adapters ------------------------------------------------------------------------------------


def llama_config(tiny: bool):
    """Llama-3-8B's shape (or the tiny one), EOS = the last vocabulary id."""
    from transformers import LlamaConfig

    size = (dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024) if tiny else
            dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256))
    return LlamaConfig(**size, max_position_embeddings=2048, rope_parameters={"rope_type": "default",
                       "rope_theta": 500000.0}, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=None,
                       eos_token_id=size["vocab_size"] - 1, pad_token_id=0)


def make_tokenizer(vocab: int):
    """Word-level tokenizer over "t0".."t{vocab-1}" (whitespace split), so "t17 t4" is exactly 2 tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=f"t{vocab - 1}", pad_token="t0", unk_token="t0")


def prompts(n: int, tokens: int, vocab: int, seed: int) -> list[str]:
    """``n`` prompt texts of exactly ``tokens`` tokens (ids 1..vocab-2)."""
    rng = random.Random(seed)
    return [" ".join(f"t{rng.randrange(1, vocab - 1)}" for _ in range(tokens)) for _ in range(n)]


def make_models(args, device: str, compute: torch.dtype, timings: dict):
    """Random bf16 (CPU: float32) weights made on ``device``, quantized twice to NF4 + double quant through
    ``BitsAndBytesConfig``: one copy for the HF baselines, one for our app. ``--quantize memory`` passes the state
    dict to ``from_pretrained``; ``disk`` saves it first and loads the directory. Fills ``timings`` (seconds)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaForCausalLM

    t = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(llama_config(args.tiny), dtype=compute)
    sd = dict(model.state_dict())
    del model
    timings["random_init_s"] = time.perf_counter() - t
    source: dict = {"pretrained_model_name_or_path": None}
    if args.quantize == "disk":
        t = time.perf_counter()
        from safetensors.torch import save_file

        (args.work / "base").mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in sd.items()}, str(args.work / "base" / "model.safetensors"),
                  metadata={"format": "pt"})
        llama_config(args.tiny).save_pretrained(args.work / "base")
        sd = None
        source = {"pretrained_model_name_or_path": str(args.work / "base")}
        timings["save_s"] = time.perf_counter() - t
    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                            bnb_4bit_compute_dtype=compute, bnb_4bit_quant_storage=torch.uint8)
    copies = []
    for i in range(2):
        t = time.perf_counter()
        extra = {"state_dict": dict(sd), "config": llama_config(args.tiny)} if sd is not None else {}
        m = LlamaForCausalLM.from_pretrained(**source, **extra, quantization_config=qc, dtype=compute,
                                                 device_map={"": device}, attn_implementation="sdpa")
        m.eval().requires_grad_(False)
        m.config._name_or_path = NAME
        m.name_or_path = NAME
        copies.append(m)
        timings[f"quantize_{i}_s"] = time.perf_counter() - t
    del sd
    if device == "cuda":
        torch.cuda.empty_cache()
    return copies


def make_adapters(model, root: Path, names: list[str], dtype: torch.dtype) -> dict[str, Path]:
    """PEFT LoRA r=16, alpha 32 on all linear layers of ``model`` with random non-zero A and B (PEFT inits B to
    zero), one ``save_pretrained`` directory per name; ``model`` is returned to its plain state afterwards."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=ALL_LINEAR))
    params = [p for n, p in peft_model.named_parameters() if "lora_" in n]
    for p in params:
        p.data = p.data.to(dtype)
    dirs = {}
    with torch.no_grad():
        for i, name in enumerate(names):
            gen = torch.Generator(device=params[0].device).manual_seed(1000 + i)
            for p in params:
                p.copy_(torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype) * 0.01)
            peft_model.save_pretrained(root / name, save_embedding_layers=False)
            dirs[name] = root / name
    peft_model.unload()
    return dirs


# --- the stacks ----------------------------------------------------------------------------------------------------


def ours_round(app, texts: list[str], adapters: list[str], new_tokens: int) -> dict:
    """One batch through our engine: every request submitted at once; median TPOT / TTFT over rows (seconds)."""
    from server.engine.types import GenerationRequest, SamplingParams

    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    streams = [app.engine.submit(GenerationRequest("", adapter_id=a, prompt=p, params=params))
               for p, a in zip(texts, adapters)]
    results = [s.result() for s in streams]
    return {"tpot": statistics.median(r.timings.tpot_seconds for r in results),
            "ttft": statistics.median(r.timings.ttft_seconds for r in results),
            "tokens": sum(r.completion_tokens for r in results)}


def hf_round(model, ids: torch.Tensor, new_tokens: int, **kw) -> dict:
    """One ``generate`` call; TPOT = (last - first token time) / (tokens - 1) from a per-step stopping-criteria
    timestamp (seconds); ``wall`` is the whole call."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    stamps: list[float] = []

    class StepClock(StoppingCriteria):
        def __call__(self, input_ids, scores, **_):
            if input_ids.is_cuda:
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    t = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False,
                         stopping_criteria=StoppingCriteriaList([StepClock()]), **kw)
    wall = time.perf_counter() - t
    n = out.shape[1] - ids.shape[1]
    return {"tpot": (stamps[-1] - stamps[0]) / max(1, len(stamps) - 1), "wall": wall, "tokens": n * ids.shape[0]}


def compare(b: Bench, label: str, stacks: dict, batch: int, rounds: int) -> None:
    """Warm each stack once (the first call's wall time is kept: compile / capture), then ``rounds`` rounds that run
    every stack once in turn; results under ``decode[label][stack]``."""
    out = b.res.setdefault("decode", {}).setdefault(label, {})
    samples: dict[str, list[float]] = {k: [] for k in stacks}
    warm: dict[str, float] = {}
    for name, fn in stacks.items():
        t = time.perf_counter()
        if b.guarded(f"{label}/{name}/warmup", fn) is None:
            samples.pop(name)
        warm[name] = time.perf_counter() - t
    for r in range(rounds):
        if r and b.left() < 0:
            b.skipped.append(f"{label}: rounds after {r} (budget)")
            break
        for name in list(samples):
            got = b.guarded(f"{label}/{name}", stacks[name])
            if got is None:
                samples.pop(name)
                continue
            samples[name].append(got["tpot"])
            out.setdefault(name + "_raw", []).append(got)
    for name, s in samples.items():
        out[name] = summarize(s, batch) | {"first_call_s": warm[name]}
        print(f"{label:<28} {name:<14} TPOT median {1000 * out[name]['tpot_median_s']:8.2f} ms  p10 "
              f"{1000 * out[name]['tpot_p10_s']:8.2f} ms  {out[name]['tok_s']:9.1f} tok/s", flush=True)
    b.write()


def enable_compiled_decode(model) -> object:
    """Let ``generate`` compile its decode step (``get_compiled_call``) whenever the cache is a ``StaticCache``:
    transformers refuses by default because the bitsandbytes quantizer is marked not compileable. Returns the
    ``CompileConfig`` to pass (the same object every call, so the compiled call is reused)."""
    from transformers import CompileConfig

    model._valid_auto_compile_criteria = lambda model_kwargs, gen_cfg: (
        type(model_kwargs.get("past_key_values")).__name__ == "StaticCache")
    return CompileConfig(fullgraph=False, mode="reduce-overhead" if model.device.type == "cuda" else "default")


def continuous_batching(model, inputs: list[list[int]], new_tokens: int) -> dict:
    """transformers' ``generate_batch`` over all ``inputs`` at once, twice (the first includes its warm-up and graph
    capture); output tokens/s of the second (tokens / wall seconds)."""
    from transformers import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)
    kw = {}
    try:
        from transformers import ContinuousBatchingConfig
        kw["continuous_batching_config"] = ContinuousBatchingConfig(max_memory_percent=0.3)
    except ImportError:
        pass
    out = {}
    for run in ("first", "second"):
        t = time.perf_counter()
        res = model.generate_batch(inputs=inputs, generation_config=cfg, progress_bar=False, **kw)
        wall = time.perf_counter() - t
        tokens = sum(len(r.generated_tokens) for r in res.values())
        out[run] = {"wall_s": wall, "output_tokens": tokens, "output_tok_s": tokens / wall, "requests": len(res)}
    return out


# --- sections of our server ----------------------------------------------------------------------------------------


def build_ours(b: Bench, model, tokenizer, device: str, compute: torch.dtype):
    """``build_app`` over our NF4 copy; EngineConfig from a dict filtered by the fields this engine has."""
    from server.app import build_app
    from server.config import EngineConfig, ModelConfig, ServerConfig
    from server.errors import InvalidArgument
    from server.model.base import BaseModelInfo

    cfg = model.config
    kv_bytes = (64 * 1024 * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads
                * (cfg.hidden_size // cfg.num_attention_heads) * torch.finfo(compute).bits // 8)
    wanted = dict(max_batch_size=64, adapter_slots=64, max_lora_rank=16, max_total_tokens=1024, max_queue=1024,
                  cpu_adapter_cache=96, kv_cache_bytes=kv_bytes, prefill_tokens=b.args.prefill_tokens,
                  cuda_graphs=device == "cuda")
    names = {f.name for f in dataclasses.fields(EngineConfig)}
    engine_cfg = EngineConfig(**{k: v for k, v in wanted.items() if k in names})
    dtype = str(compute).removeprefix("torch.")
    try:
        model_cfg = ModelConfig(model=NAME, compute_dtype=dtype, device=device, lora_dtype="auto")
    except InvalidArgument:
        model_cfg = ModelConfig(model=NAME, compute_dtype=dtype, device=device, lora_dtype=dtype)
    config = ServerConfig(model=model_cfg, engine=engine_cfg, host="127.0.0.1", port=0, metrics_port=-1,
                          adapters_dir=b.args.work / "store", state_dir=b.args.work / "state")
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    info = BaseModelInfo(name=NAME, path=NAME, device=torch.device(device), weight_bytes=int(weight_bytes),
                         model_type="llama", max_positions=cfg.max_position_embeddings, compute_dtype=dtype,
                         compute_dtype_reason="serve_gpu bench")
    t = time.perf_counter()
    app = build_app(config, model=model, tokenizer=tokenizer, base_info=info)
    b.res["startup"] = {"build_app_s": time.perf_counter() - t, "engine_config": dataclasses.asdict(engine_cfg),
                        "engine_fields_missing": sorted(set(wanted) - names), "lora_dtype": model_cfg.lora_dtype}
    return app


def warm_and_count(app, ids: list[str], text: str) -> int:
    """One 1-token request per adapter, all at once; returns how many of ``ids`` are then in accelerator slots."""
    from server.engine.types import GenerationRequest, SamplingParams

    p = SamplingParams(max_new_tokens=1, ignore_eos=True)
    for s in [app.engine.submit(GenerationRequest("", adapter_id=a, prompt=text, params=p)) for a in ids]:
        s.result()
    return sum(app.adapter_cache.residency(a) == "gpu" for a in ids)


def cold_load(app, dirs: dict[str, Path], text: str) -> dict:
    """Register each adapter from its directory, then a 1-token request on it; milliseconds, medians; the adapters
    are unregistered afterwards."""
    from server.engine.types import GenerationRequest, SamplingParams

    rows = []
    for name, d in dirs.items():
        t0 = time.perf_counter()
        app.store.register(name, d, replace=True)
        t1 = time.perf_counter()
        r = app.engine.submit(GenerationRequest("", adapter_id=name, prompt=text, params=SamplingParams(
            max_new_tokens=1, ignore_eos=True))).result()
        t2 = time.perf_counter()
        rows.append({"register_ms": 1000 * (t1 - t0), "first_token_ms": 1000 * (t2 - t1),
                     "total_ms": 1000 * (t2 - t0), "engine_ttft_ms": 1000 * r.timings.ttft_seconds})
    for name in dirs:
        app.store.unregister(name)
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]} | {"runs": rows}


def grpc_load(b: Bench, app, vocab: int, ids: list[str]) -> None:
    """The real gRPC server on 127.0.0.1 over ``app``; ``load_gen.py`` in a child process per level, no adapters and
    one adapter per stream alternating at each concurrency level; results under ``grpc``."""
    from server.rpc.server import build_grpc_server

    out = b.res.setdefault("grpc", {})
    a = b.args
    out["resident_before"] = warm_and_count(app, ids[:max(a.concurrency)], "t1")
    server, port = build_grpc_server(app, "127.0.0.1", 0)
    server.start()
    try:
        for c in a.concurrency:
            for mode in ("none", "adapters"):
                if b.left() < 0:
                    b.skipped.append(f"grpc c{c} {mode} (budget)")
                    continue
                cmd = [sys.executable, str(REPO / "bench" / "load_gen.py"), "--target", f"127.0.0.1:{port}",
                       "--concurrency", str(c), "--requests", str(a.requests_per_stream * c), "--prompt-tokens",
                       str(a.grpc_prompt), "--new-tokens", str(a.grpc_new), "--vocab", str(vocab)]
                if mode == "adapters":
                    cmd += ["--adapters", ",".join(ids[:c])]
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
                if proc.returncode:
                    b.res["errors"][f"grpc/c{c}/{mode}"] = proc.stderr[-2000:]
                    continue
                r = out[f"c{c}_{mode}"] = json.loads(proc.stdout.strip().splitlines()[-1])
                print(f"grpc c={c:<3} {mode:<9} {r['output_tok_s']:9.1f} tok/s  TTFT p50/p99 {r['ttft_p50_s']:.3f}/"
                      f"{r['ttft_p99_s']:.3f} s  TPOT p50/p99 {1000 * r['tpot_p50_s']:.1f}/"
                      f"{1000 * r['tpot_p99_s']:.1f} ms  errors {r['error_count']}", flush=True)
                b.write()
    finally:
        server.stop(grace=2).wait()


# --- main ----------------------------------------------------------------------------------------------------------


def ratios(res: dict) -> dict:
    """The ratios the targets use (tokens/s over tokens/s unless named otherwise)."""
    d, g = res.get("decode", {}), res.get("grpc", {})

    def tok(label, stack):
        return d.get(label, {}).get(stack, {}).get("tok_s")

    def div(x, y):
        return x / y if x is not None and y else None

    step = res.get("resident", {})
    return {
        "b1_none_ours_over_compiled": div(tok("b1", "ours"), tok("b1", "hf_compiled")),
        "b1_none_ours_over_eager": div(tok("b1", "ours"), tok("b1", "hf_eager")),
        "b16_none_ours_over_compiled": div(tok("b16", "ours"), tok("b16", "hf_compiled")),
        "b16_4adapters_ours_over_peft_mixed": div(tok("b16_4adapters", "ours"), tok("b16_4adapters", "peft_mixed")),
        "b16_4adapters_over_b16_none_ours": div(tok("b16_4adapters", "ours"), tok("b16", "ours")),
        "grpc_c32_adapters_over_157": div(g.get("c32_adapters", {}).get("output_tok_s"), GRPC_PEAK_REF),
        "grpc_c32_adapters_over_c32_none": div(g.get("c32_adapters", {}).get("output_tok_s"),
                                               g.get("c32_none", {}).get("output_tok_s")),
        "grpc_c64_none_over_generate_batch": div(g.get("c64_none", {}).get("output_tok_s"),
                                                 res.get("cb", {}).get("second", {}).get("output_tok_s")),
        "step_64_resident_over_4_resident": div(step.get("resident_64", {}).get("tpot_median_s"),
                                                step.get("resident_4", {}).get("tpot_median_s")),
        "cold_load_ms": res.get("coldload", {}).get("total_ms"),
        "startup_s": res.get("startup", {}).get("startup_s"),
        "build_app_s": res.get("startup", {}).get("build_app_s"),
    }


def gib() -> float | None:
    """Accelerator memory allocated now (GiB); None on the CPU."""
    return torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else None


def decode_sections(b: Bench, app, hf, texts: list[str], ids: dict, dirs: dict, names: list[str]):
    """Ours vs HF eager / compiled-static at batch 1 and 16 (plain HF model), then ours vs PEFT mixed at batch 16
    over 4 adapters. Returns the HF model, plain again."""
    a = b.args
    mixed4 = [names[i % 4] for i in range(16)]

    def ours(bs, adapters):
        return lambda: ours_round(app, texts[:bs], adapters, a.new)

    if b.wants("decode", "decode1"):
        cc = enable_compiled_decode(hf)
        for bs in (1, 16):
            stacks = {"ours": ours(bs, [""] * bs), "ours_1adapter": ours(bs, ["a0"] * bs)}
            if "eager" not in a.skip:
                stacks["hf_eager"] = lambda bs=bs: hf_round(hf, ids[bs], a.new)
            if "compiled" not in a.skip:
                stacks["hf_compiled"] = lambda bs=bs: hf_round(hf, ids[bs], a.new, cache_implementation="static",
                                                               compile_config=cc)
            compare(b, f"b{bs}", stacks, bs, a.rounds)
            c = b.res["decode"][f"b{bs}"].get("hf_compiled")
            if c:  # the first call (compile + capture + one run) minus a steady call
                c["compile_s"] = c["first_call_s"] - statistics.median(
                    r["wall"] for r in b.res["decode"][f"b{bs}"]["hf_compiled_raw"])
    if "decode" in a.skip or not b.wants("peft"):
        return hf

    def peft_setup():
        from peft import PeftModel

        pm = PeftModel.from_pretrained(hf, dirs["a0"], adapter_name="a0")
        for n in names[1:4]:
            pm.load_adapter(dirs[n], adapter_name=n)
        return pm.eval()

    pm = b.guarded("peft/setup", peft_setup)
    stacks = {"ours": ours(16, mixed4)}
    if pm is not None:
        stacks["peft_mixed"] = lambda: hf_round(pm, ids[16], a.new, adapter_names=mixed4)
    compare(b, "b16_4adapters", stacks, 16, a.rounds)
    return pm.unload() if pm is not None else hf


def resident(b: Bench, app, texts: list[str], names: list[str], short: str) -> dict:
    """TPOT at batch 16 over 4 adapters with only those 4 resident, then after warming all 64 into slots."""
    mixed4 = [names[i % 4] for i in range(16)]

    def rounds(label):
        got = [b.guarded(label, ours_round, app, texts[:16], mixed4, b.args.new) for _ in range(b.args.rounds + 1)]
        return summarize([g["tpot"] for g in got[1:] if g], 16)

    res = {"resident_4": rounds("resident/4")}
    t = time.perf_counter()
    res["resident_after_warm"] = warm_and_count(app, names[4:] + names[:4], short)
    res["warm_64_s"] = time.perf_counter() - t
    res["resident_64"] = rounds("resident/64")
    return res


def print_table(res: dict) -> None:
    """The run's numbers as one plain table (the JSON has every sample)."""
    print("\n== decode (TPOT per round: median / p10 ms; tok/s = batch / median)")
    for label, stacks in res.get("decode", {}).items():
        for name, r in stacks.items():
            if not name.endswith("_raw"):
                extra = f"  compile {r['compile_s']:.1f} s" if "compile_s" in r else ""
                print(f"  {label:<14} {name:<14} {1000 * r['tpot_median_s']:8.2f} / {1000 * r['tpot_p10_s']:8.2f}"
                      f"  {r['tok_s']:9.1f} tok/s{extra}")
    for key in ("resident_4", "resident_64"):
        if r := res.get("resident", {}).get(key):
            print(f"  {key:<29} {1000 * r['tpot_median_s']:8.2f} / {1000 * r['tpot_p10_s']:8.2f}  "
                  f"{r['tok_s']:9.1f} tok/s")
    print("== gRPC (prompt / output tokens fixed; client-side times)")
    for key, r in res.get("grpc", {}).items():
        if isinstance(r, dict):
            print(f"  {key:<14} {r['output_tok_s']:9.1f} tok/s  TTFT p50/p99 {r['ttft_p50_s']:.3f}/"
                  f"{r['ttft_p99_s']:.3f} s  TPOT p50/p99 {1000 * r['tpot_p50_s']:.1f}/"
                  f"{1000 * r['tpot_p99_s']:.1f} ms  errors {r['error_count']}  short {r['short_outputs']}")
    if cb := res.get("cb"):
        print(f"== generate_batch, 64 requests: {cb['second']['output_tok_s']:.1f} tok/s "
              f"(first call incl. warm-up {cb['first']['wall_s']:.1f} s)")
    print("== ratios (tokens/s ours over theirs; step_64/4 is a TPOT ratio)")
    for k, v in res.get("ratios", {}).items():
        print(f"  {k:<40} {'n/a' if v is None else f'{v:.3f}'}")
    print(f"errors: {list(res['errors'])}\nskipped: {res['skipped']}\nelapsed {res.get('elapsed_s', 0):.0f} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--work", type=Path, default=Path("/tmp/serve-gpu"), help="adapters, store, state (wiped)")
    p.add_argument("--tiny", action="store_true", help="2 layers, hidden 256, vocab 1024, short runs (CPU dry run)")
    p.add_argument("--skip", type=lambda s: {x for x in s.split(",") if x}, default=set(),
                   help=f"sections to skip, comma-separated: {','.join(SECTIONS)} (decode = every decode "
                        "comparison, PEFT included)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="skip sections that no longer fit (seconds; default 525, with --tiny 3600)")
    p.add_argument("--rounds", type=int, default=3, help="measured rounds per comparison (after one warm-up)")
    p.add_argument("--prompt", type=int, default=128, help="decode comparisons: prompt tokens")
    p.add_argument("--new", type=int, default=64, help="decode comparisons: new tokens per request")
    p.add_argument("--grpc-prompt", type=int, default=512, help="gRPC and generate_batch: prompt tokens")
    p.add_argument("--grpc-new", type=int, default=128, help="gRPC and generate_batch: new tokens per request")
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32, 64])
    p.add_argument("--requests-per-stream", type=int, default=2)
    p.add_argument("--prefill-tokens", type=int, default=2048, help="EngineConfig.prefill_tokens, where it exists")
    p.add_argument("--quantize", choices=("memory", "disk"), default="memory",
                   help="NF4 from the random state dict in memory, or saved to --work and loaded from there")
    args = p.parse_args()
    if bad := args.skip - set(SECTIONS):
        p.error(f"--skip: unknown sections {sorted(bad)}; known: {', '.join(SECTIONS)}")
    if args.tiny:
        args.prompt, args.new, args.grpc_prompt, args.grpc_new = 16, 8, 32, 8
        args.requests_per_stream = 1
    if args.budget_s is None:
        args.budget_s = 3600.0 if args.tiny else 525.0
    import shutil

    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    b = Bench(args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    compute = torch.bfloat16 if device == "cuda" else torch.float32
    import bitsandbytes
    import peft
    import transformers

    b.res["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__,
                         "peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__,
                         "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu"}
    b.res["setup"] = setup = {"tiny": args.tiny, "quantize": args.quantize}
    print(json.dumps(b.res["versions"]), flush=True)

    t = time.perf_counter()
    hf, ours_model = make_models(args, device, compute, setup)
    setup["gib_after_models"] = gib()
    vocab = hf.config.vocab_size
    tokenizer = make_tokenizer(vocab)
    texts = prompts(16, args.prompt, vocab, seed=1)
    assert len(tokenizer(texts[0])["input_ids"]) == args.prompt
    hf.generation_config.eos_token_id, hf.generation_config.pad_token_id = None, 0
    t1 = time.perf_counter()
    names, cold = [f"a{i}" for i in range(64)], [f"cold{i}" for i in range(3)]
    dirs = make_adapters(hf, args.work / "adapters", names + cold, compute)
    setup["adapters_s"] = time.perf_counter() - t1
    setup["total_s"] = time.perf_counter() - t
    print(f"setup {setup['total_s']:.1f} s", flush=True)
    b.write()

    app = build_ours(b, ours_model, tokenizer, device, compute)
    b.res["startup"]["gib_after_build_app"] = gib()
    # "Start-up" = making our NF4 copy (from memory, or from disk with --quantize disk) + build_app (+ capture).
    b.res["startup"]["startup_s"] = setup["quantize_1_s"] + b.res["startup"]["build_app_s"]
    try:
        t = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda n: app.store.register(n, dirs[n], replace=True), names))
        b.res["startup"]["register_64_s"] = time.perf_counter() - t
        ids = {bs: tokenizer(texts[:bs], return_tensors="pt")["input_ids"].to(device) for bs in (1, 16)}
        hf = decode_sections(b, app, hf, texts, ids, dirs, names)
        short = texts[0][: texts[0].index(" ")]  # a 1-token prompt
        if b.wants("coldload"):
            b.res["coldload"] = b.guarded("coldload", cold_load, app, {n: dirs[n] for n in cold}, short)
        if b.wants("resident"):
            b.res["resident"] = b.guarded("resident", resident, b, app, texts, names, short)
        if b.wants("grpc"):
            b.guarded("grpc", grpc_load, b, app, vocab, names)
        if b.wants("cb"):
            cb_inputs = [tokenizer(x)["input_ids"] for x in prompts(64, args.grpc_prompt, vocab, seed=2)]
            b.res["cb"] = b.guarded("cb", continuous_batching, hf, cb_inputs, args.grpc_new)
    finally:
        b.res["ratios"] = ratios(b.res)
        b.res["elapsed_s"] = time.monotonic() - b.t0
        b.res["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
        b.write()
        app.close()
    print_table(b.res)
    print(f"wrote {args.out / 'serve_gpu.json'}")


if __name__ == "__main__":
    main()
