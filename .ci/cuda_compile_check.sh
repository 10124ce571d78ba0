#!/usr/bin/env bash
# Compile every csrc/*.cu for sm_80 and sm_90a with nvcc, no GPU needed, warnings as errors:
# host compiler (-Wall -Wextra -Werror), nvcc front end and ptxas (--Werror all-warnings), and
# ptxas register spills / local memory use (-warn-spills -warn-lmem-usage), which would be a
# silent slowdown of the decode kernels. One nvcc per (file, arch), all in parallel.
# Usage: .ci/cuda_compile_check.sh [archs...]   (default: 80 90a); NVCC overrides the compiler.
set -euo pipefail
cd "$(dirname "$0")/.."

NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
if [ ! -x "$NVCC" ]; then
    echo "cuda_compile_check: nvcc not found (set NVCC or put it on PATH)" >&2
    exit 1
fi
ARCHS=("$@")
[ ${#ARCHS[@]} -gt 0 ] || ARCHS=(80 90a)
SOURCES=(csrc/*.cu)
[ -e "${SOURCES[0]}" ] || { echo "cuda_compile_check: no csrc/*.cu" >&2; exit 1; }

OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
FLAGS=(-std=c++17 -O3 -Xcompiler -fPIC,-Wall,-Wextra,-Werror --Werror all-warnings
       -Xptxas -warn-spills,-warn-lmem-usage)

start=$SECONDS
pids=()
names=()
for arch in "${ARCHS[@]}"; do
    for src in "${SOURCES[@]}"; do
        name="$(basename "$src" .cu).sm_$arch"
        "$NVCC" "${FLAGS[@]}" "-gencode=arch=compute_$arch,code=sm_$arch" -c "$src" -o "$OUT/$name.o" \
            >"$OUT/$name.log" 2>&1 &
        pids+=($!)
        names+=("$name")
    done
done

failed=0
for i in "${!pids[@]}"; do
    if wait "${pids[$i]}"; then
        # nvcc can print a warning and still succeed when a tool ignores --Werror: refuse that too.
        if grep -qi "warning" "$OUT/${names[$i]}.log"; then
            echo "FAIL ${names[$i]} (warnings):"; cat "$OUT/${names[$i]}.log"; failed=1
        else
            echo "ok   ${names[$i]}"
        fi
    else
        echo "FAIL ${names[$i]}:"; cat "$OUT/${names[$i]}.log"; failed=1
    fi
done
echo "cuda_compile_check: ${#pids[@]} compilations (${#SOURCES[@]} files x archs ${ARCHS[*]}) in $((SECONDS - start)) s"
exit $failed
