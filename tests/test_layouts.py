"""
Attention layouts agree with the obvious path. Run: `python -m pytest -q tests/test_layouts.py`.

- static-length decode (a 0-dim tensor `start`, a bucketed key_mask) equals the live-length decode (an int start)
"""

import pytest
import torch

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
