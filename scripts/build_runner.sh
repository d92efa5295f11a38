#!/usr/bin/env bash
# Builds the native runner (runner/esc_ao_runner.cpp) against the ExecuTorch wheel in
# .venv with the venv's CMake (>= 3.28, needed by the wheel's imported targets) into
# build/runner/esc_ao_runner. Incremental: a second call only relinks what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v c++ >/dev/null || { echo "build_runner: no C++ compiler; install one: apt-get install -y g++" >&2; exit 1; }
ET=$(.venv/bin/python -c 'import executorch; print(list(executorch.__path__)[0])')
.venv/bin/cmake -S . -B build/runner -G Ninja -DCMAKE_MAKE_PROGRAM="$PWD/.venv/bin/ninja" \
  -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$ET" >/dev/null
.venv/bin/cmake --build build/runner >/dev/null
echo "build_runner: build/runner/esc_ao_runner"
