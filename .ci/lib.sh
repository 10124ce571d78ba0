# Sourced (not run) by the .ci scripts whose tests need a virtualenv of pinned versions of their own
# (compressed_tensors.sh, vllm_tests.sh): the venv is kept at $VENV and reused while it holds the pins,
# two CI jobs on one machine never build it at the same time, and a failed download shows as a banner
# on stderr with exit 0 (CI without network passes, visibly without those tests) unless the script's
# *_REQUIRED switch is 1. Before sourcing, the script sets
#   VENV          the venv's directory
#   LOG           the install log (a temp file; the banner quotes its tail)
#   SKIPPED       what the banner says is not run, e.g. "vLLM PLUGIN TESTS"
#   SKIPPED_NOTE  optional: a second banner line
#   REQUIRED      1 turns the banner's exit 0 into exit 1
# and defines venv_is_ready (status 0 when $VENV holds the pins) and install_pins (pip installs the pins
# into the fresh $VENV, output to $LOG; a non-zero status when pip fails).

banner() {  # $1: exit status; the rest: what to say
    local status=$1; shift
    {
        echo
        echo "################################################################################"
        echo "##  $SKIPPED NOT RUN: $*"
        if [[ -n "${SKIPPED_NOTE:-}" ]]; then echo "##  $SKIPPED_NOTE"; fi
        echo "##  install log: $LOG"
        echo "################################################################################"
        tail -n 15 "$LOG" | sed 's/^/##  | /'
        echo
    } >&2
    if [[ "$REQUIRED" == "1" ]]; then exit 1; fi
    exit "$status"
}

unreachable() {  # the install log shows a network / availability failure, not a broken setup
    grep -qiE "Could not find a version|No matching distribution|NewConnectionError|Failed to establish|\
Temporary failure in name resolution|Name or service not known|Max retries exceeded|ConnectionError|\
ReadTimeout|timed out|Network is unreachable|Could not fetch URL" "$LOG"
}

pinned_venv() {  # $1: the python that creates the venv; $2: the pins, as the messages name them; $3: optional note
    mkdir -p "$(dirname "$VENV")"
    exec 9>"$VENV.lock"  # held until the script exits
    if command -v flock >/dev/null; then flock 9; fi
    if venv_is_ready; then
        echo "atv-sparse: reusing $VENV ($2)"
        return
    fi
    echo "atv-sparse: building $VENV with $2${3:+ ($3)}"
    rm -rf "$VENV"
    "$1" -m venv "$VENV" >>"$LOG" 2>&1 || banner 1 "could not create a virtualenv with $1"
    if ! install_pins; then
        rm -rf "$VENV"
        if unreachable; then banner 0 "could not download $2"; fi
        banner 1 "pip could not install $2 (not a network problem; see the log)"
    fi
    venv_is_ready || banner 1 "the new venv does not hold the pinned versions"
}
