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
        "`--grpc-workers` (default: batch + queue + 16)",
        f"`--max-lora-rank` ({engine.max_lora_rank})",
        f"≤ {MAX_REQUEST_ID_LENGTH} characters",
        f"`--max-upload-bytes` ({server.max_upload_bytes // 2**30} GiB)",
        f"{MAX_RECEIVE_MESSAGE_BYTES // 2**20} MiB per message",
        "≤ 16 non-empty `stop` strings",
    ]
    for text in expected:
        assert text in README, text
    assert server.rpc_workers == engine.max_batch_size + engine.max_queue + 16
