"""The one home of adapters: their types, validation against the base model, and the on-disk store."""
