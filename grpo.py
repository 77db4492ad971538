"""
GRPO as pure functions over tensors: group advantages, the clipped token-level loss, the k3 KL, truncated
importance sampling, chunked log-probs, and one gradient pass over a batch of rollouts in micro-batches.

For prompt q with G completions o_1..o_G, rewards r_i, and tokens o_i,t:

    A_i      = (r_i - mean(r)) / (std(r) + eps)                      (Dr. GRPO: no division by std)
    rho_i,t  = pi(o_i,t | q, o_i,<t) / pi_old(o_i,t | ...)
    w_i,t    = min(pi_old / pi_sampler, cap)                         (truncated importance sampling, TIS)
    l_i,t    = -w_i,t * min(rho A_i, clip(rho, 1 - eps_low, 1 + eps_high) A_i) + beta * k3_i,t - c * H_i,t
    k3       = exp(ref - logp) - (ref - logp) - 1                    (ref = the base: adapter switched off)
    H_i,t    = -sum_v pi(v | ...) log pi(v | ...)                     (entropy bonus, weight c: the MATH recipe)
    loss     = agg(l) over completion tokens

Choices, each marked *paper* ("Learning to Reason in 13 Parameters" or the GRPO/DAPO/Dr. GRPO papers it builds on),
*official* (its code) or *ours*:
1. std is the sample std (Bessel's n-1), eps = 1e-6 outside the root (*ours*, as TRL and the official code); a group
   whose rewards are all equal gets A = 0.
2. Aggregation (*paper* names): "token-mean" over all the batch's tokens (DAPO, default); "seq-mean" (GRPO);
   "constant" = sum / (N * norm), norm usually max_new_tokens (Dr. GRPO).
3. Every micro-batch is normalised by the whole batch's counts, so gradients add up to the full-batch one for any
   micro-batch and any number of ranks (*ours*); memory.micro_batches packs rows under a token budget.
4. One update per batch: pi_old is the current policy detached, no second forward, rho = 1 (*ours*; a test checks it
   equals the explicit computation); the sampler's log-probs then feed only TIS and the mismatch metric.
5. TIS multiplies the clipped term by min(exp(old_logp - sampler_logp), cap), cap = 2 (*paper*), detached.
6. Log-probs from the final hidden states at completion positions only, lm_head in `chunk`-token pieces recomputed
   in backward, so (n_tokens, V) fp32 logits never exist at once (*ours*); logits / temperature, as the sampler's.
7. The KL reference is the same network inside `adapter.disabled()`, one no-grad forward when beta > 0 (*paper*).
8. Entropy bonus c = 0.001 for MATH, 0 for GSM8K (*official*): the policy's full-vocabulary entropy at each sampled
   position, in the same chunks as choice 6, aggregated like the loss.

Letters: N rows (prompts x G); rows are [prompt | completion | right padding] (pack), T completion columns,
C hidden, V vocab, n selected tokens.
"""

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from memory import micro_batches, row_lengths  # rows packed into micro-batches under a token budget

AGGS = ("token-mean", "seq-mean", "constant")


# -----------------------------------------------------------------------------
# the algorithm, on tensors


def group_advantages(rewards: torch.Tensor, G: int, std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """(N,) rewards, prompt-major (row i*G + g) -> (N,) advantages, normalised within each group of G."""
    r = rewards.float().view(-1, G)  # (N/G, G)
    adv = r - r.mean(1, keepdim=True)
    if std:  # choice 1: sample std; all-equal groups give 0 / eps = 0
        adv = adv / (r.std(1, keepdim=True) + eps)
    return adv.view(-1)


def aggregate(x: torch.Tensor, mask: torch.Tensor, agg: str = "token-mean", *, n_tokens=None, n_seqs=None, norm=None):
    """Reduce per-token values (N, T) to a scalar (choice 2). n_tokens / n_seqs are the counts of the whole
    batch this micro-batch belongs to (default: this one), so micro-batch results add up (choice 3)."""
    m = mask.float()
    n_seqs = x.shape[0] if n_seqs is None else n_seqs
    if agg == "token-mean":
        n_tokens = m.sum() if n_tokens is None else n_tokens
        return (x * m).sum() / max(float(n_tokens), 1.0)
    if agg == "seq-mean":
        per_seq = (x * m).sum(1) / m.sum(1).clamp(min=1)  # (N,)
        return per_seq.sum() / n_seqs
    if agg == "constant":
        assert norm is not None and norm > 0, "the constant aggregation needs norm > 0 (e.g. max_new_tokens)"
        return (x * m).sum() / (n_seqs * norm)
    raise ValueError(f"unknown aggregation {agg!r}: choose one of {', '.join(AGGS)}")


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || ref) from samples of pi: exp(d) - d - 1 >= 0, d = ref - logp."""
    d = ref_logp - logp
    return d.exp() - d - 1


def tis_weights(old_logp: torch.Tensor, sampler_logp: torch.Tensor, cap: float = 2.0) -> torch.Tensor:
    """Truncated importance weights min(pi_old / pi_sampler, cap) per token (choice 5), no gradient."""
    return (old_logp - sampler_logp).detach().exp().clamp(max=cap)


def policy_loss(
    logp,
    old_logp,
    adv,
    mask,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    agg: str = "token-mean",
    weight=None,
    ref_logp=None,
    beta: float = 0.0,
    entropy=None,
    entropy_coef: float = 0.0,
    n_tokens=None,
    n_seqs=None,
    norm=None,
):
    """The clipped GRPO loss. logp / old_logp / weight / ref_logp / entropy (N, T), adv (N,), mask (N, T) bool.
    Returns (loss, stats) with stats the per-token clip indicator and k3 (detached) for logging."""
    ratio = (logp - old_logp).exp()  # (N, T)
    a = adv[:, None]  # (N, 1)
    unclipped = ratio * a
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high) * a
    pg = -torch.min(unclipped, clipped)  # (N, T)
    if weight is not None:
        pg = pg * weight
    kl = torch.zeros_like(logp) if ref_logp is None else kl_k3(logp, ref_logp)
    per_token = pg + beta * kl if beta else pg
    if entropy_coef:  # choice 8: a bonus, so it lowers the loss
        per_token = per_token - entropy_coef * entropy
    loss = aggregate(per_token, mask, agg, n_tokens=n_tokens, n_seqs=n_seqs, norm=norm)
    stats = {"clipped": (clipped < unclipped).detach() & mask, "kl": kl.detach()}  # where the clip binds
    return loss, stats


# -----------------------------------------------------------------------------
# log-probs from the model, chunked (choice 6)


def _chunk_logp(h, W, t, temperature, entropy=False):
    logits = F.linear(h, W).float() / temperature  # (n, V) fp32, only this chunk's
    lse = logits.logsumexp(-1)  # (n,)
    logp = logits.gather(1, t[:, None]).squeeze(1) - lse  # (n,)
    if not entropy:
        return logp
    p = (logits - lse[:, None]).exp()  # (n, V)
    return logp, lse - (p * logits).sum(-1)  # H = -sum p log p = logsumexp(z) - sum p z  (n,)


def token_logprobs(
    model, input_ids, completion_mask, P: int, chunk: int = 4096, temperature: float = 1.0, entropy: bool = False
):
    """log pi(token) of every completion token given everything before it, in pack's layout.

    input_ids (N, P+T): rows [prompt | completion | right padding], each row's real tokens first, so the forward
    is plain causal attention with no mask (model.py choice 2: the flash kernel's layout). completion_mask
    (N, P+T) is True at each row's completion tokens, columns [len(prompt_i), len(prompt_i) + n_i). Returns
    (N, T) fp32, row i's completion token t at column t, 0 past n_i. The head runs only at the completion
    positions, `chunk` tokens at a time. entropy=True returns (logp, H), H (N, T) the policy's entropy there (8)."""
    N, W = input_ids.shape
    T = W - P  # the longest completion
    assert P >= 1 and T >= 1, "pack's layout: every row has a prompt token, the output at least one column"
    h = model(input_ids, hidden_only=True)  # (N, W, C), causal, positions 0..W-1
    sel = completion_mask[:, 1:]  # (N, W-1): the state at column j predicts the token at column j+1
    h_sel, t_sel = h[:, :-1][sel], input_ids[:, 1:][sel]  # (n, C), (n,) row by row, in column order
    W_head = model.lm_head.weight
    recompute = torch.is_grad_enabled() and h_sel.shape[0] > chunk
    out = []
    for i in range(0, h_sel.shape[0], chunk):
        args = (h_sel[i : i + chunk], W_head, t_sel[i : i + chunk], temperature, entropy)
        part = checkpoint(_chunk_logp, *args, use_reentrant=False) if recompute else _chunk_logp(*args)
        out.append(part if entropy else (part,))
    cols = [torch.cat(c) for c in zip(*out)] if out else [h_sel.new_zeros(0, dtype=torch.float32)] * (1 + entropy)
    mask = torch.arange(T, device=h.device) < completion_mask.sum(1, keepdim=True)  # (N, T): n_i leading columns
    res = [torch.zeros(mask.shape, dtype=torch.float32, device=h.device).masked_scatter(mask, c) for c in cols]
    return tuple(res) if entropy else res[0]  # (N, T) each


def pack(prompts: list[list[int]], tokens: torch.Tensor, mask: torch.Tensor, pad_id: int):
    """Rollouts -> (input_ids, completion_mask, P) in the layout token_logprobs reads: row i is prompt i, then its
    n_i completion tokens, then pad_id, so no padding precedes a real token and attention needs no mask (the
    prompt is not left-padded: completions start at different columns). Rows are W = P + T columns, W the
    longest prompt + completion, T the longest completion (so `ids.shape[1] - P` is the output width of
    token_logprobs; no compute is spent on all-pad columns). tokens / mask (N, T0): right-padded completions."""
    mask = mask.bool()
    assert bool((mask[:, 1:] <= mask[:, :-1]).all()), "completions must be right-padded: each mask row 1..1 0..0"
    n = mask.sum(1).tolist()  # completion lengths
    lens = [len(p) for p in prompts]
    assert min(lens) >= 1, "every row needs at least one prompt token"
    T = max(max(n), 1)
    W = max(max(a + b for a, b in zip(lens, n)), T + 1)
    toks = tokens[:, :T].tolist()
    rows = [list(p) + t[:c] + [pad_id] * (W - len(p) - c) for p, t, c in zip(prompts, toks, n)]
    dev = tokens.device
    ids = torch.tensor(rows, dtype=torch.long, device=dev)  # (N, W)
    col = torch.arange(W, device=dev)[None]  # (1, W)
    lo = torch.tensor(lens, device=dev)[:, None]  # (N, 1): where each completion starts
    completion_mask = (col >= lo) & (col < lo + mask.sum(1, keepdim=True))  # (N, W)
    return ids, completion_mask, W - T


def use_grad_checkpointing(model):
    """Recompute each transformer block in backward instead of storing its activations (only while gradients
    are on, so sampling is unaffected). Costs about one extra forward; pays when activations, not weights,
    fill the memory: long completions and big micro-batches on a GPU."""
    for layer in model.model.layers:

        def run(*args, _forward=layer.forward, **kw):
            if torch.is_grad_enabled():
                return checkpoint(_forward, *args, use_reentrant=False, **kw)
            return _forward(*args, **kw)

        layer.forward = run  # an instance attribute: the state_dict keys do not change


# -----------------------------------------------------------------------------
# one gradient pass over a batch, in micro-batches


def old_logprobs(
    model, prompts, tokens, mask, *, pad_id, micro_batch, micro_batch_tokens=0, chunk=4096, temperature=1.0
):
    """pi_old on the batch, no gradient: needed only when a batch is used for more than one update."""
    out = torch.zeros(tokens.shape, dtype=torch.float32, device=tokens.device)
    with torch.no_grad():
        for idx in micro_batches(row_lengths(prompts, mask), micro_batch_tokens, micro_batch):
            sl = torch.tensor(idx, device=tokens.device)  # this micro-batch's rows
            ids, am, P = pack([prompts[i] for i in idx], tokens[sl], mask[sl], pad_id)
            lp = token_logprobs(model, ids, am, P, chunk, temperature)
            out[sl, : lp.shape[1]] = lp
    return out


def grpo_backward(
    model,
    adapter,
    prompts,
    tokens,
    mask,
    adv,
    sampler_logp,
    *,
    pad_id: int,
    micro_batch: int,
    micro_batch_tokens: int = 0,
    old_logp=None,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    agg: str = "token-mean",
    norm=None,
    beta: float = 0.0,
    entropy_coef: float = 0.0,
    tis_cap: float | None = 2.0,
    temperature: float = 1.0,
    chunk: int = 4096,
    n_tokens=None,
    n_seqs=None,
) -> dict:
    """Accumulate d(loss)/d(params) into .grad over micro-batches (choice 3: at most micro_batch rows and/or
    micro_batch_tokens padded tokens each). Rows are whole rollouts: prompts (list of N id lists), tokens / mask /
    sampler_logp (N, T), adv (N,). old_logp None means on-policy (choice 4). n_tokens / n_seqs default to this
    batch's counts; pass the global ones under torchrun. Returns sums (not means) of the logged quantities, so
    ranks and micro-batches can be added up."""
    mask = mask.bool()
    n_tokens = int(mask.sum()) if n_tokens is None else n_tokens
    n_seqs = len(prompts) if n_seqs is None else n_seqs
    m = {"loss": 0.0, "tokens": 0.0, "clipped": 0.0, "kl": 0.0, "w_sum": 0.0, "w_min": float("inf"), "w_max": 0.0}
    m |= {"mismatch_sum": 0.0, "mismatch_max": 0.0} | ({"entropy": 0.0} if entropy_coef else {})
    for idx in micro_batches(row_lengths(prompts, mask), micro_batch_tokens, micro_batch):
        sl = torch.tensor(idx, device=tokens.device)  # this micro-batch's rows: tensors and prompts indexed alike
        ids, am, P = pack([prompts[i] for i in idx], tokens[sl], mask[sl], pad_id)
        T = ids.shape[1] - P
        mk, s_lp = mask[sl, :T], sampler_logp[sl, :T]  # (n, T)
        ref = None
        if beta:  # choice 7: the base is the same weights with the adapter off
            with torch.no_grad(), adapter.disabled():
                ref = token_logprobs(model, ids, am, P, chunk, temperature)
        logp = token_logprobs(model, ids, am, P, chunk, temperature, entropy=bool(entropy_coef))  # (n, T), grad
        logp, ent = logp if entropy_coef else (logp, None)
        old = logp.detach() if old_logp is None else old_logp[sl, :T]
        w = tis_weights(old, s_lp, tis_cap) if tis_cap else None
        loss, st = policy_loss(
            logp, old, adv[sl], mk, eps_low=eps_low, eps_high=eps_high, agg=agg, weight=w, ref_logp=ref, beta=beta,
            entropy=ent, entropy_coef=entropy_coef, n_tokens=n_tokens, n_seqs=n_seqs, norm=norm,
        )  # fmt: skip
        loss.backward()
        # logging: sums over this micro-batch's real tokens
        diff = (old - s_lp).abs()[mk]
        wt = (old - s_lp).exp().clamp(max=tis_cap)[mk] if tis_cap else torch.ones_like(diff)
        m["loss"] += loss.item()
        m["tokens"] += float(mk.sum())
        m["clipped"] += float(st["clipped"].sum())
        m["kl"] += float(st["kl"][mk].sum())
        m["mismatch_sum"] += float(diff.sum())
        if entropy_coef:
            m["entropy"] += float(ent.detach()[mk].sum())
        if diff.numel():
            m["mismatch_max"] = max(m["mismatch_max"], float(diff.max()))
            m["w_sum"] += float(wt.sum())
            m["w_min"], m["w_max"] = min(m["w_min"], float(wt.min())), max(m["w_max"], float(wt.max()))
    return m


def sft_backward(
    model,
    prompts,
    tokens,
    mask,
    *,
    pad_id: int,
    micro_batch: int,
    micro_batch_tokens: int = 0,
    chunk=4096,
    n_tokens=None,
):
    """The paper's SFT comparison: token-mean negative log-likelihood of reference completions, accumulated into
    .grad over micro-batches. Returns the summed loss."""
    mask = mask.bool()
    n_tokens = int(mask.sum()) if n_tokens is None else n_tokens
    total = 0.0
    for idx in micro_batches(row_lengths(prompts, mask), micro_batch_tokens, micro_batch):
        sl = torch.tensor(idx, device=tokens.device)
        ids, am, P = pack([prompts[i] for i in idx], tokens[sl], mask[sl], pad_id)
        logp = token_logprobs(model, ids, am, P, chunk)  # (n, T)
        loss = -aggregate(logp, mask[sl, : logp.shape[1]], "token-mean", n_tokens=n_tokens)
        loss.backward()
        total += loss.item()
    return total
