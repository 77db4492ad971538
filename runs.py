"""
A run's setup and its folder: the checks train.py makes before anything slow (bad values, offline, the evaluation
set, the memory plan), the per-step log line, and the run folder (settings, log, checkpoints, what --resume reads
back). Nothing here trains.

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
import hashlib
import json
import math
import os
import random
import subprocess
import time

import torch

import data
import export
import hub
import parallel
import report
import tinylora

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


def recipe_table(recipes: dict) -> str:
    """train.py --help's epilog: the effective defaults of each recipe, one column each."""
    rows = ["recipes (--recipe NAME; a flag given explicitly wins):", " " * 25 + "".join(f"{n:<28}" for n in recipes)]
    first = next(iter(recipes.values()))
    rows += [f"  --{k.replace('_', '-'):<21}" + "".join(f"{str(r[k]):<28}" for r in recipes.values()) for k in first]
    rows += [
        "  (None: the data's own; both: --max-new-tokens the task's, 4096 / 3072; evaluation on the task's test set)"
    ]
    return "\n".join(row.rstrip() for row in rows)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows "(default: X)" unless the help text already says what the default is, or there is none."""

    def _get_help_string(self, action):
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


# -----------------------------------------------------------------------------
# data order and sampling seeds: pure functions of the step, so a resume needs only the step


def step_examples(train, step, B, seed):
    """The B examples of a step: a per-epoch permutation (train.py choice 11), so the data position is the step."""
    spe = len(train) // B
    epoch, i = divmod(step, spe)
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    return [train[j] for j in perm[i * B : (i + 1) * B].tolist()], {"epoch": epoch, "index": i * B}


def sample_seed(seed, step, first):
    """The generator seed of a sampling call that starts at prompt `first` of `step` (train.py choice 13): a hash, so
    neighbouring (step, first) pairs get unrelated streams."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{step}/{first}".encode()).digest()[:8], "little") >> 1


# -----------------------------------------------------------------------------
# checks before anything slow: bad values, no GPU, offline, the evaluation set, memory; and the step's log line

DATASETS_HINT = "gsm8k, math_train (the Hub), or a local .jsonl/.parquet with question/answer fields"


OFFLINE_HELP = (
    "To run without the Hub, download elsewhere and point at local copies:\n"
    "  hf download Qwen/Qwen2.5-7B-Instruct --local-dir DIR   ->  --model DIR\n"
    "  a GSM8K .jsonl (question/answer fields)                 ->  --data train.jsonl --eval-data test.jsonl\n"
    "On a machine without a GPU add --device cpu and a small model, e.g. SmolLM2-135M-Instruct, with small\n"
    "settings: --prompts-per-step 4 --max-new-tokens 128 --eval-limit 50."
)


def model_config(args):
    """(local folder or None, Config, Hub commit or None) for --model without loading weights; fails fast offline.
    A resumed run reads the commit it recorded."""
    from model import load_config

    if os.path.isdir(args.model):
        return args.model, load_config(args.model), None
    if not hub.is_hub_id(args.model):
        raise SystemExit(f"--model {args.model}: no such folder (and not a Hub id like Qwen/Qwen2.5-7B-Instruct).")
    revision = (getattr(args, "sources", None) or {}).get("model", {}).get("sha") or args.revision
    try:  # config.json alone; the local cache when offline, never a wait on the network
        cfg, sha = hub.read_hub_config(args.model, revision)
    except hub.HubError as e:
        raise SystemExit(f"--model {args.model}: {e}\n{OFFLINE_HELP}") from None
    return None, cfg, sha


POSITIVE = ("r", "u", "tie", "G", "prompts_per_step", "max_new_tokens", "chunk", "mu", "mini_batches")


def check_args(args, stamp=None, world=1):
    if args.tie is None:  # the paper's 13 parameters on Qwen2.5-7B for TinyLoRA; no sharing for the baselines
        args.tie = 16 if args.method == "tinylora" else 1
    for name in POSITIVE:  # max_new_tokens None: the task's, once the data is known
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}.")
    mbt = 1 if args.micro_batch_tokens == "auto" else args.micro_batch_tokens
    if args.micro_batch < 0 or mbt < 0 or not (args.micro_batch or mbt):
        raise SystemExit("--micro-batch (rows) and --micro-batch-tokens (padded tokens) must be >= 0, one of them > 0.")
    share = args.prompts_per_step // world  # a rank's prompts (parallel.init checked that N divides them)
    if share % args.mini_batches:
        raise SystemExit(
            f"--mini-batches {args.mini_batches} must divide the {share} prompts of a step"
            + (f" on each of {world} ranks" if world > 1 else "")
            + ": a mini-batch holds whole groups."
        )
    if args.algo == "grpo" and args.G < 2:
        raise SystemExit("--G must be at least 2 for GRPO: advantages compare completions within a group.")
    if args.temperature <= 0:
        raise SystemExit("--temperature must be > 0 for training (the loss needs a sampling distribution).")
    if args.epochs <= 0 or args.lr <= 0 or not 0 <= args.warmup < 1 or args.entropy_coef < 0:
        raise SystemExit("--epochs and --lr must be positive, --warmup in [0, 1), --entropy-coef >= 0.")
    kinds = [k.strip().lower() for k in (args.report_to or "").split(",") if k.strip()]
    if any(k not in (*report.KINDS, "none") for k in kinds):
        raise SystemExit(f"--report-to {args.report_to}: use wandb, tensorboard or both (wandb,tensorboard).")
    if args.device is None and not torch.cuda.is_available():
        raise SystemExit(f"No CUDA GPU found. The default setup (a 7B model) needs one.\n{OFFLINE_HELP}")
    path, cfg, sha = model_config(args)
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
    args.out = prepare_out(args, stamp)
    return path, cfg, sha


def eval_source(args) -> tuple[str, str]:
    """(dataset or file, split) to evaluate on (train.py choice 12): --eval-data, a named set's test set (math_train ->
    math500), a folder's test file, or the test file beside a local training file. Never the training file itself."""
    if args.eval_data:
        return args.eval_data, "test"
    if args.data in data.DATASETS or os.path.isdir(args.data):
        return data.default_eval_set(args.data)
    folder = os.path.dirname(os.path.abspath(args.data))
    for ext in (".jsonl", ".json", ".parquet"):
        sibling = os.path.join(folder, "test" + ext)
        if os.path.isfile(sibling) and not os.path.samefile(sibling, args.data):
            return sibling, "test"
    raise SystemExit(
        f"--data {args.data}: there is no test.jsonl/.json/.parquet beside it, so the run would evaluate on its own "
        "training file. Add --eval-data FILE (a held-out set), or --no-eval."
    )


def load_data(args, tok):
    """(training set, evaluation set or None, steps of --epochs), or a SystemExit that says what to pass instead."""
    try:
        train = data.load_dataset(args.data, split="train", style=args.prompt_style)
        evalset = None
        if not args.no_eval:
            name, split = eval_source(args)
            evalset = data.load_dataset(name, split=split, limit=args.eval_limit or None, style=args.prompt_style)
    except (ValueError, FileNotFoundError, hub.HubError) as e:
        raise SystemExit(f"--data/--eval-data: {e}\nKnown: {DATASETS_HINT}.\n{OFFLINE_HELP}") from None
    args.max_new_tokens = args.max_new_tokens or data.response_tokens(train)  # the task's (train.py choice 9)
    lens = [len(prompt_ids(args, tok, ex)) for ex in train]
    if args.max_prompt_tokens:  # train.py choice 9: dropped, never cut; the evaluation set stays whole
        n, N = len(train), args.max_prompt_tokens
        train, lens = [ex for ex, k in zip(train, lens) if k <= N], [k for k in lens if k <= N]
        print(f"--max-prompt-tokens {N}: dropped {n - len(train):,} of {n:,} training prompts longer than that")
    B = args.prompts_per_step
    if len(train) < B:
        why = " after --max-prompt-tokens" if args.max_prompt_tokens else ""
        raise SystemExit(f"--prompts-per-step {B} is larger than the training set ({len(train)} examples{why}).")
    path = data.load.hub_file(args.data, "train") if args.data in data.DATASETS else args.data
    args.sources = {"data": hub.source_record(args.data, None, path)}  # the model's is added once it is loaded
    return train, evalset, math.floor(args.epochs * (len(train) // B)), max(lens)


def plan_memory(args, cfg, longest: int, world: int):
    """train.py choice 15: memory.py's plan from the shapes, printed before any weight loads; the `auto` settings
    are taken from it, and a run that cannot fit stops with the setting to change."""
    import memory

    args.grad_checkpointing = {"on": True, "off": False}.get(args.grad_checkpointing, args.grad_checkpointing)
    plan, advice = memory.plan_for_run(cfg, args, max_prompt_tokens=longest, world=world)
    print(memory.format_plan(plan, memory.free_memory(args.device or "cuda")))
    if advice:
        raise SystemExit(f"memory: {advice}")
    if args.micro_batch_tokens == "auto":
        args.micro_batch_tokens = plan.settings["micro_batch_tokens"]
    if args.grad_checkpointing == "auto":
        args.grad_checkpointing = plan.settings["grad_checkpointing"]


def template_vars(args) -> dict:
    return {} if args.enable_thinking is None else {"enable_thinking": args.enable_thinking}


def prompt_ids(args, tok, ex) -> list[int]:
    """An example's prompt tokens: its stamped style, --system-prompt, the model's chat template."""
    return tok.apply_chat_template(data.build_messages(ex, system=args.system_prompt), **template_vars(args))


def grpo_metrics(s, ro, grades, rewards, G):
    """The per-step log from grpo_backward's sums and the graded rollouts."""
    groups, n = rewards.view(-1, G), max(s["tokens"], 1.0)
    m = {"loss": s["loss"], "reward": float(rewards.mean())}
    for kind in data.KINDS:  # train.py choice 10: every GSM8K grader, whichever is the reward (MATH: the boxed grade)
        m[kind] = sum(g.get(kind, g["correct"]) for g in grades) / len(grades)
    m |= {"zero_var": float((groups.max(1).values == groups.min(1).values).float().mean())}  # no signal there
    m |= {"length": float(ro.mask.sum(1).float().mean()), "clip": s["clipped"] / n, "kl": s["kl"] / n}
    m |= {"entropy": s["entropy"] / n} if "entropy" in s else {}
    m |= {"w_mean": s["w_sum"] / n, "w_min": s["w_min"], "w_max": s["w_max"]}
    m |= {"mismatch": s["mismatch_sum"] / n, "mismatch_max": s["mismatch_max"]}
    m |= {"truncated": sum(f == "length" for f in ro.finish) / len(ro.finish)}
    return m


def fmt_step(step, total, m):
    v = f" | v {m['v']}" if "v" in m else ""
    return (
        f"step {step}/{total} | lr {m['lr']:.1e} | reward {m['reward']:.3f} | strict {m['strict']:.3f} flex "
        f"{m['flexible']:.3f} official {m['official']:.3f} | zero-var {m['zero_var']:.2f} | len {m['length']:.0f} "
        f"| clip {m['clip']:.3f} | kl {m['kl']:.2e} | w {m['w_mean']:.3f} [{m['w_min']:.3f}, {m['w_max']:.3f}] "
        f"| mismatch {m['mismatch']:.1e} | gnorm {m['grad_norm']:.2e}{v} | {m['t_step']:.1f}s (sample "
        f"{m['t_sample']:.1f} grade {m['t_grade']:.2f} train {m['t_train']:.1f}) | {m['tok_per_s']:.0f} tok/s"
    )


def merge_stats(stats):
    """grpo_backward's stats of several mini-batches -> one dict: sums added, extremes kept, loss averaged."""
    out = {k: sum(s[k] for s in stats) for k in stats[0]}
    out["loss"] /= len(stats)
    out |= {"w_min": min(s["w_min"] for s in stats), "w_max": max(s["w_max"] for s in stats)}
    return out | {"mismatch_max": max(s["mismatch_max"] for s in stats)}


def reduce_stats(s):
    """grpo_backward's sums added over ranks, its extremes (w_min, w_max, mismatch_max) taken over ranks."""
    ext = ("w_min", "w_max", "mismatch_max")
    sums = [k for k in s if k not in ext]
    out = dict(zip(sums, parallel.all_sum([s[k] for k in sums])))
    hi = parallel.all_max([-s["w_min"], s["w_max"], s["mismatch_max"]])  # min = -max(-x)
    return out | {"w_min": -hi[0], "w_max": hi[1], "mismatch_max": hi[2]}


def show_adapter(args, cfg, model, adapter):
    """Assert the trainable count the flags imply (and that nothing else trains); print it large. -> (n, bytes)."""
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
    return n, nbytes
