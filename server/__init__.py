"""qlora-server: one NF4 base model, many LoRA adapters per batch, served over gRPC."""

__version__ = "0.1.0"
