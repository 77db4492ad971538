"""
The paper's Figures 1 and 2 in miniature: held-out accuracy against update size, GRPO against SFT, one command.

    python dev/sweep.py --grid smollm2-add --out runs/sweep-add --dry-run   # the plan: every command, nothing run
    python dev/sweep.py --grid smollm2-add --out runs/sweep-add --jobs 2    # run (killable, rerun to resume)
    python dev/sweep.py --make-data DIR                                     # only write the additions data

A grid is (method, size) x algorithm x learning rate x seed on top of fixed base flags; every point is one
`python train.py ...` run in SWEEP_DIR/runs/<name>. Then SWEEP_DIR/results.jsonl (one row per run),
results.md (the same as a table) and figure.png (accuracy vs bytes, the RL line and the SFT line).

Choices (*paper*: "Learning to Reason in 13 Parameters"; *ours*: made here):
1. A point's name comes from (algo, method, size, lr, seed) only (*ours*): a longer --max-steps in the grid resumes
   its runs (train.py lets --max-steps change on --resume) instead of starting new ones.
2. A run is finished when metrics.jsonl has an eval line at the grid's last step; one with a state.pt is resumed
   with `train.py --resume`; a folder with neither (killed before its first checkpoint) is started again (*ours*).
3. Every setting is passed on the command line, so train.py's defaults do not enter the figure; the flags that not
   every train.py has (OPTIONAL) are dropped, with a note, when `train.py --help` does not list them (*ours*).
4. Each size is drawn at its best lr, picked by the mean final accuracy over seeds (*paper*: best lr per size);
   the point is that mean and its error bar the min..max over seeds, the spread, not an interval (*ours*).
5. CPU time of a run: user + system time of its train.py process from os.wait4, summed over invocations in the
   run folder's cpu.jsonl (*ours*; getrusage(RUSAGE_CHILDREN) would mix runs that overlap under --jobs).
6. Train reward is reported as the mean of the first k steps -> the mean of the last k, k = steps // 3 (*ours*).
   Beside accuracy, each run reports what can confound it: `####` format (strict), answer length, the share cut
   at the token limit, and the share whose numbers include the sum anywhere (graded right or not), before and
   after (*ours*).
7. A finished full fine-tuning run drops its state.pt (the weights and Adam's moments: GBs per run) unless
   --keep-state; its adapter.safetensors stays. Extending it to more steps then starts it again (*ours*).
8. Base vs final on the same questions is a paired comparison: the questions that flipped wrong -> right (b) and
   right -> wrong (c), and McNemar's exact two-sided p-value, P(|X - n/2| >= |b - n/2|) for X ~ Bin(b + c, 1/2)
   (*ours*; it sees a change that two overlapping Wilson intervals hide, and says when a change is noise).
"""

import argparse
import functools
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import eval as evaluation  # noqa: E402  (which grade a run's accuracy is, for choice 8's flips)
from data import graders  # noqa: E402  (the numbers the flexible grader reads, for choice 6's "seen")

TRAIN = os.path.join(ROOT, "train.py")
# choice 3: left out if this train.py lacks them
OPTIONAL = {"mini-batches", "mu", "kl", "max-prompt-tokens", "warmup", "entropy-coef"}
EVAL_FIELDS = ("accuracy", "strict", "flexible", "official")  # each with _lo/_hi (Wilson 95%) in the eval lines

# -----------------------------------------------------------------------------
# grids: base flags (train.py's names without "--"), sizes, algorithms, an lr list per method, seeds

# fmt: off
ADD_FLAGS = {  # every setting the figure depends on, so that train.py's defaults do not (choice 3)
    "device": "cpu", "dtype": "float32", "prompt-style": "gsm8k", "reward": "flexible",
    "G": 4, "prompts-per-step": 4, "epochs": 3, "max-steps": 24, "max-new-tokens": 32, "temperature": 0.7,
    "top-p": 1.0, "top-k": 0, "r": 2, "order": "tiled", "variant": "paper", "v-dtype": "fp32",
    "eps-low": 0.2, "eps-high": 0.2, "agg": "token-mean", "tis-cap": 2.0, "weight-decay": 0.0, "grad-clip": 1.0,
    "micro-batch": 16, "eval-every": 0, "eval-limit": 0, "eval-max-new-tokens": 32, "eval-batch-size": 96,
    "save-every": 4, "mini-batches": 1, "mu": 1, "kl": 0.0, "max-prompt-tokens": 0, "warmup": 0.0,
    "entropy-coef": 0.0,
}
# fmt: on
SMOLLM2_ADD = {
    "model": "~/.cache/tinylora/SmolLM2-135M-Instruct",
    "data": None,  # None: SWEEP_DIR/data, the additions of docs/RESULTS.md, written there if absent
    "flags": ADD_FLAGS,
    "sizes": [  # trainable parameters on SmolLM2-135M (30 layers x 7 = 210 modules), from export.count_params
        {"method": "tinylora", "u": 1, "tie": 210},  # 1
        {"method": "tinylora", "u": 1, "tie": 16},  # 14, the paper's headline setting
        {"method": "tinylora", "u": 1, "tie": 1},  # 210
        {"method": "loraxs", "r": 2, "tie": 1},  # 840
        {"method": "lora", "r": 1},  # 305,280
        {"method": "lora", "r": 4},  # 1,221,120
        {"method": "full"},  # 134,515,008
    ],
    "algos": ["grpo", "sft"],
    "lrs": {"tinylora": [3e-3, 1e-2], "loraxs": [3e-3, 1e-2], "lora": [1e-4, 1e-3], "full": [3e-6, 1e-5]},
    "seeds": [0, 1],
}
TINY = {  # the shape of a grid at the smallest cost: a smoke test of the tool on the real model
    **SMOLLM2_ADD,
    "flags": {**SMOLLM2_ADD["flags"], "max-steps": 1, "eval-limit": 4, "max-new-tokens": 8, "eval-max-new-tokens": 8},
    "sizes": [{"method": "tinylora", "u": 1, "tie": 16}],
    "lrs": {"tinylora": [1e-2]},
    "seeds": [0],
}
GRIDS = {"smollm2-add": SMOLLM2_ADD, "tiny": TINY}


def make_data(folder: str) -> str:
    """The additions of docs/RESULTS.md: 324 questions a + b (a, b in 1..9, four phrasings), shuffled with seed 0,
    the first 96 held out (test.jsonl), 228 to train on; GSM8K format, so SFT has the reference `s\\n#### s`."""
    forms = ["What is {a} + {b}?", "What is {a} plus {b}?", "Add {a} and {b}.", "Compute {a} + {b}."]
    qs = [(f.format(a=a, b=b), a + b) for a in range(1, 10) for b in range(1, 10) for f in forms]
    random.Random(0).shuffle(qs)
    os.makedirs(folder, exist_ok=True)
    for split, rows in (("test", qs[:96]), ("train", qs[96:])):
        with open(os.path.join(folder, f"{split}.jsonl"), "w") as f:
            for q, s in rows:
                f.write(json.dumps({"question": q, "answer": f"{s}\n#### {s}"}) + "\n")
    return folder


# -----------------------------------------------------------------------------
# points -> names, folders, commands


def points(grid: dict) -> list[dict]:
    """Every (size, algo, lr, seed) of the grid, in the order they run (the grid's sizes in order)."""
    for key in ("flags", "sizes", "algos", "lrs", "seeds"):
        if key not in grid:
            raise ValueError(f"the grid has no {key!r}; see SMOLLM2_ADD in dev/sweep.py for the shape of one")
    if "max-steps" not in grid["flags"]:
        raise ValueError("the grid's flags need 'max-steps': a run is finished at its eval on that step")
    out = []
    for size in grid["sizes"]:
        if size["method"] not in grid["lrs"]:
            raise ValueError(f"the grid has no lr list for method {size['method']!r} (its 'lrs' entry)")
        for algo in grid["algos"]:
            for lr in grid["lrs"][size["method"]]:
                for seed in grid["seeds"]:
                    out.append({"size": size, "algo": algo, "lr": lr, "seed": seed})
    return out


def size_name(size: dict) -> str:
    return "-".join([size["method"]] + [f"{k}{v}" for k, v in size.items() if k != "method"])  # tinylora-u1-tie16


def run_name(pt: dict) -> str:
    return f"{pt['algo']}-{size_name(pt['size'])}-lr{pt['lr']:g}-s{pt['seed']}"


@functools.cache
def known_flags() -> frozenset:
    """The flags this train.py accepts, from its --help (choice 3); asked once a process."""
    r = subprocess.run([sys.executable, TRAIN, "--help"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    if r.returncode != 0:
        raise SystemExit(f"`python train.py --help` failed:\n{r.stderr[-2000:]}")
    return frozenset(re.findall(r"--([a-zA-Z][\w-]*)", r.stdout))


def train_command(grid: dict, pt: dict, run_dir: str, data: str, known: set) -> list[str]:
    model = os.path.expanduser(grid["model"])
    model = os.path.abspath(model) if os.path.exists(model) else model  # a local folder, else a Hub id
    flags = {"model": model, "data": data, "eval-data": data} | grid["flags"]
    flags |= {k: v for k, v in pt["size"].items()}  # method, u, tie, r: a size's own r overrides the base r
    flags |= {"algo": pt["algo"], "lr": pt["lr"], "seed": pt["seed"], "out": run_dir}
    missing = sorted(k for k in flags if k not in known and k not in OPTIONAL)
    if missing:
        raise SystemExit(f"train.py has no --{', --'.join(missing)}; fix the grid's flags in dev/sweep.py.")
    cmd = [sys.executable, TRAIN]
    for k, v in flags.items():
        if k in known:
            cmd += [f"--{k}", f"{v:g}" if isinstance(v, float) else str(v)]
    return cmd


def resume_command(grid: dict, run_dir: str) -> list[str]:
    return [sys.executable, TRAIN, "--resume", run_dir, "--max-steps", str(grid["flags"]["max-steps"])]


def read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    return [json.loads(line) for line in open(path) if line.strip()]


def state(run_dir: str, steps: int) -> str:
    """'done' | 'resume' | 'new' (choice 2)."""
    evals = [r for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if r.get("event") == "eval"]
    if any(r["step"] == steps for r in evals):
        return "done"
    return "resume" if os.path.exists(os.path.join(run_dir, "state.pt")) else "new"


def launch(cmd: list[str], run_dir: str) -> int:
    """One train.py process, its output appended to train.log, its CPU time to cpu.jsonl (choice 5). -> exit code"""
    os.makedirs(run_dir, exist_ok=True)
    env = {"OMP_NUM_THREADS": "1", **os.environ}  # one thread a run unless the caller says otherwise
    t0 = time.time()
    with open(os.path.join(run_dir, "train.log"), "a") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        _, status, ru = os.wait4(proc.pid, 0)  # this child's rusage alone, whatever else runs at the same time
        proc.returncode = rc = os.waitstatus_to_exitcode(status)
    rec = {"resumed": "--resume" in cmd, "rc": rc, "cpu_s": ru.ru_utime + ru.ru_stime, "wall_s": time.time() - t0}
    with open(os.path.join(run_dir, "cpu.jsonl"), "a") as f:
        f.write(json.dumps(rec) + "\n")
    return rc


# -----------------------------------------------------------------------------
# results: one row per run, pure functions for the figure's aggregation


def first_last(xs: list, k: int):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not xs:
        return None, None
    k = max(1, min(k, len(xs)))
    return sum(xs[:k]) / k, sum(xs[-k:]) / k


def eval_fields(r: dict | None, prefix: str) -> dict:
    out = {}
    for f in EVAL_FIELDS:
        if r is not None and f in r:
            out |= {f"{prefix}_{f}": r[f], f"{prefix}_{f}_lo": r[f"{f}_lo"], f"{prefix}_{f}_hi": r[f"{f}_hi"]}
    return out | {f"{prefix}_n": None if r is None else r.get("n")}


def mcnemar_p(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value for b flips one way and c the other (choice 8); 1.0 when nothing flipped."""
    n, k = b + c, min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


PAIRED = ("flip_b", "flip_c", "flip_p", "base_seen", "final_seen")  # what flips() adds to a run's row


def flips(run_dir: str, steps: int, reward: str | None = None) -> dict:
    """Per-question base -> final from the run's eval files (choice 8), graded as its accuracy is
    (eval.accuracy_key): wrong -> right (b), right -> wrong (c), McNemar's p; and choice 6's "seen" shares."""
    rows = [read_jsonl(os.path.join(run_dir, "eval", f"step{s:06d}.jsonl")) for s in (0, steps)]
    if not rows[0] or not rows[1]:
        return dict.fromkeys(PAIRED)
    key = evaluation.accuracy_key(rows[0] + rows[1], reward)
    before = {r["id"]: r[key] for r in rows[0]}
    if set(before) != {r["id"] for r in rows[1]}:
        raise ValueError(f"{run_dir}: the evaluations at step 0 and {steps} are not on the same questions")
    b = sum(r[key] and not before[r["id"]] for r in rows[1])
    c = sum(before[r["id"]] and not r[key] for r in rows[1])
    seen = [sum(gold_seen(r) for r in rs) / len(rs) for rs in rows]  # choice 6: the sum written anywhere
    return {"flip_b": b, "flip_c": c, "flip_p": mcnemar_p(b, c), "base_seen": seen[0], "final_seen": seen[1]}


def gold_seen(r: dict) -> bool:
    """The gold number is among the answer's numbers, wherever it stands: graded right or not (choice 6)."""
    gold = graders.to_number(r.get("gold"))
    return gold is not None and any(graders.to_number(m) == gold for m in graders.FLEXIBLE_RE.findall(r["response"]))


def result_row(pt: dict, run_dir: str, steps: int) -> dict:
    """One run as a flat record: its point, size (from its own log), base and final evals, reward, CPU time."""
    recs = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    start = next((r for r in recs if r.get("event") == "start"), {})
    evals = {r["step"]: r for r in recs if r.get("event") == "eval"}
    steps_log = [r for r in recs if r.get("event") == "step"]
    k = max(1, steps // 3)  # choice 6
    reward = first_last([r.get("reward") for r in steps_log], k) if pt["algo"] == "grpo" else (None, None)
    loss = first_last([r.get("loss") for r in steps_log], k)
    cpu = read_jsonl(os.path.join(run_dir, "cpu.jsonl"))
    row = {"name": os.path.basename(run_dir), "method": pt["size"]["method"], "size": size_name(pt["size"])}
    row |= {"params": start.get("trainable"), "bytes": start.get("update_bytes"), "algo": pt["algo"]}
    row |= {"lr": pt["lr"], "seed": pt["seed"], "steps": steps, "done": steps in evals}
    row |= {"last_step": max((r["step"] for r in steps_log), default=0)}
    row |= eval_fields(evals.get(0), "base") | eval_fields(evals.get(steps), "final")
    for prefix, r in (("base", evals.get(0)), ("final", evals.get(steps))):  # choice 6: length and the cut share
        row |= {f"{prefix}_{f}": (r or {}).get(f) for f in ("mean_tokens", "truncated")}
    row |= flips(run_dir, steps, start.get("args", {}).get("reward"))  # the grade its accuracy was taken with
    row |= {"reward_first": reward[0], "reward_last": reward[1], "loss_first": loss[0], "loss_last": loss[1]}
    row |= {"reward_k": k, "cpu_s": sum(c["cpu_s"] for c in cpu), "wall_s": sum(c["wall_s"] for c in cpu)}
    return row | {"invocations": len(cpu)}


def aggregate(rows: list[dict], key: str = "final_accuracy") -> list[dict]:
    """Finished runs grouped by (algo, size, lr): the mean of `key` over seeds and its spread (min, max)."""
    groups = {}
    for r in rows:
        if r.get("done") and r.get(key) is not None:
            groups.setdefault((r["algo"], r["size"], r["lr"]), []).append(r)
    out = []
    for (algo, size, lr), rs in groups.items():
        xs = [r[key] for r in rs]
        out.append({"algo": algo, "size": size, "method": rs[0]["method"], "lr": lr, "params": rs[0]["params"]})
        out[-1] |= {"bytes": rs[0]["bytes"], "mean": sum(xs) / len(xs), "min": min(xs), "max": max(xs)}
        out[-1] |= {"seeds": sorted(r["seed"] for r in rs)}
    return out


def best_lr(groups: list[dict]) -> list[dict]:
    """Per (algo, size), the lr group with the highest mean (choice 4); ties go to the smaller lr. Sorted by bytes."""
    best = {}
    for g in sorted(groups, key=lambda g: g["lr"]):
        k = (g["algo"], g["size"])
        if k not in best or g["mean"] > best[k]["mean"]:
            best[k] = g
    return sorted(best.values(), key=lambda g: (g["algo"], g["bytes"] or 0))


# -----------------------------------------------------------------------------
# writing: results.jsonl, results.md, figure.png


def pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def interval(r: dict, prefix: str, f: str = "accuracy") -> str:
    x = r.get(f"{prefix}_{f}")
    return "–" if x is None else f"{pct(x)} [{pct(r[f'{prefix}_{f}_lo'])}, {pct(r[f'{prefix}_{f}_hi'])}]"


def num(x) -> str:
    return "–" if x is None else f"{x:.1f}"


def before_after(r: dict, field: str, fmt=pct) -> str:
    return f"{fmt(r.get(f'base_{field}'))} → {fmt(r.get(f'final_{field}'))}"


def flip_text(r: dict) -> str:
    return "–" if r.get("flip_b") is None else f"+{r['flip_b']}/−{r['flip_c']} ({r['flip_p']:.2g})"


def arrow(a, b) -> str:
    return "–" if a is None else f"{a:.3f} → {b:.3f}"


def write_markdown(rows: list[dict], best: list[dict], path: str, title: str):
    lines = [f"# {title}", "", "Held-out accuracy in %, [Wilson 95% interval]; reward and loss: mean of the first k "
             "training steps → mean of the last k; CPU: user + system time of the run's train.py.", "",
             "Flips: held-out questions wrong → right (+) and right → wrong (−) from base to final, and McNemar's "
             "exact p. Strict: answers in the `####` format. Tokens: mean answer length; cut: % stopped by the "
             "token limit; seen: % whose numbers include the sum anywhere (base → final).", "",
             "| run | params | bytes | algo | lr | seed | base acc | final acc | flips +/− (p) | strict | tokens "
             "| cut | seen | reward | loss | CPU min | done |", "|" + "---|" * 17]  # fmt: skip
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['params'] or '–'} | {r['bytes'] or '–'} | {r['algo']} | {r['lr']:g} | {r['seed']} "
            f"| {interval(r, 'base')} | {interval(r, 'final')} | {flip_text(r)} "
            f"| {before_after(r, 'strict')} | {before_after(r, 'mean_tokens', num)} "
            f"| {before_after(r, 'truncated')} | {before_after(r, 'seen')} "
            f"| {arrow(r['reward_first'], r['reward_last'])} | {arrow(r['loss_first'], r['loss_last'])} "
            f"| {r['cpu_s'] / 60:.1f} | {'yes' if r['done'] else 'step ' + str(r['last_step'])} |"
        )
    lines += ["", "Figure points (best lr per size by mean final accuracy over seeds; spread: min..max over seeds)", ""]
    lines += ["| algo | size | params | bytes | best lr | mean acc | min..max | seeds |", "|" + "---|" * 8]
    for g in best:
        lines.append(
            f"| {g['algo']} | {g['size']} | {g['params']} | {g['bytes']} | {g['lr']:g} | {pct(g['mean'])} "
            f"| {pct(g['min'])}..{pct(g['max'])} | {len(g['seeds'])} |"
        )
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def write_figure(rows: list[dict], best: list[dict], path: str, title: str):
    """Accuracy vs update bytes (log x): a line per algorithm over the adapter sizes, full fine-tuning and the base
    model as dashed horizontal lines (the shape of the paper's Figures 1 and 2)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {"grpo": "tab:blue", "sft": "tab:orange"}
    labels = {"grpo": "RL (GRPO)", "sft": "SFT"}
    for algo in ("grpo", "sft"):
        pts = [g for g in best if g["algo"] == algo and g["method"] != "full" and g["bytes"]]
        if pts:
            x, y = [g["bytes"] for g in pts], [100 * g["mean"] for g in pts]
            err = [[100 * (g["mean"] - g["min"]) for g in pts], [100 * (g["max"] - g["mean"]) for g in pts]]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, color=colors[algo], label=labels[algo])
            for g, xi, yi in zip(pts, x, y):  # which adapter each point is, and its best lr
                ax.annotate(f"{g['size']}\nlr {g['lr']:g}", (xi, yi), textcoords="offset points", xytext=(4, 4),
                            fontsize=6, color=colors[algo])  # fmt: skip
        for g in (g for g in best if g["algo"] == algo and g["method"] == "full"):
            ax.axhline(100 * g["mean"], ls="--", color=colors[algo], label=f"full fine-tuning, {labels[algo]}")
    base = [r["base_accuracy"] for r in rows if r.get("base_accuracy") is not None]
    if base:
        ax.axhline(100 * sum(base) / len(base), ls="--", color="gray", label="base model")
    ax.set_xscale("log")
    ax.set_xlabel("update size (bytes, log scale)")
    ax.set_ylabel("held-out accuracy (%)")
    n_seeds = max((len(g["seeds"]) for g in best), default=0)
    seeds = f"{n_seeds} seed" + "s" * (n_seeds != 1)
    ax.set_title(f"{title}\nbest lr per size; mean of {seeds}, bars: min..max over seeds", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(grid: dict, pts: list[dict], sweep_dir: str, title: str) -> list[dict]:
    steps = grid["flags"]["max-steps"]
    rows = [result_row(pt, os.path.join(sweep_dir, "runs", run_name(pt)), steps) for pt in pts]
    with open(os.path.join(sweep_dir, "results.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    best = best_lr(aggregate(rows))
    write_markdown(rows, best, os.path.join(sweep_dir, "results.md"), title)
    write_figure(rows, best, os.path.join(sweep_dir, "figure.png"), title)
    return rows


# -----------------------------------------------------------------------------


def check_data(grid: dict, data: str):
    """A local training set must hold enough steps: train.py stops at --epochs before --max-steps otherwise."""
    path = os.path.join(data, "train.jsonl")
    if os.path.exists(path):
        n, f = sum(1 for _ in open(path)), grid["flags"]
        if math.floor(f.get("epochs", 1) * (n // f["prompts-per-step"])) < f["max-steps"]:
            raise SystemExit(f"{path}: {n} examples give fewer than {f['max-steps']} steps; raise the grid's epochs.")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--grid", choices=list(GRIDS), help="a grid defined in this file")
    ap.add_argument("--grid-json", metavar="FILE", help="a grid of the same shape in a JSON file")
    ap.add_argument("--out", metavar="SWEEP_DIR", help="sweep folder: runs/, results.jsonl, results.md, figure.png")
    ap.add_argument("--jobs", type=int, default=1, help="runs at the same time (one thread each)")
    ap.add_argument("--dry-run", action="store_true", help="print each run's state and command; run nothing")
    ap.add_argument("--make-data", metavar="DIR", help="write the additions data to DIR and exit")
    ap.add_argument("--keep-state", action="store_true", help="keep finished full fine-tuning runs' state.pt")
    args = ap.parse_args(argv)
    if args.make_data:
        print(f"wrote {make_data(args.make_data)}/train.jsonl (228) and test.jsonl (96)")
        return {}
    if (args.grid is None) == (args.grid_json is None) or not args.out:
        raise SystemExit("say which grid (--grid NAME or --grid-json FILE, one of them) and where (--out SWEEP_DIR).")
    if args.jobs < 1:
        raise SystemExit("--jobs must be at least 1.")
    grid = GRIDS[args.grid] if args.grid else json.load(open(args.grid_json))
    title = f"{args.grid or os.path.basename(args.grid_json)}: accuracy vs update size"
    args.out = os.path.abspath(args.out)  # train.py runs in the repository root: no path may be relative
    pts = points(grid)
    data = os.path.abspath(os.path.expanduser(grid.get("data") or os.path.join(args.out, "data")))
    if not os.path.exists(os.path.join(data, "train.jsonl")) and not grid.get("data") and not args.dry_run:
        make_data(data)
    check_data(grid, data)

    # 1) what each point needs: nothing, a resume, or a fresh run
    steps, plan, known = grid["flags"]["max-steps"], [], None
    for pt in pts:
        run_dir = os.path.join(args.out, "runs", run_name(pt))
        st = state(run_dir, steps)
        if st != "done" and known is None:
            known = known_flags()  # only when something will run: a finished sweep starts no train.py at all
        cmd = None if st == "done" else resume_command(grid, run_dir)
        cmd = train_command(grid, pt, run_dir, data, known) if st == "new" else cmd
        plan.append((pt, run_dir, st, cmd))
    counts = {s: sum(p[2] == s for p in plan) for s in ("done", "resume", "new")}
    print(f"{len(plan)} runs: {counts['done']} done, {counts['resume']} to resume, {counts['new']} to start")
    dropped = sorted(OPTIONAL & set(grid["flags"]) - (known or set())) if known else []
    if dropped:
        print(f"note: this train.py has no --{', --'.join(dropped)}; those settings are left to it")
    if args.dry_run:
        for _, run_dir, st, cmd in plan:
            print(f"[{st}] {run_dir}" + ("" if cmd is None else f"\n    {' '.join(cmd)}"))
        return counts

    # 2) run what is left (a folder without a checkpoint has nothing to resume: start it again)
    def go(item):
        pt, run_dir, st, cmd = item
        if st == "new" and os.path.exists(run_dir):
            shutil.rmtree(run_dir)
        rc = launch(cmd, run_dir)
        print(f"{'ok' if rc == 0 else f'FAILED (exit {rc})'}: {run_name(pt)} ({st}); log in {run_dir}/train.log")
        if rc == 0 and state(run_dir, steps) != "done":  # e.g. --epochs ran out, or a final eval line was removed
            print(f"  {run_name(pt)} exited without an evaluation at step {steps}: see its train.log")
        elif rc == 0 and pt["size"]["method"] == "full" and not args.keep_state:  # choice 7
            os.remove(os.path.join(run_dir, "state.pt"))
        return rc

    todo = [p for p in plan if p[2] != "done"]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        rcs = list(pool.map(go, todo))

    # 3) the table and the figure, from every run folder
    rows = write_results(grid, pts, args.out, title)
    left = [r["name"] for r in rows if not r["done"]]
    print(f"wrote {args.out}/results.jsonl, results.md, figure.png; {len(rows) - len(left)}/{len(rows)} runs done")
    if left:
        print(f"not finished ({len(left)}): {', '.join(left[:8])}{' ...' if len(left) > 8 else ''}; rerun to resume")
    return counts | {"failed": sum(rc != 0 for rc in rcs)}


if __name__ == "__main__":
    main()
