"""
The memory a run needs, from the model's config alone, before any weight loads: print it, check it fits, or pick the
largest training micro-batch that fits; and how rows are packed into micro-batches under a token budget.

    python memory.py --model Qwen/Qwen2.5-7B-Instruct --recipe gsm8k --gpu h200   # the paper's GSM8K run, one H200
    python memory.py --model DIR --device cpu --prompts-per-call 2 --G 4 --max-prompt-tokens 300 --max-new-tokens 128

A step has two peaks that never overlap, each over the resident weights:
    sampling = weights + KV cache (rows x (longest prompt + max new tokens) slots) + prefill transients + logits buffers
    training = weights + saved activations of one micro-batch (rows x padded length) + one lm_head chunk
               + gradients + optimizer state + the adapter's frozen factors
    peak     = max(sampling, training) + allocator headroom

Choices, each marked *measured* (saved-tensor hooks on a real-width block, see ACT_NOTE) or *ours* (an estimate from
the ops, with its reason):
1. Activations per token per layer are a formula in the config's widths, read off the storages autograd keeps for one
   real-width block (bf16 and fp32, adapter on every linear, causal attention without a mask) (*measured*): exact for
   Qwen2.5-7B, Llama-3.1-8B and Qwen3-8B (tests/test_memory.py re-measures them and a whole-model micro-batch).
2. Gradient checkpointing (grpo.use_grad_checkpointing) keeps each block's input (C values a token) and recomputes one
   block at a time in backward, so it costs L·C·b + one block's activations a token (*ours*, from checkpoint()).
3. The lm_head loss runs on completion tokens only, `chunk` at a time; in backward one chunk holds its logits in the
   model dtype and in fp32, their log-softmax and its gradient: (2·b + 12)·V bytes a token (*ours*, grpo._chunk_logp).
4. Sampling's prefill runs one block at a time without gradients over the prompts (not the G copies): the transient
   is the MLP's three (P·Lp, I) tensors plus K/V repeated for a left-padded GQA prefill (*ours*, model.attend).
5. Decode logits: the head's output in the model dtype, fp32 copies for the tempered logits, the log-softmax and its
   exp, and the fp64 running mass (sample.sample_next) over the candidates: the whole vocabulary, or top-k (*ours*).
6. On CPU the sampler packs a second copy of every linear for oneDNN unless it would take over half the free
   memory (sample.py choice 10); the plan applies the same rule (*ours*, from its code).
7. Headroom: 10% of the peak plus 1 GiB (CUDA context, allocator fragmentation, the caching allocator's rounding)
   (*ours*: a margin, not a measurement).
8. AdamW holds two moments per trained parameter in the parameter's dtype (fp32 for v, A, B; the model's dtype for
   method full), plus a gradient of the same size (*ours*, torch.optim.AdamW).

Letters: L layers, C hidden, I intermediate, H / Hkv heads, D head_dim, Hd = H·D, Kd = Hkv·D, V vocab, b bytes of
an activation (2 for bf16), r adapter rank, P prompts per sampling call, G samples each, Lp longest prompt,
T max new tokens, N rows.
"""

import argparse
import math
import os
from dataclasses import dataclass, field

GiB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# the recipes of the paper's two setups (prompts per step, G, longest prompt, max new tokens)
RECIPES = {
    "gsm8k": dict(prompts_per_call=64, G=4, max_prompt_tokens=512, max_new_tokens=4096),
    "math": dict(prompts_per_call=32, G=8, max_prompt_tokens=1024, max_new_tokens=3072),
}
# memory a device reports as total (torch.cuda.get_device_properties(0).total_memory), for planning elsewhere
GPUS = {"h200": 143_771 * 2**20, "h100": 81_559 * 2**20, "a100-80gb": 81_920 * 2**20, "a100-40gb": 40_536 * 2**20}

ACT_NOTE = (  # choice 1: how the activation formula below was obtained
    "measured: tests/test_memory.py::test_block_activations_formula (torch.autograd.graph.saved_tensors_hooks, "
    "unique storages, weights excluded) on one real-width block with TinyLoRA on all 7 linears: Qwen2.5-7B bf16 "
    "158,896 B/token/layer, fp32 288,944; Llama-3.1-8B bf16 139,456; Qwen3-8B bf16 147,808; no dependence on T"
)


def activation_bytes_per_token_layer(cfg, b: int, r: int = 2, cuda_fp32_gqa: bool = False) -> int:
    """Bytes autograd keeps per token per block in training (choice 1; ACT_NOTE says how it was measured)."""
    C, I, D = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    Hd, Kd = H * D, Hkv * D
    n = 3 * I * b  # gate(x), up(x), silu(gate(x)): the MLP's backward needs all three
    n += 2 * C * 4  # the two RMSNorms' inputs in fp32 (their own fp32 copy in bf16, the residual itself in fp32)
    n += 2 * 4  # the two RMSNorms' 1/rms
    n += 2 * Hd * b  # q after RoPE and the attention output (SDPA's backward)
    n += 2 * (Hd if cuda_fp32_gqa else Kd) * b  # k after RoPE and v (repeated to H heads for fp32 GQA on CUDA)
    n += H * 4  # SDPA's logsumexp
    n += 7 * r * 4  # x V of each adapted linear (fp32), for the gradient of v
    if cfg.qk_norm:  # Qwen3: q/k RMSNorm inputs in fp32 and their 1/rms
        n += (Hd + Kd) * 4 + (H + Hkv) * 4
    return n


# -----------------------------------------------------------------------------
# the plan


@dataclass
class Item:
    phase: str  # "both", "sampling" or "training"
    name: str
    nbytes: int
    note: str = ""


@dataclass
class Plan:
    model: str
    device: str
    dtype: str
    settings: dict
    items: list = field(default_factory=list)
    headroom_frac: float = 0.10
    headroom_fixed: int = GiB

    def total(self, phase: str) -> int:
        return sum(i.nbytes for i in self.items if i.phase in ("both", phase))

    @property
    def sampling(self) -> int:
        return self.total("sampling")

    @property
    def training(self) -> int:
        return self.total("training")

    @property
    def headroom(self) -> int:
        return int(self.headroom_frac * max(self.sampling, self.training)) + self.headroom_fixed

    @property
    def peak(self) -> int:
        return max(self.sampling, self.training) + self.headroom

    def get(self, name: str) -> int:
        return sum(i.nbytes for i in self.items if i.name.startswith(name))


def read_config(model):
    """A model.Config from a Config, a dict, a local folder or a built-in name (no network: a plan is instant)."""
    import export
    from model import Config, load_config

    if isinstance(model, Config):
        return model
    if isinstance(model, dict):
        return Config.from_dict(model)
    if os.path.isdir(model):
        return load_config(model)
    if model in export.BUILTIN_CONFIGS:
        return Config.from_dict(export.BUILTIN_CONFIGS[model])
    return export.read_config(model)[0]


def weight_params(cfg) -> int:
    """Every parameter of the checkpoint (embedding, blocks, final norm, untied head)."""
    from model import linear_shapes

    C, D, I = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    Hd, Kd = cfg.num_attention_heads * D, cfg.num_key_value_heads * D
    block = sum(a * b for a, b in linear_shapes(cfg).values()) + 2 * C  # 7 linears + 2 norms
    block += (Hd + 2 * Kd) * cfg.attention_bias + (2 * I + C) * cfg.mlp_bias + 2 * D * cfg.qk_norm
    head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * C
    return cfg.vocab_size * C + cfg.num_hidden_layers * block + C + head


def trained_params(cfg, method: str, r: int, u: int, tie: int) -> int:
    import export

    return export.count_params(cfg, method, r, u, tie)


def plan(
    model,
    *,
    dtype: str = "bfloat16",
    method: str = "tinylora",
    r: int = 2,
    u: int = 1,
    tie: int = 16,
    prompts_per_call: int = 64,
    G: int = 4,
    max_prompt_tokens: int = 512,
    max_new_tokens: int = 4096,
    micro_batch_tokens: int | None = None,
    micro_batch: int | None = 16,
    grad_checkpointing: bool = False,
    chunk: int = 4096,
    top_k: int = 0,
    top_p: float = 1.0,
    optimizer: str = "adamw",
    device: str = "cuda",
    packed_cpu_copy: bool | None = None,
) -> Plan:
    """The per-item memory of one step (bytes). The training micro-batch is `micro_batch` rows of the longest padded
    length, or, with micro_batch_tokens, as many such rows as fit in that many padded tokens (at least one)."""
    cfg = read_config(model)
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype {dtype!r}: use one of {', '.join(DTYPE_BYTES)}")
    if optimizer not in ("adamw", "sgd"):
        raise ValueError(f"optimizer {optimizer!r}: the plan knows adamw and sgd")
    b = DTYPE_BYTES[dtype]
    dev = device.split(":")[0]
    L, C, I, V = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    H, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    Pn, Lp, T = prompts_per_call, max_prompt_tokens, max_new_tokens
    N, S = Pn * G, max_prompt_tokens + max_new_tokens  # rows of a sampling call, cache slots (= padded row length)
    name = getattr(cfg, "name", None) or (model if isinstance(model, str) else cfg.architecture)
    rows_mb = max(1, micro_batch_tokens // S) if micro_batch_tokens else N  # train.py's --micro-batch-tokens
    rows_mb = min(rows_mb, micro_batch or N, N)  # --micro-batch caps the rows too (0 / None: no cap)
    settings = dict(prompts_per_call=Pn, G=G, max_prompt_tokens=Lp, max_new_tokens=T, rows=N, slots=S,
                    micro_batch_rows=rows_mb, micro_batch_tokens=micro_batch_tokens, chunk=chunk, top_k=top_k,
                    top_p=top_p, method=method, r=r, u=u, tie=tie, optimizer=optimizer, vocab_size=V)  # fmt: skip
    settings["grad_checkpointing"] = grad_checkpointing
    p = Plan(model=str(name), device=device, dtype=dtype, settings=settings)
    add = lambda phase, what, n, note="": p.items.append(Item(phase, what, int(n), note))  # noqa: E731

    # both phases: the weights and the adapter's frozen factors
    n_w = weight_params(cfg)
    add("both", "weights", n_w * b, f"{n_w / 1e9:.2f}B parameters in {dtype}")
    if method != "full":
        from model import linear_shapes

        per_layer = sum(a + c for a, c in linear_shapes(cfg).values())  # d_out + d_in of the 7 linears
        add("both", "adapter factors", L * per_layer * r * 4, f"U, V of rank {r} per linear, fp32")

    # sampling (choices 4-6)
    add("sampling", "KV cache", 2 * L * Hkv * D * b * N * S, f"{N} rows x {S:,} slots x {2 * L * Hkv * D * b:,} B")
    prefill = Pn * Lp * (3 * I * b + (2 * H * D * b if Hkv < H else 0) + C * b) + Pn * Lp * Lp  # + (P, 1, Lp, Lp) mask
    add("sampling", "prefill transients", prefill, f"one block over {Pn} prompts x {Lp} tokens, no grad")
    cand = V if not top_k or top_k >= V else top_k
    per_row = V * (b + 4) + cand * (4 + 4 + 4 + 8)  # head output + fp32 logits; tempered, log-softmax, exp, fp64 cdf
    if top_k and top_k < V:
        per_row += cand * 8  # the top-k ids
    elif top_p < 1:
        per_row += V * (8 + 4 + 4)  # full sort: ids, softmax, cumsum
    add("sampling", "logits buffers", N * per_row, "top-k" if top_k else ("full sort (top-p)" if top_p < 1 else ""))
    add("sampling", "rollout buffers", N * T * (8 + 4 + 1) + N * S, "tokens, log-probs, masks")
    from model import linear_shapes

    lin = (L * sum(a * c for a, c in linear_shapes(cfg).values()) + V * C) * b  # every block linear + the head
    packed = packed_cpu_copy
    if packed is None:  # the sampler's own rule: it packs on CPU unless the copy would take over half the free memory
        packed = dev == "cpu" and lin <= free_memory("cpu") / 2
    if packed:
        add("sampling", "packed weight copy", lin, "CPU oneDNN prepacked linears (sample.py choice 10)")

    # training (choices 1-3, 8)
    tok = rows_mb * S  # padded tokens of the largest micro-batch
    a = activation_bytes_per_token_layer(cfg, b, r, cuda_fp32_gqa=dev == "cuda" and b == 4 and Hkv < H)
    if grad_checkpointing:
        add("training", "activations", tok * (L * C * b + a), f"{rows_mb} rows x {S:,}: block inputs + one block")
    else:
        add("training", "activations", tok * L * a, f"{rows_mb} rows x {S:,} tokens x {L} layers x {a:,} B")
    n_sel = min(rows_mb * T, tok)  # completion tokens of the micro-batch
    add("training", "final hidden + norm", tok * (C * 4 + 4) + n_sel * C * b, "final RMSNorm input, selected states")
    add("training", "lm_head chunk", min(chunk, n_sel) * V * (2 * b + 12), f"{min(chunk, n_sel):,} tokens x {V:,}")
    n_t = n_w if method == "full" else trained_params(cfg, method, r, u, tie)
    tb = b if method == "full" else 4
    add("training", "gradients", n_t * tb, f"{n_t:,} trained parameters")
    if optimizer == "adamw":
        add("training", "optimizer state", 2 * n_t * tb, "AdamW exp_avg + exp_avg_sq")
    return p


# -----------------------------------------------------------------------------
# micro-batches under a token budget: what grpo.py packs and the plan above sizes


def micro_batches(lengths, budget: int = 0, max_rows: int = 0) -> list[list[int]]:
    """Rows -> micro-batches, as lists of row indices that together cover every row once (grpo.py choice 3).

    lengths: (prompt tokens, completion tokens) per row. budget > 0: rows sorted longest first, packed greedily while
    rows x (longest prompt + longest completion) <= budget (what pack pads them to); a row longer than the budget
    gets a micro-batch of its own. max_rows > 0 caps the rows of a micro-batch as well; without a budget the
    micro-batches are consecutive runs of max_rows rows in their original order."""
    N = len(lengths)
    assert budget > 0 or max_rows > 0, "give a token budget, a row count, or both"
    if budget <= 0:
        return [list(range(s, min(s + max_rows, N))) for s in range(0, N, max_rows)]
    order = sorted(range(N), key=lambda i: -(lengths[i][0] + lengths[i][1]))  # stable: ties keep their order
    out, cur, P, T = [], [], 0, 0
    for i in order:
        p, t = max(P, lengths[i][0]), max(T, lengths[i][1])  # the padded width if row i joins
        if cur and ((len(cur) + 1) * (p + t) > budget or 0 < max_rows <= len(cur)):
            out.append(cur)
            cur, p, t = [], lengths[i][0], lengths[i][1]
        cur.append(i)
        P, T = p, t
    return out + [cur] if cur else out


def row_lengths(prompts, mask) -> list[tuple[int, int]]:
    """(prompt tokens, completion tokens) per row, for micro_batches."""
    return list(zip(map(len, prompts), mask.sum(1).tolist()))


# -----------------------------------------------------------------------------
# does it fit, and what to change


def free_memory(device: str = "cuda") -> int:
    """Bytes free now: cudaMemGetInfo on CUDA, MemAvailable from /proc/meminfo on CPU."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.mem_get_info(torch.device(device))[0]
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:")) * 1024


def fits(p: Plan, free: int | None = None) -> bool:
    return p.peak <= (free_memory(p.device) if free is None else free)


def choose(model, *, micro_batch_tokens="auto", grad_checkpointing="auto", free=None, **kw):
    """(plan, advice). With micro_batch_tokens / grad_checkpointing 'auto': the largest token budget (the padded row
    length times a power of two, up to all rows) that fits, without checkpointing if possible; advice is None.
    When nothing fits (or the fixed settings do not): the closest plan and the sentence saying what to change."""
    free = free_memory(kw.get("device", "cuda")) if free is None else free
    kw.pop("micro_batch", None)
    S = kw.get("max_prompt_tokens", 512) + kw.get("max_new_tokens", 4096)
    N = kw.get("prompts_per_call", 64) * kw.get("G", 4)
    budgets = sorted({S * 2**k for k in range(int(math.log2(N)) + 1)} | {S * N}, reverse=True)  # all rows .. 1 row
    tokens = budgets if micro_batch_tokens == "auto" else [micro_batch_tokens]
    ckpts = [False, True] if grad_checkpointing == "auto" else [bool(grad_checkpointing)]
    tried = [
        plan(model, micro_batch_tokens=t, grad_checkpointing=ck, micro_batch=None, **kw) for ck in ckpts for t in tokens
    ]
    for p in tried:
        if p.peak <= free:
            return p, None
    return tried[-1], advice(model, tried[-1], free, **kw)


def advice(model, p: Plan, free: int, **kw) -> str:
    """The sentence for a plan that does not fit: which setting to change, and to what, where one change does it."""
    s = p.settings
    need = f"needs {p.peak / GiB:.1f} GiB ({p.model}, {p.dtype}) but {free / GiB:.1f} GiB are free"
    kw = {k: v for k, v in kw.items() if k not in ("micro_batch", "micro_batch_tokens", "grad_checkpointing")}
    small = dict(micro_batch=1, grad_checkpointing=True)
    least = plan(model, **{**kw, "prompts_per_call": 1, "G": 1}, **small)
    if least.peak > free:  # the weights alone (with the least sampling and training) do not fit
        return f"{need}; even one row needs {least.peak / GiB:.1f} GiB: use a device with more memory"
    if plan(model, **kw, **small).peak > free:  # sampling is the problem: fewer prompts per call
        for k in range(int(math.log2(max(s["prompts_per_call"], 1))), -1, -1):
            if plan(model, **{**kw, "prompts_per_call": 2**k}, **small).peak <= free:
                return f"sampling {need}: use --sample-batch {2**k} (prompts per sampling call)"
        return f"{need}, even one prompt per call and one training row: shorten --max-new-tokens or use a bigger device"
    S = s["max_prompt_tokens"] + s["max_new_tokens"]
    opts = []
    for ck in (False, True):
        small = dict(micro_batch=None, grad_checkpointing=ck)
        fit = [2**k for k in range(int(math.log2(max(s["rows"], 1))), -1, -1)
               if plan(model, **kw, micro_batch_tokens=S * 2**k, **small).peak <= free]  # fmt: skip
        if fit:
            opts.append(f"--micro-batch-tokens {S * fit[0]}" + (" --grad-checkpointing" * ck))
    return f"training {need}: use {' or '.join(opts)}"


def plan_for_run(cfg, args, max_prompt_tokens: int, world: int = 1, free: int | None = None):
    """train.py's hook, called after the data and the config are read and before the weights load:
        p, msg = memory.plan_for_run(cfg, args, max_prompt_tokens=<longest tokenized prompt>, world=world)
        print(memory.format_plan(p, memory.free_memory(device)));  if msg: raise SystemExit(msg)
    A micro_batch_tokens / grad_checkpointing of 'auto' in args is chosen here (set them from p.settings); fixed
    settings that do not fit give the sentence naming the flag to change."""
    device = args.device or "cuda"
    kw = dict(dtype=args.dtype or ("bfloat16" if device.startswith("cuda") else "float32"), method=args.method,
              r=args.r, u=args.u, tie=args.tie or 1, G=args.G, max_prompt_tokens=max_prompt_tokens,
              max_new_tokens=args.max_new_tokens, chunk=args.chunk, top_k=args.top_k, top_p=args.top_p,
              device=device, prompts_per_call=args.sample_batch or max(args.prompts_per_step // world, 1))  # fmt: skip
    free = free_memory(device) if free is None else free
    mbt = getattr(args, "micro_batch_tokens", 0) or None  # 0: off, rows only
    ck = args.grad_checkpointing
    if mbt == "auto" or ck == "auto":  # choose() plans in tokens alone: set --micro-batch 0 with its choice
        return choose(cfg, micro_batch_tokens=mbt or "auto", grad_checkpointing=ck, free=free, **kw)
    p = plan(cfg, micro_batch_tokens=mbt, micro_batch=args.micro_batch, grad_checkpointing=bool(ck), **kw)
    return p, (None if p.peak <= free else advice(cfg, p, free, **kw))


def format_plan(p: Plan, free: int | None = None) -> str:
    """The plan as a small table, for train.py to print before it loads the weights."""
    s = p.settings
    head = (f"memory plan: {p.model} in {p.dtype} on {p.device} | sampling {s['rows']} rows "
            f"({s['prompts_per_call']} prompts x G {s['G']}) x {s['slots']:,} slots | training micro-batch "
            f"{s['micro_batch_rows']} rows x {s['slots']:,}")  # fmt: skip
    head += " + grad checkpointing" * bool(s["grad_checkpointing"])
    lines = [head, f"  {'phase':<9} {'item':<22} {'GiB':>8}  note"]
    for i in p.items:
        lines.append(f"  {i.phase:<9} {i.name:<22} {i.nbytes / GiB:8.2f}  {i.note}")
    lines.append(f"  {'':<9} {'sampling peak':<22} {p.sampling / GiB:8.2f}")
    lines.append(f"  {'':<9} {'training peak':<22} {p.training / GiB:8.2f}")
    lines.append(f"  {'':<9} {'headroom':<22} {p.headroom / GiB:8.2f}  10% + 1 GiB")
    verdict = "" if free is None else f"  of {free / GiB:.1f} free: {'fits' if p.peak <= free else 'DOES NOT FIT'}"
    lines.append(f"  {'':<9} {'PEAK':<22} {p.peak / GiB:8.2f}{verdict}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Memory plan of a run from the model's config (no weights loaded).")
    ap.add_argument("--model", default="Qwen/Qwen2.5-7B-Instruct", help="local folder, Hub id or built-in name")
    ap.add_argument("--recipe", default=None, choices=list(RECIPES), help="the paper's setup (sets the four below)")
    ap.add_argument("--prompts-per-call", type=int, default=64, help="prompts per sampling call (--sample-batch)")
    ap.add_argument("--G", type=int, default=4)
    ap.add_argument("--max-prompt-tokens", type=int, default=512)
    ap.add_argument("--max-new-tokens", type=int, default=4096)
    ap.add_argument("--micro-batch", type=int, default=None, help="rows per training micro-batch")
    ap.add_argument("--micro-batch-tokens", default="auto", help="padded tokens per micro-batch, or 'auto'")
    ap.add_argument("--grad-checkpointing", default="auto", choices=["auto", "on", "off"])
    ap.add_argument("--dtype", default="bfloat16", choices=list(DTYPE_BYTES))
    ap.add_argument("--method", default="tinylora", choices=["tinylora", "loraxs", "lora", "full"])
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--device", default="cuda", help="cuda | cpu (what the run will use)")
    ap.add_argument("--gpu", default=None, choices=list(GPUS), help="plan against this GPU's memory, not this machine")
    recipe = ap.parse_known_args(argv)[0].recipe
    ap.set_defaults(**RECIPES.get(recipe, {}))  # a recipe sets defaults; flags given beside it still win
    args = ap.parse_args(argv)
    kw = dict(prompts_per_call=args.prompts_per_call, G=args.G, max_prompt_tokens=args.max_prompt_tokens,
              max_new_tokens=args.max_new_tokens)  # fmt: skip
    kw |= dict(dtype=args.dtype, method=args.method, top_k=args.top_k, top_p=args.top_p, device=args.device)
    free = GPUS[args.gpu] if args.gpu else free_memory(args.device)
    if args.micro_batch:
        ck = args.grad_checkpointing == "on"
        p = plan(args.model, micro_batch=args.micro_batch, grad_checkpointing=ck, **kw)
        msg = None if p.peak <= free else advice(args.model, p, free, **kw)
    else:
        mbt = args.micro_batch_tokens if args.micro_batch_tokens == "auto" else int(args.micro_batch_tokens)
        ck = "auto" if args.grad_checkpointing == "auto" else args.grad_checkpointing == "on"
        p, msg = choose(args.model, micro_batch_tokens=mbt, grad_checkpointing=ck, free=free, **kw)
    print(format_plan(p, free))
    if msg:
        print(msg)
    elif args.micro_batch is None:
        s = p.settings
        flags = f"--micro-batch-tokens {s['micro_batch_tokens']}" + (" --grad-checkpointing" * s["grad_checkpointing"])
        print(f"chosen: {flags} ({s['micro_batch_rows']} rows of {s['slots']:,} tokens per micro-batch)")
    return p


if __name__ == "__main__":
    main()
