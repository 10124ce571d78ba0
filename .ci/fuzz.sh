#!/usr/bin/env bash
# Fuzz the checkpoint loader (safetensors header, config.json) and the calibration readers for a
# bounded time; any exception other than AtvSparseError fails. About 3 minutes in all
# (ATV_SPARSE_FUZZ_SECONDS per target, default 55). Where atheris cannot be installed, the
# deterministic mutation test of the same targets runs instead, and says so loudly.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
seconds=${ATV_SPARSE_FUZZ_SECONDS:-55}
if ! python -c "import atheris" 2>/dev/null; then
    python -m pip install -q "atheris>=3.0" >/dev/null 2>&1 || true
fi
if python -c "import atheris" 2>/dev/null; then
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    for target in header config calib; do
        mkdir -p "$work/$target"
        echo "atv-sparse fuzz: $target for ${seconds}s (atheris)"
        # new inputs go to the scratch dir (first), never into the committed seed corpus
        status=0
        python fuzz/fuzz.py "$target" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=4096 \
            -print_final_stats=1 -artifact_prefix="$work/$target-" "$work/$target" "fuzz/corpus/$target" \
            >"$work/$target.log" 2>&1 || status=$?
        grep -E "^(#[0-9]+[[:space:]]+DONE|stat::number_of_executed_units|Done)" "$work/$target.log" || true
        if [ "$status" -ne 0 ]; then
            echo "atv-sparse fuzz: $target FAILED (exit $status): an exception other than AtvSparseError," \
                 "a hang or an out-of-memory; the end of its log:" >&2
            tail -n 40 "$work/$target.log" >&2
            mkdir -p fuzz/crashes
            copied=0
            for input in "$work/$target"-crash-* "$work/$target"-timeout-* "$work/$target"-oom-*; do
                if [ -e "$input" ]; then cp "$input" fuzz/crashes/ && copied=1; fi
            done
            if [ "$copied" = 1 ]; then
                echo "atv-sparse fuzz: failing inputs copied to fuzz/crashes/ (replay: python fuzz/fuzz.py $target FILE)" >&2
            else
                echo "atv-sparse fuzz: libFuzzer wrote no input file; the log above shows the input's bytes" >&2
            fi
            exit 1
        fi
    done
else
    echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!" >&2
    echo "!! atv-sparse fuzz: atheris could not be installed; NOT fuzzing. Running the deterministic    !!" >&2
    echo "!! mutation test of the same targets instead (fixed inputs, no coverage guidance).           !!" >&2
    echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!" >&2
    python fuzz/mutate.py --count 6000
fi
