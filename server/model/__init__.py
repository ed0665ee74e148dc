"""The model layer: the NF4 base model and the LoRA routing applied on top of it."""
