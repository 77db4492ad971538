"""
The public code at the real widths of the models this project is for: tests/realsize.py writes the exact configs of
Qwen2.5-7B-Instruct, Llama-3.1-8B-Instruct and Qwen3-8B with 2 layers, random bf16 weights, sharded as the Hub ships
them. Size-dependent arithmetic (indices into 68M-element matrices, 152k-row heads) is exercised here.
Run: python -m pytest -q tests/test_realsize.py   (bf16 on CPU: ~3 GB per checkpoint on disk, ~7 GB of RAM at most)

bf16, not fp32: this CPU runs bf16 matmuls ~2.5x faster than fp32 (AVX-512 BF16) and the model takes half the RAM.
"""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from realsize import CONFIGS, model_config, tensor_shapes

FIXTURES = Path(__file__).resolve().parent / "fixtures"
FAMILIES = list(CONFIGS)


def linear_counts(cfg: dict, r: int) -> tuple[int, int]:
    """(LoRA parameters, all parameters) from the checkpoint's tensor list (independent of export.count_params)."""
    shapes = tensor_shapes(cfg)
    lora = sum(r * (s[0] + s[1]) for k, s in shapes if k.endswith("_proj.weight"))
    return lora, sum(math.prod(s) for _, s in shapes)


# -----------------------------------------------------------------------------
# counts from the config alone (no weights): every family, the written 2-layer config and the full depth


@pytest.mark.parametrize("family", FAMILIES)
def test_counts_from_written_config(family, tmp_path):
    from conftest import build_tokenizer

    import export

    cfg = model_config(family, 2, build_tokenizer(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    lora, full = linear_counts(cfg, 2)
    assert export.count_params(str(tmp_path), "lora", r=2) == lora
    assert export.count_params(str(tmp_path), "full") == full
    for tie in (1, 5, 14):  # 14 adapted modules in 2 layers
        assert export.count_params(str(tmp_path), "tinylora", u=3, tie=tie) == math.ceil(14 / tie) * 3
    assert export.count_params(str(tmp_path), "loraxs", r=2) == 14 * 4


def test_counts_at_full_depth():
    """The published sizes: Llama-3.1-8B has 8,030,261,248 parameters; Qwen2.5-7B 7.62B, 196 modules: u=1, tie=16
    gives the paper's 13 trainable parameters and tie=196 exactly one."""
    import export

    assert export.count_params(CONFIGS["llama3.1-8b"], "full") == 8_030_261_248
    for family in FAMILIES:
        assert export.count_params(CONFIGS[family], "full") == linear_counts(CONFIGS[family], 2)[1]
    q = CONFIGS["qwen2.5-7b"]
    assert round(export.count_params(q, "full") / 1e9, 2) == 7.62
    assert export.count_params(q, "tinylora", u=1, tie=16) == 13
    assert export.count_params(q, "tinylora", u=1, tie=196) == 1


# -----------------------------------------------------------------------------
# the fingerprint's probes at a 67,895,296-element matrix (no checkpoint needed)


def test_fingerprint_probes_the_last_element_of_a_7b_down_proj():
    """fingerprint samples 8 evenly spaced entries of a weight, the last one included. torch.linspace in fp32 cannot
    represent 3584 * 18944 - 1 = 67,895,295 (fp32 has 24 significant bits): it rounds up to 67,895,296, one past the
    end, so attaching to Qwen2.5-7B (Llama-3.1-8B and Qwen3-8B likewise) raised IndexError."""
    import export

    C, I = CONFIGS["qwen2.5-7b"]["hidden_size"], CONFIGS["qwen2.5-7b"]["intermediate_size"]
    net = torch.nn.Module()
    net.model = torch.nn.Module()
    net.model.layers = torch.nn.ModuleList([torch.nn.Module()])
    net.model.layers[0].mlp = torch.nn.Module()
    down = torch.nn.Linear(I, C, bias=False, device="meta")
    down.weight = torch.nn.Parameter(torch.zeros(C, I, dtype=torch.bfloat16), requires_grad=False)  # 136 MB
    net.model.layers[0].mlp.down_proj = down
    names = ["model.layers.0.mlp.down_proj"]
    before = export.fingerprint(net, names)
    with torch.no_grad():
        down.weight.view(-1)[-1] = 1.0  # the last element: linspace(0, n - 1, 8) ends there
    after = export.fingerprint(net, names)
    assert before["probes"] != after["probes"], "the last element of the weight is not among the probes"
    assert after["probes"][names[0]][-1] == 1.0


# -----------------------------------------------------------------------------
# every family: sharded bf16 load, one forward against transformers, attach on all 14 linears


def transformers_logits(folder, ids):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    with torch.no_grad():
        out = ref(torch.tensor([ids])).logits[0].float()
    del ref
    return out


def prompt_ids(tok, n=64):
    q = json.loads((FIXTURES / "gsm8k_long.jsonl").read_text().splitlines()[0])["question"]
    return tok.apply_chat_template([{"role": "user", "content": q}])[:n]


def check_svd(adapter):
    """Each module's U, S, V are top singular triplets of its weight: W v_j = σ_j u_j, U orthonormal, σ descending."""
    for name, mod in adapter.modules:
        W = mod.weight.float()
        res = (W @ mod.V - mod.U * mod.S).norm(dim=0) / mod.S  # (r,)
        assert res.max() < 1e-2, f"{name}: SVD residual {res.max():.2e}"
        assert torch.allclose(mod.U.T @ mod.U, torch.eye(mod.U.shape[1]), atol=1e-4)
        assert (mod.S[:-1] >= mod.S[1:]).all()


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama3.1-8b", "qwen3-8b"])  # Qwen2.5-7B: the train/export tests below
def test_load_forward_attach(family, realsize):
    """Sharded bf16 load, logits against transformers (Llama-3.1's llama3 RoPE, Qwen3's q/k norm at real width),
    the fingerprint of every linear, and an attach on the largest matrices (down_proj, d_in 14336 / 12288)."""
    import export
    import tinylora
    from model import load_model
    from tokenizer import Tokenizer

    folder = realsize(family)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2, "the fixture must be sharded"
    net = load_model(str(folder), dtype=torch.bfloat16, device="cpu")
    assert net.lm_head.weight.shape == (CONFIGS[family]["vocab_size"], CONFIGS[family]["hidden_size"])
    assert all(p.dtype == torch.bfloat16 for p in net.parameters())
    ids = prompt_ids(Tokenizer(str(folder)))
    with torch.no_grad():
        ours = net(torch.tensor([ids]))[0].float()  # (T, V)
    ref = transformers_logits(str(folder), ids)
    err = (ours - ref).abs().max() / ref.std()
    assert err < 0.05, f"{family}: logits differ from transformers by {err:.3f} of their std"
    export.fingerprint(net, tinylora.module_names(2))  # every linear's probes index inside its weight
    adapter = tinylora.attach(net, u=1, tie=2, targets=("down_proj",))
    assert len(adapter.modules) == 2 and adapter.num_params() == 1
    check_svd(adapter)
    with torch.no_grad():  # the adapter changes the output once v moves
        adapter.params[0].fill_(1.0)
        moved = net(torch.tensor([ids]))[0].float()
    assert (moved - ours).abs().max() > 10 * (ours - ref).abs().max()


# -----------------------------------------------------------------------------
# train.py, eval.py and the exports on Qwen2.5-7B's widths, with the longest GSM8K questions


def rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def qwen_runs(realsize, tmp_path_factory):
    """A GRPO step on the longest question, resumed for a second; an SFT step (so v moves); the folders."""
    import train

    ckpt = realsize("qwen2.5-7b")
    tmp = tmp_path_factory.mktemp("realsize-runs")
    longest = rows(FIXTURES / "gsm8k_long.jsonl")
    (tmp / "train.jsonl").write_text(json.dumps(longest[0]) + "\n")  # the longest question of GSM8K train
    (tmp / "test.jsonl").write_text((FIXTURES / "gsm8k_mini.jsonl").read_text().splitlines()[0] + "\n")
    base = ["--device", "cpu", "--dtype", "bfloat16", "--model", str(ckpt), "--data", str(tmp / "train.jsonl"),
            "--eval-data", str(tmp / "test.jsonl"), "--prompts-per-step", "1", "--G", "2", "--max-new-tokens", "2",
            "--eval-limit", "1", "--eval-every", "0", "--save-every", "1", "--u", "1", "--tie", "14",
            "--lr", "0.05", "--mini-batches", "1", "--max-prompt-tokens", "0"]  # fmt: skip
    grpo_dir, sft_dir = tmp / "grpo", tmp / "sft"
    train.main([*base, "--out", str(grpo_dir), "--max-steps", "1"])
    st1 = torch.load(grpo_dir / "state.pt", weights_only=False)
    train.main([*base, "--out", str(grpo_dir), "--max-steps", "2", "--resume", str(grpo_dir)])
    train.main([*base, "--out", str(sft_dir), "--max-steps", "1", "--algo", "sft"])
    return dict(ckpt=ckpt, tmp=tmp, grpo=grpo_dir, sft=sft_dir, grpo_state1=st1, longest=longest[0])


def records(run_dir, event):
    return [r for r in rows(run_dir / "metrics.jsonl") if r.get("event") == event]


@pytest.mark.slow
def test_grpo_step_and_resume_on_the_longest_question(qwen_runs):
    from tokenizer import Tokenizer

    tok = Tokenizer(str(qwen_runs["ckpt"]))
    import data

    prompt = tok.apply_chat_template(data.build_messages(data.load_dataset(str(qwen_runs["tmp"] / "train.jsonl"),
                                                                           split="train")[0]))  # fmt: skip
    assert len(prompt) > 600, "the fixture's longest question should be a long prompt for this tokenizer"
    steps = records(qwen_runs["grpo"], "step")
    assert [s["step"] for s in steps] == [1, 2], "the resumed run must add step 2 after step 1"
    assert all(0 < s["n_tokens"] <= 4 for s in steps)  # 2 rows x at most 2 new tokens
    start = records(qwen_runs["grpo"], "start")[0]
    assert start["trainable"] == 1
    st2 = torch.load(qwen_runs["grpo"] / "state.pt", weights_only=False)
    assert qwen_runs["grpo_state1"]["step"] == 1 and st2["step"] == 2
    assert all(math.isfinite(s["loss"]) and math.isfinite(s["grad_norm"]) for s in steps)


@pytest.mark.slow
def test_sft_step_moves_v(qwen_runs):
    steps = records(qwen_runs["sft"], "step")
    assert len(steps) == 1 and math.isfinite(steps[0]["loss"]) and steps[0]["grad_norm"] > 0
    v = torch.load(qwen_runs["sft"] / "state.pt", weights_only=False)["params"][0]
    assert v.abs().item() == pytest.approx(0.05, rel=1e-3)  # Adam's first step moves each entry by lr


@pytest.mark.slow
def test_eval_with_the_trained_adapter(qwen_runs):
    import eval as evaluation

    out = qwen_runs["tmp"] / "eval.jsonl"
    evaluation.main(["--model", str(qwen_runs["ckpt"]), "--adapter", str(qwen_runs["sft"] / "adapter.safetensors"),
                     "--dataset", str(qwen_runs["tmp"] / "test.jsonl"), "--limit", "1", "--max-new-tokens", "2",
                     "--device", "cpu", "--dtype", "bfloat16", "--out", str(out)])  # fmt: skip
    recs = rows(out)
    assert len(recs) == 1 and recs[0]["n_tokens"] <= 2


@pytest.mark.slow
def test_exports_reload_to_the_same_logits(qwen_runs):
    """The SFT adapter loaded onto a fresh base (its fingerprint checked, its 14 SVDs checked), v scaled up so the
    update survives bf16 rounding; its logits against the PEFT-LoRA export reloaded by peft onto transformers' model
    (whose base logits must equal ours), and against the merged export reloaded by model.load_model."""
    import export
    from model import load_model
    from tokenizer import Tokenizer

    ckpt, tmp = str(qwen_runs["ckpt"]), qwen_runs["tmp"]
    ids = torch.tensor([prompt_ids(Tokenizer(ckpt))])
    net = load_model(ckpt, dtype=torch.bfloat16, device="cpu")
    adapter = export.load_adapter(str(qwen_runs["sft"] / "adapter.safetensors"), net)  # attach: 14 SVDs
    assert len(adapter.modules) == 14 and adapter.num_params() == 1
    check_svd(adapter)
    assert adapter.fingerprint == export.fingerprint(net, [n for n, _ in adapter.modules])
    with torch.no_grad():
        v = adapter.params[0]  # ±0.09 under verl (α/r = 16, P ~ N(0, 1)): ΔW entries ~4e-3, above bf16's spacing
        v.copy_(torch.where(v >= 0, 0.09, -0.09))  # at the weights' 0.02, yet far from swamping them
        ours = net(ids)[0].float()
        with adapter.disabled():
            base = net(ids)[0].float()
    effect = (ours - base).abs().max()
    # 1) PEFT LoRA through peft + transformers
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    peft_dir = export.export_peft_lora(adapter, str(tmp / "peft"), base=ckpt)
    ref = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16)
    with torch.no_grad():
        ref_base = ref(ids).logits[0].float()
        ref = PeftModel.from_pretrained(ref, peft_dir)
        ref_lora = ref(ids).logits[0].float()
    del ref
    noise = (ref_base - base).abs().max()  # two implementations of the same bf16 base
    assert effect > 10 * noise + 0.1, f"the adapter's effect {effect:.3f} is lost in the bf16 noise {noise:.3f}"
    # bf16 rounding differs where the low-rank term is added (peft: in fp32; ours: rounded, then added)
    err = (ref_lora - ours).abs()
    assert err.max() < 0.25 * effect and err.mean() < 0.1 * (ours - base).abs().mean(), (err.max(), effect)
    # 2) merged weights (bf16) through model.load_model
    merged = export.export_merged(net, str(tmp / "merged"), source=ckpt)
    del net, adapter
    m2 = load_model(merged, dtype=torch.bfloat16, device="cpu")
    with torch.no_grad():
        got = m2(ids)[0].float()
    del m2
    shutil.rmtree(merged)
    err = (got - ours).abs().max()
    assert err < 0.2 * effect, f"merged logits differ by {err:.3f}; the adapter moved them by {effect:.3f}"
