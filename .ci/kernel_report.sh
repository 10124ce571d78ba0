#!/usr/bin/env bash
# The static kernel report's CI subset, compiled ahead of time for sm_80 / sm_90a on this CPU, with this
# venv's Triton (the newest) and with the GPU stack's (triton 3.6, $ATV_SPARSE_CI_GPU_STACK_VENV when
# .ci/run names it): exits non-zero on a compile error or a register spill in a config autotune can pick.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
pythons=(python)
if [ -n "${ATV_SPARSE_CI_GPU_STACK_VENV:-}" ]; then pythons+=("$ATV_SPARSE_CI_GPU_STACK_VENV/bin/python"); fi
for py in "${pythons[@]}"; do
    version=$("$py" -c "import triton; print(triton.__version__)")
    echo "kernel report (CI subset) with triton $version"
    "$py" benchmarks/kernel_report.py --ci --out "$OUT/kernel-report-triton-$version.md" | tail -n 3
done
