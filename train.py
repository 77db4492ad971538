"""
Train a TinyLoRA adapter with GRPO (or SFT, the paper's comparison): the one script that wires the library.

    python train.py --u 1 --tie 196                 # Qwen2.5-7B-Instruct on GSM8K: exactly 1 trainable parameter
    python train.py --recipe math --u 1 --tie 16    # MATH as the paper ran it (SimpleRL's setup)
    python train.py --device cpu --model DIR --data train.jsonl --eval-data test.jsonl --max-new-tokens 128 ...

Each step: the next --prompts-per-step questions -> G completions each (sample.py) -> grades (data/) -> GRPO
loss and gradient (grpo.py) -> AdamW step(s) on v -> log -> evaluate -> checkpoint (runs.py).

Choices: *paper* ("Learning to Reason in 13 Parameters"), *official* (jxmorris12/verl-lora; sources in
docs/FIDELITY.md), *ours*. Values read "GSM8K | MATH" where the two recipes differ.
1. --recipe gsm8k (default) | math fills every RECIPES flag left unset (`--help` prints it); where the paper is
   silent the official script's value (*ours*: the rule).
2. G 4 | 8, 64 | 256 prompts, 3 epochs, temperature 1, KL 0 | 0.001, MATH: SimpleRL levels 3-5, MATH500 (*paper*).
3. lr 1e-5 | 5e-7 (*official*: its GSM8K scripts, math_1gpu_example__no_ray.sh; the paper swept 1e-7..2e-4).
4. Warm-up lr·b/W for batches b < W = int(--warmup 0.05 | 0 × all batches), then constant (*official*).
5. AdamW (0.9, 0.999), weight decay 0.01, gradient-norm clip 1.0 (*official*).
6. --mini-batches 2 | 1 of whole groups (prompts k, k+K, ...), each used --mu 1 times (*official*).
7. With more than one update a step, pi_old is the pre-update policy for all of them (*paper*: the sampling policy).
8. Clip 0.2 / 0.4 | 0.2; TIS cap 2; entropy bonus 0 | 0.001 (grpo.py choice 8) (*official*).
9. Prompts over --max-prompt-tokens 512 | 1024 dropped; completions to 4,096 | 3,072; MATH: qwen-boxed (*official*).
10. GSM8K reward `official`, the scorer of the paper's 76% -> 91% (*official*); strict and flexible logged too.
11. Data order: a permutation per epoch from --seed, last partial batch dropped, position = f(step) (*ours*).
12. Greedy evaluation (*paper*) on --eval-data or the task's test set, with v rounded to --v-dtype (*ours*).
13. torchrun (*ours*, parallel.py): 1/N of the prompts a rank, counts and gradients summed; seeds per sampling call.
14. A run ends by writing RUN/peft/, the same update as a standard PEFT LoRA (*ours*).
15. Memory planned from shapes before the weights load (memory.py); `auto` settings take its choice (*ours*).
"""

import argparse
import functools
import json
import os
import random
import time

import torch
from tqdm import tqdm

import data
import eval as evaluation
import export
import grpo
import parallel
import report
import runs
import sample
import tinylora

EVAL_KEYS = ("strict", "flexible", "official", "accuracy")  # what eval.evaluate reports (with _lo/_hi 95% bounds)
# -----------------------------------------------------------------------------
# args: one flat block, grouped; names follow the paper's symbols. Flags whose default is None take the recipe's.

RECIPES = {  # choice 1; the marks are in the header (choices 2-10)
    "gsm8k": dict(model="Qwen/Qwen2.5-7B-Instruct", data="gsm8k", prompt_style=None, G=4, prompts_per_step=64,
                  lr=1e-5, warmup=0.05, mini_batches=2, eps_high=0.4, kl=0.0, entropy_coef=0.0,
                  max_prompt_tokens=512, reward="official", sample_batch=0),
    "math": dict(model="Qwen/Qwen2.5-Math-7B", data="math_train", prompt_style="qwen-boxed", G=8,
                 prompts_per_step=256, lr=5e-7, warmup=0.0, mini_batches=1, eps_high=0.2, kl=0.001,
                 entropy_coef=0.001, max_prompt_tokens=1024, reward="official", sample_batch=32),
}  # fmt: skip
p = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0], formatter_class=runs.HelpFormatter, epilog=runs.recipe_table(RECIPES)
)
p.add_argument("--recipe", default="gsm8k", choices=list(RECIPES), help="the paper's setup for a task (choice 1)")
# model and data
p.add_argument("--model", default=None, help="local HF folder or Hub id (recipe)")
p.add_argument("--revision", default=None, help="Hub branch, tag or commit of --model (its commit is recorded)")
p.add_argument("--data", default=None, help="training set: a name known to data/ or a local .jsonl/.parquet (recipe)")
p.add_argument("--eval-data", default=None, help="evaluation set (default: the task test set, or test.* beside --data)")
p.add_argument("--prompt-style", default=None, choices=list(data.STYLES), help="default: the recipe's, else the data's")
p.add_argument("--system-prompt", default=None, help="the system turn (default: the style's or the chat template's)")
p.add_argument("--enable-thinking", action=argparse.BooleanOptionalAction, default=None,
               help="Qwen3's chat-template switch, in training and evaluation (default: the template's)")  # fmt: skip
p.add_argument("--device", default=None, help="cuda | cpu (default: cuda; on a machine without one, say --device cpu)")
p.add_argument(
    "--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="default: bf16 on GPU, fp32 on CPU"
)
# adapter: W' = W + U S (sum_i v_i P_i) V^T
p.add_argument("--method", default="tinylora", choices=tinylora.METHODS, help="adapter (tinylora.py)")
p.add_argument("--r", type=int, default=2, help="rank of the frozen SVD (and of LoRA)")
p.add_argument("--u", type=int, default=1, help="length of each trainable vector v")
p.add_argument("--tie", type=int, default=None, help="modules sharing one v (default: 16 for tinylora, else 1)")
p.add_argument("--order", default="tiled", choices=tinylora.ORDERS, help="which modules share a v")
p.add_argument("--variant", default="verl", choices=tinylora.VARIANTS, help="verl: the official update (tinylora.py)")
p.add_argument("--v-dtype", default="fp32", choices=list(tinylora.DTYPES), help="v's storage (file and evaluation)")
p.add_argument("--alpha", type=float, default=None, help="alpha of the alpha/r scale (default 32: verl, lora)")
# algorithm
p.add_argument("--algo", default="grpo", choices=["grpo", "sft"], help="sft: next-token loss on reference solutions")
p.add_argument("--G", type=int, default=None, help="completions per prompt, the group size (recipe)")
p.add_argument("--prompts-per-step", type=int, default=None, help="prompts per step, one batch of rollouts (recipe)")
p.add_argument("--epochs", type=float, default=3, help="passes over the training set")
p.add_argument("--max-prompt-tokens", type=int, default=None, help="drop longer training prompts (0: keep all; recipe)")
p.add_argument("--max-new-tokens", type=int, default=None, help="completion length cap (default: the task's)")
p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (the loss uses it too)")
p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (1: off)")
p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0: off)")
p.add_argument("--reward", default=None, choices=data.KINDS, help="GSM8K grader; MATH always grades the box (recipe)")
p.add_argument("--kl", type=float, default=None, help="beta, weight of the k3 KL to the base, adapter off (recipe)")
p.add_argument("--entropy-coef", type=float, default=None, help="entropy bonus weight (grpo.py choice 8; recipe)")
p.add_argument("--eps-low", type=float, default=0.2, help="clip ratio below 1 - eps_low")
p.add_argument("--eps-high", type=float, default=None, help="clip ratio above 1 + eps_high (recipe)")
p.add_argument("--agg", default="token-mean", choices=grpo.AGGS, help="loss aggregation")
p.add_argument("--no-std", action="store_true", help="Dr. GRPO: do not divide advantages by the group std")
p.add_argument("--tis-cap", type=float, default=2.0, help="truncated importance sampling cap (0: off)")
p.add_argument("--mini-batches", type=int, default=None, help="updates a step, each on 1/K of its groups (recipe)")
p.add_argument("--mu", type=int, default=1, help="updates on each mini-batch (choice 6)")
# optimisation
p.add_argument("--lr", type=float, default=None, help="AdamW learning rate (choice 3; recipe)")
p.add_argument("--warmup", type=float, default=None, help="linear warm-up from 0, share of the batches (recipe)")
p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: off)")
p.add_argument("--micro-batch", type=int, default=16, help="max rollouts per forward/backward (memory, not math)")
p.add_argument(
    "--micro-batch-tokens", type=lambda s: s if s == "auto" else int(s), default="auto", help="max padded tokens per "
    "forward/backward, rows sorted by length (0: off; auto: the most that fit, choice 15; --micro-batch caps rows)"
)  # fmt: skip
p.add_argument("--chunk", type=int, default=4096, help="tokens per lm_head chunk in the loss")
p.add_argument("--grad-checkpointing", nargs="?", const="on", default="auto", choices=["on", "off", "auto"],
               help="recompute blocks in backward to save memory (auto: only to fit; choice 15)")  # fmt: skip
p.add_argument("--sample-mode", default="auto", choices=sample.MODES, help="see sample.py")
# run
p.add_argument("--seed", type=int, default=0, help="adapter P, data order and sampling seeds")
p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: --epochs)")
p.add_argument("--eval-every", type=int, default=50, help="steps between evaluations (0: only before and after)")
p.add_argument("--no-eval", action="store_true", help="no evaluation at all: not before, during or after training")
p.add_argument("--eval-limit", type=int, default=0, help="evaluate on the first N test examples (0: all)")
p.add_argument("--eval-batch-size", type=int, default=64, help="prompts per evaluation sampling call")
p.add_argument("--eval-max-new-tokens", type=int, default=0, help="0: --max-new-tokens")
p.add_argument("--save-every", type=int, default=10, help="steps between checkpoints")
p.add_argument("--log-samples", type=int, default=2, help="completions per step written to metrics.jsonl")
p.add_argument("--report-to", default=None, help="wandb, tensorboard or both (report.py): views of metrics.jsonl")
p.add_argument("--out", default=None, help="run folder (default: runs/<method>-u<u>-tie<tie>-<time>)")
p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue this run with its saved settings")
# data parallel (torchrun --nproc-per-node N train.py ...; choice 13)
p.add_argument(
    "--sample-batch", type=int, default=None, help="prompts per sampling call (0: a rank's whole share; recipe: 32 "
    "for MATH, whose 2,048 rows of KV cache would not fit one H200); the run is the same on N ranks when "
    "prompts-per-step / N is a multiple of it (choice 13)"
)  # fmt: skip
p.add_argument("--dist-timeout", type=float, default=600, help="seconds a rank waits for the others before failing")


def with_recipe(args):
    """The recipe's value for every flag left unset (choice 1)."""
    for k, v in RECIPES[args.recipe].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    return args


def parse_args(argv=None):
    args = p.parse_args(argv)
    if args.resume is None:
        return with_recipe(args)
    # resuming: the run's args.json (a flag it predates takes its recipe's default; runs.py choice 2)
    given = {k: v for k, v in vars(args).items() if v != p.get_default(k)}
    return runs.resumed_args(args, saved_defaults, given)


def saved_defaults(saved: dict) -> dict:
    """Every flag's default for a saved run: its recipe's; a run made before recipes existed had a constant lr."""
    old = {} if "recipe" in saved else {"warmup": 0.0}
    return vars(with_recipe(p.parse_args(["--recipe", saved.get("recipe", "gsm8k")]))) | old


def lr_at(step: int, lr: float, warmup: int) -> float:
    """The learning rate of batch `step` (choice 4): lr * step / warmup for the first `warmup` batches, then lr."""
    return lr * step / warmup if step < warmup else lr


# -----------------------------------------------------------------------------
# small helpers: data order, seeds, rollouts


def cat_rollouts(parts, pad_id):
    """Concatenate Rollouts of several sampling calls (prompt-major rows), right-padding to the longest."""
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


def reference_completions(batch, tok, device):
    """SFT targets: each reference solution + the end-of-turn token, right-padded -> tokens, mask (B, T)."""
    targets = [tok.encode(data.reference_solution(ex)) + tok.stop_ids[:1] for ex in batch]
    T = max(len(t) for t in targets)
    tokens = torch.tensor([t + [tok.pad_id] * (T - len(t)) for t in targets], device=device)  # (B, T)
    mask = torch.tensor([[True] * len(t) + [False] * (T - len(t)) for t in targets], device=device)  # (B, T)
    return tokens, mask


# -----------------------------------------------------------------------------
# one training step: rollouts -> the list of updates it makes (choices 6, 7); main applies them


def mini_batch_rows(n_prompts, G, K):
    """The rows (prompt-major, G per prompt) of K mini-batches of whole groups: mini-batch k holds prompts k, k+K,
    k+2K, ... A rank's share starts at a multiple of K, so this is the same split of the step on any number of ranks."""
    assert n_prompts % K == 0, (n_prompts, K)
    return [[j * G + g for j in range(k, n_prompts, K) for g in range(G)] for k in range(K)]


def grpo_updates(args, model, adapter, ro, adv, pad_id):
    """The updates of one GRPO step, in order: --mini-batches K slices of whole groups, each --mu times (choice 6).
    Returns (updates, stats): zero-argument functions that each put one update's gradient into .grad, and a list
    that holds, per mini-batch, grpo_backward's sums from its latest update (what the step logs)."""
    K = args.mini_batches
    rows = mini_batch_rows(len(ro.prompts) // args.G, args.G, K)
    n_tokens = [int(x) for x in parallel.all_sum([float(ro.mask[idx].sum()) for idx in rows])]  # global counts
    n_seqs = args.prompts_per_step * args.G // K  # rows of one mini-batch over all ranks (choice 13)
    kw = dict(pad_id=pad_id, micro_batch=args.micro_batch, micro_batch_tokens=args.micro_batch_tokens)
    kw |= dict(chunk=args.chunk, temperature=args.temperature)
    old = None  # on-policy: grpo.py takes pi_old = the current policy, detached, without a second forward
    if K * args.mu > 1:  # choice 7: pi_old of every update is the policy before the first, computed now
        old = grpo.old_logprobs(model, ro.prompts, ro.tokens, ro.mask, **kw)
    kw |= dict(eps_low=args.eps_low, eps_high=args.eps_high, agg=args.agg, norm=args.max_new_tokens, beta=args.kl)
    kw |= dict(tis_cap=args.tis_cap or None, n_seqs=n_seqs, entropy_coef=args.entropy_coef)
    stats = [None] * K

    def update(k):
        idx = rows[k]
        stats[k] = grpo.grpo_backward(
            model, adapter, [ro.prompts[i] for i in idx], ro.tokens[idx], ro.mask[idx], adv[idx], ro.logp[idx],
            old_logp=None if old is None else old[idx], n_tokens=n_tokens[k], **kw,
        )  # fmt: skip

    return [functools.partial(update, k) for k in range(K) for _ in range(args.mu)], stats


def grpo_step(args, model, adapter, tok, gen, batch, prompts, step, first):
    """A GRPO step up to its updates: sample G completions per prompt, grade each once, group advantages.
    Returns (updates, log): the updates for main to apply, and log() -> the step's metrics once they ran."""
    t0 = time.time()
    # 1) sample with the current adapter, --sample-batch prompts per call, each call seeded by its position (13)
    model.eval()
    K, parts = args.sample_batch or len(prompts), []
    for i in range(0, len(prompts), K):
        gen.manual_seed(runs.sample_seed(args.seed, step, first + i))
        parts.append(
            sample.generate(
                model, prompts[i : i + K], G=args.G, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                top_k=args.top_k, top_p=args.top_p, stop_ids=tok.stop_ids, pad_id=tok.pad_id, generator=gen,
                mode=args.sample_mode,
            )
        )  # fmt: skip
    ro = cat_rollouts(parts, tok.pad_id)
    t1 = time.time()
    # 2) grade each completion once: the reward and the logged strict / flexible / official come from one grade
    texts = [tok.decode(row[m].tolist()) for row, m in zip(ro.tokens, ro.mask)]
    exs = [batch[i // args.G] for i in range(len(texts))]  # prompt-major rows
    grades = data.grade_many(exs, texts)
    rewards = torch.tensor([float(g.get(args.reward, g["correct"])) for g in grades])  # as data.reward: MATH: correct
    adv = grpo.group_advantages(rewards, args.G, std=not args.no_std).to(ro.tokens.device)
    t2 = time.time()
    # 3) the updates (choices 6, 7); main applies them
    updates, stats = grpo_updates(args, model, adapter, ro, adv, tok.pad_id)

    def log():
        m = runs.grpo_metrics(runs.reduce_stats(runs.merge_stats(stats)), ro, grades, rewards, args.G)
        m["n_tokens"] = int(parallel.all_sum([float(ro.mask.sum())])[0])  # the global batch's
        keys = ("reward", "strict", "flexible", "official", "zero_var", "length", "truncated")  # equal shares, so
        m |= dict(zip(keys, parallel.all_mean([m[k] for k in keys])))  # the global mean is the mean of means
        m["samples"] = [
            {"question": exs[i]["question"], "completion": texts[i], "reward": float(rewards[i])}
            for i in range(min(args.log_samples, len(texts)))
        ]
        return m | {"t_sample": t1 - t0, "t_grade": t2 - t1, "tok_per_s": m["n_tokens"] / max(t1 - t0, 1e-9)}

    return updates, log


def sft_step(args, model, tok, batch, prompts):
    """The paper's SFT comparison as a step: next-token loss on the reference solutions, same adapter, the same
    mini-batch schedule as GRPO (one group = one prompt)."""
    t0 = time.time()
    tokens, mask = reference_completions(batch, tok, model.lm_head.weight.device)
    t1 = time.time()
    rows = mini_batch_rows(len(batch), 1, args.mini_batches)
    n_tokens = [int(x) for x in parallel.all_sum([float(mask[idx].sum()) for idx in rows])]  # global counts
    losses = [0.0] * len(rows)
    kw = dict(pad_id=tok.pad_id, micro_batch=args.micro_batch, micro_batch_tokens=args.micro_batch_tokens)
    kw["chunk"] = args.chunk

    def update(k):
        idx = rows[k]
        losses[k] = grpo.sft_backward(
            model, [prompts[i] for i in idx], tokens[idx], mask[idx], n_tokens=n_tokens[k], **kw
        )

    def log():
        loss, nan = parallel.all_sum([sum(losses) / len(losses)])[0], float("nan")
        m = {"loss": loss, "reward": nan, "strict": nan, "flexible": nan, "official": nan, "zero_var": nan}
        m |= {"length": sum(n_tokens) / args.prompts_per_step, "clip": 0.0, "kl": 0.0}
        m |= {"w_mean": 1.0, "w_min": 1.0, "w_max": 1.0, "mismatch": 0.0, "n_tokens": sum(n_tokens)}
        return m | {"samples": [], "t_sample": t1 - t0, "t_grade": 0.0, "tok_per_s": 0.0}

    return [functools.partial(update, k) for k in range(len(rows)) for _ in range(args.mu)], log


# -----------------------------------------------------------------------------
# evaluation (choice 12) and the adapter's count


def evaluate(args, model, adapter, tok, evalset, step, rank, rep):
    """Greedy evaluation with v as stored, sharded over ranks (choices 12, 13); rank 0 writes
    eval/stepNNNNNN.jsonl and logs the summary."""
    if args.no_eval:
        return
    t0 = time.time()
    path = os.path.join(args.out, "eval", f"step{step:06d}.jsonl")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    part = f"{path}.part{os.getpid()}"  # this rank's share, gathered below in the dataset's order
    with export.stored_precision(adapter, args.v_dtype):
        evaluation.evaluate(
            model, tok, parallel.shard(evalset), batch_size=args.eval_batch_size, out_path=part, reward=args.reward,
            max_new_tokens=args.eval_max_new_tokens or args.max_new_tokens, system=args.system_prompt,
            template_vars=runs.template_vars(args), progress=rank == 0,
        )  # fmt: skip
    rows = [json.loads(line) for line in open(part, encoding="utf-8")]
    os.remove(part)
    rows = parallel.gather(rows, len(evalset))  # None on ranks other than 0
    if rows is None:
        return
    res = {k: v for k, v in evaluation.summarize(rows, args.reward).items() if isinstance(v, (int, float, str, bool))}
    runs.record_eval(args.out, step, rows, res | {"t_eval": time.time() - t0})
    rep.log(step, res, prefix="eval/")
    shown = [f"{k} {res[k]:.3f} [{res[k + '_lo']:.3f}, {res[k + '_hi']:.3f}]" for k in EVAL_KEYS if k in res]
    tqdm.write(f"eval step {step} (n={res.get('n')}, {time.time() - t0:.0f}s): " + " | ".join(shown))


# -----------------------------------------------------------------------------


def main(argv=None):
    # ---- args (and checks before anything slow)
    args = parse_args(argv)
    rank, world, local = parallel.init(args)  # choice 13: (0, 1, 0) without torchrun
    path, cfg, sha = runs.check_args(
        args, stamp=parallel.same_on_all_ranks(time.strftime("%Y%m%d-%H%M%S")), world=world
    )
    from model import load_model
    from tokenizer import Tokenizer

    # ---- data (before the model: an unknown dataset fails in seconds)
    tok = Tokenizer(path or args.model, revision=sha)  # the commit config.json came from
    train, evalset, epoch_steps, longest = runs.load_data(args, tok)
    runs.plan_memory(args, cfg, longest, world)  # choice 15: before any weight loads
    B, total = args.prompts_per_step, min(epoch_steps, args.max_steps or epoch_steps)
    warmup = int(args.warmup * epoch_steps)  # choice 4: of the --epochs schedule, whatever --max-steps says
    print(f"run {args.out}: {args.algo} on {args.data} ({args.recipe} recipe), {len(train):,} prompts, {total} steps "
          f"of {B} x G {args.G}, lr {args.lr:g}; every setting in {os.path.join(args.out, 'args.json')}")  # fmt: skip

    # ---- model
    device = args.device or "cuda"
    device = f"cuda:{local}" if world > 1 and device == "cuda" else device  # one GPU per rank
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.startswith("cuda") else "float32"))
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    model = load_model(path or args.model, dtype=dtype, device=device, revision=sha)
    args.sources["model"] = {"id": args.model, "revision": args.revision, "sha": sha}  # args.json, adapter file
    if args.grad_checkpointing:
        grpo.use_grad_checkpointing(model)

    # ---- adapter, optimizer, run folder
    adapter = tinylora.attach(
        model, method=args.method, r=args.r, u=args.u, tie=args.tie, order=args.order, variant=args.variant,
        seed=args.seed, alpha=args.alpha,
    )  # fmt: skip
    n, nbytes = runs.show_adapter(args, cfg, model, adapter)
    opt = torch.optim.AdamW(adapter.params, lr=args.lr, weight_decay=args.weight_decay)
    opt.register_step_post_hook(lambda *_: adapter.masters_to_model())  # --method full in 16 bits: fp32 masters
    gen = torch.Generator(device=device).manual_seed(args.seed)  # re-seeded per sampling call (choice 13)
    if args.resume:
        start = runs.load_checkpoint(args, adapter, opt, gen, rank)
        print(f"resumed {args.out} at step {start}/{total}")
    else:
        start = runs.new_run(args, rank, n, nbytes, total, world)
    rep = report.open_reporter(args.report_to if rank == 0 else None, args.out, vars(args), os.path.basename(args.out),
                               start_step=start)  # fmt: skip
    parallel.broadcast(adapter.params)  # every rank starts from rank 0's tensors (they agree already; to be sure)
    adapter.masters_to_model()  # --method full in 16 bits: the (resumed, broadcast) masters into the weights
    if start == 0:
        evaluate(args, model, adapter, tok, evalset, 0, rank, rep)

    def checkpoint(step):
        runs.checkpoint(args, step, adapter, opt, gen, rank, runs.step_examples(train, step, B, args.seed)[1])

    # ---- the loop: batch -> rollouts and their updates -> optimiser steps -> log -> evaluate -> checkpoint
    bar = tqdm(range(start, total), initial=start, total=total, desc="train", dynamic_ncols=True, disable=rank > 0)
    for step in bar:
        t0 = time.time()
        first = rank * (B // world)  # choice 13: this rank's contiguous share; whole groups stay on one rank
        batch = runs.step_examples(train, step, B, args.seed)[0][first : first + B // world]
        prompts = [runs.prompt_ids(args, tok, ex) for ex in batch]
        if args.algo == "grpo":  # sample -> grade -> advantages
            updates, log = grpo_step(args, model, adapter, tok, gen, batch, prompts, step, first)
        else:
            updates, log = sft_step(args, model, tok, batch, prompts)
        for g in opt.param_groups:  # choice 4: one learning rate per batch, for all of its updates
            g["lr"] = lr_at(step, args.lr, warmup)
        for backward in updates:  # choice 6: every optimiser step of every setting is these five lines
            opt.zero_grad(set_to_none=True)
            backward()  # this update's gradient into .grad, in micro-batches (grpo.py)
            parallel.sync_grads(adapter.params)  # choice 13: summed over ranks, so every rank steps the same way
            gnorm = torch.nn.utils.clip_grad_norm_(adapter.params, args.grad_clip or float("inf"))
            opt.step()
        # log (rank 0's timings, the global batch's metrics, the gradient norm of the step's last update)
        m = log() | {"grad_norm": float(gnorm), "lr": opt.param_groups[0]["lr"], "t_step": time.time() - t0}
        m["t_train"] = m["t_step"] - m["t_sample"] - m["t_grade"]
        if n <= 16:
            m["v"] = [round(x, 6) for t in adapter.params for x in t.detach().flatten().tolist()]
        if rank == 0:
            tqdm.write(runs.fmt_step(step + 1, total, m))
            bar.set_postfix(reward=f"{m['reward']:.3f}")
            runs.append_jsonl(os.path.join(args.out, "metrics.jsonl"), {"event": "step", "step": step + 1} | m)
            rep.log(step + 1, m)
        # evaluate, checkpoint (the last step's come after the loop)
        done = step + 1
        if args.eval_every and done % args.eval_every == 0 and done != total:
            evaluate(args, model, adapter, tok, evalset, done, rank, rep)
        if done % args.save_every == 0 and done != total:
            checkpoint(done)
    bar.close()

    # ---- final eval, checkpoint and the PEFT copy (choice 14)
    if start < total:
        evaluate(args, model, adapter, tok, evalset, total, rank, rep)
        checkpoint(total)
        if rank == 0 and args.method != "full":
            with export.stored_precision(adapter, args.v_dtype):  # the update as the adapter file stores it
                export.export_peft_lora(adapter, os.path.join(args.out, "peft"), base=args.model)
    else:
        print(f"nothing to do: the run is already at step {start}/{total}")
    rep.close()
    print(f"done: {args.out} (adapter.safetensors, peft/, metrics.jsonl; plot with `python plot.py {args.out}`)")
    parallel.close()


if __name__ == "__main__":
    main()
