#!/usr/bin/env bash
# The test command: set-up (idempotent), then the whole suite. pytest's "no tests ran"
# (exit 5) is a failure here, as it must be for CI.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
# style and types are part of the suite: lint, formatting (pyproject's [tool.ruff]) and
# the core's types ([tool.mypy]) before the tests
.venv/bin/ruff check src tests examples scripts || exit 1
.venv/bin/ruff format --check src tests examples scripts || exit 1
.venv/bin/mypy || exit 1
.venv/bin/python -m pytest -q "$@"
rc=$?
if [ $rc -eq 5 ]; then echo "test: pytest collected no tests" >&2; exit 1; fi
exit $rc
