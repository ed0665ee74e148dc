"""README's table of server limits names every limit with the value the code has."""

from __future__ import annotations

from pathlib import Path

from server.config import EngineConfig, ServerConfig
from server.rpc.convert import MAX_REQUEST_ID_LENGTH
from server.rpc.server import MAX_RECEIVE_MESSAGE_BYTES

README = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")


def test_every_server_limit_is_in_the_readme():
    engine, server = EngineConfig(), ServerConfig()
    expected = [
        f"`EngineConfig.max_new_tokens` ({engine.max_new_tokens})",
        "`EngineConfig.max_total_tokens`",
        f"{engine.max_queue} waiting requests (`EngineConfig.max_queue`)",
        f"{engine.max_batch_size} running (`--max-batch-size`)",
        "`--max-generations` (default 0 = batch + queue: "
        f"{engine.max_batch_size + engine.max_queue})",
        f"`--max-streams` ({server.max_streams})",
        "`--grpc-workers` (default: the two caps above + 16; never fewer)",
        f"≤ {engine.max_stop_chars} characters (`--max-stop-chars`)",
        "(`--max-message-bytes`)",
        "`--max-prompt-tokens`",
        f"`--max-lora-rank` ({engine.max_lora_rank})",
        f"≤ {MAX_REQUEST_ID_LENGTH} characters",
        f"`--max-upload-bytes` ({server.max_upload_bytes // 2**30} GiB)",
        f"{MAX_RECEIVE_MESSAGE_BYTES // 2**20} MiB per message",
        "≤ 16 non-empty `stop` strings",
        f"`--kv-cache-bytes` ({engine.kv_cache_bytes} = auto)",
        f"blocks of `--kv-block-size` ({engine.kv_block_size}) tokens",
        "never fits in the whole cache: `RESOURCE_EXHAUSTED` (`max_new_tokens`; `prompt` when the prompt alone does not fit)",
    ]
    for text in expected:
        assert text in README, text
    assert server.generation_cap == engine.max_batch_size + engine.max_queue
    assert server.rpc_workers == server.generation_cap + server.max_streams + 16


def test_the_engine_options_are_in_the_configuration_table():
    engine = EngineConfig()
    rows = [
        f"| `--prefill-tokens` | {engine.prefill_tokens} |",
        f"| `--kv-cache-bytes` | {engine.kv_cache_bytes} |",
        f"| `--kv-block-size` | {engine.kv_block_size} |",
        f"| `--cuda-graphs` | `{'on' if engine.cuda_graphs else 'off'}` |",
        f"| `--max-batch-size` | {engine.max_batch_size} |",
        f"| `--max-lora-rank` | {engine.max_lora_rank} |",
        f"| `--adapter-slots` | {engine.adapter_slots} |",
    ]
    for text in rows:
        assert text in README, text
