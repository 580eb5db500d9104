#!/usr/bin/env bash
# Install quantkit with its test dependencies into .venv (from scratch if absent) and run the tests.
#   bash tests/run.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$py" -m venv .venv
# torch is pinned here (the CPU wheel); pyproject keeps it open for users.
.venv/bin/pip install --quiet --disable-pip-version-check torch==2.13.0 triton==3.8.0
.venv/bin/pip install --quiet --disable-pip-version-check -e '.[dev]'
.venv/bin/quantkit prepare-model smollm2-135m >/dev/null || echo "SmolLM2-135M unavailable: its tests will skip" >&2
exec .venv/bin/python -m pytest "$@"
