"""Generated protobuf / gRPC modules (do not edit; regenerate with scripts/gen_protos.py)."""
