#!/usr/bin/env bash
# Install unison into the active Python environment (make and activate a virtual environment first).
# PyTorch is pinned to the CPU build 2.13.0 where no CUDA GPU is present, so no multi-GB CUDA build is pulled in;
# on a GPU machine with PyTorch already installed, the installed build is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! python -c "import torch" >/dev/null 2>&1; then
  python -m pip install -q "torch==2.13.0"
fi
python -m pip install -q -e ".[test]"
