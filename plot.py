"""
Plot a run like the paper's Figure 5: training reward, accuracy and mean response length against the step.

    python plot.py runs/RUN                     # -> runs/RUN/plot.png
    python plot.py runs/A runs/B --out cmp.png  # several runs (e.g. seeds) on the same axes

Reads only RUN/metrics.jsonl ("step" records from every training step, "eval" records from the greedy
evaluations). Choices (*ours*): the noisy per-step training curves are drawn thin with a moving average over
--smooth steps on top; evaluation points are drawn as markers joined by lines.
"""

import argparse
import json
import os

EVAL_KEYS = ("strict", "flexible", "accuracy")  # what eval.evaluate reports, in order of preference


def load(run):
    steps, evals = [], []
    with open(os.path.join(run, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            (steps if r.get("event") == "step" else evals if r.get("event") == "eval" else []).append(r)
    return steps, evals


def smooth(y, k):
    out = []
    for i in range(len(y)):
        w = [v for v in y[max(0, i - k + 1) : i + 1] if v == v]  # skip NaN (SFT has no reward)
        out.append(sum(w) / len(w) if w else float("nan"))
    return out


def plot(runs, out, k=5):
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    for ci, run in enumerate(runs):
        steps, evals = load(run)
        c, name = f"C{ci}", os.path.basename(os.path.normpath(run))
        x = [r["step"] for r in steps]
        for a, key in ((ax[0], "reward"), (ax[2], "length")):
            y = [r[key] for r in steps]
            a.plot(x, y, color=c, alpha=0.25, lw=0.8)
            a.plot(x, smooth(y, k), color=c, lw=1.8, label=f"{name} train {key}")
        y = [r["strict"] for r in steps]
        ax[1].plot(x, smooth(y, k), color=c, lw=1.2, ls=":", label=f"{name} train strict")
        keys = [kk for kk in EVAL_KEYS if evals and kk in evals[0]]
        keys = [kk for kk in keys if not (kk == "accuracy" and "strict" in keys)]  # GSM8K: accuracy repeats one
        for j, key in enumerate(keys):
            ex = [r["step"] for r in evals]
            ax[1].plot(ex, [r[key] for r in evals], color=c, marker="os^d"[j], ls=["-", "--", "-.", ":"][j],
                       label=f"{name} eval {key}")  # fmt: skip
    for a, title in zip(ax, ("training reward (mean over completions)", "accuracy", "mean response length (tokens)")):
        a.set_title(title)
        a.set_xlabel("step")
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Plot reward, accuracy and length vs step for one or more runs.")
    p.add_argument("runs", nargs="+", help="run folders (each with metrics.jsonl)")
    p.add_argument("--out", default=None, help="PNG path (default: RUN/plot.png of the first run)")
    p.add_argument("--smooth", type=int, default=5, help="moving-average window over training steps")
    args = p.parse_args()
    for run in args.runs:
        if not os.path.exists(os.path.join(run, "metrics.jsonl")):
            raise SystemExit(f"{run}: no metrics.jsonl; pass a run folder written by train.py")
    print(plot(args.runs, args.out or os.path.join(args.runs[0], "plot.png"), args.smooth))
