"""
Data parallel under torchrun: process-group init, sums and broadcasts over ranks, sharded evaluation and its
gather, the gradient sync. Every function is a no-op (or returns its input) without torchrun, so a plain
`python train.py` never meets rank logic; docs/SCALING.md has the launch commands.

    rank, world, local = parallel.init(args)   # (0, 1, 0) without torchrun
    parallel.sync_grads(params)                # the global gradient on every rank
    total = parallel.all_sum([x, y])           # sums of floats over ranks

Choices (*ours*; the paper ran one node and does not describe this):
1. Every rank holds the model and takes a contiguous 1/N of the step's prompts (whole groups), so the global
   batch is the same for any N; train.py checks --prompts-per-step splits evenly before anything loads.
2. The loss is normalised by global counts and the gradients (u numbers for TinyLoRA) are summed, so the sum
   is the full-batch gradient, identical on every rank: every rank clips and steps the same way.
3. Evaluation is sharded (rank r takes examples r, r+N, ...) and gathered on rank 0 in the dataset's order.
   Rank 0 alone prints and writes the run folder; other ranks' stdout goes to /dev/null (stderr stays).
4. A collective that waits longer than --dist-timeout (a dead or hung rank) stops the job with an error that says
   how to resume, instead of hanging. gloo on CPU, NCCL on GPUs (one GPU per rank, by LOCAL_RANK).
"""

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist


def init(args):
    """(rank, world, local_rank) from torchrun's environment; (0, 1, 0) for a plain `python train.py`."""
    if args.sample_batch < 0 or args.dist_timeout <= 0:
        raise SystemExit("--sample-batch must be >= 0 (0: one call per rank) and --dist-timeout > 0 seconds.")
    if "RANK" not in os.environ:
        return 0, 1, 0
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    B, K = args.prompts_per_step, args.sample_batch
    if B % world:
        raise SystemExit(
            f"--prompts-per-step {B} does not split evenly over {world} ranks: each rank takes whole groups of an "
            f"equal share. Use a multiple of {world} (e.g. --prompts-per-step {max(B // world, 1) * world})."
        )
    if K and (B // world) % K:
        raise SystemExit(f"--sample-batch {K} must divide each rank's {B // world} prompts (prompts-per-step / N).")
    cuda = (args.device or "cuda").startswith("cuda") and torch.cuda.is_available()  # else check_args explains
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=args.dist_timeout))
    if rank:  # choice 3: rank 0 alone prints; the others' errors still reach stderr
        sys.stdout = open(os.devnull, "w")
    return rank, world, local


def close():
    if dist.is_initialized():
        dist.destroy_process_group()


def collective(fn, *a, what, **kw):
    """Run one torch.distributed call; a dead or hung rank becomes a clear error on the survivors, not a hang."""
    if not dist.is_initialized():
        return None
    try:
        return fn(*a, **kw)
    except RuntimeError as e:  # gloo: the peer closed the connection, or --dist-timeout passed (choice 4)
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise SystemExit(
            f"rank {dist.get_rank()}: {what} failed ({type(e).__name__}: {first}).\n"
            "Another rank has died or waited past --dist-timeout, so the job stops. Continue from the last "
            "checkpoint with the same torchrun command and --resume RUN_DIR."
        ) from None


def _reduce(values, op, what):
    if not dist.is_initialized():
        return [float(x) for x in values]
    t = torch.tensor([float(x) for x in values], dtype=torch.float64)
    t = t.to("cuda" if dist.get_backend() == "nccl" else "cpu")
    collective(dist.all_reduce, t, op=op, what=what)
    return t.tolist()


def all_sum(values) -> list[float]:
    """Sum each of a list of floats over ranks, in one collective."""
    return _reduce(values, dist.ReduceOp.SUM, "sum of stats")


def all_mean(values) -> list[float]:
    """The mean over ranks of each of a list of floats (of ranks with equal shares: the global mean)."""
    if not dist.is_initialized():
        return [float(x) for x in values]
    return [x / dist.get_world_size() for x in all_sum(values)]


def all_max(values) -> list[float]:
    """The largest of each of a list of floats over ranks, in one collective."""
    return _reduce(values, dist.ReduceOp.MAX, "max of stats")


def sync_grads(params):
    """Sum each gradient over ranks (choice 2). A rank whose loss never reached a tensor still joins in."""
    if not dist.is_initialized():
        return
    for t in params:
        if t.grad is None:
            t.grad = torch.zeros_like(t)
        collective(dist.all_reduce, t.grad, what="gradient all-reduce")


def broadcast(tensors):
    """Rank 0's values of these tensors on every rank, in place."""
    for t in tensors:
        collective(dist.broadcast, t.data, src=0, what="parameter broadcast")


def same_on_all_ranks(obj):
    """Rank 0's value of a picklable object on every rank (e.g. the run folder's time stamp)."""
    box = [obj]
    collective(dist.broadcast_object_list, box, src=0, what="broadcast")
    return box[0]


def barrier(what="barrier"):
    collective(dist.barrier, what=what)


def shard(items: list) -> list:
    """This rank's share of an evaluation set: items r, r+N, r+2N, ... (choice 3)."""
    if not dist.is_initialized():
        return items
    return items[dist.get_rank() :: dist.get_world_size()]


def gather(rows: list, n: int) -> list | None:
    """Every rank's `shard` results -> all n of them in the original order on rank 0, None on the others."""
    if not dist.is_initialized():
        return rows
    world = dist.get_world_size()
    shards = [None] * world if dist.get_rank() == 0 else None
    collective(dist.gather_object, rows, shards, dst=0, what="evaluation gather")
    if dist.get_rank():
        return None
    return [shards[i % world][i // world] for i in range(n)]
