"""Pipeline schedules as pure functions: for each rank, the ordered list of its actions.

P ranks hold P x V stages (V "virtual" stages, or chunks, per rank: stage = chunk * P + rank), M
microbatches flow through them. An action is the forward (F) or backward (B) of one microbatch on
one chunk, with where its input comes from and where its output goes. Sends are nonblocking; an
action waits only for the message it receives. `check` runs any schedule in one process and
proves what the executor relies on: dependencies respected, every send received, no deadlock, and
no rank holding more activations than the schedule promises.

- gpipe (Huang et al. 2019): all forwards, then all backwards. Holds M activations.
- 1f1b (PipeDream-Flush, Narayanan et al. 2021): P-1-rank warm-up forwards, then one forward and
  one backward alternately, then the remaining backwards. Holds at most P - rank.
- interleaved (Megatron-LM, Narayanan et al. 2021): 1F1B over V chunks per rank, forwards going
  through chunk 0 of every rank, then chunk 1, ...; a smaller bubble for more messages. Needs M to
  be a multiple of P.
- zb-h1 (Qi et al. 2024, "Zero Bubble Pipeline Parallelism"): the backward split in two, B (the
  input's gradient, which the previous stage waits for) and W (the weights' gradient, which nobody
  waits for). 1F1B's order of F and B, with rank r running each W r steps late: the W's fill the
  cool-down's idle time. With F, B and W of equal cost the bubble is (P-1)/(3M+P-1), a third of
  1F1B's; every rank holds up to min(P, M) microbatches (1F1B's first-stage peak) until their W.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb-h1")


@dataclass(frozen=True)
class Action:
    """Forward, backward or weight-gradient pass of microbatch `micro` on this rank's chunk `chunk` (model stage `stage`)."""

    op: str  # "F", "B" (the whole backward, or the input's gradient when the schedule has W's) or "W"
    micro: int
    chunk: int = 0
    stage: int = 0
    recv_from: int | None = None  # rank whose message this action needs (None: the first/last stage)
    send_to: int | None = None  # rank this action's output goes to (None: nothing to send)

    def __str__(self) -> str:
        return f"{self.op}{self.micro}" + (f".{self.chunk}" if self.chunk else "")


def _with_comms(rank: int, order: list[tuple[str, int, int]], P: int, V: int) -> list[Action]:
    """Actions of `rank` with their stage and the ranks they receive from and send to."""
    last = P * V - 1
    out = []
    for op, micro, chunk in order:
        stage = chunk * P + rank
        prev = (stage - 1) % P if stage > 0 else None  # activations come from the previous stage...
        nxt = (stage + 1) % P if stage < last else None  # ...and gradients from the next one
        # a W neither receives nor sends: its input (the output's gradient) came with the B
        recv, send = (prev, nxt) if op == "F" else (nxt, prev) if op == "B" else (None, None)
        out.append(Action(op, micro, chunk, stage, recv, send))
    return out


def _check_sizes(P: int, M: int, V: int = 1) -> None:
    """ValueError for sizes no schedule can run."""
    if P < 1 or M < 1 or V < 1:
        raise ValueError(f"pipeline schedule: stages, microbatches and chunks must be >= 1, got P={P}, M={M}, V={V}")


def gpipe(P: int, M: int, V: int = 1) -> list[list[Action]]:
    """Every rank: all M forwards, then all M backwards."""
    _check_sizes(P, M, V)
    if V != 1:
        raise ValueError("pipeline schedule gpipe: one chunk per rank (use interleaved for V > 1)")
    return [_with_comms(r, [("F", m, 0) for m in range(M)] + [("B", m, 0) for m in range(M)], P, 1)
            for r in range(P)]


def one_f_one_b(P: int, M: int, V: int = 1) -> list[list[Action]]:
    """Every rank: P-1-rank warm-up forwards, then alternate forward and backward, then the rest."""
    _check_sizes(P, M, V)
    if V != 1:
        raise ValueError("pipeline schedule 1f1b: one chunk per rank (use interleaved for V > 1)")
    schedules = []
    for r in range(P):
        warmup = min(P - 1 - r, M)
        order = [("F", m, 0) for m in range(warmup)]
        for i in range(M - warmup):
            order += [("F", warmup + i, 0), ("B", i, 0)]
        order += [("B", m, 0) for m in range(M - warmup, M)]
        schedules.append(_with_comms(r, order, P, 1))
    return schedules


def interleaved(P: int, M: int, V: int = 2) -> list[list[Action]]:
    """Megatron's interleaved 1F1B with V chunks per rank (M a multiple of P)."""
    _check_sizes(P, M, V)
    if M % P:
        raise ValueError(f"pipeline schedule interleaved: the microbatches ({M}) must be a multiple of the "
                         f"pipeline ranks ({P}); use M = {P * max(1, round(M / P))} or the 1f1b schedule")
    total = M * V

    def fwd(k: int) -> tuple[str, int, int]:
        # forwards run P microbatches through chunk 0, then the same P through chunk 1, ...
        return "F", (k // (P * V)) * P + k % P, (k // P) % V

    def bwd(k: int) -> tuple[str, int, int]:
        # backwards visit the chunks in reverse
        return "B", (k // (P * V)) * P + k % P, V - 1 - (k // P) % V

    schedules = []
    for r in range(P):
        warmup = min((P - r - 1) * 2 + (V - 1) * P, total)
        order = [fwd(k) for k in range(warmup)]
        for i in range(total - warmup):
            order += [fwd(warmup + i), bwd(i)]
        order += [bwd(k) for k in range(total - warmup, total)]
        schedules.append(_with_comms(r, order, P, V))
    return schedules


def zb_h1(P: int, M: int, V: int = 1) -> list[list[Action]]:
    """Zero-bubble ZB-H1: 1F1B's F and B order, and rank r's weight passes W running r steps behind its B's."""
    _check_sizes(P, M, V)
    if V != 1:
        raise ValueError("pipeline schedule zb-h1: one chunk per rank")
    schedules = []
    for r, actions in enumerate(one_f_one_b(P, M)):
        cooldown = M - min(P - 1 - r, M)  # index of the first B after 1F1B's last forward
        order, w = [], 0  # w: the next microbatch whose W is due
        for a in actions:
            order.append((a.op, a.micro, 0))
            # rank 0 runs each W right after its B; rank r holds its first r back, and in the
            # cool-down, where it would wait between B's for the next stage, runs one after each B
            if a.op == "B" and (a.micro >= r or a.micro >= cooldown):
                order.append(("W", w, 0))
                w += 1
        order += [("W", m, 0) for m in range(w, M)]
        schedules.append(_with_comms(r, order, P, 1))
    return schedules


BUILDERS: dict[str, Callable[..., list[list[Action]]]] = {"gpipe": gpipe, "1f1b": one_f_one_b,
                                                          "interleaved": interleaved, "zb-h1": zb_h1}


def build(name: str, P: int, M: int, V: int = 1) -> list[list[Action]]:
    """The named schedule's actions for every rank."""
    if name not in BUILDERS:
        raise ValueError(f"unknown pipeline schedule {name!r}; choose from {', '.join(SCHEDULES)}")
    return BUILDERS[name](P, M, V)


def promised_activations(name: str, P: int, M: int, V: int, rank: int) -> int:
    """Most (microbatch, chunk) activations `rank` holds at once under the named schedule."""
    if name == "gpipe":
        return M
    if name == "1f1b":
        return min(P - rank, M)
    if name == "zb-h1":
        # rank r runs P-1-r forwards, then each step adds one forward and (after r steps) retires one W
        return min(P, M)
    return min((P - rank - 1) * 2 + (V - 1) * P + 1, M * V)


@dataclass
class Report:
    """What check() found: the most activations each rank held, and the simulated times."""

    max_held: list[int]
    makespan: float  # simulated time of the whole step (forward 1, backward `backward_cost`, B and W half each)
    busy: list[float]  # simulated compute time per rank

    def bubble(self) -> float:
        """Fraction of rank-time spent idle in the simulation."""
        return 1.0 - sum(self.busy) / (len(self.busy) * self.makespan)

    def busiest_idle(self) -> float:
        """Idle fraction of the rank with the most compute (the bubble `bench pipeline` reports)."""
        return 1.0 - max(self.busy) / self.makespan


def check(schedules: list[list[Action]], P: int, M: int, V: int = 1, promise: list[int] | None = None,
          backward_cost: float = 2.0, cost: Callable[[int, Action], float] | None = None) -> Report:
    """Run the schedule in one process (sends never block); ValueError naming what is wrong.

    Actions take 1 (forward) and `backward_cost` (backward; half of it each for B and W when the
    schedule splits the backward), or cost(rank, action) when given: with measured durations this
    replays a step as it would run with free, instant messages. An activation is held from its F
    to its backward, or to its W when there is one (the weights' gradient needs the saved inputs).
    """
    if len(schedules) != P:
        raise ValueError(f"schedule has {len(schedules)} ranks, expected {P}")
    split = any(a.op == "W" for actions in schedules for a in actions)
    ops = "FBW" if split else "FB"
    for r, actions in enumerate(schedules):
        expected = {(op, m, c) for op in ops for m in range(M) for c in range(V)}
        got = [(a.op, a.micro, a.chunk) for a in actions]
        if sorted(got) != sorted(expected):
            raise ValueError(f"rank {r}: actions are not each of {', '.join(ops)} exactly once per microbatch: "
                             f"{list(map(str, actions))}")
        done: set[tuple[str, int, int]] = set()
        for a in actions:
            before = {"F": None, "B": "F", "W": "B"}[a.op]
            if before is not None and (before, a.micro, a.chunk) not in done:
                raise ValueError(f"rank {r}: {a} before {before}{a.micro}" + (f".{a.chunk}" if a.chunk else ""))
            if a.op == "W" and (a.recv_from is not None or a.send_to is not None):
                raise ValueError(f"rank {r}: weight pass {a} cannot receive or send")
            done.add((a.op, a.micro, a.chunk))
    # timed simulation: an action starts when its rank is free and its message has arrived
    pos, free_at = [0] * P, [0.0] * P
    sent: dict[tuple[str, int, int, int], float] = {}  # (op, micro, stage it goes to, to rank) -> time sent
    received: set[tuple[str, int, int, int]] = set()
    held, max_held, busy = [0] * P, [0] * P, [0.0] * P
    last_stage = P * V - 1
    while any(pos[r] < len(schedules[r]) for r in range(P)):
        progressed = False
        for r in range(P):
            if pos[r] >= len(schedules[r]):
                continue
            a = schedules[r][pos[r]]
            ready = free_at[r]
            if a.recv_from is not None:
                source_stage = a.stage - 1 if a.op == "F" else a.stage + 1
                key = (a.op, a.micro, a.stage, r)
                if key not in sent:
                    continue  # its message is not sent yet: this rank waits
                if source_stage % P != a.recv_from:
                    raise ValueError(f"rank {r}: {a} receives from rank {a.recv_from}, but stage {source_stage} is on rank {source_stage % P}")
                received.add(key)
                ready = max(ready, sent[key])
            if cost is not None:
                took = cost(r, a)
            else:
                took = 1.0 if a.op == "F" else backward_cost / 2 if split else backward_cost
            free_at[r] = ready + took
            busy[r] += took
            if a.send_to is not None:
                to_stage = a.stage + 1 if a.op == "F" else a.stage - 1
                if not 0 <= to_stage <= last_stage or to_stage % P != a.send_to:
                    raise ValueError(f"rank {r}: {a} sends to rank {a.send_to}, not stage {to_stage}'s rank")
                sent[(a.op, a.micro, to_stage, a.send_to)] = free_at[r]
            # an activation is freed by the backward pass that last needs it: W when there is one
            held[r] += 1 if a.op == "F" else -1 if a.op == ("W" if split else "B") else 0
            max_held[r] = max(max_held[r], held[r])
            pos[r] += 1
            progressed = True
        if not progressed:
            stuck = {r: str(schedules[r][pos[r]]) for r in range(P) if pos[r] < len(schedules[r])}
            raise ValueError(f"deadlock: every unfinished rank waits for a message never sent: {stuck}")
    if set(sent) != received:
        raise ValueError(f"messages sent but never received: {sorted(set(sent) - received)[:5]}")
    if promise is not None:
        for r in range(P):
            if max_held[r] > promise[r]:
                raise ValueError(f"rank {r} holds {max_held[r]} activations, more than the promised {promise[r]}")
    return Report(max_held, max(free_at), busy)
