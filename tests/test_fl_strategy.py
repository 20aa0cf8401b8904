"""Federated aggregation strategies checked against hand-computed numbers (pure numpy, no MPI)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from dmlmpi.federated import strategy as S
from dmlmpi.federated.strategy import ClientResult as R


def vec(*xs: float) -> np.ndarray:
    return np.array(xs, dtype=np.float64)


def test_fedavg_weights_by_num_examples() -> None:
    # (1*[1,0] + 3*[0,4]) / 4 = [0.25, 3.0]; [1,2] + that = [1.25, 5.0]
    new = S.FedAvg().aggregate(vec(1, 2), [R(vec(1, 0), 1), R(vec(0, 4), 3)])
    np.testing.assert_allclose(new, [1.25, 5.0])


def test_fedavg_keeps_float32_and_does_not_mutate_input() -> None:
    w = np.array([1.0, 2.0], dtype=np.float32)
    new = S.FedAvg().aggregate(w, [R(np.array([0.5, 0.5], dtype=np.float32), 2)])
    assert new.dtype == np.float32
    np.testing.assert_allclose(new, [1.5, 2.5])
    np.testing.assert_array_equal(w, [1.0, 2.0])


def test_fedprox_server_is_fedavg_and_helpers() -> None:
    strat = S.make("fedprox", mu=0.1)
    assert strat.mu == 0.1
    np.testing.assert_allclose(strat.aggregate(vec(1, 2), [R(vec(1, 0), 1), R(vec(0, 4), 3)]), [1.25, 5.0])
    # mu/2 * ||[3,4]||^2 = 0.05 * 25 = 1.25 ; gradient 0.1 * [3,4] = [0.3, 0.4]
    assert S.proximal_term(vec(4, 6), vec(1, 2), 0.1) == pytest.approx(1.25)
    np.testing.assert_allclose(S.proximal_grad(vec(4, 6), vec(1, 2), 0.1), [0.3, 0.4])
    with pytest.raises(ValueError, match="mu"):
        S.FedProx(mu=-1.0)


def test_fedavgm_two_rounds_show_momentum() -> None:
    strat = S.FedAvgM(server_lr=0.5, momentum=0.9)
    # round 1: v = [1,2]; w = [0,0] + 0.5*[1,2] = [0.5, 1.0]
    w = strat.aggregate(vec(0, 0), [R(vec(1, 2), 5)])
    np.testing.assert_allclose(w, [0.5, 1.0])
    # round 2: v = 0.9*[1,2] + [1,0] = [1.9, 1.8]; w = [0.5,1] + 0.5*[1.9,1.8] = [1.45, 1.9]
    w = strat.aggregate(w, [R(vec(1, 0), 5)])
    np.testing.assert_allclose(w, [1.45, 1.9])
    np.testing.assert_allclose(strat.state_dict()["velocity"], [1.9, 1.8])


def test_fedadagrad_one_round() -> None:
    strat = S.FedAdagrad(eta=1.0, beta_1=0.5, tau=3.0)
    # delta = mean([6,-4],[2,-4]) = [4,-4]; m = 0.5*delta = [2,-2]; v = 9 + 16 = 25
    # step = 1 * 2 / (5 + 3) = 0.25
    w = strat.aggregate(vec(1, 2), [R(vec(6, -4), 1), R(vec(2, -4), 1)])
    np.testing.assert_allclose(w, [1.25, 1.75])
    np.testing.assert_allclose(strat.state_dict()["v"], [25.0, 25.0])


def test_fedadam_one_round() -> None:
    strat = S.FedAdam(eta=1.0, beta_1=0.5, beta_2=0.5, tau=2.0)
    # delta = [14,-14]; m = [7,-7]; v = 0.5*4 + 0.5*196 = 100; step = 7 / (10 + 2) = 7/12
    w = strat.aggregate(vec(1, 2), [R(vec(14, -14), 3)])
    np.testing.assert_allclose(w, [1 + 7 / 12, 2 - 7 / 12])
    np.testing.assert_allclose(strat.state_dict()["m"], [7.0, -7.0])
    np.testing.assert_allclose(strat.state_dict()["v"], [100.0, 100.0])


def test_fedyogi_two_rounds() -> None:
    strat = S.FedYogi(eta=1.0, beta_1=0.5, beta_2=0.5, tau=1.0)
    # round 1: delta = [4,-4]; m = [2,-2]; v0 = 1 < 16 so v = 1 + 0.5*16 = 9; step = 2/(3+1) = 0.5
    w = strat.aggregate(vec(1, 2), [R(vec(4, -4), 1)])
    np.testing.assert_allclose(w, [1.5, 1.5])
    # round 2: delta = [2,0]; m = 0.5*[2,-2] + 0.5*[2,0] = [2,-1]
    # v = 9 - 0.5*4*sign(9-4) = 7 and 9 - 0 = 9; step = [2/(sqrt(7)+1), -1/(3+1)]
    w = strat.aggregate(w, [R(vec(2, 0), 1)])
    np.testing.assert_allclose(strat.state_dict()["v"], [7.0, 9.0])
    np.testing.assert_allclose(w, [1.5 + 2 / (math.sqrt(7) + 1), 1.25])


def test_adaptive_initial_v_is_tau_squared() -> None:
    # a zero pseudo-gradient leaves v at its initial tau**2 (Adam: 0.99*1e-6 + 0 = 9.9e-7) and w unchanged
    strat = S.FedAdagrad(tau=1e-3)
    w = strat.aggregate(vec(1, 2), [R(vec(0, 0), 1)])
    np.testing.assert_allclose(w, [1, 2])
    np.testing.assert_allclose(strat.state_dict()["v"], [1e-6, 1e-6])


def test_fedadam_state_dict_round_trip_continues_identically() -> None:
    rounds = [[R(vec(1, -2), 1), R(vec(3, 0), 2)], [R(vec(-1, 1), 4)], [R(vec(0.5, 0.5), 1)]]
    a = S.FedAdam(eta=0.1)
    w = a.aggregate(vec(1, 2), rounds[0])
    b = S.FedAdam(eta=0.1)
    b.load_state_dict(a.state_dict())
    wa, wb = w, w.copy()
    for res in rounds[1:]:
        wa, wb = a.aggregate(wa, res), b.aggregate(wb, res)
    np.testing.assert_array_equal(wa, wb)
    # the loaded state is a copy: advancing b did not touch a's saved buffers and vice versa
    assert not np.shares_memory(a.m, b.m)
    with pytest.raises(ValueError, match="unknown keys"):
        b.load_state_dict({"bogus": vec(1)})


def test_scaffold_unweighted_mean_and_control_update() -> None:
    strat = S.Scaffold(server_lr=0.5, total_clients=4)
    results = [R(vec(2, 0), 1, control_delta=vec(1, 1)), R(vec(0, 4), 100, control_delta=vec(3, -1))]
    # unweighted mean delta = [1,2]; w = [1,2] + 0.5*[1,2] = [1.5, 3.0]
    w = strat.aggregate(vec(1, 2), results)
    np.testing.assert_allclose(w, [1.5, 3.0])
    # c = 0 + (2/4) * mean([1,1],[3,-1]) = 0.5*[2,0] = [1, 0]
    np.testing.assert_allclose(strat.control, [1.0, 0.0])
    # round 2, one client: c = [1,0] + (1/4)*[2,2] = [1.5, 0.5]
    strat.aggregate(w, [R(vec(0, 0), 1, control_delta=vec(2, 2))])
    np.testing.assert_allclose(strat.control, [1.5, 0.5])
    fresh = S.Scaffold(server_lr=0.5, total_clients=4)
    fresh.load_state_dict(strat.state_dict())
    np.testing.assert_allclose(fresh.control, [1.5, 0.5])


def test_scaffold_errors_and_client_helpers() -> None:
    strat = S.Scaffold(total_clients=2)
    with pytest.raises(ValueError, match="control_delta"):
        strat.aggregate(vec(1, 2), [R(vec(1, 1), 1)])
    with pytest.raises(ValueError, match="total_clients"):
        strat.aggregate(vec(1, 2), [R(vec(1, 1), 1, vec(0, 0))] * 3)
    # grad - c_local + c_global = [1-0.25+0.5, 1-1+0]
    np.testing.assert_allclose(S.scaffold_client_step(vec(1, 1), vec(0.5, 0), vec(0.25, 1)), [1.25, 0.0])
    # [1,0] - [0.5,0.5] + ([1,1] - [0.8,1.2]) / (2*0.1) = [0.5+1, -0.5-1]
    new_c = S.scaffold_new_control(vec(1, 0), vec(0.5, 0.5), vec(1, 1), vec(0.8, 1.2), steps=2, lr=0.1)
    np.testing.assert_allclose(new_c, [1.5, -1.5])


def test_median_ignores_outlier() -> None:
    results = [R(vec(1, 1), 1), R(vec(2, -1), 1), R(vec(100, 3), 1000)]
    np.testing.assert_allclose(S.Median().aggregate(vec(0, 0), results), [2.0, 1.0])
    even = [R(vec(1), 1), R(vec(2), 1), R(vec(3), 1), R(vec(100), 1)]
    np.testing.assert_allclose(S.Median().aggregate(vec(10), even), [12.5])


def test_trimmed_mean() -> None:
    results = [R(vec(x, y), 1) for x, y in [(1, 3), (100, -50), (2, 0), (4, 1), (3, 2)]]
    # beta=0.2 with n=5 drops 1 per side: x -> mean(2,3,4) = 3 ; y -> mean(0,1,2) = 1
    np.testing.assert_allclose(S.TrimmedMean(0.2).aggregate(vec(1, 1), results), [4.0, 2.0])
    # beta=0 is the plain mean: x = 110/5 = 22, y = -44/5 = -8.8
    np.testing.assert_allclose(S.TrimmedMean(0.0).aggregate(vec(0, 0), results), [22.0, -8.8])
    for bad in (0.5, -0.1, 0.7):
        with pytest.raises(ValueError, match="beta"):
            S.TrimmedMean(bad)


def test_krum_picks_honest_and_rejects_outlier() -> None:
    pts = [(10, 10), (0, 0), (1, 0), (0, 1), (0.5, 0.5)]
    updates = np.array(pts, dtype=np.float64)
    # n=5, f=1: sum of squared distances to the n-f-2 = 2 nearest others
    # (0.5,0.5): 0.5+0.5 = 1 ; corners: 0.5+1 = 1.5 ; (10,10): 180.5+181 = 361.5
    np.testing.assert_allclose(S.Krum(f=1).scores(updates), [361.5, 1.5, 1.5, 1.5, 1.0])
    results = [R(vec(*p), 1) for p in pts]
    np.testing.assert_allclose(S.Krum(f=1).aggregate(vec(1, 1), results), [1.5, 1.5])
    # multi-Krum m=4 averages the four honest points: ([0,0]+[1,0]+[0,1]+[.5,.5])/4 = [0.375, 0.375]
    np.testing.assert_allclose(S.make("krum", f=1, m=4).aggregate(vec(0, 0), results), [0.375, 0.375])


def bulyan_by_the_paper(updates: np.ndarray, f: int) -> np.ndarray:
    """Bulyan written out with loops (El Mhamdi et al. 2018), Krum's neighbour count at least 1 as Flower's."""
    left, picked = list(range(len(updates))), []
    for _ in range(len(updates) - 2 * f):
        near = max(1, len(left) - f - 2) if len(left) > 1 else 0
        best, best_score = -1, math.inf
        for i in left:
            dists = sorted(float(np.sum((updates[i] - updates[j]) ** 2)) for j in left if j != i)
            if sum(dists[:near]) < best_score:
                best, best_score = i, sum(dists[:near])
        picked.append(best)
        left.remove(best)
    beta = len(updates) - 4 * f
    out = []
    for c in range(updates.shape[1]):
        column = [float(updates[i, c]) for i in picked]
        middle = float(np.median(column))
        nearest = sorted(range(len(column)), key=lambda k: abs(column[k] - middle))[:beta]
        out.append(sum(column[k] for k in nearest) / beta)
    return np.array(out)


@pytest.mark.parametrize("n,f", [(3, 0), (7, 1), (11, 2), (12, 2)])
def test_bulyan_equals_the_paper_and_resists_f_attackers(n: int, f: int) -> None:
    """Bulyan equals the looped reference; with f updates far off, every coordinate stays within the honest ones' range."""
    g = np.random.default_rng(n)
    honest = g.normal(size=(n - f, 5))
    updates = np.concatenate([honest, 1e3 + g.normal(size=(f, 5))])[g.permutation(n)]
    results = [R(u, 1) for u in updates]
    got = S.make("bulyan", f=f).aggregate(np.zeros(5), results)
    np.testing.assert_allclose(got, bulyan_by_the_paper(updates, f), rtol=1e-12, atol=1e-12)
    assert np.all(got >= honest.min(axis=0)) and np.all(got <= honest.max(axis=0))
    if f:  # the plain mean is dragged far away by them
        assert np.abs(updates.mean(axis=0)).min() > 50


def test_bulyan_requires_enough_clients() -> None:
    """n >= 4f + 3: fewer is an error naming both."""
    with pytest.raises(ValueError, match=r"n >= 4f \+ 3, got n=6, f=1"):
        S.Bulyan(f=1).aggregate(vec(0, 0), [R(vec(i, 0), 1) for i in range(6)])
    with pytest.raises(ValueError, match="f >= 0"):
        S.Bulyan(f=-1)


def test_krum_requires_enough_clients() -> None:
    results = [R(vec(i, 0), 1) for i in range(4)]
    with pytest.raises(ValueError, match=r"n=4.*f=1"):
        S.Krum(f=1).aggregate(vec(0, 0), results)
    with pytest.raises(ValueError, match="m=5"):
        S.Krum(f=0, m=5).aggregate(vec(0, 0), results)


def _default(name: str) -> S.Strategy:
    return S.make(name, total_clients=3) if name == "scaffold" else S.make(name)


@pytest.mark.parametrize("name", sorted(S.STRATEGIES))
def test_every_strategy_rejects_empty_and_mismatched(name: str) -> None:
    with pytest.raises(ValueError, match="empty"):
        _default(name).aggregate(vec(1, 2), [])
    bad = [R(vec(1, 2), 1, vec(0, 0)), R(vec(1, 2, 3), 1, vec(0, 0))]
    with pytest.raises(ValueError, match="shape"):
        _default(name).aggregate(vec(1, 2), bad)


@pytest.mark.parametrize("name", sorted(S.STRATEGIES))
def test_every_strategy_identity_on_one_zero_update(name: str) -> None:
    # zero deltas never move the weights (three clients so that Krum with f=0 has n > 2f+2)
    new = _default(name).aggregate(vec(1, 2), [R(vec(0, 0), 3, vec(0, 0), loss=1.0)] * 3)
    np.testing.assert_allclose(new, [1, 2])


def test_make_and_registry() -> None:
    assert isinstance(S.make("FedAvgM", momentum=0.5), S.FedAvgM)
    assert set(S.STRATEGIES) >= {"fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad",
                                 "scaffold", "median", "trimmed_mean", "krum"}
    with pytest.raises(ValueError, match="unknown strategy"):
        S.make("nope")
    with pytest.raises(ValueError, match="num_examples"):
        S.FedAvg().aggregate(vec(1), [R(vec(1), 0)])


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "scaffold",
                                  "qfedavg"])
def test_reducible_strategies_give_the_same_weights_from_partial_sums(name: str) -> None:
    # what a simulation does: each rank adds up its clients, the server adds the ranks' sums
    rng = np.random.default_rng(3)
    size = 6
    kwargs = {"total_clients": 10} if name == "scaffold" else {}
    direct, reduced = S.make(name, **kwargs), S.make(name, **kwargs)
    w_direct = w_reduced = rng.normal(size=size)
    for _ in range(3):  # several rounds, so server state (momentum, moments, control) is compared too
        results = [R(rng.normal(size=size), int(rng.integers(1, 9)), rng.normal(size=size), float(rng.uniform(0.1, 3)))
                   for _ in range(5)]
        w_direct = direct.aggregate(w_direct, results)
        parts = [S.sums_of(results[:2], reduced, size), S.sums_of(results[2:], reduced, size)]
        w_reduced = reduced.aggregate_sums(w_reduced, parts[0] + parts[1])
        np.testing.assert_allclose(w_reduced, w_direct, rtol=1e-12, atol=1e-12)
    for key, value in direct.state_dict().items():
        np.testing.assert_allclose(reduced.state_dict()[key], value, rtol=1e-12)


@pytest.mark.parametrize("name", ["median", "trimmed_mean", "krum"])
def test_robust_strategies_refuse_sums(name: str) -> None:
    strat = S.make(name)
    assert not strat.reducible
    with pytest.raises(ValueError, match="every client"):
        strat.aggregate_sums(vec(0, 0), S.Sums(vec(1, 1), 1.0, 1))


def qffl_reference(w: np.ndarray, results: list[R], q: float, lr: float) -> np.ndarray:
    """Li et al. 2020, Algorithm 2, written as the paper writes it: Delta w_k = L (w^t - w_k^{t+1})."""
    L = 1.0 / lr
    deltas, hs = [], []
    for r in results:
        new_k = w + r.update  # the client's weights after local training
        dw = L * (w - new_k)
        f = r.loss + 1e-10
        deltas.append(f ** q * dw)
        hs.append(q * f ** (q - 1) * np.sum(dw ** 2) + L * f ** q)
    return w - np.sum(deltas, axis=0) / np.sum(hs)


@pytest.mark.parametrize("q", [0.0, 0.2, 1.0, 5.0])
def test_qfedavg_is_the_papers_update(q: float) -> None:
    rng = np.random.default_rng(7)
    w = rng.normal(size=5)
    results = [R(rng.normal(size=5) * 0.1, int(rng.integers(1, 50)), loss=float(rng.uniform(0.2, 2.5)))
               for _ in range(4)]
    np.testing.assert_allclose(S.QFedAvg(q, qffl_lr=0.05).aggregate(w, results),
                               qffl_reference(w, results, q, 0.05), rtol=1e-12, atol=1e-12)


def test_qfedavg_with_q_zero_is_fedavg_with_equal_weights() -> None:
    results = [R(vec(1, 0), 1, loss=0.3), R(vec(0, 4), 99, loss=2.0)]
    np.testing.assert_allclose(S.QFedAvg(0.0).aggregate(vec(0, 0), results), [0.5, 2.0])


def test_qfedavg_weighs_high_loss_clients_more_as_q_grows() -> None:
    # two clients pulling in opposite directions; the one with the higher loss wins more of the step
    results = [R(vec(0.01), 10, loss=0.5), R(vec(-0.01), 10, loss=2.0)]
    steps = [float(S.QFedAvg(q, qffl_lr=0.1).aggregate(vec(0.0), results)[0]) for q in (0.0, 1.0, 3.0)]
    assert steps[0] == pytest.approx(0.0, abs=1e-15)
    assert steps[0] > steps[1] > steps[2]


def test_qfedavg_refuses_bad_values_and_missing_losses() -> None:
    with pytest.raises(ValueError, match="q must be >= 0"):
        S.QFedAvg(-1)
    with pytest.raises(ValueError, match="qffl_lr must be positive"):
        S.QFedAvg(1, qffl_lr=0)
    for loss in (None, float("nan"), -1.0):
        with pytest.raises(ValueError, match="loss at the global weights"):
            S.QFedAvg().aggregate(vec(0), [R(vec(1), 1, loss=loss)])
