"""
Evaluate a model (optionally with a TinyLoRA adapter) on GSM8K or a MATH-style set: accuracy with a 95% interval.

    python eval.py --model Qwen/Qwen2.5-7B-Instruct --adapter runs/x/adapter.safetensors --dataset gsm8k
    python eval.py --model DIR --dataset math500 --data ../shared/data/math500/test.jsonl --limit 100

Prints the accuracy (GSM8K: strict and flexible) with its Wilson 95% interval and writes one JSON line per example
(prompt, response, extracted answers, gold, correct). train.py calls `evaluate` for its evaluations.

Choices, each marked *paper* or *ours*:
1. Greedy decoding (temperature 0) by default (*paper*: its evaluations are greedy).
2. The reported accuracy is the grader `--reward` names (GSM8K strict by default, the paper's exact-match reward);
   GSM8K always reports strict and flexible side by side, because they differ by up to ~15 points (*ours*).
3. Wilson score interval, not the normal approximation (*ours*): it stays inside [0, 1] and is honest for small n
   or accuracies near 0 or 1.
4. Examples are batched in order of prompt length (longest first) so a batch wastes little padding; results are
   written back in the dataset's order (*ours*).
5. All bad input (unknown dataset, missing or malformed file, bad --limit, missing adapter file) is reported before
   the model loads (*ours*).
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


def summarize(rows: list[dict], reward: str = "strict") -> dict:
    """Accuracy (and GSM8K strict/flexible) with Wilson intervals from per-example records."""
    n = len(rows)
    out = {"n": n}
    kinds = ["strict", "flexible"] if rows and all("strict" in r for r in rows) else []
    for kind in kinds:
        k = sum(r[kind] for r in rows)
        out[kind], (out[f"{kind}_lo"], out[f"{kind}_hi"]) = k / max(n, 1), wilson(k, n)
    key = reward if reward in kinds else "correct"
    k = sum(r[key] for r in rows)
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
    max_new_tokens=512,
    out_path=None,
    reward="strict",
    style=None,
    temperature=0.0,
    generate=None,
    progress=True,
) -> dict:
    """Generate one response per example (greedy by default), grade it, write records, return the summary.

    `generate` defaults to sample.generate (same signature); tests pass a fake one."""
    if reward not in data.KINDS:
        raise ValueError(f"unknown reward kind {reward!r}: expected one of {data.KINDS}")
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size ({batch_size}) and max_new_tokens ({max_new_tokens}) must be at least 1")
    if generate is None:
        from sample import generate
    examples = [ex if style is None else {**ex, "style": style} for ex in examples]  # grading follows the prompt
    texts = [tok.render(data.build_messages(ex)) for ex in examples]  # the model's own chat template
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


def report(res: dict, name: str) -> str:
    pct = lambda k: f"{100 * res[k]:.1f}% [{100 * res[k + '_lo']:.1f}, {100 * res[k + '_hi']:.1f}]"  # noqa: E731
    lines = [f"{name}: n={res['n']}"]
    if "strict" in res:
        lines.append(f"  strict   (#### N)      {pct('strict')}")
        lines.append(f"  flexible (last number) {pct('flexible')}")
    else:
        lines.append(f"  accuracy (last \\boxed{{}}, math-verify) {pct('accuracy')}")
    lines.append(f"  95% Wilson intervals; {100 * res['truncated']:.1f}% hit the token limit; "
                 f"{res['mean_tokens']:.0f} tokens per response")  # fmt: skip
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
    p = argparse.ArgumentParser(description="Greedy evaluation with strict/flexible (GSM8K) or boxed (MATH) grading.")
    p.add_argument("--model", required=True, help="local Hugging Face folder or Hub id")
    p.add_argument("--adapter", default=None, help="a tinylora adapter file (tinylora.load_adapter)")
    # data
    p.add_argument("--dataset", required=True, help=f"one of {', '.join(data.DATASETS)}, or a local file")
    p.add_argument("--data", default=None, help="local .jsonl/.json/.parquet file (or folder) for --dataset")
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=positive_int, default=None, help="the first N examples")
    p.add_argument("--prompt", default=None, choices=list(data.STYLES), help="prompt style (default: the dataset's)")
    # generation
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--max-new-tokens", type=positive_int, default=512)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the paper's evaluation)")
    p.add_argument("--reward", default="strict", choices=list(data.KINDS), help="GSM8K grader for 'accuracy'")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--out", default=None, help="per-example JSON lines (default out/eval-DATASET-MODEL.jsonl)")
    args = p.parse_args(argv)
    if args.temperature < 0:
        p.error(f"--temperature must be >= 0, got {args.temperature}")
    return args


def main(argv=None):
    args = parse_args(argv)
    # 1) everything that can be wrong with the input, before the model loads (choice 5)
    try:
        examples = data.load_dataset(args.dataset, split=args.split, limit=args.limit, path=args.data)
    except ValueError as e:
        raise SystemExit(f"eval.py: {e}") from None
    if args.adapter and not os.path.isfile(args.adapter):
        raise SystemExit(f"eval.py: adapter file {args.adapter!r} does not exist")
    tag = os.path.basename(os.path.normpath(args.model))
    out = args.out or os.path.join("out", f"eval-{examples[0]['dataset']}-{tag}.jsonl")
    # 2) model (+ adapter)
    import torch

    import model as M

    dtype = getattr(torch, args.dtype) if args.dtype else None
    net, tok = M.load_model(args.model, dtype=dtype, device=args.device), M.Tokenizer(args.model)
    if args.adapter:
        import export

        export.load_adapter(args.adapter, net)
    # 3) generate, grade, report
    t0 = time.time()
    res = evaluate(
        net,
        tok,
        examples,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        out_path=out,
        reward=args.reward,
        style=args.prompt,
        temperature=args.temperature,
    )
    print(report(res, f"{examples[0]['dataset']} ({args.model}{' + ' + args.adapter if args.adapter else ''})"))
    print(f"{time.time() - t0:.0f} s; per-example records in {out}", file=sys.stderr)
    return res


if __name__ == "__main__":
    main()
