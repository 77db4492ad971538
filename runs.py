"""
The run folder: train.py's settings, log, checkpoints and what --resume reads back. Nothing here trains.

    RUN/args.json            every setting (the recipe's defaults filled in) and where the model and data came from
    RUN/metrics.jsonl        a start line (settings, git revision, counts), one line per step, one per evaluation
    RUN/adapter.safetensors  the file users load (export.save_adapter); RUN/peft/ its PEFT-LoRA copy at the end
    RUN/state.pt             v, the optimizer, every RNG and the step: what --resume needs
    RUN/eval/stepNNNNNN.jsonl  one record per evaluated example

Choices (*ours*):
1. Every file is written to a temporary name and renamed, so a kill -9 loses at most the steps since the last
   checkpoint, and a reader never sees half a file.
2. A resumed run takes its settings from args.json; a flag given again must agree, except the few in RESUMABLE that
   change how a run is watched, not what it computes. A run saved before a flag existed gets that flag's default.
3. Resuming drops the log lines of steps after the checkpoint: those steps run again and are logged again.
"""

import argparse
import json
import os
import random
import subprocess
import time

import torch

import parallel

ROOT = os.path.dirname(os.path.abspath(__file__))
# flags that may differ between a run and its resumption; everything else must match (choice 2)
RESUMABLE = {"resume", "out", "max_steps", "save_every", "eval_every", "log_samples", "device", "eval_batch_size"}
RESUMABLE |= {"dist_timeout", "no_eval", "report_to"}


def resumed_args(args, defaults, given: dict) -> argparse.Namespace:
    """The settings of the run in args.resume: its args.json over defaults(saved) (every flag's default for that
    run), then the flags `given` now, which must be RESUMABLE or equal to the run's (choice 2)."""
    path = os.path.join(args.resume, "args.json")
    if not os.path.exists(path):
        raise SystemExit(f"--resume {args.resume}: no args.json there; is it a run folder made by train.py?")
    saved = json.load(open(path))
    saved = defaults(saved) | saved
    clash = {k: (saved.get(k), v) for k, v in given.items() if k not in RESUMABLE and saved.get(k) != v}
    if clash:
        what = ", ".join(f"--{k.replace('_', '-')} {new} (the run has {old})" for k, (old, new) in clash.items())
        raise SystemExit(
            f"--resume {args.resume}: this run was made with different settings: {what}. "
            "Drop those flags to continue it, or start a new run with another --out."
        )
    merged = {**saved, **{k: v for k, v in given.items() if k in RESUMABLE}}
    merged["resume"], merged["out"] = args.resume, args.resume
    return argparse.Namespace(**merged)


def prepare_out(args, stamp=None) -> str:
    """The run folder (default runs/<method>-u<u>-tie<tie>-<time>), made and checked writable; a fresh run refuses
    a folder that already holds one."""
    out = args.out or os.path.join(
        "runs", f"{args.method}-u{args.u}-tie{args.tie}-{stamp or time.strftime('%Y%m%d-%H%M%S')}"
    )
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, f".write-test-{os.getpid()}")  # one per rank under torchrun
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise SystemExit(f"--out {out}: cannot write there ({e.strerror}); pick a writable folder.") from None
    if args.resume is None and os.path.exists(os.path.join(out, "state.pt")):
        raise SystemExit(f"--out {out} already holds a run; continue it with --resume {out} or pick another --out.")
    return out


def record_eval(out: str, step: int, rows: list, summary: dict):
    """RUN/eval/stepNNNNNN.jsonl (one record per example, in the dataset's order) and the metrics.jsonl line."""
    write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
        os.path.join(out, "eval", f"step{step:06d}.jsonl"),
    )
    append_jsonl(os.path.join(out, "metrics.jsonl"), {"event": "eval", "step": step} | summary)


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "-uno"], cwd=ROOT, capture_output=True, text=True)
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if rev.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_atomic(obj, path, save=torch.save):
    tmp = path + ".tmp"
    save(obj, tmp)
    os.replace(tmp, path)  # choice 1: a reader (or a resume) sees the old file or the new one, never half of one


def write_text(text, path):
    write_atomic(text, path, lambda s, f: open(f, "w", encoding="utf-8").write(s))


def append_jsonl(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def rng_state(gen):
    st = {"torch": torch.get_rng_state(), "python": random.getstate(), "sampler": gen.get_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st, gen):
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    gen.set_state(st["sampler"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def new_run(args, rank, n, nbytes, total, world) -> int:
    """A fresh run folder: args.json and the first line of metrics.jsonl (settings, git revision, counts). -> 0"""
    if rank == 0:
        json.dump(vars(args), open(os.path.join(args.out, "args.json"), "w"), indent=1)
        head = {"event": "start", "step": 0, "args": vars(args), "git": git_revision(), "trainable": n}
        append_jsonl(
            os.path.join(args.out, "metrics.jsonl"), head | {"update_bytes": nbytes, "steps": total, "world": world}
        )
    return 0


def checkpoint(args, step, adapter, opt, gen, rank, data_position: dict):
    """adapter.safetensors (the file users load) and state.pt (what --resume needs), each written atomically by
    rank 0; every rank waits for them."""
    if rank == 0:
        meta = dict(step=step, model=args.model, sources=getattr(args, "sources", None), recipe=args.recipe)
        adapter.save(os.path.join(args.out, "adapter.safetensors"), dtype=args.v_dtype, **meta)
        state = {"step": step, "args": vars(args), "params": [t.detach().cpu() for t in adapter.params]}
        state |= {"opt": opt.state_dict(), "rng": rng_state(gen), "data": data_position}
        write_atomic(state, os.path.join(args.out, "state.pt"))
    parallel.barrier("checkpoint barrier")  # no rank runs ahead of a half-written checkpoint


def load_checkpoint(args, adapter, opt, gen, rank) -> int:
    """Restore v, the optimizer and every RNG from state.pt; drop the log lines of steps after it (choice 3)."""
    st = torch.load(os.path.join(args.out, "state.pt"), map_location="cpu", weights_only=False)
    with torch.no_grad():
        for t, saved in zip(adapter.params, st["params"]):
            t.copy_(saved)
    opt.load_state_dict(st["opt"])
    set_rng_state(st["rng"], gen)
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    kept = [line for line in open(metrics_path) if json.loads(line).get("step", 0) <= st["step"]]
    if rank == 0:  # every rank loaded the same checkpoint; one writes the run folder
        write_text("".join(kept), metrics_path)
    return st["step"]
