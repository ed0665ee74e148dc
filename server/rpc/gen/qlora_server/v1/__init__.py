"""Generated code of qlora_server.v1 (do not edit; see protos/)."""
