"""
export.py against independent references: a fresh process loading a saved adapter, hand-computed file sizes,
damaged files, transformers loading a merged checkpoint, PEFT loading the LoRA export, the paper's parameter
counts and the Hub's parameter totals; the export command's PEFT folder (PEFT logits, vLLM's loader rules as read
in vllm 0.33.0, also on broken folders), merged checkpoints (dtype, shards) and the Hub (mocked: push, download).
Run: python -m pytest -q tests/test_export.py
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import IDX, fresh, set_v

import export
from export import BUILTIN_CONFIGS, count_params, load_adapter, read_config
from tinylora import ADAPTER_LAYERS, DTYPES, attach

ROOT = Path(__file__).resolve().parents[1]


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
# the export command: python export.py RUN_DIR --peft DIR --merged DIR [--push-to-hub ID]

SHA = "0123456789abcdef0123456789abcdef01234567"  # a commit as the Hub cache names its snapshot folders


def make_run(ck, tmp_path, name="run", **kw):
    """A run folder as train.py leaves it: adapter.safetensors (trained values) + args.json naming the base."""
    model = fresh(ck)
    adapter = attach(model, **(kw or dict(u=3, tie=4, seed=7)))
    set_v(adapter, scale=0.2)
    run = tmp_path / name
    adapter.save(str(run / "adapter.safetensors"), step=5)
    (run / "args.json").write_text(json.dumps({"model": str(ck)}))
    return run, model, adapter


def logits_of(model, adapter=None):
    with torch.no_grad():
        if adapter is None:
            return model(IDX)
        with adapter.disabled():
            return model(IDX)


def in_hub_cache(ck, tmp_path, repo="org/tiny"):
    """A copy of checkpoint `ck` where huggingface_hub would keep it: …/models--org--tiny/snapshots/<sha>."""
    dest = tmp_path / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots" / SHA
    shutil.copytree(ck, dest)
    return dest


@pytest.mark.parametrize("kw", [dict(u=3, tie=4, seed=7), dict(method="lora", r=3), dict(variant="verl", u=2, tie=7)])
def test_command_peft_folder_loads_in_peft(ck, tmp_path, kw):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run, model, adapter = make_run(ck, tmp_path, **kw)
    out = tmp_path / "lora"
    with pytest.warns(UserWarning, match="local folder with no Hub id"):  # a plain folder has no id to record
        export.main([str(run), "--peft", str(out), "--device", "cpu"])
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md", "adapter.safetensors"} <= set(
        os.listdir(out)
    )
    hf = AutoModelForCausalLM.from_pretrained(ck, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(hf, out)
    with torch.no_grad():
        got = peft_model(IDX).logits
    want = logits_of(model)
    assert torch.allclose(got, want, atol=1e-4) and not torch.allclose(got, logits_of(model, adapter), atol=1e-2)
    # the tinylora file travels with it, byte for byte
    assert (out / "adapter.safetensors").read_bytes() == (run / "adapter.safetensors").read_bytes()


def test_peft_config_and_card(ck, tmp_path):
    from peft import LoraConfig

    cached = in_hub_cache(ck, tmp_path)  # the base as the Hub cache holds it: its id and commit are known
    run, _, adapter = make_run(cached, tmp_path)
    out = tmp_path / "lora"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "local folder" warning: the id came from the cache path
        export.main([str(run), "--peft", str(out), "--device", "cpu"])
    cfg = json.loads((out / "adapter_config.json").read_text())
    want = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2, "lora_alpha": 2, "bias": "none",
            "lora_dropout": 0.0, "fan_in_fan_out": False, "modules_to_save": None, "use_rslora": False,
            "use_dora": False, "base_model_name_or_path": "org/tiny", "revision": SHA}  # fmt: skip
    assert {k: cfg.get(k) for k in want} == want
    assert cfg["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    LoraConfig(**{k: v for k, v in cfg.items() if k != "peft_type"})  # every field is one PEFT knows
    card = (out / "README.md").read_text()
    front = card.split("---\n")[1]  # YAML front matter between the first two '---' lines
    assert "base_model: org/tiny\n" in front and "library_name: peft\n" in front
    assert f"{adapter.num_params()} trained parameters" in card and "--max-lora-rank 8" in card
    assert "PeftModel.from_pretrained" in card


def test_hub_id_of_a_base(ck, tmp_path):
    """How an export names its base: a Hub id as is; a Hub-cache folder by its id and commit; a folder whose config
    records the id it came from (transformers < 5 wrote _name_or_path) by that id; any other folder by its path."""
    assert export.hub_id_of("Qwen/Qwen2.5-7B-Instruct") == ("Qwen/Qwen2.5-7B-Instruct", None, None)
    assert export.hub_id_of(str(in_hub_cache(ck, tmp_path, "my-org/tiny-model")))[:2] == ("my-org/tiny-model", SHA)
    named = tmp_path / "named"
    shutil.copytree(ck, named)
    cfg = json.loads((named / "config.json").read_text())
    (named / "config.json").write_text(json.dumps(cfg | {"_name_or_path": "org/original"}))
    assert export.hub_id_of(str(named)) == ("org/original", None, None)
    path, sha, warning = export.hub_id_of(str(ck))
    assert (path, sha) == (str(ck), None) and "no Hub id" in warning


def test_command_rejects_bad_requests(ck, tmp_path):
    run, _, _ = make_run(ck, tmp_path)
    with pytest.raises(SystemExit, match="nothing to write"):
        export.main([str(run)])
    with pytest.raises(SystemExit, match="give --peft DIR too"):
        export.main([str(run), "--merged", str(tmp_path / "m"), "--push-to-hub", "me/x"])
    with pytest.raises(SystemExit, match="no adapter file"):
        export.main([str(tmp_path / "nothing"), "--peft", str(tmp_path / "p")])
    with pytest.raises(SystemExit):  # counting flags make no sense with an adapter that carries its settings
        export.main([str(run), "--peft", str(tmp_path / "p"), "--u", "4"])
    full, _, _ = make_run(ck, tmp_path, "full", method="full")
    with pytest.raises(SystemExit, match="no LoRA to export"):
        export.main([str(full), "--peft", str(tmp_path / "p")])
    (run / "args.json").unlink()  # without args.json, the file's own metadata names the base
    lone = tmp_path / "lone.safetensors"
    shutil.copy(run / "adapter.safetensors", lone)
    with pytest.warns(UserWarning):
        export.main([str(lone), "--peft", str(tmp_path / "p2"), "--device", "cpu"])
    assert json.loads((tmp_path / "p2" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(ck)


def test_command_refuses_another_base(ck, make_checkpoint, tmp_path):
    run, _, _ = make_run(ck, tmp_path)
    other = make_checkpoint("qwen2", seed=1)  # same shapes, other weights
    with pytest.raises(ValueError, match="different base weights"):
        export.main([str(run), "--peft", str(tmp_path / "p"), "--model", str(other), "--device", "cpu"])


# -----------------------------------------------------------------------------
# vLLM's LoRA rules (vllm 0.33.0's loader, as read: peft_helper.py, lora_model.py, lora/utils.py, config/lora.py)


def test_vllm_rules_pass_our_export_and_fail_broken_folders(ck, tmp_path):
    from safetensors.torch import load_file, save_file

    run, _, _ = make_run(ck, tmp_path)
    good = tmp_path / "good"
    with pytest.warns(UserWarning):
        export.main([str(run), "--peft", str(good), "--device", "cpu"])
    assert export.vllm_lora_problems(str(good)) == []
    assert export.vllm_lora_problems(str(good), max_lora_rank=8) == []
    assert any("max_lora_rank 1" in p for p in export.vllm_lora_problems(str(good), max_lora_rank=1))  # r = 2
    assert any("not one of" in p for p in export.vllm_lora_problems(str(good), max_lora_rank=4))
    assert [export.vllm_max_lora_rank(r) for r in (1, 2, 8, 9, 300, 512, 513)] == [1, 8, 8, 16, 320, 512, None]

    def broken(name, cfg_change=None, tensors_change=None):
        folder = tmp_path / name
        shutil.copytree(good, folder)
        cfg = json.loads((folder / "adapter_config.json").read_text())
        cfg.update(cfg_change or {})
        (folder / "adapter_config.json").write_text(json.dumps(cfg))
        if tensors_change:
            sd = load_file(folder / "adapter_model.safetensors")
            tensors_change(sd)
            save_file(sd, folder / "adapter_model.safetensors")
        return export.vllm_lora_problems(str(folder))

    def has(problems, text):
        return any(text in p for p in problems)

    assert has(broken("bias", {"bias": "all"}), "bias")
    rank = broken("rank", {"r": 1000})
    assert has(rank, "greater than max_lora_rank 512") and has(rank, "rank-1000 pair")  # tensors say 2: inconsistent
    assert has(broken("save", {"modules_to_save": ["lm_head"]}), "modules_to_save")
    assert has(broken("dora", {"use_dora": True}), "DoRA")
    assert has(broken("pissa", {"init_lora_weights": "pissa"}), "init_lora_weights")
    assert has(broken("tinylora", {"peft_type": "TINYLORA"}), "LoRA adapters only")
    assert has(broken("embed", {"target_modules": ["q_proj", "embed_tokens"]}), "embed_tokens")

    def add_bias(sd):
        sd["base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias"] = torch.zeros(3)

    assert has(broken("bias_tensor", tensors_change=add_bias), "lora_B.bias")

    def drop_a(sd):
        del sd["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"]

    assert has(broken("half", tensors_change=drop_a), "not both")

    def head(sd):
        sd["base_model.model.lm_head.lora_A.weight"] = torch.zeros(2, 64)
        sd["base_model.model.lm_head.lora_B.weight"] = torch.zeros(384, 2)

    assert has(broken("head", tensors_change=head), "lm_head is not a linear vLLM adapts")


# -----------------------------------------------------------------------------
# the merged checkpoint from the command


def test_command_merged_fp32_and_bf16(ck, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from tokenizer import Tokenizer

    # the literal variant: v = 0.2 moves the tiny model by a bf16-visible, not a chaotic, amount (verl's is ~20x larger)
    run, model, _ = make_run(ck, tmp_path, u=3, tie=4, seed=7, variant="paper")
    want = logits_of(model)
    export.main([str(run), "--merged", str(tmp_path / "m32"), "--device", "cpu"])
    cfg = json.loads((tmp_path / "m32" / "config.json").read_text())
    assert cfg["dtype"] == cfg["torch_dtype"] == "float32"
    assert {"generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(tmp_path / "m32"))
    ours = fresh(tmp_path / "m32")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "m32")
    with torch.no_grad():
        assert torch.allclose(ours(IDX), want, atol=1e-4) and torch.allclose(hf(IDX).logits, want, atol=1e-4)
    msgs = [{"role": "user", "content": "What is 2 plus 3?"}]
    assert Tokenizer(str(tmp_path / "m32")).render(msgs) == Tokenizer(str(ck)).render(msgs)  # chat template kept

    export.main([str(run), "--merged", str(tmp_path / "m16"), "--dtype", "bf16", "--device", "cpu"])
    cfg = json.loads((tmp_path / "m16" / "config.json").read_text())
    assert cfg["dtype"] == cfg["torch_dtype"] == "bfloat16"
    with safe_open(tmp_path / "m16" / "model.safetensors", framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    hf16 = AutoModelForCausalLM.from_pretrained(tmp_path / "m16")  # dtype from the config, as transformers reads it
    assert hf16.dtype == torch.bfloat16
    with torch.no_grad():
        got = fresh(tmp_path / "m16", torch.bfloat16)(IDX).float()
    assert (got - want).abs().max() < 0.1 * want.abs().max()  # the adapted model, rounded to bf16


def test_merged_sharding_with_a_tiny_threshold(ck, tmp_path):
    from transformers import AutoModelForCausalLM

    run, model, _ = make_run(ck, tmp_path)
    out = tmp_path / "sharded"
    (out).mkdir()
    (out / "model.safetensors").write_bytes(b"stale")  # a previous single-file export must not shadow the shards
    export.main([str(run), "--merged", str(out), "--max-shard-size", "40KB", "--device", "cpu"])
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(f for f in os.listdir(out) if f.endswith(".safetensors")) == shards
    sizes = [os.path.getsize(out / s) for s in shards]
    biggest = max(t.numel() * 4 for t in model.state_dict().values())
    assert all(s <= max(40_000, biggest) + 10_000 for s in sizes)  # header aside, each shard keeps the limit
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in model.state_dict().values())
    want = logits_of(model)
    with torch.no_grad():
        assert torch.allclose(fresh(out)(IDX), want, atol=1e-4)
        assert torch.allclose(AutoModelForCausalLM.from_pretrained(out)(IDX).logits, want, atol=1e-4)
    assert export.plan_shards({"a": 5, "b": 5, "c": 20, "d": 1}, 10) == [["a", "b"], ["c"], ["d"]]


# -----------------------------------------------------------------------------
# the Hub, mocked: pushing a folder, loading an adapter by repo id


class FakeApi:
    calls = []
    fail = None

    def __init__(self, endpoint=None, token=None):
        self.token = token

    def create_repo(self, repo_id, **kw):
        FakeApi.calls.append(("create_repo", repo_id, kw))
        if FakeApi.fail:
            raise FakeApi.fail

    def upload_folder(self, **kw):
        FakeApi.calls.append(("upload_folder", kw))


def test_push_to_hub_mocked(ck, tmp_path, monkeypatch):
    import httpx
    import huggingface_hub
    from huggingface_hub import errors

    import hub as H
    import model as M

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_fake")
    monkeypatch.setattr(H, "hub_unreachable", lambda *a, **k: None)
    FakeApi.calls, FakeApi.fail = [], None
    run, _, _ = make_run(ck, tmp_path)
    out = tmp_path / "lora"
    with pytest.warns(UserWarning):
        export.main([str(run), "--peft", str(out), "--push-to-hub", "me/tiny-tinylora", "--device", "cpu"])
    (_, repo, kw), (_, up) = FakeApi.calls
    assert repo == "me/tiny-tinylora" and kw["exist_ok"] is True and kw["repo_type"] == "model"
    assert up["repo_id"] == "me/tiny-tinylora" and os.path.samefile(up["folder_path"], out)
    assert "me/tiny-tinylora" in (out / "README.md").read_text()  # the card shows how to load it from there

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(SystemExit, match="hf auth login"):
        export.push_to_hub(str(out), "me/x")
    monkeypatch.setattr(M, "load_model", lambda *a, **k: pytest.fail("a push that cannot work fails before loading"))
    with pytest.raises(SystemExit, match="not logged in"):
        export.main([str(run), "--peft", str(out), "--push-to-hub", "me/x", "--device", "cpu"])
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_fake")
    response = httpx.Response(403, request=httpx.Request("POST", "https://huggingface.co/api/repos/create"))
    FakeApi.fail = errors.HfHubHTTPError("403 Forbidden", response=response)
    with pytest.raises(SystemExit, match="write access"):
        export.push_to_hub(str(out), "someone-else/x")
    FakeApi.fail = None
    monkeypatch.setattr(H, "hub_unreachable", lambda *a, **k: "HF_HUB_OFFLINE is set")
    with pytest.raises(SystemExit, match=f"hf upload me/x {out}"):
        export.push_to_hub(str(out), "me/x")


def fake_download(tmp_path, files: dict, calls: list):
    """hf_hub_download stand-in: serves `files` ({(repo, filename): local file}) from a Hub-cache-shaped folder."""

    def download(repo_id, filename, **kw):
        calls.append((repo_id, filename, kw))
        if (repo_id, filename) not in files:
            from huggingface_hub import errors

            raise errors.EntryNotFoundError(f"{repo_id} has no {filename}")
        dest = tmp_path / "hubcache" / f"models--{repo_id.replace('/', '--')}" / "snapshots" / SHA / filename
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(files[repo_id, filename], dest)
        return str(dest)

    return download


def test_load_adapter_by_hub_id(ck, make_checkpoint, tmp_path, monkeypatch):
    import huggingface_hub

    run, model, _ = make_run(ck, tmp_path)
    file = str(run / "adapter.safetensors")
    calls = []
    files = {("me/tiny", "adapter.safetensors"): file, ("me/runs", "one/adapter.safetensors"): file}
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download(tmp_path, files, calls))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no probe of the network; the mock stands for the cache
    want = logits_of(model)
    for spec, repo, name in (("me/tiny", "me/tiny", "adapter.safetensors"),
                             ("me/runs/one/adapter.safetensors", "me/runs", "one/adapter.safetensors")):  # fmt: skip
        m = fresh(ck)
        load_adapter(spec, m)
        assert calls[-1][:2] == (repo, name)
        with torch.no_grad():
            assert torch.equal(m(IDX), want)
    with pytest.raises(ValueError, match="different base weights"):  # the same check as for a local file
        load_adapter("me/tiny", fresh(make_checkpoint("qwen2", seed=1)))
    with pytest.raises(SystemExit, match="hf download me/other-repo adapter.safetensors"):  # model.py's sentence
        load_adapter("me/other-repo", fresh(ck))
    assert export.hub_adapter("./me/tiny") is None and export.hub_adapter("me/tiny/notes.txt") is None


def test_eval_adapter_by_hub_id(ck, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    import eval as ev

    fix = str(Path(__file__).parent / "fixtures" / "gsm8k_mini.jsonl")
    run, _, _ = make_run(ck, tmp_path)
    calls = []
    files = {("me/tiny", "adapter.safetensors"): str(run / "adapter.safetensors")}
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download(tmp_path, files, calls))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = ["--model", str(ck), "--dataset", "gsm8k", "--data", fix, "--limit", "2", "--max-new-tokens", "4",
            "--device", "cpu"]  # fmt: skip
    responses = lambda f: [json.loads(line)["response"] for line in f.read_text().splitlines()]  # noqa: E731
    ev.main(argv + ["--adapter", "me/tiny", "--out", str(tmp_path / "hub.jsonl")])
    ev.main(argv + ["--adapter", str(run), "--out", str(tmp_path / "run.jsonl")])  # a run folder works too
    assert calls and calls[0][:2] == ("me/tiny", "adapter.safetensors")
    assert responses(tmp_path / "hub.jsonl") == responses(tmp_path / "run.jsonl")


@pytest.mark.parametrize("name", ["Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-3B-Instruct"])
def test_merged_layout_at_real_size(name):
    """The real configs on the meta device (no memory): bytes add up to the Hub's parameter totals in bf16, 5 GB
    shards, a tied head written once."""
    from model import Config, Transformer

    with torch.device("meta"):
        model = Transformer(Config.from_dict(BUILTIN_CONFIGS[name]))
    sizes, layout = export.merged_layout(model, torch.bfloat16)
    total = {"Qwen/Qwen2.5-7B-Instruct": 7_615_616_512, "Qwen/Qwen2.5-3B-Instruct": 3_085_938_688}[name]
    assert sum(sizes.values()) == 2 * total  # past 2³¹ and 2³²: Python ints, no overflow
    shard_bytes = [sum(sizes[k] for k in keys) for keys in layout.values()]
    assert len(layout) >= -(-2 * total // export.SHARD_BYTES) and max(shard_bytes) <= export.SHARD_BYTES
    firsts = [keys[0] for keys in layout.values()][1:]
    assert all(b + sizes[k] > export.SHARD_BYTES for b, k in zip(shard_bytes, firsts))  # each shard was full
    assert list(layout)[0] == f"model-00001-of-{len(layout):05d}.safetensors"
    assert ("lm_head.weight" in sizes) == (name.endswith("7B-Instruct"))  # the 3B ties its head to the embedding
    assert [k for keys in layout.values() for k in keys] == list(sizes)  # checkpoint order, every key once


def test_command_on_a_tied_llama(make_checkpoint, tmp_path):
    """Tied embeddings (Llama family): the merged folder writes the head once and still reloads as base + adapter;
    the PEFT folder loads in PEFT."""
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    tied = make_checkpoint("llama", tied=True)
    run, model, _ = make_run(tied, tmp_path)
    with pytest.warns(UserWarning):
        export.main([str(run), "--merged", str(tmp_path / "m"), "--peft", str(tmp_path / "p"), "--device", "cpu"])
    with safe_open(tmp_path / "m" / "model.safetensors", framework="pt") as f:
        assert "lm_head.weight" not in f.keys()
    want = logits_of(model)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tied), tmp_path / "p")
    with torch.no_grad():
        assert torch.allclose(fresh(tmp_path / "m")(IDX), want, atol=1e-4)
        assert torch.allclose(AutoModelForCausalLM.from_pretrained(tmp_path / "m")(IDX).logits, want, atol=1e-4)
        assert torch.allclose(peft_model(IDX).logits, want, atol=1e-4)


@pytest.mark.slow
def test_command_on_the_real_smollm2(smollm2, tmp_path):
    """Real weights, tokenizer and chat template: the PEFT folder gives our logits in PEFT; the bf16 merged folder
    keeps the tokenizer, generation config and template, and states bfloat16."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tokenizer import Tokenizer

    run, model, adapter = make_run(smollm2, tmp_path, u=2, tie=10, seed=3)
    with torch.no_grad():
        for p in adapter.params:
            p.mul_(0.1)  # ΔW at a realistic scale for trained v on real weights
        adapter.save(str(run / "adapter.safetensors"))
    msgs = [{"role": "user", "content": "What is 7 times 8?"}]
    idx = torch.tensor([Tokenizer(str(smollm2)).apply_chat_template(msgs)])
    with torch.no_grad():
        want = model(idx)
    with pytest.warns(UserWarning):
        export.main([str(run), "--peft", str(tmp_path / "p"), "--merged", str(tmp_path / "m"), "--dtype", "bf16",
                     "--device", "cpu"])  # fmt: skip
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32),
                                           tmp_path / "p")  # fmt: skip
    with torch.no_grad():
        got = peft_model(idx).logits
    assert (got - want).abs().max() < 1e-3 * want.abs().max()
    assert export.vllm_lora_problems(str(tmp_path / "p"), max_lora_rank=8) == []
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["dtype"] == cfg["torch_dtype"] == "bfloat16"
    assert Tokenizer(str(tmp_path / "m")).render(msgs) == Tokenizer(str(smollm2)).render(msgs)
    assert (tmp_path / "m" / "generation_config.json").read_text() == (smollm2 / "generation_config.json").read_text()


def test_in_run_export_matches_the_stored_file(ck, tmp_path):
    """What a run writes at its end (export_peft_lora on the live adapter, dtype = the file's storage dtype) equals
    what the command later writes from the stored file, and leaves the live adapter's fp32 values untouched."""
    from safetensors.torch import load_file

    model = fresh(ck)
    adapter = attach(model, u=3, tie=4, seed=7)
    set_v(adapter, scale=0.37)  # not exact in bf16
    run = tmp_path / "run"
    adapter.save(str(run / "adapter.safetensors"), dtype="bf16")
    (run / "args.json").write_text(json.dumps({"model": str(ck)}))
    before = [t.detach().clone() for t in adapter.params]
    with pytest.warns(UserWarning):
        export.export_peft_lora(adapter, str(tmp_path / "live"), adapter_file=str(run / "adapter.safetensors"),
                                dtype="bf16")  # fmt: skip
        export.main([str(run), "--peft", str(tmp_path / "cmd"), "--device", "cpu"])
    assert all(torch.equal(a, b) for a, b in zip(adapter.params, before))
    live, cmd = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("live", "cmd"))
    assert live.keys() == cmd.keys() and all(torch.equal(live[k], cmd[k]) for k in live)
    fp32 = load_file(export.export_peft_lora(adapter, str(tmp_path / "fp32")) + "/adapter_model.safetensors")
    B = [k for k in live if k.endswith("lora_B.weight")]  # lora_B = U M carries v (lora_A = Vᵀ does not)
    assert not any(torch.equal(fp32[k], live[k]) for k in B)  # unrounded values differ: the test bites


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
