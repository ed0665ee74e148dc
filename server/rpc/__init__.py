"""The thin gRPC layer: the only code that touches protobuf (conversion, servicers, interceptor, server, client)."""
