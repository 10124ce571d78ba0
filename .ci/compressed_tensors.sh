#!/usr/bin/env bash
# CI: the compressed-tensors import (docs/design.md 6.1) against the real library.
#
# compressed-tensors 0.14.0.1 is the last release that writes sparse-24-bitmask; it needs
# transformers<5, so it lives in a venv of its own ($ATV_SPARSE_CT_VENV, default
# ~/.cache/atv-sparse/venv-ct, reused while it holds the pins). The script regenerates the fixtures
# of tests/test_import_ct.py from scratch (stage 1 in this environment, which must have atv_sparse
# installed: tiny models pruned by atv_sparse; stage 2 in the venv: compressed by compressed-tensors'
# own ModelCompressor), fails if any weight file differs from the committed one, and runs
# tests/test_import_ct.py on the fresh files. About 2 minutes once the venv exists.
#
# Arguments go to pytest. If the pins cannot be downloaded (no network), a banner says so and the
# script exits 0; ATV_SPARSE_CT_REQUIRED=1 makes that a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS

PINS=("compressed-tensors==0.14.0.1" "transformers<5" "torch==2.13.0" "psutil")  # 0.14.0.1 imports psutil undeclared
VENV="${ATV_SPARSE_CT_VENV:-$HOME/.cache/atv-sparse/venv-ct}"
PYTHON="${PYTHON:-python}"
LOG="$(mktemp -t atv-sparse-ct-install.XXXXXX)"
FIXTURES=tests/fixtures/compressed_tensors

SKIPPED="COMPRESSED-TENSORS IMPORT TESTS" REQUIRED="${ATV_SPARSE_CT_REQUIRED:-0}"
source .ci/lib.sh

venv_is_ready() {
    "$VENV/bin/python" - <<'EOF' 2>/dev/null
import importlib.metadata as md
v = {d: md.version(d) for d in ("compressed-tensors", "transformers", "torch", "psutil")}
assert v["compressed-tensors"] == "0.14.0.1" and v["transformers"].startswith("4."), v
assert v["torch"].startswith("2.13.0"), v
EOF
}

install_pins() {
    "$VENV/bin/python" -m pip install -q "${PINS[@]}" >>"$LOG" 2>&1
}

pinned_venv python3 "${PINS[*]}"

FRESH=$(mktemp -d -t atv-sparse-ct-fixtures.XXXXXX)
trap 'rm -rf "$FRESH" "$LOG"' EXIT
export HF_HUB_OFFLINE=1
"$PYTHON" "$FIXTURES/make_fixtures.py" dense "$FRESH" >"$FRESH/stage1.log" 2>&1 || { tail -30 "$FRESH/stage1.log"; exit 1; }
"$VENV/bin/python" "$FIXTURES/make_fixtures.py" compress "$FRESH" >"$FRESH/stage2.log" 2>&1 \
    || { tail -30 "$FRESH/stage2.log"; exit 1; }
stale=0
for f in $(cd "$FIXTURES" && ls dense/*/model.safetensors ct/*/model.safetensors reference/*.safetensors); do
    if ! cmp -s "$FIXTURES/$f" "$FRESH/$f"; then
        echo "atv-sparse: $FIXTURES/$f differs from what make_fixtures.py writes now" >&2
        stale=1
    fi
done
if [[ $stale == 1 ]]; then
    echo "atv-sparse: regenerate the fixtures (see $FIXTURES/make_fixtures.py) and commit them" >&2
    exit 1
fi
echo "atv-sparse: fresh fixtures equal the committed ones ($((SECONDS - START)) s); running tests/test_import_ct.py on them"
status=0
ATV_SPARSE_CT_FIXTURES="$FRESH" "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_import_ct.py "$@" || status=$?
echo "atv-sparse: compressed-tensors tests finished in $((SECONDS - START)) s (exit $status)"
exit "$status"
