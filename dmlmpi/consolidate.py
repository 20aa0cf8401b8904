"""`python -m dmlmpi.consolidate CHECKPOINT OUT.pt`: a checkpoint's whole model as one plain state_dict file.

For inference, export or fine-tuning elsewhere (what DeepSpeed's zero_to_fp32.py does for its
ZeRO files). CHECKPOINT is a run directory (its latest checkpoint), a sharded checkpoint's
directory `ckpt-STEP`, or a full checkpoint file `ckpt-STEP.pt`. One process, no MPI: a sharded
checkpoint's rank files are read memory-mapped, each parameter from the files that hold it.
`torch.load(OUT.pt)` then gives what `model.state_dict()` would: `model.load_state_dict()` takes it.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from dmlmpi import checkpoint


def model_state(path: str) -> dict[str, torch.Tensor]:
    """The whole model's state_dict from a checkpoint (run directory, sharded directory or full file)."""
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, checkpoint.META)):
        found = checkpoint.latest_path(path)  # a run directory
        if found is None:
            raise FileNotFoundError(f"{path}: no checkpoint here (no ckpt-STEP.pt file or ckpt-STEP directory)")
        path = found
    if not os.path.isdir(path):
        state = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(state, dict) or "model" not in state:
            raise ValueError(f"{path}: not a dmlmpi checkpoint with a model")
        return dict(state["model"])
    meta = torch.load(os.path.join(path, checkpoint.META), map_location="cpu", weights_only=False)
    if "names" not in meta:
        raise ValueError(f"{path}: a sharded checkpoint without the model's parameter names")
    reader = checkpoint.ShardReader(path, meta["shard_ranges"])
    out = dict(meta["rest"])  # buffers and frozen parameters: whole already
    at = 0
    for name, shape in zip(meta["names"], meta["shapes"]):
        n = int(torch.Size(shape).numel())
        # the parameters lie end to end in the order of `names`: each one's range, from whichever files hold it
        out[name] = reader.read("param", at, at + n).reshape(shape).clone()
        at += n
    if at != meta["total"]:
        raise ValueError(f"{path}: the parameters' shapes add up to {at} elements, the shards to {meta['total']}")
    return out


def main(argv: list[str]) -> int:
    """Write CHECKPOINT's model to OUT as a plain state_dict."""
    p = argparse.ArgumentParser(prog="python -m dmlmpi.consolidate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a run directory, a ckpt-STEP directory or a ckpt-STEP.pt file")
    p.add_argument("out", help="the state_dict file to write")
    args = p.parse_args(argv)
    try:
        state = model_state(args.checkpoint)
        torch.save(state, args.out)
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"python -m dmlmpi.consolidate: error: {exc}", file=sys.stderr)
        return 1
    elements = sum(t.numel() for t in state.values())
    print(f"{args.out}: {len(state)} tensors, {elements} elements, from {args.checkpoint}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
