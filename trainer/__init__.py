"""QLoRA trainer: makes PEFT LoRA adapters for the server's NF4 base model (``train(TrainConfig) -> TrainResult``)."""
