# Shared by launch/tpu_pod.sh and launch/xpk_gke.sh (sourced). launch/slurm_gpu.sbatch keeps its own
# copy: SLURM runs a copy of the batch script from its spool directory, away from this file.

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
