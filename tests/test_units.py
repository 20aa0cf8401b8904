"""Pure pieces, no MPI traffic: chunking, bucket plans, algorithm choice, guard messages, launch env."""
from __future__ import annotations

import numpy as np
import pytest

from dmlmpi import mpienv
from dmlmpi.comm import choose_algorithm
from dmlmpi.comm.fusion import plan_buckets
from dmlmpi.comm.guard import mismatch_message, signature
from dmlmpi.comm.ring import chunk_bounds
from dmlmpi.data import global_batches, rank_share


@pytest.mark.parametrize("length", [0, 1, 2, 5, 7, 100, 1001])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
def test_chunk_bounds_cover_everything_once(length: int, n: int) -> None:
    bounds = chunk_bounds(length, n)
    assert len(bounds) == n and bounds[0][0] == 0 and bounds[-1][1] == length
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    sizes = [b - a for a, b in bounds]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_plan_buckets_respects_limit_order_and_keys() -> None:
    sizes = [40, 40, 40, 100, 8, 8]
    keys = ["f32", "f32", "i64", "f32", "i64", "f32"]
    plan = plan_buckets(sizes, keys, bucket_bytes=80)
    assert sorted(i for b in plan for i in b) == list(range(6))
    for b in plan:
        assert len({keys[i] for i in b}) == 1
        assert sum(sizes[i] for i in b) <= 80 or len(b) == 1
        assert b == sorted(b)
    assert [0, 1] in plan and [3] in plan and [2, 4] in plan and [5] in plan


def test_choose_algorithm_crossover() -> None:
    table = {2: 1000, 8: 5000}
    assert choose_algorithm(999, 2, table) == "mpi" and choose_algorithm(1000, 2, table) == "ring"
    assert choose_algorithm(4000, 4, table) == "ring"  # nearest smaller world size: 2
    assert choose_algorithm(4000, 8, table) == "mpi"
    assert choose_algorithm(1 << 30, 1, table) == "mpi"
    assert choose_algorithm(10, 8, override=10) == "ring"  # DMLMPI_RING_MIN_BYTES
    # 16-bit float reductions cross over far earlier: MPI would reduce them widened to float32
    from dmlmpi.comm.select import RING_MIN_BYTES, RING_MIN_BYTES_16BIT

    for world in (2, 4, 8):
        small = RING_MIN_BYTES_16BIT[world]
        assert small < RING_MIN_BYTES[world]
        assert choose_algorithm(small, world, widened=True) == "ring"
        assert choose_algorithm(small - 1, world, widened=True) == "mpi"
        assert choose_algorithm(small, world) == "mpi"
    assert choose_algorithm(1 << 30, 1, widened=True) == "mpi"


def test_ring_pieces_cover_each_step_exactly() -> None:
    from dmlmpi.comm.ring import pieces

    for send, recv in [((0, 10), (10, 20)), ((0, 11), (11, 21)), ((5, 5), (5, 6)), ((0, 7), (7, 7))]:
        for segment in (0, 1, 3, 4, 10, 100):
            longest = max(send[1] - send[0], recv[1] - recv[0]) + 1  # another rank's chunk may be longer
            got = pieces(send, recv, segment, longest)
            sent = [i for a, b, _, _ in got for i in range(a, b)]
            taken = [i for _, _, c, d in got for i in range(c, d)]
            assert sent == list(range(*send)) and taken == list(range(*recv)), (send, recv, segment)
            # the count depends only on segment and the common longest chunk: equal on every rank
            assert len(got) == (1 if segment <= 0 or longest <= segment else -(-longest // segment))


def test_ring_segments_only_while_ranks_have_cores() -> None:
    from dmlmpi.comm.select import RING_SEGMENT_BYTES, ring_segment_bytes

    assert ring_segment_bytes(2, 2) == ring_segment_bytes(4, 2) == RING_SEGMENT_BYTES
    assert ring_segment_bytes(8, 2) == 0 and ring_segment_bytes(8, 4) == RING_SEGMENT_BYTES


def test_mismatch_message_names_ranks_and_fields() -> None:
    a = signature("allreduce", 10, 3, "sum", "auto", 0, 5)
    b = signature("allreduce", 12, 4, "sum", "auto", 0, 5)
    text = mismatch_message([a, a, b])
    assert "length: ranks 0,1 10; rank 2 12" in text
    assert "dtype: ranks 0,1 float32; rank 2 float64" in text
    assert "op" not in text.split("--")[1]


def test_launch_env_as_root_and_user() -> None:
    root = mpienv.launch_env({}, euid=0)
    assert root["OMPI_ALLOW_RUN_AS_ROOT"] == "1" and root["PRTE_ALLOW_RUN_AS_ROOT_CONFIRM"] == "1"
    assert root["PRTE_MCA_rmaps_default_mapping_policy"] == ":oversubscribe"
    user = mpienv.launch_env({"PATH": "/bin"}, euid=1000)
    assert "OMPI_ALLOW_RUN_AS_ROOT" not in user and user["PATH"] == "/bin"
    mine = mpienv.launch_env({"PRTE_MCA_rmaps_default_mapping_policy": "slot"}, euid=1000)
    assert mine["PRTE_MCA_rmaps_default_mapping_policy"] == "slot"  # the user's own setting wins


def test_launch_env_drops_an_outer_jobs_rank_variables() -> None:
    outer = {"PATH": "/bin", "OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "1", "PMIX_RANK": "0",
             "PMIX_NAMESPACE": "prterun-vm-1@1", "PMI_RANK": "0", "OMPI_UNIVERSE_SIZE": "2",
             "PRTE_LAUNCHED": "1", "OMPI_MCA_btl": "self,vader", "OMPI_ALLOW_RUN_AS_ROOT": "1"}
    env = mpienv.launch_env(outer, euid=1000)
    assert not [k for k in env if k.startswith(("OMPI_COMM_WORLD_", "PMIX_", "PMI_"))], env
    assert "OMPI_UNIVERSE_SIZE" not in env and "PRTE_LAUNCHED" not in env
    # what the user set for MPI stays
    assert env["OMPI_MCA_btl"] == "self,vader" and env["OMPI_ALLOW_RUN_AS_ROOT"] == "1" and env["PATH"] == "/bin"


def test_global_batches_split_over_ranks() -> None:
    batches = global_batches(103, 10, epoch=1, seed=3, drop_last=False)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(103))
    assert not np.array_equal(flat, np.concatenate(global_batches(103, 10, epoch=2, seed=3, drop_last=False)))
    for world in (1, 3, 4):
        parts = [rank_share(batches[0], r, world) for r in range(world)]
        assert np.array_equal(np.concatenate(parts), batches[0])


def test_signal_latch_keeps_the_first_signal_and_restores_the_handlers() -> None:
    """The latch notes the first SIGUSR1/SIGTERM (the process survives it) and puts the old handlers back."""
    import os
    import signal

    from dmlmpi.signal_latch import SignalLatch

    before = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    latch = SignalLatch()
    try:
        assert latch.received is None
        os.kill(os.getpid(), signal.SIGUSR1)  # Python runs the handler before the next bytecode
        os.kill(os.getpid(), signal.SIGTERM)
        assert latch.received == signal.SIGUSR1
    finally:
        latch.restore()
    assert {s: signal.getsignal(s) for s in before} == before


@pytest.mark.parametrize("k", [1, 2, 3, 4, 8, 9])
def test_sample_orders_balance_first_place_and_predecessors(k: int) -> None:
    from collections import Counter

    from dmlmpi.bench.common import balanced_orders

    names = [f"v{i}" for i in range(k)]
    cycle = k if k % 2 == 0 else 2 * k
    rounds = balanced_orders(names, 2 * cycle + 1)
    assert len(rounds) == 2 * cycle + 1 and all(sorted(r) == names for r in rounds)
    full = rounds[:cycle]
    assert rounds[cycle:2 * cycle] == full and rounds[-1] == full[0]  # the design repeats
    firsts = Counter(r[0] for r in full)
    assert set(firsts) == set(names) and len(set(firsts.values())) == 1  # each name first equally often
    follows = Counter((a, b) for r in full for a, b in zip(r, r[1:]))
    if k > 1:  # every ordered pair of different names adjacent equally often
        assert len(follows) == k * (k - 1) and len(set(follows.values())) == 1
    assert balanced_orders([], 3) == []


@pytest.mark.parametrize("argv,message", [
    (["--sync-bn"], "--sync-bn needs a model with BatchNorm layers (--model cnn-bn); --model auto has none"),
    (["--sync-bn", "--model", "cnn-bn", "--mode", "pipeline"], "--sync-bn works with --mode dp, not pipeline"),
    (["--sync-bn", "--model", "cnn-bn", "--elastic"], "--sync-bn is not supported with --elastic"),
    (["--zero", "--mode", "ps", "--servers", "1"], "--zero works with --mode dp or hybrid (split along dp), not ps"),
    (["--zero", "--mode", "pipeline"], "--zero works with --mode dp or hybrid (split along dp), not pipeline"),
    (["--zero", "--elastic"], "--zero does not work with --elastic"),
    (["--zero", "4"], "a ZeRO stage is 0, 1, 2 or 3, got '4'"),
    (["--zero", "3", "--mode", "hybrid", "--pp", "2"], "--zero 3 works with --mode dp, not hybrid"),
    (["--zero", "2", "--mode", "hybrid", "--pp", "2"], "--zero 2 works with --mode dp, not hybrid"),
    (["--zero", "2", "--compression", "bf16"], "--zero 2 reduce-scatters full-precision gradients: not with --compression bf16"),
    (["--checkpoint-format", "sharded"], "--checkpoint-format sharded saves ZeRO's shards: it needs --mode dp with --zero 1, 2 or 3 (got --mode dp, --zero 0)"),
    (["--mode", "hybrid", "--dp", "2", "--pp", "2", "--zero", "--checkpoint-format", "sharded"],
     "(got --mode hybrid, --zero 1)"),
    (["--checkpoint-format", "zip"], "invalid choice: 'zip'"),
    (["--zero", "3", "--zero3-unit-params", "-5"], "--zero3-unit-params must not be negative, got -5"),
    (["--zero", "2", "--zero3-unit-params", "1000"], "--zero3-unit-params groups ZeRO-3's units: it needs --zero 3 (got --zero 2)"),
    (["--compression", "powersgd", "--mode", "ps", "--servers", "1"], "--compression powersgd works with --mode dp"),
    (["--compression", "powersgd", "--powersgd-rank", "0"], "--powersgd-rank must be at least 1, got 0"),
    (["--clip-grad-norm", "-1"], "--clip-grad-norm must be a positive norm, or 0 for off; got -1.0"),
    (["--clip-grad-norm", "nan"], "--clip-grad-norm must be a positive norm"),
    (["--clip-grad-norm", "1", "--mode", "fl"], "not fl (--dp-clip clips each client's update)"),
    (["--clip-grad-norm", "1", "--mode", "ps", "--servers", "1"], "--clip-grad-norm works with --mode dp, pipeline or hybrid, not ps"),
    (["--grad-accum", "0"], "--grad-accum must be at least 1, got 0"),
    (["--reduction", "adasum", "--mode", "pipeline"], "--reduction adasum works with --mode dp, not pipeline"),
    (["--reduction", "adasum", "--compression", "fp16"], "--reduction adasum combines whole gradients: not with --compression fp16"),
    (["--reduction", "adasum", "--elastic"], "--reduction adasum does not work with --elastic"),
    (["--amp", "fp16", "--mode", "ps", "--servers", "1"], "--amp works with --mode dp, pipeline or hybrid, not ps"),
    (["--amp", "fp8"], "invalid choice: 'fp8'"),
    (["--initial-scale-power", "-1"], "--initial-scale-power must be in 0..100, got -1"),
    (["--grad-accum", "2", "--mode", "pipeline"], "not pipeline (a pipeline accumulates over --microbatches)"),
    (["--grad-accum", "20"], "--grad-accum 20: --batch-size 64 gives each of the 4 ranks fewer samples than micro-steps"),
    (["--model", "moe", "--moe-experts", "6"], "--moe-experts 6 does not split over 4 ranks (use a multiple of 4)"),
    (["--model", "moe", "--moe-k", "9"], "1 <= --moe-k <= --moe-experts, got --moe-experts 8 --moe-k 9"),
    (["--model", "moe", "--moe-aux", "-1"], "--moe-aux must not be negative, got -1.0"),
    (["--model", "moe", "--moe-ep-size", "3"], "--moe-ep-size 3 must divide the 4 ranks into equal expert-parallel groups"),
    (["--model", "moe", "--moe-ep-size", "2", "--moe-experts", "3"], "--moe-experts 3 does not split over 2 ranks"),
    (["--model", "moe", "--zero"], "(expert parallelism) does not work with --zero 1 yet"),
    (["--model", "moe", "--reduction", "adasum"], "does not work with --reduction adasum yet"),
    (["--model", "moe", "--compression", "powersgd"], "does not work with --compression powersgd yet"),
])
def test_sync_bn_zero_and_powersgd_settings_are_checked(argv: list[str], message: str, capsys) -> None:
    """--sync-bn, --zero, PowerSGD, clipping and accumulation outside what they support: refused before training, saying why."""
    from dmlmpi import config

    with pytest.raises(SystemExit):
        config.parse(argv, 4)
    assert message in capsys.readouterr().err


def test_zero_stage_values(tmp_path) -> None:
    """--zero alone is stage 1, --zero 2 stage 2, and YAML's true/false mean 1/0."""
    from dmlmpi import config

    assert config.parse([], 4).zero == 0 and config.parse(["--zero"], 4).zero == 1
    assert config.parse(["--zero", "2"], 4).zero == 2 and config.parse(["--zero", "3"], 4).zero == 3
    for text, stage in (("true", 1), ("false", 0), ("2", 2)):
        cfg = tmp_path / f"{text}.yaml"
        cfg.write_text(f"zero: {text}\n")
        assert config.parse(["--config", str(cfg)], 4).zero == stage


def test_adasum_needs_a_power_of_two(capsys) -> None:
    """--reduction adasum on 3 ranks is refused before training; 4 is accepted."""
    from dmlmpi import config

    with pytest.raises(SystemExit):
        config.parse(["--reduction", "adasum"], 3)
    assert "needs a power-of-two number of ranks (it combines them in a binary tree), but the job has 3" in capsys.readouterr().err
    assert config.parse(["--reduction", "adasum"], 4).reduction == "adasum"
