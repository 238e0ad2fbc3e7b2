#!/usr/bin/env bash
# The GPU check in one command, on a CUDA machine: `bash benchmarks/gpu_check.sh` (about 8 min;
# BENCHMARKS.md, "GPU"). Sets up nothing beyond the project's own `make setup`.
set -euo pipefail
cd "$(dirname "$0")/.."
make setup
.venv/bin/python benchmarks/gpu_check.py --update-md "$@"
