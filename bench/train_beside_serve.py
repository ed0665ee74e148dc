"""Serving latency with and without a concurrent training job on the same machine (CPU), and the job's pace.

    .venv/bin/python bench/train_beside_serve.py [--steps 6] [--requests 12] [--model smollm2] [--device cpu]
        [-- extra serve flags]

Starts the real server (``--model``, default the embedded SmolLM2-135M, NF4, on ``--device``), runs a fixed streaming load
(``bench/load_gen.py``: 2 concurrent streams, 32-word prompts, 32 new tokens, ``ignore_eos``) once with no job, then
starts a training job (the examples/extraction recipe: r 16, all linear layers, batch 8, max_seq_length 256, no
checkpointing, ``--steps`` steps) and, once its first step is done, runs the same load again while it trains.
Prints one JSON object: TPOT / TTFT p50 and p99 (client side, seconds) for both phases, their ratio, the job's
seconds per step (from its progress events, steps after the first), its threads and niceness, and its memory
budget / estimate / peak RSS (bytes) from the server's metrics.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench import load_gen  # noqa: E402
from server.rpc.gen.qlora_server.v1 import qlora_server_pb2 as pb  # noqa: E402
from server.rpc.gen.qlora_server.v1 import qlora_server_pb2_grpc as pbg  # noqa: E402
from tests.server_process import start_server  # noqa: E402


def _load(target: str, requests: int) -> dict:
    return load_gen.run(target, concurrency=2, requests=requests, prompt_tokens=32, new_tokens=32, vocab=100,
                        adapters=[])


def _metric(exposition: str, name: str, **labels: str) -> float | None:
    for line in exposition.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--requests", type=int, default=12, help="requests per phase")
    p.add_argument("--model", default="smollm2", help="the served base model (default: the embedded SmolLM2)")
    p.add_argument("--device", default="cpu", help="the server's device: cpu or cuda")
    p.add_argument("serve_flags", nargs="*", help="extra `serve` flags (after --)")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="train-beside-serve-"))
    server = start_server(args.model, work / "adapters", work / "server.log", *args.serve_flags, device=args.device)
    try:
        stubs = pbg.TrainingStub(server.channel())
        _load(server.target, 2)  # warm-up
        alone = _load(server.target, args.requests)
        config = pb.TrainingConfig(r=16, lora_alpha=32, lora_dropout=0.0, learning_rate=2e-4, batch_size=8,
                                   max_seq_length=256, max_steps=args.steps, eval_fraction=0.0, save_steps=1000,
                                   logging_steps=1, gradient_checkpointing=False, optim="paged_adamw_8bit", seed=0)
        job = stubs.CreateTrainingJob(pb.CreateTrainingJobRequest(
            adapter_id="bench-extract", dataset_path=str(REPO / "examples/extraction/train.jsonl"), config=config))
        while stubs.GetTrainingJob(pb.GetTrainingJobRequest(job_id=job.job_id)).step < 1:
            time.sleep(0.5)
        beside = _load(server.target, args.requests)
        step_during_load = stubs.GetTrainingJob(pb.GetTrainingJobRequest(job_id=job.job_id)).step
        while True:
            state = stubs.GetTrainingJob(pb.GetTrainingJobRequest(job_id=job.job_id))
            if state.state in (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED):
                break
            time.sleep(1.0)
        exposition = server.exposition()
        progress = [json.loads(line) for line in (Path(state.output_dir) / "progress.jsonl").read_text().splitlines()]
        steps = [r for r in progress if r.get("event") == "step"]
        per_step = ((steps[-1]["elapsed_seconds"] - steps[0]["elapsed_seconds"]) / (len(steps) - 1)
                    if len(steps) > 1 else None)
        started = progress[0]
        out = {"model": args.model, "device": args.device, "serve_flags": args.serve_flags, "job_state": pb.JobState.Name(state.state), "job_error": state.error,
               "job_steps": len(steps), "job_seconds_per_step": per_step, "steps_done_by_end_of_load": step_during_load,
               "job_threads": started.get("threads"), "job_nice": started.get("nice"),
               "job_memory": {k: _metric(exposition, "qlora_server_training_memory_bytes", job_id=job.job_id, kind=k)
                              for k in ("budget", "estimate", "peak")}}
        for key in ("tpot_p50_s", "tpot_p99_s", "ttft_p50_s", "ttft_p99_s", "output_tok_s"):
            out[f"alone_{key}"], out[f"beside_{key}"] = alone[key], beside[key]
        out["tpot_p50_ratio"] = beside["tpot_p50_s"] / alone["tpot_p50_s"]
        out["tpot_p99_ratio"] = beside["tpot_p99_s"] / alone["tpot_p99_s"]
        out["errors"] = alone["error_count"] + beside["error_count"]
        print(json.dumps(out, indent=1))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
