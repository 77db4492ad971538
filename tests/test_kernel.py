"""
The Triton fused adapter-matmul in kernels.py, on CPU: (1) under TRITON_INTERPRET=1 against a float64 PyTorch
reference at odd shapes (K = 18944 too) with each s = x A variant, and through `generate` (live and static-length
decode); (2) compiled ahead of time for a Hopper GPU (sm_90), which enforces the shape and resource rules the
interpreter does not (tl.dot dims >= 16, shared memory); (3) on a machine with a CUDA GPU, compiled for real against
float64 with every config bucket and at 7B shapes, and through `generate` with CUDA-graph decode.
Run: `python -m pytest -q tests/test_kernel.py`.

Both run in a subprocess (this file run as a script): TRITON_INTERPRET must be set before triton is first imported,
and other test files import it (through sample.py and kernels.py) without it.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("triton", reason="triton is not installed (it ships with torch on Linux)")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU: these run the kernel compiled")

# (M, N, K, r, bias): M = 1 decode; M, N, K off the tiles; N = 512; one shape per config bucket of kernels.CONFIGS;
# K = 18944 (Qwen2.5-7B's down_proj: 37 K splits of s = x A) and K = 1000 (a last split shorter than the others)
SHAPES = [
    (1, 512, 96, 2, True),
    (1, 40, 300, 2, False),
    (37, 80, 200, 2, True),
    (70, 512, 130, 3, False),
    (300, 260, 72, 2, True),
    (1, 40, 18944, 2, True),
    (20, 24, 18944, 3, False),
    (5, 24, 1000, 2, True),
]
SMEM_LIMIT = 232448  # bytes of shared memory one CTA may use on H100/H200 (227 KiB)


def run_self(what: str, interpret: bool):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # silence triton 3.9's notice about the default changing
    r = subprocess.run([sys.executable, __file__, what], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{what} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def test_kernel_matches_float64_reference_under_the_interpreter():
    out = run_self("interpret", interpret=True)
    assert out.count("ok") == len(SHAPES) * 3, out


def test_generate_with_the_triton_path_equals_the_torch_path_under_the_interpreter():
    out = run_self("generate", interpret=True)
    assert out.count("ok") == 4, out


def test_every_kernel_configuration_compiles_for_hopper():
    out = run_self("aot", interpret=False)
    assert "compiled" in out, out


@needs_gpu
def test_kernel_compiled_on_the_gpu_matches_float64_with_every_config():
    out = run_self("gpu", interpret=False)
    assert out.count("ok") == (len(SHAPES) + len(REAL_SHAPES)) * 3, out


@needs_gpu
def test_generate_on_the_gpu_with_the_kernel_equals_the_torch_path():
    out = run_self("gpu-generate", interpret=False)
    assert out.count("ok") == 4, out


# -----------------------------------------------------------------------------
# what the subprocess runs


REAL_SHAPES = [(M, N, 3584, 2, bias) for M in (1, 64, 4096) for N, bias in ((3584, True), (512, False))]  # 7B
REAL_SHAPES += [(M, 3584, 18944, 2, False) for M in (1, 64, 4096)]  # 7B down_proj


def check_kernel(device="cpu"):
    """The kernel against float64 at SHAPES with every way of computing s = x A (kernels.XA_VARIANTS): under the
    interpreter on CPU; compiled on a GPU, also at Qwen2.5-7B shapes and with every config bucket of kernels.CONFIGS
    forced, not only the one pick_config chooses."""
    import torch

    sys.path.insert(0, str(ROOT))
    import kernels

    g = torch.Generator().manual_seed(0)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}  # relative to the output's scale
    for M, N, K, r, has_bias in SHAPES + (REAL_SHAPES if device == "cuda" else []):
        W = torch.randn(N, K, generator=g) / K**0.5
        b = torch.randn(N, generator=g) if has_bias else None
        x = torch.randn(M, K, generator=g)
        U, V = torch.randn(N, r, generator=g), torch.randn(K, r, generator=g) / K**0.5
        Mr = torch.randn(r, r, generator=g)
        W, b, x, U, V, Mr = (t if t is None else t.to(device) for t in (W, b, x, U, V, Mr))
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            xd, Wd, bd = x.to(dtype), W.to(dtype), None if b is None else b.to(dtype)
            # reference in float64 from the (rounded) inputs, the three-line adapter: x Wᵀ + b + ((x V) Mᵀ) Uᵀ
            x64, W64 = xd.double(), Wd.double()
            ref = x64 @ W64.T + (0 if bd is None else bd.double()) + ((x64 @ V.double()) @ Mr.double().T) @ U.double().T
            A = (V @ Mr.T).contiguous()  # what sampling_forwards precomputes
            configs = [None]  # pick_config's choice
            if device == "cuda":
                configs += [kernels.pick_config(max_m or 4096, dtype) for max_m, *_ in kernels.CONFIGS]
            for cfg in configs:
                for xa in kernels.XA_VARIANTS:
                    y = kernels.lowrank_linear_triton(xd, Wd, bd, A, U.contiguous(), config=cfg, xa=xa)
                    assert y.dtype == dtype and y.shape == (M, N)
                    err = (y.double() - ref).abs().max().item() / ref.abs().max().item()
                    assert err < tol[dtype], f"{(M, N, K, r, dtype, cfg, xa)}: relative error {err:.2e}"
            print("ok", M, N, K, r, dtype, f"{err:.1e}")


def check_generate(device="cpu", decodes=("live",)):
    """generate with the Triton path == with the torch path; on a GPU also with every decode step in `decodes`
    (CUDA graphs over static lengths, torch.compile), with rows stopping early so finished rows get dropped."""
    import torch

    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "tests"))
    import tempfile

    from conftest import write_checkpoint
    from test_sample import PROMPTS, attach

    import kernels
    import sample
    from model import load_model

    with tempfile.TemporaryDirectory() as d:
        model = load_model(str(write_checkpoint(Path(d), "qwen2")), dtype=torch.float32, device=device)
    attach(model)
    kernels.BUCKET = 8  # several length buckets, so several graphs, within 16 tokens
    kw = dict(G=2, max_new_tokens=16, stop_ids=list(range(40, 90)))
    gen = lambda mode, decode: sample.generate(  # noqa: E731
        model, PROMPTS, generator=torch.Generator(device).manual_seed(0), mode=mode, decode=decode, **kw
    )
    ref = gen("torch", "live")
    assert ref.mask.sum(1).min() < ref.mask.sum(1).max(), "rows should stop at different steps"
    for decode in decodes:
        for mode in ("torch", "triton"):
            out = gen(mode, decode)
            assert torch.equal(ref.tokens, out.tokens), (mode, decode, ref.tokens, out.tokens)
            assert (ref.logp - out.logp).abs().max() < 1e-5, (mode, decode)
            print("ok", mode, decode)


def check_aot():
    import torch
    import triton
    from triton.backends.compiler import GPUTarget

    sys.path.insert(0, str(ROOT))
    import kernels

    target = GPUTarget("cuda", 90, 32)  # Hopper (H100/H200): compiles to a cubin with ptxas, no GPU needed
    ty = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
    n = 0
    for dtype in ty:
        p = "*" + ty[dtype]
        # the s = x A kernel
        sig = dict(x_ptr=p, a_ptr="*fp32", s_ptr="*fp32", M="i32", K="i32", stride_xm="i32", CHUNK="i32")
        cx = dict(R=2, R_PAD=2, BLOCK_M=kernels.XA_BLOCK_M, BLOCK_K=kernels.XA_BLOCK_K)
        compile_one(triton, kernels._xa_kernel, sig, cx, {}, target)
        n += 1
        # the GEMM + epilogue, every config bucket, with and without a bias
        for max_m, *_ in kernels.CONFIGS:
            cfg = kernels.pick_config(max_m or 4096, dtype)
            opts = dict(num_warps=cfg.pop("num_warps"), num_stages=cfg.pop("num_stages"))
            for has_bias, fused in ((True, False), (False, False), (True, True), (False, True)):
                sig = dict(x_ptr=p, w_ptr=p, b_ptr=p, a_ptr="*fp32", s_ptr="*fp32", u_ptr="*fp32", y_ptr=p)
                sig.update(M="i32", N="i32", K="i32", SPLIT="i32", stride_xm="i32", stride_wn="i32", stride_ym="i32")
                precision = "ieee" if dtype == torch.float32 else "tf32"
                cx = dict(HAS_BIAS=has_bias, XA_FUSED=fused, R=2, R_PAD=2, UPCAST=False, PRECISION=precision, **cfg)
                k = compile_one(triton, kernels._lowrank_linear_kernel, sig, cx, opts, target)
                assert k.metadata.shared <= SMEM_LIMIT, f"{dtype} {cfg}: {k.metadata.shared} B of shared memory"
                n += 1
    print(f"compiled {n} kernels for sm_90")


def compile_one(triton, fn, sig, constexprs, options, target):
    sig = {**sig, **{k: "constexpr" for k in constexprs}}
    # pointers and the int arguments that are multiples of 16 at real shapes get the divisibility hint the JIT gives
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, (k, v) in enumerate(sig.items())
        if v != "constexpr" and k not in ("M", "SPLIT")
    }
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=target, options=options)


if __name__ == "__main__":
    checks = {"interpret": check_kernel, "aot": check_aot}
    checks |= {"generate": lambda: check_generate("cpu", ("live", "static"))}
    checks |= {"gpu": lambda: check_kernel("cuda"), "gpu-generate": lambda: check_generate("cuda", ("live", "graph"))}
    checks |= {"gpu-compile": lambda: check_generate("cuda", ("compile",))}  # minutes of compiling: gpu_checks.sh only
    checks[sys.argv[1]]()
