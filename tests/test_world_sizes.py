"""Run the multi-rank suites (tests marked `mpi`) under mpiexec at several world sizes.

Each size is one `mpiexec -n N python -m pytest -m mpi tests` with the dmlmpi.testing plugin:
one combined report, a failure on any rank fails the test and names the rank, a hang aborts.
8 ranks on this 2-core machine is deliberately oversubscribed; 3 is the non-power-of-two.
"""
from __future__ import annotations

import os

import pytest

from dmlmpi.testing import run_mpi

pytestmark = pytest.mark.launches_mpi  # these tests start mpiexec themselves

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS_DIR)


@pytest.mark.parametrize("nprocs", [2, 3, 4, 8])
def test_mpi_suites(nprocs: int) -> None:
    """All `mpi`-marked tests pass on every rank of an N-rank world."""
    # other installed plugins stay out (hypothesis alone costs ~1.7 s of imports per rank)
    result = run_mpi(nprocs, ["-m", "pytest", "-p", "dmlmpi.testing", "-m", "mpi", "-q", "-p", "no:cacheprovider",
                              "--mpi-timeout", "120", TESTS_DIR], timeout=900, cwd=ROOT,
                     env={"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"})
    tail = "\n".join(result.stdout.splitlines()[-40:])
    print(tail)
    assert not result.timed_out, f"{nprocs}-rank suite still running after 900 s:\n{tail}"
    assert result.returncode == 0, f"{nprocs}-rank suite failed (exit {result.returncode}):\n{tail}"
    assert " passed" in tail and " failed" not in tail
