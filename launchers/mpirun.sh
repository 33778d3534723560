#!/usr/bin/env bash
# stemdl under any MPI: one node, or the hosts of a host file.
#
#   STEMDL_ORG_DIR=/path/to/ORG STEMDL_SYSTEM=workstation launchers/mpirun.sh --np 2 -- --config smoke
#
# Options: --dry-run (print the commands, run nothing), --np N (ranks; default STEMDL_NP, else 1),
# --hostfile F, and after `--` any `stemdl run` arguments. Required: STEMDL_ORG_DIR, STEMDL_SYSTEM.
# Optional (environment or launchers/systems/$STEMDL_SYSTEM.env): STEMDL_MPIRUN (the launcher binary),
# STEMDL_MPIRUN_ARGS, STEMDL_HOSTFILE_FLAG, STEMDL_MODULES, STEMDL_PYTHON, STEMDL_CONFIG, STEMDL_DATA, NCCL_*.
# The log goes to $STEMDL_ORG_DIR/results/$STEMDL_SYSTEM/strong/$STEMDL_BENCHMARK/result_<i>.txt.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=launchers/common.sh
source "$here/common.sh"

usage() { sed -n '2,10s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; }

np="" hostfile="" extra=()
while (($#)); do
    case "$1" in
        --dry-run) export DRY_RUN=1 ;;
        --np) np="${2:?--np needs a number}"; shift ;;
        --hostfile) hostfile="${2:?--hostfile needs a file}"; shift ;;
        --) shift; extra=("$@"); break ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown option '$1' (stemdl arguments go after --)" ;;
    esac
    shift
done

require STEMDL_ORG_DIR STEMDL_SYSTEM
load_system "$here"
np="${np:-${STEMDL_NP:-1}}"
[[ "$np" =~ ^[1-9][0-9]*$ ]] || die "--np must be a positive integer, not '$np'"
[[ -z "$hostfile" || -f "$hostfile" || "${DRY_RUN:-0}" == 1 ]] || die "host file $hostfile does not exist"

log_dir="$(result_dir)"
launch=("${STEMDL_MPIRUN:-mpirun}" -n "$np")
[[ -z "$hostfile" ]] || launch+=("${STEMDL_HOSTFILE_FLAG:---hostfile}" "$hostfile")
read -r -a mpirun_args <<<"${STEMDL_MPIRUN_ARGS:-}"
launch+=("${mpirun_args[@]}")

stemdl_cmd "$log_dir" "${extra[@]}"  # first: a wrong argument stops before anything runs
[[ "${DRY_RUN:-0}" == 1 ]] || mkdir -p "$log_dir"
preflight "$log_dir"
run_cmd "${launch[@]}" "${STEMDL_CMD[@]}"
check_log "$log_dir"
