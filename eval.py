"""
Evaluate a model (optionally with a TinyLoRA adapter) on GSM8K, a MATH-style set, or the paper's seven MATH
benchmarks in one run: accuracy with a 95% interval.

    python eval.py --model Qwen/Qwen2.5-7B-Instruct --adapter runs/x/adapter.safetensors --dataset gsm8k
    python eval.py --model DIR --dataset math500 --data ../shared/data/math500/test.jsonl --limit 100
    python eval.py --model DIR --suite math --data ../shared/data                # one table, seven benchmarks
    python eval.py --model DIR --suite math --sampling official                  # the paper's harness settings

Prints the accuracy (GSM8K: strict, flexible and official) with its Wilson 95% interval and writes one JSON line per
example (prompt, response, extracted answers, gold, correct). train.py calls `evaluate` for its evaluations.

Choices, each marked *paper*, *official* or *ours*:
1. Greedy decoding (temperature 0) by default (*paper*: its evaluations are greedy). `--sampling official` uses the
   settings of the paper's evaluation sweep instead (*official*: eval_sweep.py): temperature 1.0, top-p 0.95, one
   sample per problem, up to 16,000 new tokens, seed 0. --temperature / --top-p / --max-new-tokens override either.
2. The reported accuracy is the grader `--reward` names (GSM8K strict by default); GSM8K always reports strict,
   flexible and official side by side, because they differ by up to ~15 points (*ours*).
3. Wilson score interval, not the normal approximation (*ours*): it stays inside [0, 1] and is honest for small n
   or accuracies near 0 or 1. The suite's weighted average pools the problems (its interval is over all of them);
   the unweighted average is the mean of the seven accuracies (the paper's "average" column), with no interval.
4. Examples are batched in order of prompt length (longest first) so a batch wastes little padding; results are
   written back in the dataset's order (*ours*).
5. All bad input (unknown dataset or suite, missing or malformed file, bad --limit, missing adapter) is reported
   before the model loads (*ours*); --adapter user/repo downloads the repo's adapter.safetensors first.
6. --max-new-tokens defaults to training's response length for the task (*official*: 4,096 for GSM8K, 3,072 for
   MATH; data.response_tokens), so an evaluation does not cut answers the model was trained to give.
7. The prompt style is stamped into the examples by the loader (data.load_dataset(style=)), so prompt and grader
   agree; --system-prompt replaces the system turn and --enable-thinking / --no-enable-thinking reach the chat
   template as the variable enable_thinking (Qwen3); unset, the template's own defaults hold (*ours*).
"""

import argparse
import json
import math
import os
import sys
import time

import data


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for k successes out of n (choice 3)."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, center - half), min(1.0, center + half))


SAMPLING = {  # choice 1; max_new_tokens None = training's response length (choice 6)
    "greedy": dict(temperature=0.0, top_p=1.0, max_new_tokens=None),
    "official": dict(temperature=1.0, top_p=0.95, max_new_tokens=16000),  # official: eval_sweep.py, n_sampling 1
}


def graded_kinds(rows: list[dict]) -> list[str]:
    """The GSM8K grades every record carries (GSM8K rows carry every kind; other benchmarks none)."""
    return [k for k in data.KINDS if rows and all(k in r for r in rows)]


def accuracy_key(rows: list[dict], reward: str) -> str:
    """The record field behind "accuracy": the --reward kind where the records carry it, else their `correct`."""
    return reward if reward in graded_kinds(rows) else "correct"


def summarize(rows: list[dict], reward: str = "strict") -> dict:
    """Accuracy (and GSM8K strict/flexible/official) with Wilson intervals from per-example records."""
    n = len(rows)
    out = {"n": n}
    for kind in graded_kinds(rows):
        k = sum(r[kind] for r in rows)
        out[kind], (out[f"{kind}_lo"], out[f"{kind}_hi"]) = k / max(n, 1), wilson(k, n)
    key = accuracy_key(rows, reward)
    k = sum(r[key] for r in rows)
    out["correct"] = k  # the count behind "accuracy", for pooling benchmarks (choice 3)
    out["accuracy"], (out["accuracy_lo"], out["accuracy_hi"]) = k / max(n, 1), wilson(k, n)
    out["truncated"] = sum(r["finish"] == "length" for r in rows) / max(n, 1)  # hit --max-new-tokens
    out["mean_tokens"] = sum(r["n_tokens"] for r in rows) / max(n, 1)
    return out


def evaluate(
    model,
    tok,
    examples,
    *,
    batch_size=64,
    max_new_tokens=None,
    out_path=None,
    reward="strict",
    style=None,
    system=None,
    template_vars=None,
    temperature=0.0,
    top_p=1.0,
    seed=None,
    generate=None,
    progress=True,
) -> dict:
    """Generate one response per example (greedy by default), grade it, write records, return the summary.

    max_new_tokens None = training's response length (choice 6). `style` restyles already-loaded examples (prefer
    data.load_dataset(style=)); `system` and `template_vars` reach the chat template (choice 7); `seed` seeds the
    sampler when temperature > 0. `generate` defaults to sample.generate (same signature); tests pass a fake one."""
    if reward not in data.KINDS:
        raise ValueError(f"unknown reward kind {reward!r}: expected one of {data.KINDS}")
    examples = data.with_style(list(examples), style)  # grading follows the prompt
    max_new_tokens = max_new_tokens or data.response_tokens(examples)
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size ({batch_size}) and max_new_tokens ({max_new_tokens}) must be at least 1")
    if generate is None:
        from sample import generate
    extra = {} if top_p == 1.0 else {"top_p": top_p}
    if seed is not None and temperature > 0 and model is not None:
        import torch

        device = next(model.parameters()).device
        extra["generator"] = torch.Generator(device=device).manual_seed(seed)  # one stream for the whole run
    template_vars = template_vars or {}
    texts = [tok.render(data.build_messages(ex, system=system), **template_vars) for ex in examples]
    prompts = [tok.encode(t) for t in texts]  # = tok.apply_chat_template(messages), rendered once
    order = sorted(range(len(examples)), key=lambda i: -len(prompts[i]))  # choice 4
    responses, finish, n_tokens = [None] * len(examples), [None] * len(examples), [0] * len(examples)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(examples), desc="eval", dynamic_ncols=True, leave=False)
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        ro = generate(
            model,
            [prompts[i] for i in idx],
            G=1,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            stop_ids=tok.stop_ids,
            pad_id=tok.pad_id,
            **extra,
        )
        for row, i in enumerate(idx):
            ids = ro.tokens[row][ro.mask[row]].tolist()
            responses[i], finish[i], n_tokens[i] = tok.decode(ids), ro.finish[row], len(ids)
        if bar is not None:
            bar.update(len(idx))
    if bar is not None:
        bar.close()
    grades = data.grade_many(examples, responses)
    rows = [
        {
            "id": ex["id"],
            "dataset": ex["dataset"],
            "gold": ex["gold"],
            **g,
            "finish": finish[i],
            "n_tokens": n_tokens[i],
            "prompt": texts[i],
            "response": responses[i],
        }
        for i, (ex, g) in enumerate(zip(examples, grades))
    ]
    if out_path:
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        with open(out_path, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return summarize(rows, reward)


def evaluate_suite(model, tok, suite: dict, *, out_dir=None, **kw) -> dict:
    """evaluate() on each benchmark of a suite ({name: examples}, e.g. data.load_suite("math")), records in
    out_dir/NAME.jsonl; returns {name: summary} plus "weighted" and "unweighted" averages (choice 3)."""
    res = {}
    for name, examples in suite.items():
        out_path = os.path.join(out_dir, f"{name}.jsonl") if out_dir else None
        res[name] = evaluate(model, tok, examples, out_path=out_path, **kw)
    return res | averages(res)


def averages(res: dict) -> dict:
    """The suite's two averages: pooled over problems (weighted by n) and the mean over benchmarks (choice 3)."""
    runs = list(res.values())
    n, k = sum(r["n"] for r in runs), sum(r["correct"] for r in runs)
    lo, hi = wilson(k, n)
    weighted = dict(n=n, correct=k, accuracy=k / max(n, 1), accuracy_lo=lo, accuracy_hi=hi)
    weighted |= {key: sum(r[key] * r["n"] for r in runs) / max(n, 1) for key in ("truncated", "mean_tokens")}
    mean = lambda key: sum(r[key] for r in runs) / max(len(runs), 1)  # noqa: E731
    unweighted = dict(n=len(runs), accuracy=mean("accuracy"), truncated=mean("truncated"))
    unweighted["mean_tokens"] = mean("mean_tokens")
    return {"weighted": weighted, "unweighted": unweighted}


def report(res: dict, name: str) -> str:
    pct = lambda k: f"{100 * res[k]:.1f}% [{100 * res[k + '_lo']:.1f}, {100 * res[k + '_hi']:.1f}]"  # noqa: E731
    lines = [f"{name}: n={res['n']}"]
    if "strict" in res:
        lines.append(f"  strict   (#### N)                 {pct('strict')}")
        lines.append(f"  flexible (last number)            {pct('flexible')}")
        lines.append(f"  official (verl: last 300 chars)   {pct('official')}")
    else:
        lines.append(f"  accuracy (last \\boxed{{}}, math-verify) {pct('accuracy')}")
    lines.append(f"  95% Wilson intervals; {100 * res['truncated']:.1f}% hit the token limit; "
                 f"{res['mean_tokens']:.0f} tokens per response")  # fmt: skip
    return "\n".join(lines)


def suite_table(res: dict, title: str = "") -> str:
    """One table: a row per benchmark (n, accuracy with its Wilson interval, truncated %, mean tokens), then the
    weighted and unweighted averages (choice 3)."""
    head = f"{'benchmark':<16} {'n':>7}  {'accuracy [95% Wilson]':<24} {'truncated':>9} {'mean tokens':>11}"
    lines = ([title] if title else []) + [head, "-" * len(head)]
    for name, r in res.items():
        if name == "unweighted":
            acc, n = f"{100 * r['accuracy']:.1f}%", f"{r['n']} sets"
        else:
            acc = f"{100 * r['accuracy']:.1f}% [{100 * r['accuracy_lo']:.1f}, {100 * r['accuracy_hi']:.1f}]"
            n = str(r["n"])
        if name == "weighted":
            lines.append("-" * len(head))
        label = {"weighted": "weighted avg", "unweighted": "unweighted avg"}.get(name, name)
        lines.append(f"{label:<16} {n:>7}  {acc:<24} {100 * r['truncated']:>8.1f}% {r['mean_tokens']:>11.0f}")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# python eval.py --model M [--adapter FILE] --dataset NAME [--data PATH] [--limit N] ...


def positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Evaluate with strict/flexible/official (GSM8K) or boxed (MATH) grading.")
    p.add_argument("--model", required=True, help="local Hugging Face folder or Hub id")
    p.add_argument("--revision", default=None, help="Hub branch, tag or commit of --model")
    p.add_argument("--adapter", default=None, help="a tinylora adapter file, run folder, or Hub repo (user/repo)")
    # data
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--dataset", default=None, help=f"one of {', '.join(data.DATASETS)}, or a local file")
    what.add_argument("--suite", default=None, choices=list(data.SUITES),
                      help="math: the paper's seven MATH benchmarks in one run and one table")  # fmt: skip
    p.add_argument("--data", default=None,
                   help="local .jsonl/.json/.parquet file (or folder) for --dataset; for --suite a folder holding "
                        "one subfolder per benchmark (like ../shared/data)")  # fmt: skip
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=positive_int, default=None, help="the first N examples (of each benchmark)")
    p.add_argument("--prompt", "--prompt-style", dest="prompt", default=None, choices=list(data.STYLES),
                   help="prompt style, which grading follows (default: the dataset's)")  # fmt: skip
    p.add_argument("--system-prompt", default=None, help="the system turn (default: the style's or the template's)")
    p.add_argument("--enable-thinking", action=argparse.BooleanOptionalAction, default=None,
                   help="Qwen3's chat-template switch (default: the template's own)")  # fmt: skip
    # generation
    p.add_argument("--sampling", default="greedy", choices=list(SAMPLING),
                   help="greedy (the paper's evaluation) or official (its harness: T 1.0, top-p 0.95, n 1, "
                        "16,000 tokens)")  # fmt: skip
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--max-new-tokens", type=positive_int, default=None,
                   help="default: training's response length (4,096 GSM8K, 3,072 MATH); 16,000 with "
                        "--sampling official")  # fmt: skip
    p.add_argument("--temperature", type=float, default=None, help="overrides --sampling (0 = greedy)")
    p.add_argument("--top-p", type=float, default=None, help="overrides --sampling")
    p.add_argument("--seed", type=int, default=0, help="sampler seed when the temperature is above 0")
    p.add_argument("--reward", default="strict", choices=list(data.KINDS), help="GSM8K grader for 'accuracy'")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--out", default=None, help="records: a .jsonl file, or a folder for --suite")
    args = p.parse_args(argv)
    preset = SAMPLING[args.sampling]
    args.temperature = preset["temperature"] if args.temperature is None else args.temperature
    args.top_p = preset["top_p"] if args.top_p is None else args.top_p
    args.max_new_tokens = args.max_new_tokens or preset["max_new_tokens"]  # None: the task's (choice 6)
    if args.temperature < 0:
        p.error(f"--temperature must be >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        p.error(f"--top-p must be in (0, 1], got {args.top_p}")
    return args


def main(argv=None):
    args = parse_args(argv)
    # 1) everything that can be wrong with the input, before the model loads (choice 5)
    try:
        if args.suite:
            suite = data.load_suite(args.suite, path=args.data, limit=args.limit, style=args.prompt)
        else:
            examples = data.load_dataset(
                args.dataset, split=args.split, limit=args.limit, path=args.data, style=args.prompt
            )
    except ValueError as e:
        raise SystemExit(f"eval.py: {e}") from None
    import export  # an adapter file, run folder or Hub repo (downloaded now, before the model loads)

    try:
        adapter = export.find_adapter(args.adapter) if args.adapter else None
    except ValueError as e:
        raise SystemExit(f"eval.py: {e}") from None
    tag = os.path.basename(os.path.normpath(args.model))
    # 2) model (+ adapter)
    import torch

    import model as M
    import tokenizer as T

    dtype = getattr(torch, args.dtype) if args.dtype else None
    net = M.load_model(args.model, dtype=dtype, device=args.device, revision=args.revision)
    tok = T.Tokenizer(args.model, revision=net.source["sha"])  # the commit the weights came from (None: a folder)
    if adapter:
        export.load_adapter(adapter, net)
    # 3) generate, grade, report
    t0 = time.time()
    template_vars = {} if args.enable_thinking is None else {"enable_thinking": args.enable_thinking}
    kw = dict(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, reward=args.reward,
              system=args.system_prompt, template_vars=template_vars, temperature=args.temperature,
              top_p=args.top_p, seed=args.seed)  # fmt: skip
    who = f"{args.model}{' + ' + args.adapter if args.adapter else ''}"
    if args.suite:
        out = args.out or os.path.join("out", f"eval-{args.suite}-{tag}")
        res = evaluate_suite(net, tok, suite, out_dir=out, **kw)
        print(suite_table(res, f"{args.suite} suite ({who}, {args.sampling} sampling)"))
    else:
        out = args.out or os.path.join("out", f"eval-{examples[0]['dataset']}-{tag}.jsonl")
        res = evaluate(net, tok, examples, out_path=out, **kw)
        print(report(res, f"{examples[0]['dataset']} ({who})"))
    print(f"{time.time() - t0:.0f} s; per-example records in {out}", file=sys.stderr)
    return res


if __name__ == "__main__":
    main()
