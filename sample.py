"""
Batched KV-cached sampling with the adapter applied unmerged, so the policy that samples is the policy that trains.

    every adapted linear while sampling:  y = x Wᵀ + b + (x A) Uᵀ,   A = V Mᵀ   (ΔW = U M Vᵀ, rank r)

tinylora.py's modules expose `.lowrank() -> (U, M, V)`. For one generate call each adapted linear runs
`lowrank_linear` below, or a drop-in from kernels.py that `mode` picks (a Triton kernel on CUDA, oneDNN-packed
weights on CPU); tests check that they agree. Measured speeds and mismatches: docs/BENCHMARKS.md.

Choices, each marked *paper* (what the paper's stack did) or *ours*:
1. The adapter is applied unmerged (*ours*). The paper sampled merged bf16 weights with vLLM, where a tiny ΔW mostly
   rounds away, and corrected by importance sampling; mode="merged" reproduces that, for comparison only.
2. A = V Mᵀ is folded once per call (*ours*): one (d_in, r) matrix instead of two contractions per token.
3. Sampling (*ours*, the usual semantics): logits / temperature, then top-k, then top-p over the k survivors (the
   smallest prefix of the sorted survivors whose mass reaches top_p). Only top-p without top-k sorts the vocabulary.
4. The draw inverts the fp64 cumulative distribution at one uniform per row (*ours*): no host sync, and no
   exponential per vocabulary entry as a Gumbel-max draw needs.
5. `logp` is the log-prob under the distribution drawn from (*ours*): the tempered, filtered log_softmax, so the
   model's own at temperature 1 without filtering (what GRPO's ratio needs); greedy gives the temperature-1 value.
6. Prompts left-padded, per-row positions; all rows decode in lock-step into one preallocated cache (*ours*).
7. A prompt sampled G times is prefilled once into row i*G and its keys/values copied to its G-1 other rows
   (*ours*). Rows are prompt-major: row i*G + g is sample g of prompt i.
8. Finished rows emit pad_id, mask False; the all-finished host sync runs every SYNC_EVERY steps on CUDA (*ours*).
9. The draw's uniforms are a counter-based hash of (seed, row, step) (*ours*): a row's noise does not depend on the
   other rows in the batch (so 10 changes no draw) and no generator state lives in a CUDA graph.
10. Once at most COMPACT_AT of the rows are live (seen at a sync), finished rows leave the batch and the cache (*ours*):
   the tail pays for the live rows' keys/values only (`dev/tail.py` measures how much of a call is tail).
11. Decode step (*ours*): "live" attends over the live slots; "static" over the live length rounded up to
   kernels.BUCKET, write slot on device, no host sync; "graph" replays that as CUDA graphs (default on CUDA).

Letters: N rows (= prompts × G), P prompts, G samples per prompt, T new tokens, S cache slots, Lp padded prompt
length, V vocab, r the adapter rank.
"""

import argparse
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import kernels

MODES = ("auto", "torch", "triton", "merged")  # which linears run: kernels.py picks by mode
DECODES = ("auto", "live", "static", "graph", "compile")  # how the decode step runs (choice 11)
SYNC_EVERY = 8  # decode steps between all-finished checks on CUDA (a host sync); CPU checks every step
COMPACT_AT = 0.5  # drop finished rows once at most this fraction of the batch is live (choice 10)


@dataclass
class Rollouts:
    prompts: list  # list[list[int]], one per row (prompt-major: row i*G + g is sample g of prompt i)
    tokens: torch.Tensor  # (N, T) long, generated ids right-padded with pad_id
    mask: torch.Tensor  # (N, T) bool, True on generated tokens (including the stop token)
    logp: torch.Tensor  # (N, T) fp32, log-prob of each token under the distribution it was drawn from (0 on padding)
    finish: list  # list[str], "stop" | "length" per row


# -----------------------------------------------------------------------------
# the adapted linear while sampling (the plain path every fast path in kernels.py must match)


def lowrank_linear(x, weight, bias, A, U):
    """y = x Wᵀ + b + (x A) Uᵀ with the low-rank path in fp32 (fp64 for a float64 model, as tinylora.py's forward)."""
    y = F.linear(x, weight, bias)  # (..., d_out)
    s = x.to(A.dtype) @ A  # (..., r)
    if y.dtype == torch.float32:  # add in place: no extra (M, d_out) temporary on the CPU hot path
        y.view(-1, y.shape[-1]).addmm_(s.view(-1, s.shape[-1]), U.T)
        return y
    return y + (s @ U.T).to(y.dtype)


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


def sample_next(logits, u, temperature=1.0, top_k=0, top_p=1.0):
    """Next token (N,) and its log-prob (N,) under the distribution it was drawn from (choice 5), drawn by inverting
    the cumulative distribution at the uniforms u (N,) fp64 in [0, 1) (choice 4)."""
    if temperature == 0:  # greedy; logp is the temperature-1 log-softmax of the argmax
        tok = logits.argmax(-1)  # (N,)
        return tok, logits.float().log_softmax(-1).gather(-1, tok[:, None])[:, 0]
    z, ids = filter_logits(logits, temperature, top_k, top_p)
    logp = z.log_softmax(-1)  # (N, C)
    cdf = logp.exp().double().cumsum(-1)  # (N, C) running mass in fp64
    total = cdf[:, -1:]  # (N, 1), 1 up to rounding
    u = torch.minimum(u[:, None] * total, total.nextafter(torch.zeros_like(total)))  # u < total even if it rounds up
    j = torch.searchsorted(cdf, u, right=True)  # (N, 1): first candidate whose running mass passes u, so p_j > 0
    tok = j if ids is None else ids.gather(-1, j)
    return tok[:, 0], logp.gather(-1, j)[:, 0]


def mix32(x):
    """A 32-bit integer hash (the "lowbias32" finaliser) on int64 tensors holding values < 2**32; each product is
    split into 16-bit halves of the constant so nothing overflows int64."""
    for shift, c in ((16, 0x7FEB352D), (15, 0x846CA68B)):
        x = x ^ (x >> shift)
        x = (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & 0xFFFFFFFF  # x * c mod 2**32
    return x ^ (x >> 16)


def row_keys(seed, rows):
    """(N,) 32-bit keys of rows (N,) long, from seed (2,) long: the per-row half of the counter-based draw."""
    return mix32(mix32(rows ^ seed[0]) ^ seed[1])


def uniforms(keys, T: int):
    """(N, T) fp64 uniforms in [0, 1): row n's at step t a pure function of (seed, row, t) (choice 9), 53 bits from
    two hashes of the row's key and the step. Made once per call: 8 MB at 256 rows x 4,096 steps."""
    lanes = torch.arange(2 * T, device=keys.device).view(T, 2)  # (T, 2): two counters per step
    h = mix32(mix32(keys[:, None, None] ^ lanes))  # (N, T, 2), < 2**32
    return ((h[..., 0] << 21) | (h[..., 1] >> 11)).double() * 2.0**-53


# -----------------------------------------------------------------------------
# generate


def check_args(prompts, G, max_new_tokens, temperature, top_k, top_p, vocab_size, mode, decode, device, generator):
    if not prompts or not all(isinstance(p, (list, tuple)) and len(p) > 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token-id lists (tokenize the prompts first)")
    if not all(isinstance(t, int) and 0 <= t < vocab_size for p in prompts for t in p):
        raise ValueError(f"prompt token ids must be ints in [0, {vocab_size}) for this model's vocabulary")
    if G < 1 or max_new_tokens < 1:
        raise ValueError(f"G ({G}) and max_new_tokens ({max_new_tokens}) must be at least 1")
    if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0, top_k >= 0, 0 < top_p <= 1; got {temperature}, {top_k}, {top_p}")
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of {MODES}")
    if decode not in DECODES:
        raise ValueError(f"decode={decode!r} is not one of {DECODES}")
    if decode == "graph" and device.type != "cuda":
        raise ValueError("decode='graph' captures CUDA graphs and needs a CUDA device; use 'static' or 'live' here")
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"the generator is on {generator.device} but the model on {device}: make it there")


def live_step(model, cache, key_mask, pos, Lp):
    """The plain decode step: the tokens x (n, 1) of step t into slot Lp + t, attending over the live slots only."""
    return lambda x, t: model(x, pos + t, cache=cache, start=Lp + t, key_mask=key_mask[:, : Lp + t + 1])[:, -1]


def keep_rows(cache, keep):
    """The cache holding only rows keep (n,), moved to the front of the same buffers one layer at a time (choice 10)."""
    n = len(keep)
    for buf in (cache.k, cache.v):
        for layer in range(buf.shape[0]):
            buf[layer, :n] = buf[layer, keep]  # (n, Hkv, S, D): the gather copies before the write
    return type(cache)(cache.k[:, :n], cache.v[:, :n])


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
    decode="auto",
    compact=True,
) -> Rollouts:
    """Sample G completions of every prompt (token-id lists) in one lock-step batch through a preallocated KV cache.

    temperature 0 is greedy. Returns Rollouts; see the module docstring for the logp definition (choice 5).
    mode picks the linears' path (MODES), decode the decode step's (DECODES, choice 11); compact drops finished
    rows from the batch once at most half are live (choice 10).
    """
    dev = model.model.embed_tokens.weight.device
    check_args(
        prompts, G, max_new_tokens, temperature, top_k, top_p, model.cfg.vocab_size, mode, decode, dev, generator
    )
    decode = ("graph" if dev.type == "cuda" else "live") if decode == "auto" else decode
    P, T = len(prompts), max_new_tokens
    N = P * G
    lens = torch.tensor([len(p) for p in prompts], device=dev)  # (P,)
    Lp = max(len(p) for p in prompts)
    idx = torch.tensor([[pad_id] * (Lp - len(p)) + list(p) for p in prompts], device=dev)  # (P, Lp), left-padded
    key_mask = torch.zeros(N, Lp + T, dtype=torch.bool, device=dev)  # (N, S): True once a slot holds a real token
    key_mask[:, :Lp] = (torch.arange(Lp, device=dev) >= Lp - lens[:, None]).repeat_interleave(G, 0)  # pads off
    cache = model.new_cache(N, Lp + T)  # k, v: (L, N, Hkv, S, D)
    stop = torch.tensor(sorted(set(stop_ids)) or [-1], device=dev)
    tokens = torch.full((N, T), pad_id, dtype=torch.long, device=dev)
    mask = torch.zeros(N, T, dtype=torch.bool, device=dev)
    logp = torch.zeros(N, T, dtype=torch.float32, device=dev)
    done = torch.zeros(N, dtype=torch.bool, device=dev)  # per original row
    rows = torch.arange(N, device=dev)  # (n,): the original rows still in the batch
    pos = lens.repeat_interleave(G)[:, None]  # (n, 1): the position of each row's first generated token
    seed = torch.randint(0, 2**32, (2,), generator=generator, device=generator.device if generator else "cpu")
    u = uniforms(row_keys(seed.to(dev), rows), T)  # (n, T): every draw of the call (choice 9)
    sync_every = SYNC_EVERY if dev.type == "cuda" else 1

    def make_step():  # the decode step for the rows in the batch now: the plain one, or a static-length drop-in
        if decode == "live":
            return live_step(model, cache, key_mask, pos, Lp)
        return kernels.StaticDecode(model, cache, key_mask, pos, Lp, how=decode)

    with kernels.sampling_forwards(model, mode, rows=N):  # the linears' path for this call
        # 1) prefill each prompt once, into cache rows 0, G, 2G, ... (a strided view of the big cache)
        sub = type(cache)(cache.k[:, ::G], cache.v[:, ::G])
        h = model(idx, cache=sub, start=0, key_mask=key_mask[::G, :Lp], hidden_only=True)  # (P, Lp, C)
        logits = model.lm_head(h[:, -1]).repeat_interleave(G, 0)  # (N, V): last position only, fanned out
        # 2) copy each prompt's keys/values to its other G-1 rows (choice 7)
        if G > 1:
            for buf in (cache.k, cache.v):
                b = buf.view(buf.shape[0], P, G, *buf.shape[2:])  # (L, P, G, Hkv, S, D)
                b[:, :, 1:, :, :Lp] = b[:, :, :1, :, :Lp]
        # 3) decode: sample, record, feed the token back; finished rows emit padding (choice 8)
        step, t_end = make_step(), T
        for t in range(T):
            tok, lp = sample_next(logits, u[:, t], temperature, top_k, top_p)  # (n,), (n,)
            fin = done[rows]  # (n,)
            tokens[rows, t] = tok.masked_fill(fin, pad_id)
            logp[rows, t] = lp.masked_fill(fin, 0.0)
            mask[rows, t] = ~fin
            fin = fin | torch.isin(tok, stop)
            done[rows] = fin
            if t == T - 1:
                break
            if (t + 1) % sync_every == 0:  # a host sync: is anyone left, and are enough rows finished to drop them?
                live = int((~fin).sum())
                if live == 0:
                    t_end = t + 1
                    break
                if compact and live <= len(rows) * COMPACT_AT:  # 4) drop the finished rows (choice 10)
                    keep = (~fin).nonzero()[:, 0]  # (n',)
                    cache, key_mask, pos = keep_rows(cache, keep), key_mask[keep], pos[keep]
                    rows, u, tok, fin = rows[keep], u[keep], tok[keep], fin[keep]
                    step = make_step()
            key_mask[:, Lp + t] = True  # the slot this step writes
            logits = step(tok.masked_fill(fin, pad_id)[:, None], t)  # (n, V)
    finish = ["stop" if d else "length" for d in done.tolist()]
    prompts = [list(p) for p in prompts for _ in range(G)]
    return Rollouts(prompts, tokens[:, :t_end], mask[:, :t_end], logp[:, :t_end], finish)


# -----------------------------------------------------------------------------
# python sample.py --model PATH_OR_ID --prompt "..." [--adapter FILE]: a few samples of one prompt


if __name__ == "__main__":
    from model import load_model
    from tokenizer import Tokenizer

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
    p.add_argument("--decode", default="auto", choices=DECODES)
    args = p.parse_args()
    model, tok = load_model(args.model), Tokenizer(args.model)
    if args.adapter:
        import export

        export.load_adapter(args.adapter, model)
    ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}])
    gen = torch.Generator(model.model.embed_tokens.weight.device).manual_seed(args.seed)
    kw = {k: getattr(args, k) for k in ("G", "max_new_tokens", "temperature", "top_k", "top_p", "mode", "decode")}
    out = generate(model, [ids], stop_ids=tok.stop_ids, pad_id=tok.pad_id, generator=gen, **kw)
    for g in range(args.G):
        n = int(out.mask[g].sum())
        print(f"--- sample {g} ({out.finish[g]}, {n} tokens, mean logp {out.logp[g, :n].mean():.3f})")
        print(tok.decode(out.tokens[g, :n].tolist()))
