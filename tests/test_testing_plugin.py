"""Tests of the multi-rank pytest plugin (dmlmpi.testing): each starts a real mpiexec via run_mpi."""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dmlmpi.mpienv import launch_env
from dmlmpi.testing import LAUNCHER_VARS, MPIRun, run_mpi

pytestmark = pytest.mark.launches_mpi  # these tests start mpiexec themselves

ROOT = Path(__file__).resolve().parents[1]
CASES = "tests/plugin_cases"
SUMMARY = re.compile(r"^=+ .*\b(passed|failed|error|errors|skipped)\b.* in [0-9.]+s", re.M)
ENV = {"COLUMNS": "250", "PY_COLORS": "0"}  # full-width short summary, no color codes
# Launched runs load only our plugin (named explicitly): other installed plugins (hypothesis: ~1.7 s
# of imports per rank) would make every run seconds slower on 2 cores. One run keeps autoloading.
ONLY_OURS = {"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
LIMIT = 60.0  # seconds any launched run may take


def pytest_run(nprocs: int, *args: str, autoload: bool = False) -> MPIRun:
    """`mpiexec -n nprocs python -m pytest <args>` in the repository root."""
    plugin = [] if autoload else ["-p", "dmlmpi.testing"]
    run = run_mpi(nprocs, ["-m", "pytest", "-p", "no:cacheprovider", *plugin, *args], timeout=LIMIT,
                  env=ENV if autoload else {**ENV, **ONLY_OURS}, cwd=ROOT)
    assert not run.timed_out, f"run did not end within {LIMIT} s:\n{run.stdout}"
    return run


def line_for(output: str, word: str, test: str) -> str:
    """The short-summary line `WORD <nodeid> ...` of one test (fails if absent)."""
    found = [ln for ln in output.splitlines() if ln.startswith(f"{word} ") and f"::{test}" in ln]
    assert len(found) == 1, f"expected one {word} line for {test}:\n{output}"
    return found[0]


@pytest.mark.parametrize("nprocs", [1, 2, 3, 4])
def test_one_combined_report(nprocs: int) -> None:
    run = pytest_run(nprocs, f"{CASES}/case_pass_fail.py", "-rA")
    out = run.stdout
    assert run.returncode != 0, out
    summaries = SUMMARY.findall(out)
    assert len(summaries) == 1, f"expected exactly one summary line:\n{out}"
    assert out.count("test session starts") == 1, out
    line_for(out, "PASSED", "test_passes")
    failed = line_for(out, "FAILED", "test_fails_on_last_rank")
    assert "deliberate failure on the last rank" in failed
    assert "1 failed" in SUMMARY.search(out).group(0)
    assert "skipped on every rank" in out and re.search(r"^SKIPPED \[1\]", out, re.M), out
    if nprocs == 1:  # a single rank: plain pytest behaviour, the plugin stays out of the way
        assert "dmlmpi:" not in out and "failed on rank" not in out
        return
    assert f"dmlmpi: {nprocs} MPI ranks combined" in out
    assert f"failed on rank(s) {nprocs - 1} of {nprocs}" in failed
    assert f"--- rank {nprocs - 1} (call) ---" in out
    line_for(out, "PASSED", "test_skipped_on_rank_0_only")  # mixed skip/pass counts as passed
    error = line_for(out, "ERROR", "test_fixture_error_on_rank_1")
    assert f"failed on rank(s) 1 of {nprocs}" in error and "deliberate fixture error" in error
    assert re.search(r"1 failed, 2 passed, 1 skipped, 1 error in", out), out


def test_all_passing_run_exits_zero() -> None:
    # autoload: the plugin comes in through its pytest11 entry point, as in a user's run
    run = pytest_run(3, f"{CASES}/case_pass_fail.py", "-k", "passes or everywhere", autoload=True)
    assert run.returncode == 0, run.stdout
    assert "dmlmpi: 3 MPI ranks combined" in run.stdout
    assert re.search(r"1 passed, 1 skipped, 3 deselected in", run.stdout), run.stdout


@pytest.mark.parametrize("stuck", [1, 0])
def test_deadlock_names_stuck_rank(stuck: int) -> None:
    run = pytest_run(3, f"{CASES}/case_deadlock.py", "--mpi-timeout", "5", "-k", f"rank_{stuck}_stuck")
    out = run.stdout
    assert run.returncode != 0, out
    assert run.elapsed < LIMIT
    nodeid = f"{CASES}/case_deadlock.py::test_rank_{stuck}_stuck"
    assert f"dmlmpi.testing: rank {stuck} of 3: test {nodeid} did not finish within 5 s" in out, out
    assert "case_deadlock.py\", line" in out and "in _stuck_on" in out  # the stuck rank's stack


def test_rank_holding_gil_is_named_by_rank_0() -> None:
    run = pytest_run(3, f"{CASES}/case_deadlock.py", "--mpi-timeout", "3", "-k", "holds_gil")
    out = run.stdout
    assert run.returncode != 0, out
    assert "rank 0 of 3: ranks [1] did not finish test" in out and "holds_gil" in out, out


def test_collection_mismatch_fails_clearly() -> None:
    run = pytest_run(3, f"{CASES}/case_collect_mismatch.py")
    out = run.stdout
    assert run.returncode != 0, out
    assert "collection differs between MPI ranks" in out and "test_only_on_rank_1" in out, out
    assert len(SUMMARY.findall(out)) == 1, out


def test_inert_in_plain_pytest(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    help_text = subprocess.run([sys.executable, "-m", "pytest", "--help"], env=env, cwd=tmp_path,
                               capture_output=True, text=True, timeout=60).stdout
    assert "--mpi-timeout" in help_text
    (tmp_path / "test_plain.py").write_text("def test_ok():\n    pass\n")
    probe = ("import sys, pytest\n"
             "rc = pytest.main(['-q', '-p', 'no:cacheprovider', 'test_plain.py'])\n"
             "print('RESULT', int(rc), 'dmlmpi.testing' in sys.modules, 'mpi4py.MPI' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", probe], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=60).stdout
    assert "RESULT 0 True False" in out, out


def test_a_job_started_inside_a_rank_gets_its_own_identity(tmp_path: Path) -> None:
    """Under `mpiexec -n 1`, a test that launches its own job: that job's ranks are its own, not the outer rank."""
    parent_keys = tmp_path / "parent_keys"
    # what run_mpi hands the outer launcher: this process's environment without the rank variables
    # it has itself when the whole test run is a rank of `mpiexec -n 1`
    parent_keys.write_text("\n".join(launch_env()))
    probe = ("import os, subprocess, sys\n"
             "from dmlmpi.mpienv import find_mpiexec, launch_env\n"
             f"parent = set(open({str(parent_keys)!r}).read().split())\n"
             "env = launch_env()\n"
             "# what this rank's launcher added and a job started from here would still inherit\n"
             "print('OUTER-ADDED', sorted(k for k in os.environ if k not in parent))\n"
             "print('PASSED-ON', sorted(k for k in env if k not in parent))\n"
             "inner = 'from mpi4py import MPI; print(\"INNER\", MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size())'\n"
             "out = subprocess.run([find_mpiexec(), '-n', '2', sys.executable, '-c', inner], env=env,\n"
             "                     capture_output=True, text=True, timeout=60)\n"
             "print(out.stdout, out.stderr, 'RC', out.returncode)\n")
    run = run_mpi(1, ["-c", probe], timeout=LIMIT, cwd=ROOT)
    out = run.stdout
    assert run.returncode == 0 and "RC 0" in out, out
    added = out.split("OUTER-ADDED ")[1].split("\n")[0]
    passed_on = out.split("PASSED-ON ")[1].split("\n")[0]
    assert "RANK" in added, out  # the outer launcher did give this rank an identity...
    identity = ("RANK", "SIZE", "NAMESPACE", "SERVER_URI", "UNIVERSE")
    assert not [k for k in ast.literal_eval(passed_on) if any(word in k for word in identity)], out  # ...not passed on
    inner = sorted(line.split()[1:] for line in out.splitlines() if line.startswith("INNER"))
    assert inner == [["0", "2"], ["1", "2"]], out
