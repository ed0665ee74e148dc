# qlora-server on an NVIDIA GPU. Installs exactly as the README does (scripts/setup.sh: a .venv with the package and
# its server, train and dev extras), with TORCH_SPEC choosing a CUDA build of torch. Build: docker build -t qlora-server .
# Run: docker run --gpus all -p 50051:50051 -p 9400:9400 -v qlora-data:/data qlora-server  (or: docker compose up)
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04

# torch wheel spec handed to scripts/setup.sh; PyPI's Linux x86_64 wheel of this version is a CUDA build that
# brings its own CUDA libraries (pip's nvidia-* packages), so the host driver must support that CUDA version.
ARG TORCH_SPEC="torch==2.11.0"
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Ubuntu 24.04's Python 3.12 (the package needs >= 3.11); versions follow the base image's release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# Non-root user owning the install, the data volume (adapters, training state) and the model cache (~/.cache).
RUN groupadd --gid 10001 qlora \
    && useradd --create-home --no-log-init -l --uid 10001 --gid 10001 qlora \
    && install -d -o 10001 -g 10001 /opt/qlora-server /data /home/qlora/.cache

WORKDIR /opt/qlora-server
COPY --chown=10001:10001 . .
USER 10001:10001
RUN TORCH_SPEC="${TORCH_SPEC}" ./scripts/setup.sh
ENV PATH=/opt/qlora-server/.venv/bin:$PATH

VOLUME ["/data"]
# gRPC, Prometheus metrics.
EXPOSE 50051 9400

# Healthy once grpc.health.v1 answers SERVING (the first start converts the embedded model: allow a long start).
HEALTHCHECK --interval=30s --timeout=10s --start-period=10m --retries=3 \
    CMD ["python", "-c", "import sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; r = g.HealthStub(grpc.insecure_channel('127.0.0.1:50051')).Check(h.HealthCheckRequest(), timeout=5); sys.exit(0 if r.status == h.HealthCheckResponse.SERVING else 1)"]

CMD ["qlora-server", "serve", "--host", "0.0.0.0", "--port", "50051", "--metrics-port", "9400", \
     "--adapters-dir", "/data/adapters", "--state-dir", "/data/state", "--device", "auto", "--log-json"]
