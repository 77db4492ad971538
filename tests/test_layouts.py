"""
Attention layouts (model.py choice 2) agree with the obvious path. Run: `python -m pytest -q tests/test_layouts.py`.

- `attend` in each layout (causal with no mask, the GQA group folded into the query axis, K/V repeated with a
  mask) equals softmax(q k^T / sqrt(D)) v computed by hand in float64, values and gradients, at a tiny head layout
  and at Qwen2.5-7B's (28 heads, 4 kv heads, head_dim 128);
- the right-padded causal forward (no mask) equals the explicit-mask forward at every real token, logits and
  gradients, for Qwen2 (4 heads / 2 kv heads), Llama and Qwen3;
- grpo.pack + grpo.token_logprobs equal each row run alone without padding (log-softmax, gather), values and the
  gradient of an adapter's v, and at real Qwen2.5-7B attention widths (hidden 3584, one layer);
- cached decode (folded GQA) equals the full forward; the layouts reach SDPA in the shapes the CUDA kernels take;
- static-length decode (a 0-dim tensor `start`, a bucketed key_mask) equals the live-length decode (an int start).
"""

import pytest
import torch

import attention as A
import grpo
import model as M


@pytest.fixture(scope="module")
def qwen2(make_checkpoint):
    return M.load_model(str(make_checkpoint("qwen2")), dtype=torch.float32, device="cpu")


def left_padded(V, lens, seed=0):
    g = torch.Generator().manual_seed(seed)
    L = max(lens)
    idx = torch.randint(3, V, (len(lens), L), generator=g)
    mask = torch.arange(L)[None] >= L - torch.tensor(lens)[:, None]  # (B, L)
    return idx.masked_fill(~mask, 0), mask


@torch.no_grad()
def test_static_length_decode_equals_live_length_decode(qwen2):
    """Greedy decode of a left-padded batch twice: int start over the live slots, and a device-tensor start over a
    fixed bucket of slots with the unwritten ones masked off (what a CUDA-graph decode replays)."""
    m, steps, bucket = qwen2, 7, 32
    idx, pmask = left_padded(m.cfg.vocab_size, [9, 4, 6], seed=1)
    B, Lp = idx.shape
    pos = pmask.long().sum(1, keepdim=True)  # (B, 1): the position of the first new token
    runs = []
    for static in (False, True):
        cache = m.new_cache(B, bucket)
        cache.k.fill_(1e4)  # garbage in unwritten slots must never be read
        cache.v.fill_(1e4)
        key_mask = torch.zeros(B, bucket, dtype=torch.bool)
        key_mask[:, :Lp] = pmask
        logits = m(idx, cache=cache, start=0, key_mask=key_mask[:, :Lp])[:, -1]  # prefill (B, V)
        out, toks = [logits], []
        for t in range(steps):
            tok = logits.argmax(-1, keepdim=True)  # (B, 1)
            toks.append(tok)
            key_mask[:, Lp + t] = True
            if static:
                start = torch.tensor(Lp + t)
                logits = m(tok, pos + t, cache=cache, start=start, key_mask=key_mask)[:, -1]
            else:
                logits = m(tok, pos + t, cache=cache, start=Lp + t, key_mask=key_mask[:, : Lp + t + 1])[:, -1]
            out.append(logits)
        runs.append((torch.stack(out, 1), torch.cat(toks, 1)))
    (live, live_tok), (stat, stat_tok) = runs
    assert torch.equal(live_tok, stat_tok)
    torch.testing.assert_close(stat, live, atol=1e-5, rtol=1e-5)
    assert live_tok.unique().numel() > 1  # the tokens vary, so equality above means something


@torch.no_grad()
def test_static_length_decode_default_positions(qwen2):
    """Without pos, the positions come from key_mask at the new slots, not from the bucket's end."""
    m, bucket = qwen2, 16
    idx, pmask = left_padded(m.cfg.vocab_size, [5, 3], seed=2)
    B, Lp = idx.shape
    nxt = torch.randint(3, m.cfg.vocab_size, (B, 2), generator=torch.Generator().manual_seed(3))
    c1, c2 = m.new_cache(B, bucket), m.new_cache(B, bucket)
    km = torch.zeros(B, bucket, dtype=torch.bool)
    km[:, :Lp] = pmask
    m(idx, cache=c1, start=0, key_mask=km[:, :Lp])
    m(idx, cache=c2, start=0, key_mask=km[:, :Lp])
    km[:, Lp : Lp + 2] = True
    a = m(nxt, cache=c1, start=Lp, key_mask=km[:, : Lp + 2])
    b = m(nxt, cache=c2, start=torch.tensor(Lp), key_mask=km)
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


# -----------------------------------------------------------------------------
# attend against a hand-written reference


def reference_attention(q, k, v, mask):
    """softmax(q k^T / sqrt(D) + mask) v in float64, K/V repeated to the query heads; mask None = causal."""
    q, k, v = q.double(), k.double(), v.double()
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)  # (B, H, S, D): query head h reads kv head h // g
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5  # (B, H, T, S)
    if mask is None:
        mask = torch.ones(scores.shape[-2:], dtype=torch.bool).tril()
    return scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v


def random_mask(B, T, S, seed):
    """(B, 1, T, S) a left-padded causal mask whose query at slot S-T+t sees real keys <= it, and itself."""
    g = torch.Generator().manual_seed(seed)
    pads = torch.randint(0, S // 2, (B,), generator=g)
    k_slot, q_slot = torch.arange(S)[None], torch.arange(S - T, S)[:, None]
    real = k_slot >= pads[:, None]  # (B, S)
    return ((real[:, None] & (k_slot <= q_slot)) | (k_slot == q_slot))[:, None]


@pytest.mark.parametrize("H,Hkv,D", [(4, 2, 16), (28, 4, 128), (4, 4, 16)])
@pytest.mark.parametrize("layout", ["causal", "decode", "prefill"])
def test_attend_layouts_equal_hand_reference(H, Hkv, D, layout):
    B, S = 3, 37
    T = {"causal": S, "decode": 1, "prefill": 9}[layout]
    g = torch.Generator().manual_seed(H + T)
    q = torch.randn(B, H, T, D, generator=g, requires_grad=True)
    k = torch.randn(B, Hkv, S, D, generator=g, requires_grad=True)
    v = torch.randn(B, Hkv, S, D, generator=g, requires_grad=True)
    mask = None if layout == "causal" else random_mask(B, T, S, seed=T)
    y, want = A.attend(q, k, v, mask), reference_attention(q, k, v, mask)
    assert y.shape == (B, H, T, D)
    torch.testing.assert_close(y.double(), want, atol=1e-5, rtol=1e-5)
    coef = torch.randn(y.shape, generator=g)
    got = torch.autograd.grad((y * coef).sum(), (q, k, v))
    ref = torch.autograd.grad((want * coef.double()).sum(), (q, k, v))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b.float(), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_layouts_reach_sdpa_in_the_fused_kernels_shapes(qwen2):
    """What SDPA is handed: training rows causal with no mask (flash takes GQA then), decode folded to
    q (B, Hkv, H/Hkv, D) with a (B, 1, 1, S) mask, padded prefill with K/V repeated to H heads."""
    m, c = qwen2, qwen2.cfg
    H, Hkv, D = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    idx, pmask = left_padded(c.vocab_size, [6, 3], seed=4)
    with A.record_attention() as calls:
        m(idx)
    assert calls[0][0] == A.describe(
        torch.empty(2, H, 6, D), torch.empty(2, Hkv, 6, D), torch.empty(2, Hkv, 6, D), None, True, True
    )
    cache = m.new_cache(2, 8)
    with A.record_attention() as calls:
        m(idx, cache=cache, start=0, key_mask=pmask)
        m(idx[:, :1], cache=cache, start=6, key_mask=torch.cat([pmask, torch.ones(2, 1, dtype=torch.bool)], 1))
    L = c.num_hidden_layers
    assert len(calls) == 2 * L
    prefill, decode = calls[0][0], calls[L][0]
    assert prefill.startswith(f"q (2, {H}, 6, {D}) k (2, {H}, 6, {D})") and "mask (2, 1, 6, 6)" in prefill
    assert decode.startswith(f"q (2, {Hkv}, {H // Hkv}, {D}) k (2, {Hkv}, 7, {D})") and "mask (2, 1, 1, 7)" in decode
    assert all(used == "cpu" for _, used in calls)


def test_no_kernel_is_an_error_naming_the_call():
    """The guard's message: with no backend allowed to run a call, the error names its shapes and dtype."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 3, 8)
    with (
        sdpa_kernel(SDPBackend.CUDNN_ATTENTION),
        pytest.raises(RuntimeError, match=r"q \(1, 4, 3, 8\) k \(1, 2, 3, 8\)"),
    ):
        A.sdpa(q, k, k, None, True, True)
    assert A.sdpa_backend(q, k, k, None, True, True) in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")


# -----------------------------------------------------------------------------
# the training layout: right-padded rows, causal, no mask


def right_padded(V, lens, seed=0):
    g = torch.Generator().manual_seed(seed)
    L = max(lens)
    idx = torch.randint(3, V, (len(lens), L), generator=g)
    mask = torch.arange(L)[None] < torch.tensor(lens)[:, None]  # (B, L)
    return idx.masked_fill(~mask, 0), mask


def attached(m, seed=0):
    """A TinyLoRA adapter (u=2, two v's) drawn away from zero, so its gradient is not the base model's."""
    import tinylora

    adapter = tinylora.attach(m, u=2, tie=7 * m.cfg.num_hidden_layers // 2 or 1, seed=seed)
    with torch.no_grad():
        for v in adapter.params:
            v.copy_(0.3 * torch.randn(v.shape, generator=torch.Generator().manual_seed(seed)))
    return adapter


@pytest.fixture(scope="module", params=["qwen2", "llama", "qwen3"])
def family(request, make_checkpoint):
    m = M.load_model(str(make_checkpoint(request.param)), dtype=torch.float32, device="cpu")
    return m, attached(m)


def test_right_padded_causal_equals_explicit_mask(family):
    m, adapter = family
    idx, am = right_padded(m.cfg.vocab_size, [17, 11, 4], seed=5)
    causal = m(idx)  # (B, L, V): no mask, positions 0..L-1
    masked = m(idx, attention_mask=am)  # the explicit-mask path, positions from the mask
    torch.testing.assert_close(causal[am], masked[am], atol=1e-5, rtol=1e-5)
    coef = torch.randn(causal[am].shape, generator=torch.Generator().manual_seed(6))
    g1 = torch.autograd.grad((causal[am] * coef).sum(), adapter.params)
    g2 = torch.autograd.grad((masked[am] * coef).sum(), adapter.params)
    assert any(g.abs().max() > 1e-3 for g in g1)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def rollouts(V, N=5, T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, V, (int(n),), generator=g).tolist() for n in torch.randint(1, 9, (N,), generator=g)]
    lengths = torch.randint(0, T + 1, (N,), generator=g)
    lengths[0] = T  # one row fills the buffer; others may be empty
    mask = torch.arange(T)[None] < lengths[:, None]  # (N, T) right-padded completions
    tokens = torch.randint(3, V, (N, T), generator=g).masked_fill(~mask, 0)
    return prompts, tokens, mask


def rows_alone(m, prompts, tokens, mask, temperature):
    """Old layout from first principles: each row's prompt + completion alone, full forward, log-softmax, gather."""
    out = []
    for i, p in enumerate(prompts):
        n = int(mask[i].sum())
        seq = torch.tensor([list(p) + tokens[i, :n].tolist()])  # (1, len(p) + n)
        lp = (m(seq)[0, len(p) - 1 : -1].float() / temperature).log_softmax(-1)  # (n, V)
        out.append(torch.cat([lp.gather(-1, seq[0, len(p) :, None])[:, 0], torch.zeros(tokens.shape[1] - n)]))
    return torch.stack(out)  # (N, T)


@pytest.mark.parametrize("chunk", [4, 4096])
def test_token_logprobs_equal_rows_alone(family, chunk):
    m, adapter = family
    prompts, tokens, mask = rollouts(m.cfg.vocab_size, seed=7)
    ids, cm, P = grpo.pack(prompts, tokens, mask, pad_id=0)
    lp = grpo.token_logprobs(m, ids, cm, P, chunk=chunk, temperature=0.7)
    want = rows_alone(m, prompts, tokens, mask, 0.7)
    assert lp.shape == tokens.shape
    torch.testing.assert_close(lp, want, atol=1e-5, rtol=1e-5)
    coef = torch.randn(lp.shape, generator=torch.Generator().manual_seed(8))
    g1 = torch.autograd.grad((lp * coef).sum(), adapter.params)
    g2 = torch.autograd.grad((want * coef).sum(), adapter.params)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_pack_trims_to_the_longest_row():
    prompts = [[5, 6, 7, 8], [9]]
    tokens, mask = torch.tensor([[1, 0, 0], [2, 3, 4]]), torch.tensor([[1, 0, 0], [1, 1, 1]]).bool()
    ids, cm, P = grpo.pack(prompts, tokens, mask, pad_id=0)
    assert ids.tolist() == [[5, 6, 7, 8, 1], [9, 2, 3, 4, 0]]  # W = max(4 + 1, 1 + 3) = 5, not 4 + 3
    assert P == 2 and ids.shape[1] - P == 3  # the output width is still the longest completion
    assert cm.sum(1).tolist() == [1, 3] and cm[:, 0].sum() == 0
    with pytest.raises(AssertionError, match="right-padded"):
        grpo.pack(prompts, tokens, torch.tensor([[1, 0, 1], [1, 1, 1]]).bool(), pad_id=0)


# -----------------------------------------------------------------------------
# Qwen2.5-7B's attention widths: hidden 3584, 28 heads, 4 kv heads, head_dim 128 (one layer, a narrow MLP)


@pytest.fixture(scope="module")
def wide(make_checkpoint):
    path = make_checkpoint(
        "qwen2", num_hidden_layers=1, hidden_size=3584, num_attention_heads=28, num_key_value_heads=4,
        intermediate_size=256,
    )  # fmt: skip
    m = M.load_model(str(path), dtype=torch.float32, device="cpu")
    assert (m.cfg.num_attention_heads, m.cfg.num_key_value_heads, m.cfg.head_dim) == (28, 4, 128)
    with torch.no_grad():  # the fixture's N(0, 0.1) weights saturate every softmax at this width: temper them
        for p in m.parameters():
            if p.dim() == 2 and p.shape[1] == 3584:
                p.mul_(0.2)
    return m


def test_token_logprobs_equal_rows_alone_at_7b_widths(wide):
    m = wide
    prompts, tokens, mask = rollouts(m.cfg.vocab_size, N=4, T=6, seed=9)
    w = m.model.layers[0].self_attn.k_proj.weight
    ids, cm, P = grpo.pack(prompts, tokens, mask, pad_id=0)
    lp = grpo.token_logprobs(m, ids, cm, P, chunk=5)
    want = rows_alone(m, prompts, tokens, mask, 1.0)
    torch.testing.assert_close(lp, want, atol=1e-4, rtol=1e-4)
    coef = torch.randn(lp.shape, generator=torch.Generator().manual_seed(10))
    g1 = torch.autograd.grad((lp * coef).sum(), w)[0]
    g2 = torch.autograd.grad((want * coef).sum(), w)[0]
    assert g1.abs().max() > 0
    torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-3)


@torch.no_grad()
def test_folded_decode_equals_full_forward_at_7b_widths(wide):
    """Prefill a left-padded batch, decode 4 tokens through the cache (GQA folded, 7 queries per kv head) and
    compare with each row's full unpadded forward."""
    m = wide
    idx, pmask = left_padded(m.cfg.vocab_size, [7, 3, 5], seed=11)
    B, Lp = idx.shape
    nxt = torch.randint(3, m.cfg.vocab_size, (B, 4), generator=torch.Generator().manual_seed(12))
    cache = m.new_cache(B, Lp + 4)
    km = torch.cat([pmask, torch.ones(B, 4, dtype=torch.bool)], 1)
    m(idx, cache=cache, start=0, key_mask=pmask)
    steps = [m(nxt[:, t : t + 1], cache=cache, start=Lp + t, key_mask=km[:, : Lp + t + 1]) for t in range(4)]
    got = torch.cat(steps, 1)  # (B, 4, V)
    for i in range(B):
        full = m(torch.cat([idx[i, pmask[i]], nxt[i]])[None])[0, -4:]  # (4, V)
        torch.testing.assert_close(got[i], full, atol=1e-4, rtol=1e-4)
