#!/usr/bin/env bash
# The static kernel report's CI subset, compiled ahead of time for sm_80 / sm_90a on this CPU, with this
# venv's Triton (the newest) and with the GPU stack's (triton 3.6, $ATV_SPARSE_CI_GPU_STACK_VENV when
# .ci/run names it), and the csrc kernels with nvcc: exits non-zero on a compile error or a register
# spill in a config autotune can pick, when the default decode kernel's static speed-up bound at M = 1
# is below 1.6x on an A100 or H100, or when a csrc kernel misses its instruction target (docs/design.md 7.3).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
pythons=(python)
if [ -n "${ATV_SPARSE_CI_GPU_STACK_VENV:-}" ]; then pythons+=("$ATV_SPARSE_CI_GPU_STACK_VENV/bin/python"); fi
csrc=()  # the csrc kernels (nvcc) once, with the first Python
for py in "${pythons[@]}"; do
    version=$("$py" -c "import triton; print(triton.__version__)")
    echo "kernel report (CI subset) with triton $version"
    "$py" benchmarks/kernel_report.py --ci "${csrc[@]}" --out "$OUT/kernel-report-triton-$version.md" | tail -n 3
    csrc=(--no-csrc)
done
