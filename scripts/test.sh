#!/usr/bin/env bash
# The README's test command: install the package with its test extras, then run the suite.
# actionformer is only the test oracle for mAP; it is installed without its dependencies
# because it pulls torchvision, which does not load beside the pinned CPU torch.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e ".[test]"
python -m pip install -q --no-deps actionformer==1.5.0
python -m pytest -q "$@"
