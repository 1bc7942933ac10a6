#!/usr/bin/env bash
# GPU checks, run on a machine with CUDA and torch preinstalled:
#   1. build here:  maturin build --release -o gpu-wheels   (abi3 wheel; add missing pure-Python
#      dependency wheels to gpu-wheels/ with `pip download ... -d gpu-wheels`)
#   2. there:       bash tests/gpu/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
# Install only what is missing; never replace the machine's torch.
python -m pip install -q --no-index --find-links gpu-wheels mergekitty pytest 2>&1 | tail -3
cd /tmp && python -m pytest -q -p no:cacheprovider "$OLDPWD/tests/gpu" -m gpu -rs "$@"
