# Shared by the static recipes in slurm/*.sbatch: find the repository (sbatch runs a copy
# of the script, so its own path says nothing), the Python to run, the user's environment
# file, and the runtime (launch.sh).
DLM_HOME=${DLM_HOME:-$SLURM_SUBMIT_DIR}
DLM_PYTHON=${DLM_PYTHON:-python}
export DLM_STATE_DIR=${DLM_STATE_DIR:-$DLM_HOME/runs/.slurm}
mkdir -p "$DLM_STATE_DIR"
if [ -n "${DLM_ENV_FILE:-}" ]; then
    source "$DLM_ENV_FILE"
fi
cd "$DLM_HOME" || exit 1
source "$DLM_HOME/slurm/launch.sh"
