"""`python -m dmlmpi.plot RUN_DIR [--out DIR]`: PNGs of a run's metrics.jsonl and trace.json.

Writes `loss.png` (training loss, and test loss when logged), `accuracy.png` (test accuracy, when
logged), `staleness.png` (parameter-server runs: histogram of update staleness), `rounds.png` (federated runs:
clients answered / dropped / late, bytes up and down and epsilon per round), `schedule.png`
(pipeline runs: the executed schedule of the last step as a Gantt chart) and `timeline.png` (one row per rank, one bar per span coloured by category, a window of
the trace when it is long). A missing input is skipped with a note; neither one -> exit status 2.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from typing import Any

CATEGORY_COLORS = {"compute": "tab:blue", "comm": "tab:orange"}
OTHER_COLORS = ["tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:gray", "tab:olive", "tab:cyan"]
STEP_NAME = re.compile(r"^(train[ _])?step\b", re.IGNORECASE)  # spans that mark one training step


def note(msg: str) -> None:
    """A remark on stderr (stdout lists the files written)."""
    print(f"dmlmpi.plot: {msg}", file=sys.stderr)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(prog="python -m dmlmpi.plot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory with metrics.jsonl and/or trace.json")
    p.add_argument("--out", default=None, help="folder for the PNGs (default: RUN_DIR)")
    p.add_argument("--window-ms", type=float, default=250.0,
                   help="a longer trace is drawn as its last 2 steps, or else its first this many ms")
    return p.parse_args(argv)


# ---- metrics -----------------------------------------------------------------------------------


def _number(value: Any) -> bool:
    """Whether `value` is a real finite number (bools and NaN are not)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_metrics(path: str) -> list[dict[str, Any]]:
    """The JSON objects of a .jsonl file; lines that are not objects are skipped with a note."""
    records, bad = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if isinstance(record, dict):
                records.append(record)
            else:
                bad += 1
    if bad:
        note(f"{path}: skipped {bad} line(s) that are not JSON objects")
    return records


def x_key(records: list[dict[str, Any]], ykey: str, prefer: tuple[str, ...]) -> str | None:
    """The first key of `prefer` that some record holding `ykey` has as a number."""
    for key in prefer:
        if any(_number(r.get(ykey)) and _number(r.get(key)) for r in records):
            return key
    return None


def series(records: list[dict[str, Any]], ykey: str, xkey: str | None) -> tuple[list[float], list[float]]:
    """(x, y) of the records with a numeric `ykey`; a record without `xkey` takes the last one seen before it."""
    xs, ys, last_x = [], [], None
    for i, r in enumerate(records):
        if xkey is None:
            x = i
        elif _number(r.get(xkey)):
            x = last_x = r[xkey]
        else:
            x = last_x
        if x is not None and _number(r.get(ykey)):
            xs.append(x)
            ys.append(r[ykey])
    return xs, ys


def plot_loss(records: list[dict[str, Any]], path: str) -> bool:
    """loss.png: training loss (and test loss) against step or epoch; False if there is no loss."""
    name = "loss" if any(_number(r.get("loss")) for r in records) else "train_loss"  # fl runs: per round
    xkey = x_key(records, name, ("step", "epoch", "round"))
    train = series(records, name, xkey)
    test = series(records, "test_loss", xkey or x_key(records, "test_loss", ("step", "epoch", "round")))
    if not train[0] and not test[0]:
        return False
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for (xs, ys), label in ((train, "training loss"), (test, "test loss")):
        if xs:
            ax.plot(xs, ys, marker="o" if len(xs) <= 50 else None, markersize=3, label=label)
    ax.set_xlabel(xkey or "record")
    ax.set_ylabel("loss")
    if all(y > 0 for y in train[1] + test[1]) and max(train[1] + test[1]) > 20 * min(train[1] + test[1]):
        ax.set_yscale("log")
    ax.set_title("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_accuracy(records: list[dict[str, Any]], path: str) -> bool:
    """accuracy.png: test accuracy against epoch (or step); False if none was logged."""
    xkey = x_key(records, "test_accuracy", ("epoch", "step", "round"))
    xs, ys = series(records, "test_accuracy", xkey)
    if not xs:
        return False
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(xs, ys, marker="o" if len(xs) <= 50 else None, markersize=3, color="tab:green")
    ax.set_xlabel(xkey or "record")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"test accuracy (last {ys[-1]:.4f}, best {max(ys):.4f})")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_staleness(records: list[dict[str, Any]], path: str) -> bool:
    """staleness.png: histogram of the parameter servers' update staleness; False if none was logged."""
    servers = [r for r in records if r.get("role") == "server" and isinstance(r.get("staleness"), list)]
    values = [[v for v in r["staleness"] if _number(v)] for r in servers]
    if not any(values):
        return False
    import matplotlib.pyplot as plt
    top = max(max(v) for v in values if v)
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(values)
    for i, (record, vals) in enumerate(zip(servers, values)):
        counts = [sum(1 for v in vals if v == k) for k in range(int(top) + 1)]
        ax.bar([k - 0.4 + width * (i + 0.5) for k in range(int(top) + 1)], counts, width=width,
               label=f"server rank {record.get('rank', i)}")
    ax.set_xlabel("staleness (server version at update - version the gradient was computed on)")
    ax.set_ylabel("gradients")
    total = sum(len(v) for v in values)
    ax.set_title(f"staleness of {total} gradients (mean {sum(map(sum, values)) / total:.2f}, max {top})")
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---- timeline ----------------------------------------------------------------------------------


def plot_rounds(records: list[dict[str, Any]], path: str) -> bool:
    """rounds.png (federated runs): clients that answered, dropped or were late, and bytes, per round."""
    rows = [r for r in records if _number(r.get("round")) and _number(r.get("participants"))]
    if not rows:
        return False
    import matplotlib.pyplot as plt
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    x = [r["round"] for r in rows]
    answered = [r["participants"] for r in rows]
    dropped = [r.get("dropped", 0) for r in rows]
    late = [r.get("late", 0) for r in rows]
    top.bar(x, answered, color="tab:green", label="answered")
    top.bar(x, dropped, bottom=answered, color="tab:red", label="dropped out")
    top.bar(x, late, bottom=[a + d for a, d in zip(answered, dropped)], color="tab:orange", label="missed deadline")
    skipped = [r["round"] for r in rows if r.get("skipped")]
    if skipped:
        top.plot(skipped, [0] * len(skipped), "kx", label="round skipped")
    top.set_ylabel("sampled clients")
    top.legend(fontsize=8)
    top.set_title("federated rounds")
    bottom.plot(x, [r.get("bytes_up", 0) / 2**20 for r in rows], label="up (clients to server)")
    bottom.plot(x, [r.get("bytes_down", 0) / 2**20 for r in rows], label="down (server to clients)")
    bottom.set_ylabel("MiB per round")
    bottom.set_xlabel("round")
    if any(_number(r.get("epsilon")) for r in rows):
        eps = bottom.twinx()
        eps.plot(*series(rows, "epsilon", "round"), color="tab:purple", linestyle="--", label="epsilon")
        eps.set_ylabel("privacy spent (epsilon)")
        eps.legend(loc="lower right", fontsize=8)
    bottom.legend(loc="upper left", fontsize=8)
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def read_spans(trace: dict[str, Any]) -> tuple[list[tuple[int, str, str, float, float]], list[tuple[int, float]]]:
    """Complete events as (rank, category, name, start ms, duration ms) and instants as (rank, ms)."""
    spans, instants = [], []
    for e in trace.get("traceEvents", []):
        if not isinstance(e, dict) or not _number(e.get("ts")) or not isinstance(e.get("pid"), int):
            continue
        if e.get("ph") == "X" and _number(e.get("dur")):
            spans.append((e["pid"], str(e.get("cat", "other")), str(e.get("name", "")),
                          e["ts"] / 1000.0, max(0.0, e["dur"]) / 1000.0))
        elif e.get("ph") in ("i", "I"):
            instants.append((e["pid"], e["ts"] / 1000.0))
    return spans, instants


def choose_window(spans: list[tuple[int, str, str, float, float]], window_ms: float) -> tuple[float, float, str]:
    """(start ms, end ms, description): the whole trace, its last 2 steps, or its first window_ms."""
    lo = min(s[3] for s in spans)
    hi = max(s[3] + s[4] for s in spans)
    if hi - lo <= window_ms:
        return lo, hi, f"whole trace, {hi - lo:.1f} ms"
    first_rank = min(s[0] for s in spans)
    steps = sorted((s for s in spans if s[0] == first_rank and (s[1] == "step" or STEP_NAME.match(s[2]))),
                   key=lambda s: s[3])
    if steps:
        last = steps[-2:]
        return (last[0][3], last[-1][3] + last[-1][4],
                f"last {len(last)} of {len(steps)} steps (trace is {hi - lo:.0f} ms)")
    return lo, lo + window_ms, f"first {window_ms:g} ms of {hi - lo:.0f} ms"


def category_colors(categories: list[str]) -> dict[str, str]:
    """compute blue, comm orange, every other category its own colour."""
    others = iter(OTHER_COLORS * (1 + len(categories) // len(OTHER_COLORS)))
    return {c: CATEGORY_COLORS.get(c) or next(others) for c in categories}


def plot_timeline(trace: dict[str, Any], path: str, window_ms: float) -> bool:
    """timeline.png: one row per rank, a lane per category, a bar per span; False if no spans."""
    spans, instants = read_spans(trace)
    if not spans:
        return False
    lo, hi, window = choose_window(spans, window_ms)
    ranks = sorted({s[0] for s in spans})
    present = {s[1] for s in spans}
    cats = [c for c in CATEGORY_COLORS if c in present] + sorted(present - set(CATEGORY_COLORS))
    colors = category_colors(cats)
    lane_h = 0.8 / len(cats)
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(11, 1.2 + 0.55 * len(ranks) * max(1, len(cats) / 2)))
    for row, rank in enumerate(ranks):
        for lane, cat in enumerate(cats):
            # spans that overlap the window, clipped to it
            bars = [(max(s[3], lo), min(s[3] + s[4], hi) - max(s[3], lo)) for s in spans
                    if s[0] == rank and s[1] == cat and s[3] <= hi and s[3] + s[4] >= lo]
            if bars:
                y = row - 0.4 + lane * lane_h
                ax.broken_barh(bars, (y, lane_h * 0.9), facecolors=colors[cat], linewidth=0, label=cat)
        marks = [t for r, t in instants if r == rank and lo <= t <= hi]
        if marks:
            ax.vlines(marks, row - 0.45, row + 0.45, colors="black", linewidth=0.8)
    ax.set_yticks(range(len(ranks)), [f"rank {r}" for r in ranks])
    ax.set_ylim(len(ranks) - 0.5, -0.5)  # rank 0 on top
    ax.set_xlim(lo, hi if hi > lo else lo + 1e-3)
    ax.set_xlabel("time (ms)")
    dropped = (trace.get("otherData") or {}).get("dropped_total") or 0
    ax.set_title(f"timeline: {window}" + (f"; {dropped} events dropped" if dropped else ""))
    ax.grid(axis="x", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))  # one legend entry per category
    ax.legend(unique.values(), unique.keys(), loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


PIPELINE_OPS = {"forward": "F", "backward": "B", "weight": "W"}  # trace category -> pipeline action


def pipeline_blocks(trace: dict[str, Any]) -> list[tuple[int, str, int, int, float, float]]:
    """Pipeline actions of the last training step: (rank, F/B/W, microbatch, stage, start ms, duration ms)."""
    blocks = []
    for e in trace.get("traceEvents", []):
        args = e.get("args") if isinstance(e, dict) else None
        if (e.get("ph") == "X" and e.get("cat") in PIPELINE_OPS and isinstance(args, dict)
                and isinstance(args.get("micro"), int) and _number(e.get("ts")) and _number(e.get("dur"))):
            blocks.append((e["pid"], PIPELINE_OPS[e["cat"]], args["micro"],
                           int(args.get("stage", e["pid"])), e["ts"] / 1000.0, e["dur"] / 1000.0))
    if not blocks:
        return []
    spans, _ = read_spans(trace)
    last_step = {}  # rank -> start of its last training step
    for rank, cat, _, t0, _ in spans:
        if cat == "step":
            last_step[rank] = max(t0, last_step.get(rank, t0))
    if last_step:  # each rank's actions from where it began its last step (replicas of a hybrid grid
        # drift apart: one may begin the last step while another still finishes the one before)
        start = min(last_step.values())
        blocks = [b for b in blocks if b[4] >= last_step.get(b[0], start) - 1e-6]
    return blocks


def plot_schedule(trace: dict[str, Any], path: str) -> bool:
    """schedule.png: the executed pipeline schedule as a Gantt chart (rows: ranks; blocks: microbatches)."""
    blocks = pipeline_blocks(trace)
    if not blocks:
        return False
    import matplotlib.pyplot as plt
    ranks = sorted({b[0] for b in blocks})
    micros = sorted({b[2] for b in blocks})
    cmap = plt.get_cmap("tab20")
    lo = min(b[4] for b in blocks)
    fig, ax = plt.subplots(figsize=(12, 1.2 + 0.6 * len(ranks)))
    for rank, op, micro, stage, t0, dur in blocks:
        color = cmap((2 * micro) % 20 if op == "F" else (2 * micro + 1) % 20)
        ax.broken_barh([(t0 - lo, dur)], (ranks.index(rank) - 0.4, 0.8), facecolors=color,
                       edgecolors="black", linewidth=0.4, hatch={"F": None, "B": "//", "W": ".."}[op])
        if dur > 0:
            ax.text(t0 - lo + dur / 2, ranks.index(rank), f"{op}{micro}", ha="center", va="center", fontsize=7)
    ax.set_yticks(range(len(ranks)), [f"rank {r}" for r in ranks])
    ax.set_ylim(len(ranks) - 0.5, -0.5)
    ax.set_xlabel("time in the step (ms), measured")
    ax.set_title(f"executed pipeline schedule, last step: {len(micros)} microbatches "
                 "(plain = forward, hatched = backward, dotted = weight gradient)")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---- command line ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Write the PNGs for one run directory and print their paths; 2 if there is nothing to read."""
    args = parse_args(argv)
    metrics_path = os.path.join(args.run_dir, "metrics.jsonl")
    trace_path = os.path.join(args.run_dir, "trace.json")
    have_metrics, have_trace = os.path.isfile(metrics_path), os.path.isfile(trace_path)
    if not have_metrics and not have_trace:
        print(f"dmlmpi.plot: error: neither metrics.jsonl nor trace.json in {args.run_dir!r}", file=sys.stderr)
        return 2
    import matplotlib
    matplotlib.use("Agg")
    out = args.out or args.run_dir
    os.makedirs(out, exist_ok=True)
    written = []
    if have_metrics:
        records = read_metrics(metrics_path)
        for name, fn, what in (("loss.png", plot_loss, "loss"), ("accuracy.png", plot_accuracy, "test_accuracy")):
            if fn(records, os.path.join(out, name)):
                written.append(os.path.join(out, name))
            else:
                note(f"no {what} in {metrics_path}: {name} skipped")
        if plot_staleness(records, os.path.join(out, "staleness.png")):  # parameter-server runs only
            written.append(os.path.join(out, "staleness.png"))
        if plot_rounds(records, os.path.join(out, "rounds.png")):  # federated runs only
            written.append(os.path.join(out, "rounds.png"))
    else:
        note(f"no {metrics_path}: loss.png and accuracy.png skipped")
    if have_trace:
        try:
            with open(trace_path, encoding="utf-8") as f:
                trace = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            note(f"{trace_path} is not valid JSON ({exc}): timeline.png skipped")
            trace = None
        if isinstance(trace, list):  # the trace format also allows a bare array of events
            trace = {"traceEvents": trace}
        if isinstance(trace, dict):
            if plot_timeline(trace, os.path.join(out, "timeline.png"), args.window_ms):
                written.append(os.path.join(out, "timeline.png"))
            else:
                note(f"no complete events in {trace_path}: timeline.png skipped")
            if plot_schedule(trace, os.path.join(out, "schedule.png")):  # pipeline runs only
                written.append(os.path.join(out, "schedule.png"))
    else:
        note(f"no {trace_path}: timeline.png skipped")
    for path in written:
        print(path)
    if not written:
        print(f"dmlmpi.plot: error: nothing to plot in {args.run_dir!r}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
