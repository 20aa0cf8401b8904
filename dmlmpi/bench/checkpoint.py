"""`python -m dmlmpi.bench checkpoint`: a ZeRO-3 model's checkpoint saved and loaded, whole or sharded, against torch DCP.

Run under mpirun. An MLP (`--hidden` wide) with AdamW, one step taken so that the optimizer holds
its two moments, is wrapped in dmlmpi's FullyShardedDataParallel for the dmlmpi rows and in torch
FSDP2's fully_shard (over gloo) for the peer. Rows, their samples taken in turn:
`dmlmpi-full` gathers the whole model and optimizer state and rank 0 writes one file
(`checkpoint.save`: what `--checkpoint-format full` does), and a load broadcasts it from rank 0;
`dmlmpi-sharded` has every rank write its own pieces (`checkpoint.save_sharded`: `--checkpoint-format
sharded`) and read back only its own; `torch-dcp` is torch.distributed.checkpoint's save and load
of the FSDP2 model's and optimizer's sharded state dicts (`get_state_dict`/`set_state_dict`), every
rank writing its own file. Times are the slowest rank's, per save and per load, files fsynced by
all three. After the timed samples each row's model is zeroed and loaded once more, and compared
with what was saved (`restored`).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
from typing import Any, Callable

import torch
from mpi4py import MPI

from dmlmpi import checkpoint
from dmlmpi.models import mlp
from dmlmpi.parallel import FullyShardedDataParallel

from .common import balanced_orders, close_gloo, format_table, init_gloo, timed_sample, write_json
from .dp import torch_fsdp

ROWS = ("dmlmpi-full", "dmlmpi-sharded", "torch-dcp")


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(prog="python -m dmlmpi.bench checkpoint", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", default="2048,2048", help="the MLP's hidden widths (40 inputs, 10 outputs)")
    p.add_argument("--samples", type=int, default=6, help="timed saves and loads per row (median, min, max)")
    p.add_argument("--dir", help="where to write (default: a new directory under the system's temporary one)")
    p.add_argument("--json", help="write one record per row and operation to this path")
    args = p.parse_args(argv)
    try:
        args.hidden = tuple(int(w) for w in args.hidden.split(","))
    except ValueError:
        p.error(f"--hidden {args.hidden!r}: comma-separated widths, like 2048,2048")
    if args.samples < 1:
        p.error(f"--samples must be at least 1, got {args.samples}")
    return args


def one_step(model: Any, opt: Any) -> None:
    """One AdamW step on random data, so that the optimizer holds its two moments."""
    x, y = torch.randn(16, 40), torch.randint(0, 10, (16,))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad()


def dmlmpi_rows(model: FullyShardedDataParallel, root: str,
                world: MPI.Comm) -> dict[str, tuple[Callable[[], Any], Callable[[], Any], str]]:
    """dmlmpi's two formats: (save, load, directory) each."""
    opt = model.optimizer
    full_dir, sharded_dir = os.path.join(root, "full"), os.path.join(root, "sharded")

    def save_full() -> None:
        # the whole model and optimizer state gathered, rank 0 writes (the trainer's full format)
        checkpoint.save(full_dir, 1, dict(model=model.full_state_dict(), optimizer=opt.state_dict()), world)

    def load_full() -> None:
        state = checkpoint.load(checkpoint.latest_path(full_dir), world)  # rank 0 reads, every rank gets all
        model.load_full_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])

    def save_sharded() -> None:
        checkpoint.save_sharded(sharded_dir, 1, {}, opt.shard_state(), world)

    def load_sharded() -> None:
        state = checkpoint.load(checkpoint.latest_path(sharded_dir), world)
        opt.load_shard_state(state["shards"].read, state["shard_keys"], state["shard_scalars"], state["param_groups"])

    return {"dmlmpi-full": (save_full, load_full, full_dir),
            "dmlmpi-sharded": (save_sharded, load_sharded, sharded_dir)}


def dcp_row(model: Any, opt: Any, root: str) -> tuple[Callable[[], Any], Callable[[], Any], str]:
    """torch.distributed.checkpoint over the FSDP2 model: (save, load, directory)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    where = os.path.join(root, "dcp")

    def save() -> None:
        msd, osd = get_state_dict(model, opt)  # each rank's shards (DTensors), no gathering
        # (overwrite and fsync: DCP's defaults, said explicitly; it warns when overwrite is left implicit)
        dcp.save({"model": msd, "optim": osd}, storage_writer=dcp.FileSystemWriter(where, sync_files=True,
                                                                                    overwrite=True))

    def load() -> None:
        msd, osd = get_state_dict(model, opt)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=where)  # into the shards, in place
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])

    return save, load, where


def written_bytes(row: str, where: str, world: MPI.Comm) -> tuple[int, int]:
    """Bytes of the files this row's checkpoint has, as (the most any one rank wrote, all ranks')."""
    rank = world.Get_rank()
    if row == "dmlmpi-full":
        mine = os.path.getsize(checkpoint.latest_path(where)) if rank == 0 else 0
    elif row == "dmlmpi-sharded":
        path = checkpoint.latest_path(where)
        mine = os.path.getsize(os.path.join(path, checkpoint.shard_name(rank)))
        mine += os.path.getsize(os.path.join(path, checkpoint.META)) if rank == 0 else 0
    else:  # DCP: one data file per rank, rank 0 also the metadata
        mine = sum(os.path.getsize(os.path.join(where, f)) for f in os.listdir(where)
                   if f.startswith(f"__{rank}_") or (rank == 0 and f == ".metadata"))
    sizes = world.allgather(mine)
    return max(sizes), sum(sizes)


def live_tensors(model: Any, opt: Any) -> list[torch.Tensor]:
    """This rank's parts of the parameters and optimizer state, as they are now (a load replaces the state's)."""
    local = (lambda t: t.to_local() if hasattr(t, "to_local") else t)  # noqa: E731 - FSDP2's DTensors
    params = ([u.shard for u in model.units] if isinstance(model, FullyShardedDataParallel)
              else list(model.parameters()))
    state = getattr(opt, "optim", opt).state  # (dmlmpi's keeps its local optimizer as .optim)
    return [local(t).detach() for t in params] + [local(t) for s in state.values() for t in s.values()
                                                   if torch.is_tensor(t)]


def restored(model: Any, opt: Any, load: Callable[[], Any], world: MPI.Comm) -> bool:
    """Zero the model's parameters and optimizer state, load once, and compare with what was saved (every rank)."""
    saved = [t.clone() for t in live_tensors(model, opt)]
    with torch.no_grad():
        for t in live_tensors(model, opt):
            t.zero_()
    load()
    got = live_tensors(model, opt)
    same = len(got) == len(saved) and all(torch.equal(a, b) for a, b in zip(got, saved))
    return bool(world.allreduce(int(same), op=MPI.MIN))


def main(argv: list[str]) -> int:
    """Time every row's saves and loads in turn; print the table; optionally write JSON."""
    args = parse_args(argv)
    world = MPI.COMM_WORLD
    n, rank = world.Get_size(), world.Get_rank()
    root = world.bcast((tempfile.mkdtemp(prefix="dmlmpi-bench-ckpt-", dir=args.dir) if rank == 0 else None), root=0)
    dist = init_gloo(world)
    try:
        torch.manual_seed(0)
        fsdp = FullyShardedDataParallel(mlp(40, args.hidden), torch.optim.AdamW, world, lr=1e-3)
        fsdp_opt = fsdp.optimizer
        one_step(fsdp, fsdp_opt)
        torch.manual_seed(0)
        peer = torch_fsdp(mlp(40, args.hidden), world, reshard=True)
        peer_opt = torch.optim.AdamW(peer.parameters(), lr=1e-3)
        one_step(peer, peer_opt)
        rows = dict(dmlmpi_rows(fsdp, root, world), **{"torch-dcp": dcp_row(peer, peer_opt, root)})
        owners = {"dmlmpi-full": (fsdp, fsdp_opt), "dmlmpi-sharded": (fsdp, fsdp_opt), "torch-dcp": (peer, peer_opt)}
        for save, load, _ in rows.values():  # warm up: first writes and reads, imports
            save()
            load()
        times: dict[tuple[str, str], list[float]] = {(r, op): [] for r in ROWS for op in ("save", "load")}
        for order in balanced_orders(list(ROWS), args.samples):
            for row in order:
                save, load, _ = rows[row]
                times[(row, "save")].append(timed_sample(save, 1, world))
                times[(row, "load")].append(timed_sample(load, 1, world))
        params = sum(u.used for u in fsdp.units)
        records = []
        for row in ROWS:
            most, total = written_bytes(row, rows[row][2], world)
            ok = restored(*owners[row], rows[row][1], world)
            for op in ("save", "load"):
                t = times[(row, op)]
                records.append(dict(row=row, operation=op, ranks=n, parameters=params, time_s_median=statistics.median(t),
                                    time_s_min=min(t), time_s_max=max(t), samples=len(t),
                                    written_most_one_rank=most, written_all_ranks=total, restored=ok))
        base = {r["operation"]: r["time_s_median"] for r in records if r["row"] == "torch-dcp"}
        for r in records:
            r["vs_torch_dcp"] = r["time_s_median"] / base[r["operation"]]
        fsdp.close()
    finally:
        close_gloo(dist)
        world.Barrier()
        if rank == 0:
            shutil.rmtree(root, ignore_errors=True)
    if rank == 0:
        print(f"# checkpoint of an MLP 40-{'-'.join(map(str, args.hidden))}-10 ({params} parameters, AdamW) "
              f"on {n} ranks, {args.samples} samples per row; times: the slowest rank's")
        table = [dict(r, t=f"{r['time_s_median'] * 1e3:.1f} ({r['time_s_min'] * 1e3:.1f}-{r['time_s_max'] * 1e3:.1f})",
                      most=f"{r['written_most_one_rank'] / 2 ** 20:.1f} MiB",
                      total=f"{r['written_all_ranks'] / 2 ** 20:.1f} MiB") for r in records]
        print(format_table(table, [("row", "row", ""), ("operation", "op", ""), ("t", "ms median (min-max)", ""),
                                   ("vs_torch_dcp", "vs torch-dcp", ".2f"), ("most", "written by one rank (most)", ""),
                                   ("total", "written in all", ""), ("restored", "restored", "")]))
        if args.json:
            write_json(args.json, records)
    return 0
