#!/usr/bin/env bash
# ESC calibration wall time of Whisper tiny.en's encoder, 1 process (all cores) vs torchrun
# with 2 processes (1 thread each), back to back in one run; prints both rows and the ratio.
#   bash scripts/bench_calib_ratio.sh [--budget 3 --popsize 8 --calib-clips 12]
set -euo pipefail
cd "$(dirname "$0")/.."
one=$(.venv/bin/esc-ao bench calib "$@" 2>/dev/null | grep '^{')
two=$(OMP_NUM_THREADS=1 .venv/bin/python -m torch.distributed.run --standalone --nproc-per-node 2 \
      .venv/bin/esc-ao bench calib "$@" 2>/dev/null | grep '^{')
echo "1 process:   $one"
echo "2 processes: $two"
.venv/bin/python - "$one" "$two" <<'PY'
import json, sys
a, b = (json.loads(x) for x in sys.argv[1:3])
print(f"search wall time ratio (1 process / 2 processes): {a['search_seconds'] / b['search_seconds']:.2f}x")
PY
