# Shared by launch/tpu_pod.sh and launch/xpk_gke.sh (sourced after they define `die`).
# launch/slurm_gpu.sbatch keeps its own copy: SLURM runs a copy of the batch script from its spool
# directory, away from this file.

# Prints a command, quoting only the arguments that need it, then runs it unless --dry-run.
DRY_RUN=0
show() {
  local arg out=()
  for arg in "$@"; do
    if [[ $arg =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then out+=("$arg"); else out+=("${arg@Q}"); fi
  done
  printf '+ %s\n' "${out[*]}"
}
run() {
  show "$@"
  if ((DRY_RUN == 0)); then "$@"; fi
}

# Fails (through the sourcing script's `die`) naming the flag of each empty variable: PROJECT ->
# --project, TPU_TYPE -> --tpu-type.
require_flags() {
  local name
  for name in "$@"; do
    [[ -n ${!name} ]] || die "--$(echo "$name" | tr '[:upper:]_' '[:lower:]-') is required"
  done
}
