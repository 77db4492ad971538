"""
export.py against independent references: a fresh process loading a saved adapter, hand-computed file sizes,
damaged files, transformers loading a merged checkpoint, PEFT loading the LoRA export, the paper's parameter
counts and the Hub's parameter totals. Run: python -m pytest -q tests/test_export.py
"""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import export
from export import BUILTIN_CONFIGS, count_params, load_adapter, read_config
from model import load_model
from tinylora import ADAPTER_LAYERS, DTYPES, attach

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
# parameter counts from a config (the paper's table, the Hub's totals) and the command line


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
    cmd[-1:] = ["16", "--order", "structured"]  # 7 types x ceil(28 / 16) runs of layers
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "14 trainable parameters" in out.stdout and "order=structured" in out.stdout
    bad = subprocess.run(cmd[:2] + ["--model", "no/such-model"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "cannot read a config" in bad.stderr


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
        "from model import load_model; from export import load_adapter;"
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
    torch_dtype = DTYPES[dtype]
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
        export.merge(model, adapter)
        assert not any(isinstance(m, ADAPTER_LAYERS) for m in model.modules())
        assert torch.allclose(model(IDX), want, atol=1e-4)


@pytest.mark.parametrize("kw", CASES)
def test_merged_checkpoint_loads_in_transformers(ck, tmp_path, kw):
    from transformers import AutoModelForCausalLM

    model = fresh(ck)
    adapter = attach(model, **kw)
    set_v(adapter, scale=0.2)
    export.export_merged(model, str(tmp_path / "merged"))
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
    export.export_peft_lora(adapter, str(tmp_path / "lora"))
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == adapter.r
    hf = AutoModelForCausalLM.from_pretrained(ck, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "lora")
    with torch.no_grad():
        want, got = model(IDX), peft_model(IDX).logits
        with adapter.disabled():
            base = model(IDX)
    assert torch.allclose(got, want, atol=1e-4) and not torch.allclose(got, base, atol=1e-2)


# -----------------------------------------------------------------------------
# real sizes: Qwen2.5-7B's widths (hidden 3584, intermediate 18944), layers cut


class _Stub:
    """Just enough of a model for fingerprint(): get_submodule(name).weight."""

    def __init__(self, name, weight):
        self.name, self.weight = name, weight

    def get_submodule(self, name):
        assert name == self.name
        return self


@pytest.fixture(scope="module")
def real_width_model():
    """A factory of 1-layer models at Qwen2.5-7B-Instruct's widths (64-token vocabulary), all sharing one set of
    random bf16 weights. Each adapted linear gets two strong singular directions on top of N(0, 0.02²) noise, as
    trained weights have: a flat random spectrum would only time the SVD's fallback."""
    from model import Transformer, rope_inv_freq

    cfg = dataclasses.replace(read_config(BUILTIN_CONFIGS["Qwen/Qwen2.5-7B-Instruct"])[0], num_hidden_layers=1)
    cfg = dataclasses.replace(cfg, vocab_size=64)
    with torch.device("meta"):
        shapes = {k: t.shape for k, t in Transformer(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    sd = {}
    for k, shape in shapes.items():
        w = torch.randn(shape, generator=g) * 0.02
        if k.endswith("_proj.weight"):  # (d_out, d_in): + 40 u1 v1ᵀ + 25 u2 v2ᵀ
            a, b = torch.randn(shape[0], 2, generator=g), torch.randn(shape[1], 2, generator=g)
            w += (a / a.norm(dim=0)) * torch.tensor([40.0, 25.0]) @ (b / b.norm(dim=0)).T
        sd[k] = w.to(torch.bfloat16)

    def make():
        with torch.device("meta"):
            model = Transformer(cfg)
        model.load_state_dict(sd, strict=True, assign=True)
        model.inv_freq = rope_inv_freq(cfg)
        return model

    return make


def test_fingerprint_probes_a_7b_down_proj():
    """3584 x 18944 = 67,895,296 entries: the last probe must be the last entry, not one past it (fp32 cannot hold
    67,895,295, so an fp32 linspace of indices rounds it up)."""
    name = "model.layers.27.mlp.down_proj"
    w = torch.randn(3584, 18944, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)  # (d_out, d_in)
    fp = export.fingerprint(_Stub(name, w), [name])
    flat = w.flatten()
    n = flat.numel()
    want = [(n - 1) * i // 7 for i in range(8)]  # 8 probes from the first entry to the last, exact integers
    assert want[-1] == 67_895_295
    assert fp["probes"][name] == [flat[i].float().item() for i in want]


@pytest.mark.slow
def test_attach_save_load_at_7b_widths(real_width_model, tmp_path):
    """One layer at Qwen2.5-7B's widths, bf16: attach (SVDs, fingerprint of a 67.9M-entry down_proj), save, load
    onto a fresh copy, same logits; and a copy with one probed weight changed is refused."""
    model = real_width_model()
    ids = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(ids)
        adapter = attach(model, u=2, tie=16)  # 7 modules, one v (verl: it starts at the official v₀ ~ N(0, 1e-5²))
        adapter.params[0].zero_()
        assert torch.equal(model(ids), base)
        set_v(adapter, scale=0.5)
        want = model(ids)
    assert adapter.num_params() == 2 and not torch.equal(want, base)
    path = str(tmp_path / "a.safetensors")
    adapter.save(path)
    loaded = load_adapter(path, real_width_model())
    with torch.no_grad():
        assert torch.equal(loaded.model(ids), want)
    other = real_width_model()
    down = other.model.layers[0].mlp.down_proj
    down.weight = torch.nn.Parameter(down.weight.detach().clone(), requires_grad=False)  # not the shared tensor
    with torch.no_grad():
        down.weight.view(-1)[-1] += 1.0  # the last entry of the last module: the last probe
    with pytest.raises(ValueError, match="different base weights"):
        load_adapter(path, other)
