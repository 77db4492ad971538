"""
grpo.py against hand-computed numbers and against the plain (unchunked, explicit) computation.
Run: python -m pytest -q tests/test_grpo.py
"""

import math

import pytest
import torch
import torch.nn.functional as F

import grpo
import memory

# -----------------------------------------------------------------------------
# advantages


def test_group_advantages_hand_computed():
    r = torch.tensor([1.0, 0, 0, 1, 1, 1, 1, 0, 1, 1, 1, 1, 0, 0, 0, 0])  # 4 groups of G=4, prompt-major
    a = grpo.group_advantages(r, 4)
    # group 1: mean .5, sample std sqrt(4 * .25 / 3) = .57735 -> +-.866025
    s = 0.5 / math.sqrt(1 / 3)
    # group 2 (ties): mean .75, sample std sqrt((3 * .0625 + .5625) / 3) = .5 -> .5, .5, .5, -1.5
    # groups 3 and 4: zero variance -> all 0 (no NaN)
    want = [s, -s, -s, s, 0.5, 0.5, 0.5, -1.5, 0, 0, 0, 0, 0, 0, 0, 0]
    assert torch.allclose(a, torch.tensor(want), atol=1e-5)
    # Dr. GRPO: no std, only the mean removed
    a = grpo.group_advantages(r, 4, std=False)
    want = [0.5, -0.5, -0.5, 0.5, 0.25, 0.25, 0.25, -0.75] + [0] * 8
    assert torch.allclose(a, torch.tensor(want), atol=1e-7)
    # G=2 pairs: (3, 1) -> mean 2, sample std sqrt(2) -> +-0.7071
    a = grpo.group_advantages(torch.tensor([3.0, 1.0]), 2)
    assert torch.allclose(a, torch.tensor([1, -1]) / math.sqrt(2), atol=1e-5)


# -----------------------------------------------------------------------------
# the clipped loss on a two-group toy batch (G = 2), every number worked by hand

MASK = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]], dtype=torch.bool)  # 9 real tokens
RATIO = torch.tensor([[1.1, 1.3, 7.0], [0.7, 1.0, 0.9], [1.25, 5.0, 5.0], [0.5, 1.5, 1.0]])  # pads: junk
ADV = torch.tensor([0.5, -0.5, -0.25, 0.25])  # rewards (1, 0 | 0, .5) without std
# per token, eps = 0.2: loss = -min(rho A, clip(rho) A); d loss / d logp = -rho A where the unclipped term is the min
#  row 0 (A=+.5):  1.1 -> -.55;            1.3 -> clip 1.2 binds: -.6, grad 0
#  row 1 (A=-.5):  .7 -> clip .8 binds: .4, grad 0;   1.0 -> .5;   .9 -> .45 (inside the range)
#  row 2 (A=-.25): 1.25 -> -min(-.3125, -.3) = .3125, not clipped (pessimistic side)
#  row 3 (A=+.25): .5 -> -.125 (not clipped: pessimistic side);  1.5 -> clip 1.2 binds: -.3, grad 0;  1.0 -> -.25
TOK_LOSS = torch.tensor([[-0.55, -0.6, 0], [0.4, 0.5, 0.45], [0.3125, 0, 0], [-0.125, -0.3, -0.25]])
TOK_GRAD = torch.tensor([[-0.55, 0, 0], [0, 0.5, 0.45], [0.3125, 0, 0], [-0.125, 0, -0.25]])
CLIPPED = 3


@pytest.mark.parametrize(
    "agg, loss, grad_scale",
    [
        ("token-mean", -0.1625 / 9, torch.full((4, 1), 1 / 9)),
        # row means -.575, .45, .3125, -.225 -> sum -.0375 / 4
        ("seq-mean", -0.0375 / 4, 1 / (4 * torch.tensor([[2.0], [3], [1], [3]]))),
        ("constant", -0.1625 / (4 * 4), torch.full((4, 1), 1 / 16)),  # norm = 4
    ],
)
def test_policy_loss_and_gradient_each_aggregation(agg, loss, grad_scale):
    old = torch.full((4, 3), math.log(0.5))
    logp = (old + RATIO.log()).requires_grad_()
    out, st = grpo.policy_loss(logp, old, ADV, MASK, eps_low=0.2, eps_high=0.2, agg=agg, norm=4)
    out.backward()
    assert out.item() == pytest.approx(loss, abs=1e-6)
    assert torch.allclose(logp.grad, TOK_GRAD * grad_scale * MASK, atol=1e-6)
    assert int(st["clipped"].sum()) == CLIPPED
    assert ((TOK_LOSS * MASK).sum() == pytest.approx(-0.1625)) and (TOK_LOSS[~MASK] == 0).all()  # table is consistent


def test_clip_higher_and_no_clip_inside_range():
    old = torch.zeros(1, 2)
    logp = torch.tensor([[math.log(1.25), math.log(1.1)]], requires_grad=True)
    m = torch.ones(1, 2, dtype=torch.bool)
    # eps_high .28 (DAPO clip-higher): 1.25 is inside [.8, 1.28] -> no clipping, grad -A * rho
    loss, st = grpo.policy_loss(logp, old, torch.tensor([1.0]), m, eps_low=0.2, eps_high=0.28)
    loss.backward()
    assert int(st["clipped"].sum()) == 0
    assert torch.allclose(logp.grad, torch.tensor([[-1.25, -1.1]]) / 2)
    # eps_high .2: 1.25 clipped to 1.2 (grad 0), 1.1 not
    logp.grad = None
    loss, st = grpo.policy_loss(logp, old, torch.tensor([1.0]), m, eps_low=0.2, eps_high=0.2)
    loss.backward()
    assert loss.item() == pytest.approx(-(1.2 + 1.1) / 2)
    assert torch.allclose(logp.grad, torch.tensor([[0.0, -1.1 / 2]]))
    assert int(st["clipped"].sum()) == 1


def test_micro_batch_counts_add_up():
    old = torch.full((4, 3), math.log(0.5))
    logp = old + RATIO.log()
    for agg in grpo.AGGS:
        full, _ = grpo.policy_loss(logp, old, ADV, MASK, agg=agg, norm=4)
        parts = sum(
            grpo.policy_loss(logp[i : i + 1], old[i : i + 1], ADV[i : i + 1], MASK[i : i + 1], agg=agg, norm=4,
                             n_tokens=9, n_seqs=4)[0]
            for i in range(4)
        )  # fmt: skip
        assert parts.item() == pytest.approx(full.item(), abs=1e-7), agg


def test_unknown_aggregation_is_an_error():
    with pytest.raises(ValueError, match="token-mean"):
        grpo.aggregate(torch.zeros(1, 1), torch.ones(1, 1), "mean")


# -----------------------------------------------------------------------------
# KL and importance weights


def test_kl_k3_value_and_unbiasedness():
    # d = log .25 - log .5 = -ln 2: exp(d) - d - 1 = .5 + .693147 - 1
    assert grpo.kl_k3(torch.tensor(math.log(0.5)), torch.tensor(math.log(0.25))).item() == pytest.approx(
        0.5 + math.log(2) - 1
    )
    assert grpo.kl_k3(torch.tensor(-1.3), torch.tensor(-1.3)).item() == 0
    # E_{x~p}[k3] is exactly KL(p || q) on a finite distribution
    p, q = torch.tensor([0.2, 0.5, 0.3]), torch.tensor([0.4, 0.4, 0.2])
    kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p.tolist(), q.tolist()))
    assert (p * grpo.kl_k3(p.log(), q.log())).sum().item() == pytest.approx(kl, abs=1e-6)


def test_tis_weights():
    old = torch.tensor([0.5, 0.3, 0.9, 0.4]).log()
    sampler = torch.tensor([0.25, 0.6, 0.1, 0.4]).log()
    # ratios 2, .5, 9, 1 -> capped at 2
    assert torch.allclose(grpo.tis_weights(old, sampler, 2.0), torch.tensor([2.0, 0.5, 2.0, 1.0]))
    assert torch.allclose(grpo.tis_weights(old, sampler, 5.0), torch.tensor([2.0, 0.5, 5.0, 1.0]))
    old.requires_grad_()
    assert not grpo.tis_weights(old, sampler).requires_grad


def test_tis_weight_scales_the_token_gradient():
    old, s_lp = torch.zeros(1, 2), torch.tensor([[math.log(4.0), math.log(0.8)]])  # w = min(1/4, 2), min(1.25, 2)
    logp = torch.zeros(1, 2, requires_grad=True)
    w = grpo.tis_weights(old, s_lp)
    grpo.policy_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 2, dtype=torch.bool), weight=w)[0].backward()
    assert torch.allclose(logp.grad, torch.tensor([[-0.25, -1.25]]) / 2)


# -----------------------------------------------------------------------------
# log-probs from a real (tiny) model: chunked path vs the plain full-logits log_softmax


def tiny_model(make_checkpoint, **kw):
    from model import load_model

    return load_model(str(make_checkpoint("qwen2", **kw)), dtype=torch.float32)


def toy_rollouts(V, seed=0, N=5, T=6):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, V, (int(n),), generator=g).tolist() for n in torch.randint(2, 7, (N,), generator=g)]
    tokens = torch.randint(3, V, (N, T), generator=g)
    lengths = torch.randint(1, T + 1, (N,), generator=g)
    mask = torch.arange(T)[None] < lengths[:, None]  # (N, T) right-padded completions
    tokens[~mask] = 0
    return prompts, tokens, mask


def plain_logprobs(model, prompts, tokens, mask, pad_id=0, temperature=1.0):
    """The obvious way, from first principles: each row alone, unpadded: full logits, log_softmax, gather."""
    out = torch.zeros(tokens.shape)
    for i, p in enumerate(prompts):
        n = int(mask[i].sum())
        seq = torch.tensor([list(p) + tokens[i, :n].tolist()])  # (1, len(p) + n)
        logits = model(seq)[0].float() / temperature  # (len(p) + n, V)
        lp = logits[len(p) - 1 : -1].log_softmax(-1)  # (n, V): the state before each completion token
        out[i, :n] = lp.gather(-1, seq[0, len(p) :, None]).squeeze(-1)
    return out  # (N, T)


def test_pack_layout():
    ids, cm, P = grpo.pack([[5, 6], [7]], torch.tensor([[1, 2, 0], [3, 0, 0]]), torch.tensor([[1, 1, 0], [1, 0, 0]]), 9)
    assert P == 2 and ids.shape[1] - P == 2  # T = 2: the longest completion
    assert ids.tolist() == [[5, 6, 1, 2], [7, 3, 9, 9]]  # prompt | completion | right padding, W = 4
    assert cm.tolist() == [[False, False, True, True], [False, True, False, False]]


@pytest.mark.parametrize("chunk", [3, 1000])
def test_chunked_logprobs_equal_plain_values_and_grads(make_checkpoint, chunk):
    model = tiny_model(make_checkpoint)
    V = model.cfg.vocab_size
    prompts, tokens, mask = toy_rollouts(V)
    w = model.model.layers[0].self_attn.q_proj.weight.requires_grad_()
    ids, am, P = grpo.pack(prompts, tokens, mask, 0)
    lp = grpo.token_logprobs(model, ids, am, P, chunk=chunk, temperature=0.7)
    ref = plain_logprobs(model, prompts, tokens, mask, temperature=0.7)[:, : lp.shape[1]]
    assert lp.shape[1] == int(mask.sum(1).max())
    assert torch.allclose(lp, ref, atol=1e-5)
    coef = torch.randn(lp.shape, generator=torch.Generator().manual_seed(1))
    g1 = torch.autograd.grad((lp * coef).sum(), w)[0]
    g2 = torch.autograd.grad((ref * coef).sum(), w)[0]
    assert torch.allclose(g1, g2, atol=1e-5, rtol=1e-4)


class NormAdapter:
    """Stands in for tinylora's handle: the final-norm gain is the 'adapter', disabled() restores the base."""

    def __init__(self, model):
        self.p = model.model.norm.weight
        with torch.no_grad():
            self.p.mul_(1 + 0.2 * torch.randn(self.p.shape, generator=torch.Generator().manual_seed(2)))
        self.p.requires_grad_()
        self.params = [self.p]

    def disabled(self):
        import contextlib

        @contextlib.contextmanager
        def ctx():
            saved = self.p.detach().clone()
            with torch.no_grad():
                self.p.fill_(1.0)
            yield
            with torch.no_grad():
                self.p.copy_(saved)

        return ctx()


def explicit_grad(model, adapter, prompts, tokens, mask, adv, s_lp, agg, beta, norm=None):
    """One forward over the whole batch, an explicit no-grad pi_old pass, plain log_softmax: the reference."""
    with torch.no_grad():
        old = plain_logprobs(model, prompts, tokens, mask)
        with adapter.disabled():
            ref = plain_logprobs(model, prompts, tokens, mask)
    lp = plain_logprobs(model, prompts, tokens, mask)
    w = grpo.tis_weights(old, s_lp)
    loss, _ = grpo.policy_loss(lp, old, adv, mask, agg=agg, weight=w, ref_logp=ref, beta=beta, norm=norm)
    return torch.autograd.grad(loss, adapter.params)[0], loss.item()


@pytest.mark.parametrize("agg, beta", [("token-mean", 0.0), ("seq-mean", 0.1), ("constant", 0.05)])
def test_on_policy_shortcut_and_micro_batches_equal_explicit(make_checkpoint, agg, beta):
    model = tiny_model(make_checkpoint)
    adapter = NormAdapter(model)
    prompts, tokens, mask = toy_rollouts(model.cfg.vocab_size, seed=3, N=6)
    adv = grpo.group_advantages(torch.tensor([1.0, 0, 1, 1, 0, 0]), 2)
    s_lp = plain_logprobs(model, prompts, tokens, mask).detach() + 0.3 * torch.randn(tokens.shape)  # a sampler off
    want, want_loss = explicit_grad(model, adapter, prompts, tokens, mask, adv, s_lp, agg, beta, norm=6)
    lengths = memory.row_lengths(prompts, mask)
    mixed = mixed_budget(lengths)
    # micro-batches must not change the gradient: rows (6, 4, 1) or token budgets (one row each, mixed, everything)
    for mb, budget in ((6, 0), (4, 0), (1, 0), (0, 1), (0, mixed), (2, mixed), (0, 10**6)):
        adapter.p.grad = None
        m = grpo.grpo_backward(
            model, adapter, prompts, tokens, mask, adv, s_lp, pad_id=0, micro_batch=mb, micro_batch_tokens=budget,
            agg=agg, beta=beta, norm=6,
        )  # fmt: skip
        assert torch.allclose(adapter.p.grad, want, atol=1e-6, rtol=1e-4), (mb, budget, agg)
        assert m["loss"] == pytest.approx(want_loss, abs=1e-6)
        assert m["tokens"] == mask.sum()
        assert m["clipped"] == 0  # on-policy: rho = 1
    # the explicit old_logp path gives the same gradient as the shortcut
    adapter.p.grad = None
    old = grpo.old_logprobs(model, prompts, tokens, mask, pad_id=0, micro_batch=4)
    grpo.grpo_backward(
        model, adapter, prompts, tokens, mask, adv, s_lp, pad_id=0, micro_batch=3, agg=agg, beta=beta, norm=6,
        old_logp=old,
    )  # fmt: skip
    assert torch.allclose(adapter.p.grad, want, atol=1e-6, rtol=1e-4)
    # pi_old under a token budget: each row's log-probs land on that row
    old = grpo.old_logprobs(model, prompts, tokens, mask, pad_id=0, micro_batch=0, micro_batch_tokens=mixed)
    assert torch.allclose(old, plain_logprobs(model, prompts, tokens, mask), atol=1e-5)


def mixed_budget(lengths):
    """A token budget under which micro_batches makes both one-row and several-row micro-batches, in an order
    that is not the rows' own (so a row that lost its advantage or log-probs on the way would show)."""
    for budget in range(1, 200):
        mbs = memory.micro_batches(lengths, budget)
        if min(map(len, mbs)) == 1 and max(map(len, mbs)) > 1 and sum(mbs, []) != sorted(sum(mbs, [])):
            return budget
    raise AssertionError(f"no mixed budget for {lengths}: the toy rows are too alike")


def test_token_budget_keeps_each_rows_advantage_old_and_sampler_logp(make_checkpoint):
    """Off-policy (old != current, so ratios clip), unequal lengths, a budget that reorders rows: the gradient, the
    clip count and the mismatch equal the whole-batch computation's."""
    model = tiny_model(make_checkpoint)
    adapter = NormAdapter(model)
    prompts, tokens, mask = toy_rollouts(model.cfg.vocab_size, seed=8, N=8, T=7)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        cur = plain_logprobs(model, prompts, tokens, mask)
    old = (cur + 0.3 * torch.randn(tokens.shape, generator=g)) * mask  # a pi_old per row and token
    s_lp = (cur + 0.3 * torch.randn(tokens.shape, generator=g)) * mask
    adv = torch.randn(8, generator=g)
    lp = plain_logprobs(model, prompts, tokens, mask)
    w = grpo.tis_weights(old, s_lp)
    loss, st = grpo.policy_loss(lp, old, adv, mask, weight=w)
    want = torch.autograd.grad(loss, adapter.params)[0]
    assert int(st["clipped"].sum()) > 0  # the clip binds somewhere, so a misplaced row would change the count
    budget = mixed_budget(memory.row_lengths(prompts, mask))
    m = grpo.grpo_backward(
        model, adapter, prompts, tokens, mask, adv, s_lp, pad_id=0, micro_batch=0, micro_batch_tokens=budget,
        old_logp=old,
    )  # fmt: skip
    assert torch.allclose(adapter.p.grad, want, atol=1e-6, rtol=1e-4)
    assert m["clipped"] == int(st["clipped"].sum())
    assert m["mismatch_sum"] == pytest.approx(float((old - s_lp).abs()[mask].sum()), rel=1e-5)


def test_micro_batches_hand_worked():
    # (prompt, completion) tokens; totals 5, 9, 5, 2, 10 -> longest first: rows 4, 1, 0, 2, 3
    L = [(3, 2), (2, 7), (4, 1), (1, 1), (5, 5)]
    # budget 20: [4] (10; with row 1: 2 x (5 + 7) = 24 > 20) | [1, 0] (2 x (3 + 7) = 20) | [2, 3] (2 x (4 + 1) = 10)
    assert memory.micro_batches(L, 20) == [[4], [1, 0], [2, 3]]
    assert memory.micro_batches(L, 5) == [[4], [1], [0], [2], [3]]  # rows 4 and 1 exceed 5: each alone
    assert memory.micro_batches(L, 1000) == [[4, 1, 0, 2, 3]]
    assert memory.micro_batches(L, 1000, max_rows=2) == [[4, 1], [0, 2], [3]]
    assert memory.micro_batches(L, 0, max_rows=2) == [[0, 1], [2, 3], [4]]  # rows only: in order, as before
    assert memory.micro_batches([], 20) == []
    # every row exactly once, and no micro-batch of several rows pads past the budget
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        L = [
            tuple(x)
            for x in torch.randint(1, 400, (int(torch.randint(1, 40, (1,), generator=g)), 2), generator=g).tolist()
        ]
        budget = int(torch.randint(1, 4000, (1,), generator=g))
        mbs = memory.micro_batches(L, budget)
        assert sorted(sum(mbs, [])) == list(range(len(L)))
        for mb in mbs:
            assert len(mb) == 1 or len(mb) * (max(L[i][0] for i in mb) + max(L[i][1] for i in mb)) <= budget


def test_mismatch_metric_is_zero_when_sampler_matches(make_checkpoint):
    model = tiny_model(make_checkpoint)
    adapter = NormAdapter(model)
    prompts, tokens, mask = toy_rollouts(model.cfg.vocab_size, seed=4)
    s_lp = plain_logprobs(model, prompts, tokens, mask).detach()
    m = grpo.grpo_backward(model, adapter, prompts, tokens, mask, torch.ones(5), s_lp, pad_id=0, micro_batch=2)
    assert m["mismatch_max"] < 1e-5
    assert m["w_min"] == pytest.approx(1, abs=1e-5) and m["w_max"] == pytest.approx(1, abs=1e-5)


def test_sft_gradient_equals_cross_entropy(make_checkpoint):
    model = tiny_model(make_checkpoint)
    adapter = NormAdapter(model)
    prompts, tokens, mask = toy_rollouts(model.cfg.vocab_size, seed=5)
    ids, cm, P = grpo.pack(prompts, tokens, mask, 0)
    logits = model(ids)[:, :-1]  # (N, W-1, V): rows [prompt | completion | padding], causal
    tgt = ids[:, 1:].masked_fill(~cm[:, 1:], -100)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100)
    want = torch.autograd.grad(ce, adapter.params)[0]
    loss = grpo.sft_backward(model, prompts, tokens, mask, pad_id=0, micro_batch=2, chunk=3)
    assert loss == pytest.approx(ce.item(), abs=1e-5)
    assert torch.allclose(adapter.p.grad, want, atol=1e-6, rtol=1e-4)


def test_grad_checkpointing_keeps_gradients(make_checkpoint):
    model = tiny_model(make_checkpoint)
    adapter = NormAdapter(model)
    prompts, tokens, mask = toy_rollouts(model.cfg.vocab_size, seed=6)
    args = (model, adapter, prompts, tokens, mask, torch.randn(5), torch.zeros(tokens.shape))
    grpo.grpo_backward(*args, pad_id=0, micro_batch=5, tis_cap=None)
    want = adapter.p.grad.clone()
    keys = set(model.state_dict())
    grpo.use_grad_checkpointing(model)
    adapter.p.grad = None
    grpo.grpo_backward(*args, pad_id=0, micro_batch=5, tis_cap=None)
    assert torch.allclose(adapter.p.grad, want, atol=1e-6, rtol=1e-5)
    assert set(model.state_dict()) == keys


# -----------------------------------------------------------------------------
# learning: GRPO with 2 TinyLoRA parameters raises a synthetic reward on a tiny random model


def in_target(ro, target):
    return (torch.isin(ro.tokens, target) & ro.mask).sum(1).float() / ro.mask.sum(1)  # (N,) fraction per row


def synthetic_reward_gain(make_checkpoint, seed):
    """Reward = fraction of generated tokens in a target set of 60 (of 384) tokens. The set is the tokens that
    moving v along (4, 0) makes likelier, so a reward two numbers can reach exists; GRPO must find it from sampled
    rewards alone. Returns the mean reward after minus before, on 512 fresh samples drawn with the same seed."""
    import sample
    import tinylora

    model = tiny_model(make_checkpoint)
    adapter = tinylora.attach(model, r=2, u=2, tie=14, seed=seed)  # 14 modules share one v: 2 parameters
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, model.cfg.vocab_size, (5,), generator=g).tolist() for _ in range(8)]
    with torch.no_grad():
        p0 = model(torch.tensor(prompts))[:, -1].softmax(-1).mean(0)  # (V,) next-token distribution, base
        adapter.params[0][0] = 4.0
        p1 = model(torch.tensor(prompts))[:, -1].softmax(-1).mean(0)
        adapter.params[0].zero_()
    target = (p1.log() - p0.log()).argsort(descending=True)[:60]
    opt = torch.optim.Adam(adapter.params, lr=0.5)
    for _ in range(40):
        ro = sample.generate(model, prompts, G=4, max_new_tokens=8, temperature=1.0, generator=g)
        adv = grpo.group_advantages(in_target(ro, target), 4)
        opt.zero_grad()
        grpo.grpo_backward(model, adapter, ro.prompts, ro.tokens, ro.mask, adv, ro.logp, pad_id=0, micro_batch=32)
        opt.step()
    gen = lambda: torch.Generator().manual_seed(1234)  # noqa: E731 (the same draws before and after)
    after = float(
        in_target(sample.generate(model, prompts * 16, G=4, max_new_tokens=8, generator=gen()), target).mean()
    )
    with adapter.disabled():
        before = float(
            in_target(sample.generate(model, prompts * 16, G=4, max_new_tokens=8, generator=gen()), target).mean()
        )
    return after - before


def test_grpo_learns_a_synthetic_reward_with_two_parameters(make_checkpoint):
    # base ~0.12; measured gains for seeds 0-3: +0.049, +0.108, +0.064, +0.152 (one thread). One run's gain varies
    # by ~0.04 from run to run (the training path, not only the ~0.015 SE of scoring), so: every seed improves, and
    # the mean of four clears 0.05 with a margin of about two standard deviations
    gains = [synthetic_reward_gain(make_checkpoint, seed) for seed in range(4)]
    assert min(gains) > 0 and sum(gains) / len(gains) > 0.05, gains


# -----------------------------------------------------------------------------
# the entropy bonus (choice 8) on a three-token vocabulary, worked by hand


class Bigram(torch.nn.Module):
    """h at column j is row E[token_j]; the head is the identity, so the logits predicting token j+1 are E[token_j]."""

    def __init__(self, E):
        super().__init__()
        self.E = torch.nn.Parameter(E.clone())
        self.lm_head = torch.nn.Linear(3, 3, bias=False)
        self.lm_head.weight.data = torch.eye(3)

    def forward(self, ids, hidden_only=True):
        return self.E[ids]


def test_entropy_is_hand_computed_in_chunks_and_its_bonus_lowers_the_loss():
    ln2, ln3 = math.log(2), math.log(3)
    E = torch.tensor([[0.0, 0, 0], [2 * ln2, 0, 0], [ln2, 0, 0]])  # p after 0: 1/3 each; after 1: 4:1:1; after 2: 2:1:1
    H = [ln3, -(4 / 6) * math.log(4 / 6) - (2 / 6) * math.log(1 / 6), 1.5 * ln2]  # -sum p log p, by hand
    ids, am, P = grpo.pack([[0], [1]], torch.tensor([[1, 2, 0], [2, 0, 0]]), torch.tensor([[1, 1, 1], [1, 0, 0]]), 0)
    model = Bigram(E)
    for chunk in (1, 4096):  # one token a chunk (recomputed in backward) and all at once
        logp, ent = grpo.token_logprobs(model, ids, am, P, chunk=chunk, entropy=True)
        assert torch.allclose(ent, torch.tensor([H, [H[1], 0, 0]]), atol=1e-6)
        assert torch.allclose(logp[0], torch.log(torch.tensor([1 / 3, 1 / 6, 2 / 4])), atol=1e-6)
        assert torch.equal(logp, grpo.token_logprobs(model, ids, am, P, chunk=chunk))  # entropy=False: same logp
    # temperature 2 halves the logits: after token 1 they become (ln 2, 0, 0), entropy 1.5 ln 2
    _, ent = grpo.token_logprobs(model, ids, am, P, temperature=2.0, entropy=True)
    assert ent[0, 1].item() == pytest.approx(1.5 * ln2, abs=1e-6)
    # the bonus: loss - c * token-mean(H), and its gradient is -c * dH/dE (H from softmax, independently)
    mask, adv, c = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool), torch.zeros(2), 0.1  # A = 0: only H
    logp, ent = grpo.token_logprobs(model, ids, am, P, chunk=1, entropy=True)
    loss, _ = grpo.policy_loss(logp, logp.detach(), adv, mask, entropy=ent, entropy_coef=c)
    assert loss.item() == pytest.approx(-c * (sum(H) + H[1]) / 4, abs=1e-6)
    loss.backward()
    E2 = E.clone().requires_grad_()
    p = E2.softmax(-1)
    h_ref = -(p * p.log()).sum(-1)  # per context token 0, 1, 2
    (-c * (h_ref[0] + 2 * h_ref[1] + h_ref[2]) / 4).backward()  # contexts 0, 1, 2 in row 0 and 1 in row 1
    assert torch.allclose(model.E.grad, E2.grad, atol=1e-6)
