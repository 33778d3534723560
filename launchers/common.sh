# shellcheck shell=bash
# Shared helpers of the stemdl launchers; sourced, never run. The launchers stay thin: they check their
# variables, record versions, start `python -m stemdl run` under the site's MPI launcher and re-check the
# log. stemdl finds ranks and nodes through MPI alone, so nothing here tells it which scheduler started it.

set -euo pipefail

die() {
    echo "stemdl launcher: $*" >&2
    exit 2
}

# require VAR...: fail, naming the variable, when one is unset or empty.
require() {
    local var
    for var in "$@"; do
        [[ -n "${!var:-}" ]] || die "required variable $var is not set (see launchers/README.md)"
    done
}

# run_cmd CMD ARGS...: print the command as `+ cmd args` (shell-quoted, one line), then run it unless
# DRY_RUN=1. The `+ ` prefix is what the tests parse.
run_cmd() {
    printf '+'
    printf ' %q' "$@"
    printf '\n'
    [[ "${DRY_RUN:-0}" == 1 ]] || "$@"
}

# load_system STEMDL_DIR: source launchers/systems/$STEMDL_SYSTEM.env when it exists (modules, launcher
# flags, NCCL settings, config and data), then load the modules it names and set the defaults. Flag lists
# (STEMDL_MODULES, STEMDL_*_ARGS) are plain strings split on whitespace, so the environment can set them too.
load_system() {
    local file="$1/systems/${STEMDL_SYSTEM:?}.env"
    if [[ -f "$file" ]]; then
        # shellcheck source=/dev/null
        source "$file"
        echo "stemdl launcher: system config $file"
    fi
    local modules=()
    read -r -a modules <<<"${STEMDL_MODULES:-}"
    if ((${#modules[@]})); then
        [[ "${DRY_RUN:-0}" == 1 ]] || declare -F module >/dev/null || command -v module >/dev/null ||
            die "STEMDL_MODULES is set but this shell has no 'module' command (source your site's modules init)"
        run_cmd module load "${modules[@]}"
    fi
    STEMDL_PYTHON="${STEMDL_PYTHON:-python3}"
    # The platform key of the log names the system unless the submission says otherwise.
    export STEMDL_SUBMISSION_PLATFORM="${STEMDL_SUBMISSION_PLATFORM:-$STEMDL_SYSTEM}"
}

# result_dir: ORG/results/<system>/<strong|weak>/<benchmark>, the MLPerf submission layout. The system folder
# is STEMDL_RESULT_SYSTEM when set (the scaling study sets <system>_n<nodes>), else STEMDL_SYSTEM; the
# benchmark is STEMDL_BENCHMARK (a registered workload, `stemdl run --benchmark`; default stemdl).
result_dir() {
    local scaling="${STEMDL_SCALING:-strong}"
    [[ "$scaling" == strong || "$scaling" == weak ]] || die "STEMDL_SCALING must be strong or weak, not '$scaling'"
    local benchmark="${STEMDL_BENCHMARK:-stemdl}"
    [[ "$benchmark" =~ ^[A-Za-z0-9_.-]+$ ]] || die "STEMDL_BENCHMARK must be a workload name, not '$benchmark'"
    echo "${STEMDL_ORG_DIR:?}/results/${STEMDL_RESULT_SYSTEM:-${STEMDL_SYSTEM:?}}/$scaling/$benchmark"
}

# stemdl_cmd LOG_DIR EXTRA...: the `python -m stemdl run` words into the array STEMDL_CMD. --benchmark comes
# from STEMDL_BENCHMARK (default stemdl), --config and --data from STEMDL_CONFIG and STEMDL_DATA unless EXTRA
# names them (the command line wins).
stemdl_cmd() {
    local log_dir="$1" arg
    shift
    local config="${STEMDL_CONFIG:-}" data="${STEMDL_DATA:-}"
    for arg in "$@"; do
        case "$arg" in
            --config | --config=*) config="" ;;
            --data | --data=*) data="" ;;
            --benchmark | --benchmark=*) die "set STEMDL_BENCHMARK instead of --benchmark (it names the result folder too)" ;;
        esac
    done
    STEMDL_CMD=("$STEMDL_PYTHON" -m stemdl run --benchmark "${STEMDL_BENCHMARK:-stemdl}")
    [[ -z "$config" ]] || STEMDL_CMD+=(--config "$config")
    [[ -z "$data" ]] || STEMDL_CMD+=(--data "$data")
    STEMDL_CMD+=(--log-dir "$log_dir" "$@")
}

# The versions a result must be traceable to; with --require-cuda (STEMDL_REQUIRE_CUDA=1, GPU systems) it
# fails unless torch sees CUDA and NCCL, so a job on a wrong node or a CPU-only torch stops before the run.
PREFLIGHT_PY='
import os, platform, sys
import torch
print("host", platform.node())
print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__)
print("cuda", torch.version.cuda, "available", torch.cuda.is_available(), "devices", torch.cuda.device_count())
nccl = None
if torch.cuda.is_available():
    try:
        nccl = ".".join(map(str, torch.cuda.nccl.version()))
    except Exception as exc:
        nccl = f"unavailable ({exc})"
print("nccl", nccl)
try:
    import nvidia.dali as dali
    print("dali", dali.__version__)
except ImportError:
    print("dali", None)
from mpi4py import MPI
print("mpi4py", __import__("mpi4py").__version__, "|", MPI.Get_library_version().strip().splitlines()[0])
import stemdl
print("stemdl", getattr(stemdl, "__version__", None) or __import__("importlib.metadata").metadata.version("stemdl"))
for key in sorted(os.environ):
    if key.startswith(("NCCL_", "STEMDL_SUBMISSION_")) or key in ("CUDA_VISIBLE_DEVICES", "MASTER_ADDR", "MASTER_PORT"):
        print("env", key, os.environ[key], sep=" ")
if "--require-cuda" in sys.argv and (not torch.cuda.is_available() or nccl is None or nccl.startswith("unavailable")):
    sys.exit("preflight: this system needs CUDA and NCCL (STEMDL_REQUIRE_CUDA=1) but torch sees none")
'

# preflight LOG_DIR [LAUNCH...]: append the versions (python, torch, CUDA/NCCL, DALI, the MPI library,
# stemdl) and the NCCL environment to LOG_DIR/preflight.txt, one block per job. LAUNCH runs it on a
# compute node where the batch shell has no GPU (jsrun on Summit's launch nodes).
preflight() {
    local log_dir="$1"
    shift
    local launch=("$@") flags=()
    [[ "${STEMDL_REQUIRE_CUDA:-0}" != 1 ]] || flags=(--require-cuda)
    if [[ "${DRY_RUN:-0}" == 1 ]]; then
        # The script is long: print its place, not its text.
        echo "+${launch[*]:+ ${launch[*]}} $STEMDL_PYTHON -c <preflight>${flags[*]:+ ${flags[*]}} >> $log_dir/preflight.txt"
        return
    fi
    mkdir -p "$log_dir"
    local report
    report="$("${launch[@]}" "$STEMDL_PYTHON" -c "$PREFLIGHT_PY" "${flags[@]}")" || die "preflight failed; see above"
    {
        echo "=== $(date -u +%Y-%m-%dT%H:%M:%SZ) job ${SLURM_JOB_ID:-${LSB_JOBID:-local}}"
        echo "$report"
    } >>"$log_dir/preflight.txt"
    echo "$report"
}

# newest_result LOG_DIR: the most recently written result_<i>.txt (empty when there is none).
newest_result() {
    local newest="" log
    for log in "$1"/result_*.txt; do
        [[ -e "$log" ]] || continue
        [[ -n "$newest" && ! "$log" -nt "$newest" ]] || newest="$log"
    done
    echo "$newest"
}

# next_result LOG_DIR: the result_<i>.txt a run would write now (first free index, as stemdl picks it).
next_result() {
    local i=0
    while [[ -e "$1/result_$i.txt" ]]; do i=$((i + 1)); done
    echo "$1/result_$i.txt"
}

# check_log LOG_DIR: re-run the compliance checker on the newest result; its failure fails the job. The
# run already checks its own log, this is the independent second look the submission rests on.
check_log() {
    local log_dir="$1" log
    if [[ "${DRY_RUN:-0}" == 1 ]]; then
        run_cmd "$STEMDL_PYTHON" -m stemdl check "$(next_result "$log_dir")"
        return
    fi
    log="$(newest_result "$log_dir")"
    [[ -n "$log" ]] || die "no result_*.txt in $log_dir: the run wrote no log"
    run_cmd "$STEMDL_PYTHON" -m stemdl check "$log"
}
