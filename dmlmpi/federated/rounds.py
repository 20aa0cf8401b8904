"""Pure round planning for the federated simulation: who is sampled, who drops, who is late, who hosts whom.

Everything here is a function of the seed and the round number only, never of the world size, so
that the same seed samples the same clients, drops the same ones and trains them on the same data
whether the simulation runs on 1 rank or 8.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Streams of the seeded generators, so that sampling, dropouts and speeds never share random numbers.
SAMPLE, DROPOUT, SPEED, JITTER, SHUFFLE, NOISE, COUNT_NOISE = range(7)


def rng(seed: int, *keys: int) -> np.random.Generator:
    """A generator for (seed, stream, round, client, ...): independent streams from one seed."""
    return np.random.default_rng([seed, *keys])


def sample_size(clients: int, fraction: float) -> int:
    """Clients per round: round(fraction * clients), at least 1 (Flower rounds down; we round to nearest)."""
    return max(1, int(round(fraction * clients)))


def sample_clients(seed: int, round_: int, clients: int, fraction: float) -> np.ndarray:
    """The round's clients, drawn without replacement by the server's seeded generator, sorted."""
    return np.sort(rng(seed, SAMPLE, round_).choice(clients, sample_size(clients, fraction), replace=False))


def drops_out(seed: int, round_: int, client: int, probability: float) -> bool:
    """Whether a client fails this round (decided by the client, independently per round)."""
    return probability > 0 and bool(rng(seed, DROPOUT, round_, client).random() < probability)


def client_seconds(seed: int, round_: int, client: int, steps: int, step_time: float, sigma: float) -> float:
    """Simulated seconds a client needs for `steps` local steps: a fixed per-client speed and per-round jitter.

    Device speeds are log-normal across clients (sigma) and vary a little per round (sigma / 2), so the
    same clients tend to be the stragglers, as in real fleets.
    """
    speed = rng(seed, SPEED, client).lognormal(0.0, sigma)
    jitter = rng(seed, JITTER, round_, client).lognormal(0.0, sigma / 2)
    return steps * step_time * speed * jitter


def local_steps(examples: int, epochs: int, batch: int) -> int:
    """Local SGD steps of a client: epochs x ceil(examples / batch); batch 0 means the whole dataset."""
    if examples == 0:
        return 0
    per_epoch = 1 if batch == 0 else -(-examples // batch)
    return epochs * per_epoch


def shuffle_seed(seed: int, round_: int, client: int) -> int:
    """Seed of a client's minibatch order in a round (the same on whichever rank trains it)."""
    # SeedSequence alone: half the cost of a Generator, and this runs once per client per round
    return int(np.random.SeedSequence([seed, SHUFFLE, round_, client]).generate_state(1, np.uint64)[0])


@dataclass(frozen=True)
class Layout:
    """How ranks are grouped: client groups of `ranks_per_client` ranks, groups gathered into edges."""

    world: int
    ranks_per_client: int
    edges: int  # edge aggregators between the groups and the server; 0 = groups report to the server directly

    @property
    def groups(self) -> int:
        """Number of client rank groups."""
        return self.world // self.ranks_per_client

    def group_of(self, rank: int) -> int:
        """The client group a rank belongs to."""
        return rank // self.ranks_per_client

    def edge_of(self, group: int) -> int:
        """The edge aggregator a group reports to (contiguous blocks of groups)."""
        return group * max(1, self.edges) // self.groups

    def host(self, client: int) -> int:
        """The group that hosts a client (its data and its state live there for the whole run)."""
        return client % self.groups


def check_layout(world: int, ranks_per_client: int, edges: int) -> Layout:
    """A layout, or ValueError saying why the world size cannot be grouped that way."""
    if ranks_per_client < 1 or world % ranks_per_client:
        raise ValueError(f"--ranks-per-client {ranks_per_client} must divide the {world} ranks of the job "
                         f"into equal client groups")
    groups = world // ranks_per_client
    if edges < 0 or edges > groups:
        raise ValueError(f"--edges {edges}: between 0 (no edge aggregators) and the {groups} client group(s)")
    return Layout(world, ranks_per_client, edges)
