"""One round of secure aggregation across the simulation's ranks (the protocol itself is in secagg.py).

The server relays every message, as in Bonawitz et al. 2017; here it relays them between the ranks
that host the clients. The steps of a round, each a collective over the world:

1. advertise: every sampled client's two public keys go to the server, which sends all of them to every rank;
2. share keys: each client's encrypted Shamir shares go to the server, which routes them to the
   ranks hosting their recipients;
3. (clients train; a client that answers encodes its weighted update in fixed point and masks it)
4. masked input: each group leader adds its clients' masked vectors mod 2**32; the sums reach the server;
5. unmask: the server announces who answered; the survivors reveal the shares it needs (self-mask
   seeds of survivors, mask keys of those who dropped after step 2), and it removes the masks.

Sample counts travel in the clear, as in Flower's SecAgg+ (FedAvg's server needs them to weight).
With adaptive clipping each client's bit b_i (its update was within the clip) rides in the masked
vector as one more coordinate, so the server learns only their sum, as Andrew et al. (2021) ask.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from dmlmpi.federated import secagg
from dmlmpi.federated.client import LocalResult

if TYPE_CHECKING:
    from dmlmpi.federated.simulation import Simulation


class SecureRound:
    """Secure aggregation of one round's client updates; construct it on every rank (collective)."""

    def __init__(self, sim: "Simulation", sampled: np.ndarray, trains: dict[int, int], weighting: str) -> None:
        """Create this rank's clients' keys, advertise them and exchange the Shamir shares."""
        cfg, world = sim.cfg, sim.world
        self.sim, self.failure, self.bytes = sim, "", 0
        ids = [int(c) for c in sampled]
        self.graph = secagg.neighbours(ids, cfg.secagg_neighbours or None)
        degree = len(self.graph[ids[0]])
        self.threshold = int(np.floor(cfg.secagg_threshold * degree)) + 1
        # the update (and SCAFFOLD's control delta), then adaptive clipping's bit b_i
        self.length = sim.size * (2 if sim.scaffold else 1) + (1 if cfg.dp_adaptive else 0)
        bound = int(sim.sizes[sampled].sum()) if weighting == "examples" else len(ids)
        self.scale = secagg.fixed_point_scale(cfg.secagg_clip, bound)
        mine = [c for c, group in trains.items() if group == sim.group_id]
        self.clients = {c: secagg.SecAggClient(c) for c in mine} if sim.is_leader else {}
        # 1. advertise: public keys to the server, and all of them from the server to every rank
        mine_keys = {c: cl.public_keys() for c, cl in self.clients.items()}
        everyone = world.gather(mine_keys, root=0)
        self.keys = world.bcast(None if everyone is None else {c: k for part in everyone for c, k in part.items()},
                                root=0)
        # 2. share keys: encrypted shares to the server, which routes each to its recipient's rank
        outgoing = {c: cl.share_keys(self.keys, self.graph[c], self.threshold) for c, cl in self.clients.items()}
        everyone = world.gather(outgoing, root=0)
        routed = None
        if everyone is not None:
            routed = [dict() for _ in range(world.Get_size())]
            for part in everyone:
                for sender, shares in part.items():
                    for recipient, ct in shares.items():
                        rank = trains[recipient] * sim.layout.ranks_per_client  # its group's leader
                        routed[rank].setdefault(recipient, {})[sender] = ct
                        self.bytes += len(ct)
            self.bytes += 64 * len(self.keys)  # two 32-byte public keys per client
        incoming = world.scatter(routed, root=0)
        for c, cl in self.clients.items():
            cl.receive_shares(incoming.get(c, {}), self.keys)
        self.masked = np.zeros(self.length, dtype=np.uint32)
        self.survivors: list[int] = []

    def add(self, client: int, res: LocalResult, weight: int, unclipped: bool | None = None) -> int:
        """Encode and mask one client's weighted update (and adaptive clipping's bit) into this rank's sum.

        Returns the update's coordinates that secure aggregation's range clipped. The bit travels as
        secagg_clip (1) or 0, inside the range: unclipped_count() reads the sum back as a count.
        """
        parts = [res.delta] + ([] if res.control_delta is None else [res.control_delta])
        if unclipped is not None:
            parts.append(np.array([self.sim.cfg.secagg_clip if unclipped else 0.0]))
        encoded, clipped = secagg.encode(np.concatenate(parts), self.sim.cfg.secagg_clip, self.scale, weight)
        # uint32 addition wraps: the sum is taken modulo 2**32, as the protocol's arithmetic
        np.add(self.masked, self.clients[client].mask(encoded, self.keys, self.graph[client]), out=self.masked)
        self.survivors.append(client)
        return clipped

    def unclipped_count(self, sums: np.ndarray) -> int:
        """Adaptive clipping's count of unclipped updates, from the last coordinate of the unmasked sum (uniform weights)."""
        one = np.rint(self.sim.cfg.secagg_clip * self.scale) / self.scale  # what a bit of 1 decodes to
        return int(np.rint(sums[-1] / one))

    def finish(self) -> np.ndarray | None:
        """Reduce the masked sums, unmask on the server: the decoded float64 sum there (None if it failed)."""
        sim, world = self.sim, self.sim.world
        # 4. masked sums to the server (as uint64, so MPI's sum cannot overflow; reduced mod 2**32 there)
        total = sim._reduce(self.masked.astype(np.uint64))
        # 5. who answered: to the server, which tells every rank
        answered = sim._gather(self.survivors)
        survivors = set(world.bcast(None if answered is None else sorted(answered), root=0))
        dropped = set(self.keys) - survivors
        revealed = [cl.reveal(survivors, dropped) for c, cl in self.clients.items() if c in survivors]
        # the survivors' revealed shares to the server
        revealed = sim._gather(revealed)
        if not sim.is_server:
            return None
        if not survivors:
            self.failure = "no client answered"
            return None
        self.bytes += sum(70 * len(r) for r in revealed)  # a revealed share: its x and a 66-byte field element
        server = secagg.SecAggServer(self.keys, self.graph, self.threshold, self.length)
        try:
            plain = server.unmask((total % secagg.MODULUS).astype(np.uint32), survivors, revealed)
        except ValueError as exc:
            self.failure = f"secure aggregation could not unmask: {exc}"
            return None
        return secagg.decode(plain, self.scale)
