"""
tinylora.py against independent references: the base model (v = 0), finite differences, counts of the tensors
an optimizer sees, hand-written tying groups and PEFT's TinyLoRA. Files out: tests/test_export.py; the SVD:
tests/test_svd.py. Run: python -m pytest -q tests/test_tinylora.py
"""

import pytest
import torch
from conftest import IDX, fresh, set_v

import tinylora
from export import count_params
from tinylora import attach


@pytest.fixture(scope="module")
def ck(make_checkpoint):
    return make_checkpoint("qwen2")


# -----------------------------------------------------------------------------
# start-up: v = 0 is the base model, disabled() is the base model


@pytest.mark.parametrize(
    "kw",
    [
        dict(),  # verl: starts from the official v₀ ~ N(0, 1e-5²), so it is set to zero first
        dict(variant="paper"),
        dict(variant="paper", u=4, tie=3, order="structured"),
        dict(variant="peft", u=2),
        dict(method="loraxs"),
        dict(method="loraxs", variant="paper"),
        dict(method="lora", r=4),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_update_is_bitwise_base(ck, kw, dtype):
    model = fresh(ck, dtype)
    with torch.no_grad():
        base = model(IDX)
        adapter = attach(model, **kw)
        if adapter.variant == "verl" and adapter.method == "tinylora":
            assert all(0 < p.abs().max() < 1e-4 for p in adapter.params)  # choice 5: the official start
            for p in adapter.params:
                p.zero_()
        assert torch.equal(model(IDX), base)
        set_v(adapter)  # now it differs, and disabled() gives the base back exactly
        assert not torch.allclose(model(IDX).float(), base.float(), atol=1e-3)
        with adapter.disabled():
            assert torch.equal(model(IDX), base)
        assert all(m.enabled for _, m in adapter.modules)


def test_state_dict_keys_unchanged(ck):
    model = fresh(ck)
    keys = list(model.state_dict())
    attach(model, u=3, tie=2)
    assert list(model.state_dict()) == keys


# -----------------------------------------------------------------------------
# training touches only the adapter


@pytest.mark.parametrize("method", ["tinylora", "loraxs", "lora"])
def test_only_adapter_trains(ck, method):
    model = fresh(ck)
    before = {k: t.clone() for k, t in model.state_dict().items()}
    adapter = attach(model, method=method, u=2, tie=1 if method == "lora" else 5)
    if method == "lora":  # B = 0 gives A no gradient at step 0; start from a random B so both sides are tested
        set_v(adapter, scale=0.1)
    opt = torch.optim.AdamW(adapter.params, lr=1e-2, weight_decay=0.1)
    loss = model(IDX).logsumexp(-1).mean()
    loss.backward()
    assert all(p.grad is None for p in model.parameters()), "a base weight received a gradient"
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.params)
    opt.step()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model(IDX).logsumexp(-1).mean() != loss  # and the step did change the model


@pytest.mark.parametrize(
    "family,tied,extra",
    [("qwen2", False, {}), ("llama", True, {}), ("qwen3", False, {}), ("llama", False, dict(attention_bias=True))],
)
def test_full_finetuning_unfreezes_everything(make_checkpoint, family, tied, extra):
    ck = make_checkpoint(family, tied=tied, **extra)  # Llama's attention_bias covers o_proj too
    model = fresh(ck)
    adapter = attach(model, method="full")
    assert adapter.num_params() == sum(p.numel() for p in set(model.parameters()))
    assert all(p.requires_grad for p in model.parameters())
    assert adapter.num_params() == count_params(ck, method="full")
    with pytest.raises(ValueError, match="no base model"):
        with adapter.disabled():
            pass


@pytest.mark.parametrize(
    "kw", [dict(variant="paper", u=3, tie=4), dict(u=2, tie=14), dict(method="loraxs"), dict(method="loraxs", u=1)]
)
def test_grad_matches_finite_differences(ck, kw):
    model = fresh(ck, torch.float64)
    adapter = attach(model, **kw)
    k = adapter.modules[0][1].scale  # verl's α / r = 16: the same ΔW from 16x smaller v (and steps h), exact in fp32
    set_v(adapter, scale=0.3 / k)
    w = torch.randn(2, 11, model.cfg.vocab_size, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    loss_fn = lambda: (model(IDX) * w).sum()  # noqa: E731
    loss_fn().backward()
    # model.py's RMSNorm runs in fp32 even in a float64 model, so the loss carries ~1e-7 relative noise: use a
    # large step and Richardson extrapolation (error O(h⁴)) rather than a tiny step
    h = 2.0**-6 / k  # exact in fp32, where v lives

    def central(p, i, h):
        with torch.no_grad():
            x0 = p.view(-1)[i].item()
            p.view(-1)[i] = x0 + h
            up = loss_fn().item()
            p.view(-1)[i] = x0 - h
            down = loss_fn().item()
            p.view(-1)[i] = x0
        return (up - down) / (2 * h)

    for p in adapter.params[:2]:
        for i in range(min(p.numel(), 3)):
            fd = (4 * central(p, i, h / 2) - central(p, i, h)) / 3
            scale = p.grad.abs().max().item()  # the noise is absolute, so judge it against the largest entry
            assert abs(fd - p.grad.view(-1)[i].item()) <= 1e-3 * scale, (i, fd, p.grad.view(-1)[i])


@pytest.mark.parametrize(
    "kw", [dict(u=3), dict(variant="paper", u=2), dict(variant="peft", u=2), dict(method="loraxs", variant="paper")]
)
def test_grad_matches_finite_differences_one_layer(kw):
    """One adapted linear, all float64: finite differences agree to ~1e-9."""
    from model import Config, Transformer

    torch.manual_seed(0)
    cfg = Config(num_hidden_layers=1, hidden_size=32, intermediate_size=48, num_attention_heads=4, vocab_size=50)
    model = Transformer(cfg).double()
    adapter = attach(model, targets=("down_proj",), **kw)
    layer = adapter.modules[0][1]
    k, h = layer.scale, 2.0**-12 / layer.scale  # verl: 16x smaller v and steps (exact in fp32) give the same ΔW
    set_v(adapter, scale=0.3 / k)
    x = torch.randn(5, 48, dtype=torch.float64)
    w = torch.randn(5, 32, dtype=torch.float64)
    loss_fn = lambda: (torch.tanh(layer(x)) * w).sum()  # noqa: E731
    loss_fn().backward()
    p = adapter.params[0]
    for i in range(p.numel()):
        with torch.no_grad():
            x0 = p[i].item()
            p[i] = x0 + h
            up = loss_fn().item()
            p[i] = x0 - h
            down = loss_fn().item()
            p[i] = x0
        fd = (up - down) / (2 * h)
        assert abs(fd - p.grad[i].item()) <= 1e-6 * max(1.0, abs(fd)), (i, fd, p.grad[i])


# -----------------------------------------------------------------------------
# counts of an attached model and tying groups


@pytest.mark.parametrize(
    "kw",
    [
        dict(method="tinylora", u=3, tie=5),
        dict(method="tinylora", u=3, tie=5, order="structured"),
        dict(method="loraxs", r=3, tie=2, order="structured"),
        dict(method="loraxs", r=3),
        dict(method="lora", r=3),
    ],
)
def test_count_matches_attached_model(ck, kw):
    model = fresh(ck)
    adapter = attach(model, **kw)
    want = sum(p.numel() for p in adapter.params)  # the tensors the optimizer would see
    assert count_params(ck, **kw) == want == adapter.num_params()


def test_tied_groups_module_by_module(make_checkpoint):
    """3 layers x 7 targets = 21 modules, tie = 2: groups written out by hand for both orders."""
    types = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
    types += ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    depth = [f"model.layers.{i}.{t}" for i in range(3) for t in types]
    tiled = dict(zip(depth, [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10]))
    # structured: each type on its own, cut into runs of 2 nearby layers: q0 q1 | q2 || k0 k1 | k2 || …
    by_type = {"q_proj": [0, 0, 1], "k_proj": [2, 2, 3], "v_proj": [4, 4, 5], "o_proj": [6, 6, 7],
               "gate_proj": [8, 8, 9], "up_proj": [10, 10, 11], "down_proj": [12, 12, 13]}  # fmt: skip
    structured = {n: by_type[n.rsplit(".", 1)[1]][int(n.split(".")[2])] for n in depth}
    ck3 = make_checkpoint("qwen2", num_hidden_layers=3)
    for order, want, n_groups in (("tiled", tiled, 11), ("structured", structured, 14)):
        model = fresh(ck3)
        adapter = attach(model, u=2, tie=2, order=order)
        assert len(adapter.params) == n_groups and adapter.num_params() == 2 * n_groups
        assert count_params(ck3, u=2, tie=2, order=order) == 2 * n_groups
        assert [n for n, _ in adapter.modules] == depth  # depth order
        for name, module in adapter.modules:
            assert module.v is adapter.params[want[name]], (order, name)
            assert model.get_submodule(name) is module


def test_structured_tying_on_qwen25_7b():
    """§6.5's structured tying at tie 16 on Qwen2.5-7B's 28 layers (config only): 7 types x ceil(28 / 16) = 14
    groups, each one type and a run of nearby layers (16, then the remaining 12)."""
    from export import BUILTIN_CONFIGS

    names = tinylora.module_names(28)
    members = {}
    for name, g in zip(names, tinylora.groups(28, 7, 16, "structured")):
        members.setdefault(g, []).append(name)
    assert len(members) == 14
    for group in members.values():
        assert len({n.rsplit(".", 1)[1] for n in group}) == 1, group  # one type
        layers = [int(n.split(".")[2]) for n in group]
        assert layers in (list(range(16)), list(range(16, 28))), group
    cfg = BUILTIN_CONFIGS["Qwen/Qwen2.5-7B-Instruct"]
    assert count_params(cfg, u=1, tie=16, order="structured") == 14
    assert count_params(cfg, u=1, tie=16, order="tiled") == 13  # the paper's headline is tiled


def test_targets_restrict(ck):
    model = fresh(ck)
    adapter = attach(model, targets=("v_proj", "q_proj"), tie=1)
    assert [n for n, _ in adapter.modules] == [f"model.layers.{i}.self_attn.{t}_proj" for i in (0, 1) for t in "qv"]
    assert isinstance(model.model.layers[0].mlp.up_proj, torch.nn.Linear)


def test_bad_settings_are_clear_errors(ck):
    model = fresh(ck)
    for kw, msg in [
        (dict(method="dora"), "unknown method"),
        (dict(variant="x"), "unknown variant"),
        (dict(order="random"), "unknown order"),
        (dict(targets=("qkv",)), "unknown targets"),
        (dict(r=999), "exceeds"),
        (dict(tie=0), "positive"),
        (dict(method="lora", tie=4), "no tying"),
    ]:
        with pytest.raises(ValueError, match=msg):
            attach(fresh(ck), **kw)
    attach(model)
    with pytest.raises(ValueError, match="already has adapters"):
        attach(model)


# -----------------------------------------------------------------------------
# PEFT's TinyLoRA is the `peft` variant


@pytest.mark.parametrize("u,weight_tying,tie", [(3, 0.0, 1), (2, 1.0, 14), (4, 6 / 7, 7)])
def test_peft_variant_equals_peft_tinylora(ck, u, weight_tying, tie):
    from peft import TinyLoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(ck, dtype=torch.float32)
    cfg = TinyLoraConfig(r=2, u=u, weight_tying=weight_tying, target_modules=list(tinylora.TARGETS))
    peft_model = get_peft_model(hf, cfg)  # projection_seed defaults to 42
    ours = fresh(ck)
    adapter = attach(ours, variant="peft", u=u, tie=tie, seed=42)
    assert len(adapter.params) == len(peft_model.base_model.tinylora_v["default"])
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for k, v in peft_model.base_model.tinylora_v["default"].items():
            v.copy_(torch.randn(u, generator=g))
            adapter.params[int(k)].copy_(v)
        for name, module in adapter.modules:  # same P, same factors, module by module
            theirs = peft_model.base_model.model.get_submodule(name)
            assert torch.equal(module.P, theirs.tinylora_P["default"])
            assert torch.allclose(module.V.T, theirs.tinylora_A["default"], atol=1e-6)
        want = peft_model(IDX).logits
        got = ours(IDX)
    assert torch.allclose(got, want, atol=2e-5), (got - want).abs().max()


@pytest.mark.parametrize("variant", ["paper", "peft", "verl"])
def test_each_variant_is_its_formula(variant):
    """ΔW of each row of VARIANTS, written out from a float64 full SVD and the module's own P and v."""
    from model import Config, Transformer

    torch.manual_seed(0)
    cfg = Config(num_hidden_layers=1, hidden_size=32, intermediate_size=48, num_attention_heads=4, vocab_size=50)
    model = Transformer(cfg)
    W = model.model.layers[0].mlp.down_proj.weight.detach().double().clone()  # (32, 48)
    adapter = attach(model, targets=("down_proj",), variant=variant, u=3, alpha=5.0, svd="full")
    set_v(adapter, scale=0.3)
    mod = adapter.modules[0][1]
    U0, S0, Vh0 = torch.linalg.svd(W, full_matrices=False)
    U, S, V = U0[:, :2], torch.diag(S0[:2]), Vh0[:2].T
    if variant != "peft":  # peft keeps LAPACK's signs; the others make U's largest entry positive
        s = torch.sign(U.gather(0, U.abs().argmax(0, keepdim=True)))
        U, V = U * s, V * s
    else:
        s = torch.sign((mod.V.double().T @ V).diag())  # fp32 vs fp64 LAPACK may disagree on sign: follow the module
        U, V = U * s, V * s
    v, P = mod.v.detach().double(), mod.P.double()
    R = torch.einsum("i,ijk->jk", v, P)
    want = {
        "paper": U @ S @ R @ V.T,
        "peft": U @ S.sqrt() @ R @ S.sqrt() @ V.T,
        "verl": (5.0 / 2) * U @ (R / 3**0.5) @ S @ V.T,
    }[variant]
    Um, M, Vm = mod.lowrank()
    got = (Um @ M @ Vm.T).double()
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5 * want.abs().max()), (got - want).abs().max()
    std = {"paper": 2**-0.5, "peft": 2**-0.5, "verl": 1.0}[variant]  # P's law, from a large draw of the same code
    big, v0 = tinylora.draw(variant, 20000, 2, 0, 0, (32, 48))
    assert abs(big.std().item() - std) < 0.01
    assert abs(v0.std().item() - (1e-5 if variant == "verl" else 0.0)) < 1e-7  # choice 5


def test_loraxs_forms(ck):
    """LoRA-XS: R = v.view(r, r) trains; paper form U Σ R Vᵀ, verl form (α/r) U R Σ Vᵀ without the √u."""
    for variant in ("paper", "verl"):
        adapter = attach(fresh(ck), method="loraxs", variant=variant, svd="full")
        set_v(adapter, scale=0.3)
        for _, m in adapter.modules[:3]:
            U, S, V, R = m.U.double(), torch.diag(m.S.double()), m.V.double(), m.v.detach().double().view(2, 2)
            want = U @ S @ R @ V.T if variant == "paper" else 16.0 * U @ R @ S @ V.T  # α / r = 32 / 2
            Um, M, Vm = m.lowrank()
            assert torch.allclose((Um @ M @ Vm.T).double(), want, rtol=1e-5, atol=1e-6 * want.abs().max())


def test_lora_alpha_defaults_to_the_official_32(ck):
    adapter = attach(fresh(ck), method="lora", r=4)
    assert adapter.alpha == 32.0 and all(m.scale == 8.0 for _, m in adapter.modules)
    set_v(adapter, scale=0.1)
    m = adapter.modules[0][1]
    U, M, V = m.lowrank()
    assert torch.allclose(U @ M @ V.T, 8.0 * m.B @ m.A, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("u", [1, 4])
def test_verl_over_paper_is_alpha_over_sqrt_ru_in_rms(u):
    """The same v under both variants, over many seeds of P: E||ΔW_verl||² / E||ΔW_paper||² = α² / (r u), i.e. the
    paper's lr grid moves ΔW α / √(r u) times further under verl (22.6 at α 32, r 2, u 1; choice 9)."""
    from svd import top_svd

    g = torch.Generator().manual_seed(0)
    W = torch.randn(24, 16, generator=g)
    base, USV, v = torch.nn.Linear(16, 24), top_svd(W, 2, "full"), torch.randn(u, generator=g)
    mods = {name: tinylora.TinyLoRALinear(base, 2, torch.zeros(u, 2, 2), v, name, alpha=a, USV=USV)
            for name, a in (("paper", None), ("verl", 32.0))}  # fmt: skip
    sq = {name: 0.0 for name in mods}
    for seed in range(10000):
        for name, m in mods.items():
            m.P = tinylora.draw(name, u, 2, seed, 0, W.shape)[0]
            U, M, V = m.lowrank()
            sq[name] += M.square().sum().item()  # = ||U M Vᵀ||²_F: U, V orthonormal
    want = 32.0**2 / (2 * u)
    assert abs(sq["verl"] / sq["paper"] / want - 1) < 0.05, (sq["verl"] / sq["paper"], want)


def test_full_finetuning_in_bf16_keeps_fp32_masters(ck):
    """Adam steps of 1e-6 of the weights' size round away in bf16 (spacing ~2⁻⁸ relative): trained directly, the
    bf16 weights hardly move; through the fp32 masters (choice 11) each step lands, and the model's weights are
    the masters rounded to bf16."""
    steps = 8

    def train(masters: bool):
        model = fresh(ck, torch.bfloat16)
        start = [w.detach().float().clone() for w in dict.fromkeys(model.parameters())]
        if masters:
            adapter = attach(model, method="full")
            params = adapter.params
        else:
            params = [w.requires_grad_(True) for w in dict.fromkeys(model.parameters())]
        lr = 1e-6 * torch.cat([w.abs().flatten() for w in start]).mean().item()
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        if masters:
            opt.register_step_post_hook(lambda *_: adapter.masters_to_model())  # as train.py does
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            model(IDX).float().logsumexp(-1).mean().backward()
            opt.step()
        if masters:
            assert all(p.dtype == torch.float32 and p.grad is not None for p in params)
            assert all(w.grad is None for w in model.parameters())  # each gradient moved to its master
            for w, m in zip(dict.fromkeys(model.parameters()), params):
                assert torch.equal(w, m.to(torch.bfloat16))
        moved = torch.cat([(p.detach().float() - s).abs().flatten() for p, s in zip(params, start)])
        live = torch.cat([(p.grad != 0).flatten() for p in params])  # not the embedding rows of unseen tokens
        return moved[live] / (steps * lr)

    with_masters, without = train(True), train(False)
    assert with_masters.median() > 0.9  # each step moved its weight by ~lr, in a consistent direction
    assert (with_masters > 0.5).float().mean() > 0.95
    assert without.median() == 0 and (without > 0).float().mean() < 0.05  # rounded away, but for tiny weights
