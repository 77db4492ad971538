"""
Train a TinyLoRA adapter with GRPO (or SFT, the paper's comparison): the one script that wires the library.

    python train.py --u 1 --tie 196             # Qwen2.5-7B-Instruct on GSM8K: exactly 1 trainable parameter
    python train.py --device cpu --model DIR --data train.jsonl --eval-data test.jsonl --max-new-tokens 128 ...

Each step: take the next --prompts-per-step questions -> sample G completions each (sample.py) -> grade them
(data/) -> GRPO loss and gradient (grpo.py) -> AdamW step on v -> log -> evaluate -> checkpoint.

Choices, each marked *paper* ("Learning to Reason in 13 Parameters", GSM8K setup) or *ours*:
1. Defaults: Qwen2.5-7B-Instruct, G = 4, 64 prompts per step, 3 epochs, temperature 1.0, 4,096 new tokens,
   no KL, r = 2, tiled tying, reward = exact match of the final answer (*paper*). u = 1, tie = 16 gives the
   headline 13 parameters (*paper*).
2. lr = 2e-4 (*ours*, inside the paper's sweep 1e-7..2e-4, at its top): with Adam each step moves v by about lr,
   and v is in units of the top singular values (dW = U S (sum v_i P_i) V^T), so 3 epochs (~350 steps) can move
   the top directions by at most ~7%, the scale at which behaviour changes. Larger is dangerous: one Adam step
   at lr 0.1 (v = 0.1 everywhere) wrecked SmolLM2-135M, and Adam's momentum then carried v on for ~10 more
   steps without any gradient; short CPU runs on small models used 1e-2 (docs/RESULTS.md).
3. AdamW without weight decay, constant lr, gradient-norm clip 1.0 (*ours*; the paper does not say).
4. One optimisation step per batch (mu = 1): the update is on-policy and grpo.py skips the pi_old forward (*ours*).
5. Data order: a fresh permutation of the training set per epoch from --seed; the last partial batch of an epoch
   is dropped; the position is a pure function of the step, so resuming needs only the step (*ours*).
6. Checkpoints hold v (all trainable tensors), the optimizer, every RNG and the step; each file is written to a
   temporary name and renamed, so a kill -9 loses at most the steps since the last checkpoint (*ours*).
7. Evaluation is greedy on the test split (*paper*), before training, every --eval-every steps and at the end.
8. Data parallel under `torchrun --nproc-per-node N train.py ...` (*ours*; docs/SCALING.md): every rank holds the
   model and takes a contiguous 1/N of the step's prompts (whole groups), so the global batch is the same for any N;
   the token count that normalises the loss, the gradients (u numbers for TinyLoRA) and the logged sums are
   summed over ranks, so every rank applies the same update. Evaluation is sharded over ranks and gathered; rank 0
   alone prints and writes the run folder. A collective that waits longer than --dist-timeout (a dead or hung
   rank) stops the job with an error instead of hanging. Without torchrun none of this runs.
9. Sampling seeds: each sampling call (--sample-batch prompts) re-seeds the generator from (seed, step, index of
   its first prompt in the step), not from a stream carried across steps (*ours*). So a step's rollouts depend only
   on the step and the adapter, a resume needs no sampler state, and the run is the same on any number of ranks
   N for which the per-rank share (prompts-per-step / N) is a multiple of --sample-batch (up to float rounding
   from different batch shapes). With the default (one call per rank) it differs between N in the draws only,
   not in distribution.
"""

import argparse
import hashlib
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from model import hub_reachable

ROOT = os.path.dirname(os.path.abspath(__file__))
EVAL_KEYS = ("strict", "flexible", "accuracy")  # what eval.evaluate reports (with _lo/_hi 95% bounds)
DATASETS_HINT = "gsm8k (the Hub, or a local GSM8K-style .jsonl with question/answer fields)"

# -----------------------------------------------------------------------------
# args: one flat block, grouped; names follow the paper's symbols

p = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
)
# model and data
p.add_argument("--model", default="Qwen/Qwen2.5-7B-Instruct", help="local HF folder or Hub id")
p.add_argument("--data", default="gsm8k", help="training set: a name known to data/ or a local .jsonl/.parquet")
p.add_argument("--eval-data", default=None, help="evaluation set (default: the test split of --data)")
p.add_argument("--prompt-style", default=None, choices=["gsm8k", "boxed", "plain"], help="default: the dataset's")
p.add_argument("--device", default=None, help="cuda | cpu (default: cuda; on a machine without one, say --device cpu)")
p.add_argument(
    "--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="default bf16 on GPU, fp32 on CPU"
)
# adapter: W' = W + U S (sum_i v_i P_i) V^T
p.add_argument("--method", default="tinylora", choices=["tinylora", "loraxs", "lora", "full"])
p.add_argument("--r", type=int, default=2, help="rank of the frozen SVD (and of LoRA)")
p.add_argument("--u", type=int, default=1, help="length of each trainable vector v")
p.add_argument("--tie", type=int, default=None, help="modules sharing one v (default: 16 for tinylora, else 1)")
p.add_argument("--order", default="tiled", choices=["tiled", "structured"], help="which modules share a v")
p.add_argument("--variant", default="verl", choices=["verl", "paper", "peft"], help="verl: the official update")
p.add_argument("--v-dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="v's storage in the saved file")
p.add_argument("--alpha", type=float, default=None, help="alpha of the alpha/r scale (default 32: verl, lora)")
# algorithm
p.add_argument("--algo", default="grpo", choices=["grpo", "sft"], help="sft: next-token loss on reference solutions")
p.add_argument("--G", type=int, default=4, help="completions per prompt (group size)")
p.add_argument("--prompts-per-step", type=int, default=64, help="prompts per optimisation step")
p.add_argument("--epochs", type=float, default=3, help="passes over the training set")
p.add_argument("--max-new-tokens", type=int, default=4096)
p.add_argument("--temperature", type=float, default=1.0)
p.add_argument("--top-p", type=float, default=1.0)
p.add_argument("--top-k", type=int, default=0)
p.add_argument("--reward", default="strict", choices=["strict", "flexible"], help="strict: the number after ####")
p.add_argument("--kl", type=float, default=0.0, help="beta, weight of the k3 KL to the base (adapter off)")
p.add_argument("--eps-low", type=float, default=0.2, help="clip ratio below 1 - eps_low")
p.add_argument("--eps-high", type=float, default=0.2, help="clip ratio above 1 + eps_high (DAPO: 0.28)")
p.add_argument("--agg", default="token-mean", choices=["token-mean", "seq-mean", "constant"], help="loss aggregation")
p.add_argument("--no-std", action="store_true", help="Dr. GRPO: do not divide advantages by the group std")
p.add_argument("--tis-cap", type=float, default=2.0, help="truncated importance sampling cap (0: off)")
p.add_argument("--mu", type=int, default=1, help="optimisation steps per batch of rollouts (1: on-policy)")
# optimisation
p.add_argument("--lr", type=float, default=2e-4, help="the paper swept 1e-7..2e-4 (with --variant verl)")
p.add_argument("--weight-decay", type=float, default=0.0)
p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: off)")
p.add_argument("--micro-batch", type=int, default=16, help="rollouts per forward/backward (memory, not math)")
p.add_argument("--chunk", type=int, default=4096, help="tokens per lm_head chunk in the loss")
p.add_argument("--grad-checkpointing", action="store_true", help="recompute blocks in backward to save memory")
p.add_argument("--sample-mode", default="auto", choices=["auto", "torch", "triton", "merged"], help="see sample.py")
# run
p.add_argument("--seed", type=int, default=0)
p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: --epochs)")
p.add_argument("--eval-every", type=int, default=50, help="steps between evaluations (0: only before and after)")
p.add_argument("--eval-limit", type=int, default=0, help="evaluate on the first N test examples (0: all)")
p.add_argument("--eval-batch-size", type=int, default=64)
p.add_argument("--eval-max-new-tokens", type=int, default=0, help="0: --max-new-tokens")
p.add_argument("--save-every", type=int, default=10, help="steps between checkpoints")
p.add_argument("--log-samples", type=int, default=2, help="completions per step written to metrics.jsonl")
p.add_argument("--out", default=None, help="run folder (default: runs/<method>-u<u>-tie<tie>-<time>)")
p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue this run with its saved settings")
# data parallel (torchrun --nproc-per-node N train.py ...; choices 8, 9)
p.add_argument(
    "--sample-batch",
    type=int,
    default=0,
    help="prompts per sampling call (0: a rank's whole share); the run is "
    "the same on N ranks when prompts-per-step / N is a multiple of it (choice 9); also bounds the KV cache",
)
p.add_argument("--dist-timeout", type=float, default=600, help="seconds a rank waits for the others before failing")

# flags that may differ between a run and its resumption; everything else must match
RESUMABLE = {"resume", "out", "max_steps", "save_every", "eval_every", "log_samples", "device", "eval_batch_size"}
RESUMABLE |= {"dist_timeout"}


def parse_args(argv=None):
    args = p.parse_args(argv)
    if args.resume is None:
        return args
    # resuming: the run's saved args, overridden only by flags given now, which must not change the run
    path = os.path.join(args.resume, "args.json")
    if not os.path.exists(path):
        raise SystemExit(f"--resume {args.resume}: no args.json there; is it a run folder made by train.py?")
    saved = json.load(open(path))
    given = {k: v for k, v in vars(args).items() if v != p.get_default(k)}
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


# -----------------------------------------------------------------------------
# checks before anything slow: bad values, no GPU, offline, unwritable output


OFFLINE_HELP = (
    "To run without the Hub, download elsewhere and point at local copies:\n"
    "  hf download Qwen/Qwen2.5-7B-Instruct --local-dir DIR   ->  --model DIR\n"
    "  a GSM8K .jsonl (question/answer fields)                 ->  --data train.jsonl --eval-data test.jsonl\n"
    "On a machine without a GPU add --device cpu and a small model, e.g. SmolLM2-135M-Instruct, with small\n"
    "settings: --prompts-per-step 4 --max-new-tokens 128 --eval-limit 50."
)


def model_config(args):
    """(local folder or None, Config) for --model without loading weights; fails fast offline."""
    from model import load_config

    if os.path.isdir(args.model):
        return args.model, load_config(args.model)
    if os.path.exists(args.model) or args.model.startswith((".", "/", "~")) or args.model.count("/") != 1:
        raise SystemExit(f"--model {args.model}: no such folder (and not a Hub id like Qwen/Qwen2.5-7B-Instruct).")
    offline = not hub_reachable()
    if offline:  # use the local Hub cache if the model is there; never wait on the network
        os.environ["HF_HUB_OFFLINE"] = "1"
    from huggingface_hub import hf_hub_download

    try:
        cfg_path = hf_hub_download(args.model, "config.json", local_files_only=offline)
    except Exception as e:
        raise SystemExit(
            f"--model {args.model}: cannot fetch it from the Hub ({type(e).__name__}).\n{OFFLINE_HELP}"
        ) from None
    return None, load_config(os.path.dirname(cfg_path))


def check_args(args, stamp=None):
    if args.tie is None:  # the paper's 13 parameters on Qwen2.5-7B for TinyLoRA; no sharing for the baselines
        args.tie = 16 if args.method == "tinylora" else 1
    for name in ("r", "u", "tie", "G", "prompts_per_step", "max_new_tokens", "micro_batch", "chunk", "mu"):
        if getattr(args, name) <= 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}.")
    if args.algo == "grpo" and args.G < 2:
        raise SystemExit("--G must be at least 2 for GRPO: advantages compare completions within a group.")
    if args.temperature <= 0:
        raise SystemExit("--temperature must be > 0 for training (the loss needs a sampling distribution).")
    if args.epochs <= 0 or args.lr <= 0:
        raise SystemExit("--epochs and --lr must be positive.")
    if args.device is None and not torch.cuda.is_available():
        raise SystemExit(f"No CUDA GPU found. The default setup (a 7B model) needs one.\n{OFFLINE_HELP}")
    path, cfg = model_config(args)
    n_modules = cfg.num_hidden_layers * 7
    if args.method in ("lora", "full") and args.tie != 1:
        raise SystemExit(f"--tie shares v between modules; --method {args.method} has no v, so drop --tie.")
    if args.method == "full" and args.kl:
        raise SystemExit("--kl needs the base model as reference, which --method full overwrites; use --kl 0.")
    if args.tie > n_modules:
        raise SystemExit(
            f"--tie {args.tie} is larger than the {n_modules} adaptable modules of {args.model} "
            f"({cfg.num_hidden_layers} layers x 7); use --tie {n_modules} to share one v across all."
        )
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
    args.out = out
    return path, cfg


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "-uno"], cwd=ROOT, capture_output=True, text=True)
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if rev.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# -----------------------------------------------------------------------------
# data parallel (torchrun): choices 8 and 9. Every helper is a no-op without torchrun.


def init_dist(args):
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
    if rank:  # rank 0 alone prints; the others' errors still reach stderr
        sys.stdout = open(os.devnull, "w")
    return rank, world, local


def collective(fn, *a, what, **kw):
    """Run one torch.distributed call; a dead or hung rank becomes a clear error on the survivors, not a hang."""
    if not dist.is_initialized():
        return None
    try:
        return fn(*a, **kw)
    except RuntimeError as e:  # gloo: the peer closed the connection, or --dist-timeout passed
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise SystemExit(
            f"rank {dist.get_rank()}: {what} failed ({type(e).__name__}: {first}).\n"
            "Another rank has died or waited past --dist-timeout, so the job stops. Continue from the last "
            "checkpoint with the same torchrun command and --resume RUN_DIR."
        ) from None


def all_reduce(values, op="sum"):
    """Sum (or max) a list of floats over ranks in one collective; the values themselves without torchrun."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    collective(dist.all_reduce, t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, what=f"{op} of stats")
    return t.tolist()


def reduce_stats(s):
    """grpo_backward's sums added over ranks, its extremes (w_min, w_max, mismatch_max) taken over ranks."""
    ext = ("w_min", "w_max", "mismatch_max")
    sums = [k for k in s if k not in ext]
    out = dict(zip(sums, all_reduce([s[k] for k in sums])))
    hi = all_reduce([-s["w_min"], s["w_max"], s["mismatch_max"]], "max")  # min = -max(-x)
    return out | {"w_min": -hi[0], "w_max": hi[1], "mismatch_max": hi[2]}


def sync_grads(params):
    """Sum each gradient over ranks: the loss is normalised by global counts, so the sum is the global gradient,
    identical on every rank, and every rank then clips and steps the same way."""
    for t in params:
        if t.grad is None:  # a rank whose loss never reached t still joins the collective
            t.grad = torch.zeros_like(t)
        collective(dist.all_reduce, t.grad, what="gradient all-reduce")


def same_on_all_ranks(obj):
    """Rank 0's value of a picklable object on every rank (the run folder's time stamp)."""
    box = [obj]
    collective(dist.broadcast_object_list, box, src=0, what="broadcast")
    return box[0]


def sample_seed(seed, step, first):
    """The generator seed of a sampling call that starts at prompt `first` of `step` (choice 9): a hash, so
    neighbouring (step, first) pairs get unrelated streams."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{step}/{first}".encode()).digest()[:8], "little") >> 1


def cat_rollouts(parts, pad_id):
    """Concatenate Rollouts of several sampling calls (prompt-major rows), right-padding to the longest."""
    import sample

    if len(parts) == 1:
        return parts[0]
    T = max(r.tokens.shape[1] for r in parts)
    pad = lambda x, v: torch.cat([x, x.new_full((x.shape[0], T - x.shape[1]), v)], 1)  # noqa: E731  (n, T)
    return sample.Rollouts(
        prompts=[p for r in parts for p in r.prompts],
        tokens=torch.cat([pad(r.tokens, pad_id) for r in parts]),  # (N, T)
        mask=torch.cat([pad(r.mask, False) for r in parts]),
        logp=torch.cat([pad(r.logp, 0.0) for r in parts]),
        finish=[f for r in parts for f in r.finish],
    )


# -----------------------------------------------------------------------------
# small helpers for the loop


def step_examples(train, step, B, seed):
    """The B examples of a step: a per-epoch permutation (choice 5), so the data position is the step."""
    spe = len(train) // B
    epoch, i = divmod(step, spe)
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    return [train[j] for j in perm[i * B : (i + 1) * B].tolist()], {"epoch": epoch, "index": i * B}


def write_atomic(obj, path, save=torch.save):
    tmp = path + ".tmp"
    save(obj, tmp)
    os.replace(tmp, path)  # choice 6: a reader (or a resume) sees the old file or the new one, never half of one


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


def reference_completions(batch, tok, device):
    """SFT targets: each reference solution + the end-of-turn token, right-padded -> tokens, mask (B, T)."""
    import data

    targets = [tok.encode(data.reference_solution(ex)) + tok.stop_ids[:1] for ex in batch]
    T = max(len(t) for t in targets)
    tokens = torch.tensor([t + [tok.pad_id] * (T - len(t)) for t in targets], device=device)  # (B, T)
    mask = torch.tensor([[True] * len(t) + [False] * (T - len(t)) for t in targets], device=device)  # (B, T)
    return tokens, mask


def grade_rollouts(ro, batch, tok, G, kind):
    """Decode and grade every completion: texts, their examples, grade dicts, rewards (N,)."""
    import data

    texts = [tok.decode(row[m].tolist()) for row, m in zip(ro.tokens, ro.mask)]
    exs = [batch[i // G] for i in range(len(texts))]  # prompt-major rows
    grades = data.grade_many(exs, texts)
    rewards = torch.tensor([data.reward(ex, text, kind=kind) for ex, text in zip(exs, texts)])
    return texts, exs, grades, rewards


def grpo_metrics(s, ro, grades, rewards, G):
    """The per-step log from grpo_backward's sums and the graded rollouts."""
    groups, n = rewards.view(-1, G), max(s["tokens"], 1.0)
    m = {"loss": s["loss"], "reward": float(rewards.mean())}
    m |= {"strict": sum(g.get("strict", g["correct"]) for g in grades) / len(grades)}
    m |= {"flexible": sum(g.get("flexible", g["correct"]) for g in grades) / len(grades)}
    m |= {"zero_var": float((groups.max(1).values == groups.min(1).values).float().mean())}  # no signal there
    m |= {"length": float(ro.mask.sum(1).float().mean()), "clip": s["clipped"] / n, "kl": s["kl"] / n}
    m |= {"w_mean": s["w_sum"] / n, "w_min": s["w_min"], "w_max": s["w_max"]}
    m |= {"mismatch": s["mismatch_sum"] / n, "mismatch_max": s["mismatch_max"], "n_tokens": int(ro.mask.sum())}
    m |= {"truncated": sum(f == "length" for f in ro.finish) / len(ro.finish)}
    return m


def fmt_step(step, total, m):
    v = f" | v {m['v']}" if "v" in m else ""
    return (
        f"step {step}/{total} | reward {m['reward']:.3f} | strict {m['strict']:.3f} flex {m['flexible']:.3f} "
        f"| zero-var {m['zero_var']:.2f} | len {m['length']:.0f} | clip {m['clip']:.3f} | kl {m['kl']:.2e} "
        f"| w {m['w_mean']:.3f} [{m['w_min']:.3f}, {m['w_max']:.3f}] | mismatch {m['mismatch']:.1e} "
        f"| gnorm {m['grad_norm']:.2e}{v} | {m['t_step']:.1f}s (sample {m['t_sample']:.1f} grade "
        f"{m['t_grade']:.2f} train {m['t_train']:.1f}) | {m['tok_per_s']:.0f} tok/s"
    )


def main(argv=None):
    args = parse_args(argv)
    rank, world, local = init_dist(args)  # choice 8: (0, 1, 0) without torchrun
    print(json.dumps(vars(args), indent=1))
    path, cfg = check_args(args, stamp=same_on_all_ranks(time.strftime("%Y%m%d-%H%M%S")))  # one run folder

    # -------------------------------------------------------------------------
    # data (before the model: an unknown dataset fails in seconds)
    import data

    try:
        train = data.load_dataset(args.data, split="train")
        evalset = data.load_dataset(args.eval_data or args.data, split="test", limit=args.eval_limit or None)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"--data/--eval-data: {e}\nKnown: {DATASETS_HINT}.\n{OFFLINE_HELP}") from None
    B = args.prompts_per_step
    spe = len(train) // B
    if spe == 0:
        raise SystemExit(f"--prompts-per-step {B} is larger than the training set ({len(train)} examples).")
    total = math.floor(args.epochs * spe)
    total = min(total, args.max_steps) if args.max_steps else total
    style = {} if args.prompt_style is None else {"style": args.prompt_style}

    # -------------------------------------------------------------------------
    # model and adapter
    from tqdm import tqdm

    import eval as evaluation
    import export
    import grpo
    import sample
    import tinylora
    from model import Tokenizer, load_model

    device = args.device or "cuda"
    device = f"cuda:{local}" if world > 1 and device == "cuda" else device  # one GPU per rank
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.startswith("cuda") else "float32"))
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    model = load_model(path or args.model, dtype=dtype, device=device)
    tok = Tokenizer(path or args.model)
    adapter = tinylora.attach(
        model,
        method=args.method,
        r=args.r,
        u=args.u,
        tie=args.tie,
        order=args.order,
        variant=args.variant,
        seed=args.seed,
        alpha=args.alpha,
    )
    n = adapter.num_params()
    want = export.count_params(cfg, args.method, args.r, args.u, args.tie, tinylora.TARGETS, args.order)
    assert n == want, f"adapter has {n} trainable parameters but the flags imply {want}"
    # no weight gradients for frozen weights: only the adapter's tensors (every weight for method full) train
    frozen = [t for t in model.parameters() if not any(t is q for q in adapter.params) and args.method != "full"]
    assert not any(t.requires_grad for t in frozen), "a frozen weight requires grad"
    nbytes = n * torch.finfo(tinylora.DTYPES[args.v_dtype]).bits // 8
    bar = "=" * 72
    print(f"\n{bar}\n  model    {args.model}  ({cfg.num_hidden_layers} layers, {len(adapter.modules)} adapted modules)")
    print(f"  method   {args.method}  r={args.r} u={args.u} tie={args.tie} order={args.order}  algo={args.algo}")
    print(f"  TRAINABLE PARAMETERS: {n:,}   UPDATE SIZE: {nbytes:,} bytes in {args.v_dtype}\n{bar}\n")
    if args.grad_checkpointing:
        grpo.use_grad_checkpointing(model)
    opt = torch.optim.AdamW(adapter.params, lr=args.lr, weight_decay=args.weight_decay)
    opt.register_step_post_hook(lambda *_: adapter.masters_to_model())  # --method full in 16 bits: fp32 masters
    gen = torch.Generator(device=device).manual_seed(args.seed)  # re-seeded per sampling call (choice 9)

    # -------------------------------------------------------------------------
    # run folder: args, metrics, checkpoints
    out = args.out
    metrics_path, state_path = os.path.join(out, "metrics.jsonl"), os.path.join(out, "state.pt")
    start = 0
    if args.resume:
        st = torch.load(state_path, map_location="cpu", weights_only=False)
        with torch.no_grad():
            for t, saved in zip(adapter.params, st["params"]):
                t.copy_(saved)
        opt.load_state_dict(st["opt"])
        set_rng_state(st["rng"], gen)
        start = st["step"]
        # drop what was logged after the checkpoint: those steps run again
        kept = [line for line in open(metrics_path) if json.loads(line).get("step", 0) <= start]
        if rank == 0:  # every rank loaded the same checkpoint; one writes the run folder
            write_atomic("".join(kept), metrics_path, lambda s, f: open(f, "w").write(s))
        print(f"resumed {out} at step {start}/{total}")
    elif rank == 0:
        json.dump(vars(args), open(os.path.join(out, "args.json"), "w"), indent=1)
        head = {"event": "start", "step": 0, "args": vars(args), "git": git_revision(), "trainable": n}
        append_jsonl(metrics_path, head | {"update_bytes": nbytes, "steps": total, "world": world})
    for t in adapter.params:  # choice 8: every rank starts from rank 0's tensors (they agree already; this makes sure)
        collective(dist.broadcast, t.data, src=0, what="parameter broadcast")
    adapter.masters_to_model()  # --method full in 16 bits: the (resumed, broadcast) masters into the weights

    def save(step):
        meta = {"step": step, "model": args.model}
        adapter_path = os.path.join(out, "adapter.safetensors")
        adapter.save(adapter_path, dtype=args.v_dtype, **meta)  # the file users load (written atomically)
        state = {"step": step, "args": vars(args), "params": [t.detach().cpu() for t in adapter.params]}
        state |= {"opt": opt.state_dict(), "rng": rng_state(gen), "data": step_examples(train, step, B, args.seed)[1]}
        write_atomic(state, state_path)

    def run_eval(step):
        eval_dir = os.path.join(out, "eval")
        os.makedirs(eval_dir, exist_ok=True)
        t0 = time.time()
        path = os.path.join(eval_dir, f"step{step:06d}.jsonl")
        # choice 8: rank r evaluates examples r, r+N, ... into a local file; rank 0 gathers them in order
        shard = path if world == 1 else os.path.join(tempfile.gettempdir(), f"tinylora-eval-{os.getpid()}.jsonl")
        res = evaluation.evaluate(
            model,
            tok,
            evalset[rank::world],
            batch_size=args.eval_batch_size,
            max_new_tokens=args.eval_max_new_tokens or args.max_new_tokens,
            out_path=shard,
            reward=args.reward,
            style=args.prompt_style,
            progress=rank == 0,
        )
        if world > 1:
            rows = [json.loads(line) for line in open(shard, encoding="utf-8")]
            os.remove(shard)
            shards = [None] * world if rank == 0 else None
            collective(dist.gather_object, rows, shards, dst=0, what="evaluation gather")
            if rank:
                return
            rows = [shards[i % world][i // world] for i in range(len(evalset))]  # the dataset's order
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
            write_atomic(text, path, lambda s, f: open(f, "w", encoding="utf-8").write(s))
            res = evaluation.summarize(rows, args.reward)
        res = {k: v for k, v in res.items() if isinstance(v, (int, float, str, bool))}
        append_jsonl(metrics_path, {"event": "eval", "step": step, "t_eval": time.time() - t0} | res)
        shown = [f"{k} {res[k]:.3f} [{res[k + '_lo']:.3f}, {res[k + '_hi']:.3f}]" for k in EVAL_KEYS if k in res]
        tqdm.write(f"eval step {step} (n={res.get('n')}, {time.time() - t0:.0f}s): " + " | ".join(shown))

    if start == 0:
        run_eval(0)

    # -------------------------------------------------------------------------
    # the loop: sample -> grade -> loss -> step -> log -> eval -> checkpoint

    bar = tqdm(range(start, total), initial=start, total=total, desc="train", dynamic_ncols=True, disable=rank > 0)
    for step in bar:
        t0 = time.time()
        batch, _ = step_examples(train, step, B, args.seed)
        first = rank * (B // world)  # choice 8: this rank's contiguous share; whole groups stay on one rank
        batch = batch[first : first + B // world]
        prompts = [tok.apply_chat_template(data.build_messages(ex, **style)) for ex in batch]
        opt.zero_grad(set_to_none=True)

        if args.algo == "sft":
            # the paper's comparison: next-token loss on the reference solutions, same adapter
            tokens, mask = reference_completions(batch, tok, device)
            t1 = t2 = time.time()
            n_tokens = int(all_reduce([float(mask.sum())])[0])  # choice 8: the global count normalises the loss
            kw = dict(pad_id=tok.pad_id, micro_batch=args.micro_batch, chunk=args.chunk, n_tokens=n_tokens)
            loss = all_reduce([grpo.sft_backward(model, prompts, tokens, mask, **kw)])[0]
            m = {"loss": loss, "reward": float("nan"), "strict": float("nan"), "flexible": float("nan")}
            m |= {"zero_var": float("nan"), "length": n_tokens / B, "clip": 0.0, "kl": 0.0}
            m |= {"w_mean": 1.0, "w_min": 1.0, "w_max": 1.0, "mismatch": 0.0, "n_tokens": n_tokens}
            samples = []
        else:
            # 1) sample G completions per prompt with the current adapter, --sample-batch prompts per call, each
            #    call seeded by its first prompt's index in the step (choice 9)
            model.eval()
            K, parts = args.sample_batch or len(prompts), []
            for i in range(0, len(prompts), K):
                gen.manual_seed(sample_seed(args.seed, step, first + i))
                parts.append(
                    sample.generate(
                        model,
                        prompts[i : i + K],
                        G=args.G,
                        max_new_tokens=args.max_new_tokens,
                        temperature=args.temperature,
                        top_k=args.top_k,
                        top_p=args.top_p,
                        stop_ids=tok.stop_ids,
                        pad_id=tok.pad_id,
                        generator=gen,
                        mode=args.sample_mode,
                    )
                )
            ro = cat_rollouts(parts, tok.pad_id)
            t1 = time.time()
            # 2) grade: reward per completion, strict/flexible accuracy for the log
            texts, exs, grades, rewards = grade_rollouts(ro, batch, tok, args.G, args.reward)
            adv = grpo.group_advantages(rewards, args.G, std=not args.no_std).to(device)
            t2 = time.time()
            # 3) loss and gradient over micro-batches; counts of the whole (global) batch normalise it
            n_tokens, n_seqs = int(all_reduce([float(ro.mask.sum())])[0]), B * args.G  # choice 8: global counts
            kw = dict(
                pad_id=tok.pad_id,
                micro_batch=args.micro_batch,
                eps_low=args.eps_low,
                eps_high=args.eps_high,
                agg=args.agg,
                norm=args.max_new_tokens,
                beta=args.kl,
                tis_cap=args.tis_cap or None,
                temperature=args.temperature,
                chunk=args.chunk,
                n_tokens=n_tokens,
                n_seqs=n_seqs,
            )
            old = None
            if args.mu > 1:  # off-policy after the first update: pi_old must be computed once, before it
                old = grpo.old_logprobs(
                    model,
                    ro.prompts,
                    ro.tokens,
                    ro.mask,
                    pad_id=tok.pad_id,
                    micro_batch=args.micro_batch,
                    chunk=args.chunk,
                    temperature=args.temperature,
                )
            for k in range(args.mu):
                if k:
                    opt.zero_grad(set_to_none=True)
                s = grpo.grpo_backward(model, adapter, ro.prompts, ro.tokens, ro.mask, adv, ro.logp, old_logp=old, **kw)
                if k < args.mu - 1:
                    sync_grads(adapter.params)
                    torch.nn.utils.clip_grad_norm_(adapter.params, args.grad_clip or float("inf"))
                    opt.step()
            m = grpo_metrics(reduce_stats(s), ro, grades, rewards, args.G) | {"n_tokens": n_tokens}
            if world > 1:  # every rank has B/N prompts, so a global mean over rows or groups = the mean of ranks' means
                keys = ("reward", "strict", "flexible", "zero_var", "length", "truncated")
                m |= dict(zip(keys, (x / world for x in all_reduce([m[k] for k in keys]))))
            samples = [
                {"question": exs[i]["question"], "completion": texts[i], "reward": float(rewards[i])}
                for i in range(min(args.log_samples, len(texts)))
            ]
        # 4) the update: gradients summed over ranks (choice 8), so every rank clips and steps the same way
        sync_grads(adapter.params)
        gnorm = torch.nn.utils.clip_grad_norm_(adapter.params, args.grad_clip or float("inf"))
        opt.step()
        t3 = time.time()

        # -- log
        m |= {"grad_norm": float(gnorm), "t_sample": t1 - t0, "t_grade": t2 - t1, "t_train": t3 - t2}
        m |= {"t_step": t3 - t0, "tok_per_s": m["n_tokens"] / max(t1 - t0, 1e-9) if args.algo == "grpo" else 0.0}
        if n <= 16:
            m["v"] = [round(x, 6) for t in adapter.params for x in t.detach().flatten().tolist()]
        if rank == 0:  # choice 8: one log (rank 0's timings, the global batch's metrics)
            tqdm.write(fmt_step(step + 1, total, m))
            bar.set_postfix(reward=f"{m['reward']:.3f}")
            append_jsonl(metrics_path, {"event": "step", "step": step + 1} | m | {"samples": samples})

        # -- evaluate, checkpoint
        done = step + 1
        if args.eval_every and done % args.eval_every == 0 and done != total:
            run_eval(done)
        if done % args.save_every == 0 or done == total:
            if done == total:
                run_eval(done)
            if rank == 0:
                save(done)
            collective(dist.barrier, what="checkpoint barrier")  # no rank runs ahead of a half-written checkpoint
    bar.close()
    if start >= total:
        print(f"nothing to do: the run is already at step {start}/{total}")
    print(f"done: {out} (adapter.safetensors, metrics.jsonl; plot with `python plot.py {out}`)")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
