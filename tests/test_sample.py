"""
sample.py (and the CPU fast path in kernels.py) against independent references: full-sequence forwards without a
cache, transformers' logits warpers and greedy `generate`, hand-computed distributions.
Run: `python -m pytest -q tests/test_sample.py`.
"""

import math

import pytest
import torch

import kernels
import sample
from model import load_model

PROMPTS = [[5, 6, 7, 8, 9, 30, 31], [10, 11], [12, 13, 14, 15, 16], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49]]


@pytest.fixture(scope="module")
def qwen2(make_checkpoint):
    return load_model(str(make_checkpoint("qwen2")), device="cpu")  # q/k/v biases; untied head


@pytest.fixture(scope="module")
def llama(make_checkpoint):
    return load_model(str(make_checkpoint("llama", tied=True)), device="cpu")


def full_logprobs(model, prompt, completion):
    """Log-softmax (len(completion), V) at each completion position, from one forward of the unpadded sequence."""
    ids = torch.tensor([list(prompt) + list(completion)])
    with torch.no_grad():
        logits = model(ids)[0, len(prompt) - 1 : -1]  # the positions that predict the completion
    return logits.float().log_softmax(-1)


def gen(model, prompts=PROMPTS, seed=0, **kw):
    return sample.generate(model, prompts, generator=torch.Generator().manual_seed(seed), **kw)


# -----------------------------------------------------------------------------
# decoding through the cache == full forwards


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_greedy_equals_argmax_of_full_forwards(family, request):
    model = request.getfixturevalue(family)
    out = sample.generate(model, PROMPTS, max_new_tokens=12, temperature=0)
    assert out.tokens.shape == (len(PROMPTS), 12) and out.mask.all() and out.finish == ["length"] * len(PROMPTS)
    for i, p in enumerate(PROMPTS):
        seq = list(p)
        for t in range(12):  # token by token, each from a fresh full forward of the unpadded row
            with torch.no_grad():
                logp = model(torch.tensor([seq]))[0, -1].float().log_softmax(-1)
            nxt = int(logp.argmax())
            assert int(out.tokens[i, t]) == nxt, f"row {i} step {t}"
            assert abs(float(out.logp[i, t]) - float(logp[nxt])) < 1e-5  # greedy logp: plain log-softmax
            seq.append(nxt)


def test_sampled_logp_equals_full_forward_log_softmax(qwen2):
    out = gen(qwen2, max_new_tokens=16, temperature=1.0)
    for i, p in enumerate(PROMPTS):
        ref = full_logprobs(qwen2, p, out.tokens[i].tolist())  # (T, V)
        got = ref.gather(-1, out.tokens[i, :, None])[:, 0]
        torch.testing.assert_close(out.logp[i], got, atol=1e-5, rtol=0)


def test_logp_is_under_the_tempered_truncated_distribution(qwen2):
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    temperature, top_k, top_p = 0.7, 20, 0.8
    out = gen(qwen2, max_new_tokens=10, temperature=temperature, top_k=top_k, top_p=top_p)
    warpers = [TemperatureLogitsWarper(temperature), TopKLogitsWarper(top_k), TopPLogitsWarper(top_p)]
    for i, p in enumerate(PROMPTS):
        ids = torch.tensor([p + out.tokens[i].tolist()])
        with torch.no_grad():
            logits = qwen2(ids)[0, len(p) - 1 : -1].float()  # (T, V)
        for w in warpers:  # transformers' own temperature -> top-k -> top-p, as its generate applies them
            logits = w(None, logits)
        ref = logits.log_softmax(-1).gather(-1, out.tokens[i, :, None])[:, 0]
        assert torch.isfinite(ref).all(), "sampled a token the reference filter removes"
        torch.testing.assert_close(out.logp[i], ref, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_greedy_matches_transformers_on_smollm2(smollm2):
    from transformers import AutoModelForCausalLM

    from tokenizer import Tokenizer

    ours, tok = load_model(str(smollm2), device="cpu"), Tokenizer(str(smollm2))
    ref = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    questions = ["What is 7 times 8?", "Name a primary colour."]
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}]) for q in questions]
    out = sample.generate(ours, prompts, max_new_tokens=24, temperature=0, stop_ids=tok.stop_ids, pad_id=tok.pad_id)
    for i, p in enumerate(prompts):
        with torch.no_grad():
            hf = ref.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False, eos_token_id=tok.stop_ids)
        n = int(out.mask[i].sum())
        assert out.tokens[i, :n].tolist() == hf[0, len(p) :].tolist()


# -----------------------------------------------------------------------------
# filtering and drawing on crafted logits


def test_filter_semantics_on_crafted_logits():
    p = torch.tensor([[0.1, 0.5, 0.05, 0.25, 0.1]])  # sorted: 0.5 (id 1), 0.25 (id 3), 0.1, 0.1, 0.05 (id 2)
    logits = p.log()
    z, ids = sample.filter_logits(logits, top_k=2)  # top-k keeps the two largest, in descending order
    assert ids.tolist() == [[1, 3]]
    torch.testing.assert_close(z.softmax(-1), torch.tensor([[0.5, 0.25]]) / 0.75)
    z, ids = sample.filter_logits(logits, top_p=0.7)  # 0.5 < 0.7 so id 3 joins; mass 0.75 >= 0.7 stops there
    torch.testing.assert_close(z.softmax(-1)[0, :2], torch.tensor([2 / 3, 1 / 3]))
    assert ids[0, :2].tolist() == [1, 3] and torch.isinf(z[0, 2:]).all()
    z, ids = sample.filter_logits(logits, top_p=0.4)  # the first candidate always survives
    assert torch.isfinite(z).sum() == 1 and ids[0, 0] == 1
    z, ids = sample.filter_logits(logits, top_k=4, top_p=0.8)  # top-p over the 4 survivors: 0.5/.95, .25/.95 ...
    assert torch.isfinite(z).sum() == 3  # renormalised over 4: 0.526, 0.263 (0.789 < 0.8), 0.105 -> 0.895
    z, ids = sample.filter_logits(logits, temperature=2.0)  # p^(1/2), renormalised
    ref = p.sqrt() / p.sqrt().sum()
    assert ids is None
    torch.testing.assert_close(z.softmax(-1), ref)


def test_draw_has_the_filtered_frequencies():
    p = torch.tensor([0.1, 0.5, 0.05, 0.25, 0.1])
    logits = p.log().expand(40000, 5)
    u = torch.rand(40000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    tok, logp = sample.sample_next(logits, u, temperature=1.0, top_k=3)
    target = torch.tensor([0.1, 0.5, 0.0, 0.25, 0.0]) / 0.85  # ids 0 and 4 tie at 0.1: topk keeps the lower id
    freq = torch.bincount(tok, minlength=5).float() / len(tok)
    assert freq[2] == 0 and freq[4] == 0
    assert (freq - target).abs().max() < 4 * math.sqrt(0.25 / len(tok))  # 4 sigma of a binomial
    torch.testing.assert_close(logp, target.log()[tok])  # logp under the truncated distribution


def test_counter_based_uniforms_match_a_python_hash_and_are_uniform():
    def lowbias32(x):  # the published finaliser, with Python's unbounded ints
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    xs = [0, 1, 2, 12345, 2**31 - 1, 2**31, 2**32 - 2, 2**32 - 1] + torch.randint(0, 2**32, (500,)).tolist()
    assert sample.mix32(torch.tensor(xs)).tolist() == [lowbias32(x) for x in xs]  # no int64 overflow anywhere
    keys = sample.row_keys(torch.tensor([7, 2**32 - 5]), torch.arange(4096))  # (N,)
    u = sample.uniforms(keys, 25).T  # (t, N)
    assert torch.equal(sample.uniforms(keys[7:9], 3), u[:3, 7:9].T)  # a row's draws do not depend on the others
    assert u.dtype == torch.float64 and (u >= 0).all() and (u < 1).all()
    counts = torch.histc(u.float(), bins=20, min=0, max=1)  # 102,400 draws: chi-square with 19 degrees of freedom
    e = u.numel() / 20
    assert ((counts - e) ** 2 / e).sum() < 50  # p ~ 1e-4 under uniformity
    steps = torch.corrcoef(torch.stack([u[:-1].flatten(), u[1:].flatten()]))[0, 1]
    rows = torch.corrcoef(torch.stack([u[:, :-1].flatten(), u[:, 1:].flatten()]))[0, 1]
    assert steps.abs() < 0.02 and rows.abs() < 0.02  # neighbouring steps, neighbouring rows
    other = sample.row_keys(torch.tensor([8, 2**32 - 5]), torch.arange(4096))  # another seed, other noise
    assert (sample.uniforms(other, 1)[:, 0] != u[0]).float().mean() > 0.99


# -----------------------------------------------------------------------------
# stop ids, seeds, G fan-out, argument checks


def test_stop_ids_end_a_row_and_it_stays_finished(qwen2):
    free = sample.generate(qwen2, PROMPTS, max_new_tokens=12, temperature=0)  # no stop ids: the reference run
    stop = int(free.tokens[1, 3])  # row 1 emits this at step 3 (or earlier): make it a stop id
    out = sample.generate(qwen2, PROMPTS, max_new_tokens=12, temperature=0, stop_ids=[stop], pad_id=0)
    for i in range(len(PROMPTS)):
        hits = (free.tokens[i] == stop).nonzero()
        n = int(hits[0]) + 1 if len(hits) else 12  # the stop token itself is part of the completion
        assert out.mask[i].tolist() == [True] * n + [False] * (out.tokens.shape[1] - n)
        assert out.tokens[i, :n].tolist() == free.tokens[i, :n].tolist()
        assert (out.tokens[i, n:] == 0).all() and (out.logp[i, n:] == 0).all()
        assert out.finish[i] == ("stop" if len(hits) else "length")
    # sampling: the mask never turns back on after a stop, and a stop token ends every finished row
    ids = list(range(40, 200))  # many stop ids so most rows stop early
    out = gen(qwen2, G=3, max_new_tokens=20, temperature=1.0, stop_ids=ids, pad_id=0)
    n = out.mask.sum(1)
    assert (out.mask == (torch.arange(out.mask.shape[1]) < n[:, None])).all()
    for i, f in enumerate(out.finish):
        assert (f == "stop") == (int(out.tokens[i, n[i] - 1]) in ids)


def test_early_exit_when_every_row_is_done(qwen2):
    out = gen(qwen2, max_new_tokens=50, temperature=1.0, stop_ids=list(range(384)))  # every token stops
    assert out.tokens.shape[1] == 1 and out.finish == ["stop"] * len(PROMPTS)


def test_same_seed_same_samples_other_seed_differs(qwen2):
    a, b, c = (gen(qwen2, seed=s, G=2, max_new_tokens=12) for s in (0, 0, 1))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logp, b.logp)
    assert not torch.equal(a.tokens, c.tokens)


def test_group_fanout_equals_sampling_each_copy_separately(qwen2):
    G = 3
    fan = sample.generate(qwen2, PROMPTS, G=G, max_new_tokens=10, temperature=0)
    copies = [p for p in PROMPTS for _ in range(G)]  # the same rows, each prefilled on its own
    sep = sample.generate(qwen2, copies, G=1, max_new_tokens=10, temperature=0)
    assert fan.prompts == copies
    assert torch.equal(fan.tokens, sep.tokens)
    torch.testing.assert_close(fan.logp, sep.logp, atol=1e-5, rtol=0)
    # sampling: same rows, same noise -> the same draws
    fan, sep = gen(qwen2, G=G, max_new_tokens=10), gen(qwen2, prompts=copies, max_new_tokens=10)
    assert torch.equal(fan.tokens, sep.tokens)


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(prompts=[]), "non-empty"),
        (dict(prompts=[[1, 2], []]), "non-empty"),
        (dict(prompts=[[1, 10**6]]), "vocabulary"),
        (dict(G=0), "at least 1"),
        (dict(top_p=0.0), "top_p"),
        (dict(temperature=-1.0), "temperature"),
        (dict(mode="fast"), "mode"),
    ],
)
def test_bad_arguments_raise_a_clear_error(qwen2, kw, msg):
    kw = {"prompts": [[1, 2, 3]], **kw}
    with pytest.raises(ValueError, match=msg):
        sample.generate(qwen2, kw.pop("prompts"), max_new_tokens=4, **kw)


def test_triton_mode_without_gpu_or_interpreter_is_refused(qwen2, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="CUDA|triton"):
        sample.generate(qwen2, [[1, 2, 3]], max_new_tokens=4, mode="triton")


# -----------------------------------------------------------------------------
# the static-length decode and dropping finished rows give what the plain loop gives


def assert_same(a, b, atol=1e-5):
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.mask, b.mask) and a.finish == b.finish
    torch.testing.assert_close(a.logp, b.logp, atol=atol, rtol=0)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_static_length_decode_equals_the_live_length_decode(qwen2, monkeypatch, temperature):
    monkeypatch.setattr(kernels, "BUCKET", 8)  # several buckets within 20 tokens: the static length grows 3 times
    kw = dict(G=2, max_new_tokens=20, temperature=temperature, compact=False)
    live = gen(qwen2, decode="live", **kw)
    static = gen(qwen2, decode="static", **kw)
    assert_same(live, static)
    assert live.tokens.unique().numel() > 5  # varied tokens, so the equality means something


@pytest.mark.parametrize("decode", ["live", "static"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_dropping_finished_rows_changes_no_token_or_logp(qwen2, monkeypatch, decode, temperature):
    monkeypatch.setattr(kernels, "BUCKET", 8)
    calls = []
    keep_rows = sample.keep_rows
    monkeypatch.setattr(sample, "keep_rows", lambda cache, keep: calls.append(len(keep)) or keep_rows(cache, keep))
    stop = list(range(40, 140))  # rows stop at different steps
    kw = dict(G=3, max_new_tokens=24, temperature=temperature, stop_ids=stop, decode=decode)
    whole = gen(qwen2, compact=False, **kw)
    assert not calls
    compacted = gen(qwen2, compact=True, **kw)
    assert calls, "no row was dropped: the test needs rows that stop early"
    assert calls == sorted(calls, reverse=True) and calls[0] <= len(PROMPTS) * 3 * sample.COMPACT_AT
    assert_same(whole, compacted)
    n = whole.mask.sum(1)
    assert n.min() < n.max()  # rows of different lengths


def test_graph_decode_bookkeeping_with_a_stand_in_graph(qwen2, monkeypatch):
    """decode="graph" on CPU with StaticDecode.capture replaced by a stand-in whose replay recomputes into the same
    output tensor, as a CUDA graph does: the static inputs must be updated in place and each output read before the
    next replay overwrites it. (The capture itself needs a GPU: tests/test_kernel.py, dev/gpu_checks.sh.)"""

    class Replay:
        def __init__(self, step, S):
            self.step, self.S = step, S
            self.out = step.forward(step.key_mask[:, :S])

        def replay(self):
            self.out.copy_(self.step.forward(self.step.key_mask[:, : self.S]))

    captured = []

    def capture(self, S):
        captured.append((len(self.x), S))
        g = Replay(self, S)
        return g, g.out

    monkeypatch.setattr(kernels.StaticDecode, "capture", capture)
    monkeypatch.setattr(kernels, "BUCKET", 8)
    kw = dict(G=3, max_new_tokens=24, stop_ids=list(range(40, 140)))
    live = gen(qwen2, decode="live", **kw)
    monkeypatch.setattr(sample, "check_args", lambda *a: None)  # let decode="graph" through on CPU
    graph = gen(qwen2, decode="graph", **kw)
    assert_same(live, graph)
    rows = [n for n, _ in captured]
    assert len(set(rows)) > 1 and rows == sorted(rows, reverse=True)  # rows were dropped and graphs re-captured
    for n in set(rows):  # within one batch, each bucket is captured once, in growing order
        sizes = [S for m, S in captured if m == n]
        assert sizes == sorted(set(sizes))


def test_a_refused_graph_capture_decodes_eagerly_with_a_warning(qwen2, monkeypatch):
    """A GPU or driver that refuses the capture costs speed, never the run: the same tokens, eagerly."""

    def refuse(self, S):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(kernels.StaticDecode, "capture", refuse)
    kw = dict(G=2, max_new_tokens=12, stop_ids=list(range(40, 140)))
    live = gen(qwen2, decode="live", **kw)
    monkeypatch.setattr(sample, "check_args", lambda *a: None)  # let decode="graph" through on CPU
    with pytest.warns(UserWarning, match="CUDA-graph capture failed"):
        graph = gen(qwen2, decode="graph", **kw)
    assert_same(live, graph)


def test_decode_graph_needs_cuda_and_unknown_decode_is_refused(qwen2):
    with pytest.raises(ValueError, match="CUDA"):
        sample.generate(qwen2, [[1, 2, 3]], max_new_tokens=4, decode="graph")
    with pytest.raises(ValueError, match="decode"):
        sample.generate(qwen2, [[1, 2, 3]], max_new_tokens=4, decode="fast")


# -----------------------------------------------------------------------------
# the CPU path: oneDNN-prepacked weights, sibling projections in one matmul

needs_onednn = pytest.mark.skipif(
    not kernels.onednn_packs(torch.float32), reason="this torch build cannot prepack fp32 weights for oneDNN"
)


@needs_onednn
@pytest.mark.parametrize("low_dtype", [torch.float32, torch.float64])  # x A folded into the matmul, or separate
def test_packed_siblings_equal_separate_linears_in_float64(low_dtype):
    g = torch.Generator().manual_seed(0)
    K = 40
    rnd = lambda *s, dtype=torch.float32: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    parts = [  # an adapted linear with bias, a plain one without, an adapted one without bias
        (rnd(16, K), rnd(16), rnd(K, 2, dtype=low_dtype), rnd(16, 2, dtype=low_dtype)),
        (rnd(8, K), None, None, None),
        (rnd(24, K), None, rnd(K, 3, dtype=low_dtype), rnd(24, 3, dtype=low_dtype)),
    ]

    def ref(i, x):  # each linear on its own, in float64
        W, b, A, U = (t.double() if t is not None else None for t in parts[i])
        y = torch.nn.functional.linear(x.double(), W, b)
        return y if A is None else y + (x.double() @ A) @ U.T

    packed = kernels.PackedLinears(parts, rows=6)
    assert packed.fold == (low_dtype == torch.float32)
    x = rnd(2, 3, K)  # (B, T, K)
    for i in (2, 0, 1, 0):  # any order, and a sibling asked twice recomputes
        y = packed.part(i, x)
        assert y.shape == (2, 3, parts[i][0].shape[0]) and y.dtype == torch.float32
        torch.testing.assert_close(y.double(), ref(i, x), atol=1e-4, rtol=1e-5)
    x2 = rnd(2, 3, K)
    torch.testing.assert_close(packed.part(0, x2).double(), ref(0, x2), atol=1e-4, rtol=1e-5)
    x2.mul_(3)  # the same tensor changed in place: its siblings must not get the stale outputs
    torch.testing.assert_close(packed.part(1, x2).double(), ref(1, x2), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(packed.part(2, x2).double(), ref(2, x2), atol=1e-4, rtol=1e-5)
    lone = kernels.PackedLinears(parts[:1], rows=6)  # a lone adapted linear: its own output columns only
    torch.testing.assert_close(lone.part(0, x).double(), ref(0, x), atol=1e-4, rtol=1e-5)


@needs_onednn
def test_packed_cpu_path_swaps_every_linear_and_matches_the_torch_path(qwen2, adapted):
    n_linears = 7 * qwen2.cfg.num_hidden_layers + 1  # q k v o gate up down per layer, and the head
    ids = torch.tensor(PROMPTS[0])[None]
    with torch.no_grad():
        for model in (qwen2, adapted[0]):
            ref = model(ids)
            with kernels.sampling_forwards(model, "auto", rows=4) as n:
                got = model(ids)
            assert n == n_linears
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
            with kernels.sampling_forwards(model, "torch", rows=4) as n:  # the plain path packs nothing
                assert n == (0 if model is qwen2 else n_linears - 1)  # ... and swaps only the adapter modules
    a = gen(qwen2, G=2, max_new_tokens=12, mode="auto")
    b = gen(qwen2, G=2, max_new_tokens=12, mode="torch")
    assert torch.equal(a.tokens, b.tokens)
    torch.testing.assert_close(a.logp, b.logp, atol=1e-5, rtol=0)


@needs_onednn
@pytest.mark.parametrize(
    "method, kw", [("lora", dict(r=4)), ("loraxs", {}), ("full", {}), ("tinylora", dict(u=3, tie=2))]
)
def test_packed_path_equals_plain_path_for_every_adapter_method(make_checkpoint, method, kw):
    import tinylora

    model = load_model(str(make_checkpoint("qwen3")), device="cpu")  # q/k norms read the fused q/k slices
    adapter = tinylora.attach(model, method=method, **kw)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in adapter.params:
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    a, b = (gen(model, G=2, max_new_tokens=8, mode=m) for m in ("auto", "torch"))
    assert torch.equal(a.tokens, b.tokens)
    torch.testing.assert_close(a.logp, b.logp, atol=1e-5, rtol=0)


@needs_onednn
def test_packed_path_steps_aside_when_memory_is_short(qwen2, monkeypatch):
    with kernels.sampling_forwards(qwen2, "auto", rows=4) as n:
        assert n > 0
    monkeypatch.setattr(kernels, "available_memory", lambda: 1000)  # 1 kB free: the copy would not fit
    with pytest.warns(UserWarning, match="plain F.linear"):
        with kernels.sampling_forwards(qwen2, "auto", rows=4) as n:
            assert n == 0
        out = gen(qwen2, max_new_tokens=4)
    assert out.mask.all()


# -----------------------------------------------------------------------------
# sampler vs trainer with an adapter attached


def attach(model, seed=0, scale=0.1):
    """tinylora.attach (r=2, u=1, one v per module) with v drawn away from zero, so the adapter changes the model."""
    import tinylora

    adapter = tinylora.attach(model, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for v in adapter.params:
            v.copy_(scale * torch.randn(v.shape, generator=g))
    return adapter


@pytest.fixture(scope="module")
def adapted(make_checkpoint):
    model = load_model(str(make_checkpoint("qwen2", seed=1)), device="cpu")
    return model, attach(model)


def trainer_logp(model, out):
    """The training forward's log-probs of the sampled tokens: the adapter modules' own forward, full sequences."""
    rows = []
    for i, p in enumerate(out.prompts):
        n = int(out.mask[i].sum())
        lp = full_logprobs(model, p, out.tokens[i, :n].tolist())  # (n, V)
        rows.append(lp.gather(-1, out.tokens[i, :n, None])[:, 0])
    return torch.cat(rows)


def test_sampler_logp_equals_trainer_logp_with_an_adapter(adapted):
    model, adapter = adapted
    on = sample.generate(model, PROMPTS, max_new_tokens=1, temperature=0)
    with adapter.disabled():
        off = sample.generate(model, PROMPTS, max_new_tokens=1, temperature=0)
    assert (on.logp - off.logp).abs().max() > 1e-2, "the adapter must change the model for this test to bite"
    out = gen(model, G=2, max_new_tokens=16, temperature=1.0)
    fused = out.logp[out.mask]
    assert (fused - trainer_logp(model, out)).abs().max() <= 1e-5
    merged = gen(model, G=2, max_new_tokens=16, temperature=1.0, mode="merged")  # bf16-rounded merged weights
    assert (merged.logp[merged.mask] - trainer_logp(model, merged)).abs().max() > 1e-3  # the mismatch it shows


def test_disabled_adapter_samples_the_base_model(adapted, make_checkpoint):
    model, adapter = adapted
    plain = load_model(str(make_checkpoint("qwen2", seed=1)), device="cpu")
    with adapter.disabled():
        a = gen(model, max_new_tokens=8)
    b = gen(plain, max_new_tokens=8)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logp, b.logp)
