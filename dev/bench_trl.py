"""
The whole GRPO step, ours vs the tool a user would otherwise pick (TRL's GRPOTrainer + PEFT's TinyLoRA).

    python dev/bench_trl.py                       # SmolLM2-135M-Instruct from the test cache, 3 steps each, 2 threads
    python dev/bench_trl.py --model DIR --steps 5 --threads 2

Both sides run the same job: the same model folder, the same GSM8K-style prompts, 4 prompts x G=4
completions per step, 64 new tokens at temperature 1, no KL, fp32 on the CPU, TinyLoRA r=2, u=4 on all
seven projections with one shared v. Each side runs in its own subprocess (so peak memory is its own), and
the two alternate, ours -> TRL -> ours -> TRL, so a machine that gets busier mid-run hurts both alike.
Printed per side: adapter setup seconds, seconds per step split into sampling / scoring / training,
generated tokens per second, peak resident memory, then the ratios. TRL and PEFT are benchmark-only
dependencies (`pip install trl peft`); without them the TRL half is skipped with a message.

Our side runs with micro-batches of 2 rollouts and lm_head chunks of 512 tokens (flags below): on this CPU
that is as fast as larger micro-batches and keeps the backward's stored activations small.

Choices (*ours*): the first step of each worker is a warm-up and is not counted; "scoring" is the reward
function (plus, for TRL, nothing else: its old/ref log-prob forwards land in "training", where our side
has none to do); peak memory is the worker's ru_maxrss, which includes the model weights (~540 MB fp32).
"""

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository root (this file is in dev/)
DEFAULT_MODEL = Path(os.environ.get("TINYLORA_CACHE", Path.home() / ".cache" / "tinylora")) / "SmolLM2-135M-Instruct"
SHARED_GSM8K = ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
INSTRUCTION = 'Let\'s think step by step and output the final answer after "####".'


def load_questions(n: int) -> list[dict]:
    """GSM8K training questions from the local copy if present, else simple generated word problems."""
    if SHARED_GSM8K.exists():
        rows = [json.loads(line) for line in SHARED_GSM8K.open()][:n]
        return [
            {"question": r["question"], "gold": r["answer"].split("####")[-1].strip().replace(",", "")} for r in rows
        ]
    return [{"question": f"Tom has {a} apples and buys {b} more. How many apples does he have?", "gold": str(a + b)}
            for a, b in zip(range(3, 3 + n), range(7, 7 + 3 * n, 3))]  # fmt: skip


def reward_fn(response: str, gold: str) -> float:
    """1 for the right final number, 0.1 for at least producing a number, else 0: rarely all-zero at 64 tokens."""
    nums = re.findall(r"-?\d+(?:\.\d+)?", response.replace(",", ""))
    if not nums:
        return 0.0
    return 1.0 if float(nums[-1]) == float(gold) else 0.1


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


# -----------------------------------------------------------------------------
# our side


def run_ours(args) -> dict:
    import torch

    import grpo
    import sample
    import tinylora
    from model import load_model
    from tokenizer import Tokenizer

    torch.manual_seed(args.seed)
    model, tok = load_model(args.model, dtype=torch.float32, device="cpu"), Tokenizer(args.model)
    t0 = time.perf_counter()
    n_modules = len(tinylora.TARGETS) * model.cfg.num_hidden_layers
    adapter = tinylora.attach(model, method="tinylora", r=2, u=4, tie=n_modules, seed=args.seed)
    setup = time.perf_counter() - t0
    if args.grad_checkpointing:
        grpo.use_grad_checkpointing(model)
    opt = torch.optim.AdamW(adapter.params, lr=1e-3)
    questions = load_questions(args.prompts * (args.steps + 1))
    gen = torch.Generator().manual_seed(args.seed)
    steps = []
    for step in range(args.steps + 1):
        batch = questions[step * args.prompts : (step + 1) * args.prompts]
        prompts = [
            tok.apply_chat_template([{"role": "user", "content": f"{q['question']} {INSTRUCTION}"}]) for q in batch
        ]
        t0 = time.perf_counter()
        ro = sample.generate(model, prompts, G=args.G, max_new_tokens=args.max_new_tokens, temperature=1.0,
                             stop_ids=tok.stop_ids, pad_id=tok.pad_id, generator=gen)  # fmt: skip
        t1 = time.perf_counter()
        texts = [tok.decode(ro.tokens[i][ro.mask[i]].tolist()) for i in range(len(ro.finish))]
        rewards = torch.tensor([reward_fn(t, batch[i // args.G]["gold"]) for i, t in enumerate(texts)])
        t2 = time.perf_counter()
        adv = grpo.group_advantages(rewards, args.G)
        opt.zero_grad(set_to_none=True)
        grpo.grpo_backward(model, adapter, ro.prompts, ro.tokens, ro.mask, adv, ro.logp, pad_id=tok.pad_id,
                           micro_batch=args.micro_batch, chunk=args.chunk)  # fmt: skip
        opt.step()
        t3 = time.perf_counter()
        n_tok = int(ro.mask.sum())
        steps.append(dict(sample=t1 - t0, score=t2 - t1, train=t3 - t2, total=t3 - t0, tokens=n_tok))
    return dict(setup=setup, steps=steps[1:], peak_gib=peak_rss_gib())


# -----------------------------------------------------------------------------
# TRL + PEFT side


def run_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from peft import TinyLoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    t0 = time.perf_counter()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_cfg = TinyLoraConfig(r=2, u=4, weight_tying=1.0, target_modules=targets, projection_seed=args.seed)
    model = get_peft_model(model, peft_cfg)
    setup = time.perf_counter() - t0
    questions = load_questions(args.prompts * (args.steps + 1))
    ds = Dataset.from_list(
        [
            {"prompt": [{"role": "user", "content": f"{q['question']} {INSTRUCTION}"}], "gold": q["gold"]}
            for q in questions
        ]
    )

    def reward(prompts, completions, gold, **kw):
        return [reward_fn(c[0]["content"] if isinstance(c, list) else c, g) for c, g in zip(completions, gold)]

    cfg = GRPOConfig(
        output_dir="/tmp/tinylora-bench-trl", per_device_train_batch_size=args.prompts * args.G,
        num_generations=args.G, max_completion_length=args.max_new_tokens, temperature=1.0, beta=0.0,
        learning_rate=1e-3, max_steps=args.steps + 1, use_cpu=True, report_to=[], logging_steps=1,
        save_strategy="no", shuffle_dataset=False, seed=args.seed, use_vllm=False, dataloader_num_workers=0,
    )  # fmt: skip
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=ds, processing_class=tok)
    timers = {"sample": 0.0, "score": 0.0, "tokens": 0}

    def timed(fn, key):
        def wrapper(*a, **kw):
            t = time.perf_counter()
            out = fn(*a, **kw)
            timers[key] += time.perf_counter() - t
            if key == "sample":  # (completion_ids, logprobs): count generated tokens up to EOS
                timers["tokens"] += sum(len(c) for c in out[0])
            return out

        return wrapper

    trainer._generate_single_turn = timed(trainer._generate_single_turn, "sample")
    trainer._calculate_rewards = timed(trainer._calculate_rewards, "score")
    steps = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **kw):
            timers.update(sample=0.0, score=0.0, tokens=0, t0=time.perf_counter())

        def on_step_end(self, *a, **kw):
            total = time.perf_counter() - timers["t0"]
            s, c = timers["sample"], timers["score"]
            steps.append(dict(sample=s, score=c, train=total - s - c, total=total, tokens=timers["tokens"]))

    trainer.add_callback(StepTimer())
    trainer.train()
    return dict(setup=setup, steps=steps[1:], peak_gib=peak_rss_gib())


# -----------------------------------------------------------------------------
# driver: alternate the two workers, then print the comparison


def summarize(res: dict) -> dict:
    st = res["steps"]
    mean = lambda k: sum(s[k] for s in st) / len(st)
    return dict(setup=res["setup"], sample=mean("sample"), score=mean("score"), train=mean("train"),
                total=mean("total"), tok_s=sum(s["tokens"] for s in st) / sum(s["sample"] for s in st),
                peak_gib=res["peak_gib"])  # fmt: skip


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="HF folder (default: the test suite's SmolLM2 cache)")
    p.add_argument("--steps", type=int, default=3, help="measured steps per worker run (after one warm-up)")
    p.add_argument("--rounds", type=int, default=1, help="ours/TRL alternations")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--G", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--micro-batch", type=int, default=2, help="ours: rollouts per forward/backward (memory)")
    p.add_argument("--chunk", type=int, default=512, help="ours: tokens per lm_head chunk in the loss")
    p.add_argument("--grad-checkpointing", action="store_true", help="ours: recompute blocks in backward")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:  # child process: run one side, print one JSON line
        import torch

        torch.set_num_threads(args.threads)
        sys.path.insert(0, str(ROOT))
        print("RESULT " + json.dumps(run_ours(args) if args.worker == "ours" else run_trl(args)), flush=True)
        return
    if not Path(args.model, "config.json").exists():
        raise SystemExit(f"no model at {args.model}: run the test suite once (it builds SmolLM2) or pass --model DIR")
    try:
        import peft  # noqa: F401
        import trl  # noqa: F401

        sides = ["ours", "trl"]
    except ImportError:
        print("TRL/PEFT not installed (pip install trl peft): measuring our side only")
        sides = ["ours"]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
    runs = {s: [] for s in sides}
    for _ in range(args.rounds):
        for side in sides:
            cmd = [sys.executable, __file__, "--worker", side] + sys.argv[1:]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True)
            line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                raise SystemExit(f"{side} worker failed:\n{out.stderr[-3000:]}")
            runs[side].append(summarize(json.loads(line[7:])))
            print(f"{side:4s} " + " ".join(f"{k}={v:.3g}" for k, v in runs[side][-1].items()), flush=True)
    best = {
        s: {k: min(r[k] for r in rs) if k != "tok_s" else max(r[k] for r in rs) for k in rs[0]}
        for s, rs in runs.items()
    }
    print(f"\n{'':22s}" + "".join(f"{s:>12s}" for s in sides) + ("       ratio" if len(sides) == 2 else ""))
    rows = [("adapter setup (s)", "setup"), ("sampling (s/step)", "sample"), ("scoring (s/step)", "score"),
            ("training (s/step)", "train"), ("GRPO step (s)", "total"), ("generated tok/s", "tok_s"),
            ("peak RSS (GiB)", "peak_gib")]  # fmt: skip
    for label, k in rows:
        vals = [best[s][k] for s in sides]
        ratio = ""
        if len(sides) == 2 and vals[0] > 0:
            ratio = f"{vals[0] / vals[1]:11.2f}x" if k == "tok_s" else f"{vals[1] / vals[0]:11.2f}x"
        print(f"{label:22s}" + "".join(f"{v:12.3f}" for v in vals) + ratio)
    print("(ratio = how many times better ours is; best of the rounds for each side; CPU, fp32)")


if __name__ == "__main__":
    main()
