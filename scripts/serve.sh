#!/usr/bin/env bash
# Set up (first run only) and start the server on the embedded SmolLM2-135M-Instruct, NF4; extra args go to `serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/qlora-server serve "$@"
