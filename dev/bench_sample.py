"""
Benchmarks for sample.py and its fast paths (kernels.py); every ratio is measured within one run.

    python dev/bench_sample.py --what cpu        # ours vs transformers generate, SmolLM2-135M-Instruct, batch 16
    python dev/bench_sample.py --what gemm       # CPU: one decode step's matmuls, streamed: GB/s of each library
    python dev/bench_sample.py --what mismatch   # sampler vs trainer log-probs: fused path vs merged bf16 weights
    python dev/bench_sample.py --what kernel     # GPU: fused adapter-matmul (each s = x A variant) vs cuBLAS, 7B shapes
    python dev/bench_sample.py --what sampler    # GPU: decode tokens/s vs the roofline, adapter and CUDA graphs on/off

A dry run of the GPU ones on CPU (catches typos; figures meaningless):
    TRITON_INTERPRET=1 python dev/bench_sample.py --what kernel --device cpu --M 1 20
    python dev/bench_sample.py --what sampler --device cpu --sizes tiny --contexts 40 300 --decodes live static

cpu: both sides generate 128 forced new tokens (no stop) for the same 16 chat prompts at temperature 1, no top-k/p,
fp32, `--threads` threads; they alternate (ours, ours + adapter, ours with mode="torch", hf, ours, ...) so a machine
that gets busier hurts all alike. mode="torch" is our sampler with plain F.linear instead of the oneDNN-packed CPU
path; "+ adapter" has a TinyLoRA adapter with v != 0 on every projection (off, it computes the base linear exactly).
mismatch: an adapter with v != 0 on SmolLM2; sample with the fused path, the plain torch path and merged bf16 weights,
then score the same tokens with the training forward (the adapter modules' own forward over whole sequences).
kernel / sampler: random weights at the real shapes (no download). The sampler benchmark uses a stand-in rank-2
adapter with random orthonormal U, V that follows tinylora.py's contract: the kernel's cost does not depend on where
U, M, V came from, and an SVD of 196 7B matrices would take minutes.
"""

import argparse
import contextlib
import functools
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import kernels  # noqa: E402
import sample  # noqa: E402
from model import Config, Transformer, load_model, rope_inv_freq  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

DEFAULT_MODEL = Path(os.environ.get("TINYLORA_CACHE", Path.home() / ".cache" / "tinylora")) / "SmolLM2-135M-Instruct"
QUESTIONS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many in all?",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she earn?",
    "Betty needs $100 for a wallet. She has half of the money. Her parents give her $15. How much more does she need?",
    "James writes a 3-page letter to 2 different friends twice a week. How many pages does he write a year?",
    "Albert buys 2 large pizzas and 2 small pizzas. A large pizza has 16 slices and a small one 8. How many slices?",
    "Ken's box weighed 2 pounds. He tripled it, then added 2 pounds of jelly beans. What does it weigh now?",
    "Alexis spent $200 on clothes and had $16 left of her $200 budget plus gifts. What did the shoes cost?",
    "Tina makes $18.00 an hour. If she works more than 8 hours a shift she gets overtime. How much does she make?",
]
SHAPES_7B = {  # Qwen2.5-7B projections: (d_out, d_in)
    "q_proj": (3584, 3584),
    "k_proj": (512, 3584),
    "v_proj": (512, 3584),
    "o_proj": (3584, 3584),
    "gate_proj": (18944, 3584),
    "up_proj": (18944, 3584),
    "down_proj": (3584, 18944),
}
QWEN = {  # hidden, layers, heads, kv heads, head_dim, intermediate, vocab, tied (../shared/PERF.md)
    "1.5B": (1536, 28, 12, 2, 128, 8960, 151936, True),
    "7B": (3584, 28, 28, 4, 128, 18944, 152064, False),
    "tiny": (64, 2, 4, 2, 16, 128, 512, True),  # for a dry run of the GPU benchmarks on CPU (--device cpu)
}


class RandomAdapter(nn.Module):
    """A rank-r adapter with tinylora.py's interface (weight, bias, enabled, lowrank()) and random orthonormal U, V."""

    def __init__(self, lin, r=2, scale=1e-3):
        super().__init__()
        self.weight, self.bias, self.enabled = lin.weight, lin.bias, True
        d_out, d_in = lin.weight.shape
        dev = lin.weight.device
        self.U = torch.linalg.qr(torch.randn(d_out, r, device=dev))[0]  # (d_out, r)
        self.V = torch.linalg.qr(torch.randn(d_in, r, device=dev))[0]  # (d_in, r)
        self.M = scale * torch.randn(r, r, device=dev)  # (r, r)

    def lowrank(self):
        return self.U, self.M, self.V

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        return y + (((x.float() @ self.V) @ self.M.T) @ self.U.T).to(y.dtype) if self.enabled else y


def attach(model, scale, stand_in=False):
    """tinylora.attach with every v set to `scale`; or (stand_in) the random adapter above, which skips the SVDs."""
    if not stand_in:
        import tinylora

        adapter = tinylora.attach(model)
        with torch.no_grad():
            for p in adapter.params:
                p.fill_(scale)
        return f"tinylora.attach (r=2, u=1, tie=1), v = {scale:g}"
    for layer in model.model.layers:
        for parent, names in ((layer.self_attn, "qkvo"), (layer.mlp, ("gate", "up", "down"))):
            for n in names:
                setattr(parent, f"{n}_proj", RandomAdapter(getattr(parent, f"{n}_proj"), scale=scale))
    return f"stand-in random rank-2 adapter, M ~ {scale:g} N(0,1)"


def chat_prompts(tok, n):
    return [tok.apply_chat_template([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]) for i in range(n)]


# -----------------------------------------------------------------------------
# cpu: ours vs transformers


def bench_cpu(args):
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    ours, tok = load_model(args.model, dtype=torch.float32, device="cpu"), Tokenizer(args.model)
    hf = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    prompts = chat_prompts(tok, args.batch)
    L = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_id] * (L - len(p)) + p for p in prompts])  # left padding for transformers
    attn = (torch.arange(L)[None] >= torch.tensor([L - len(p) for p in prompts])[:, None]).long()
    T = args.new_tokens
    print(
        f"{args.batch} prompts of {min(map(len, prompts))}-{L} tokens, {T} forced new tokens, temperature 1, fp32, "
        f"{args.threads} threads"
    )

    import tinylora

    adapter = tinylora.attach(ours)  # r=2, u=1, one v per module; disabled it computes the base linear exactly
    with torch.no_grad():
        for v in adapter.params:
            v.fill_(1e-2)

    def run_ours(seed, T=T, mode="auto", adapter_on=False):
        g = torch.Generator().manual_seed(seed)
        with contextlib.nullcontext() if adapter_on else adapter.disabled():
            out = sample.generate(
                ours, prompts, max_new_tokens=T, temperature=1.0, pad_id=tok.pad_id, generator=g, mode=mode
            )
        assert out.mask.all() and out.tokens.shape == (args.batch, T)

    def run_hf(seed, T=T):
        torch.manual_seed(seed)
        with torch.no_grad():
            out = hf.generate(
                ids,
                attention_mask=attn,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=T,
                min_new_tokens=T,
                pad_token_id=tok.pad_id,
            )
        assert out.shape == (args.batch, L + T)

    runs = {
        "ours": run_ours,
        "ours + adapter": functools.partial(run_ours, adapter_on=True),
        "ours, mode=torch": functools.partial(run_ours, mode="torch"),
        "transformers": run_hf,
    }
    times = {k: [] for k in runs}
    for fn in runs.values():  # warm-up
        fn(0, T=4)
    for rep in range(args.reps):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn(rep + 1)
            times[name].append(time.perf_counter() - t0)
            print(f"  run {rep + 1} {name}: {times[name][-1]:.2f} s", flush=True)
    tps = {k: args.batch * T / min(v) for k, v in times.items()}  # best of reps: the least disturbed run
    for k, v in times.items():
        print(
            f"{k:>16}: {tps[k]:7.1f} tokens/s (best of {len(v)}: {min(v):.2f} s; "
            f"all: {', '.join(f'{t:.2f}' for t in v)})"
        )
    print(f"ratio ours / transformers: {tps['ours'] / tps['transformers']:.2f}x")
    print(
        f"ratio ours / ours with plain torch linears (the packed path's share): "
        f"{tps['ours'] / tps['ours, mode=torch']:.2f}x"
    )
    print(
        f"adapter on / off (TinyLoRA r=2 on all {len(adapter.modules)} projections, v = 0.01): "
        f"{tps['ours + adapter'] / tps['ours']:.3f}x"
    )


def bench_gemm(args):
    """The matmuls of one decode step on CPU: `--batch` rows through every linear of the model in turn, so the weights
    stream from memory as they do while sampling (a loop over one cache-resident weight would overstate the rate)."""
    torch.set_num_threads(args.threads)
    model = load_model(args.model, dtype=torch.float32, device="cpu")
    Ws = [m.weight.detach() for m in model.modules() if isinstance(m, nn.Linear)]
    nbytes = sum(W.numel() for W in Ws) * 4
    xs = {K: torch.randn(args.batch, K) for K in {W.shape[1] for W in Ws}}

    def best(fn, reps=5):
        fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    t = {"read every weight once (sum)": best(lambda: [W.sum() for W in Ws])}
    t["F.linear (MKL), one per projection"] = best(lambda: [F.linear(xs[W.shape[1]], W) for W in Ws])
    Wn, xn = [W.numpy() for W in Ws], {K: x.numpy() for K, x in xs.items()}
    t["numpy x @ W.T (its bundled BLAS)"] = best(lambda: [xn[W.shape[1]] @ W.T for W in Wn])
    packed = [(W.shape[1], kernels.PackedLinears([(W, None, None, None)], args.batch)) for W in Ws]
    t["oneDNN packed, one per projection"] = best(lambda: [p(xs[K]) for K, p in packed])
    packed.clear()  # free the copies before the fused ones are made
    groups = [
        (g[0].weight.shape[1], kernels.PackedLinears([sample.sampling_weights(m, "auto") for m in g], args.batch))
        for g in kernels.packed_groups(model)
    ]
    t["oneDNN packed, q/k/v and gate/up fused (sample.py)"] = best(lambda: [p(xs[K]) for K, p in groups])
    print(f"{len(Ws)} weights, {nbytes / 1e6:.0f} MB fp32, x = {args.batch} rows, {args.threads} threads (best of 5)")
    for k, v in t.items():
        print(f"{k:>52}: {v * 1e3:7.1f} ms  {nbytes / v / 1e9:5.1f} GB/s")


# -----------------------------------------------------------------------------
# mismatch: sampler vs trainer log-probs


def trainer_logp(model, out, pad_id):
    """Log-probs of the sampled tokens under the training forward: whole right-padded sequences, adapter forward."""
    seqs = [p + out.tokens[i, : int(out.mask[i].sum())].tolist() for i, p in enumerate(out.prompts)]
    L = max(map(len, seqs))
    ids = torch.tensor([s + [pad_id] * (L - len(s)) for s in seqs])
    attn = torch.tensor([[1] * len(s) + [0] * (L - len(s)) for s in seqs])
    with torch.no_grad():
        logits = model(ids, attention_mask=attn).float()  # (N, L, V)
    lp = []
    for i, p in enumerate(out.prompts):
        n = int(out.mask[i].sum())
        lp.append(logits[i, len(p) - 1 : len(p) - 1 + n].log_softmax(-1).gather(-1, out.tokens[i, :n, None])[:, 0])
    return torch.cat(lp)


def bench_mismatch(args):
    torch.set_num_threads(args.threads)
    tok = Tokenizer(args.model)
    prompts = chat_prompts(tok, args.batch)
    print(
        f"{args.batch} prompts x G=2, up to {args.new_tokens} new tokens at temperature 1; "
        "|Δ| = |sampler logp - trainer logp|"
    )
    print(f"{'dtype':>8} {'mode':>7} {'tokens':>7} {'p95 |Δ|':>10} {'max |Δ|':>10} {'ratio outside [0.9,1.1]':>24}")

    def row(dtype, name, d):
        outside = ((d.exp() > 1.1) | ((-d).exp() < 0.9)).float().mean()  # |Δ| -> the ratio exp(±Δ)
        print(
            f"{str(dtype)[6:]:>8} {name:>7} {d.numel():7d} {d.quantile(0.95):10.2e} {d.max():10.2e} "
            f"{100 * outside:23.2f}%"
        )

    for dtype in (torch.float32, torch.bfloat16):
        model = load_model(args.model, dtype=dtype, device="cpu")
        what = attach(model, scale=args.scale)
        for mode in ("auto", "torch", "merged"):  # auto on CPU: the oneDNN-packed path where the dtype allows it
            g = torch.Generator().manual_seed(0)
            out = sample.generate(
                model,
                prompts,
                G=2,
                max_new_tokens=args.new_tokens,
                generator=g,
                mode=mode,
                stop_ids=tok.stop_ids,
                pad_id=tok.pad_id,
            )
            ref = trainer_logp(model, out, tok.pad_id)
            row(dtype, {"auto": "fused", "torch": "plain", "merged": "merged"}[mode], (out.logp[out.mask] - ref).abs())
            if mode == "auto":  # the trainer against itself: the same rows scored one at a time instead of batched
                one = [
                    trainer_logp(
                        model, sample.Rollouts([p], out.tokens[i : i + 1], out.mask[i : i + 1], None, []), tok.pad_id
                    )
                    for i, p in enumerate(out.prompts)
                ]
                row(dtype, "floor", (torch.cat(one) - ref).abs())
    print(f"adapter: {what}")
    print(
        "fused: mode auto (on CPU the oneDNN-packed path for fp32); plain: mode torch (F.linear + the low-rank term);"
    )
    print("merged: W + ΔW rounded to bf16; floor: the training forward, batched vs one row at a time (no sampler)")


# -----------------------------------------------------------------------------
# GPU: the kernel, and the sampler against the roofline


def bench_kernel(args):
    """Per Qwen2.5-7B projection and M: cuBLAS F.linear (merged-weight baseline), the Triton kernel with each way of
    computing s = x A (kernels.XA_VARIANTS), the plain torch path, and the best tile config (the sweep that should
    retune kernels.CONFIGS and kernels.XA_FUSED_MAX_M)."""
    from triton.testing import do_bench

    dev, dt = args.device, torch.bfloat16
    if dev == "cuda":
        us = lambda f, *a, **kw: do_bench(lambda: f(*a, **kw)) * 1e3  # microseconds, CUDA events, L2 flushed
    else:  # a dry run of this script under TRITON_INTERPRET=1 (figures meaningless)
        us = lambda f, *a, **kw: (lambda t0: (f(*a, **kw), (time.perf_counter() - t0) * 1e6)[1])(time.perf_counter())
    xas = kernels.XA_VARIANTS
    print(
        f"{'proj':>9} {'M':>5} {'cuBLAS us':>9} "
        + " ".join(f"{x + ' us':>9}" for x in xas)
        + f" {'best':>6} {'ratio':>6} {'GB/s':>7} {'torch us':>9} {'best cfg us':>11} best config"
    )
    for name, (N, K) in args.shapes.items():
        W = torch.randn(N, K, device=dev, dtype=dt) / K**0.5
        U, V = torch.randn(N, 2, device=dev), torch.randn(K, 2, device=dev) / K**0.5
        A = (V @ torch.randn(2, 2, device=dev).T).contiguous()
        b = torch.randn(N, device=dev, dtype=dt) if name in ("q_proj", "k_proj", "v_proj") else None
        for M in args.M:
            x = torch.randn(M, K, device=dev, dtype=dt)
            t_ref = us(F.linear, x, W, b)
            t_xa = {xa: us(kernels.lowrank_linear_triton, x, W, b, A, U, xa=xa) for xa in xas}
            xa_best = min(t_xa, key=t_xa.get)
            t_torch = us(sample.lowrank_linear, x, W, b, A, U)
            best = (float("inf"), None)
            for _, bm, bn, bk, gm, w, s in kernels.CONFIGS:
                cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm, num_warps=w, num_stages=s)
                t = us(kernels.lowrank_linear_triton, x, W, b, A, U, config=cfg, xa=xa_best)
                best = min(best, (t, (bm, bn, bk, gm, w, s)), key=lambda z: z[0])
            t_best = t_xa[xa_best]
            gbs = (W.numel() + 2 * x.numel() + M * N) * 2 / (t_best * 1e-6) / 1e9  # W, x (twice), y bytes
            record(args, proj=name, M=M, N=N, K=K, cublas_us=t_ref, xa_us=t_xa, best_xa=xa_best, ratio=t_best / t_ref,
                   gb_s=gbs, torch_us=t_torch, best_config_us=best[0], best_config=best[1])  # fmt: skip
            print(
                f"{name:>9} {M:5d} {t_ref:9.1f} "
                + " ".join(f"{t_xa[xa]:9.1f}" for xa in xas)
                + f" {xa_best:>6} {t_best / t_ref:6.2f} {gbs:7.0f} {t_torch:9.1f} {best[0]:11.1f} {best[1]}"
            )


def record(args, **row):
    """One printed row, kept for --json (dev/gpu_check.py reads them)."""
    if getattr(args, "records", None) is not None:
        args.records.append(row)


def random_model(size, dev="cuda", dtype=torch.bfloat16):
    C, L, H, Hkv, D, I, Vocab, tied = QWEN[size]
    cfg = Config(
        architecture="Qwen2ForCausalLM",
        vocab_size=Vocab,
        hidden_size=C,
        intermediate_size=I,
        num_hidden_layers=L,
        num_attention_heads=H,
        num_key_value_heads=Hkv,
        head_dim=D,
        tie_word_embeddings=tied,
        attention_bias=True,
        rope_theta=1e6,
        max_position_embeddings=32768,
    )
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device=dev).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.02) if p.dim() == 2 else p.fill_(1.0 if "norm" in name else 0.0)
    model.inv_freq = rope_inv_freq(cfg).to(dev)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def sync(dev):
    if torch.device(dev).type == "cuda":
        torch.cuda.synchronize()


def bandwidth(dev):
    """Bytes/s of a large copy (read + write): HBM on a GPU; on CPU (a dry run) whatever memcpy gets."""
    n = 2 * 1024**3 if torch.device(dev).type == "cuda" else 64 * 1024**2
    x = torch.empty(n, dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    best = float("inf")
    for _ in range(5):
        sync(dev)
        t0 = time.perf_counter()
        y.copy_(x)
        sync(dev)
        best = min(best, time.perf_counter() - t0)
    return 2 * n / best


def bench_sampler(args):
    """Decode tokens/s at real shapes vs the bandwidth floor (weights + live keys/values read once a step), adapter
    off/on and per decode step (sample.DECODES: "live" eager, "graph" CUDA graphs). One prompt of `ctx` random tokens
    fanned out to `batch` rows (G = batch): the prefill stays one row, and a decode step reads what `batch` distinct
    prompts would. Per-step time = (time of n2 steps - time of n1 steps) / (n2 - n1), best of 2, so prefill, graph
    captures (both runs stay in one length bucket) and the call's fixed costs cancel."""
    dev = args.device
    bw = bandwidth(dev)
    print(f"measured bandwidth ({dev} copy): {bw / 1e12:.2f} TB/s")
    print(
        f"{'model':>5} {'ctx':>5} {'batch':>5} {'decode':>7} {'adapter':>7} {'ms/step':>8} {'tokens/s':>9} "
        f"{'GB/step':>8} {'% roofline':>10}"
    )
    n1, n2 = 8, 8 + args.steps
    for size in args.sizes:
        model = random_model(size, dev=dev, dtype=torch.bfloat16 if dev == "cuda" else torch.float32)
        C, L, H, Hkv, D, I, Vocab, tied = QWEN[size]
        nbytes = next(model.parameters()).element_size()
        w_bytes = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n or tied) * nbytes
        adapters = None
        for ctx in args.contexts:
            prompt = torch.randint(0, Vocab, (ctx,), generator=torch.Generator().manual_seed(0)).tolist()
            for batch in args.batch_sizes:
                for decode in args.decodes:
                    for adapter in ("off", "on"):
                        if adapter == "on" and adapters is None:
                            attach(model, scale=1e-3, stand_in=True)
                            adapters = [m for m in model.modules() if hasattr(m, "lowrank")]
                        for m in adapters or []:
                            m.enabled = adapter == "on"
                        run = functools.partial(sample.generate, model, [prompt], G=batch, decode=decode)
                        run(max_new_tokens=2, generator=torch.Generator(dev).manual_seed(0))  # Triton compiles
                        steps = []
                        for _ in range(2):
                            times = []
                            for n in (n1, n2):
                                sync(dev)
                                t0 = time.perf_counter()
                                run(max_new_tokens=n, generator=torch.Generator(dev).manual_seed(0))
                                sync(dev)
                                times.append(time.perf_counter() - t0)
                            steps.append((times[1] - times[0]) / (n2 - n1))
                        step = max(min(steps), 1e-9)
                        kv_bytes = 2 * L * batch * Hkv * (ctx + (n1 + n2) // 2) * D * nbytes  # live keys + values
                        gb = (w_bytes + kv_bytes) / 1e9
                        record(args, size=size, ctx=ctx, batch=batch, decode=decode, adapter=adapter,
                               ms_step=step * 1e3, tokens_s=batch / step, gb_step=gb, roofline=gb * 1e9 / step / bw,
                               bandwidth_tb_s=bw / 1e12)  # fmt: skip
                        print(
                            f"{size:>5} {ctx:5d} {batch:5d} {decode:>7} {adapter:>7} {step * 1e3:8.2f} "
                            f"{batch / step:9.0f} {gb:8.2f} {100 * gb * 1e9 / step / bw:9.1f}%",
                            flush=True,
                        )
        del model
        if dev == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--what", choices=("cpu", "gemm", "mismatch", "kernel", "sampler"), default="cpu")
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="HF folder for cpu/mismatch (the test-cache SmolLM2)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=16, help="cpu/mismatch: prompts")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=2, help="cpu: timed runs per side (best is reported)")
    p.add_argument("--scale", type=float, default=0.05, help="mismatch: the adapter's v (or stand-in M scale)")
    p.add_argument("--M", type=int, nargs="+", default=[1, 8, 64, 256, 4096], help="kernel: rows of x")
    p.add_argument("--sizes", nargs="+", default=["1.5B", "7B"], choices=list(QWEN))
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64, 256])
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096], help="sampler: prompt lengths")
    p.add_argument("--decodes", nargs="+", default=["live", "graph"], choices=sample.DECODES[1:])
    p.add_argument("--steps", type=int, default=32, help="sampler: decode steps timed")
    p.add_argument("--device", default="cuda", help="kernel/sampler: 'cpu' only for a dry run at --sizes tiny")
    p.add_argument("--json", default=None, help="kernel/sampler: also write the table's rows to this JSON file")
    args = p.parse_args()
    args.records = []
    args.shapes = SHAPES_7B if args.device == "cuda" else {"q_proj": (40, 72), "down_proj": (24, 1000)}
    if args.what in ("kernel", "sampler") and args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--what {args.what} needs a CUDA GPU (none visible to torch here)")
    benches = {"cpu": bench_cpu, "gemm": bench_gemm, "mismatch": bench_mismatch}
    benches |= {"kernel": bench_kernel, "sampler": bench_sampler}
    benches[args.what](args)
    if args.json:
        Path(args.json).write_text(json.dumps(args.records, indent=1))
