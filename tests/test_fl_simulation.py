"""The federated simulation against a single-process reference, at any world size.

The reference trains every sampled client one after another in one process with torch.optim.SGD
and aggregates their individual results with the strategy's per-client `aggregate`; the simulation
spreads clients over rank groups, reduces sums (or gathers deltas, or masks them) to the server.
Both must give the same global weights round after round.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from mpi4py import MPI
from torch import nn

from dmlmpi.data import Dataset
from dmlmpi.federated import privacy, rounds
from dmlmpi.federated.simulation import FLConfig, Simulation, client_partition
from dmlmpi.federated.strategy import ClientResult

pytestmark = pytest.mark.mpi

WORLD = MPI.COMM_WORLD
RANK, SIZE = WORLD.Get_rank(), WORLD.Get_size()
BASE = FLConfig(clients=12, fraction=0.5, rounds=3, local_epochs=2, local_batch=5, client_lr=0.1,
                client_momentum=0.0, seed=3)


def dataset() -> Dataset:
    """A small learnable problem: 10 classes from a random linear map of 40 features."""
    g = np.random.default_rng(0)
    w = g.normal(size=(40, 10))
    x = g.normal(size=(300, 40)).astype(np.float32)
    y = (x @ w).argmax(1).astype(np.int64)
    return Dataset(x[:240], y[:240], x[240:], y[240:])


def make_model() -> nn.Sequential:
    """The same small MLP on every rank."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(40, 16), nn.ReLU(), nn.Linear(16, 10))


def flat(model: nn.Module) -> np.ndarray:
    """A model's parameters as one float32 vector."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy().copy()


def set_flat(model: nn.Module, w: np.ndarray) -> None:
    """Load a flat vector into a model's parameters."""
    # a copy: vector_to_parameters makes the parameters views of the vector it is given
    torch.nn.utils.vector_to_parameters(torch.tensor(np.asarray(w, dtype=np.float32)), model.parameters())


def reference(cfg: FLConfig) -> list[np.ndarray]:
    """Single process: each sampled client trained in turn with torch.optim.SGD, then strategy.aggregate."""
    data = dataset()
    sim_parts = client_partition(cfg, data.y_train)
    model = make_model()
    weights = flat(model)
    strategy = cfg.make_strategy()
    controls: dict[int, np.ndarray] = {}
    history = []
    clip = cfg.dp_clip
    clips = []  # the clip of each round (adaptive clipping moves it)
    for r in range(1, cfg.rounds + 1):
        results = []
        unclipped = 0
        if cfg.dp_adaptive:
            clip = float(np.float32(clip))  # as it travels down to the clients
        clips.append(clip)
        server_c = np.zeros_like(weights) if getattr(strategy, "control", None) is None else strategy.control
        for c in rounds.sample_clients(cfg.seed, r, cfg.clients, cfg.fraction):
            c = int(c)
            idx = sim_parts[c]
            steps = rounds.local_steps(len(idx), cfg.local_epochs, cfg.local_batch)
            if rounds.drops_out(cfg.seed, r, c, cfg.dropout):
                continue
            if cfg.deadline and rounds.client_seconds(cfg.seed, r, c, steps, cfg.step_time,
                                                      cfg.speed_sigma) > cfg.deadline:
                continue
            set_flat(model, weights)
            start_loss = None
            if cfg.strategy == "qfedavg":  # q-FFL's F_k: the client's loss at the global weights
                with torch.no_grad():
                    start_loss = float(nn.functional.cross_entropy(model(torch.from_numpy(data.x_train[idx])),
                                                                   torch.from_numpy(data.y_train[idx])))
            opt = torch.optim.SGD(model.parameters(), lr=cfg.client_lr, momentum=cfg.client_momentum)
            gen = torch.Generator().manual_seed(rounds.shuffle_seed(cfg.seed, r, c))
            bsz = len(idx) if cfg.local_batch == 0 else cfg.local_batch
            c_i = controls.setdefault(c, np.zeros_like(weights))
            for _ in range(cfg.local_epochs):
                order = torch.from_numpy(idx)[torch.randperm(len(idx), generator=gen)]
                for s in range(0, len(idx), bsz):
                    b = order[s:s + bsz]
                    opt.zero_grad()
                    loss = nn.functional.cross_entropy(model(torch.from_numpy(data.x_train[b])),
                                                       torch.from_numpy(data.y_train[b]))
                    if cfg.strategy == "fedprox":
                        diff = torch.cat([p.reshape(-1) for p in model.parameters()]) - torch.from_numpy(weights)
                        loss = loss + 0.5 * cfg.mu * (diff * diff).sum()
                    loss.backward()
                    if cfg.strategy == "scaffold":
                        corr = torch.from_numpy((server_c - c_i).astype(np.float32))
                        offset = 0
                        for p in model.parameters():
                            p.grad += corr[offset:offset + p.numel()].view_as(p)
                            offset += p.numel()
                    opt.step()
            delta = flat(model) - weights
            if cfg.dp_clip:
                delta, norm = privacy.clip_update(delta, clip)
                unclipped += norm <= clip
            control_delta = None
            if cfg.strategy == "scaffold":
                new_c = c_i - server_c - delta / (steps * cfg.client_lr)
                control_delta = new_c - c_i
                controls[c] = new_c
            results.append(ClientResult(delta, len(idx), control_delta, start_loss))
        if len(results) >= cfg.min_clients:
            if cfg.dp_clip:
                sampled = rounds.sample_size(cfg.clients, cfg.fraction)
                noise = rounds.rng(cfg.seed, rounds.NOISE, r)
                sigma_b = cfg.count_noise(sampled)
                z = privacy.update_noise_multiplier(cfg.dp_noise, sigma_b) if cfg.dp_adaptive else cfg.dp_noise
                mean = privacy.private_mean(np.sum([x.update for x in results], axis=0), sampled, z, clip, noise)
                weights = strategy.apply_mean(weights, mean, len(results))
                if cfg.dp_adaptive:
                    clip, _ = privacy.adapt_clip(clip, unclipped, sampled, cfg.dp_target_quantile, cfg.dp_clip_lr,
                                                 sigma_b, rounds.rng(cfg.seed, rounds.COUNT_NOISE, r))
            else:
                weights = strategy.aggregate(weights, results)
        history.append(np.asarray(weights, dtype=np.float32).copy())
    reference.clips = clips  # type: ignore[attr-defined]  # the last call's clips, for the adaptive test
    return history


def simulate(cfg: FLConfig) -> tuple[Simulation, list[np.ndarray], list[dict]]:
    """Run cfg on the world; weights after each round (every rank's copy from the next broadcast)."""
    sim = Simulation(make_model(), dataset(), cfg, WORLD)
    history, records = [], []
    for _ in range(cfg.rounds):
        rec = sim.step()
        records.append(rec)
        history.append(WORLD.bcast(sim.weights if sim.is_server else None, root=0))
    return sim, history, records


def resumed(cfg: FLConfig, stop: int) -> np.ndarray:
    """The final weights of a run stopped after `stop` rounds and resumed from its state in a new Simulation."""
    first = Simulation(make_model(), dataset(), cfg, WORLD)
    for _ in range(stop):
        first.step()
    state = WORLD.bcast(first.state(), root=0)
    second = Simulation(make_model(), dataset(), cfg, WORLD)
    second.load_state(state)
    for _ in range(cfg.rounds - stop):
        second.step()
    return WORLD.bcast(second.weights if second.is_server else None, root=0)


def assert_same(history: list[np.ndarray], ref: list[np.ndarray], rtol: float = 1e-5, atol: float = 2e-6) -> None:
    """Round by round, the simulation's weights equal the reference's."""
    for r, (got, want) in enumerate(zip(history, ref), start=1):
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=f"round {r}")


def layouts() -> list[tuple[int, int]]:
    """(ranks_per_client, edges) combinations this world size allows."""
    out = [(1, 0)]
    if SIZE >= 2:
        out.append((1, 2))
    if SIZE % 2 == 0 and SIZE >= 2:
        out.append((2, 0))
        if SIZE >= 4:
            out.append((2, 2))
    return out


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox", "fedavgm", "fedadam", "scaffold", "median", "krum",
                                      "bulyan", "qfedavg"])
def test_strategies_match_single_process(strategy: str) -> None:
    cfg = replace(BASE, strategy=strategy, mu=0.5, server_lr=0.5 if strategy == "fedavgm" else None, qffl_q=2.0,
                  qffl_lr=1.0)
    _, history, records = simulate(cfg)
    if RANK == 0:
        assert [rec["participants"] for rec in records] == [6, 6, 6]
    assert_same(history, reference(cfg))


@pytest.mark.parametrize("strategy", ["fedavg", "qfedavg"])
@pytest.mark.parametrize("layout", layouts(), ids=lambda lay: f"rpc{lay[0]}-edges{lay[1]}")
def test_rank_layouts_match_single_process(layout: tuple[int, int], strategy: str) -> None:
    # qfedavg: a client trained over a group of ranks scores its start loss over the group too
    rpc, edges = layout
    cfg = replace(BASE, ranks_per_client=rpc, edges=edges, client_momentum=0.5, strategy=strategy, qffl_q=1.0)
    _, history, _ = simulate(cfg)
    assert_same(history, reference(cfg))


def test_dropouts_deadline_and_skipped_rounds() -> None:
    cfg = replace(BASE, rounds=4, dropout=0.3, deadline=0.09, step_time=0.01, speed_sigma=0.6, min_clients=3)
    sim, history, records = simulate(cfg)
    ref = reference(cfg)
    assert_same(history, ref)
    if RANK == 0:
        for r, rec in enumerate(records, start=1):
            sampled = rounds.sample_clients(cfg.seed, r, cfg.clients, cfg.fraction)
            dropped = sum(rounds.drops_out(cfg.seed, r, int(c), cfg.dropout) for c in sampled)
            assert rec["dropped"] == dropped
            assert rec["dropped"] + rec["late"] + rec["participants"] == rec["sampled"] == 6
            assert rec["skipped"] == (rec["participants"] < 3)
        assert any(rec["late"] for rec in records) and any(rec["dropped"] for rec in records)
        # a skipped round leaves the global model as it was
        for r, rec in enumerate(records[1:], start=1):
            if rec["skipped"]:
                np.testing.assert_array_equal(history[r], history[r - 1])


def test_differential_privacy_clips_adds_seeded_noise_and_accounts() -> None:
    cfg = replace(BASE, dp_clip=0.05, dp_noise=0.0)
    _, history, _ = simulate(cfg)
    assert_same(history, reference(cfg))  # clipping and the fixed denominator, no noise
    noisy = replace(cfg, dp_noise=1.0)
    sim, history, records = simulate(noisy)
    assert_same(history, reference(noisy))  # the same seeded noise
    if RANK == 0:
        acct = privacy.PrivacyAccountant(1.0, cfg.clients, rounds.sample_size(cfg.clients, cfg.fraction), cfg.dp_delta)
        for r, rec in enumerate(records, start=1):
            acct.step()
            assert rec["epsilon"] == pytest.approx(acct.epsilon(), rel=1e-9)
        assert records[0]["epsilon"] < records[-1]["epsilon"]


def test_adaptive_clipping_follows_the_quantile_and_matches_single_process() -> None:
    """--dp-adaptive: the clip moves by the noisy unclipped count, the update noise takes z_update; the weights, the
    clips and epsilon match the one-process reference round by round; a resumed run continues the clip."""
    cfg = replace(BASE, rounds=4, dp_clip=0.02, dp_noise=1.0, dp_adaptive=True, dp_count_noise=1.0, dp_clip_lr=0.5)
    _, history, records = simulate(cfg)
    ref = reference(cfg)
    assert_same(history, ref)
    if RANK == 0:
        got = [rec["dp_clip"] for rec in records]
        np.testing.assert_allclose(got, reference.clips, rtol=1e-6)
        # every update is longer than 0.02: the clip grows each round, by about exp(0.5 * 0.5)
        assert all(b > a for a, b in zip(got, got[1:]))
        assert all(abs(rec["unclipped_fraction"]) < 1 for rec in records)
        acct = privacy.PrivacyAccountant(1.0, cfg.clients, rounds.sample_size(cfg.clients, cfg.fraction), cfg.dp_delta)
        acct.step(len(records))
        assert records[-1]["epsilon"] == pytest.approx(acct.epsilon(), rel=1e-9)  # z, not z_update, is accounted
    # stopped after 2 rounds and resumed: the clip comes back with the checkpoint
    np.testing.assert_allclose(resumed(cfg, 2), history[-1], rtol=1e-6, atol=1e-7)


def test_adaptive_clipping_count_rides_in_the_masked_sum(monkeypatch: pytest.MonkeyPatch) -> None:
    """--dp-adaptive with --secagg: every b_i goes inside the masked vector, none in the clear counts, and the
    server's count (hence every round's clip) is exactly the one without secure aggregation."""
    from dmlmpi.federated import simulation

    # no noise, and a first clip among the update norms: the counts are exact and vary (1, 4 and 2 of 6)
    cfg = replace(BASE, rounds=3, dp_clip=0.5, dp_noise=0.0, dp_adaptive=True, dp_count_noise=0.0, dp_clip_lr=0.2,
                  dp_target_quantile=0.5)
    _, _, plain = simulate(cfg)
    clear: list[int] = []  # the unclipped field of every stats vector sent to the server
    stats = simulation._Accumulator.stats
    monkeypatch.setattr(simulation._Accumulator, "stats", lambda acc: clear.append(acc.unclipped) or stats(acc))
    _, _, masked = simulate(replace(cfg, secagg=True, secagg_clip=2.0))
    assert clear and not any(clear)
    if RANK == 0:
        assert sum(0 < r["unclipped_fraction"] < 1 for r in plain) >= 2
        assert [r["dp_clip"] for r in masked] == [r["dp_clip"] for r in plain]
        assert [r["unclipped_fraction"] for r in masked] == [r["unclipped_fraction"] for r in plain]


def test_secure_aggregation_equals_plain_up_to_quantization() -> None:
    for dropout in (0.0, 0.25):
        plain = replace(BASE, rounds=2, dropout=dropout, strategy="fedavg")
        _, want, plain_records = simulate(plain)
        sim, got, records = simulate(replace(plain, secagg=True, secagg_clip=2.0))
        if RANK == 0:
            assert [r["participants"] for r in records] == [r["participants"] for r in plain_records]
            assert all(not r["skipped"] for r in records)
            assert all(r["secagg_bytes"] > 0 for r in records)
        # per coordinate, each client's weighted value is off by at most half a step: 1e-6 here
        assert_same(got, want, rtol=0, atol=2e-5)


def test_scores_spread_the_test_accuracy_over_the_clients_label_mixes() -> None:
    cfg = replace(BASE, client_data="shards", shards_per_client=1, rounds=2)
    sim, _, _ = simulate(cfg)
    if not sim.is_server:
        return
    scores = sim.scores()
    data = dataset()
    model = make_model()
    set_flat(model, sim.weights)
    with torch.no_grad():
        logits = model(torch.from_numpy(data.x_test))
    right = (logits.argmax(1).numpy() == data.y_test).astype(np.float64)
    assert scores["test_accuracy"] == pytest.approx(right.mean(), abs=1e-12)
    assert scores["test_loss"] == pytest.approx(
        float(nn.functional.cross_entropy(logits, torch.from_numpy(data.y_test))), rel=1e-5)
    # each client's accuracy, sample by sample: a test sample of class c counts with the client's share of
    # class c, spread over the test samples of that class
    per_client = []
    for part in client_partition(cfg, data.y_train):
        share = np.bincount(data.y_train[part], minlength=10) / len(part)
        seen = np.bincount(data.y_test, minlength=10)[data.y_test]
        per_client.append(float(np.sum(right * share[data.y_test] / seen)))
    per_client = np.sort(per_client)
    assert len(np.unique(per_client)) > 1  # one class each: the clients differ
    assert scores["client_accuracy_mean"] == pytest.approx(per_client.mean(), abs=1e-12)
    assert scores["client_accuracy_std"] == pytest.approx(per_client.std(), abs=1e-12)
    assert scores["client_accuracy_worst10"] == pytest.approx(per_client[:2].mean(), abs=1e-12)  # 12 clients
    assert scores["client_accuracy_best10"] == pytest.approx(per_client[-2:].mean(), abs=1e-12)


def test_checkpoint_state_resumes_exactly() -> None:
    cfg = replace(BASE, strategy="scaffold", rounds=4)
    _, straight, _ = simulate(cfg)
    np.testing.assert_allclose(resumed(cfg, 2), straight[-1], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("changes, message", [
    (dict(ranks_per_client=3), "must divide the"),
    (dict(edges=99), "--edges 99"),
    (dict(fraction=0.0), "--fraction must be in (0, 1]"),
    (dict(dropout=1.0), "--dropout must be in [0, 1)"),
    (dict(min_clients=7), "--min-clients 7 must be between 1 and the 6 clients"),
    (dict(strategy="median", secagg=True), "cannot run with secure aggregation"),
    (dict(strategy="krum", dp_clip=1.0), "differential privacy"),
    (dict(strategy="krum", krum_f=2), "--strategy krum with --krum-f 2 needs more than 6 clients per round, but 6"),
    (dict(strategy="bulyan", krum_f=1), "--strategy bulyan with --krum-f 1 needs at least 7 clients per round, but 6"),
    (dict(strategy="scaffold", dp_clip=1.0), "SCAFFOLD"),
    (dict(strategy="qfedavg", secagg=True), "weighs each client by its loss"),
    (dict(strategy="qfedavg", dp_clip=1.0), "weighs each client by its loss"),
    (dict(strategy="qfedavg", qffl_q=-1.0), "--qffl-q must not be negative"),
    (dict(dp_noise=1.0), "--dp-noise needs --dp-clip"),
    (dict(dp_adaptive=True), "--dp-adaptive needs --dp-clip"),
    (dict(dp_adaptive=True, dp_clip=1.0, dp_target_quantile=1.0), "--dp-target-quantile must be in (0, 1)"),
    (dict(dp_adaptive=True, dp_clip=1.0, dp_clip_lr=0.0), "--dp-clip-lr must be positive"),
    (dict(dp_adaptive=True, dp_clip=1.0, dp_noise=1.0), "must exceed half the noise multiplier"),
    (dict(client_data="zipf"), "--client-data 'zipf'"),
    (dict(clients=300), "--clients 300 is more than the 240 training samples"),
])
def test_bad_config_is_refused_with_the_option_named(changes: dict, message: str) -> None:
    with pytest.raises(ValueError) as err:
        replace(BASE, **changes).check(4 if "ranks_per_client" in changes else SIZE, 240)
    assert message in str(err.value)


def test_command_line_defaults_are_the_config_defaults() -> None:
    # the options of --mode fl and FLConfig are two spellings of one set of defaults: they must agree
    from dmlmpi import config

    args = config.build_parser().parse_args(["--mode", "fl"])
    assert FLConfig.from_args(args) == FLConfig()
