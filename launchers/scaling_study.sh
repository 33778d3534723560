#!/usr/bin/env bash
# A strong-scaling study: one batch job per node count and repeat, each writing its result into the
# submission layout under a system folder per scale, $STEMDL_ORG_DIR/results/${STEMDL_SYSTEM}_n<nodes>/.
#
#   STEMDL_ORG_DIR=/path/to/ORG STEMDL_SYSTEM=example-slurm launchers/scaling_study.sh --scheduler slurm \
#       [--nodes "1 2 4 8"] [--repeats 5] [--dry-run] [-- stemdl args]
#
# The repeats of one node count run one after another (Slurm: --dependency=singleton on a job name per
# scale; LSF: each waits for the previous one to end), because stemdl picks result_<i> by the first free
# index and two runs in one folder at once could pick the same one. Extra sbatch/bsub options go in
# STEMDL_SUBMIT_ARGS (e.g. "--account=abc --time=02:00:00", or "-P ABC123 -W 120").
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=launchers/common.sh
source "$here/common.sh"

scheduler="" nodes_list="1 2 4 8" repeats=5 extra=()
while (($#)); do
    case "$1" in
        --scheduler) scheduler="${2:?--scheduler needs slurm or lsf}"; shift ;;
        --nodes) nodes_list="${2:?--nodes needs a list, e.g. \"1 2 4\"}"; shift ;;
        --repeats) repeats="${2:?--repeats needs a number}"; shift ;;
        --dry-run) export DRY_RUN=1 ;;
        --) shift; extra=("$@"); break ;;
        *) die "unknown option '$1' (stemdl arguments go after --)" ;;
    esac
    shift
done

require STEMDL_ORG_DIR STEMDL_SYSTEM
[[ "$scheduler" == slurm || "$scheduler" == lsf ]] || die "--scheduler must be slurm or lsf, not '$scheduler'"
[[ "$repeats" =~ ^[1-9][0-9]*$ ]] || die "--repeats must be a positive integer, not '$repeats'"
read -r -a node_counts <<<"$nodes_list"
((${#node_counts[@]})) || die "--nodes is empty"
for n in "${node_counts[@]}"; do
    [[ "$n" =~ ^[1-9][0-9]*$ ]] || die "node counts must be positive integers, not '$n'"
done
read -r -a submit_args <<<"${STEMDL_SUBMIT_ARGS:-}"
# The batch copy of a job script cannot find common.sh beside itself.
export STEMDL_LAUNCHERS="$here"
script_args=()
((${#extra[@]} == 0)) || script_args=(-- "${extra[@]}")

for n in "${node_counts[@]}"; do
    system="${STEMDL_SYSTEM}_n$n"
    for ((r = 1; r <= repeats; r++)); do
        if [[ "$scheduler" == slurm ]]; then
            run_cmd env "STEMDL_RESULT_SYSTEM=$system" sbatch "--nodes=$n" "--job-name=stemdl_$system" \
                --dependency=singleton "${submit_args[@]}" "$here/slurm.sbatch" "${script_args[@]}"
        else
            wait_for=()
            ((r == 1)) || wait_for=(-w "ended(stemdl_${system}_r$((r - 1)))")
            run_cmd env "STEMDL_RESULT_SYSTEM=$system" bsub -nnodes "$n" -J "stemdl_${system}_r$r" \
                "${wait_for[@]}" "${submit_args[@]}" "$here/summit.lsf" "${script_args[@]}"
        fi
    done
done
