#!/bin/bash
# Run vibatch's whole test suite on this node (as root):
#   etc/run-tests.sh [PYTEST ARGS...]
# First sets the node up exactly as etc/setup-node.sh does (packages, venv, libvirtd/virtlogd,
# the test image), without the demo; then runs unit tests and the real-VM tests.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
"$REPO/etc/setup-node.sh" --no-demo
cd "$REPO"
# no path given: pytest runs testpaths (tests/); with paths, just those
exec "${VIBATCH_PREFIX:-/opt/vibatch}/venv/bin/python" -m pytest -p no:cacheprovider -q -rs "$@"
