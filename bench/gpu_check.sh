#!/usr/bin/env bash
# The GPU check in one command, for a lent GPU machine (docs/gpu.md): installs the wheels carried
# in .whl/ (bench/gpu_wheels.sh made them) where there are any, then runs bench/gpu_check.py with
# the arguments given (none: every part on CUDA; `--device cpu --tiny`: the dry run).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  echo "gpu_check.sh: installing $(ls .whl/*.whl | wc -l) wheels from .whl/ into /tmp/site"
  # the device README's line: only these files (--no-index), none of their requirements
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl ||
    { echo "gpu_check.sh: installing .whl/ failed (see above)" >&2; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
exec "$PY" bench/gpu_check.py "$@"
