#!/usr/bin/env bash
# One-time set-up on a fresh machine: a venv in .venv with the pinned stack, installed in
# ONE pip run (a later bare install of a torch-dependent package can swap torch 2.14.1
# for the CPU-only 2.13.0 build, which breaks torchaudio), then esc-ao itself.
# Idempotent: a venv whose pins already match is reused (about 5 s instead of 2-3 min).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
stamp=.venv/.esc-ao-lock.sha256
# Only what pip installs decides a rebuild: the pins, and pyproject's build system and
# [project] table (esc-ao itself is installed editable; tool settings do not count).
want=$({ cat requirements.lock.txt requirements-npu.txt; "$PY" -c 'import json, tomllib
d = tomllib.load(open("pyproject.toml", "rb"))
print(json.dumps([d.get("build-system"), d["project"]], sort_keys=True))'; } | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: creating .venv with the pinned stack (2-3 minutes)"
  rm -rf .venv
  "$PY" -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check -r requirements.lock.txt -e ".[dev]" 2>&1 \
    | grep -v "^WARNING: Location" || true
  # The Ethos-U tools pin older numpy/ml-dtypes than the stack has: without their pins.
  .venv/bin/pip install -q --disable-pip-version-check --no-deps -r requirements-npu.txt 2>&1 \
    | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import torch, torchaudio, torchao, executorch, cma, whisper, tosa_reference_model, ethosu.vela" \
    || { echo "setup: the installed stack does not import" >&2; exit 1; }
  echo "$want" > "$stamp"
else
  echo "setup: .venv is up to date"
fi
# Debian packages: g++ for the native runner; the TTS engines and voices the corpora use.
need=()
command -v c++ >/dev/null || need+=(g++)
command -v flite >/dev/null || need+=(flite)
command -v espeak-ng >/dev/null || need+=(espeak-ng)
command -v text2wave >/dev/null || need+=(festival)
for v in english/kal_diphone:festvox-kallpc16k english/ked_diphone:festvox-kdlpc16k \
         us/cmu_us_slt_arctic_hts:festvox-us-slt-hts; do
  [ -d "/usr/share/festival/voices/${v%%:*}" ] || need+=("${v##*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: apt-get install ${need[*]}"
  apt-get install -y -q "${need[@]}" >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null && apt-get install -y -q "${need[@]}" >/dev/null; } \
    || { echo "setup: could not install ${need[*]} (run as root, or install them by hand)" >&2; exit 1; }
fi
bash scripts/build_runner.sh
.venv/bin/python - <<'PY'
import torch, torchaudio, torchao, cma
assert torch.__version__.startswith("2.14.1"), f"torch {torch.__version__}: expected 2.14.1 (rm -rf .venv and rerun)"
print(f"setup: torch {torch.__version__}, torchaudio {torchaudio.__version__}, torchao {torchao.__version__}, cma {cma.__version__}")
PY
