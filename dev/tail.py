"""
How much of a GSM8K sampling call is tail, on synthetic response lengths, and what dropping finished rows saves.

    python dev/tail.py                       # 256 rows a call (64 prompts x G 4), 2,000 calls per setting
    python dev/tail.py --runaway 0 0.003 0.01 --rows 256 --cap 4096

Lengths (*ours*, matched to what Qwen2.5-7B-Instruct writes on GSM8K: ~150-400 tokens, mean ~280, a long tail, a
few runs to the cap): a mixture of a lognormal bulk (median 240, sigma 0.27), a lognormal long tail (9% of rows,
median 450, sigma 0.45) and a `--runaway` fraction that never stops and hits `--cap`. A call lasts as long as its
longest row (lock-step decode). "Tail" = the steps where fewer than 25% of the rows are still live.

Time is modelled at the bandwidth floor of Qwen2.5-7B on one H200 (../shared/PERF.md): a step reads the 15.2 GB of
weights and 57.3 KB of keys/values per slot of every row in the batch, at 4.3 TB/s. Without compaction every row
stays in the batch to the end; with it (sample.py choice 10) the batch halves whenever at most half of it is live.
"""

import argparse

import numpy as np

W_BYTES, KV_PER_SLOT, BW = 15.2e9, 57.3e3, 4.3e12  # Qwen2.5-7B bf16 on one H200 (PERF.md)


def lengths(rng, n, runaway, cap):
    bulk = rng.lognormal(np.log(240), 0.27, n)
    tail = rng.lognormal(np.log(450), 0.45, n)
    L = np.where(rng.random(n) < 0.09, tail, bulk)
    L = np.where(rng.random(n) < runaway, cap, L)
    return np.clip(np.round(L), 1, cap).astype(int)


def one_call(L, prompt, compact_at=0.5):
    """(steps, tail steps, modelled seconds without and with compaction) of one lock-step call with lengths L."""
    T = int(L.max())
    t = np.arange(T)
    live = (L[None, :] > t[:, None]).sum(1)  # (T,) rows still generating at each step
    tail = int((live < 0.25 * len(L)).sum())
    ctx = prompt + t + 1  # attended slots per row at each step
    plain = ((W_BYTES + len(L) * ctx * KV_PER_SLOT) / BW).sum()
    batch, rows = len(L), np.empty(T)
    for i in range(T):  # the batch halves (to the live count) once at most compact_at of it is live
        if live[i] <= batch * compact_at:
            batch = max(int(live[i]), 1)
        rows[i] = batch
    compacted = ((W_BYTES + rows * ctx * KV_PER_SLOT) / BW).sum()
    return T, tail, plain, compacted


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=256, help="rows per sampling call (prompts x G)")
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--prompt", type=int, default=150, help="prompt tokens (GSM8K question in the chat template)")
    p.add_argument("--cap", type=int, default=4096, help="max_new_tokens")
    p.add_argument("--runaway", type=float, nargs="+", default=[0.0, 0.001, 0.003, 0.01])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = np.random.default_rng(args.seed)
    print(f"{args.calls} calls of {args.rows} rows, prompt {args.prompt} tokens, cap {args.cap}")
    print(
        f"{'runaway':>8} {'mean len':>8} {'p50':>5} {'p95':>5} {'p99':>5} {'steps/call':>10} {'tail steps':>10} "
        f"{'tail time':>9} {'s/call':>7} {'compacted':>9} {'speed-up':>8}"
    )
    for runaway in args.runaway:
        all_L, steps, tails, plain, comp, tail_time = [], 0, 0, 0.0, 0.0, 0.0
        for _ in range(args.calls):
            L = lengths(rng, args.rows, runaway, args.cap)
            T, tail, t_plain, t_comp = one_call(L, args.prompt)
            all_L.append(L)
            steps, tails, plain, comp = steps + T, tails + tail, plain + t_plain, comp + t_comp
            live = (L[None, :] > np.arange(T)[:, None]).sum(1)
            ctx = args.prompt + np.arange(T) + 1
            per_step = (W_BYTES + args.rows * ctx * KV_PER_SLOT) / BW
            tail_time += per_step[live < 0.25 * args.rows].sum()
        L = np.concatenate(all_L)
        print(
            f"{runaway:8.3f} {L.mean():8.0f} {np.percentile(L, 50):5.0f} {np.percentile(L, 95):5.0f} "
            f"{np.percentile(L, 99):5.0f} {steps / args.calls:10.0f} {tails / steps:9.1%} {tail_time / plain:9.1%} "
            f"{plain / args.calls:7.2f} {comp / args.calls:9.2f} {plain / comp:7.2f}x"
        )
    print("tail steps: share of decode steps with < 25% of rows live; tail time: their share of the modelled time")
    print("s/call, compacted: modelled seconds per call at the bandwidth floor, without / with dropping finished rows")


if __name__ == "__main__":
    main()
