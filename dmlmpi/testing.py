"""pytest plugin for multi-rank runs: `mpiexec -n 3 python -m pytest tests/` gives one combined report.

Loaded in every pytest run (entry point `dmlmpi`), it stays inert (no MPI import) unless the process
was started by an MPI launcher or `--mpi` is given, and the world has more than one rank. Then:
rank 0 alone prints the report; each test's outcome is combined over all ranks (a failure on any
rank fails the test and names the rank); all ranks exit with the same status; a test that hangs past
`--mpi-timeout` (ini `mpi_timeout`, env DMLMPI_TEST_TIMEOUT, default 120 s) aborts the job naming the
stuck rank; and ranks that collected different tests fail the run instead of hanging.
`run_mpi` starts such a run from an ordinary single-process test.
"""
from __future__ import annotations

import io
import math
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import pytest
from _pytest._io import TerminalWriter

LAUNCHER_VARS = ("OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_SIZE", "PMI_RANK")
DEFAULT_TIMEOUT = 120.0
# Exchange deadlines after a rank's own test ends: rank 0 waits timeout + GRACE for the others, the
# others wait timeout + 2 * GRACE for rank 0, so a stuck rank's own watchdog (timeout) fires first,
# then rank 0's wait (which names the late ranks), and only then "rank 0 did not finish".
GRACE = 5.0
POLL_S = 0.001  # sleep between polls: waiting ranks yield the (oversubscribed) cores
TAG_UP, TAG_DOWN = 7301, 7302  # rank -> rank 0 (summaries), rank 0 -> rank (verdicts)
PHASES = ("setup", "call", "teardown")
LAUNCHES_MPI = "launches_mpi"  # marker of tests that start mpiexec themselves


def pytest_addoption(parser: pytest.Parser) -> None:
    """Register --mpi, --mpi-timeout and the ini option mpi_timeout."""
    group = parser.getgroup("dmlmpi", "multi-rank runs under mpiexec (dmlmpi)")
    group.addoption("--mpi", action="store_true", default=False,
                    help="combine the ranks of an MPI job even if no launcher variable is set")
    group.addoption("--mpi-timeout", type=float, default=None, metavar="SECONDS",
                    help="per-test limit under MPI before the job is aborted as deadlocked "
                         f"(else env DMLMPI_TEST_TIMEOUT, ini mpi_timeout, {DEFAULT_TIMEOUT:g}; 0: none)")
    parser.addini("mpi_timeout", f"per-test limit in seconds under MPI (default {DEFAULT_TIMEOUT:g})")


def launched_by_mpi(environ: dict[str, str] | os._Environ[str] | None = None) -> bool:
    """Whether an MPI launcher (Open MPI, PMIx, MPICH/hydra) started this process."""
    env = os.environ if environ is None else environ
    return any(name in env for name in LAUNCHER_VARS)


def resolve_timeout(config: pytest.Config) -> float:
    """Per-test timeout: --mpi-timeout, else DMLMPI_TEST_TIMEOUT, else ini mpi_timeout, else 120."""
    for value in (config.getoption("mpi_timeout"), os.environ.get("DMLMPI_TEST_TIMEOUT"),
                  config.getini("mpi_timeout")):
        if value not in (None, ""):
            return float(value) if float(value) > 0 else math.inf
    return DEFAULT_TIMEOUT


@pytest.hookimpl(trylast=True)  # after the terminal reporter exists, so ranks != 0 can silence it
def pytest_configure(config: pytest.Config) -> None:
    """Activate the multi-rank plugin under an MPI launcher with more than one rank."""
    config.addinivalue_line("markers", f"{LAUNCHES_MPI}: the test starts its own mpiexec (run_mpi); "
                                       "skipped inside a multi-rank run, where every rank would start its own copy of the job")
    if not (config.getoption("mpi") or launched_by_mpi()):
        return  # plain pytest run: stay inert
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise pytest.UsageError(f"dmlmpi.testing: running under MPI but mpi4py is missing: {exc}")
    if MPI.COMM_WORLD.Get_size() > 1:
        config.pluginmanager.register(MPIPlugin(config, MPI, resolve_timeout(config)), "dmlmpi-mpi")


def _summary(report: pytest.TestReport) -> dict[str, Any]:
    """The small, picklable part of a report that rank 0 needs to merge it."""
    out = {"when": report.when, "outcome": report.outcome, "duration": report.duration,
           "text": "", "message": "", "skip": None}
    if report.failed:
        buffer = io.StringIO()  # report.longreprtext would strip the first line's indentation
        writer = TerminalWriter(buffer)
        writer.hasmarkup = False
        report.toterminal(writer)
        out["text"] = buffer.getvalue().rstrip() + "".join(
            f"\n{'-' * 10} {name} {'-' * 10}\n{content}" for name, content in report.sections)
        crash = getattr(report.longrepr, "reprcrash", None)
        out["message"] = (getattr(crash, "message", "") or "").split("\n")[0]
    elif report.skipped and isinstance(report.longrepr, tuple):
        out["skip"] = tuple(report.longrepr)
    return out


class MPIPlugin:
    """The active plugin on every rank of a multi-rank run (registered at configure)."""

    def __init__(self, config: pytest.Config, MPI: Any, timeout: float) -> None:
        self.MPI, self.timeout = MPI, timeout
        self.rank, self.size = MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()
        self._stderr_fd = os.dup(2)  # the real stderr, for _abort's message (pytest captures fd 2)
        # Our own communicator (collective over all ranks, made once): test code's traffic on
        # COMM_WORLD can never match the plugin's messages. Idup so that a missing rank cannot hang us.
        self.comm, request = MPI.COMM_WORLD.Idup()
        self._wait_for(lambda: [] if request.Test() else ["some ranks"], "starting the session",
                       timeout + GRACE)
        if self.rank != 0:
            self._quiet(config)

    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        """Skip tests that launch their own mpiexec: each of the N ranks would start its own copy of that job."""
        for item in items:
            if item.get_closest_marker(LAUNCHES_MPI) is not None:
                item.add_marker(pytest.mark.skip(reason="starts its own mpiexec: run it in a plain pytest"))

    def _quiet(self, config: pytest.Config) -> None:
        """On ranks != 0: no terminal output, no junit XML, no cache writes (rank 0 does these)."""
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:  # keep the reporter (others use its writer), point it at /dev/null
            from _pytest.config import create_terminal_writer
            self._devnull = open(os.devnull, "w")
            reporter._tw = create_terminal_writer(config, self._devnull)
        from _pytest.junitxml import xml_key
        xml = config.stash.get(xml_key, None)
        if xml is not None:
            del config.stash[xml_key]
            config.pluginmanager.unregister(xml)
        if getattr(config, "cache", None) is not None:
            config.cache.set = lambda key, value: None  # type: ignore[method-assign]

    # ---- failure paths -------------------------------------------------------------------------

    def _abort(self, message: str, thread_id: int | None = None) -> None:
        """Say why on stderr (plus the stuck thread's stack), then abort the whole MPI job."""
        text = f"dmlmpi.testing: rank {self.rank} of {self.size}: {message}; aborting the job\n"
        frame = sys._current_frames().get(thread_id) if thread_id is not None else None
        if frame is not None:
            import _pytest
            import pluggy
            framework = tuple(os.path.dirname(m.__file__) for m in (_pytest, pluggy, pytest))
            framework += ("<frozen", __file__)
            frames = traceback.extract_stack(frame)
            frames = [f for f in frames if not f.filename.startswith(framework)] or frames
            text += f"dmlmpi.testing: rank {self.rank} stack (most recent call last, pytest left out):\n"
            text += "".join(traceback.format_list(frames))
        # The stderr saved at configure: during a test pytest's capture redirects fd 2 to a file.
        os.write(self._stderr_fd, text.encode(errors="replace"))
        self.MPI.COMM_WORLD.Abort(1)

    @contextmanager
    def _watchdog(self, nodeid: str) -> Iterator[None]:
        """Abort the job if the body (one test on this rank) runs longer than the timeout."""
        done, main = threading.Event(), threading.get_ident()

        def watch() -> None:
            if not done.wait(None if math.isinf(self.timeout) else self.timeout):
                self._abort(f"test {nodeid} did not finish within {self.timeout:g} s (deadlock?)", main)

        thread = threading.Thread(target=watch, name="dmlmpi-watchdog", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()

    def _wait_for(self, missing: Callable[[], list[Any]], what: str, limit: float) -> None:
        """Poll until missing() (ranks, or a description) is empty; after `limit` s abort naming them."""
        deadline = time.monotonic() + limit
        while late := missing():
            if time.monotonic() > deadline:
                who = late[0] if isinstance(late[0], str) else "rank 0" if late == [0] else f"ranks {late}"
                self._abort(f"{who} did not finish {what} within {limit:g} s")
            time.sleep(POLL_S)

    # ---- the one communication pattern: everyone -> rank 0, rank 0's verdict -> everyone --------

    def _exchange(self, mine: Any, what: str, decide: Callable[[list[Any]], Any]) -> Any:
        """Send `mine` to rank 0, which calls decide(all ranks' values); return its verdict everywhere."""
        comm = self.comm
        if self.rank != 0:
            # step 1 (ranks != 0): post our value to rank 0 without blocking
            send = comm.isend((what, mine), dest=0, tag=TAG_UP)
            # step 2: poll for rank 0's verdict; if it never comes, rank 0 is the one stuck
            self._wait_for(lambda: [] if comm.Iprobe(source=0, tag=TAG_DOWN) else [0], what,
                           self.timeout + 2 * GRACE)
            verdict = comm.recv(source=0, tag=TAG_DOWN)
            send.Wait()  # rank 0 has received it, so this returns at once
            return verdict
        # step 1 (rank 0): collect every other rank's value, naming those that never report
        values: list[Any] = [mine] + [None] * (self.size - 1)
        pending = set(range(1, self.size))

        def missing() -> list[int | str]:
            for r in sorted(pending):
                if comm.Iprobe(source=r, tag=TAG_UP):
                    their_what, values[r] = comm.recv(source=r, tag=TAG_UP)
                    pending.discard(r)
                    if their_what != what:  # cannot happen after the collection check; be loud
                        self._abort(f"rank {r} reported {their_what!r} while rank 0 was at {what!r}")
            return sorted(pending)

        self._wait_for(missing, what, self.timeout + GRACE)
        # step 2 (rank 0): decide and send the verdict to every rank, waiting until it has gone out
        verdict = decide(values)
        sends = {r: comm.isend(verdict, dest=r, tag=TAG_DOWN) for r in range(1, self.size)}
        self._wait_for(lambda: [r for r, s in sends.items() if not s.Test()], f"{what} (verdict)",
                       self.timeout + GRACE)
        return verdict

    # ---- hooks ---------------------------------------------------------------------------------

    def pytest_report_header(self) -> str:
        """One header line on rank 0's report."""
        limit = "none" if math.isinf(self.timeout) else f"{self.timeout:g} s"
        return f"dmlmpi: {self.size} MPI ranks combined, per-test timeout {limit}"

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        """Check that every rank collected the same items; else fail the run (on rank 0's report)."""
        mine = ([item.nodeid for item in session.items], session.testsfailed)

        def decide(everyone: list[tuple[list[str], int]]) -> str | None:
            ids0, errors0 = everyone[0]
            lines = []
            for r, (ids, errors) in enumerate(everyone):
                if (ids, errors) != (ids0, errors0):
                    extra = [i for i in ids if i not in ids0][:3]
                    lacking = [i for i in ids0 if i not in ids][:3]
                    lines.append(f"rank {r}: {len(ids)} items, {errors} collection errors"
                                 f" (vs rank 0: {len(ids0)}, {errors0}); only here: {extra};"
                                 f" missing here: {lacking}")
            return ("collection differs between MPI ranks:\n" + "\n".join(lines)) if lines else None

        # all ranks' node ids go to rank 0, which answers with a problem description (or None)
        problem = self._exchange(mine, "collection", decide)
        if problem is not None:
            session.items[:] = []  # run nothing; the error makes the exit status non-zero everywhere
            if self.rank == 0:
                report = pytest.CollectReport("", "failed", problem, [])
                session.ihook.pytest_collectreport(report=report)
            else:
                session.testsfailed += 1

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem: pytest.Item | None) -> bool:
        """Run the test on this rank under a watchdog, then combine all ranks' outcomes on rank 0."""
        from _pytest.runner import runtestprotocol
        ihook = item.ihook
        if self.rank == 0:
            ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
        with self._watchdog(item.nodeid):
            reports = runtestprotocol(item, nextitem=nextitem, log=False)

        def decide(everyone: list[list[dict[str, Any]]]) -> tuple[int, Any, Any]:
            for report in self._merge(item, reports, everyone):
                ihook.pytest_runtest_logreport(report=report)
            ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
            s = item.session
            return s.testsfailed, s.shouldfail, s.shouldstop

        # each rank's report summaries go to rank 0; its verdict (session state) comes back
        testsfailed, shouldfail, shouldstop = self._exchange(
            [_summary(r) for r in reports], f"test {item.nodeid}", decide)
        if self.rank != 0:  # mirror rank 0 so -x / --maxfail stop every rank at the same test
            item.session.testsfailed = testsfailed
            if shouldfail:
                item.session.shouldfail = shouldfail
            if shouldstop:
                item.session.shouldstop = shouldstop
        return True

    def _merge(self, item: pytest.Item, own: list[pytest.TestReport],
               everyone: list[list[dict[str, Any]]]) -> list[pytest.TestReport]:
        """Rank 0: one report per phase: failed if any rank failed, skipped only if all skipped."""
        mine = {report.when: report for report in own}
        merged: dict[str, pytest.TestReport] = {}
        for when in PHASES:
            seen = [(r, s) for r, summaries in enumerate(everyone) for s in summaries if s["when"] == when]
            if not seen:
                continue
            report = mine.get(when) or pytest.TestReport(
                item.nodeid, item.location, {k: 1 for k in item.keywords}, "passed", None, when,
                user_properties=item.user_properties)
            report.duration = max(s["duration"] for _, s in seen)
            failed = [(r, s) for r, s in seen if s["outcome"] == "failed"]
            if failed:
                report.outcome, report.longrepr = "failed", self._failure_text(when, failed)
                if hasattr(report, "wasxfail"):
                    del report.wasxfail  # a real failure somewhere is not an expected failure
            elif all(s["outcome"] == "skipped" for _, s in seen):
                report.outcome = "skipped"
                if report.longrepr is None:  # rank 0 had no such phase: use another rank's reason
                    report.longrepr = next((s["skip"] for _, s in seen if s["skip"]), None) or (
                        str(item.location[0]), item.location[1] or 0, "skipped on every rank")
            elif report.outcome == "skipped":  # skipped here, passed elsewhere: counts as passed
                report.outcome, report.longrepr = "passed", None
            merged[when] = report
        if "setup" in merged and not merged["setup"].passed and "call" in merged \
                and not merged["call"].failed:
            del merged["call"]  # like pytest: a test whose setup failed on some rank did not run
        return list(merged.values())

    def _failure_text(self, when: str, failed: list[tuple[int, dict[str, Any]]]) -> str:
        """`failed on rank(s) 2 of 4: <message>` then each failure text under its rank heading."""
        ranks = ", ".join(str(r) for r, _ in failed)
        first = next((s["message"] for _, s in failed if s["message"]), "")
        lines = [f"failed on rank(s) {ranks} of {self.size}" + (f": {first}" if first else "")]
        groups: dict[str, list[int]] = {}  # ranks that failed with the same text are shown once
        for r, s in failed:
            groups.setdefault(s["text"], []).append(r)
        for text, group in groups.items():
            label = f"rank {group[0]}" if len(group) == 1 else f"ranks {', '.join(map(str, group))}"
            lines += [f"--- {label} ({when}) ---", text]
        return "\n".join(lines)

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        """Give every rank the worst exit status, so mpiexec fails iff some rank failed."""
        # every rank's exit status goes to rank 0, which answers with the maximum
        worst = self._exchange(int(exitstatus), "the session", max)
        try:
            session.exitstatus = pytest.ExitCode(worst)
        except ValueError:  # a plugin's own exit code
            session.exitstatus = worst


@dataclass
class MPIRun:
    """What run_mpi returns: like subprocess.CompletedProcess, plus timing."""

    args: list[str]
    returncode: int
    stdout: str  # stderr merged in
    elapsed: float
    timed_out: bool


def run_mpi(nprocs: int, args: list[str], timeout: float, env: dict[str, str] | None = None,
            cwd: str | os.PathLike[str] | None = None, launcher_args: Sequence[str] = ()) -> MPIRun:
    """Run `mpiexec [launcher_args] -n nprocs python *args` in its own session; kill the whole group on timeout."""
    from dmlmpi.mpienv import find_mpiexec, launch_env
    cmd = [find_mpiexec(), *launcher_args, "-n", str(nprocs), sys.executable, *args]
    full_env = launch_env()
    full_env.update(env or {})
    full_env["PYTHONUNBUFFERED"] = "1"
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=full_env, cwd=cwd, start_new_session=True)
    timed_out = False
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        out = ""
    try:  # the launcher, its daemons and the ranks share the new process group: end all of them
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if timed_out:
        try:
            out, _ = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:  # something left the group but holds our pipe
            proc.kill()
            out, _ = proc.communicate()
    return MPIRun(cmd, proc.returncode, out, time.monotonic() - start, timed_out)
