"""The engine: request types, the adapter-aware continuous-batching scheduler and its step loop."""
