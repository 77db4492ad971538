"""
TinyLoRA (and the baselines it is compared with): adapt a frozen linear layer W with a handful of numbers.

    R  = Σ_i v_i P_i                          # (r, r): v ∈ R^u is all that trains, P_i are fixed random
    ΔW = U Σ R Vᵀ                             # (d_out, d_in), rank ≤ r: U Σ Vᵀ is the top-r SVD of W, frozen
    y  = x Wᵀ + b + ((x V) (Σ R)ᵀ) Uᵀ          # the low-rank path never forms ΔW

Every adapter module exposes that update as `lowrank() -> (U, M, V)` with ΔW = U M Vᵀ (M = Σ R here), so the
fused sampling kernel, merging and the PEFT-LoRA export all consume one form. `tie` modules share one v, so
a 7B model with 196 adapted matrices trains ceil(196 / tie) · u numbers: `--u 1 --tie 16` is the paper's 13.

Choices, each marked *paper* (what "Learning to Reason in 13 Parameters" says), *ref* (what a reference
implementation does) or *ours* (the paper is silent):
1. r = 2 and the SVD is taken once, in fp32, of the weights as loaded, then frozen (*paper*).
2. Singular vectors have a sign ambiguity; we flip each pair (u_j, v_j) so the largest-|.| entry of u_j is
   positive, so one v rebuilds one W' on any machine and SVD library (*ours*). The `peft` variant keeps
   whatever LAPACK returns, exactly as PEFT does (*ref*).
3. The top-r SVD is computed by a deterministic block Krylov (Lanczos) iteration (`svd="fast"`, default): only
   products with W, ~30 per matrix, instead of a full decomposition. dev/bench_svd.py measures it against a
   float64 SVD: on SmolLM2-135M it is ~2x faster than `torch.linalg.svd` on CPU and closer to the float64
   answer than the fp32 full SVD is (a test checks agreement too). `svd="full"` (PEFT's) and `svd="lowrank"`
   (`torch.svd_lowrank(q=r, niter=10)`, our reading of the official fork's call) are switchable (*ours*).
4. P_i ~ N(0, 1/r), entrywise (*ours*: the paper does not give the distribution). 1/r is PEFT's choice; with
   it the `paper` and `peft` variants differ only in where Σ sits, so a learning rate carries over.
5. P of module k is drawn from a CPU generator seeded with `seed * 1_000_003 + k` (k = the module's index in
   depth order), so an adapter file needs only v, the seed and the settings (*ours*). `peft` uses its
   `projection_seed + k` (*ref*).
6. v starts at zero, so step 0 is exactly the base model (*paper*); it stays fp32 for the optimizer and is
   stored in fp32, bf16 or fp16 (the paper's bit-budget study) (*paper*).
7. Tying order `tiled` (default, the paper's better one): modules in depth order (layer 0's q,k,v,o,gate,up,
   down, then layer 1's, …) cut into runs of `tie`. `structured`: modules in type order (every layer's q, then
   every layer's k, …) cut into runs of `tie`, so a group is one type in nearby layers (*paper*; how a
   remainder is cut is ours: the last group is short, which keeps the count ceil(n / tie) · u).
8. Variants: `paper` W + U Σ R Vᵀ; `peft` W + (U√Σ) R (√Σ Vᵀ), P ~ N(0, 1/r) seeded per module, full SVD,
   raw signs (*ref*: PEFT's TinyLoraConfig; its `weight_tying` fraction makes G groups of n // G with the
   remainder in the last: the same groups as our `tie` whenever tie divides n); `verl` W + (α/r) U R Σ Vᵀ
   with R = Σ v_i P_i / √u, P ~ N(0, 1), `torch.svd_lowrank(q=r, niter=10)` and v ~ N(0, std 1e-5) (*ref*: the
   official training code as described to us; we have not read its source, and read "N(0, 1e-5)" as a
   standard deviation). With q = r that randomized SVD can miss the top-r subspace of real weights by a lot
   (dev/bench_svd.py prints by how much).
9. Baselines: LoRA-XS is the case u = r², P = the standard basis (R itself trains), tie = 1 (*paper*); LoRA has
   A ∈ R^{r×d_in} (kaiming-uniform, as nn.Linear and PEFT), B = 0, ΔW = (α/r) B A with α = r by default so the
   scale is 1 (*ours*); `full` unfreezes every base weight.
10. Trainable tensors live in the `Adapter`, not in the model's state_dict, so the base keys stay exactly the
   checkpoint's (*ours*). Attach after moving the model to its device.
11. Adapter files are safetensors: v in the storage dtype + metadata (settings, base model id, a fingerprint
   of the base weights, a sha256 of the tensors), so loading onto another base or a damaged file fails with a
   sentence, not a wrong model (*ours*).

Letters: r rank, u size of v, n adapted modules, d_out × d_in the shape of W, G number of v groups.
"""

import argparse
import contextlib
import hashlib
import json
import math
import os
import shutil

import torch
import torch.nn as nn
import torch.nn.functional as F

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
METHODS = ("tinylora", "loraxs", "lora", "full")
VARIANTS = ("paper", "peft", "verl")
ORDERS = ("tiled", "structured")
SVDS = ("fast", "full", "lowrank")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FORMAT = "tinylora-adapter/1"


# -----------------------------------------------------------------------------
# the top-r SVD, computed once per module


def canonical_sign(U, V):
    """Flip each pair (U[:, j], V[:, j]) so the largest-magnitude entry of U[:, j] is positive (choice 2)."""
    i = U.abs().argmax(dim=0)  # (r,)
    s = torch.sign(U[i, torch.arange(U.shape[1], device=U.device)])
    s[s == 0] = 1
    return U * s, V * s


def _next_block(K, GK, b):
    X = GK[:, -b:]  # next Krylov block, orthogonalised twice against the basis (fp64 Gram-Schmidt)
    X = X - K @ (K.T @ X)
    X = X - K @ (K.T @ X)
    return torch.linalg.qr(X)[0]  # (d, b)


def top_svd_krylov(W, r: int, block: int = 4, tol: float = 1e-6, info: dict | None = None):
    """Top-r singular triplets of W by block Lanczos on the smaller Gram matrix (G = W Wᵀ or Wᵀ W).

    Only matrix products with W are needed (fp32, the expensive part); the Krylov basis and the small
    Rayleigh-Ritz eigenproblem are fp64. The start block comes from a fixed seed, so the result is a
    deterministic function of W. It stops when the Ritz residual ||G q - θ q|| / θ_1 < tol for the top r.
    """
    m, n = W.shape
    rows = m < n  # work in the smaller dimension d
    d = m if rows else n
    Wt = W.T
    apply = (lambda X: W @ (Wt @ X)) if rows else (lambda X: Wt @ (W @ X))  # (d, b) -> (d, b)
    b = min(block, d)
    g = torch.Generator().manual_seed(0)
    X, _ = torch.linalg.qr(torch.randn(d, b, generator=g, dtype=torch.float64).to(W.device))  # (d, b)
    K, GK = X, apply(X.float()).double()  # basis (d, k) and G applied to it
    while True:
        if K.shape[1] < 6 * b and K.shape[1] + b <= d:  # no real matrix converges this early: skip the check
            X = _next_block(K, GK, b)
            K, GK = torch.cat([K, X], 1), torch.cat([GK, apply(X.float()).double()], 1)
            continue
        T = K.T @ GK  # (k, k) Rayleigh quotient
        theta, Z = torch.linalg.eigh(((T + T.T) / 2).cpu())  # tiny (k, k): on CPU, where LAPACK has no launch cost
        theta, Z = theta.to(W.device), Z.to(W.device)
        Q = K @ Z[:, -r:]  # (d, r) Ritz vectors, ascending
        res = (GK @ Z[:, -r:] - Q * theta[-r:]).norm(dim=0).max() / theta[-1].clamp(min=1e-300)
        if res < tol or K.shape[1] + b > d:
            break
        X = _next_block(K, GK, b)
        K, GK = torch.cat([K, X], 1), torch.cat([GK, apply(X.float()).double()], 1)
    if info is not None:  # for dev/bench_svd.py: how many products with W this matrix needed
        info["products"] = info.get("products", 0) + K.shape[1] // b
    if res >= tol:  # the basis spans the whole space: the exact eigendecomposition of the small Gram
        Gd = (W.double() @ W.double().T) if rows else (W.double().T @ W.double())
        Q = torch.linalg.eigh(Gd)[1][:, -r:]
    Q = Q.flip(1).float()  # (d, r), descending
    # the other side from one product with W: W v_j = σ_j u_j
    if rows:
        WtU = Wt @ Q  # (n, r)
        S = WtU.norm(dim=0)
        return Q, S, WtU / S.clamp(min=1e-30)
    WV = W @ Q  # (m, r)
    S = WV.norm(dim=0)
    return WV / S.clamp(min=1e-30), S, Q


@contextlib.contextmanager
def cpu_threads(n: int | None):
    """Run a block with n intra-op threads (restored after); None leaves the setting alone."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def top_svd(W, r: int, svd: str = "fast", sign: bool = True):
    """U (d_out, r), S (r,), V (d_in, r) in fp32 with W ≈ U diag(S) Vᵀ on the top r singular values."""
    W = W.detach().float()
    if svd == "full":
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        U, S, V = U[:, :r], S[:r], Vh[:r].T
    elif svd == "lowrank":  # the official fork's call; fork the RNG so the global stream is untouched
        with torch.random.fork_rng(devices=[W.device] if W.is_cuda else []):
            torch.manual_seed(0)
            U, S, V = torch.svd_lowrank(W, q=r, niter=10)
    elif svd == "fast":
        U, S, V = top_svd_krylov(W, r)
    else:
        raise ValueError(f"unknown svd {svd!r}: use one of {', '.join(SVDS)}")
    if sign:
        U, V = canonical_sign(U, V)
    return U.contiguous(), S.contiguous(), V.contiguous()


# -----------------------------------------------------------------------------
# the adapter layers


class TinyLoRALinear(nn.Module):
    """A frozen nn.Linear plus W' = W + U M(v) Vᵀ. Covers TinyLoRA's three variants and LoRA-XS (P = basis)."""

    def __init__(self, base: nn.Linear, r, P, v, variant="paper", svd="fast", alpha=None, USV=None):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias  # the same frozen Parameters: state_dict keys unchanged
        self.in_features, self.out_features = base.in_features, base.out_features
        self.enabled = True
        self.variant, self.r, self.u = variant, r, P.shape[0]
        self.scale = 1.0 if alpha is None else alpha / r  # verl's lora_alpha / r (choice 8)
        U, S, V = USV or top_svd(base.weight, r, svd, sign=variant != "peft")  # attach() passes them precomputed
        if variant == "peft":  # √Σ on both sides, folded into the frozen factors as PEFT stores them
            U, V = U * S.sqrt(), V * S.sqrt()
        self.register_buffer("U", U, persistent=False)  # (d_out, r)
        self.register_buffer("S", S, persistent=False)  # (r,)
        self.register_buffer("V", V, persistent=False)  # (d_in, r)
        self.register_buffer("P", P.to(U.device), persistent=False)  # (u, r, r)
        object.__setattr__(self, "v", v)  # (u,) shared with the other modules of its group; owned by the Adapter

    def R(self, dtype=torch.float32):
        R = torch.einsum("i,ijk->jk", self.v.to(dtype), self.P.to(dtype))  # (r, r) = Σ_i v_i P_i
        return R / math.sqrt(self.u) if self.variant == "verl" else R

    def lowrank(self, dtype=torch.float32):
        """(U, M, V) with ΔW = U M Vᵀ: U (d_out, r), M (r, r), V (d_in, r), fp32 unless asked otherwise."""
        R, S = self.R(dtype), self.S.to(dtype)
        if self.variant == "paper":
            M = S[:, None] * R  # Σ R
        elif self.variant == "peft":
            M = R  # Σ already split into U and V
        else:
            M = self.scale * R * S[None, :]  # (α/r) R Σ: Σ on the input side
        return self.U.to(dtype), M, self.V.to(dtype)

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if not self.enabled:
            return y
        dt = torch.promote_types(x.dtype, torch.float32)  # fp32 (fp64 only for a float64 model: gradient checks)
        U, M, V = self.lowrank(dt)
        return y + (((x.to(dt) @ V) @ M.T) @ U.T).to(y.dtype)  # (..., d_out), low-rank path in fp32

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, r={self.r}, u={self.u}, variant={self.variant}"


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus ΔW = (α/r) B A (Hu et al., 2021); B starts at zero."""

    def __init__(self, base: nn.Linear, r, A, B, alpha):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        self.in_features, self.out_features = base.in_features, base.out_features
        self.enabled, self.r, self.scale = True, r, alpha / r
        object.__setattr__(self, "A", A)  # (r, d_in) trainable, owned by the Adapter
        object.__setattr__(self, "B", B)  # (d_out, r) trainable, owned by the Adapter

    def lowrank(self, dtype=torch.float32):
        M = self.scale * torch.eye(self.r, device=self.A.device, dtype=dtype)
        return self.B.to(dtype), M, self.A.T.to(dtype)

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if not self.enabled:
            return y
        dt = torch.promote_types(x.dtype, torch.float32)
        return y + (self.scale * ((x.to(dt) @ self.A.T.to(dt)) @ self.B.T.to(dt))).to(y.dtype)  # (..., d_out)

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, r={self.r}, scale={self.scale}"


ADAPTER_LAYERS = (TinyLoRALinear, LoRALinear)


# -----------------------------------------------------------------------------
# which modules, in which order, share which v


def module_names(num_layers: int, targets=TARGETS) -> list[str]:
    """The adapted linears in depth order: layer 0's q,k,v,o,gate,up,down, then layer 1's, …"""
    bad = [t for t in targets if t not in TARGETS]
    if bad or not targets:
        raise ValueError(f"unknown targets {bad or '(none)'}: choose from {', '.join(TARGETS)}")
    kinds = [t for t in TARGETS if t in targets]  # always the checkpoint's order, whatever order was given
    return [
        f"model.layers.{i}.{'self_attn' if t[0] in 'qkvo' else 'mlp'}.{t}" for i in range(num_layers) for t in kinds
    ]


def groups(names: list[str], tie: int, order: str = "tiled") -> list[int]:
    """groups[k] = which shared v module k (in depth order) uses; there are ceil(n / tie) groups (choice 7)."""
    if order not in ORDERS:
        raise ValueError(f"unknown order {order!r}: use one of {', '.join(ORDERS)}")
    if tie < 1:
        raise ValueError(f"tie must be >= 1 (got {tie})")
    n = len(names)
    if order == "tiled":
        return [k // tie for k in range(n)]
    kind = lambda name: TARGETS.index(name.rsplit(".", 1)[1])  # noqa: E731
    layer = lambda name: int(name.split(".")[2])  # noqa: E731
    by_type = sorted(range(n), key=lambda k: (kind(names[k]), layer(names[k])))  # type-major, then depth
    out = [0] * n
    for pos, k in enumerate(by_type):
        out[k] = pos // tie
    return out


def module_seed(seed: int, k: int, variant: str) -> int:
    return seed + k if variant == "peft" else seed * 1_000_003 + k  # choice 5


def make_P(u: int, r: int, seed: int, variant: str):
    g = torch.Generator().manual_seed(seed)  # CPU generator: the same P on every machine
    std = 1.0 if variant == "verl" else r**-0.5  # choice 4
    return torch.normal(mean=0.0, std=std, size=(u, r, r), generator=g)  # (u, r, r)


# -----------------------------------------------------------------------------
# attaching, the handle, parameter counts


class Adapter:
    """The handle train.py holds: the trainable tensors, the adapted modules, save(), disabled()."""

    def __init__(self, model, settings: dict, modules, params, group_of, fingerprint):
        self.model, self.settings = model, settings
        self.modules = modules  # [(name, module)] in depth order
        self.params = params  # the trainable tensors (fp32 except for method="full")
        self.groups = group_of  # group index of each module (tinylora / loraxs)
        self.fingerprint = fingerprint  # of the base weights, taken before any training

    def __getattr__(self, k):  # adapter.r, adapter.u, adapter.tie, … read the settings
        if k != "settings" and k in self.__dict__.get("settings", {}):
            return self.settings[k]
        raise AttributeError(k)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.params)

    @contextlib.contextmanager
    def disabled(self):
        """The base model: the KL reference costs no second copy of the weights."""
        if self.settings["method"] == "full":
            raise ValueError("method='full' changes the base weights, so there is no base model to switch back to")
        before = [m.enabled for _, m in self.modules]
        for _, m in self.modules:
            m.enabled = False
        try:
            yield self.model
        finally:
            for (_, m), e in zip(self.modules, before):
                m.enabled = e

    def tensors(self) -> dict:
        """What an adapter file holds, in fp32 (and the model's dtype for method='full')."""
        s = self.settings
        if s["method"] in ("tinylora", "loraxs"):
            return {f"v.{g}": v for g, v in enumerate(self.params)}
        if s["method"] == "lora":
            return {f"{k}.{name}": getattr(m, k) for name, m in self.modules for k in ("A", "B")}
        return {name: p for name, p in self.model.named_parameters() if not _is_tied_head(self.model, name)}

    def save(self, path: str, dtype: str = "fp32", **meta) -> int:
        """Write the adapter as safetensors; returns the file size in bytes. Extra keyword args go to metadata."""
        from safetensors.torch import save_file

        if dtype not in DTYPES:
            raise ValueError(f"unknown storage dtype {dtype!r}: use one of {', '.join(DTYPES)}")
        tensors = {k: t.detach().to("cpu", DTYPES[dtype]).contiguous() for k, t in self.tensors().items()}
        header = {k: json.dumps(v) for k, v in self.settings.items()}
        header.update(
            format=FORMAT,
            dtype=json.dumps(dtype),
            base=json.dumps(getattr(self.model, "name_or_path", None)),
            fingerprint=json.dumps(self.fingerprint),
            num_params=json.dumps(self.num_params()),
            sha256=json.dumps(_checksum(tensors)),
            meta=json.dumps(meta, default=str),
        )
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp"
        save_file(tensors, tmp, metadata=header)
        os.replace(tmp, path)  # never leave a half-written adapter under the real name
        return os.path.getsize(path)


def _is_tied_head(model, name):
    return name == "lm_head.weight" and getattr(getattr(model, "cfg", None), "tie_word_embeddings", False)


def _checksum(tensors: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _get(model, name):
    return model.get_submodule(name)


def _set(model, name, module):
    parent, attr = name.rsplit(".", 1)
    setattr(model.get_submodule(parent), attr, module)


def fingerprint(model, names: list[str]) -> dict:
    """A cheap, dtype-robust identity of the base weights: shapes of every target + 8 values from 3 of them."""
    shapes = [list(_get(model, n).weight.shape) for n in names]
    probes = {}
    for name in dict.fromkeys([names[0], names[len(names) // 2], names[-1]]):
        w = _get(model, name).weight.detach().flatten()
        idx = torch.linspace(0, w.numel() - 1, 8).long().to(w.device)
        probes[name] = w[idx].float().cpu().tolist()
    return {"shapes": hashlib.sha256(json.dumps(shapes).encode()).hexdigest()[:16], "probes": probes}


def check_fingerprint(saved: dict, model, names: list[str], where: str):
    got = fingerprint(model, names)
    same = saved["shapes"] == got["shapes"] and saved["probes"].keys() == got["probes"].keys()
    if same:  # values compared loosely: the same weights read in bf16, fp16 or fp32 must all pass
        for k, a in saved["probes"].items():
            same &= torch.allclose(torch.tensor(a), torch.tensor(got["probes"][k]), rtol=1e-2, atol=1e-3)
    if not same:
        raise ValueError(
            f"{where} was trained on different base weights than this model's (shapes or probed values differ). "
            "Load the adapter onto the base model it was trained on (its id is in the file's 'base' metadata)."
        )


def attach(
    model,
    method: str = "tinylora",
    r: int = 2,
    u: int = 1,
    tie: int = 1,
    order: str = "tiled",
    targets=TARGETS,
    variant: str = "paper",
    seed: int = 0,
    alpha: float | None = None,
    svd: str | None = None,
) -> Adapter:
    """Replace each targeted nn.Linear of `model` by its adapter module, in place; freeze everything else."""
    # 1) check the settings before any long work
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}: use one of {', '.join(VARIANTS)}")
    svd = svd or {"paper": "fast", "peft": "full", "verl": "lowrank"}[variant]
    if svd not in SVDS:
        raise ValueError(f"unknown svd {svd!r}: use one of {', '.join(SVDS)}")
    if min(r, u, tie) < 1:
        raise ValueError(f"r, u and tie must be positive integers (got r={r}, u={u}, tie={tie})")
    if method == "loraxs" and variant != "paper":
        raise ValueError("LoRA-XS has one form (W + U Σ R Vᵀ): use variant='paper' with method='loraxs'")
    if method == "lora" and tie != 1:
        raise ValueError("LoRA has no tying: use tie=1 with method='lora'")
    if any(isinstance(m, ADAPTER_LAYERS) for m in model.modules()):
        raise ValueError("this model already has adapters attached; load a fresh base model")
    targets = tuple(targets)
    names = module_names(model.cfg.num_hidden_layers, targets)
    for name in names:
        d_out, d_in = _get(model, name).weight.shape
        if r > min(d_out, d_in):
            raise ValueError(f"r={r} exceeds the smaller side of {name} ({d_out}x{d_in})")
    if method == "loraxs":
        u = r * r  # R itself trains: P is the standard basis of r×r matrices (choice 9)
    if method == "lora":
        alpha = float(r) if alpha is None else float(alpha)
    if variant == "verl" and method == "tinylora":
        alpha = float(r) if alpha is None else float(alpha)
    elif method != "lora":
        alpha = None  # only LoRA and the verl variant scale by α / r
    settings = dict(
        method=method, variant=variant, r=r, u=u, tie=tie, order=order, targets=list(targets), seed=seed,
        alpha=alpha, svd=svd,
    )  # fmt: skip
    fp = fingerprint(model, names)
    for p in model.parameters():
        p.requires_grad_(method == "full")
    if method == "full":
        params = list(dict.fromkeys(model.parameters()))  # tied weights counted once
        return Adapter(model, settings, [], params, [], fp)

    # 2) the trainable tensors: one v per group
    dev = model.model.embed_tokens.weight.device
    group_of = groups(names, tie, order) if method != "lora" else list(range(len(names)))
    params, modules = [], []
    if method != "lora":
        G = max(group_of) + 1
        params = [torch.zeros(u, device=dev) for _ in range(G)]  # (u,) per group, fp32 (choice 6)
        if variant == "verl":
            g = torch.Generator().manual_seed(seed)
            params = [torch.randn(u, generator=g).mul_(1e-5).to(dev) for _ in range(G)]
        for p in params:
            p.requires_grad_(True)
    # 3) the top-r SVD of every target (the start-up cost), then the modules
    if method != "lora":
        svds = top_svds([_get(model, name).weight for name in names], r, svd, sign=variant != "peft")
    for k, name in enumerate(names):
        base = _get(model, name)
        if method == "lora":
            mod = make_lora(base, r, alpha, module_seed(seed, k, "paper"), dev)
            params += [mod.A, mod.B]
        else:
            P = torch.eye(r * r).view(r * r, r, r) if method == "loraxs" else None  # (r², r, r): R = v.view(r, r)
            P = make_P(u, r, module_seed(seed, k, variant), variant) if P is None else P
            mod = TinyLoRALinear(base, r, P, params[group_of[k]], variant, svd, alpha, USV=svds[k])
        _set(model, name, mod)
        modules.append((name, mod))
    return Adapter(model, settings, modules, params, group_of, fp)


def top_svds(weights, r: int, svd: str = "fast", sign: bool = True, workers: int | None = None):
    """top_svd of each weight. On CPU the fast path is a chain of small products and tiny LAPACK calls, for
    which one thread per matrix beats two threads on one matrix (by a lot on a busy machine): so each worker
    thread takes whole matrices with intra-op threading off. dev/bench_svd.py measures the difference."""
    if weights[0].device.type != "cpu" or svd != "fast":
        return [top_svd(W, r, svd, sign) for W in weights]
    workers = workers or torch.get_num_threads()
    with cpu_threads(1):
        if workers == 1:
            return [top_svd(W, r, svd, sign) for W in weights]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(workers) as pool:  # torch releases the GIL inside each op
            return list(pool.map(lambda W: top_svd(W, r, svd, sign), weights))


def make_lora(base: nn.Linear, r: int, alpha: float, seed: int, dev) -> LoRALinear:
    """A as nn.Linear's default init (kaiming-uniform with a=√5, i.e. U(±1/√d_in)), seeded; B = 0."""
    g = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(base.in_features)
    A = torch.empty(r, base.in_features).uniform_(-bound, bound, generator=g).to(dev).requires_grad_(True)
    B = torch.zeros(base.out_features, r, device=dev, requires_grad=True)
    return LoRALinear(base, r, A, B, alpha)


# -----------------------------------------------------------------------------
# adapter files


def read_adapter(path: str) -> tuple[dict, dict]:
    """(settings + metadata, tensors) of an adapter file; a damaged or foreign file is a ValueError."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise ValueError(f"no adapter file at {path}")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors reports truncation / bad headers with its own error types
        raise ValueError(f"{path} is not a readable adapter file (corrupt or truncated?): {e}") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a tinylora adapter file (format {meta.get('format')!r}, want {FORMAT!r})")
    info = {k: json.loads(v) for k, v in meta.items() if k != "format"}
    if _checksum(tensors) != info["sha256"]:
        raise ValueError(f"{path} is corrupt: its tensors do not match the checksum written with them")
    return info, tensors


def load_adapter(path: str, model) -> Adapter:
    """Attach the adapter stored at `path` to a fresh base `model` and fill in its trained values."""
    info, tensors = read_adapter(path)
    names = module_names(model.cfg.num_hidden_layers, info["targets"])
    check_fingerprint(info["fingerprint"], model, names, path)  # before the SVDs, which take a while
    keys = ("method", "r", "u", "tie", "order", "targets", "variant", "seed", "alpha", "svd")
    settings = {k: info[k] for k in keys}
    if settings["method"] == "loraxs":
        settings["u"] = 1  # attach derives u = r² itself
    adapter = attach(model, **settings)
    want = adapter.tensors()
    if want.keys() != tensors.keys() or any(want[k].shape != tensors[k].shape for k in want):
        raise ValueError(f"{path} holds tensors that do not fit the adapter its settings describe")
    with torch.no_grad():
        for k, t in want.items():
            t.copy_(tensors[k].to(t.dtype))
    adapter.stored = info  # the file's metadata (base id, dtype, user meta) for the caller to show
    return adapter


# -----------------------------------------------------------------------------
# merging and export


def delta_weight(module):
    U, M, V = module.lowrank()
    return U @ M @ V.T  # (d_out, d_in) fp32


def merged_weight(module):
    return (module.weight.float() + delta_weight(module)).to(module.weight.dtype)


@torch.no_grad()
def merge(model, adapter: Adapter | None = None):
    """Fold every adapter into its weight, in place: the adapter modules become plain nn.Linears holding W'."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, ADAPTER_LAYERS):
            lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, device="meta")
            lin.weight = nn.Parameter(merged_weight(mod) if mod.enabled else mod.weight.detach().clone(), False)
            lin.bias = mod.bias
            _set(model, name, lin)
    return model


TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "generation_config.json", "vocab.json", "merges.txt", "tokenizer.model",
)  # fmt: skip


@torch.no_grad()
def export_merged(model, path: str, source: str | None = None, dtype: torch.dtype | None = None) -> str:
    """Write W' as a plain Hugging Face checkpoint folder (config, model.safetensors, tokenizer files).

    `source` is the base checkpoint (folder or Hub id) whose config and tokenizer are copied; by default
    the one the model was loaded from. Note: in bf16, W + ΔW is rounded to bf16, so a tiny ΔW may partly
    vanish; the unmerged adapter keeps the update exact (this is the sampler/trainer mismatch TIS corrects).
    """
    from safetensors.torch import save_file

    from model import resolve

    source = source or getattr(model, "name_or_path", None)
    if source is None:
        raise ValueError("export_merged needs source=the base checkpoint folder (for config.json and tokenizer)")
    src = resolve(source)
    adapted = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, ADAPTER_LAYERS)}
    sd = {}
    for k, t in model.state_dict().items():
        if _is_tied_head(model, k):
            continue  # transformers re-ties lm_head to the embedding
        t = merged_weight(adapted[k]) if k in adapted and adapted[k].enabled else t
        sd[k] = t.to(dtype or t.dtype).contiguous().cpu()
    os.makedirs(path, exist_ok=True)
    save_file(sd, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(os.path.join(src, "config.json"), os.path.join(path, "config.json"))
    for f in TOKENIZER_FILES:
        if os.path.exists(os.path.join(src, f)):
            shutil.copy(os.path.join(src, f), os.path.join(path, f))
    return path


@torch.no_grad()
def export_peft_lora(adapter: Adapter, path: str, base: str | None = None) -> str:
    """Write the update as a standard rank-r PEFT LoRA adapter: lora_B = U M, lora_A = Vᵀ, lora_alpha = r (scale 1).

    ΔW = U M Vᵀ has rank ≤ r, so this is exact (up to fp32 rounding), whichever method produced it.
    """
    from safetensors.torch import save_file

    if adapter.settings["method"] == "full":
        raise ValueError("method='full' has no low-rank update to export; use export_merged")
    sd = {}
    for name, mod in adapter.modules:
        U, M, V = mod.lowrank()
        sd[f"base_model.model.{name}.lora_A.weight"] = V.T.contiguous().cpu()  # (r, d_in)
        sd[f"base_model.model.{name}.lora_B.weight"] = (U @ M).contiguous().cpu()  # (d_out, r)
    r = adapter.settings["r"]
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": r, "lora_dropout": 0.0,
        "target_modules": adapter.settings["targets"], "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "use_rslora": False, "init_lora_weights": True,
        "base_model_name_or_path": base or getattr(adapter.model, "name_or_path", None),
    }  # fmt: skip
    os.makedirs(path, exist_ok=True)
    save_file(sd, os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return path


# -----------------------------------------------------------------------------
# parameter counts from a config alone: python tinylora.py --model Qwen/Qwen2.5-7B-Instruct --u 1 --tie 16

# The numbers we need from the paper's models' config.json, for when the Hub cannot be reached.
_QWEN = {"architectures": ["Qwen2ForCausalLM"], "vocab_size": 151936, "num_key_value_heads": 2}
BUILTIN_CONFIGS = {
    "Qwen/Qwen2.5-0.5B-Instruct": {**_QWEN, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                                   "num_attention_heads": 14, "tie_word_embeddings": True},
    "Qwen/Qwen2.5-1.5B-Instruct": {**_QWEN, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                                   "num_attention_heads": 12, "tie_word_embeddings": True},
    "Qwen/Qwen2.5-3B-Instruct": {**_QWEN, "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
                                 "num_attention_heads": 16, "tie_word_embeddings": True},
    "Qwen/Qwen2.5-7B-Instruct": {**_QWEN, "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
                                 "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                                 "tie_word_embeddings": False},
    "meta-llama/Meta-Llama-3-8B-Instruct": {"architectures": ["LlamaForCausalLM"], "vocab_size": 128256,
                                            "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                                            "num_attention_heads": 32, "num_key_value_heads": 8,
                                            "tie_word_embeddings": False},
}  # fmt: skip
BUILTIN_CONFIGS["meta-llama/Llama-3.1-8B-Instruct"] = BUILTIN_CONFIGS["meta-llama/Meta-Llama-3-8B-Instruct"]


def read_config(name_or_path):
    """(Config, where it came from) for a Config, a config dict, a local folder, or a Hub id (config.json only)."""
    from model import Config

    if isinstance(name_or_path, Config):
        return name_or_path, "given"
    if isinstance(name_or_path, dict):
        return Config.from_dict(name_or_path), "given"
    if os.path.isdir(name_or_path):
        with open(os.path.join(name_or_path, "config.json")) as f:
            return Config.from_dict(json.load(f)), name_or_path
    try:
        from huggingface_hub import hf_hub_download

        from model import hub_reachable

        offline = not hub_reachable()  # else huggingface_hub retries for ~30 s before giving up
        with open(hf_hub_download(name_or_path, "config.json", local_files_only=offline)) as f:
            return Config.from_dict(json.load(f)), f"the Hub's {name_or_path}/config.json"
    except Exception as e:
        if name_or_path in BUILTIN_CONFIGS:
            return Config.from_dict(BUILTIN_CONFIGS[name_or_path]), (
                f"the built-in table (the Hub could not be reached: {type(e).__name__})"
            )
        raise ValueError(
            f"cannot read a config for {name_or_path!r}: not a local folder, the Hub failed ({type(e).__name__}), "
            f"and it is not one of the built-in models ({', '.join(BUILTIN_CONFIGS)})"
        ) from None


def count_params(config_or_path, method="tinylora", r=2, u=1, tie=1, targets=TARGETS) -> int:
    """Trainable parameters implied by the settings, from the config alone (no weights)."""
    cfg = read_config(config_or_path)[0]
    names = module_names(cfg.num_hidden_layers, tuple(targets))
    if method in ("tinylora", "loraxs"):
        if min(r, u, tie) < 1:
            raise ValueError(f"r, u and tie must be positive (got r={r}, u={u}, tie={tie})")
        return math.ceil(len(names) / tie) * (r * r if method == "loraxs" else u)
    C, D = cfg.hidden_size, cfg.head_dim
    H, Hkv, I = cfg.num_attention_heads * D, cfg.num_key_value_heads * D, cfg.intermediate_size
    shape = {"q_proj": (H, C), "k_proj": (Hkv, C), "v_proj": (Hkv, C), "o_proj": (C, H),
             "gate_proj": (I, C), "up_proj": (I, C), "down_proj": (C, I)}  # fmt: skip
    if method == "lora":
        return sum(r * sum(shape[n.rsplit(".", 1)[1]]) for n in names)
    if method == "full":
        per_layer = sum(a * b for a, b in shape.values()) + 2 * C  # 7 linears + 2 norms
        per_layer += (H + 2 * Hkv) * cfg.attention_bias + (2 * I + C) * cfg.mlp_bias + 2 * D * cfg.qk_norm
        head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * C
        return cfg.vocab_size * C + cfg.num_hidden_layers * per_layer + C + head
    raise ValueError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Trainable parameters and update size implied by adapter settings.")
    p.add_argument("--model", default="Qwen/Qwen2.5-7B-Instruct", help="Hub id, local folder, or built-in name")
    p.add_argument("--method", default="tinylora", choices=METHODS)
    p.add_argument("--r", type=int, default=2, help="rank of the frozen SVD (LoRA: its rank)")
    p.add_argument("--u", type=int, default=1, help="size of each trainable vector v")
    p.add_argument("--tie", type=int, default=1, help="modules sharing one v")
    p.add_argument("--targets", default=",".join(TARGETS), help="comma-separated projections to adapt")
    args = p.parse_args()
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    try:
        cfg, where = read_config(args.model)
        n_mod = len(module_names(cfg.num_hidden_layers, targets))
        n = count_params(cfg, args.method, args.r, args.u, args.tie, targets)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"config: {where}")
    print(f"{args.model}: {cfg.num_hidden_layers} layers x {len(targets)} targets = {n_mod} adapted modules")
    print(f"{n:,} trainable parameter{'s' * (n != 1)} ({args.method}, r={args.r}, u={args.u}, tie={args.tie})")
    print("update size: " + ", ".join(f"{n * t.itemsize:,} bytes in {k}" for k, t in DTYPES.items()))
