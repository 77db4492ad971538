"""
TinyLoRA (and the baselines it is compared with): adapt a frozen linear layer W with a handful of numbers.

    R  = Σ_i v_i P_i / √u                     # (r, r): v ∈ R^u is all that trains, P_i are fixed random
    ΔW = (α/r) U R Σ Vᵀ                       # (d_out, d_in), rank ≤ r: U Σ Vᵀ is the top-r SVD of W, frozen
    y  = x Wᵀ + b + ((x V) Mᵀ) Uᵀ             # M = (α/r) R Σ: the low-rank path never forms ΔW

That is the default `verl` variant, the official code's update; the paper writes ΔW = U Σ R Vᵀ (choice 9).
Every adapter module exposes its update as `lowrank() -> (U, M, V)` with ΔW = U M Vᵀ: the sampler's kernel,
merging and export.py consume that one form. `tie` modules share one v, so 196 adapted matrices (Qwen2.5-7B)
train ceil(196 / tie) · u numbers: `--u 1 --tie 16` is the paper's 13.

Choices: *paper* ("Learning to Reason in 13 Parameters"), *official* (its code, jxmorris12/verl-lora), *ref*
(PEFT's TinyLoraConfig), *ours* (the paper is silent):
1. r = 2; the top-r SVD once, in fp32, of the weights as loaded, frozen (*paper*). verl uses our exact SVD with
   canonical signs, so one v rebuilds one W' anywhere (*ours*); svd="lowrank" is the official randomized call.
2. P_i ~ N(0, 1) entrywise for verl (*official*); N(0, 1/r) for paper and peft (*ours*, *ref*: PEFT's law).
3. verl's P and v₀ replay the official stream (seed 42 + seed, after svd_lowrank's start matrix and a randn(u))
   on a private generator (*official*): modules with the same min(d_out, d_in) share P, as officially.
4. paper/peft: module k's P from a generator seeded `seed * 1_000_003 + k` (*ours*; `peft`: seed + k, *ref*).
5. v₀ = 0 for paper and peft: step 0 is the base model (*paper*); verl: N(0, 1e-5²) after P, a tied group taking
   its first module's (*official*). v trains in fp32 and is stored fp32/bf16/fp16.
6. Tying `tiled` (default): depth order (layer 0's q, k, v, o, gate, up, down, then layer 1's, …) cut into runs of
   `tie`, the last one short (*paper*, *official*).
7. Tying `structured`: each type's layers cut into runs of `tie`: 7 · ceil(L / tie) groups, none mixing types
   (*paper* §6.5, *official*).
8. `verl` (default): the official merge's (α/r) U R Σ Vᵀ, α = 32 (*official*, what its sampler saw; its trainer
   forward at HEAD uses Rᵀ, the same law).
9. `paper`: U Σ R Vᵀ, no α (*paper*, read literally): α/√(r u) smaller in RMS for the same v (22.6 at α 32, r 2,
   u 1), so the paper's lr grid {1e-7 … 2e-4} is meant for verl. `peft`: (U√Σ) R (√Σ Vᵀ) (*ref*).
10. LoRA-XS: u = r², P the standard basis, tie 1, R from 0 (*paper*; under verl no √u, *official*). LoRA: A
    kaiming-uniform, B = 0, ΔW = (α/r) B A, α = 32 (*official*).
11. `full` trains every base weight, a 16-bit model through fp32 masters (the Adapter's params) so 1e-6-relative
    steps accumulate (*ours*); train.py calls masters_to_model().
12. Trainable tensors live in the `Adapter`, not the state_dict, so base keys stay the checkpoint's (*ours*).
    Attach after moving the model to its device; files out (save, merge, export, counts) are export.py's.

Letters: r rank, u size of v, L layers, d_out × d_in the shape of W; U, S (= Σ), V, P, R, M as above.
"""

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import LINEARS, linear_path
from svd import SVDS, top_svd, top_svds

TARGETS = LINEARS  # q, k, v, o, gate, up, down: model.py owns the block's layout
METHODS = ("tinylora", "loraxs", "lora", "full")
ORDERS = ("tiled", "structured")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # storage precision of v


OFFICIAL_SEED = 42  # the official code reseeds its global CPU RNG with this before every module (choice 3)
OFFICIAL_ALPHA = 32.0  # lora_alpha in every official training script (choices 8 and 10)


def spread_seed(seed: int, k: int) -> int:
    return seed * 1_000_003 + k  # choice 4: adapters with nearby seeds share no module's P


def peft_seed(seed: int, k: int) -> int:
    return seed + k  # PEFT's projection_seed + module index (*ref*)


def official_seed(seed: int, k: int) -> int:
    return OFFICIAL_SEED + seed  # choice 3: the same for every module, as officially; seed 0 is the official draw


@dataclass(frozen=True)
class Variant:
    """Everything in which the readings of TinyLoRA differ (choices 2-5, 8, 9): builders and lowrank() read this."""

    svd: str  # which top-r SVD by default (svd.py)
    sign: bool  # canonical signs for the singular vectors (svd.canonical_sign; not for svd="lowrank")
    P_std: Callable[[int], float]  # P_i ~ N(0, P_std(r)²) entrywise
    P_seed: Callable[[int, int], int]  # (adapter seed, module index) -> the seed of that module's generator
    official: bool  # the generator replays the official stream: start matrix, randn(u), P, then v₀ (choice 3)
    sigma: str  # where Σ sits: "left" Σ R, "right" R Σ, "split" √Σ R √Σ (folded into U and V)
    sqrt_u: bool  # R = Σ_i v_i P_i / √u
    alpha: float | None  # ΔW carries α / r with this default α (None: no scale)
    v_std: float  # v's initial standard deviation (0: the base model at step 0)


VARIANTS = {  # choices 8 and 9: one row per reading of TinyLoRA, columns as in Variant
    #                svd     sign   P_std              P_seed         official sigma    sqrt_u alpha           v_std
    "verl":  Variant("fast", True,  lambda r: 1.0,     official_seed, True,    "right", True,  OFFICIAL_ALPHA, 1e-5),
    "paper": Variant("fast", True,  lambda r: r**-0.5, spread_seed,   False,   "left",  False, None,           0.0),
    "peft":  Variant("full", False, lambda r: r**-0.5, peft_seed,     False,   "split", False, None,           0.0),
}  # fmt: skip


# -----------------------------------------------------------------------------
# the adapter layers


class TinyLoRALinear(nn.Module):
    """A frozen nn.Linear plus W' = W + U M(v) Vᵀ. Covers TinyLoRA's variants and LoRA-XS (P = basis)."""

    def __init__(self, base: nn.Linear, r, P, v, variant="verl", svd=None, alpha=None, USV=None, sqrt_u=None):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias  # the same frozen Parameters: state_dict keys unchanged
        self.in_features, self.out_features = base.in_features, base.out_features
        self.enabled = True
        self.variant, self.spec, self.r, self.u = variant, VARIANTS[variant], r, P.shape[0]
        alpha = self.spec.alpha if alpha is None else alpha  # the variant's default α (choice 8; None: no scale)
        self.scale = 1.0 if alpha is None else alpha / r
        self.sqrt_u = self.spec.sqrt_u if sqrt_u is None else sqrt_u  # LoRA-XS under verl: no √u (choice 10)
        U, S, V = USV or top_svd(base.weight, r, svd or self.spec.svd, self.spec.sign)  # attach() precomputes them
        if self.spec.sigma == "split":  # √Σ on both sides, folded into the frozen factors as PEFT stores them
            U, V = U * S.sqrt(), V * S.sqrt()
        assert U.shape == (self.out_features, r) and V.shape == (self.in_features, r) and P.shape[1:] == (r, r)
        self.register_buffer("U", U, persistent=False)  # (d_out, r)
        self.register_buffer("S", S, persistent=False)  # (r,)
        self.register_buffer("V", V, persistent=False)  # (d_in, r)
        self.register_buffer("P", P.to(U.device), persistent=False)  # (u, r, r)
        object.__setattr__(self, "v", v)  # (u,) shared with the other modules of its group; owned by the Adapter

    def R(self, dtype=torch.float32):
        R = torch.einsum("i,ijk->jk", self.v.to(dtype), self.P.to(dtype))  # (r, r) = Σ_i v_i P_i
        return R / math.sqrt(self.u) if self.sqrt_u else R

    def lowrank(self, dtype=torch.float32):
        """(U, M, V) with ΔW = U M Vᵀ: U (d_out, r), M (r, r), V (d_in, r), fp32 unless asked otherwise."""
        R, S = self.R(dtype), self.S.to(dtype)
        M = R if self.scale == 1 else self.scale * R
        if self.spec.sigma == "left":
            M = S[:, None] * M  # Σ R
        elif self.spec.sigma == "right":
            M = M * S[None, :]  # R Σ: Σ on the input side
        return self.U.to(dtype), M, self.V.to(dtype)  # "split": Σ already sits in U and V

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
        assert A.shape == (r, self.in_features) and B.shape == (self.out_features, r)
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
# which modules, P, and who shares which v


def module_names(num_layers: int, targets=TARGETS) -> list[str]:
    """The adapted linears in depth order: layer 0's q,k,v,o,gate,up,down, then layer 1's, …"""
    bad = [t for t in targets if t not in TARGETS]
    if bad or not targets:
        raise ValueError(f"unknown targets {bad or '(none)'}: choose from {', '.join(TARGETS)}")
    kinds = [t for t in TARGETS if t in targets]  # always the checkpoint's order, whatever order was given
    return [linear_path(layer, t) for layer in range(num_layers) for t in kinds]


def groups(num_layers: int, n_types: int, tie: int, order: str = "tiled") -> list[int]:
    """groups[k] = the v that module k (depth order: k = layer · n_types + type) uses (choices 5 and 6)."""
    if order not in ORDERS:
        raise ValueError(f"unknown order {order!r}: use one of {', '.join(ORDERS)}")
    if tie < 1:
        raise ValueError(f"tie must be >= 1 (got {tie})")
    n = num_layers * n_types
    if order == "tiled":
        return [k // tie for k in range(n)]
    per_type = math.ceil(num_layers / tie)  # runs of `tie` nearby layers within each type
    return [(k % n_types) * per_type + (k // n_types) // tie for k in range(n)]


def draw(variant: str, u: int, r: int, seed: int, k: int, shape) -> tuple[torch.Tensor, torch.Tensor]:
    """(P (u, r, r), v₀ (u,)) of module k (depth order), whose weight is d_out × d_in = shape (choices 2-5)."""
    spec = VARIANTS[variant]
    g = torch.Generator().manual_seed(spec.P_seed(seed, k))  # CPU generator: the same draws on every machine
    if not spec.official:
        return torch.normal(0.0, spec.P_std(r), size=(u, r, r), generator=g), torch.zeros(u)
    # choice 3: the official stream after its reseed, replayed on this private generator
    torch.randn(min(shape), r, generator=g)  # svd_lowrank's start matrix, drawn first officially
    torch.randn(u, generator=g)  # the official v placeholder, overwritten by v₀ below
    P = torch.randn(u, r, r, generator=g) * spec.P_std(r)  # (u, r, r)
    return P, torch.empty(u).normal_(0.0, spec.v_std, generator=g)  # v₀ (u,), as officially drawn


# -----------------------------------------------------------------------------
# attaching: check the settings, then one builder per method


def attach(model, method="tinylora", r=2, u=1, tie=1, order="tiled", targets=TARGETS, variant="verl", seed=0,
           alpha=None, svd=None) -> "Adapter":  # fmt: skip
    """Replace each targeted nn.Linear of `model` by its adapter module, in place; freeze everything else."""
    import export  # the base weights' fingerprint (export.py imports this file, so not at the top)

    settings = check_settings(model, method, r, u, tie, order, tuple(targets), variant, seed, alpha, svd)
    names = module_names(model.cfg.num_hidden_layers, settings["targets"])
    fp = export.fingerprint(model, names)  # before anything changes
    for p in model.parameters():
        p.requires_grad_(method == "full")
    build = {"tinylora": build_tinylora, "loraxs": build_tinylora, "lora": build_lora, "full": build_full}[method]
    modules, params, group_of = build(model, names, settings)
    for name, mod in modules:
        model.set_submodule(name, mod)
    return Adapter(model, settings, modules, params, group_of, fp)


def check_settings(model, method, r, u, tie, order, targets, variant, seed, alpha, svd) -> dict:
    """The settings as stored in an adapter file; bad input is a ValueError that says what to change."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}: use one of {', '.join(VARIANTS)}")
    svd = svd or VARIANTS[variant].svd
    if svd not in SVDS:
        raise ValueError(f"unknown svd {svd!r}: use one of {', '.join(SVDS)}")
    if min(r, u, tie) < 1:
        raise ValueError(f"r, u and tie must be positive integers (got r={r}, u={u}, tie={tie})")
    if method == "loraxs" and variant == "peft":
        raise ValueError("LoRA-XS has the paper's and the official form: use variant='verl' or 'paper' with it")
    if method == "lora" and tie != 1:
        raise ValueError("LoRA has no tying: use tie=1 with method='lora'")
    if any(isinstance(m, ADAPTER_LAYERS) for m in model.modules()):
        raise ValueError("this model already has adapters attached; load a fresh base model")
    for name in module_names(model.cfg.num_hidden_layers, targets):
        d_out, d_in = model.get_submodule(name).weight.shape
        if r > min(d_out, d_in):
            raise ValueError(f"r={r} exceeds the smaller side of {name} ({d_out}x{d_in}): use a smaller r")
    if method == "loraxs":
        u = r * r  # R itself trains: P is the standard basis of r×r matrices (choice 10)
    default = OFFICIAL_ALPHA if method == "lora" else VARIANTS[variant].alpha  # choices 8 and 10
    alpha = None if default is None or method == "full" else float(default if alpha is None else alpha)
    return dict(
        method=method, variant=variant, r=r, u=u, tie=tie, order=order, targets=list(targets), seed=seed,
        alpha=alpha, svd=svd,
    )  # fmt: skip


def build_tinylora(model, names, s):
    """TinyLoRA and LoRA-XS: one v per group of `tie` modules, P per module, the frozen SVD of each weight."""
    spec, u, r, loraxs = VARIANTS[s["variant"]], s["u"], s["r"], s["method"] == "loraxs"
    dev = model.model.embed_tokens.weight.device
    group_of = groups(model.cfg.num_hidden_layers, len(names) // model.cfg.num_hidden_layers, s["tie"], s["order"])
    n_groups = max(group_of) + 1
    weights = [model.get_submodule(name).weight for name in names]
    if loraxs:  # (r², r, r) standard basis, R = v.view(r, r) starts at 0 (choice 10)
        draws = [(torch.eye(r * r).view(r * r, r, r), torch.zeros(u)) for _ in names]
    else:
        draws = [draw(s["variant"], u, r, s["seed"], k, W.shape) for k, W in enumerate(weights)]  # (P, v₀) each
    first = {}  # group -> its first module in depth order, whose v₀ the group starts from (choice 5)
    for k, g in enumerate(group_of):
        first.setdefault(g, k)
    params = [draws[first[g]][1].to(dev).requires_grad_(True) for g in range(n_groups)]  # (u,) per group, fp32
    svds = top_svds(weights, r, s["svd"], spec.sign)  # the start-up cost
    modules = []
    for k, name in enumerate(names):
        base, P = model.get_submodule(name), draws[k][0]
        mod = TinyLoRALinear(base, r, P, params[group_of[k]], s["variant"], alpha=s["alpha"], USV=svds[k],
                             sqrt_u=False if loraxs else None)  # fmt: skip
        modules.append((name, mod))
    assert len(params) == n_groups and all(m.v is params[group_of[k]] for k, (_, m) in enumerate(modules))
    return modules, params, group_of


def build_lora(model, names, s):
    """LoRA: A as nn.Linear's default init (kaiming-uniform with a=√5, i.e. U(±1/√d_in)), seeded per module; B = 0."""
    dev, r = model.model.embed_tokens.weight.device, s["r"]
    modules, params = [], []
    for k, name in enumerate(names):
        base = model.get_submodule(name)
        g = torch.Generator().manual_seed(spread_seed(s["seed"], k))
        bound = 1.0 / math.sqrt(base.in_features)
        A = torch.empty(r, base.in_features).uniform_(-bound, bound, generator=g).to(dev).requires_grad_(True)
        B = torch.zeros(base.out_features, r, device=dev, requires_grad=True)
        modules.append((name, LoRALinear(base, r, A, B, s["alpha"])))
        params += [A, B]
    return modules, params, list(range(len(names)))


def build_full(model, names, s):
    """Full fine-tuning: no adapter modules; every base weight trains (tied weights counted once). A 16-bit weight
    trains through an fp32 master (choice 11): each gradient is moved onto the master as backward accumulates it."""
    masters = []
    for w in dict.fromkeys(model.parameters()):
        if w.dtype not in (torch.bfloat16, torch.float16):
            masters.append(w)  # fp32 (or fp64): the weight is its own master
            continue
        m = w.detach().float().requires_grad_(True)  # same shape, fp32
        w.register_post_accumulate_grad_hook(grad_to_master(m))
        masters.append(m)
    return [], masters, []


def grad_to_master(m):
    def hook(w):  # w.grad (16-bit) holds this backward's gradient: add it to the master's in fp32, free it
        m.grad = w.grad.float() if m.grad is None else m.grad.add_(w.grad)
        w.grad = None

    return hook


# -----------------------------------------------------------------------------
# the handle


class Adapter:
    """The handle train.py holds: the trainable tensors, the adapted modules, save(), disabled()."""

    def __init__(self, model, settings: dict, modules, params, group_of, fingerprint):
        self.model, self.settings = model, settings
        self.modules = modules  # [(name, module)] in depth order
        self.params = params  # the trainable tensors, fp32 (method full: the masters, or the fp32/fp64 weights)
        self.groups = group_of  # group index of each module (tinylora / loraxs)
        self.fingerprint = fingerprint  # of the base weights, taken before any training

    def __getattr__(self, k):  # adapter.r, adapter.u, adapter.tie, … read the settings
        if k != "settings" and k in self.__dict__.get("settings", {}):
            return self.settings[k]
        raise AttributeError(k)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.params)

    @torch.no_grad()
    def masters_to_model(self):
        """Copy the fp32 masters into the model's 16-bit weights (method full, choice 11; otherwise nothing to do):
        after every optimiser step and after loading trained values into `params`."""
        if self.settings["method"] != "full":
            return
        for w, m in zip(dict.fromkeys(self.model.parameters()), self.params, strict=True):
            if w is not m:
                w.copy_(m)  # rounds to the model's dtype; the master keeps what rounding would lose

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
        return dict(self.model.named_parameters())  # a tied lm_head is the embedding's Parameter: listed once

    def save(self, path: str, dtype: str = "fp32", **meta) -> int:
        """Write the adapter file (export.save_adapter); returns its size in bytes. Keyword args go to metadata."""
        import export

        return export.save_adapter(self, path, dtype, **meta)


if __name__ == "__main__":  # python tinylora.py --model Qwen/Qwen2.5-7B-Instruct --u 1 --tie 16: counts, no weights
    import export

    export.main()
