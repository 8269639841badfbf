#!/usr/bin/env bash
# Run infersight's checks: lint (ruff), types (mypy), then the test suite.
# eBPF tests need root; under CI=true a skipped eBPF test is a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
[ -x "$py" ] || { echo "test: no .venv; run scripts/setup.sh first" >&2; exit 1; }
echo "== ruff"
"$py" -m ruff check agent probes collectors tests bench
echo "== mypy"
"$py" -m mypy
echo "== compiled modules (mypyc; a no-op when current)"
"$py" -m agent.native build
echo "== pytest"
exec "$py" -m pytest -ra "$@"
