#!/usr/bin/env bash
# The speech benchmark on a fresh machine: set-up (venv, TTS engines), the corpora (built
# offline from the seeds, about 25 minutes on 2 cores the first time, verified by hash
# after), then every missing cell of the accuracy table (cells already in
# docs/results/accuracy_cells for this code version are reused). Arguments go to
# `esc-ao bench accuracy`, e.g. --models ast --methods max esc --bits w4a4.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/esc-ao corpus asr kws
exec .venv/bin/esc-ao bench accuracy "$@"
