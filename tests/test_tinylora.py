"""
tinylora.py against independent references: the base model (v = 0), finite differences, the paper's parameter
counts, hand-written tying groups, PEFT's TinyLoRA and LoRA, transformers loading an exported checkpoint, and
a full SVD. Run: python -m pytest -q tests/test_tinylora.py
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tinylora
from model import load_model
from tinylora import BUILTIN_CONFIGS, attach, count_params, load_adapter

ROOT = Path(__file__).resolve().parents[1]

IDX = torch.randint(0, 300, (2, 11), generator=torch.Generator().manual_seed(0))


def fresh(path, dtype=torch.float32):
    return load_model(str(path), dtype=dtype, device="cpu")


def set_v(adapter, seed=1, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.params:
            p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture(scope="module")
def ck(make_checkpoint):
    return make_checkpoint("qwen2")


# -----------------------------------------------------------------------------
# start-up: v = 0 is the base model, disabled() is the base model


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(u=4, tie=3, order="structured"),
        dict(variant="peft", u=2),
        dict(method="loraxs"),
        dict(method="lora", r=4),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_update_is_bitwise_base(ck, kw, dtype):
    model = fresh(ck, dtype)
    with torch.no_grad():
        base = model(IDX)
        adapter = attach(model, **kw)
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


@pytest.mark.parametrize("family,tied", [("qwen2", False), ("llama", True), ("qwen3", False)])
def test_full_finetuning_unfreezes_everything(make_checkpoint, family, tied):
    ck = make_checkpoint(family, tied=tied)
    model = fresh(ck)
    adapter = attach(model, method="full")
    assert adapter.num_params() == sum(p.numel() for p in set(model.parameters()))
    assert all(p.requires_grad for p in model.parameters())
    assert adapter.num_params() == count_params(ck, method="full")
    with pytest.raises(ValueError, match="no base model"):
        with adapter.disabled():
            pass


@pytest.mark.parametrize("kw", [dict(u=3, tie=4), dict(variant="verl", u=2, tie=14), dict(method="loraxs")])
def test_grad_matches_finite_differences(ck, kw):
    model = fresh(ck, torch.float64)
    adapter = attach(model, **kw)
    set_v(adapter, scale=0.3)
    w = torch.randn(2, 11, model.cfg.vocab_size, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    loss_fn = lambda: (model(IDX) * w).sum()  # noqa: E731
    loss_fn().backward()
    # model.py's RMSNorm runs in fp32 even in a float64 model, so the loss carries ~1e-7 relative noise: use a
    # large step and Richardson extrapolation (error O(h⁴)) rather than a tiny step
    h = 2.0**-6  # exact in fp32, where v lives

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


@pytest.mark.parametrize("kw", [dict(u=3), dict(variant="verl", u=2), dict(variant="peft", u=2), dict(method="loraxs")])
def test_grad_matches_finite_differences_one_layer(kw):
    """One adapted linear, all float64: finite differences agree to ~1e-9."""
    from model import Config, Transformer

    torch.manual_seed(0)
    cfg = Config(num_hidden_layers=1, hidden_size=32, intermediate_size=48, num_attention_heads=4, vocab_size=50)
    model = Transformer(cfg).double()
    adapter = attach(model, targets=("down_proj",), **kw)
    set_v(adapter, scale=0.3)
    layer = adapter.modules[0][1]
    x = torch.randn(5, 48, dtype=torch.float64)
    w = torch.randn(5, 32, dtype=torch.float64)
    loss_fn = lambda: (torch.tanh(layer(x)) * w).sum()  # noqa: E731
    loss_fn().backward()
    p = adapter.params[0]
    for i in range(p.numel()):
        with torch.no_grad():
            x0 = p[i].item()
            p[i] = x0 + 2.0**-12
            up = loss_fn().item()
            p[i] = x0 - 2.0**-12
            down = loss_fn().item()
            p[i] = x0
        fd = (up - down) / 2.0**-11
        assert abs(fd - p.grad[i].item()) <= 1e-6 * max(1.0, abs(fd)), (i, fd, p.grad[i])


# -----------------------------------------------------------------------------
# parameter counts (the paper's table) and tying groups


@pytest.mark.parametrize(
    "model,u,tie,want",  # settings that reproduce the paper's counts: (u, tie) = (1, 16), (1, 4), (1, 1), (2, 1)
    [
        ("Qwen/Qwen2.5-3B-Instruct", 1, 16, 16),
        ("Qwen/Qwen2.5-3B-Instruct", 1, 4, 63),
        ("Qwen/Qwen2.5-3B-Instruct", 1, 1, 252),
        ("Qwen/Qwen2.5-3B-Instruct", 2, 1, 504),
        ("Qwen/Qwen2.5-7B-Instruct", 1, 16, 13),
        ("Qwen/Qwen2.5-7B-Instruct", 1, 4, 49),
        ("Qwen/Qwen2.5-7B-Instruct", 1, 1, 196),
        ("Qwen/Qwen2.5-7B-Instruct", 2, 1, 392),
        ("Qwen/Qwen2.5-7B-Instruct", 1, 196, 1),
    ],
)
def test_paper_counts(model, u, tie, want):
    assert count_params(BUILTIN_CONFIGS[model], u=u, tie=tie) == want


@pytest.mark.parametrize(
    "model,total",  # the parameter totals the Hub reports for each checkpoint: checks the built-in table too
    [
        ("Qwen/Qwen2.5-0.5B-Instruct", 494_032_768),
        ("Qwen/Qwen2.5-1.5B-Instruct", 1_543_714_304),
        ("Qwen/Qwen2.5-3B-Instruct", 3_085_938_688),
        ("Qwen/Qwen2.5-7B-Instruct", 7_615_616_512),
        ("meta-llama/Meta-Llama-3-8B-Instruct", 8_030_261_248),
    ],
)
def test_full_counts_match_the_hub(model, total):
    assert count_params(BUILTIN_CONFIGS[model], method="full") == total


def test_count_cli_offline():
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "tinylora.py", "--model", "Qwen/Qwen2.5-7B-Instruct", "--u", "1", "--tie", "16"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "built-in table" in out.stdout and "196 adapted modules" in out.stdout
    assert "13 trainable parameters" in out.stdout and "26 bytes in bf16" in out.stdout
    cmd[-1] = "196"
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert "\n1 trainable parameter (" in out.stdout and "2 bytes in bf16" in out.stdout
    bad = subprocess.run(cmd[:2] + ["--model", "no/such-model"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "cannot read a config" in bad.stderr


@pytest.mark.parametrize(
    "kw", [dict(method="tinylora", u=3, tie=5), dict(method="loraxs", r=3), dict(method="lora", r=3)]
)
def test_count_matches_attached_model(ck, kw):
    model = fresh(ck)
    adapter = attach(model, **kw)
    want = sum(p.numel() for p in adapter.params)  # the tensors the optimizer would see
    assert count_params(ck, **kw) == want == adapter.num_params()


def test_tied_groups_module_by_module(ck):
    """2 layers x 7 targets = 14 modules, tie = 3: groups written out by hand for both orders."""
    L0, L1 = "model.layers.0.", "model.layers.1."
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
    names += ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    tiled = dict(zip([L0 + n for n in names] + [L1 + n for n in names], [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4]))
    # structured: q0 q1 k0 | k1 v0 v1 | o0 o1 g0 | g1 u0 u1 | d0 d1
    structured = {L0 + "self_attn.q_proj": 0, L1 + "self_attn.q_proj": 0, L0 + "self_attn.k_proj": 0,
                  L1 + "self_attn.k_proj": 1, L0 + "self_attn.v_proj": 1, L1 + "self_attn.v_proj": 1,
                  L0 + "self_attn.o_proj": 2, L1 + "self_attn.o_proj": 2, L0 + "mlp.gate_proj": 2,
                  L1 + "mlp.gate_proj": 3, L0 + "mlp.up_proj": 3, L1 + "mlp.up_proj": 3,
                  L0 + "mlp.down_proj": 4, L1 + "mlp.down_proj": 4}  # fmt: skip
    for order, want in (("tiled", tiled), ("structured", structured)):
        model = fresh(ck)
        adapter = attach(model, u=2, tie=3, order=order)
        assert len(adapter.params) == 5 and adapter.num_params() == 10
        assert [n for n, _ in adapter.modules] == list(tiled)  # depth order
        for name, module in adapter.modules:
            assert module.v is adapter.params[want[name]], (order, name)
            assert model.get_submodule(name) is module


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
# the SVD


@tinylora.cpu_threads(1)  # tiny LAPACK calls: one thread is much faster on a shared CPU
def test_fast_svd_equals_full_svd(ck):
    g = torch.Generator().manual_seed(0)
    # a known spectrum with a near-tie between σ2 and σ3 (the hard case), tall and wide
    for m, n in ((300, 120), (96, 400)):
        k = min(m, n)
        U0, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
        V0, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
        s = torch.cat([torch.tensor([10.0, 5.0, 4.99]), torch.linspace(4.5, 0.01, k - 3)]).double()
        W = ((U0 * s) @ V0.T).float()
        U, S, V = tinylora.top_svd(W, 2, "fast")
        assert torch.allclose(S.double(), s[:2], rtol=1e-5)
        Ur, Vr = tinylora.canonical_sign(U0[:, :2].float(), V0[:, :2].float())
        assert (U - Ur).abs().max() < 1e-3 and (V - Vr).abs().max() < 1e-3  # gap 0.2%: conditioning-limited
    model = fresh(ck)
    for i in range(2):
        for t in tinylora.TARGETS:
            W = model.get_submodule(tinylora.module_names(2, (t,))[i]).weight
            for r in (1, 2, 5):
                a, b = tinylora.top_svd(W, r, "fast"), tinylora.top_svd(W, r, "full")
                for x, y in zip(a, b):
                    assert (x - y).abs().max() < 1e-4, (t, r)
                # and it is the SVD: W V = U Σ
                assert torch.allclose(W @ a[2], a[0] * a[1], atol=1e-4)


@pytest.mark.slow
@tinylora.cpu_threads(1)
def test_fast_svd_on_real_weights(smollm2):
    """Real spectra have near-ties (σ3/σ2 up to 0.998 in SmolLM2): fast path vs a float64 SVD, first and last layer."""
    from safetensors import safe_open

    names = tinylora.module_names(30)
    names = names[:7] + names[-7:]
    with safe_open(str(smollm2 / "model.safetensors"), framework="pt") as f:
        Ws = [f.get_tensor(n + ".weight").float() for n in names]
    R = torch.randn(2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for name, W in zip(names, Ws):
        U, S, V = (t.double() for t in tinylora.top_svd(W, 2, "fast"))
        U0, S0, Vh0 = torch.linalg.svd(W.double(), full_matrices=False)
        U0, V0 = tinylora.canonical_sign(U0[:, :2], Vh0[:2].T)
        dW, dW0 = (U * S) @ R @ V.T, (U0 * S0[:2]) @ R @ V0.T
        assert ((dW - dW0).norm() / dW0.norm()).item() < 1e-4, name
        assert torch.allclose(S, S0[:2], rtol=1e-5), name


def test_canonical_sign_is_stable_under_flips():
    W = torch.randn(50, 30, generator=torch.Generator().manual_seed(3))
    U, S, V = torch.linalg.svd(W, full_matrices=False)
    a = tinylora.canonical_sign(U[:, :2], V[:2].T)
    b = tinylora.canonical_sign(-U[:, :2], -V[:2].T)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert (a[0].gather(0, a[0].abs().argmax(0, keepdim=True)) > 0).all()


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


# -----------------------------------------------------------------------------
# adapter files


def test_save_load_fresh_process_identical(ck, tmp_path):
    model = fresh(ck)
    adapter = attach(model, u=3, tie=4, seed=7)
    set_v(adapter)
    path = str(tmp_path / "a.safetensors")
    adapter.save(path, step=12)
    with torch.no_grad():
        want = model(IDX)
    code = (
        "import sys, torch; sys.path.insert(0, '.');"
        "from model import load_model; from tinylora import load_adapter;"
        f"m = load_model({str(ck)!r}, dtype=torch.float32, device='cpu');"
        f"a = load_adapter({path!r}, m);"
        f"idx = torch.randint(0, 300, (2, 11), generator=torch.Generator().manual_seed(0));"
        f"torch.save((m(idx).detach(), a.stored['meta']), {str(tmp_path / 'out.pt')!r})"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    got, meta = torch.load(tmp_path / "out.pt")
    assert torch.equal(got, want)
    assert meta == {"step": 12}


@pytest.mark.parametrize("method", ["loraxs", "lora", "full"])
def test_save_load_other_methods(ck, tmp_path, method):
    model = fresh(ck)
    adapter = attach(model, method=method, r=3)
    if method == "full":
        with torch.no_grad():
            model.model.layers[0].mlp.up_proj.weight.add_(0.01)
    else:
        set_v(adapter, scale=0.1)
    with torch.no_grad():
        want = model(IDX)
    adapter.save(str(tmp_path / "a.safetensors"))
    model2 = fresh(ck)
    load_adapter(str(tmp_path / "a.safetensors"), model2)
    with torch.no_grad():
        assert torch.equal(model2(IDX), want)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_low_precision_storage_round_trip(ck, tmp_path, dtype):
    model = fresh(ck)
    adapter = attach(model, u=3, tie=2)
    set_v(adapter, scale=0.37)
    path = str(tmp_path / "a.safetensors")
    adapter.save(path, dtype=dtype)
    loaded = load_adapter(path, fresh(ck))
    torch_dtype = tinylora.DTYPES[dtype]
    for a, b in zip(adapter.params, loaded.params):
        assert b.dtype == torch.float32
        assert torch.equal(b, a.detach().to(torch_dtype).float())  # exactly the stored value, nothing else
        assert not torch.equal(a, b)  # 0.37 * randn is not exact in 16 bits: the rounding is real


def test_file_size_of_13_parameters(make_checkpoint, tmp_path):
    ck13 = make_checkpoint("qwen2", num_hidden_layers=13)
    adapter = attach(fresh(ck13), u=1, tie=7)  # 91 modules / 7 = 13 groups
    assert adapter.num_params() == 13
    sizes = {dt: adapter.save(str(tmp_path / f"{dt}.safetensors"), dtype=dt) for dt in ("fp32", "bf16")}
    print(f"\nadapter file for 13 parameters: {sizes} bytes on disk (the tensors themselves: 52 / 26 bytes)")
    for dt, data_bytes in (("fp32", 52), ("bf16", 26)):
        with open(tmp_path / f"{dt}.safetensors", "rb") as f:  # safetensors: 8-byte header length, JSON, data
            header_len = int.from_bytes(f.read(8), "little")
        assert sizes[dt] - 8 - header_len == data_bytes


def test_wrong_base_and_damaged_files(ck, make_checkpoint, tmp_path):
    adapter = attach(fresh(ck), u=2, tie=3)
    set_v(adapter)
    path = tmp_path / "a.safetensors"
    adapter.save(str(path))
    other = make_checkpoint("qwen2", seed=1)  # same shapes, different weights
    with pytest.raises(ValueError, match="different base weights"):
        load_adapter(str(path), fresh(other))
    deeper = make_checkpoint("qwen2", num_hidden_layers=3)
    with pytest.raises(ValueError, match="different base weights"):
        load_adapter(str(path), fresh(deeper))
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-5])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_adapter(str(tmp_path / "cut.safetensors"), fresh(ck))
    flipped = bytearray(data)
    flipped[-3] ^= 0xFF  # one byte of v
    (tmp_path / "flip.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="corrupt"):
        load_adapter(str(tmp_path / "flip.safetensors"), fresh(ck))
    with pytest.raises(ValueError, match="not a tinylora adapter"):
        load_adapter(str(ck / "model.safetensors"), fresh(ck))
    with pytest.raises(ValueError, match="no adapter file"):
        load_adapter(str(tmp_path / "missing.safetensors"), fresh(ck))


def test_adapter_loads_in_bf16_model(ck, tmp_path):
    adapter = attach(fresh(ck), u=2, tie=3)
    set_v(adapter)
    adapter.save(str(tmp_path / "a.safetensors"))
    load_adapter(str(tmp_path / "a.safetensors"), fresh(ck, torch.bfloat16))  # the fingerprint tolerates dtype


# -----------------------------------------------------------------------------
# merge and export


CASES = [dict(u=3, tie=4), dict(variant="verl", u=2, tie=7, alpha=4.0), dict(method="lora", r=3)]


@pytest.mark.parametrize("kw", CASES)
def test_merge_in_place_equals_unmerged(ck, kw):
    model = fresh(ck)
    adapter = attach(model, **kw)
    set_v(adapter, scale=0.2)
    with torch.no_grad():
        want = model(IDX)
        tinylora.merge(model, adapter)
        assert not any(isinstance(m, tinylora.ADAPTER_LAYERS) for m in model.modules())
        assert torch.allclose(model(IDX), want, atol=1e-4)


@pytest.mark.parametrize("kw", CASES)
def test_merged_checkpoint_loads_in_transformers(ck, tmp_path, kw):
    from transformers import AutoModelForCausalLM

    model = fresh(ck)
    adapter = attach(model, **kw)
    set_v(adapter, scale=0.2)
    tinylora.export_merged(model, str(tmp_path / "merged"))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(tmp_path / "merged"))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    with torch.no_grad():
        want, got = model(IDX), hf(IDX).logits
        with adapter.disabled():
            base = model(IDX)
    assert torch.allclose(got, want, atol=1e-4) and not torch.allclose(got, base, atol=1e-2)


@pytest.mark.parametrize("kw", CASES + [dict(variant="peft", u=2), dict(method="loraxs")])
def test_exported_peft_lora_loads_in_peft(ck, tmp_path, kw):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = fresh(ck)
    adapter = attach(model, **kw)
    set_v(adapter, scale=0.2)
    tinylora.export_peft_lora(adapter, str(tmp_path / "lora"))
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == adapter.r
    hf = AutoModelForCausalLM.from_pretrained(ck, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "lora")
    with torch.no_grad():
        want, got = model(IDX), peft_model(IDX).logits
        with adapter.disabled():
            base = model(IDX)
    assert torch.allclose(got, want, atol=1e-4) and not torch.allclose(got, base, atol=1e-2)
