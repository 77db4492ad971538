"""
The fast paths of sample.py: drop-ins for its plain `lowrank_linear` (y = x Wᵀ + b + (x A) Uᵀ), picked by the
sampling mode for one generate call. The plain path stays the reference; tests/test_kernel.py and
tests/test_sample.py check that every path here computes what it does. Measured figures: docs/BENCHMARKS.md.

    CUDA ("auto", "triton"): a tiled Triton GEMM x Wᵀ whose epilogue adds the bias and s Uᵀ (s = x A, fp32) as r
                             rank-1 FMA updates in fp32; s in its K loop, or from a split-K kernel before it.
    CPU ("auto"):            every linear through oneDNN with prepacked weights, model.SIBLINGS as one matmul.
    "merged":                W + U M Vᵀ rounded to bf16, as a merged-weight serving stack samples (comparison only).

and the decode step over a static attended length (`StaticDecode`), eager or replayed as CUDA graphs, the drop-in
for sample.live_step that sample.generate picks by `decode`.

Choices, each marked *paper* or *ours*:
1. s = x A (K = d_in, r = 2 wide: FMA updates, `tl.dot` needs every dimension >= 16) in the GEMM's K loop for decode
   rows (*ours*), split over K across programs for more rows; partials summed in a fixed order (no atomics).
2. Tile configs are a size-bucketed table, not autotuned (*ours*): untuned without a GPU;
   `dev/bench_sample.py --what kernel` sweeps them per shape so the table can be corrected from measurements.
3. On CPU the packed layout streams weights ~2x faster than plain F.linear at decode batch sizes (*ours*;
   docs/BENCHMARKS.md section 2); siblings that read the same input run as one matmul over concatenated weights.
4. The packed copy is made per generate call (the base weights may change between calls, e.g. method="full") and
   skipped, with a warning, where it would take over half the free memory (*ours*).
5. oneDNN sums in another order than the trainer's MKL (*ours*, accepted): fp32 sampler-vs-trainer |Δ log p| stays
   within 1e-5 on the test model; SmolLM2's figures are in docs/BENCHMARKS.md section 3.
6. Static attended lengths are multiples of BUCKET = 256 slots (*ours*): a decode step reads up to 255 masked slots
   per row more than the live length needs, and a sampling call of up to 4,096 tokens captures at most ~17 graphs.
7. One CUDA graph at a time (*ours*): captured when the step enters a new bucket, after one eager warm-up step on a
   side stream, the previous bucket's graph freed first; each step's logits are read before the next replay.

Letters: M rows of x, K = d_in, Nout = d_out, r the adapter rank (R: ranks of siblings summed).
"""

import functools
import os
import warnings
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from model import SIBLINGS

try:  # Triton ships with the CUDA builds of torch on Linux; without it the plain path runs
    import triton
    import triton.language as tl
except ImportError:
    triton = None

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# -----------------------------------------------------------------------------
# CUDA: the Triton fused adapter-matmul (choice 1)


if triton is not None:

    @triton.jit
    def _xa_kernel(
        x_ptr,
        a_ptr,
        s_ptr,
        M,
        K,
        stride_xm,
        CHUNK,
        R: tl.constexpr,
        R_PAD: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        # partial s = x A in fp32 over one CHUNK of K (program_id(1)) for BLOCK_M rows, into s_ptr[chunk]: (SPLIT, M, R)
        # a broadcast-multiply-reduce, since tl.dot cannot take an r = 2 wide operand
        rm = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # int64: M * K can pass 2**31
        k_lo = tl.program_id(1) * CHUNK
        rk = tl.arange(0, BLOCK_K)
        rr = tl.arange(0, R_PAD)
        acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
        for k0 in range(0, CHUNK, BLOCK_K):
            kk = k_lo + k0 + rk
            x = tl.load(
                x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0
            ).to(tl.float32)  # (BLOCK_M, BLOCK_K)
            a = tl.load(a_ptr + kk[:, None] * R + rr[None, :], mask=(kk[:, None] < K) & (rr[None, :] < R), other=0.0)
            acc += tl.sum(x[:, :, None] * a[None, :, :], axis=1)  # (BLOCK_M, R_PAD)
        s_ptrs = s_ptr + tl.program_id(1) * M * R + rm[:, None] * R + rr[None, :]
        tl.store(s_ptrs, acc, mask=(rm[:, None] < M) & (rr[None, :] < R))

    @triton.jit
    def _lowrank_linear_kernel(
        x_ptr,
        w_ptr,
        b_ptr,
        a_ptr,
        s_ptr,
        u_ptr,
        y_ptr,
        M,
        N,
        K,
        SPLIT,
        stride_xm,
        stride_wn,
        stride_ym,
        HAS_BIAS: tl.constexpr,
        XA_FUSED: tl.constexpr,
        R: tl.constexpr,
        R_PAD: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
        UPCAST: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        # y = x Wᵀ (+ b) + s Uᵀ for one (BLOCK_M, BLOCK_N) tile; W is (N, K) row-major as nn.Linear stores it.
        # s = x A either summed from SPLIT partials (s_ptr: (SPLIT, M, R)) or, XA_FUSED, accumulated in the K loop
        pid = tl.program_id(0)
        num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        # grouped tile order: GROUP_M row-tiles sweep the columns together, so W tiles are reused from L2
        group = pid // (GROUP_M * num_n)
        first_m = group * GROUP_M
        size_m = min(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % (GROUP_M * num_n)) % size_m
        pid_n = (pid % (GROUP_M * num_n)) // size_m
        rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # int64: a long prefill's M * K passes 2**31
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        rr = tl.arange(0, R_PAD)
        x_ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :]  # (BLOCK_M, BLOCK_K)
        w_ptrs = w_ptr + rn[None, :] * stride_wn + rk[:, None]  # (BLOCK_K, BLOCK_N): a tile of Wᵀ
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        s = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(x_ptrs, mask=(rm[:, None] < M) & (rk[None, :] < K - k0), other=0.0)
            w = tl.load(w_ptrs, mask=(rk[:, None] < K - k0) & (rn[None, :] < N), other=0.0)
            if XA_FUSED:  # s += x A on this K tile, one rank at a time: no (BLOCK_M, BLOCK_K, R) temporary
                xf = x.to(tl.float32)
                for j in tl.static_range(R):
                    a_j = tl.load(a_ptr + (k0 + rk) * R + j, mask=rk < K - k0, other=0.0)  # (BLOCK_K,) fp32
                    s += tl.where(rr[None, :] == j, tl.sum(xf * a_j[None, :], axis=1)[:, None], 0.0)
            if UPCAST:  # the interpreter computes bf16 tl.dot wrongly: tests upcast; a GPU keeps bf16 tensor cores
                x, w = x.to(tl.float32), w.to(tl.float32)
            acc = tl.dot(x, w, acc, input_precision=PRECISION)  # fp32 accumulation
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        # epilogue in fp32: bias, then the adapter as R rank-1 updates (tl.dot needs K >= 16, here K = r)
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        for j in tl.static_range(R):
            if XA_FUSED:
                s_j = tl.sum(tl.where(rr[None, :] == j, s, 0.0), axis=1)  # (BLOCK_M,) column j of s
            else:
                s_j = tl.zeros((BLOCK_M,), dtype=tl.float32)
                for p in range(0, SPLIT):  # the partials in a fixed order: deterministic, no atomics
                    s_j += tl.load(s_ptr + p * M * R + rm * R + j, mask=rm < M, other=0.0)
            u_j = tl.load(u_ptr + rn * R + j, mask=rn < N, other=0.0)  # (BLOCK_N,) fp32
            acc += s_j[:, None] * u_j[None, :]
        y_ptrs = y_ptr + rm[:, None] * stride_ym + rn[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


# (max M, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages) for 16-bit inputs; fp32 halves BLOCK_K.
# Untuned (choice 2): decode shapes are memory-bound, so small M takes narrow N tiles (more CTAs streaming W) and a
# deep K; large M takes the usual 128x256 Hopper tile.
CONFIGS = (
    (16, 16, 32, 256, 1, 4, 4),
    (64, 64, 64, 128, 8, 4, 4),
    (256, 128, 128, 64, 8, 8, 3),
    (None, 128, 256, 64, 8, 8, 3),
)
XA_BLOCK_M, XA_BLOCK_K, XA_ITERS = 16, 128, 4  # the split s = x A: each program takes XA_ITERS K tiles (choice 1)
XA_VARIANTS = ("split", "serial", "fused")  # K split over programs / one program walks all of K / in the GEMM's K loop
XA_FUSED_MAX_M = 64  # "fused" up to this many rows, "split" above (choice 1; untuned)


def pick_config(M: int, dtype: torch.dtype) -> dict:
    for max_m, bm, bn, bk, gm, warps, stages in CONFIGS:
        if max_m is None or M <= max_m:
            bk = bk // 2 if dtype == torch.float32 else bk  # fp32 tiles are twice the bytes: keep shared memory
            return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm, num_warps=warps, num_stages=stages)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def lowrank_linear_triton(x, weight, bias, A, U, config=None, xa=None):
    """Same math as sample.lowrank_linear in Triton: the GEMM with the adapter in its epilogue, s = x A computed
    by `xa` (XA_VARIANTS; default by M): a split-K kernel before it ("split", "serial" = one split) or in its K loop."""
    K, Nout, r = x.shape[-1], weight.shape[0], A.shape[1]
    x2 = x.reshape(-1, K)  # (M, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    xa = xa or ("fused" if M <= XA_FUSED_MAX_M else "split")
    assert xa in XA_VARIANTS, xa
    r_pad = triton.next_power_of_2(r)
    split, s = 1, A  # "fused": no partials (s_ptr unused)
    if xa != "fused":
        tiles = triton.cdiv(K, XA_BLOCK_K)
        per = tiles if xa == "serial" else XA_ITERS  # K tiles per program
        split = triton.cdiv(tiles, per)
        s = torch.empty(split, M, r, device=x.device, dtype=torch.float32)  # (SPLIT, M, r) partial sums
        _xa_kernel[(triton.cdiv(M, XA_BLOCK_M), split)](
            x2, A, s, M, K, x2.stride(0), per * XA_BLOCK_K, R=r, R_PAD=r_pad, BLOCK_M=XA_BLOCK_M, BLOCK_K=XA_BLOCK_K
        )
    y = torch.empty(M, Nout, device=x.device, dtype=x.dtype)  # (M, Nout)
    cfg = dict(config or pick_config(M, x.dtype))
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(Nout, cfg["BLOCK_N"]),)
    upcast = interpreting() and x.dtype == torch.bfloat16
    precision = "ieee" if (x.dtype == torch.float32 or upcast) else "tf32"  # fp32 stays exact fp32 (no TF32)
    _lowrank_linear_kernel[grid](
        x2,
        weight,
        bias if bias is not None else weight,
        A,
        s,
        U,
        y,
        M,
        Nout,
        K,
        split,
        x2.stride(0),
        weight.stride(0),
        y.stride(0),
        HAS_BIAS=bias is not None,
        XA_FUSED=xa == "fused",
        R=r,
        R_PAD=r_pad,
        UPCAST=upcast,
        PRECISION=precision,
        **cfg,
    )
    return y.view(*x.shape[:-1], Nout)


# -----------------------------------------------------------------------------
# CPU: oneDNN-prepacked weights, sibling projections in one matmul (choices 3-5)


@functools.cache
def onednn_packs(dtype: torch.dtype) -> bool:
    """Whether this torch build and CPU can prepack `dtype` weights for oneDNN (fp32 on x86; bf16 needs AVX-512)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return False
    try:  # a capability probe: the reorder raises on CPUs without the instructions for this dtype
        Wp = torch.ops.mkldnn._reorder_linear_weight(torch.ones(16, 16, dtype=dtype), 2)
        y = torch.ops.mkldnn._linear_pointwise(torch.ones(2, 16, dtype=dtype), Wp, None, "none", [None], "")
    except RuntimeError:
        return False
    return bool((y == 16).all())


class PackedLinears:
    """Linears reading the same input, as one oneDNN matmul over prepacked concatenated weights:

        [y_1 y_2 ...] = x [W_1; W_2; ...]ᵀ + [b_1; b_2; ...] + (x [A_1 A_2 ...]) blockdiag(U_1, U_2, ...)ᵀ

    `part(i)` is module i's forward. The first sibling called with an input computes every sibling's output; the
    others, called with the same tensor (same object, unmodified), take their slice; once each has taken it the
    outputs are dropped. The low-rank path is fp32 as in sample.lowrank_linear (zero blocks add exactly); with fp32
    weights x A is computed by the same matmul, as R extra rows of W.
    """

    def __init__(self, parts, rows: int):
        W = torch.cat([p[0] for p in parts])  # (Nout, K), Nout = the siblings' outputs side by side
        sizes = [p[0].shape[0] for p in parts]
        self.bounds = [sum(sizes[:i]) for i in range(len(parts) + 1)]
        b = None
        if any(p[1] is not None for p in parts):
            b = torch.cat([p[1] if p[1] is not None else W.new_zeros(n) for p, n in zip(parts, sizes)])
        self.A = self.Ut = None
        low = [(i, A, U) for i, (_, _, A, U) in enumerate(parts) if A is not None]
        if low:
            self.A = torch.cat([A for _, A, _ in low], 1)  # (K, R), R = the siblings' ranks summed
            self.Ut = torch.zeros(self.A.shape[1], W.shape[0], dtype=self.A.dtype)  # (R, Nout): blockdiag(U_i)ᵀ
            c = 0
            for i, _, U in low:
                self.Ut[c : c + U.shape[1], self.bounds[i] : self.bounds[i + 1]] = U.T
                c += U.shape[1]
        # fp32 weights: s = x A rides along as R extra output columns of the same matmul (fp32 either way)
        self.fold = self.A is not None and W.dtype == self.A.dtype
        if self.fold:
            W = torch.cat([W, self.A.T])  # (Nout + R, K)
            b = None if b is None else torch.cat([b, b.new_zeros(self.A.shape[1])])
        self.Wp = torch.ops.mkldnn._reorder_linear_weight(W, rows)  # oneDNN's blocked layout for `rows` rows of x
        self.b = b
        self.x = self.y = None
        self.waiting = set()  # siblings that have not yet taken their slice of y

    def __call__(self, x):
        y = torch.ops.mkldnn._linear_pointwise(x, self.Wp, self.b, "none", [None], "")  # (..., Nout [+ R])
        if self.A is None:
            return y
        N = self.bounds[-1]
        y2 = y.view(-1, y.shape[-1])  # (M, Nout [+ R])
        if self.fold:
            s, y = y2[:, N:].clone(), y[..., :N]  # (M, R) fp32 (a copy: addmm_ may not read what it writes)
            y2[:, :N].addmm_(s, self.Ut)
        else:  # 16-bit packed weights: the low-rank path stays fp32, added after the cast
            s = x.reshape(-1, x.shape[-1]).to(self.A.dtype) @ self.A  # (M, R) fp32
            y += (s @ self.Ut).view(y.shape).to(y.dtype)
        return y  # (..., Nout)

    def part(self, i: int, x):
        if len(self.bounds) == 2:  # a lone linear: nothing to share
            return self(x)
        if self.x is not x or self.version != x._version or i not in self.waiting:
            self.x, self.version, self.y = x, x._version, self(x)
            self.waiting = set(range(len(self.bounds) - 1))
        y = self.y[..., self.bounds[i] : self.bounds[i + 1]]  # (..., N_i), a strided view
        self.waiting.discard(i)
        if not self.waiting:
            self.x = self.y = None
        return y


def packed_groups(model):
    """Sibling modules to pack together: model.SIBLINGS of every layer (q/k/v, o, gate/up, down), and the head."""
    groups = []
    for layer in model.model.layers:
        for parent, names in SIBLINGS:
            groups.append([getattr(getattr(layer, parent), n) for n in names])
    return groups + [[model.lm_head]]


def available_memory() -> int | None:
    """Bytes the kernel says can be allocated without swapping (Linux's MemAvailable); None where it does not say."""
    try:
        with open("/proc/meminfo") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None
    return kb * 1024


def uses_onednn(model, mode: str) -> bool:
    """The packed CPU path (choices 3, 4), unless its copy of the weights would take over half the free memory."""
    W = model.model.embed_tokens.weight
    if not (mode == "auto" and W.device.type == "cpu" and onednn_packs(W.dtype)):
        return False
    need = sum(m.weight.numel() * m.weight.element_size() for g in packed_groups(model) for m in g)
    free = available_memory()
    if free is not None and need > free / 2:
        warnings.warn(
            f"sampling with plain F.linear: packing the weights for oneDNN would copy {need / 2**30:.1f} GiB with "
            f"{free / 2**30:.1f} GiB free (pass mode='torch' to silence this)",
            stacklevel=4,  # attributed to the line in generate() that swaps the forwards
        )
        return False
    return True


# -----------------------------------------------------------------------------
# swapping the linears' forwards for one generate call


def check_mode(mode: str, device: torch.device):
    if mode == "triton" and triton is None:
        raise ValueError("mode='triton' needs the triton package (Linux + CUDA builds of torch ship it); use 'auto'")
    if mode == "triton" and device.type != "cuda" and not interpreting():
        raise ValueError("mode='triton' needs a CUDA device, or TRITON_INTERPRET=1 to run the kernel on CPU (slowly)")


def uses_triton(mode: str, W: torch.Tensor) -> bool:
    return mode == "triton" or (mode == "auto" and W.is_cuda and triton is not None and W.dtype in KERNEL_DTYPES)


@contextmanager
def sampling_forwards(model, mode="auto", rows=1):
    """Swap linear forwards for the sampling path of `mode` for the duration of one generate call.

    On CPU with "auto": every linear of the decoder and the head, packed by oneDNN for `rows` rows, siblings fused.
    Otherwise only adapter modules (anything with `.lowrank()`) are swapped: "auto"/"triton" for the Triton kernel
    where it runs, "torch" (and "auto" elsewhere) for sample.lowrank_linear, "merged" for F.linear with bf16-rounded
    merged weights. Disabled modules (`.enabled == False`, the KL reference) compute exactly the base linear.
    Yields the number of modules swapped.
    """
    from sample import lowrank_linear, sampling_weights  # the plain path (sample.py imports this file at its top)

    check_mode(mode, model.model.embed_tokens.weight.device)
    swapped = []
    try:
        with torch.no_grad():
            if uses_onednn(model, mode):
                for group in packed_groups(model):
                    parts = [sampling_weights(m, mode) for m in group]
                    if any(p is None for p in parts):  # an unknown module type: it keeps its own forward
                        continue
                    packed = PackedLinears(parts, rows)
                    for i, m in enumerate(group):
                        m.forward = functools.partial(packed.part, i)
                        swapped.append(m)
            done = set(swapped)
            for m in model.modules():  # adapter modules not packed above (every one, off the oneDNN path)
                if m in done or not (callable(getattr(m, "lowrank", None)) and getattr(m, "enabled", True)):
                    continue
                W, b, A, U = sampling_weights(m, mode)
                if A is None:  # merged
                    m.forward = functools.partial(F.linear, weight=W, bias=b)
                else:
                    fn = lowrank_linear_triton if uses_triton(mode, W) else lowrank_linear
                    m.forward = functools.partial(fn, weight=W, bias=b, A=A, U=U)
                swapped.append(m)
        yield len(swapped)
    finally:
        for m in swapped:  # drop the instance attribute: the class's forward is back
            del m.forward


# -----------------------------------------------------------------------------
# the decode step over a static attended length: no host sync, fixed shapes, CUDA-graph replay (choices 6, 7)

BUCKET = 256  # static attended lengths are multiples of this many slots (choice 6)


class StaticDecode:
    """sample.live_step's drop-in: model(x, pos + t, start = Lp + t) over slots [0, S), S = Lp + t + 1 rounded up to
    BUCKET (capped at the cache), the write slot `start` a 0-dim device tensor (model.py's static-length contract).

    how="static" runs it eagerly (the form the CPU tests check against live_step), "graph" captures one
    torch.cuda.CUDAGraph per S and replays it, "compile" hands it to torch.compile(mode="reduce-overhead").
    """

    def __init__(self, model, cache, key_mask, pos, Lp: int, how: str = "static"):
        assert how in ("static", "graph", "compile"), how
        self.model, self.cache, self.key_mask, self.Lp, self.how = model, cache, key_mask, Lp, how
        dev = key_mask.device
        self.x = torch.zeros(pos.shape[0], 1, dtype=torch.long, device=dev)  # (n, 1) the step's input tokens
        self.pos0, self.pos = pos, pos.clone()  # (n, 1) first generated position, and this step's
        self.start = torch.zeros((), dtype=torch.long, device=dev)  # the slot this step writes
        self.graph = None  # (S, torch.cuda.CUDAGraph, its logits) of the current bucket (choice 7)
        if how == "compile":
            self.compiled = torch.compile(self.forward, mode="reduce-overhead")

    def forward(self, key_mask):
        return self.model(self.x, self.pos, cache=self.cache, start=self.start, key_mask=key_mask)[:, -1]  # (n, V)

    def __call__(self, x, t: int):
        S = min(-(-(self.Lp + t + 1) // BUCKET) * BUCKET, self.key_mask.shape[1])
        self.x.copy_(x)  # device-side updates of the static inputs: no host sync
        torch.add(self.pos0, t, out=self.pos)
        self.start.fill_(self.Lp + t)
        if self.how == "static":
            return self.forward(self.key_mask[:, :S])
        if self.how == "compile":
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's logits have been read
            return self.compiled(self.key_mask[:, :S])
        if self.graph is None or self.graph[0] != S:
            self.graph = None  # free the last bucket's graph and its memory before capturing the next
            try:
                self.graph = (S, *self.capture(S))
            except RuntimeError as e:  # a capture this GPU/driver refuses costs speed, never the run: same math eagerly
                warnings.warn(
                    f"CUDA-graph capture failed ({str(e)[:200]}); decoding eagerly (decode='static')", stacklevel=2
                )
                self.how = "static"
                return self.forward(self.key_mask[:, :S])
        _, graph, logits = self.graph
        graph.replay()
        return logits

    def capture(self, S: int):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (Triton compiles, cuBLAS picks); it writes what the replay will write
            self.forward(self.key_mask[:, :S])
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self.forward(self.key_mask[:, :S])  # recorded, not run: replay() runs it
        return graph, logits
