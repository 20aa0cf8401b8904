# Shared environment for the sbatch scripts in jobs/: Python environment, MPI settings, launcher.
# DMLMPI_VENV: a virtual environment to activate (default: .venv in the submit directory, if any);
# cluster users may instead `module load` their MPI and Python before sbatch.
venv="${DMLMPI_VENV:-${SLURM_SUBMIT_DIR:-.}/.venv}"
if [ -f "$venv/bin/activate" ]; then source "$venv/bin/activate"; fi
# what dmlmpi sets for MPI launches (root allowance, oversubscription): see python -m dmlmpi.mpienv
eval "$(python -m dmlmpi.mpienv)"
# More tasks than cores inside an allocation: do not bind ranks to cores (they would share one).
export PRTE_MCA_hwloc_default_binding_policy="${PRTE_MCA_hwloc_default_binding_policy:-none}"
# DMLMPI_LAUNCHER=srun uses Slurm's PMIx plugin (Open MPI 5); the default is mpirun inside the allocation.
if [ "${DMLMPI_LAUNCHER:-mpirun}" = "srun" ]; then
  export PMIX_SECURITY_MODE="${PMIX_SECURITY_MODE:-native}"
  DMLMPI_LAUNCH="srun --mpi=pmix"
else
  DMLMPI_LAUNCH="mpirun -n ${SLURM_NTASKS:-8}"
fi
export DMLMPI_LAUNCH
