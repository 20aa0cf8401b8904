"""Server-side federated aggregation strategies over flat numpy weight vectors (Flower-style).

Each client reports a delta (its new weights minus the global weights it started from);
``Strategy.aggregate`` turns the global weights and those deltas into new global weights.

References:
- FedAvg: McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from Decentralized Data".
- FedProx: Li et al. 2020, "Federated Optimization in Heterogeneous Networks".
- FedAvgM: Hsu et al. 2019, "Measuring the Effects of Non-Identical Data Distribution for Federated
  Visual Classification".
- FedAdam / FedYogi / FedAdagrad: Reddi et al. 2021, "Adaptive Federated Optimization" (Algorithm 2).
- SCAFFOLD: Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled Averaging for Federated Learning".
- Median / TrimmedMean: Yin et al. 2018, "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates".
- Krum / Multi-Krum: Blanchard et al. 2017, "Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent".
- Bulyan: El Mhamdi, Guerraoui, Rouault 2018, "The Hidden Vulnerability of Distributed Learning in Byzantium".
- q-FedAvg: Li, Sanjabi, Beirami, Smith 2020, "Fair Resource Allocation in Federated Learning" (Algorithm 2).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class ClientResult:
    """One client's round outcome: weight delta, sample count, SCAFFOLD control delta, loss before training."""

    update: np.ndarray
    num_examples: int
    control_delta: np.ndarray | None = None
    loss: float | None = None  # q-FedAvg: the client's loss F_k at the global weights, before local training


def proximal_term(weights: np.ndarray, global_weights: np.ndarray, mu: float) -> float:
    """FedProx penalty mu/2 * ||w - w_g||^2 that a client adds to its local loss."""
    diff = np.asarray(weights, dtype=np.float64) - np.asarray(global_weights, dtype=np.float64)
    return float(0.5 * mu * np.dot(diff, diff))


def proximal_grad(weights: np.ndarray, global_weights: np.ndarray, mu: float) -> np.ndarray:
    """Gradient mu * (w - w_g) of the FedProx penalty, added to the client's local gradient."""
    return mu * (np.asarray(weights) - np.asarray(global_weights))


def scaffold_client_step(grad: np.ndarray, c_global: np.ndarray, c_local: np.ndarray) -> np.ndarray:
    """SCAFFOLD drift-corrected client gradient: grad - c_local + c_global."""
    return grad - c_local + c_global


def scaffold_new_control(c_local: np.ndarray, c_global: np.ndarray, global_weights: np.ndarray,
                         local_weights: np.ndarray, steps: int, lr: float) -> np.ndarray:
    """SCAFFOLD option II client control update: c_local - c_global + (w_g - w_local) / (steps * lr)."""
    if steps < 1 or lr <= 0:
        raise ValueError(f"scaffold_new_control needs steps >= 1 and lr > 0, got steps={steps}, lr={lr}")
    return c_local - c_global + (global_weights - local_weights) / (steps * lr)


def _stack_updates(global_weights: np.ndarray, results: list[ClientResult]) -> np.ndarray:
    """Validate results against the global vector and stack their updates as float64 rows."""
    if not results:
        raise ValueError("aggregate needs at least one ClientResult, got an empty list")
    if np.ndim(global_weights) != 1:
        raise ValueError(f"global weights must be a 1-D vector, got shape {np.shape(global_weights)}")
    size = len(global_weights)
    for i, r in enumerate(results):
        if np.ndim(r.update) != 1 or len(r.update) != size:
            raise ValueError(f"client result {i} has update of shape {np.shape(r.update)}, "
                             f"expected ({size},) to match the global weights")
    return np.stack([np.asarray(r.update, dtype=np.float64) for r in results])


def _weighted_mean(updates: np.ndarray, results: list[ClientResult]) -> np.ndarray:
    """Average update rows weighted by each client's num_examples."""
    counts = np.array([r.num_examples for r in results], dtype=np.float64)
    if np.any(counts < 0) or counts.sum() <= 0:
        raise ValueError(f"num_examples must be >= 0 with a positive total, got {counts.astype(int).tolist()}")
    return counts @ updates / counts.sum()


def _finish(global_weights: np.ndarray, new: np.ndarray) -> np.ndarray:
    """Return new weights in the global vector's floating dtype (float64 otherwise)."""
    dtype = global_weights.dtype if np.issubdtype(global_weights.dtype, np.floating) else np.float64
    return new.astype(dtype)


@dataclass
class Sums:
    """Client results reduced to sums, which ranks can add up before the server sees them."""

    update: np.ndarray  # sum of w_k * delta_k
    weight: float  # sum of w_k
    count: int  # number of clients
    control: np.ndarray | None = None  # sum of w_k * control_delta_k (SCAFFOLD)

    def __add__(self, other: "Sums") -> "Sums":
        """Sum of two partial sums (for tests and local accumulation)."""
        control = None if self.control is None else self.control + other.control
        return Sums(self.update + other.update, self.weight + other.weight, self.count + other.count, control)


def sums_of(results: list[ClientResult], strategy: "Strategy", size: int) -> Sums:
    """Reduce results to Sums with each client's coefficients from the strategy."""
    total = Sums(np.zeros(size), 0.0, 0, None)
    with_control = any(r.control_delta is not None for r in results)
    if with_control:
        total.control = np.zeros(size)
    for r in results:
        a, b = strategy.coefficients(r)
        total.update += a * np.asarray(r.update, dtype=np.float64)
        if with_control:
            total.control += a * np.asarray(r.control_delta, dtype=np.float64)
        total.weight += b
        total.count += 1
    return total


class Strategy:
    """Base aggregation strategy: new global weights = global + combined client deltas.

    A *reducible* strategy depends on the clients only through sum_k a_k delta_k / sum_k b_k (and
    their count), with each client's coefficients (a_k, b_k) from ``coefficients``, so a simulation
    may add client results up on each rank and reduce the sums (``aggregate_sums``); the others
    (median, trimmed mean, Krum, Bulyan) need every client's delta.
    """

    reducible = False
    weighting = "examples"  # w_k of a reducible strategy: num_examples, or "uniform" (1 per client)
    needs_loss = False  # whether clients must report their loss at the global weights (ClientResult.loss)

    def coefficients(self, result: ClientResult) -> tuple[float, float]:
        """(a_k, b_k): the client's delta enters the sum as a_k * delta_k, its weight as b_k (here both w_k)."""
        w = float(result.num_examples) if self.weighting == "examples" else 1.0
        return w, w

    def aggregate(self, global_weights: np.ndarray, results: list[ClientResult]) -> np.ndarray:
        """Return the new global weights given the current ones and the clients' results."""
        updates = _stack_updates(global_weights, results)
        return _finish(global_weights, global_weights + self.combine(updates, results))

    def combine(self, updates: np.ndarray, results: list[ClientResult]) -> np.ndarray:
        """Reduce stacked client deltas (one per row) to one delta; subclasses override."""
        raise NotImplementedError

    def aggregate_sums(self, global_weights: np.ndarray, sums: Sums) -> np.ndarray:
        """New global weights from reduced sums (reducible strategies only)."""
        if not self.reducible:
            raise ValueError(f"{type(self).__name__} needs every client's update, not their sum")
        if sums.count < 1 or sums.weight <= 0:
            raise ValueError(f"aggregate_sums needs at least one client with positive weight, got "
                             f"count={sums.count}, weight={sums.weight}")
        control = None if sums.control is None else sums.control / sums.weight
        return self.apply_mean(global_weights, sums.update / sums.weight, sums.count, control)

    def apply_mean(self, global_weights: np.ndarray, mean: np.ndarray, count: int,
                   control_mean: np.ndarray | None = None) -> np.ndarray:
        """New global weights from the (weighted) mean delta of `count` clients (reducible strategies)."""
        raise ValueError(f"{type(self).__name__} needs every client's update, not their mean")

    def state_dict(self) -> dict[str, Any]:
        """Server state to checkpoint (stateless strategies return an empty dict)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore server state saved by state_dict."""
        unknown = set(state) - set(self.state_dict())
        if unknown:
            raise ValueError(f"{type(self).__name__} state has unknown keys {sorted(unknown)}")
        for key, value in state.items():
            setattr(self, key, None if value is None else np.array(value, dtype=np.float64))


class _MeanStrategy(Strategy):
    """A reducible strategy: one server step from the weighted-mean delta."""

    reducible = True

    def combine(self, updates: np.ndarray, results: list[ClientResult]) -> np.ndarray:
        """Server step from the weighted mean of the deltas."""
        return self.step(_weighted_mean(updates, results))

    def apply_mean(self, global_weights: np.ndarray, mean: np.ndarray, count: int,
                   control_mean: np.ndarray | None = None) -> np.ndarray:
        """global + step(mean)."""
        global_weights = np.asarray(global_weights)
        return _finish(global_weights, global_weights + self.step(np.asarray(mean, dtype=np.float64)))

    def step(self, mean: np.ndarray) -> np.ndarray:
        """The server's delta from the mean client delta; subclasses override."""
        raise NotImplementedError


class FedAvg(_MeanStrategy):
    """Average of client deltas weighted by num_examples (McMahan et al. 2017)."""

    def step(self, mean: np.ndarray) -> np.ndarray:
        """The mean delta itself (server learning rate 1)."""
        return mean


class FedProx(FedAvg):
    """FedProx: FedAvg on the server; clients add the proximal term with coefficient mu."""

    def __init__(self, mu: float = 0.01) -> None:
        """Store the proximal coefficient mu (>= 0) for clients to use."""
        if mu < 0:
            raise ValueError(f"FedProx mu must be >= 0, got {mu}")
        self.mu = mu


class FedAvgM(_MeanStrategy):
    """FedAvg with server momentum: v = momentum*v + avg_delta; w += server_lr*v (Hsu et al. 2019)."""

    def __init__(self, server_lr: float = 1.0, momentum: float = 0.9) -> None:
        """Set server learning rate and momentum; the velocity starts at zero."""
        self.server_lr, self.momentum = server_lr, momentum
        self.velocity: np.ndarray | None = None

    def step(self, delta: np.ndarray) -> np.ndarray:
        """Fold the weighted-mean delta into the velocity and return server_lr * velocity."""
        self.velocity = delta if self.velocity is None else self.momentum * self.velocity + delta
        return self.server_lr * self.velocity

    def state_dict(self) -> dict[str, Any]:
        """Velocity buffer (None before the first round)."""
        return {"velocity": None if self.velocity is None else self.velocity.copy()}


class _Adaptive(_MeanStrategy):
    """Shared FedOpt machinery (Reddi et al. 2021, Algorithm 2); subclasses define the v update."""

    def __init__(self, eta: float = 0.1, beta_1: float = 0.9, beta_2: float = 0.99, tau: float = 1e-3) -> None:
        """Set server lr eta, moment decays and adaptivity tau; m starts at 0 and v at tau**2."""
        self.eta, self.beta_1, self.beta_2, self.tau = eta, beta_1, beta_2, tau
        self.m: np.ndarray | None = None
        self.v: np.ndarray | None = None

    def step(self, delta: np.ndarray) -> np.ndarray:
        """Treat the weighted-mean delta as a pseudo-gradient and take one adaptive step."""
        if self.m is None:
            self.m = np.zeros_like(delta)
            self.v = np.full_like(delta, self.tau ** 2)
        self.m = self.beta_1 * self.m + (1 - self.beta_1) * delta
        self.v = self._second_moment(self.v, delta * delta)
        return self.eta * self.m / (np.sqrt(self.v) + self.tau)

    def _second_moment(self, v: np.ndarray, sq: np.ndarray) -> np.ndarray:
        """Update the second-moment estimate v with the squared pseudo-gradient sq."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """First and second moment buffers (None before the first round)."""
        return {"m": None if self.m is None else self.m.copy(), "v": None if self.v is None else self.v.copy()}


class FedAdagrad(_Adaptive):
    """FedAdagrad: v = v + delta^2."""

    def _second_moment(self, v: np.ndarray, sq: np.ndarray) -> np.ndarray:
        """Accumulate squared pseudo-gradients."""
        return v + sq


class FedAdam(_Adaptive):
    """FedAdam: v = beta_2*v + (1-beta_2)*delta^2 (no bias correction, as in the paper)."""

    def _second_moment(self, v: np.ndarray, sq: np.ndarray) -> np.ndarray:
        """Exponential moving average of squared pseudo-gradients."""
        return self.beta_2 * v + (1 - self.beta_2) * sq


class FedYogi(_Adaptive):
    """FedYogi: v = v - (1-beta_2)*delta^2*sign(v - delta^2)."""

    def _second_moment(self, v: np.ndarray, sq: np.ndarray) -> np.ndarray:
        """Additive Yogi update that moves v towards delta^2."""
        return v - (1 - self.beta_2) * sq * np.sign(v - sq)


class QFedAvg(FedAvg):
    """q-FedAvg (Li et al. 2020): clients with a higher loss weigh more; q = 0 is FedAvg with equal weights.

    With delta_k = w_k - w (the client's new weights minus the global ones), L = 1/qffl_lr and
    F_k the client's loss at w, the paper's update w - sum_k Delta_k / sum_k h_k, where
    Delta_k = F_k^q L (w - w_k) and h_k = q F_k^(q-1) ||L (w - w_k)||^2 + L F_k^q, is
    w + sum_k a_k delta_k / sum_k b_k with a_k = F_k^q and b_k = F_k^q + q L F_k^(q-1) ||delta_k||^2:
    sums, so it reduces over the ranks like FedAvg (the mean's step is the identity).
    """

    weighting = "uniform"  # unused: coefficients() below sets the clients' weights
    needs_loss = True

    def __init__(self, q: float = 0.2, qffl_lr: float = 0.1) -> None:
        """Set the fairness exponent q (>= 0) and the step size 1/L (the paper takes the clients' learning rate)."""
        if q < 0:
            raise ValueError(f"QFedAvg q must be >= 0, got {q}")
        if qffl_lr <= 0:
            raise ValueError(f"QFedAvg qffl_lr must be positive, got {qffl_lr}")
        self.q, self.lipschitz = q, 1.0 / qffl_lr

    def coefficients(self, result: ClientResult) -> tuple[float, float]:
        """a_k = F_k^q and b_k = F_k^q + q L F_k^(q-1) ||delta_k||^2, F_k the client's loss before training."""
        if result.loss is None or not np.isfinite(result.loss) or result.loss < 0:
            raise ValueError(f"QFedAvg needs each client's (finite, non-negative) loss at the global weights, "
                             f"got {result.loss}")
        f = float(result.loss) + 1e-10  # a loss of exactly 0 would make F^(q-1) infinite
        delta = np.asarray(result.update, dtype=np.float64)
        a = f ** self.q
        return a, a + self.q * self.lipschitz * f ** (self.q - 1) * float(np.dot(delta, delta))

    def combine(self, updates: np.ndarray, results: list[ClientResult]) -> np.ndarray:
        """sum_k a_k delta_k / sum_k b_k."""
        coeffs = np.array([self.coefficients(r) for r in results])
        return coeffs[:, 0] @ updates / coeffs[:, 1].sum()


class Scaffold(Strategy):
    """SCAFFOLD server: unweighted mean delta step plus server control variate (Karimireddy et al. 2020)."""

    def __init__(self, server_lr: float = 1.0, total_clients: int = 1) -> None:
        """Set the global step size and N, the total number of clients; c starts at zero."""
        if total_clients < 1:
            raise ValueError(f"Scaffold total_clients must be >= 1, got {total_clients}")
        self.server_lr, self.total_clients = server_lr, total_clients
        self.control: np.ndarray | None = None

    reducible = True
    weighting = "uniform"

    def aggregate(self, global_weights: np.ndarray, results: list[ClientResult]) -> np.ndarray:
        """Apply server_lr * mean(delta) and c += (|S|/N) * mean(control_delta)."""
        updates = _stack_updates(global_weights, results)
        size = len(global_weights)
        for i, r in enumerate(results):
            if r.control_delta is None or np.shape(r.control_delta) != (size,):
                raise ValueError(f"Scaffold client result {i} needs a control_delta of shape ({size},), "
                                 f"got {None if r.control_delta is None else np.shape(r.control_delta)}")
        control_mean = np.mean([np.asarray(r.control_delta, dtype=np.float64) for r in results], axis=0)
        return self.apply_mean(global_weights, updates.mean(axis=0), len(results), control_mean)

    def apply_mean(self, global_weights: np.ndarray, mean: np.ndarray, count: int,
                   control_mean: np.ndarray | None = None) -> np.ndarray:
        """Step with the unweighted mean delta of `count` clients and fold their mean control delta into c."""
        global_weights = np.asarray(global_weights)
        if count > self.total_clients:
            raise ValueError(f"Scaffold got {count} results but total_clients={self.total_clients}")
        if control_mean is None or np.shape(control_mean) != np.shape(global_weights):
            raise ValueError(f"Scaffold needs the clients' mean control delta of shape {np.shape(global_weights)}")
        if self.control is None:
            self.control = np.zeros(len(global_weights))
        self.control = self.control + (count / self.total_clients) * np.asarray(control_mean, dtype=np.float64)
        return _finish(global_weights, global_weights + self.server_lr * np.asarray(mean, dtype=np.float64))

    def state_dict(self) -> dict[str, Any]:
        """Server control variate c (None before the first round)."""
        return {"control": None if self.control is None else self.control.copy()}


class Median(Strategy):
    """Coordinate-wise median of client deltas (ignores num_examples)."""

    def combine(self, updates: np.ndarray, results: list[ClientResult]) -> np.ndarray:
        """Per-coordinate median."""
        return np.median(updates, axis=0)


class TrimmedMean(Strategy):
    """Coordinate-wise trimmed mean: drop the beta fraction largest and smallest values per coordinate."""

    def __init__(self, beta: float = 0.1) -> None:
        """Set the trimmed fraction per side, beta in [0, 0.5)."""
        if not 0 <= beta < 0.5:
            raise ValueError(f"TrimmedMean beta must be in [0, 0.5), got {beta}")
        self.beta = beta

    def combine(self, updates: np.ndarray, results: list[ClientResult]) -> np.ndarray:
        """Sort each coordinate, drop floor(beta*n) from each end, average the rest."""
        n = len(updates)
        k = int(np.floor(self.beta * n))
        if n - 2 * k < 1:
            raise ValueError(f"TrimmedMean beta={self.beta} would drop all {n} updates")
        return np.sort(updates, axis=0)[k:n - k].mean(axis=0)


class Krum(Strategy):
    """Krum (m=1) / Multi-Krum (m>1): average the m updates closest to their n-f-2 neighbours."""

    def __init__(self, f: int = 0, m: int = 1) -> None:
        """Set the number f of tolerated Byzantine clients and the number m of updates kept."""
        if f < 0 or m < 1:
            raise ValueError(f"Krum needs f >= 0 and m >= 1, got f={f}, m={m}")
        self.f, self.m = f, m

    def scores(self, updates: np.ndarray) -> np.ndarray:
        """Krum score per update: sum of squared distances to its n-f-2 nearest other updates."""
        n = len(updates)
        if n <= 2 * self.f + 2:
            raise ValueError(f"Krum requires n > 2f + 2, got n={n}, f={self.f}")
        sq = np.sum((updates[:, None, :] - updates[None, :, :]) ** 2, axis=-1)
        # Column 0 after sorting each row is the zero distance to itself; skip it.
        return np.sort(sq, axis=1)[:, 1:n - self.f - 1].sum(axis=1)

    def combine(self, updates: np.ndarray, results: list[ClientResult]) -> np.ndarray:
        """Unweighted mean of the m lowest-scored updates (stable tie-break by client order)."""
        if self.m > len(updates):
            raise ValueError(f"Krum m={self.m} exceeds the {len(updates)} updates received")
        chosen = np.argsort(self.scores(updates), kind="stable")[:self.m]
        return updates[chosen].mean(axis=0)


class Bulyan(Strategy):
    """Bulyan: Krum picks n-2f updates one at a time; per coordinate, the mean of the n-4f picked values nearest their median."""

    def __init__(self, f: int = 0) -> None:
        """Set the number f of tolerated Byzantine clients (n >= 4f + 3 updates needed)."""
        if f < 0:
            raise ValueError(f"Bulyan needs f >= 0, got f={f}")
        self.f = f

    def select(self, updates: np.ndarray) -> list[int]:
        """Indices of the n-2f updates that Krum picks one after another, each from those not picked yet."""
        n, f = len(updates), self.f
        if n < 4 * f + 3:
            raise ValueError(f"Bulyan requires n >= 4f + 3, got n={n}, f={f}")
        sq = np.sum((updates[:, None, :] - updates[None, :, :]) ** 2, axis=-1)
        left, chosen = list(range(n)), []
        for _ in range(n - 2 * f):
            # Krum over the updates left: sum of squared distances to the r-f-2 nearest others (at least 1,
            # as the set shrinks; Flower's rule), lowest score first, ties to the earlier client
            r = len(left)
            near = max(1, r - f - 2) if r > 1 else 0
            sub = sq[np.ix_(left, left)]
            scores = np.sort(sub, axis=1)[:, 1:1 + near].sum(axis=1)
            chosen.append(left.pop(int(np.argmin(scores))))
        return chosen

    def combine(self, updates: np.ndarray, results: list[ClientResult]) -> np.ndarray:
        """Per coordinate: of the selected updates, the beta = n-4f values closest to their median, averaged."""
        picked = updates[self.select(updates)]
        beta = len(updates) - 4 * self.f
        median = np.median(picked, axis=0)
        # per coordinate, the beta picked values nearest the median (stable: ties to the earlier pick)
        nearest = np.argsort(np.abs(picked - median), axis=0, kind="stable")[:beta]
        return np.take_along_axis(picked, nearest, axis=0).mean(axis=0)


STRATEGIES: dict[str, type[Strategy]] = {
    "fedavg": FedAvg, "fedprox": FedProx, "fedavgm": FedAvgM, "fedadam": FedAdam, "fedyogi": FedYogi,
    "fedadagrad": FedAdagrad, "scaffold": Scaffold, "median": Median, "trimmed_mean": TrimmedMean, "krum": Krum,
    "bulyan": Bulyan, "qfedavg": QFedAvg,
}


def make(name: str, **kwargs: Any) -> Strategy:
    """Build a strategy by (case-insensitive) name with its keyword arguments."""
    try:
        cls = STRATEGIES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; choose from {sorted(STRATEGIES)}") from None
    return cls(**kwargs)
