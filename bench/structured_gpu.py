"""What structured output costs per decode step: free rows vs grammar-constrained rows in one engine, one process.

    python bench/structured_gpu.py --model DIR [--device cuda] [--batch 16] [--tokens 128] [--rounds 5]
    python bench/structured_gpu.py --model DIR --shape llama-8b ...   # DIR's tokenizer, Llama-3-8B's body

``DIR`` is any supported model (the GPU runs use a SmolLM2-135M-shaped model with random weights: the smallest
step, so the grammar's host work weighs the most). ``--shape llama-8b`` instead serves random weights of
Llama-3-8B's shape (32 layers, hidden 4096; ``bench/serve_gpu.py``'s config) with the vocabulary of ``DIR``'s
tokenizer, quantized to NF4 + double quant in memory: the step of a realistic model. Each round submits ``--batch`` requests of one kind at once and
takes the median time per output token (TPOT) over its requests; kinds alternate round by round (the GPU host has
slow phases) and the result is the median and p10 of the round medians per kind:

* ``free``: no constraint, ``ignore_eos`` (every row generates ``--tokens`` tokens);
* ``json``: a JSON Schema object with one string of at most 4000 characters (the JSON grammar's lexer and parser);
* ``regex``: ``[a-z ]+`` (every step masks every row; its few lexer states have their masks cached);
* ``regex_counted``: ``[a-z ]{4000}``, the worst case: a counted repetition is a new lexer state at every token,
  so no mask is ever cached and each row's mask walks the whole vocabulary;
* ``mixed``: half free rows, half ``json`` rows.

With ``--plain`` the same rounds also time the plain Hugging Face stack on its own copy of the model:
``generate`` (greedy, dynamic cache) free (``hf_free``) and with the ``json`` schema (``hf_json``) through a
``LogitsProcessor`` that masks every row with the same llguidance matchers — how structured output is usually
added to plain transformers. Its TPOT is ``(t(N tokens) - t(1 token)) / (steps - 1)``, so prefill is left out
as in the engine's TPOT.

Prints one JSON line and writes it to ``--out`` when given.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SCHEMA = {"type": "object", "properties": {"story": {"type": "string", "maxLength": 4000}}, "required": ["story"],
          "additionalProperties": False}


def requests(kind: str, batch: int, tokens: int, round_no: int):
    """``batch`` greedy requests of ``kind`` (see the module docstring)."""
    from server.engine.types import GenerationRequest, ResponseFormat, SamplingParams

    regex = ResponseFormat("regex", "[a-z ]+")
    counted = ResponseFormat("regex", "[a-z ]{4000}")
    schema = ResponseFormat("json_schema", json.dumps(SCHEMA))
    out = []
    for i in range(batch):
        fmt = {"free": None, "regex": regex, "regex_counted": counted, "json": schema,
               "mixed": schema if i % 2 else None}[kind]
        params = SamplingParams(max_new_tokens=tokens, ignore_eos=True, response_format=fmt)
        out.append(GenerationRequest(request_id=f"{kind}-{round_no}-{i}", prompt=f"Tell story number {i}.",
                                     params=params))
    return out


def one_round(engine, kind: str, batch: int, tokens: int, round_no: int) -> tuple[float, int]:
    """(median TPOT in seconds, total generated tokens) of one round."""
    streams = [engine.submit(r) for r in requests(kind, batch, tokens, round_no)]
    results = [s.result() for s in streams]
    return statistics.median(r.timings.tpot_seconds for r in results), sum(r.completion_tokens for r in results)


def llama_8b(tokenizer_dir: str, device: str, copies: int = 1):
    """``(models, tokenizer, info)``: ``copies`` models, each random bf16 weights of Llama-3-8B's shape (the same
    seed) with ``tokenizer_dir``'s vocabulary, quantized to NF4 + double quant (bf16 compute) on ``device``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, LlamaForCausalLM

    from bench.serve_gpu import llama_config
    from server.model.base import BaseModelInfo

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = llama_config(False)
    cfg.vocab_size, cfg.eos_token_id, cfg.pad_token_id = len(tok), tok.eos_token_id, tok.pad_token_id or 0
    torch.manual_seed(0)
    with torch.device(device):
        sd = dict(AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).state_dict())
    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                            bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.uint8)
    models = [LlamaForCausalLM.from_pretrained(None, state_dict=dict(sd), config=cfg, quantization_config=qc,
                                               dtype=torch.bfloat16, device_map={"": device},
                                               attn_implementation="sdpa").eval().requires_grad_(False)
              for _ in range(copies)]
    del sd
    info = BaseModelInfo(name="bench-llama-3-8b-shape", path="bench-llama-3-8b-shape", device=torch.device(device),
                         weight_bytes=0, model_type="llama", max_positions=cfg.max_position_embeddings,
                         compute_dtype="bfloat16", compute_dtype_reason="structured_gpu bench")
    return models, tok, info


class GrammarProcessor:
    """A transformers ``LogitsProcessor``: each row's llguidance matcher consumes the row's last token, then the
    batch's allowed-token bitmask masks the scores (the plain stack's structured output, for comparison)."""

    def __init__(self, grammar, matchers, prompt_len: int, eos: int) -> None:
        self.grammar, self.matchers, self.prompt_len, self.eos = grammar, matchers, prompt_len, eos

    def __call__(self, input_ids, scores):
        from server.model.sampling import allowed_to_device, apply_allowed

        if input_ids.shape[1] > self.prompt_len:
            for m, token in zip(self.matchers, input_ids[:, -1].tolist()):  # a host sync, as any such processor
                if not m.is_stopped() and token != self.eos:
                    m.consume_token(token)
        mask, _ = self.grammar.bitmask(self.matchers)
        return apply_allowed(scores, allowed_to_device(mask, scores.device))


def hf_round(model, tok, grammar, kind: str, batch: int, tokens: int) -> tuple[float, int]:
    """(TPOT in seconds, generated tokens) of one plain-stack round (see the module docstring)."""
    import torch
    from transformers import LogitsProcessorList

    from server.engine.types import ResponseFormat

    enc = tok([f"Tell story number {i}." for i in range(batch)], return_tensors="pt", padding=True).to(model.device)
    prompt_len = enc["input_ids"].shape[1]

    def run(n: int) -> tuple[float, int]:
        procs = None
        if kind == "hf_json":
            fmt = ResponseFormat("json_schema", json.dumps(SCHEMA))
            procs = LogitsProcessorList([GrammarProcessor(grammar, [grammar.matcher(fmt) for _ in range(batch)],
                                                          prompt_len, tok.eos_token_id)])
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = model.generate(**enc, max_new_tokens=n, min_new_tokens=n if kind == "hf_free" else 0, do_sample=False,
                             logits_processor=procs, pad_token_id=tok.pad_token_id)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, out.shape[1] - prompt_len

    one, _ = run(1)
    whole, steps = run(tokens)
    return (whole - one) / max(1, steps - 1), steps * batch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--shape", choices=("model", "llama-8b"), default="model")
    p.add_argument("--plain", action="store_true", help="also time the plain HF stack (a second model copy)")
    args = p.parse_args()

    import tempfile

    import torch

    from server.app import build_app
    from server.config import EngineConfig, ModelConfig, ServerConfig

    work = Path(tempfile.mkdtemp())
    config = ServerConfig(model=ModelConfig(model=args.model, device=args.device),
                          engine=EngineConfig(max_batch_size=max(16, args.batch), max_total_tokens=512),
                          host="127.0.0.1", port=0, metrics_port=-1, adapters_dir=work / "store",
                          state_dir=work / "state")
    plain = None
    if args.shape == "model":
        app = build_app(config)
        if args.plain:
            from server.model.base import load_base_model

            plain, tok, _ = load_base_model(config.model)
    else:
        models, tok, info = llama_8b(args.model, args.device, 2 if args.plain else 1)
        app = build_app(config, models[0], tok, info)
        plain = models[1] if args.plain else None
    kinds = ("free", "json", "regex", "regex_counted", "mixed") + (("hf_free", "hf_json") if plain else ())
    samples: dict[str, list[float]] = {k: [] for k in kinds}
    tokens: dict[str, list[int]] = {k: [] for k in kinds}
    if plain is not None:
        tok.padding_side = "left"
        tok.pad_token = tok.pad_token or tok.eos_token

    def timed(kind: str, n: int, r: int) -> tuple[float, int]:
        if kind.startswith("hf_"):
            return hf_round(plain, tok, app.engine.grammar, kind, args.batch, n)
        return one_round(app.engine, kind, args.batch, n, r)

    try:
        for kind in kinds:  # warm-up: graphs, grammar compile and the llguidance tokenizer view
            timed(kind, 8, -1)
        for r in range(args.rounds):
            for kind in kinds:
                tpot, n = timed(kind, args.tokens, r)
                samples[kind].append(tpot)
                tokens[kind].append(n)
    finally:
        app.close()
    out = {"model": args.model, "device": args.device, "batch": args.batch, "tokens": args.tokens,
           "rounds": args.rounds, "gpu": torch.cuda.get_device_name() if args.device == "cuda" else "cpu"}
    free = statistics.median(samples["free"])
    for kind in kinds:
        s = sorted(samples[kind])
        out[kind] = {"tpot_ms_median": round(statistics.median(s) * 1e3, 3),
                     "tpot_ms_p10": round(s[int(0.1 * (len(s) - 1))] * 1e3, 3),
                     "vs_free": round(statistics.median(s) / free, 3), "tokens_per_round": tokens[kind]}
    line = json.dumps(out)
    print(line)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(line + "\n")


if __name__ == "__main__":
    main()
