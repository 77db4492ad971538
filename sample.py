"""
Batched KV-cached sampling with the adapter applied unmerged, so the policy that samples is the policy that trains.

    every adapted linear while sampling:  y = x Wᵀ + b + (x A) Uᵀ,   A = V Mᵀ   (ΔW = U M Vᵀ, rank r)

`tinylora.py`'s modules expose `.lowrank() -> (U, M, V)`; `sampling_forwards` swaps each module's forward for
`lowrank_linear` for one `generate` call (v is fixed while sampling, so A = V Mᵀ is computed once per call). On CUDA
the Triton kernel below runs it: a tiny kernel for s = x A (fp32), then a tiled GEMM x Wᵀ whose epilogue adds the
bias and s Uᵀ as r rank-1 FMA updates in fp32. On CPU every linear runs through oneDNN with prepacked weights
(choice 10); elsewhere, or with mode="torch", the same math runs in plain PyTorch.

Choices, each marked *paper* (what the paper's stack did) or *ours*:
1. The adapter is applied unmerged while sampling (*ours*). The paper sampled with vLLM from merged bf16 weights, where
   a tiny ΔW mostly rounds away, and corrected the mismatch with importance sampling; mode="merged" reproduces that
   for comparison only.
2. A = V Mᵀ is folded once per call (*ours*): one (d_in, r) matrix instead of two contractions per token. In fp32 this
   moves the result by float rounding only (the sampler-vs-trainer test bounds it at 1e-5 in log-prob).
3. Split kernel, not fused into the K loop (*ours*): fusing s = x A into the GEMM's K loop adds registers to every tile
   and is known to lose at large M; s is ~r/N of the GEMM's work. The rank-r contractions (K = r = 2) are FMA updates
   because `tl.dot` needs every dimension ≥ 16.
4. Tile configs are a size-bucketed table, not autotuned (*ours*): no GPU was available to tune them;
   `dev/bench_sample.py --what kernel` sweeps them per shape so the table can be corrected from measurements.
5. Sampling (*ours*, the usual semantics): logits / temperature, then top-k, then top-p over the k survivors (the
   smallest prefix of the sorted survivors whose mass reaches top_p). The draw inverts the cumulative distribution:
   one uniform u per row, the first candidate whose fp64 running mass passes u (exact up to the fp32 rounding of p,
   no host sync; a Gumbel-max draw needs an exponential per vocabulary entry, 20 ms a step at 16 × 49k on 2 CPU
   cores). Only top_p < 1 with top_k = 0 sorts the full vocabulary.
6. `logp` is the log-probability of each sampled token under the distribution it was drawn from: log_softmax of the
   tempered, top-k/top-p-filtered logits. With temperature 1 and no filtering that is exactly the model's
   log-softmax, which GRPO's importance ratio needs. Greedy (temperature 0) returns the plain temperature-1
   log-softmax of the chosen token.
7. Prompts are left-padded to a common length with per-row positions (the i-th real token has position i), so all
   rows decode in lock-step into one preallocated cache; each step attends over the live slots only (*ours*).
8. A prompt sampled G times is prefilled once, into cache row i*G, and its keys/values are copied to its other G-1 rows
   (*ours*). Rows are prompt-major: row i*G + g is sample g of prompt i.
9. Finished rows keep computing (lock-step batch) but emit pad_id with mask False; the all-finished check is a host
   sync, so on CUDA it runs every SYNC_EVERY steps (*ours*). torch.compile / CUDA graphs for the decode step are not
   used: they need a static attended length, which conflicts with attending over the live length only, and could not
   be measured here.
10. On CPU every linear runs through oneDNN with its weight prepacked for the decode batch, and sibling projections
   that read the same input (q/k/v, gate/up) run as one matmul over their concatenated weights (*ours*). At 16 rows
   a decode step streams every weight once; plain `F.linear` reaches 2.5-4 GB/s of the ~14-16 GB/s a plain read
   gets on the 2-core machine, the packed layout 5.5-6 GB/s (`dev/bench_sample.py --what gemm`). The packed copy
   is made per generate call and dropped after it, so sampling holds the weights twice (the base weights may
   change between calls, e.g. method="full"); where that copy would take over half the free memory, the plain path
   runs with a warning. Same math in fp32, but oneDNN sums in another order than the
   trainer's MKL: on SmolLM2 (30 layers) the sampler-vs-trainer max |Δ log p| is 4-6e-5 against 2e-5 with
   mode="torch" (plain F.linear); the tiny test model stays within 1e-5 either way.

Letters: N rows (= prompts × G), P prompts, G samples per prompt, T new tokens, S cache slots, Lp padded prompt
length, V vocab, M rows of x in a linear, K = d_in, Nout = d_out, r the adapter rank.
"""

import argparse
import functools
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

try:  # Triton ships with the CUDA builds of torch on Linux; without it the torch path runs
    import triton
    import triton.language as tl
except ImportError:
    triton = None

MODES = ("auto", "torch", "triton", "merged")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SYNC_EVERY = 8  # decode steps between all-finished checks on CUDA (a host sync); CPU checks every step


@dataclass
class Rollouts:
    prompts: list  # list[list[int]], one per row (prompt-major: row i*G + g is sample g of prompt i)
    tokens: torch.Tensor  # (N, T) long, generated ids right-padded with pad_id
    mask: torch.Tensor  # (N, T) bool, True on generated tokens (including the stop token)
    logp: torch.Tensor  # (N, T) fp32, log-prob of each token under the distribution it was drawn from (0 on padding)
    finish: list  # list[str], "stop" | "length" per row


# -----------------------------------------------------------------------------
# the adapted linear while sampling: reference (torch) and fused (Triton) paths


def lowrank_linear_torch(x, weight, bias, A, U):
    """y = x Wᵀ + b + (x A) Uᵀ with the low-rank path in fp32 (the slow, obvious path the kernel must match)."""
    y = F.linear(x, weight, bias)  # (..., Nout)
    s = x.to(A.dtype) @ A  # (..., r) fp32 (fp64 for a float64 model, as tinylora.py's forward)
    if y.dtype == torch.float32:  # add in place: no extra (M, Nout) temporary on the CPU hot path
        y.view(-1, y.shape[-1]).addmm_(s.view(-1, s.shape[-1]), U.T)
        return y
    return y + (s @ U.T).to(y.dtype)


if triton is not None:

    @triton.jit
    def _xa_kernel(
        x_ptr,
        a_ptr,
        s_ptr,
        M,
        K,
        stride_xm,
        R: tl.constexpr,
        R_PAD: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        # s = x A in fp32: a broadcast-multiply-reduce, since tl.dot cannot take an r = 2 wide operand
        rm = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # int64: M * K can pass 2**31
        rk = tl.arange(0, BLOCK_K)
        rr = tl.arange(0, R_PAD)
        acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            x = tl.load(
                x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0
            ).to(tl.float32)  # (BLOCK_M, BLOCK_K)
            a = tl.load(a_ptr + kk[:, None] * R + rr[None, :], mask=(kk[:, None] < K) & (rr[None, :] < R), other=0.0)
            acc += tl.sum(x[:, :, None] * a[None, :, :], axis=1)  # (BLOCK_M, R_PAD)
        tl.store(s_ptr + rm[:, None] * R + rr[None, :], acc, mask=(rm[:, None] < M) & (rr[None, :] < R))

    @triton.jit
    def _lowrank_linear_kernel(
        x_ptr,
        w_ptr,
        b_ptr,
        s_ptr,
        u_ptr,
        y_ptr,
        M,
        N,
        K,
        stride_xm,
        stride_wn,
        stride_ym,
        HAS_BIAS: tl.constexpr,
        R: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
        UPCAST: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        # y = x Wᵀ (+ b) + s Uᵀ for one (BLOCK_M, BLOCK_N) tile; W is (N, K) row-major as nn.Linear stores it
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
        x_ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :]  # (BLOCK_M, BLOCK_K)
        w_ptrs = w_ptr + rn[None, :] * stride_wn + rk[:, None]  # (BLOCK_K, BLOCK_N): a tile of Wᵀ
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(x_ptrs, mask=(rm[:, None] < M) & (rk[None, :] < K - k0), other=0.0)
            w = tl.load(w_ptrs, mask=(rk[:, None] < K - k0) & (rn[None, :] < N), other=0.0)
            if UPCAST:  # the interpreter computes bf16 tl.dot wrongly: tests upcast; a GPU keeps bf16 tensor cores
                x, w = x.to(tl.float32), w.to(tl.float32)
            acc = tl.dot(x, w, acc, input_precision=PRECISION)  # fp32 accumulation
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        # epilogue in fp32: bias, then the adapter as R rank-1 updates (tl.dot needs K >= 16, here K = r)
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        for j in tl.static_range(R):
            s_j = tl.load(s_ptr + rm * R + j, mask=rm < M, other=0.0)  # (BLOCK_M,) fp32
            u_j = tl.load(u_ptr + rn * R + j, mask=rn < N, other=0.0)  # (BLOCK_N,) fp32
            acc += s_j[:, None] * u_j[None, :]
        y_ptrs = y_ptr + rm[:, None] * stride_ym + rn[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


# (max M, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages) for 16-bit inputs; fp32 halves BLOCK_K.
# Untuned (choice 4): decode shapes are memory-bound, so small M takes narrow N tiles (more CTAs streaming W) and a
# deep K; large M takes the usual 128x256 Hopper tile.
CONFIGS = (
    (16, 16, 32, 256, 1, 4, 4),
    (64, 64, 64, 128, 8, 4, 4),
    (256, 128, 128, 64, 8, 8, 3),
    (None, 128, 256, 64, 8, 8, 3),
)
XA_BLOCK_M, XA_BLOCK_K = 16, 128


def pick_config(M: int, dtype: torch.dtype) -> dict:
    for max_m, bm, bn, bk, gm, warps, stages in CONFIGS:
        if max_m is None or M <= max_m:
            bk = bk // 2 if dtype == torch.float32 else bk  # fp32 tiles are twice the bytes: keep shared memory
            return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm, num_warps=warps, num_stages=stages)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def lowrank_linear_triton(x, weight, bias, A, U, config=None):
    """The fused path: same math as lowrank_linear_torch, two Triton launches (s = x A, then GEMM + epilogue)."""
    K, Nout, r = x.shape[-1], weight.shape[0], A.shape[1]
    x2 = x.reshape(-1, K)  # (M, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    s = torch.empty(M, r, device=x.device, dtype=torch.float32)  # (M, r)
    _xa_kernel[(triton.cdiv(M, XA_BLOCK_M),)](
        x2, A, s, M, K, x2.stride(0), R=r, R_PAD=triton.next_power_of_2(r), BLOCK_M=XA_BLOCK_M, BLOCK_K=XA_BLOCK_K
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
        s,
        U,
        y,
        M,
        Nout,
        K,
        x2.stride(0),
        weight.stride(0),
        y.stride(0),
        HAS_BIAS=bias is not None,
        R=r,
        UPCAST=upcast,
        PRECISION=precision,
        **cfg,
    )
    return y.view(*x.shape[:-1], Nout)


def lowrank_linear(x, weight, bias, A, U, mode="auto"):
    """y = x Wᵀ + b + (x A) Uᵀ: Triton on CUDA ("auto") or when forced ("triton"), PyTorch otherwise."""
    if mode == "triton" or (mode == "auto" and x.is_cuda and triton is not None and x.dtype in KERNEL_DTYPES):
        return lowrank_linear_triton(x, weight, bias, A, U)
    return lowrank_linear_torch(x, weight, bias, A, U)


# -----------------------------------------------------------------------------
# CPU: oneDNN-prepacked weights, sibling projections in one matmul (choice 10)

SIBLINGS = (  # per decoder layer: the linears that read the same input, computed together on the packed CPU path
    ("self_attn", ("q_proj", "k_proj", "v_proj")),
    ("self_attn", ("o_proj",)),
    ("mlp", ("gate_proj", "up_proj")),
    ("mlp", ("down_proj",)),
)


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
    outputs are dropped. The low-rank path is fp32 as in lowrank_linear_torch (zero blocks add exactly); with fp32
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


def sampling_weights(m, mode: str):
    """(W, b, A, U) of a linear-like module as sampling sees it, or None if it is not one we know.

    An enabled adapter (`.lowrank()`) gives A = V Mᵀ and U (choice 2), or with mode "merged" the bf16-rounded merged
    W. A disabled adapter (the KL reference) or a plain nn.Linear gives its own W and b with A = U = None.
    """
    W = getattr(m, "weight", None)
    if not isinstance(W, torch.Tensor) or W.dim() != 2:
        return None
    low = callable(getattr(m, "lowrank", None))
    if not (low or isinstance(m, torch.nn.Linear)):
        return None
    b = m.bias.detach() if getattr(m, "bias", None) is not None else None
    if not (low and getattr(m, "enabled", True)):
        return W.detach(), b, None, None
    dt = torch.promote_types(W.dtype, torch.float32)  # the low-rank path's dtype
    U, Mr, V = (t.to(dt) for t in m.lowrank())  # (d_out, r), (r, r), (d_in, r)
    if mode == "merged":
        return (W.to(dt) + U @ Mr @ V.T).to(torch.bfloat16).to(W.dtype), b, None, None  # (d_out, d_in)
    return W.detach(), b, (V @ Mr.T).contiguous(), U.contiguous()  # A = V Mᵀ: (d_in, r), fold M once


def packed_groups(model):
    """Lists of sibling modules to pack together: q/k/v, o, gate/up, down of every layer, and the head."""
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
    """The packed CPU path (choice 10), unless its copy of the weights would take over half the free memory."""
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
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of {MODES}")
    if mode == "triton" and triton is None:
        raise ValueError("mode='triton' needs the triton package (Linux + CUDA builds of torch ship it); use 'auto'")
    if mode == "triton" and device.type != "cuda" and not interpreting():
        raise ValueError("mode='triton' needs a CUDA device, or TRITON_INTERPRET=1 to run the kernel on CPU (slowly)")


@contextmanager
def sampling_forwards(model, mode="auto", rows=1):
    """Swap linear forwards for the sampling path for the duration of one generate call.

    On CPU with "auto" (choice 10): every linear of the decoder and the head, packed by oneDNN for `rows` rows, with
    sibling projections fused. Otherwise only adapter modules (anything with `.lowrank()`) are swapped:
    "auto"/"torch"/"triton": lowrank_linear with A = V Mᵀ and U precomputed once (v is fixed while sampling).
    "merged": F.linear with W + U M Vᵀ rounded to bf16, as a merged-weight serving stack would (comparison only).
    Disabled modules (`.enabled == False`, the KL reference) compute exactly the base linear.
    """
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
                    m.forward = functools.partial(lowrank_linear, weight=m.weight, bias=b, A=A, U=U, mode=mode)
                swapped.append(m)
        yield len(swapped)
    finally:
        for m in swapped:  # drop the instance attribute: the class's forward is back
            del m.forward


# -----------------------------------------------------------------------------
# sampling one token per row


def filter_logits(logits, temperature=1.0, top_k=0, top_p=1.0):
    """Tempered, truncated logits over the candidates, and the candidates' ids (None = the whole vocabulary).

    logits (N, V) -> (N, C) fp32 with removed candidates at -inf, ids (N, C) long or None. top-k first, then top-p
    keeps the smallest prefix of the (descending) survivors whose probability mass reaches top_p.
    """
    z = logits.float() / temperature if temperature != 1.0 else logits.float()  # (N, V)
    ids = None
    if top_k and top_k < z.shape[-1]:
        z, ids = z.topk(top_k, dim=-1)  # (N, k), sorted descending
    if top_p < 1.0:
        if ids is None:  # top-p alone: the one configuration that sorts the whole vocabulary
            z, ids = z.sort(dim=-1, descending=True)
        p = z.softmax(-1)  # (N, C)
        before = p.cumsum(-1) - p  # mass strictly above each candidate
        z = z.masked_fill(before >= top_p, float("-inf"))  # the first candidate always survives
    return z, ids


def sample_next(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """Next token (N,) and its log-prob (N,) under the distribution it was drawn from (module docstring, choice 6)."""
    if temperature == 0:  # greedy; logp is the temperature-1 log-softmax of the argmax
        tok = logits.argmax(-1)  # (N,)
        return tok, logits.float().log_softmax(-1).gather(-1, tok[:, None])[:, 0]
    z, ids = filter_logits(logits, temperature, top_k, top_p)
    logp = z.log_softmax(-1)  # (N, C)
    cdf = logp.exp().double().cumsum(-1)  # (N, C) running mass in fp64
    total = cdf[:, -1:]  # (N, 1), 1 up to rounding
    u = torch.rand(total.shape, generator=generator, dtype=torch.float64, device=total.device) * total
    u = torch.minimum(u, total.nextafter(torch.zeros_like(total)))  # u < total even if the product rounds up
    j = torch.searchsorted(cdf, u, right=True)  # (N, 1): first candidate whose running mass passes u, so p_j > 0
    tok = j if ids is None else ids.gather(-1, j)
    return tok[:, 0], logp.gather(-1, j)[:, 0]


# -----------------------------------------------------------------------------
# generate


def check_args(prompts, G, max_new_tokens, temperature, top_k, top_p, vocab_size):
    if not prompts or not all(isinstance(p, (list, tuple)) and len(p) > 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token-id lists (tokenize the prompts first)")
    if not all(isinstance(t, int) and 0 <= t < vocab_size for p in prompts for t in p):
        raise ValueError(f"prompt token ids must be ints in [0, {vocab_size}) for this model's vocabulary")
    if G < 1 or max_new_tokens < 1:
        raise ValueError(f"G ({G}) and max_new_tokens ({max_new_tokens}) must be at least 1")
    if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0, top_k >= 0, 0 < top_p <= 1; got {temperature}, {top_k}, {top_p}")


@torch.no_grad()  # not inference_mode: the returned tensors are used later next to tensors that need grad
def generate(
    model,
    prompts,
    *,
    G=1,
    max_new_tokens=256,
    temperature=1.0,
    top_k=0,
    top_p=1.0,
    stop_ids=(),
    pad_id=0,
    generator=None,
    mode="auto",
) -> Rollouts:
    """Sample G completions of every prompt (token-id lists) in one lock-step batch through a preallocated KV cache.

    temperature 0 is greedy. Returns Rollouts; see the module docstring for the logp definition (choice 6).
    """
    dev = model.model.embed_tokens.weight.device
    check_args(prompts, G, max_new_tokens, temperature, top_k, top_p, model.cfg.vocab_size)
    check_mode(mode, dev)
    if generator is not None and generator.device.type != dev.type:
        raise ValueError(
            f"the generator is on {generator.device} but the model on {dev}: make it on the model's device"
        )
    P, T = len(prompts), max_new_tokens
    N = P * G
    lens = torch.tensor([len(p) for p in prompts], device=dev)  # (P,)
    Lp = max(len(p) for p in prompts)
    idx = torch.tensor([[pad_id] * (Lp - len(p)) + list(p) for p in prompts], device=dev)  # (P, Lp), left-padded
    key_mask = torch.ones(N, Lp + T, dtype=torch.bool, device=dev)  # (N, S): generated slots are always real
    key_mask[:, :Lp] = (torch.arange(Lp, device=dev) >= Lp - lens[:, None]).repeat_interleave(G, 0)  # pads off
    cache = model.new_cache(N, Lp + T)  # k, v: (L, N, Hkv, S, D)
    stop = torch.tensor(sorted(set(stop_ids)) or [-1], device=dev)
    tokens = torch.full((N, T), pad_id, dtype=torch.long, device=dev)
    mask = torch.zeros(N, T, dtype=torch.bool, device=dev)
    logp = torch.zeros(N, T, dtype=torch.float32, device=dev)
    done = torch.zeros(N, dtype=torch.bool, device=dev)
    pos = lens.repeat_interleave(G)[:, None]  # (N, 1): the position of the first generated token
    sync_every = SYNC_EVERY if dev.type == "cuda" else 1
    with sampling_forwards(model, mode, rows=N):
        # 1) prefill each prompt once, into cache rows 0, G, 2G, ... (a strided view of the big cache)
        rows = slice(None, None, G)
        sub = type(cache)(cache.k[:, rows], cache.v[:, rows])
        h = model(idx, cache=sub, start=0, key_mask=key_mask[rows, :Lp], hidden_only=True)  # (P, Lp, C)
        logits = model.lm_head(h[:, -1]).repeat_interleave(G, 0)  # (N, V): last position only, fanned out
        # 2) copy each prompt's keys/values to its other G-1 rows (choice 8)
        if G > 1:
            for buf in (cache.k, cache.v):
                b = buf.view(buf.shape[0], P, G, *buf.shape[2:])  # (L, P, G, Hkv, S, D)
                b[:, :, 1:, :, :Lp] = b[:, :, :1, :, :Lp]
        # 3) decode: sample, record, feed the token back; finished rows emit padding (choice 9)
        t_end = T
        for t in range(T):
            tok, lp = sample_next(logits, temperature, top_k, top_p, generator)  # (N,), (N,)
            tokens[:, t] = tok.masked_fill(done, pad_id)
            logp[:, t] = lp.masked_fill(done, 0.0)
            mask[:, t] = ~done
            done |= torch.isin(tok, stop)
            if t == T - 1 or ((t + 1) % sync_every == 0 and bool(done.all())):
                t_end = t + 1
                break
            x = tokens[:, t : t + 1]  # (N, 1)
            logits = model(x, pos + t, cache=cache, start=Lp + t, key_mask=key_mask[:, : Lp + t + 1])[:, -1]
    finish = ["stop" if d else "length" for d in done.tolist()]
    return Rollouts(
        prompts=[list(p) for p in prompts for _ in range(G)],
        tokens=tokens[:, :t_end],
        mask=mask[:, :t_end],
        logp=logp[:, :t_end],
        finish=finish,
    )


# -----------------------------------------------------------------------------
# python sample.py --model PATH_OR_ID --prompt "..." [--adapter FILE]: a few samples of one prompt


if __name__ == "__main__":
    from model import Tokenizer, load_model

    p = argparse.ArgumentParser(description="Sample completions of one chat prompt with the batched sampler.")
    p.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct", help="local folder or Hub id")
    p.add_argument("--adapter", default=None, help="a tinylora adapter file to apply while sampling")
    p.add_argument("--prompt", default="What is 7 times 8?")
    p.add_argument("--G", type=int, default=4, help="samples of the prompt")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mode", default="auto", choices=MODES)
    args = p.parse_args()
    model, tok = load_model(args.model), Tokenizer(args.model)
    if args.adapter:
        import export

        export.load_adapter(args.adapter, model)
    dev = model.model.embed_tokens.weight.device
    ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}])
    out = generate(
        model,
        [ids],
        G=args.G,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        stop_ids=tok.stop_ids,
        pad_id=tok.pad_id,
        mode=args.mode,
        generator=torch.Generator(dev).manual_seed(args.seed),
    )
    for g in range(args.G):
        n = int(out.mask[g].sum())
        print(f"--- sample {g} ({out.finish[g]}, {n} tokens, mean logp {out.logp[g, :n].mean():.3f})")
        print(tok.decode(out.tokens[g, :n].tolist()))
