#!/usr/bin/env bash
# The main job: set-up (idempotent), then `esc-ao quantize` on the embedded default
# (Whisper tiny.en's encoder and the bundled clips). Extra arguments go to esc-ao quantize.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/esc-ao quantize "$@"
