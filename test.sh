#!/usr/bin/env bash
# test.sh: the checks and the tests, as CI runs them: ruff, mypy, then pytest (extra arguments go to pytest).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
venv=${AGENTFS_VENV:-.venv}
[ -x "$venv/bin/pytest" ] || { echo "test.sh: no venv at $venv; run ./mkfs.sh --deps-only first" >&2; exit 1; }
"$venv/bin/ruff" check .
"$venv/bin/mypy"
"$venv/bin/pytest" -q "$@"
