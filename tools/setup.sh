#!/usr/bin/env bash
# Install pretrain and its dependencies into the active Python environment.
# A torch that is already installed is kept. Otherwise: with an NVIDIA GPU, the default (CUDA)
# build; without one, the CPU build — from a local wheel when pip's configuration provides one,
# else from PyTorch's CPU index — so that pip never pulls a multi-GB CUDA build onto a CPU box.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_VERSION=${PRETRAIN_TORCH_VERSION:-2.13.0}
CPU_INDEX=${PRETRAIN_TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

stamp=.setup-stamp
# The stamp counts only while `pretrain` is imported from this checkout: set-up in another clone
# re-points the editable install (and the console scripts) there.
# (Probed from /, where the checkout itself is not on sys.path.)
here_py="import pathlib, sys, pretrain, torch; sys.exit(pathlib.Path(pretrain.__file__).resolve().parents[1] != pathlib.Path(sys.argv[1]).resolve())"
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && (repo=$PWD; cd / && "$PY" -c "$here_py" "$repo") 2>/dev/null; then
  exit 0
fi
if "$PY" -c "import torch" 2>/dev/null; then
  echo "setup: keeping torch $("$PY" -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "setup: GPU found, installing torch (CUDA build)"
  pip_install "torch>=2.6"
elif "$PY" -m pip download -q --no-index --no-deps -d "$(mktemp -d)" "torch==$TORCH_VERSION" \
     >/dev/null 2>&1; then
  echo "setup: no GPU, installing the local CPU build of torch $TORCH_VERSION"
  pip_install "torch==$TORCH_VERSION"
else
  echo "setup: no GPU, installing the CPU build of torch from $CPU_INDEX"
  pip_install torch --index-url "$CPU_INDEX"
fi
pip_install -e ".[dev]"
touch "$stamp"
echo "setup: done ($("$PY" -c 'import torch; print("torch", torch.__version__)'))"
