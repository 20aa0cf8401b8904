"""Federated learning simulated on MPI: a server rank, client rank groups, rounds.

Rank 0 is the server; it also trains clients, like every other rank (a dedicated server rank would
idle while the clients train). The ranks form client groups of --ranks-per-client ranks. Every rank
holds the whole (small) dataset, so the round's sampled clients are dealt out evenly over the
groups; a client with state across rounds (SCAFFOLD's control variate) always trains on the group
that hosts it, k % groups, where its state lives. One round:

1. the server's global weights go to every rank (one broadcast);
2. the server samples clients with its seeded generator (every rank draws the same sample from the
   same seed rather than receiving it); each group trains the sampled clients it hosts, one after
   another, on one rank or data-parallel over the group's ranks; a client may drop out or miss the
   deadline instead;
3. each group leader adds up its clients' weighted deltas (float64) and the sums are reduced to the
   server, through edge aggregators when --edges is set; strategies that need every delta (median,
   trimmed mean, Krum, Bulyan) gather them instead, and secure aggregation sums masked integers;
4. the server aggregates with the strategy (adding DP noise when asked) and evaluates.

The sampled clients, their data, their minibatch order and their dropouts depend on the seed and
the round only, so the same seed gives the same accuracy curve on any number of ranks (up to the
order of floating-point additions in the reduction).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable

import numpy as np
import torch
from mpi4py import MPI
from torch import nn

from dmlmpi import comm as dcomm
from dmlmpi.data import Dataset
from dmlmpi.federated import partition as fl_partition
from dmlmpi.federated import fairness, privacy, rounds
from dmlmpi.federated.client import LocalResult, LocalTrainer, small_batch_kernels
from dmlmpi.federated.secure import SecureRound
from dmlmpi.federated.strategy import STRATEGIES, ClientResult, Strategy, Sums, make
from dmlmpi.telemetry import Timeline, maybe_span

SERVER = 0  # world rank of the server


@dataclass
class FLConfig:
    """Options of a federated simulation (the --mode fl command line sets the same names)."""

    clients: int = 100
    fraction: float = 0.1
    rounds: int = 150
    local_epochs: int = 5
    local_batch: int = 10  # 0: the client's whole dataset per step (FedSGD with local_epochs 1)
    client_lr: float = 0.1
    client_momentum: float = 0.9
    client_data: str = "iid"
    alpha: float = 0.5  # Dirichlet concentration (partition "dirichlet")
    shards_per_client: int = 2  # partition "shards"
    strategy: str = "fedavg"
    server_lr: float | None = None  # None: the strategy's own default
    server_momentum: float = 0.9  # fedavgm
    mu: float = 0.01  # fedprox
    trim: float = 0.1  # trimmed_mean: fraction cut from each end
    krum_f: int = 0  # krum: tolerated Byzantine clients
    qffl_q: float = 0.2  # qfedavg: fairness exponent q
    qffl_lr: float = 0.0  # qfedavg: step size 1/L (0: the clients' learning rate, as in the paper)
    dropout: float = 0.0  # probability that a sampled client fails in a round
    deadline: float = 0.0  # simulated seconds; clients slower than this are not waited for (0: no deadline)
    step_time: float = 0.01  # simulated seconds of one local step on a median-speed client
    speed_sigma: float = 0.5  # spread (log-normal sigma) of client speeds
    min_clients: int = 1  # fewer answers than this: the round is skipped
    ranks_per_client: int = 1
    edges: int = 0
    secagg: bool = False
    secagg_clip: float = 1.0  # fixed-point range [-clip, clip] of each update coordinate
    secagg_neighbours: int = 0  # 0: every client masks with every other (SecAgg); k: SecAgg+ k-regular graph
    secagg_threshold: float = 0.5  # Shamir threshold as a fraction of a client's neighbours (t = floor(f*k) + 1)
    dp_clip: float = 0.0  # L2 clip of each client update (DP-FedAvg); 0: no differential privacy
    dp_noise: float = 0.0  # noise multiplier z: std of the noise on the sum is z * dp_clip
    dp_delta: float = 1e-5
    dp_adaptive: bool = False  # adaptive clipping: --dp-clip is the first clip, then it follows a quantile
    dp_target_quantile: float = 0.5  # the fraction of clients whose update the clip should leave whole
    dp_clip_lr: float = 0.2  # eta of the clip's geometric update
    dp_count_noise: float | None = None  # sigma_b of the unclipped count; None: clients per round / 20
    seed: int = 0
    eval_every: int = 1

    @classmethod
    def from_args(cls, args: Any) -> "FLConfig":
        """The options of an argparse namespace that has the same names."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})

    def check(self, world_size: int, train_samples: int | None) -> rounds.Layout:
        """Raise ValueError naming the option when a value cannot work; return the rank layout."""
        positive = ["clients", "rounds", "local_epochs", "client_lr", "step_time", "eval_every", "secagg_clip"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in ["local_batch", "speed_sigma", "deadline", "mu", "krum_f", "dp_clip", "dp_noise",
                     "secagg_neighbours", "alpha", "qffl_q", "qffl_lr"]:
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must not be negative, got {getattr(self, name)}")
        if not 0 < self.fraction <= 1:
            raise ValueError(f"--fraction must be in (0, 1], got {self.fraction}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"--dropout must be in [0, 1), got {self.dropout}")
        if not 0 <= self.client_momentum < 1:
            raise ValueError(f"--client-momentum must be in [0, 1), got {self.client_momentum}")
        if not 0 < self.secagg_threshold < 1:
            raise ValueError(f"--secagg-threshold must be in (0, 1), got {self.secagg_threshold}")
        if not 0 < self.dp_delta < 1:
            raise ValueError(f"--dp-delta must be in (0, 1), got {self.dp_delta}")
        if train_samples is not None and self.clients > train_samples:
            raise ValueError(f"--clients {self.clients} is more than the {train_samples} training samples")
        if self.client_data not in fl_partition.PARTITIONERS:
            raise ValueError(f"--client-data {self.client_data!r}: choose from {sorted(fl_partition.PARTITIONERS)}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"--strategy {self.strategy!r}: choose from {sorted(STRATEGIES)}")
        sampled = rounds.sample_size(self.clients, self.fraction)
        if not 1 <= self.min_clients <= sampled:
            raise ValueError(f"--min-clients {self.min_clients} must be between 1 and the {sampled} clients "
                             f"sampled per round")
        # Byzantine-robust rules need enough clients per round for their f (before dropouts)
        if self.strategy == "krum" and sampled <= 2 * self.krum_f + 2:
            raise ValueError(f"--strategy krum with --krum-f {self.krum_f} needs more than {2 * self.krum_f + 2} "
                             f"clients per round, but {sampled} are sampled")
        if self.strategy == "bulyan" and sampled < 4 * self.krum_f + 3:
            raise ValueError(f"--strategy bulyan with --krum-f {self.krum_f} needs at least {4 * self.krum_f + 3} "
                             f"clients per round, but {sampled} are sampled")
        strategy = self.make_strategy()
        if (self.secagg or self.dp_clip) and not strategy.reducible:
            raise ValueError(f"--strategy {self.strategy} needs every client's update in the clear: it cannot "
                             f"run with secure aggregation or differential privacy (use a mean-based strategy)")
        if (self.secagg or self.dp_clip) and strategy.needs_loss:
            raise ValueError(f"--strategy {self.strategy} weighs each client by its loss and update norm: it cannot "
                             f"run with secure aggregation or differential privacy (the weights would reveal them)")
        if self.dp_clip and self.strategy == "scaffold":
            raise ValueError("--dp-clip with --strategy scaffold: DP-FedAvg does not cover SCAFFOLD's control variates")
        if self.dp_noise and not self.dp_clip:
            raise ValueError("--dp-noise needs --dp-clip (the noise is calibrated to the clipping norm)")
        if self.dp_adaptive:
            if not self.dp_clip:
                raise ValueError("--dp-adaptive needs --dp-clip (the first round's clip)")
            if not 0 < self.dp_target_quantile < 1:
                raise ValueError(f"--dp-target-quantile must be in (0, 1), got {self.dp_target_quantile}")
            if self.dp_clip_lr <= 0:
                raise ValueError(f"--dp-clip-lr must be positive, got {self.dp_clip_lr}")
            if self.count_noise(sampled) < 0:
                raise ValueError(f"--dp-count-noise must not be negative, got {self.dp_count_noise}")
            privacy.update_noise_multiplier(self.dp_noise, self.count_noise(sampled))  # ValueError when too small
        if self.secagg and sampled < 2:
            raise ValueError(f"--secagg needs at least 2 clients per round, got {sampled}")
        return rounds.check_layout(world_size, self.ranks_per_client, self.edges)

    def count_noise(self, sampled: int) -> float:
        """sigma_b of adaptive clipping's count: as given, else sampled / 20 (the paper's choice), 0 without noise."""
        if self.dp_count_noise is not None:
            return self.dp_count_noise
        return sampled / 20 if self.dp_noise else 0.0

    def make_strategy(self) -> Strategy:
        """The server's aggregation strategy with this config's parameters."""
        kwargs: dict[str, Any] = {}
        lr = {} if self.server_lr is None else {"server_lr": self.server_lr}
        if self.strategy == "fedprox":
            kwargs = {"mu": self.mu}
        elif self.strategy == "fedavgm":
            kwargs = dict(lr, momentum=self.server_momentum)
        elif self.strategy in ("fedadam", "fedyogi", "fedadagrad"):
            kwargs = {} if self.server_lr is None else {"eta": self.server_lr}
        elif self.strategy == "scaffold":
            kwargs = dict(lr, total_clients=self.clients)
        elif self.strategy == "trimmed_mean":
            kwargs = {"beta": self.trim}
        elif self.strategy in ("krum", "bulyan"):
            kwargs = {"f": self.krum_f}
        elif self.strategy == "qfedavg":
            # L = 1/qffl_lr; the paper takes the clients' learning rate
            kwargs = {"q": self.qffl_q, "qffl_lr": self.qffl_lr or self.client_lr}
        return make(self.strategy, **kwargs)


def client_partition(cfg: FLConfig, labels: np.ndarray) -> list[np.ndarray]:
    """Each client's training sample indices (the same on every rank: seeded)."""
    if cfg.client_data == "iid":
        return fl_partition.iid(len(labels), cfg.clients, cfg.seed)
    if cfg.client_data == "dirichlet":
        return fl_partition.dirichlet(labels, cfg.clients, cfg.alpha, cfg.seed)
    return fl_partition.shards(labels, cfg.clients, cfg.shards_per_client, cfg.seed)


def _split(comm: MPI.Comm, color: int | None, key: int) -> MPI.Comm | None:
    """Comm.Split where None means 'not a member' (MPI.UNDEFINED)."""
    sub = comm.Split(MPI.UNDEFINED if color is None else color, key)
    return None if sub == MPI.COMM_NULL else sub


class Simulation:
    """A federated simulation over the ranks of `comm`: call step() once per round (collective)."""

    def __init__(self, model: nn.Module, data: Dataset, cfg: FLConfig, comm: MPI.Comm | None = None,
                 device: torch.device | None = None, timeline: Timeline | None = None) -> None:
        """Lay the ranks out, partition the data over the clients and build this rank's local trainer."""
        self.world = MPI.COMM_WORLD if comm is None else comm
        self.cfg, self.data, self.tl = cfg, data, timeline
        self.device = device or torch.device("cpu")
        self.layout = cfg.check(self.world.Get_size(), len(data.y_train))
        rank = self.world.Get_rank()
        self.group_id = self.layout.group_of(rank)
        self.group = self.world.Split(self.group_id, rank)
        self.is_leader = self.group.Get_rank() == 0
        edge = self.layout.edge_of(self.group_id)
        # group leaders of one edge reduce to the edge's first leader, which reports to the server
        self.edge_comm = _split(self.world, edge if self.is_leader and cfg.edges else None, rank)
        reports = self.is_leader and (not cfg.edges or self.edge_comm.Get_rank() == 0)
        self.top_comm = _split(self.world, 0 if reports else None, rank)
        self.parts = client_partition(cfg, data.y_train)
        self.sizes = np.array([len(p) for p in self.parts])
        classes = int(max(data.y_train.max(), data.y_test.max())) + 1
        self.class_counts = fl_partition.class_counts(data.y_train, self.parts, classes)
        self.trainer = LocalTrainer(model, data.x_train, data.y_train, self.group, self.device, cfg.client_lr,
                                    cfg.client_momentum, cfg.mu if cfg.strategy == "fedprox" else 0.0)
        self.size = self.trainer.size
        self.scaffold = cfg.strategy == "scaffold"
        # what the server sends down: weights, then (SCAFFOLD) the server control variate, then
        # (adaptive clipping) this round's clip
        self.down = torch.zeros(self.size * (2 if self.scaffold else 1) + (1 if cfg.dp_adaptive else 0))
        self.down[:self.size] = self.trainer.flat
        # every rank starts from the server's initial weights
        dcomm.broadcast(self.down, root=SERVER, comm=self.world, inplace=True)
        self.strategy = cfg.make_strategy() if rank == SERVER else None
        # the coefficients a rank's clients enter the sums with (the server's own strategy there)
        self.rule = self.strategy if self.strategy is not None else cfg.make_strategy()
        self.weights = self.down[:self.size].numpy().copy()
        self.client_state: dict[int, torch.Tensor] = {}  # SCAFFOLD control variates of the clients hosted here
        self.clip = cfg.dp_clip  # the clip of client updates (adaptive: the server moves it every round)
        self.accountant = None
        if cfg.dp_clip and rank == SERVER:
            self.accountant = privacy.PrivacyAccountant(cfg.dp_noise, cfg.clients, self.sampled_per_round,
                                                        cfg.dp_delta)
        self.round = 0
        self.lost: set[int] = set()  # clients whose home rank died (--elastic): dropped for the rest of the run

    def comms(self) -> list[MPI.Comm]:
        """The communicators this simulation made (what an elastic recovery must revoke with the world)."""
        return [c for c in (self.group, self.edge_comm, self.top_comm) if c is not None]

    @property
    def sampled_per_round(self) -> int:
        """Clients the server samples each round."""
        return rounds.sample_size(self.cfg.clients, self.cfg.fraction)

    @property
    def is_server(self) -> bool:
        """Whether this rank is the server."""
        return self.world.Get_rank() == SERVER

    def client_stats(self) -> list[dict[str, Any]]:
        """Per-client sample count and class counts."""
        return fl_partition.stats(self.data.y_train, self.parts, int(self.data.y_train.max()) + 1)

    def step(self) -> dict[str, Any] | None:
        """Run one round (collective over all ranks); the server returns its record, other ranks None."""
        cfg = self.cfg
        self.round += 1
        r = self.round
        start = time.perf_counter()
        if self.is_server:
            self.down[:self.size] = torch.from_numpy(self.weights)
            if self.scaffold and self.strategy.control is not None:
                self.down[self.size:2 * self.size] = torch.from_numpy(self.strategy.control.astype(np.float32))
            if cfg.dp_adaptive:
                self.down[-1] = self.clip
        with maybe_span(self.tl, "broadcast weights", "comm"):
            # 1. the global model (and SCAFFOLD's server control, the adaptive clip) from the server to every rank
            dcomm.broadcast(self.down, root=SERVER, comm=self.world, inplace=True)
        if cfg.dp_adaptive:
            self.clip = float(self.down[-1])  # float32 on the way: the server uses the same rounded value
        global_w = self.down[:self.size]
        server_control = self.down[self.size:2 * self.size] if self.scaffold else None
        sampled = rounds.sample_clients(cfg.seed, r, cfg.clients, cfg.fraction)
        # clients whose home rank died are dropped before the round starts (also from secure aggregation)
        alive = np.array([c for c in sampled if int(c) not in self.lost], dtype=sampled.dtype)
        trains = self.assign(alive)
        mine = [c for c, g in trains.items() if g == self.group_id]
        weighting = "uniform" if cfg.dp_clip else STRATEGIES[cfg.strategy].weighting
        secure = SecureRound(self, alive, trains, weighting) if cfg.secagg and len(alive) >= 2 else None
        if cfg.secagg and secure is None:
            mine = []  # a lone update would reach the server unmasked: nobody trains, the round is skipped
        reducible = STRATEGIES[cfg.strategy].reducible
        acc = _Accumulator(self.size, self.scaffold, keep_each=not reducible)
        with small_batch_kernels():
            for client in mine:
                self._train_client(client, r, global_w, server_control, secure, acc)
        # 3. from the group leaders to the server: the round's counts, then the sums, every delta or
        # the masked sum (the group's other ranks trained along; only the leader reports)
        with maybe_span(self.tl, "aggregate to server", "comm"):
            totals = self._reduce(acc.stats())
            each = sums = None
            if not reducible:
                each = self._gather(acc.each)
            elif secure is not None:
                sums = secure.finish()
            else:
                sums = self._reduce(acc.sums())
        if not self.is_server:
            return None
        return self._server_update(r, sampled, totals, sums, each, start, secure, len(sampled) - len(alive))

    def assign(self, sampled: np.ndarray) -> dict[int, int]:
        """Which group trains each sampled client this round (the same on every rank)."""
        if self.scaffold:  # clients with state train where their state lives
            return {int(c): self.layout.host(int(c)) for c in sampled}
        # stateless clients: the round's sample dealt out evenly (every rank holds all the data)
        return {int(c): i % self.layout.groups for i, c in enumerate(sampled)}

    def _train_client(self, client: int, r: int, global_w: torch.Tensor, server_control: torch.Tensor | None,
                      secure: SecureRound | None, acc: "_Accumulator") -> None:
        """2. Train one hosted client, unless it fails or would miss the deadline, and fold its result in."""
        cfg = self.cfg
        steps = rounds.local_steps(int(self.sizes[client]), cfg.local_epochs, cfg.local_batch)
        if rounds.drops_out(cfg.seed, r, client, cfg.dropout):
            acc.dropped += 1
            return
        if cfg.deadline and rounds.client_seconds(cfg.seed, r, client, steps, cfg.step_time,
                                                  cfg.speed_sigma) > cfg.deadline:
            acc.late += 1
            return
        control = None
        if self.scaffold:
            control = self.client_state.setdefault(client, torch.zeros(self.size, device=self.device))
        with maybe_span(self.tl, f"client {client}", "compute"):
            res = self.trainer.train(client, self.parts[client], global_w, r, cfg.seed, cfg.local_epochs,
                                     cfg.local_batch, control, server_control, start_loss=self.rule.needs_loss)
        bit = None  # adaptive clipping's b_i: whether the update was within the clip
        if cfg.dp_clip:
            res.delta, norm = privacy.clip_update(res.delta, self.clip)
            bit = bool(norm <= self.clip)
            a = b = 1.0  # DP-FedAvg weighs every client the same
        else:  # a * delta into the update's sum, b into the weight's (FedAvg: both the sample count)
            a, b = self.rule.coefficients(ClientResult(res.delta, res.examples, loss=res.start_loss))
        if secure is not None:
            if self.is_leader:  # b_i inside the masked vector: the server sees only the sum
                acc.clipped += secure.add(client, res, int(a), bit if cfg.dp_adaptive else None)
        elif bit is not None:
            acc.unclipped += int(bit)  # the count, summed over the ranks to the server
        acc.add(client, res, a, b)

    def _server_update(self, r: int, sampled: np.ndarray, totals: np.ndarray, sums: np.ndarray | None,
                       each: list | None, start: float, secure: SecureRound | None, lost: int) -> dict[str, Any]:
        """4. Aggregate, evaluate and describe the round (server only); `lost` sampled clients had a dead home rank."""
        cfg = self.cfg
        weight, count, loss_sum, examples, dropped, late, clipped, unclipped = totals
        count = int(count)
        record: dict[str, Any] = dict(round=r, sampled=len(sampled), participants=count, dropped=int(dropped) + lost,
                                      late=int(late), train_loss=loss_sum / examples if examples else None)
        if self.lost:
            record["lost"] = lost  # of the dropped: clients of dead ranks
        skipped = None
        if count < cfg.min_clients:
            skipped = f"{count} client(s) answered, fewer than --min-clients {cfg.min_clients}"
        elif cfg.secagg and secure is None:
            skipped = "fewer than 2 clients left for secure aggregation"
        elif secure is not None and sums is None:
            skipped = secure.failure
        if cfg.dp_clip:
            record["dp_clip"] = self.clip  # the clip this round's updates were cut to
        if skipped is None:
            with maybe_span(self.tl, "server update", "compute"):
                self.weights = self._aggregate(weight, count, sums, each)
                if self.accountant is not None:
                    self.accountant.step()
                if cfg.dp_adaptive:
                    if secure is not None:  # the count came masked, as the update's last coordinate
                        unclipped = secure.unclipped_count(sums)
                    # the clip follows the target quantile of the update norms, from the noisy count
                    new_clip, record["unclipped_fraction"] = privacy.adapt_clip(
                        self.clip, unclipped, self.sampled_per_round, cfg.dp_target_quantile, cfg.dp_clip_lr,
                        cfg.count_noise(self.sampled_per_round), rounds.rng(cfg.seed, rounds.COUNT_NOISE, r))
                    self.clip = float(np.float32(new_clip))
        record["skipped"] = skipped is not None
        if skipped is not None:
            record["skip_reason"] = skipped
        if secure is not None:
            record["secagg_clipped"] = int(clipped)
            record["secagg_bytes"] = secure.bytes
        if self.accountant is not None:
            record["epsilon"] = self.accountant.epsilon()
            record["delta"] = cfg.dp_delta
        if r % cfg.eval_every == 0 or r == cfg.rounds:
            record.update(self.scores())
        up = self.size * 4 * (2 if self.scaffold else 1)
        record.update(bytes_down=len(sampled) * self.down.numel() * 4, bytes_up=count * up,
                      seconds=time.perf_counter() - start)
        return record

    def _aggregate(self, weight: float, count: int, sums: np.ndarray | None, each: list | None) -> np.ndarray:
        """New global weights from the reduced sums or the gathered deltas."""
        cfg, size = self.cfg, self.size
        if each is not None:
            results = [ClientResult(d, n) for _, d, n in sorted(each, key=lambda t: t[0])]
            return self.strategy.aggregate(self.weights, results)
        control = sums[size:2 * size] if self.scaffold else None
        if cfg.dp_clip:
            # DP-FedAvg: fixed denominator (clients sampled) and Gaussian noise on the average
            noise_rng = rounds.rng(cfg.seed, rounds.NOISE, self.round)
            # adaptive clipping: the count took its share of the noise budget, the update gets the rest
            z = (privacy.update_noise_multiplier(cfg.dp_noise, cfg.count_noise(self.sampled_per_round))
                 if cfg.dp_adaptive else cfg.dp_noise)
            mean = privacy.private_mean(sums[:size], self.sampled_per_round, z, self.clip, noise_rng)
            return self.strategy.apply_mean(self.weights, mean, count)
        return self.strategy.aggregate_sums(self.weights, Sums(sums[:size], weight, count, control))

    def _reduce(self, buf: np.ndarray) -> np.ndarray | None:
        """Sum `buf` over the group leaders onto the server (via the edge aggregators); None elsewhere."""
        if not self.is_leader:
            return None
        if self.edge_comm is not None:
            out = np.empty_like(buf) if self.edge_comm.Get_rank() == 0 else None
            # edge: the group leaders of one edge add their sums on its first leader
            self.edge_comm.Reduce(buf, out, op=MPI.SUM, root=0)
            if out is None:
                return None
            buf = out
        out = np.empty_like(buf) if self.top_comm.Get_rank() == 0 else None
        # top: edge aggregators (or all group leaders) add their sums on the server
        self.top_comm.Reduce(buf, out, op=MPI.SUM, root=0)
        return out

    def _gather(self, items: list) -> list | None:
        """Concatenate the group leaders' lists onto the server (via the edge aggregators); None elsewhere."""
        if not self.is_leader:
            return None
        if self.edge_comm is not None:
            # edge: the group leaders' lists to the edge's first leader
            parts = self.edge_comm.gather(items, root=0)
            if parts is None:
                return None
            items = [x for part in parts for x in part]
        # top: to the server
        parts = self.top_comm.gather(items, root=0)
        return None if parts is None else [x for part in parts for x in part]

    def scores(self) -> dict[str, float]:
        """Test accuracy and mean loss of the global model, and their spread over the clients' label mixes.

        Server only: one process scores the whole test set, the same bits at any world size.
        """
        saved = self.trainer.flat.clone()
        self.trainer.load(self.weights)
        model = self.trainer.model
        model.eval()
        with torch.no_grad():
            logits = model(torch.from_numpy(self.data.x_test).to(self.device))
            labels = torch.from_numpy(self.data.y_test).to(self.device)
            loss = float(nn.functional.cross_entropy(logits, labels, reduction="sum")) / len(labels)
            predicted = logits.argmax(1).cpu().numpy()
        model.train()
        self.trainer.flat.copy_(saved)
        per_class = fairness.per_class_accuracy(predicted, self.data.y_test, self.class_counts.shape[1])
        return dict(test_accuracy=float(np.mean(predicted == self.data.y_test)), test_loss=loss,
                    **fairness.spread(fairness.client_accuracies(per_class, self.class_counts)))

    def run(self, on_round: Callable[[dict[str, Any] | None], None] | None = None) -> list[dict[str, Any]]:
        """Run the remaining rounds; the server returns every round's record (others an empty list)."""
        history = []
        while self.round < self.cfg.rounds:
            record = self.step()
            if record is not None:
                history.append(record)
            if on_round is not None:
                on_round(record)
        return history

    def state(self) -> dict[str, Any] | None:
        """Everything a resumed run needs, on the server (collective: client states are gathered)."""
        mine = {c: v.cpu().numpy().copy() for c, v in self.client_state.items()} if self.is_leader else {}
        # clients' persistent state from the group leaders to the server
        parts = self.world.gather(mine, root=SERVER)
        if not self.is_server:
            return None
        return self.server_state(self.round, {c: v for part in parts for c, v in part.items()})

    def server_state(self, completed: int, client_state: dict[int, Any]) -> dict[str, Any]:
        """The server's own state after `completed` rounds (no communication), with the given client states."""
        return dict(round=completed, weights=self.weights.copy(), strategy=self.strategy.state_dict(), clip=self.clip,
                    client_state=client_state, lost=sorted(self.lost),
                    accountant=None if self.accountant is None else self.accountant.state_dict(),
                    config=asdict(self.cfg))

    def load_state(self, state: dict[str, Any]) -> None:
        """Continue from state() (given on every rank)."""
        self.round = int(state["round"])
        self.weights = np.asarray(state["weights"], dtype=np.float32).copy()
        self.clip = float(state.get("clip", self.cfg.dp_clip))
        if len(self.weights) != self.size:
            raise ValueError(f"checkpoint holds {len(self.weights)} weights, the model has {self.size}")
        if self.strategy is not None:
            self.strategy.load_state_dict(state["strategy"])
        self.client_state = {int(c): torch.from_numpy(np.asarray(v, dtype=np.float32).copy()).to(self.device)
                             for c, v in state["client_state"].items() if self.layout.host(int(c)) == self.group_id}
        if self.accountant is not None and state.get("accountant") is not None:
            self.accountant.load_state_dict(state["accountant"])
        self.lost = {int(c) for c in state.get("lost", ())}


class _Accumulator:
    """A group leader's running sums over the clients it trained this round."""

    def __init__(self, size: int, scaffold: bool, keep_each: bool) -> None:
        """Zero sums; keep_each also keeps every delta (strategies that need them)."""
        self.size, self.scaffold, self.keep_each = size, scaffold, keep_each
        self.update = np.zeros(size * (2 if scaffold else 1))
        self.weight = self.count = self.loss = self.examples = 0.0
        self.dropped = self.late = self.clipped = self.unclipped = 0
        self.each: list[tuple[int, np.ndarray, int]] = []

    def add(self, client: int, res: LocalResult, a: float, b: float) -> None:
        """Fold one client's result in: a * delta into the update's sum, b into the weight's."""
        self.update[:self.size] += a * res.delta.astype(np.float64)
        if self.scaffold:
            self.update[self.size:] += a * res.control_delta.astype(np.float64)
        if self.keep_each:
            self.each.append((client, res.delta, res.examples))
        self.weight += b
        self.count += 1
        self.loss += res.loss * res.examples
        self.examples += res.examples

    def stats(self) -> np.ndarray:
        """Weight, count, loss sum, examples, dropped, late, clipped, unclipped as one vector (summed over ranks)."""
        return np.array([self.weight, self.count, self.loss, self.examples, self.dropped, self.late, self.clipped,
                         self.unclipped], dtype=np.float64)

    def sums(self) -> np.ndarray:
        """The weighted delta sum (then SCAFFOLD's weighted control-delta sum)."""
        return self.update
