#!/bin/bash
# Run vibatch's whole test suite on this node (as root):
#   etc/run-tests.sh [PYTEST ARGS...]
# First sets the node up exactly as etc/setup-node.sh does (packages, venv, libvirtd/virtlogd,
# the test image), without the demo; then ruff, then the unit tests and the real-VM tests.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
"$REPO/etc/setup-node.sh" --no-demo
cd "$REPO"
VENV="${VIBATCH_PREFIX:-/opt/vibatch}/venv"
# the linter first (pyproject.toml's [tool.ruff]): a finding fails the run before any VM boots
"$VENV/bin/ruff" check --no-cache "$REPO"
# no path given: pytest runs testpaths (tests/); with paths, just those
exec "$VENV/bin/python" -m pytest -p no:cacheprovider -q -rs "$@"
