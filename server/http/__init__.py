"""OpenAI-compatible HTTP API (FastAPI + uvicorn) beside gRPC: JSON ↔ the same plain engine requests."""
