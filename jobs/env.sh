# shellcheck shell=bash
# Shared environment for the sbatch scripts in jobs/ (they source it): Python environment, MPI
# settings, launcher. sbatch passes the submitting shell's environment to the job (--export=ALL, its
# default), so every variable below can be set on the sbatch command line:
#   DMLMPI_ARGS="--epochs 1 --samples 600" sbatch --wait jobs/dp.sbatch
#
#   DMLMPI_VENV      virtual environment to activate (default: .venv in the submit directory, if it
#                    exists; "none": activate nothing). Cluster users may instead `module load`
#                    their MPI and Python before sbatch.
#   DMLMPI_PYTHON    the Python that runs dmlmpi (default: `python` on PATH, after the venv)
#   DMLMPI_LAUNCHER  mpirun (default): `mpirun -n $SLURM_NTASKS` inside the allocation;
#                    srun: `srun --mpi=pmix`, Slurm starts the ranks itself (Open MPI 5 / PMIx)
#   DMLMPI_ARGS      extra options appended to the python command line (before the script's own
#                    arguments), split on spaces: small settings for a quick run, e.g.
#                    "--epochs 1 --samples 600". Options with spaces in a value go after the
#                    script name instead: sbatch jobs/bench.sbatch --train-args '--samples 600'
#   DMLMPI_ELASTIC   1: survive dead ranks (dp, fl, ps async): mpirun --with-ft ulfm and --elastic
#                    (Open MPI's ULFM; the mpirun launcher only)
#   DMLMPI_OUT       the run directory (default: runs/MODE-JOBID, relative to the job's directory)
#   DMLMPI_JOBS      where this file is, for a script submitted from outside the repository root
#                    (sbatch runs a spooled copy of the script, so the scripts look in
#                    $SLURM_SUBMIT_DIR/jobs, or beside themselves when run directly with bash)
# Each script lists its own variables in its header.

venv="${DMLMPI_VENV:-${SLURM_SUBMIT_DIR:-.}/.venv}"
if [ "$venv" != none ] && [ -f "$venv/bin/activate" ]; then
  # activate scripts may read unset variables
  set +u
  # shellcheck disable=SC1091  # the environment's own script
  source "$venv/bin/activate"
  set -u
fi
DMLMPI_PYTHON="${DMLMPI_PYTHON:-python}"
command -v "$DMLMPI_PYTHON" >/dev/null || { echo "jobs/env.sh: no $DMLMPI_PYTHON on PATH (set DMLMPI_VENV or DMLMPI_PYTHON)" >&2; exit 1; }
export DMLMPI_PYTHON
# what dmlmpi sets for MPI launches (root allowance, oversubscription): see python -m dmlmpi.mpienv
eval "$("$DMLMPI_PYTHON" -m dmlmpi.mpienv)"
# More tasks than cores inside an allocation: do not bind ranks to cores (they would share one).
export PRTE_MCA_hwloc_default_binding_policy="${PRTE_MCA_hwloc_default_binding_policy:-none}"
# Rank output reaches the job's output file as it is printed, not when a buffer fills.
export PYTHONUNBUFFERED=1
case "${DMLMPI_LAUNCHER:-mpirun}" in
  srun)
    # Slurm's PMIx plugin wires up Open MPI 5 ranks (MPICH's wheel wants --mpi=pmi2 instead). Slurm
    # tells the ranks PMIX_SECURITY_MODE=munge,native, overwriting ours; the Open MPI wheel's PMIx
    # has no munge component and prints a "Sorry! ... find-available:not-valid" box per rank.
    # Choosing its security component directly (an MCA parameter Slurm leaves alone) avoids that.
    export PMIX_MCA_psec="${PMIX_MCA_psec:-native}"
    DMLMPI_LAUNCH="srun --mpi=pmix" ;;
  mpirun)
    DMLMPI_LAUNCH="mpirun -n ${SLURM_NTASKS:-8}" ;;
  *)
    echo "jobs/env.sh: DMLMPI_LAUNCHER must be mpirun or srun, not '$DMLMPI_LAUNCHER'" >&2; exit 2 ;;
esac
DMLMPI_ARGS="${DMLMPI_ARGS:-}"
if [ "${DMLMPI_ELASTIC:-0}" = 1 ]; then
  # ULFM: a dead rank leaves the others running, and --elastic tells them to go on without it
  [ "${DMLMPI_LAUNCHER:-mpirun}" = mpirun ] || { echo "jobs/env.sh: DMLMPI_ELASTIC=1 needs DMLMPI_LAUNCHER=mpirun (ULFM is enabled by mpirun --with-ft ulfm)" >&2; exit 2; }
  DMLMPI_LAUNCH="mpirun --with-ft ulfm -n ${SLURM_NTASKS:-8}"
  DMLMPI_ARGS="--elastic $DMLMPI_ARGS"
fi
export DMLMPI_LAUNCH
DMLMPI_JOB="${SLURM_JOB_ID:-local}"
echo "dmlmpi job $DMLMPI_JOB on $(hostname -s): launcher '$DMLMPI_LAUNCH', python $(command -v "$DMLMPI_PYTHON"), DMLMPI_ARGS '$DMLMPI_ARGS'" >&2

# dmlmpi_run COMMAND...: run the launcher line so that the job survives its time limit. Slurm sends
# this shell SIGUSR1 before the limit (#SBATCH --signal=B:USR1@60); bash would only run a trap after
# a foreground command ends, so the launcher runs in the background while the shell waits for it,
# and the trap forwards the signal to it (mpirun/prterun and srun pass SIGUSR1 on to the ranks). The
# ranks agree on a step, checkpoint and exit with status 99 (dmlmpi.preempt.PREEMPTED_EXIT); then the
# job requeues itself (#SBATCH --requeue): the next start runs this script again with the same job id,
# hence the same run directory, and --resume picks up the latest complete checkpoint.
DMLMPI_PREEMPTED=99
dmlmpi_run() {
  local pid status caught=0
  trap 'caught=1; echo "dmlmpi job $DMLMPI_JOB: SIGUSR1, asking the ranks to checkpoint and stop" >&2; kill -USR1 "$pid" 2>/dev/null || true' USR1
  "$@" &
  pid=$!
  while :; do
    caught=0 status=0
    wait "$pid" || status=$?
    # a trapped signal interrupts wait (status 128 + signal) while the launcher still runs: wait again
    if [ "$caught" != 1 ] || [ "$status" -le 128 ]; then break; fi
  done
  trap - USR1
  if [ "$status" = "$DMLMPI_PREEMPTED" ] && [ -n "${SLURM_JOB_ID:-}" ]; then
    echo "dmlmpi job $DMLMPI_JOB: checkpointed before the limit, requeueing (restart ${SLURM_RESTART_COUNT:-0})" >&2
    # the job ends here and starts again from the top of the script when Slurm next schedules it
    scontrol requeue "$SLURM_JOB_ID"
  fi
  return "$status"
}
