"""Differential privacy for federated averaging: DP-FedAvg (McMahan et al. 2018).

Reference: McMahan, Ramage, Talwar, Zhang 2018, "Learning Differentially Private Recurrent Language
Models" (Algorithm 1, the fixed-denominator estimator f~_f).

One round, with clip C, noise multiplier z and m clients sampled out of a population of K:

- Clipped on the client: each sampled client's update (its new weights minus the global weights, a
  flat vector) is scaled down to L2 norm <= C (``clip_update``). This bounds what one client can
  move the sum by, whatever its data.
- Estimator on the server: the clipped updates of the clients that answered are summed and divided
  by the fixed denominator m, not by how many answered. The divisor then does not depend on any one
  client's participation, so a client changes the average by at most C / m (add or remove) or
  2C / m (replace), and dropped clients only shrink the step.
- Noise on the server: N(0, (z * C / m)^2) is added to every coordinate of that average
  (``private_mean``), i.e. N(0, (z * C)^2) on the sum: z is the noise std over the clip norm.

Accounting (``PrivacyAccountant``) uses the RDP accountant of Google's ``dp_accounting`` library.
Clients are sampled uniformly without replacement, m of K per round, so the population size K is
public and the neighbouring relation is REPLACE_ONE (one client's data replaced by another's): that
is the relation under which the library analyses ``SampledWithoutReplacementDpEvent`` (Wang, Balle,
Kasiviswanathan 2019, Theorem 27). Under REPLACE_ONE the sum of clipped updates has L2 sensitivity
2C (C replaced by -C), while the library's RDP formula treats the event's noise multiplier as the
noise std over that sensitivity (google/differential-privacy issue #378), so the event is given
z / 2. ``sampling="poisson"`` instead accounts for Poisson sampling (each client in with probability
q = m / K; the denominator stays m, the expected count) under ADD_OR_REMOVE_ONE, where the
sensitivity is C and the event takes z as is; that is the analysis of the paper.

Adaptive clipping (Andrew, Thakkar, McMahan, Ramaswamy 2021, "Differentially Private Learning with
Adaptive Clipping"; Flower's DifferentialPrivacyServerSideAdaptiveClipping): the clip C follows a
target quantile gamma of the clients' update norms. Each client also reports b_i = 1 if its norm
was at most C; the server estimates the fraction b = (sum b_i + N(0, sigma_b^2)) / m and moves
C <- C exp(-eta (b - gamma)) (``adapt_clip``): too many unclipped updates shrink C, too few grow
it. The count is a second Gaussian query on the same clients, so the update's noise multiplier
becomes z_update = (z^-2 - (2 sigma_b)^-2)^(-1/2) (``update_noise_multiplier``, the paper's
Theorem 1): the two queries together cost exactly what one Gaussian mechanism with multiplier z
costs, and the accountant goes on composing z.

The simulation draws the noise from a seeded ``numpy.random.Generator`` so runs are reproducible; a
deployment would draw it from a cryptographically secure source (and guard against floating-point
attacks on the Gaussian sampler).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

SAMPLINGS = ("without_replacement", "poisson")


def _check_clip(clip: float) -> None:
    """Raise unless clip is a positive finite number."""
    if not (math.isfinite(clip) and clip > 0):
        raise ValueError(f"clip must be > 0 and finite, got {clip}")


def _check_noise(noise_multiplier: float) -> None:
    """Raise unless noise_multiplier is a finite number >= 0."""
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(f"noise_multiplier must be >= 0 and finite, got {noise_multiplier}")


def _check_denominator(denominator: int) -> None:
    """Raise unless the fixed denominator is a whole number >= 1."""
    if int(denominator) != denominator or denominator < 1:
        raise ValueError(f"denominator must be an integer >= 1 (clients sampled per round), got {denominator}")


def clip_update(update: np.ndarray, clip: float) -> tuple[np.ndarray, float]:
    """Scale update so its L2 norm is <= clip; return (clipped copy in the input's float dtype, original norm)."""
    _check_clip(clip)
    update = np.asarray(update)
    dtype = update.dtype if np.issubdtype(update.dtype, np.floating) else np.float64
    norm = float(np.linalg.norm(update.astype(np.float64).ravel()))  # float64: no float32 overflow
    if not math.isfinite(norm):
        # A NaN norm would compare False against clip and slip through unclipped.
        raise ValueError("update has non-finite values; it cannot be clipped")
    out = update.astype(dtype, copy=True)
    if norm > clip:
        out *= clip / norm
    return out, norm


def noise_std(noise_multiplier: float, clip: float, denominator: int) -> float:
    """Std of the Gaussian noise added to the fixed-denominator average: noise_multiplier * clip / denominator."""
    _check_noise(noise_multiplier)
    _check_clip(clip)
    _check_denominator(denominator)
    return noise_multiplier * clip / denominator


def private_mean(clipped_sum: np.ndarray, denominator: int, noise_multiplier: float, clip: float,
                 rng: np.random.Generator) -> np.ndarray:
    """clipped_sum / denominator + N(0, noise_std^2) per coordinate (float64)."""
    std = noise_std(noise_multiplier, clip, denominator)
    mean = np.asarray(clipped_sum, dtype=np.float64) / denominator
    if std == 0:
        return mean
    return mean + rng.normal(0.0, std, size=mean.shape)


def update_noise_multiplier(noise_multiplier: float, count_noise: float) -> float:
    """z_update = (z^-2 - (2 sigma_b)^-2)^(-1/2): the update's noise multiplier when the clipped count takes sigma_b."""
    _check_noise(noise_multiplier)
    if noise_multiplier == 0:
        return 0.0
    if not (math.isfinite(count_noise) and 2 * count_noise > noise_multiplier):
        raise ValueError(f"adaptive clipping: the count noise (sigma_b = {count_noise}) must exceed half the noise "
                         f"multiplier ({noise_multiplier} / 2): the count's share of the privacy budget leaves "
                         f"nothing for the update otherwise")
    return (noise_multiplier ** -2 - (2 * count_noise) ** -2) ** -0.5


def adapt_clip(clip: float, unclipped: float, denominator: int, target_quantile: float, lr: float,
               count_noise: float, rng: np.random.Generator) -> tuple[float, float]:
    """(the next clip, the noisy fraction of unclipped updates): C exp(-lr (b - target)), b = (count + N(0, sigma_b^2)) / m."""
    _check_clip(clip)
    _check_denominator(denominator)
    if not 0 < target_quantile < 1:
        raise ValueError(f"target quantile must be in (0, 1), got {target_quantile}")
    noise = rng.normal(0.0, count_noise) if count_noise > 0 else 0.0
    fraction = (unclipped + noise) / denominator
    return clip * math.exp(-lr * (fraction - target_quantile)), fraction


def _replace_one_scale() -> float:
    """Factor from z to the noise multiplier a REPLACE_ONE event needs in the installed dp_accounting.

    Probes the library at q = 1, where its RDP has the closed form alpha / (2 sigma^2): if it reads
    the multiplier as noise over the replace-one sensitivity (as dp_accounting <= 0.6.0 does) we pass
    z / 2; if a later release doubles the sensitivity itself we must not do it twice.
    """
    import dp_accounting  # here, not at module level: it takes ~1.8 s to import and only DP runs need it
    from dp_accounting.rdp import RdpAccountant

    probe = RdpAccountant(orders=[2.0], neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    probe.compose(dp_accounting.SampledWithoutReplacementDpEvent(1, 1, dp_accounting.GaussianDpEvent(1.0)))
    rdp = float(probe.rdp[0])
    if math.isclose(rdp, 1.0):  # 2 / (2 * 1^2): sensitivity taken as 1 = the clip
        return 0.5
    if math.isclose(rdp, 4.0):  # 2 * 2^2 / (2 * 1^2): sensitivity 2 * clip already applied
        return 1.0
    raise RuntimeError(f"unexpected dp_accounting REPLACE_ONE convention (RDP at order 2 = {rdp})")


class PrivacyAccountant:
    """(epsilon, delta) of DP-FedAvg so far, from dp_accounting's RDP accountant."""

    def __init__(self, noise_multiplier: float, population: int, sample_size: int, delta: float,
                 sampling: str = "without_replacement") -> None:
        """Account rounds that sample sample_size of population clients and add noise_multiplier * clip noise."""
        _check_noise(noise_multiplier)
        if int(population) != population or int(sample_size) != sample_size or not 1 <= sample_size <= population:
            raise ValueError(f"need integers 1 <= sample_size <= population, got sample_size={sample_size}, "
                             f"population={population}")
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        if sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
        self.noise_multiplier = float(noise_multiplier)
        self.population = int(population)
        self.sample_size = int(sample_size)
        self.delta = float(delta)
        self.sampling = sampling
        self._rounds = 0
        self._round_rdp: np.ndarray | None = None  # RDP of one round, per order; computed on first use
        self._orders: np.ndarray | None = None

    def _new_accountant(self) -> RdpAccountant:
        """A fresh RdpAccountant with the neighbouring relation this sampling is analysed under."""
        import dp_accounting
        from dp_accounting.rdp import RdpAccountant

        rel = dp_accounting.NeighboringRelation
        relation = rel.REPLACE_ONE if self.sampling == "without_replacement" else rel.ADD_OR_REMOVE_ONE
        return RdpAccountant(neighboring_relation=relation)

    def _round_event(self) -> dp_accounting.DpEvent:
        """The dp_accounting event of one round (noise_multiplier must be > 0)."""
        import dp_accounting

        if self.sampling == "without_replacement":
            gaussian = dp_accounting.GaussianDpEvent(self.noise_multiplier * _replace_one_scale())
            return dp_accounting.SampledWithoutReplacementDpEvent(self.population, self.sample_size, gaussian)
        q = self.sample_size / self.population
        return dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(self.noise_multiplier))

    def step(self, rounds: int = 1) -> None:
        """Compose `rounds` more rounds."""
        if int(rounds) != rounds or rounds < 0:
            raise ValueError(f"rounds must be an integer >= 0, got {rounds}")
        self._rounds += int(rounds)

    @property
    def rounds(self) -> int:
        """Rounds composed so far."""
        return self._rounds

    def epsilon(self) -> float:
        """Epsilon spent so far at self.delta (0 before any round, inf with no noise)."""
        if self._rounds == 0:
            return 0.0
        if self.noise_multiplier == 0:
            return math.inf
        if self._round_rdp is None:
            # RDP composes by addition, so T identical rounds are T times one round's RDP: exactly what
            # RdpAccountant.compose(event, count=T) adds. One round's RDP takes the library ~0.5 s to
            # derive, so it is derived once here rather than at every step.
            acc = self._new_accountant()
            acc.compose(self._round_event())
            self._round_rdp, self._orders = acc.rdp, acc.orders
        from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

        eps, _ = compute_epsilon(self._orders, self._rounds * self._round_rdp, self.delta)
        return float(eps)

    def state_dict(self) -> dict[str, Any]:
        """Checkpointable state: the round count (the parameters come from the constructor)."""
        return {"rounds": self._rounds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the round count; epsilon is re-composed from it."""
        self._rounds = 0
        self.step(int(state["rounds"]))
