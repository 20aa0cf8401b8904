"""What a training run reports: a progress bar, the run directory, and a per-rank timeline.

- `ProgressBar` (rank 0): one line per epoch, redrawn in place on a terminal, plain lines in logs.
- `RunLog`: rank 0 owns the run directory (`config.json`, `metrics.jsonl`, `summary.json`).
- `Timeline`: spans per rank, gathered to rank 0 as a Chrome trace (chrome://tracing, Perfetto).

Nothing here talks to a module-level MPI world: every class takes the communicator it reports on.
The collective calls are the constructors of `RunLog` and `Timeline` and `Timeline.write`.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from typing import TYPE_CHECKING, Any, ContextManager, TextIO

if TYPE_CHECKING:
    from mpi4py import MPI

MAX_EVENTS = 200_000  # spans kept per rank by default; later ones are counted, not stored
KNOWN_CATEGORIES = ("compute", "comm")  # these get the first thread ids in every trace


def _json_default(obj: Any) -> Any:
    """Make numpy/torch scalars and other odd values JSON-serialisable."""
    item = getattr(obj, "item", None)
    if callable(item):
        try:
            return item()
        except (ValueError, RuntimeError):  # an array with more than one element
            pass
    tolist = getattr(obj, "tolist", None)
    if callable(tolist):
        return tolist()
    return str(obj)


def atomic_write_json(path: str, obj: Any) -> None:
    """Write `obj` as JSON to `path` atomically: a temp file in the same folder, then a rename."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, default=_json_default)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# ---- progress bar ------------------------------------------------------------------------------


def _is_tty(stream: TextIO) -> bool:
    """Whether `stream` is an interactive terminal."""
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (ValueError, OSError):  # closed or detached stream
        return False


class ProgressBar:
    """Rank 0's progress line: epoch, step/total, samples/s, loss (and accuracy); silent elsewhere."""

    def __init__(self, comm: MPI.Comm, total: int, epochs: int | None = None,
                 stream: TextIO | None = None, interval_s: float = 10.0,
                 tty: bool | None = None, width: int = 24, unit: str = "step", rate: str = "samples",
                 active: bool = True) -> None:
        """`total` steps per epoch; on a TTY redraw in place, else print a line every `interval_s`.

        `unit` names a step and `rate` what update(samples=...) counts (fl: rounds and clients);
        epochs=0 leaves the epoch out of the line; active=False silences it on every rank.
        """
        self.unit, self.rate = unit, rate
        self.active = active and comm.Get_rank() == 0
        self.stream = sys.stderr if stream is None else stream
        self.tty = _is_tty(self.stream) if tty is None else tty
        self.total, self.epochs, self.interval_s, self.width = total, epochs, interval_s, width
        self.epoch, self.step, self.samples = 1, 0, 0
        self.loss: float | None = None
        self.accuracy: float | None = None
        self._start = self._last_print = self._last_draw = time.perf_counter()
        self._printed = True  # nothing new to show yet
        self._drawn = 0  # length of the line currently on the terminal

    def start_epoch(self, epoch: int, total: int | None = None) -> None:
        """Begin epoch `epoch` (1-based): step, samples and the rate's clock start again."""
        if not self.active:
            return
        self._finish_line()
        self.epoch, self.step, self.samples = epoch, 0, 0
        self.total = self.total if total is None else total
        self._start = self._last_print = time.perf_counter()

    def update(self, step: int, loss: float | None = None, samples: int = 0,
               accuracy: float | None = None) -> None:
        """Record that `step` steps of this epoch are done, `samples` more samples, the latest loss."""
        if not self.active:
            return
        self.step = step
        self.samples += samples
        if loss is not None:
            self.loss = float(loss)
        if accuracy is not None:
            self.accuracy = float(accuracy)
        self._printed = False
        now = time.perf_counter()
        end_of_epoch = step >= self.total
        if self.tty:
            if end_of_epoch or now - self._last_draw >= 0.1:  # ~10 redraws a second at most
                self._draw(now)
        elif end_of_epoch or now - self._last_print >= self.interval_s:
            self._print_line(now)

    def close(self) -> None:
        """End the output: the terminal line gets its newline, a log gets any unprinted state."""
        if self.active:
            self._finish_line()

    def text(self, now: float | None = None) -> str:
        """The status text without the bar: `epoch 2/10  step 30/100  1234 samples/s  loss 0.4321`."""
        now = time.perf_counter() if now is None else now
        elapsed = max(now - self._start, 1e-9)
        epoch = [] if self.epochs == 0 else [f"epoch {self.epoch}" + (f"/{self.epochs}" if self.epochs else "")]
        parts = [*epoch, f"{self.unit} {self.step}/{self.total}", f"{self.samples / elapsed:.0f} {self.rate}/s"]
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if self.accuracy is not None:
            parts.append(f"acc {self.accuracy:.4f}")
        return "  ".join(parts)

    def _bar(self) -> str:
        """`[#####.....]` for the fraction of the epoch done."""
        done = min(self.width, int(self.width * self.step / self.total)) if self.total > 0 else 0
        return "[" + "#" * done + "." * (self.width - done) + "]"

    def _draw(self, now: float) -> None:
        """Redraw the terminal line in place (carriage return, padded over the previous one)."""
        line = f"{self._bar()} {self.text(now)}"
        line = line[:max(20, shutil.get_terminal_size().columns - 1)]  # a wrapped line cannot be redrawn
        self.stream.write("\r" + line.ljust(self._drawn))
        self.stream.flush()
        self._drawn, self._last_draw, self._printed = len(line), now, True

    def _print_line(self, now: float) -> None:
        """Print one plain log line."""
        self.stream.write(self.text(now) + "\n")
        self.stream.flush()
        self._last_print, self._printed = now, True

    def _finish_line(self) -> None:
        """Show the last state if it was not shown, and move off a terminal line."""
        now = time.perf_counter()
        if self.tty:
            if not self._printed:
                self._draw(now)
            if self._drawn:
                self.stream.write("\n")
                self.stream.flush()
                self._drawn = 0
        elif not self._printed:
            self._print_line(now)


# ---- run directory -----------------------------------------------------------------------------


class RunDirError(OSError):
    """The run directory cannot be created or written (raised on every rank)."""


class RunLog:
    """The run directory: rank 0 writes config.json, metrics.jsonl and summary.json; others nothing."""

    def __init__(self, out_dir: str, comm: MPI.Comm, verbose: bool = False) -> None:
        """Collective: rank 0 creates `out_dir` and opens metrics.jsonl; every rank raises if it failed."""
        self.out_dir, self.comm, self.verbose = out_dir, comm, verbose
        self.rank = comm.Get_rank()
        self._metrics: TextIO | None = None
        self._start = time.perf_counter()
        error = self._open() if self.rank == 0 else None
        # rank 0's verdict (None or the error text) goes to every rank, so all of them stop together
        error = comm.bcast(error, root=0)
        if error is not None:
            raise RunDirError(error)

    def _open(self) -> str | None:
        """Rank 0: create the directory and open metrics.jsonl for appending; the error text on failure."""
        try:
            os.makedirs(self.out_dir, exist_ok=True)
            self._metrics = open(self.path("metrics.jsonl"), "a", encoding="utf-8")
        except OSError as exc:
            return f"run directory {self.out_dir!r} is not writable: {exc}"
        return None

    def rebind(self, comm: MPI.Comm) -> None:
        """Report on `comm` from now on (elastic recovery): its rank 0 writes, opening metrics.jsonl if new to it."""
        self.comm, self.rank = comm, comm.Get_rank()
        if self.rank == 0 and self._metrics is None:
            error = self._open()
            if error is not None:
                raise RunDirError(error)

    def path(self, name: str) -> str:
        """The path of file `name` in the run directory."""
        return os.path.join(self.out_dir, name)

    def write_config(self, config: dict[str, Any]) -> None:
        """Rank 0: write config.json atomically."""
        if self.rank == 0:
            atomic_write_json(self.path("config.json"), config)

    def log(self, record: dict[str, Any]) -> None:
        """Rank 0: append `record` (plus `time_s` since this RunLog started) as one line of metrics.jsonl."""
        if self._metrics is None:
            return
        line = {"time_s": round(time.perf_counter() - self._start, 6)} | record
        self._metrics.write(json.dumps(line, default=_json_default) + "\n")
        self._metrics.flush()

    def write_summary(self, summary: dict[str, Any]) -> None:
        """Rank 0: write summary.json atomically."""
        if self.rank == 0:
            atomic_write_json(self.path("summary.json"), summary)

    def info(self, msg: str) -> None:
        """Print `msg` on rank 0; with verbose=True on every rank, prefixed `[rank r]`."""
        if self.verbose:
            print(f"[rank {self.rank}] {msg}", flush=True)
        elif self.rank == 0:
            print(msg, flush=True)

    def close(self) -> None:
        """Close metrics.jsonl (rank 0); safe to call twice."""
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- timeline ----------------------------------------------------------------------------------


class _Span:
    """Context manager that stores one complete event when it exits."""

    __slots__ = ("timeline", "name", "cat", "args", "t0")

    def __init__(self, timeline: Timeline, name: str, cat: str, args: dict[str, Any] | None) -> None:
        self.timeline, self.name, self.cat, self.args = timeline, name, cat, args

    def __enter__(self) -> _Span:
        self.t0 = time.perf_counter_ns()
        return self

    def __exit__(self, *exc: object) -> None:
        t1 = time.perf_counter_ns()
        self.timeline._add(("X", self.name, self.cat, self.t0, t1 - self.t0, self.args))


_NULL_SPAN = contextlib.nullcontext()  # reusable: what span() returns when the timeline is disabled


def maybe_span(timeline: "Timeline | None", name: str, cat: str = "compute",
               args: dict[str, Any] | None = None) -> ContextManager[Any]:
    """timeline.span(...) for an optional timeline: a no-op when there is none."""
    return _NULL_SPAN if timeline is None else timeline.span(name, cat, args)


class Timeline:
    """Per-rank spans on a clock all ranks start together; `write` makes one Chrome trace on rank 0."""

    def __init__(self, comm: MPI.Comm, enabled: bool = True, max_events: int = MAX_EVENTS) -> None:
        """Collective when enabled (a barrier, then the shared start time); `enabled` must agree."""
        self.comm, self.enabled, self.max_events = comm, enabled, max_events
        self.rank = comm.Get_rank()
        self.events: list[tuple[Any, ...]] = []
        self.dropped = 0
        self._lock = threading.Lock()
        if enabled:
            # all ranks leave the barrier at about the same moment: that moment is time zero everywhere
            comm.Barrier()
        self.start_ns = time.perf_counter_ns()

    def span(self, name: str, cat: str = "compute", args: dict[str, Any] | None = None) -> ContextManager[Any]:
        """`with tl.span("forward"):` records one complete event; a no-op when disabled."""
        if not self.enabled:
            return _NULL_SPAN
        return _Span(self, name, cat, args)

    def instant(self, name: str, cat: str = "mark", args: dict[str, Any] | None = None) -> None:
        """Record a point in time (an instant event)."""
        if self.enabled:
            self._add(("i", name, cat, time.perf_counter_ns(), 0, args))

    def _add(self, event: tuple[Any, ...]) -> None:
        """Store an event, or count it as dropped once `max_events` are stored."""
        with self._lock:
            if len(self.events) < self.max_events:
                self.events.append(event)
            else:
                self.dropped += 1

    def rebind(self, comm: MPI.Comm) -> None:
        """Gather on `comm` at the end (elastic recovery); events keep this rank's original number."""
        self.comm = comm

    def write(self, path: str) -> None:
        """Collective: gather every rank's events to rank 0, which writes the Chrome trace to `path`."""
        if not self.enabled:
            return
        mine = (self.rank, self.start_ns, self.events, self.dropped)
        # every rank's plain list of events goes to rank 0 (a list of those on rank 0, None elsewhere)
        everyone = self.comm.gather(mine, root=0)
        error = None
        if self.comm.Get_rank() == 0:  # (self.rank stays the rank the timeline started on, after a rebind too)
            try:
                atomic_write_json(path, chrome_trace(everyone))
            except OSError as exc:
                error = f"cannot write trace {path!r}: {exc}"
        # rank 0's outcome goes to every rank, so a failed write raises everywhere
        error = self.comm.bcast(error, root=0)
        if error is not None:
            raise OSError(error)


def _thread_ids(per_rank: list[tuple[int, int, list[tuple[Any, ...]], int]]) -> dict[str, int]:
    """One small thread id per category, the same on every rank: compute 0, comm 1, others after."""
    seen = {event[2] for _, _, events, _ in per_rank for event in events}
    order = [c for c in KNOWN_CATEGORIES if c in seen] + sorted(seen - set(KNOWN_CATEGORIES))
    return {cat: tid for tid, cat in enumerate(order)}


def chrome_trace(per_rank: list[tuple[int, int, list[tuple[Any, ...]], int]]) -> dict[str, Any]:
    """Trace Event Format from (rank, start_ns, events, dropped) per rank: pid = rank, tid = category."""
    tids = _thread_ids(per_rank)
    out: list[dict[str, Any]] = []
    dropped: dict[str, int] = {}
    for rank, start_ns, events, n_dropped in per_rank:
        out.append({"ph": "M", "name": "process_name", "pid": rank, "tid": 0, "args": {"name": f"rank {rank}"}})
        out.append({"ph": "M", "name": "process_sort_index", "pid": rank, "tid": 0, "args": {"sort_index": rank}})
        for cat in sorted({e[2] for e in events}, key=tids.__getitem__):
            out.append({"ph": "M", "name": "thread_name", "pid": rank, "tid": tids[cat], "args": {"name": cat}})
        if n_dropped:
            dropped[str(rank)] = n_dropped
            out.append({"ph": "M", "name": "process_labels", "pid": rank, "tid": 0,
                        "args": {"labels": f"{n_dropped} events dropped (cap reached)"}})
        for ph, name, cat, t0, dur, args in events:
            event = {"ph": ph, "name": name, "cat": cat, "pid": rank, "tid": tids[cat],
                     "ts": (t0 - start_ns) / 1000.0}
            if ph == "X":
                event["dur"] = dur / 1000.0
            else:
                event["s"] = "t"  # instant scoped to its thread
            if args:
                event["args"] = args
            out.append(event)
    meta = {"ranks": len(per_rank), "dropped_events": dropped,
            "dropped_total": sum(dropped.values()), "clock": "perf_counter_ns after a barrier"}
    return {"traceEvents": out, "displayTimeUnit": "ms", "otherData": meta}

