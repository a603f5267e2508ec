#!/usr/bin/env bash
# One-step set-up of arcopo_fast into the current Python (idempotent; about a minute on a fresh machine).
#   ./setup.sh && python -m arcopo_fast.train      # the main job (tiny default run)
#   ./setup.sh && python -m pytest                 # the tests
# torch is installed first and pinned only when absent: an unpinned `torch` would pull a multi-GB CUDA
# build on a CPU machine. The C++ extension is then built against whatever torch is present.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install -q "torch==${ARCOPO_TORCH_VERSION:-2.13.0}"
fi
"$PY" -m pip install -q "scikit-build-core>=0.10" "ninja" "cmake>=3.18"
"$PY" -m pip install -q --no-build-isolation -e ".[test]"
