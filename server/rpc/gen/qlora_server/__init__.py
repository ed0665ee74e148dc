"""Generated code of the qlora_server proto package (do not edit)."""
