#!/usr/bin/env bash
# Developer loop: build the extension into build/dev and link it next to the sources, so that
# PYTHONPATH=python runs the working tree without reinstalling. CI and users use `pip install .`.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python}
cmake -S . -B build/dev -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$(command -v "$PY")" >/dev/null
cmake --build build/dev
so=$(ls build/dev/_core*.so)
# RPATH points at ../mlx/lib relative to an installed package; in the source tree use the interpreter's mlx.
ln -sf "$PWD/$so" python/reqnoise/
