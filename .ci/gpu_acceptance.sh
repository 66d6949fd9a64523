#!/usr/bin/env bash
# GPU acceptance in one command, from a fresh checkout on one H100/H200 (about 8 minutes):
# install, build the CUDA extension, run the op test grid on CUDA tensors (fp16, bf16,
# fp32; triton and cuda backends), compute-sanitizer memcheck on one small case per
# kernel, an AOTInductor package of the bundled TimeSformer (built, run, checked against
# the eager logits), and the headline benchmarks, each step with its own time limit.
# Records and logs go to benchmarks/results/gpu/<date>-<commit>/ and, when $OUT is set, to
# $OUT as well.
# The steps are in benchmarks/gpu/acceptance.py; --dry-run lists them with their commands
# and limits and runs nothing; --help lists the options.
#
# Env: PYTHON (interpreter with torch; default: python, else python3), OUT (a second copy
# of the results), ACCEPTANCE_HARD_LIMIT (seconds before the whole run is stopped, default
# 570: the run's own budget is 480 s).
# Exit status: 0 passed, 1 a correctness step failed, 2 a correctness step could not run.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-$(command -v python || command -v python3 || true)}
if [ -z "$py" ]; then
  echo "gpu_acceptance: no python found (set PYTHON)" >&2
  exit 1
fi
if command -v timeout >/dev/null; then
  exec timeout --kill-after=15 "${ACCEPTANCE_HARD_LIMIT:-570}" "$py" benchmarks/gpu/acceptance.py "$@"
fi
exec "$py" benchmarks/gpu/acceptance.py "$@"
