"""
model.py against transformers, the reference implementation (a test-only dependency).

    python -m pytest -q tests/test_model.py                # everything (about a minute on 2 CPU cores)
    python -m pytest -q tests/test_model.py -m "not slow"  # tiny random checkpoints only

On a CPU shared with other jobs set OMP_NUM_THREADS=1: oversubscribed torch threads made decoding ~20x slower.

1. Tiny random checkpoints of each family (Llama-3 with llama3 RoPE scaling, Qwen2 with biases, Qwen3 with q/k
   norm; tied and untied) are written by transformers and read back through `load_model`: fp32 logits agree with
   transformers' eager attention within TOL (max abs difference / max abs logit) for whole sequences, left- and
   right-padded batches, and token by token through the KV cache.
2. The real SmolLM2-135M-Instruct (slow): logits, 32 greedy tokens, the chat template, the command line.
3. Config spellings, sharded files, stop ids, and every bad input's error message.
Run with -s to see the measured differences printed next to the tolerances.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import QWEN_TEMPLATE, ROOT

from hub import resolve
from model import greedy, load_config, load_model
from tokenizer import Tokenizer

TOL = 1e-4  # fp32: max |ours - transformers| / max |transformers| over the compared logits
BF16_TOL = 1e-2  # bf16 against transformers in bf16 with the same attention kernel (SDPA): two bf16 ulps at the top
BF16_FP32_TOL = 6e-2  # bf16 against fp32: the whole cost of bf16 weights and activations (transformers' is ~3e-2)

LLAMA3 = dict(  # original_max_position_embeddings=64 puts head_dim 16's 8 frequencies in all three llama3 bands
    rope_parameters=dict(
        rope_type="llama3",
        rope_theta=10000.0,
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=64,
    )
)
CASES = {  # name -> (family, tied, config overrides)
    "llama3": ("llama", False, LLAMA3),
    "llama3-tied": ("llama", True, LLAMA3),
    "llama-bias": ("llama", False, dict(attention_bias=True, mlp_bias=True)),  # o_proj gets a bias too
    "qwen2": ("qwen2", False, {}),
    "qwen2-tied": ("qwen2", True, {}),
    "qwen3": ("qwen3", False, {}),
    "qwen3-tied": ("qwen3", True, {}),
}


def rel_err(ours, ref):
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def check(name, ours, ref, tol=TOL):
    err = rel_err(ours, ref)
    print(f"\n{name}: max|diff|/max|ref| = {err:.2e} (tolerance {tol:.0e})")
    assert err <= tol, f"{name}: relative difference {err:.3g} > {tol}"


def hf_model(path, dtype=torch.float32, attn="eager"):
    """transformers' model; eager attention is the plain reference, "sdpa" the same attention kernel as ours."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn).eval()


def copy_checkpoint(src, dst, config_edit=None):
    """A copy of a checkpoint folder, optionally with config.json edited: edit(dict) changes it in place."""
    shutil.copytree(src, dst)
    if config_edit is not None:
        d = json.loads((dst / "config.json").read_text())
        config_edit(d)
        (dst / "config.json").write_text(json.dumps(d))
    return dst


@pytest.fixture(scope="module")
def tiny(make_checkpoint):
    """tiny(name, dtype) -> (path, our model, transformers' model), loaded once per module."""
    loaded = {}

    def get(name, dtype=torch.float32):
        if (name, dtype) not in loaded:
            family, tied, overrides = CASES[name]
            path = make_checkpoint(family, tied=tied, **overrides)
            attn = "eager" if dtype == torch.float32 else "sdpa"  # in bf16 the attention kernels' rounding differs
            loaded[name, dtype] = (path, load_model(str(path), dtype=dtype, device="cpu"), hf_model(path, dtype, attn))
        return loaded[name, dtype]

    return get


def random_batch(V, lengths, side, seed=0):
    """Random ids padded to the longest row on `side`; mask (B, T) True on real tokens."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    idx = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.bool)
    for i, n in enumerate(lengths):
        cols = slice(T - n, T) if side == "left" else slice(0, n)
        idx[i, cols] = torch.randint(0, V, (n,), generator=g)
        mask[i, cols] = True
    return idx, mask


# -----------------------------------------------------------------------------
# parity on tiny random checkpoints


def test_llama3_scaling_changes_some_frequencies(tiny):
    path, ours, ref = tiny("llama3")
    cfg = ours.cfg
    plain = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim)
    hf_freq = ref.model.rotary_emb.inv_freq
    assert torch.equal(ours.inv_freq, hf_freq)
    kept, divided = hf_freq == plain, torch.isclose(hf_freq, plain / 8, rtol=1e-6)
    assert kept.any() and divided.any() and (~kept & ~divided).any(), "the config must hit all three llama3 bands"


@pytest.mark.parametrize("name", CASES)
@torch.no_grad()
def test_parity_full_sequences(tiny, name):
    path, ours, ref = tiny(name)
    idx, _ = random_batch(ours.cfg.vocab_size, [24, 24], "left")
    check(f"{name} full", ours(idx), ref(idx).logits)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name", CASES)
@torch.no_grad()
def test_parity_padded_batch(tiny, name, side):
    path, ours, ref = tiny(name)
    idx, mask = random_batch(ours.cfg.vocab_size, [24, 15, 6], side, seed=1)
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    logits = ours(idx, attention_mask=mask)  # positions by default: the running count of real tokens
    hf = ref(idx, attention_mask=mask.long(), position_ids=pos).logits
    check(f"{name} {side}-padded", logits[mask], hf[mask])
    for i in range(len(idx)):  # and each row is what it would be alone, with no padding at all
        alone = ref(idx[i : i + 1, mask[i]]).logits[0]
        check(f"{name} {side}-padded row {i} vs alone", logits[i, mask[i]], alone)


@pytest.mark.parametrize("name", CASES)
@torch.no_grad()
def test_parity_kv_cache(tiny, name):
    """Prefill 8 columns of a left-padded batch, then decode the rest one token at a time."""
    path, ours, ref = tiny(name)
    idx, mask = random_batch(ours.cfg.vocab_size, [20, 12, 5], "left", seed=2)
    B, T = idx.shape
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    hf = ref(idx, attention_mask=mask.long(), position_ids=pos).logits
    cache = ours.new_cache(B, T + 3)  # a buffer longer than needed: only the live slots may be attended
    cache.k.fill_(1e4)  # garbage in unwritten slots must never be read
    cache.v.fill_(1e4)
    P = 8
    steps = [ours(idx[:, :P], cache=cache, start=0, key_mask=mask[:, :P])]  # prefill (B, P, V)
    for s in range(P, T):  # decode one column at a time, positions given explicitly as sample.py does
        steps.append(ours(idx[:, s : s + 1], pos[:, s : s + 1], cache=cache, start=s, key_mask=mask[:, : s + 1]))
    check(f"{name} kv-cache", torch.cat(steps, 1)[mask], hf[mask])


@torch.no_grad()
def test_cache_rows_can_be_copied(tiny):
    """The contract sample.py uses: prefill one prompt, fan its cache out to G rows, decode different tokens."""
    path, ours, ref = tiny("qwen3")
    prompt, _ = random_batch(ours.cfg.vocab_size, [10], "left", seed=3)
    cont, _ = random_batch(ours.cfg.vocab_size, [4, 4, 4], "left", seed=4)  # (G=3, 4) different continuations
    cache = ours.new_cache(1, 14)
    ours(prompt, cache=cache, start=0)
    cache.k, cache.v = cache.k[:, [0, 0, 0]].clone(), cache.v[:, [0, 0, 0]].clone()  # (L, 3, Hkv, 14, D)
    steps = [ours(cont[:, t : t + 1], cache=cache, start=10 + t) for t in range(4)]
    full = torch.cat([prompt.expand(3, -1), cont], 1)
    check("fan-out cache", torch.cat(steps, 1), ref(full).logits[:, 10:])


@pytest.mark.parametrize("name", ["llama3", "qwen2-tied", "qwen3"])
@torch.no_grad()
def test_bf16(tiny, name):
    """bf16 weights: RMSNorm and RoPE in fp32 as transformers does. Against transformers in bf16 with the same
    attention kernel any other rounding order would show; against fp32 it is the honest cost of bf16."""
    path, ours16, ref16 = tiny(name, torch.bfloat16)
    _, ours32, _ = tiny(name)
    assert ours16.model.embed_tokens.weight.dtype == torch.bfloat16 and ours16.inv_freq.dtype == torch.float32
    idx, mask = random_batch(ours32.cfg.vocab_size, [24, 13], "left", seed=5)
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    logits16 = ours16(idx, attention_mask=mask)
    assert logits16.dtype == torch.bfloat16
    check(
        f"{name} bf16 vs transformers bf16",
        logits16[mask],
        ref16(idx, attention_mask=mask.long(), position_ids=pos).logits[mask],
        BF16_TOL,
    )
    check(f"{name} bf16 vs fp32", logits16[mask], ours32(idx, attention_mask=mask)[mask], BF16_FP32_TOL)


def test_rmsnorm_matches_reference_in_bf16():
    """The norm upcasts to fp32 and casts back before the weight, exactly as transformers' LlamaRMSNorm."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from model import RMSNorm

    ours, ref = RMSNorm(64, 1e-6), LlamaRMSNorm(64, 1e-6)
    w = torch.randn(64)
    ours.weight.data.copy_(w), ref.weight.data.copy_(w)
    ours, ref = ours.bfloat16(), ref.bfloat16()
    x = torch.randn(3, 7, 64).bfloat16() * 30
    assert torch.equal(ours(x), ref(x))


# -----------------------------------------------------------------------------
# config spellings, sharded files, stop ids


@pytest.mark.parametrize("name", ["llama3", "qwen2"])
def test_both_config_spellings(tiny, tmp_path, name):
    """config.json as the Hub writes it (rope_theta + rope_scaling) and as transformers >= 5 writes it."""
    path, ours, _ = tiny(name)

    def to_hub_spelling(d):
        rope = d.pop("rope_parameters")
        d["rope_theta"] = rope.pop("rope_theta")
        d["rope_scaling"] = rope if rope["rope_type"] != "default" else None

    assert "rope_parameters" in json.loads((path / "config.json").read_text())
    hub = copy_checkpoint(path, tmp_path / "hub", to_hub_spelling)
    other = load_model(str(hub), device="cpu")
    assert other.cfg == ours.cfg
    idx, _ = random_batch(ours.cfg.vocab_size, [24], "left")
    with torch.no_grad():
        assert torch.equal(other(idx), ours(idx))
        check(f"{name} Hub spelling vs transformers", other(idx), hf_model(hub)(idx).logits)


def test_hub_rope_theta_is_read(make_checkpoint, tmp_path):
    """A Qwen2.5-style config: rope_theta 1e6 at the top level, rope_scaling null."""
    path = make_checkpoint("qwen2", rope_parameters=dict(rope_type="default", rope_theta=1e6))

    def to_hub_spelling(d):
        d["rope_theta"] = d.pop("rope_parameters")["rope_theta"]
        d["rope_scaling"] = None

    hub = copy_checkpoint(path, tmp_path / "hub", to_hub_spelling)
    assert load_config(str(hub)) == load_config(str(path)) and load_config(str(hub)).rope_theta == 1e6
    idx, _ = random_batch(load_config(str(hub)).vocab_size, [24], "left")
    with torch.no_grad():
        check("rope_theta 1e6", load_model(str(hub), device="cpu")(idx), hf_model(hub)(idx).logits)


def test_sharded_checkpoint(tiny, tmp_path, monkeypatch):
    import contextlib

    import safetensors

    path, ours, ref = tiny("qwen2")
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and not (tmp_path / "sharded" / "model.safetensors").exists()
    opened, open_now, real_open = [], [], safetensors.safe_open

    @contextlib.contextmanager
    def watched_open(file, **kw):  # record which shard files are open, and how many at once
        opened.append(os.path.basename(file))
        open_now.append(file)
        assert len(open_now) == 1, "two shards open at once"
        with real_open(file, **kw) as f:
            yield f
        open_now.remove(file)

    monkeypatch.setattr(safetensors, "safe_open", watched_open)
    sharded = load_model(str(tmp_path / "sharded"), device="cpu")
    assert sorted(opened) == sorted(shards)  # each shard read once
    sd, sd2 = ours.state_dict(), sharded.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)


def test_generation_config_adds_stop_ids(tiny, tmp_path):
    from transformers import GenerationConfig

    path, ours, _ = tiny("qwen2")
    folder = copy_checkpoint(path, tmp_path / "ck")
    im_end, eot = Tokenizer(str(path)).encode("<|im_end|>")[0], Tokenizer(str(path)).encode("<|endoftext|>")[0]
    assert ours.cfg.eos_token_id == [im_end]
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [im_end, eot]}))
    expected = GenerationConfig.from_pretrained(folder).eos_token_id  # what transformers' generate stops on
    assert load_config(str(folder)).eos_token_id == expected == [im_end, eot]
    assert sorted(Tokenizer(str(folder)).stop_ids) == sorted(expected)


# -----------------------------------------------------------------------------
# bad input: a clear error that names the problem


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.update(architectures=["MistralForCausalLM"]), "unsupported architecture 'MistralForCausalLM'"),
        (lambda d: d["rope_parameters"].update(rope_type="yarn", factor=4.0), "unsupported rope type 'yarn'"),
        (lambda d: d.update(use_sliding_window=True, sliding_window=8), "sliding-window attention"),
        (lambda d: d.update(layer_types=["sliding_attention", "full_attention"]), "sliding-window attention"),
        (lambda d: d.update(hidden_act="gelu"), "unsupported hidden_act 'gelu'"),
        (lambda d: d["rope_parameters"].update(partial_rotary_factor=0.5), "partial rotary"),
    ],
)
def test_bad_config(make_checkpoint, tmp_path, edit, message):
    folder = copy_checkpoint(make_checkpoint("qwen2"), tmp_path / "ck", edit)
    with pytest.raises(ValueError, match=message):
        load_model(str(folder), device="cpu")


@pytest.mark.parametrize("change", ["missing", "unexpected"])
def test_missing_or_unexpected_keys(make_checkpoint, tmp_path, change):
    from safetensors.torch import load_file, save_file

    folder = copy_checkpoint(make_checkpoint("qwen2"), tmp_path / "ck")
    sd = load_file(folder / "model.safetensors")
    key = "model.layers.1.mlp.up_proj.weight"
    if change == "missing":
        del sd[key]
    else:
        key = "model.layers.1.mlp.extra.weight"
        sd[key] = torch.zeros(2)
    save_file(sd, folder / "model.safetensors")
    with pytest.raises(ValueError, match=rf"{change} \['{key}'\]"):
        load_model(str(folder), device="cpu")


def test_tied_checkpoint_with_redundant_head_loads(make_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = copy_checkpoint(make_checkpoint("qwen2", tied=True), tmp_path / "ck")
    sd = load_file(folder / "model.safetensors")
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    save_file(sd, folder / "model.safetensors")
    model = load_model(str(folder), device="cpu")
    assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("name", ["./no/such/folder", "a/b/c", "justaname", "config.json"])
def test_path_neither_folder_nor_hub_id(make_checkpoint, name):
    if name == "config.json":  # an existing file, not a folder
        name = str(make_checkpoint("qwen2") / name)
    with pytest.raises(ValueError, match="neither a local folder nor a Hub id"):
        resolve(name)


def test_folder_without_weights(make_checkpoint, tmp_path):
    folder = tmp_path / "ck"
    folder.mkdir()
    shutil.copy(make_checkpoint("qwen2") / "config.json", folder)
    with pytest.raises(ValueError, match="no model.safetensors"):
        load_model(str(folder), device="cpu")


def test_hub_offline_fails_fast():
    """A fresh process (huggingface_hub reads HF_HUB_OFFLINE at import) exits with a sentence naming --model."""
    code = "import hub; hub.resolve('someorg/somemodel')"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "could not download 'someorg/somemodel'" in r.stderr and "--model DIR" in r.stderr


# -----------------------------------------------------------------------------
# chat template


CONVERSATIONS = [
    [{"role": "user", "content": "What is 12 plus 30?"}],
    [{"role": "system", "content": "Answer after ####."}, {"role": "user", "content": "What is 1 plus 2?"}],
    [
        {"role": "user", "content": "What is 2 plus 2?"},
        {"role": "assistant", "content": "The answer is 4. #### 4"},
        {"role": "user", "content": "And 3 plus 3? Ünïcödé, 数学"},
    ],
]


def assert_same_template_ids(folder):
    from transformers import AutoTokenizer

    ours, ref = Tokenizer(str(folder)), AutoTokenizer.from_pretrained(folder)
    for messages in CONVERSATIONS:
        for gen, kw in [(True, {}), (False, {}), (True, {"enable_thinking": False})]:  # kw: a template variable
            ids = ref.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen, return_dict=False, **kw)
            text = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen, **kw)
            assert ours.render(messages, gen, **kw) == text
            assert ours.apply_chat_template(messages, gen, **kw) == ids
    return ours


def test_chat_template_qwen_style(make_checkpoint):
    """The tiny checkpoints carry the Qwen-style template in tokenizer_config.json's "chat_template"."""
    folder = make_checkpoint("qwen2")
    assert json.loads((folder / "tokenizer_config.json").read_text())["chat_template"] == QWEN_TEMPLATE
    ours = assert_same_template_ids(folder)
    assert ours.render(CONVERSATIONS[0]).startswith("<|im_start|>system\nYou are a helpful assistant.")


FEATURE_TEMPLATE = (  # jinja features Hub templates use: bos_token, namespace, tojson, errors, template variables
    "{{ bos_token }}{% set ns = namespace(n=0) %}"
    "{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('bad role') }}{% endif %}{% set ns.n = ns.n + 1 %}"
    "{{ '<|im_start|>' + m['role'] + ' ' + (loop.index0 | string) + '\n' + m['content'] | trim }}"
    "{{ {'n': ns.n, 'text': m['content']} | tojson }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def test_chat_template_named_list_and_jinja_file(make_checkpoint, tmp_path):
    """tokenizer_config.json's list of named templates (the default is used), then chat_template.jinja over it."""
    import jinja2

    folder = tmp_path / "tok"
    folder.mkdir()
    src = make_checkpoint("qwen2")
    for f in ("tokenizer.json", "config.json"):
        shutil.copy(src / f, folder)
    tc = json.loads((src / "tokenizer_config.json").read_text())
    tc["bos_token"] = "<|endoftext|>"
    tc["chat_template"] = [
        {"name": "tool_use", "template": "{{ 'tools' }}"},
        {"name": "default", "template": FEATURE_TEMPLATE},
    ]
    (folder / "tokenizer_config.json").write_text(json.dumps(tc))
    ours = assert_same_template_ids(folder)
    assert ours.render(CONVERSATIONS[0]).startswith('<|endoftext|><|im_start|>user 0\nWhat is 12 plus 30?{"n": 1')
    assert ours.render(CONVERSATIONS[0], enable_thinking=False).endswith("<think>\n\n</think>\n\n")
    with pytest.raises(jinja2.TemplateError, match="bad role"):
        ours.render([{"role": "tool", "content": "42"}])
    (folder / "chat_template.jinja").write_text(QWEN_TEMPLATE.replace("helpful", "jinja-file"))
    assert "jinja-file" in assert_same_template_ids(folder).render(CONVERSATIONS[0])


# -----------------------------------------------------------------------------
# the command line


def run_cli(model, prompt, n):
    cmd = [sys.executable, "model.py", "--model", str(model), "--prompt", prompt, "--max-new-tokens", str(n)]
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_cli_tiny(tiny):
    """The printed completion is transformers' greedy completion of the chat-templated prompt."""
    from transformers import AutoTokenizer

    path, _, ref = tiny("qwen2")
    out = run_cli(path, "hi", 5)
    head, completion = out.split("\n", 1)
    assert head.startswith("Qwen2ForCausalLM: 2 layers, ")
    hf_tok = AutoTokenizer.from_pretrained(path)
    ids = hf_tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, return_dict=False)
    with torch.no_grad():
        new = ref.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=5)[0, len(ids) :]
    assert completion == hf_tok.decode(new, skip_special_tokens=True) + "\n"


# -----------------------------------------------------------------------------
# the real SmolLM2-135M-Instruct


@pytest.fixture(scope="module")
def smol(smollm2):
    from transformers import AutoTokenizer

    return dict(
        path=smollm2,
        ours=load_model(str(smollm2), dtype=torch.float32, device="cpu"),
        ref=hf_model(smollm2),
        tok=Tokenizer(str(smollm2)),
        hf_tok=AutoTokenizer.from_pretrained(smollm2),
    )


def chat(tok, text):
    return tok.apply_chat_template([{"role": "user", "content": text}])


@pytest.mark.slow
@torch.no_grad()
def test_smollm2_logits(smol):
    ids = chat(smol["tok"], "Natalia sold clips to 48 of her friends in April, and then half as many in May.")
    idx = torch.tensor([ids])
    check("SmolLM2 fp32", smol["ours"](idx), smol["ref"](idx).logits)


@pytest.mark.slow
@torch.no_grad()
def test_smollm2_greedy_32_tokens(smol):
    ids = chat(smol["tok"], "Write a short story about a robot who learns to paint.")
    ours = greedy(smol["ours"], ids, 32, smol["tok"].stop_ids)
    idx = torch.tensor([ids])
    ref = smol["ref"].generate(idx, attention_mask=torch.ones_like(idx), do_sample=False, max_new_tokens=32)
    assert len(ours) == 32 and ours == ref[0, len(ids) :].tolist()
    print("\nSmolLM2 greedy:", repr(smol["tok"].decode(ours)))


@pytest.mark.slow
@torch.no_grad()
def test_smollm2_bf16(smol):
    path = smol["path"]
    ours16 = load_model(str(path), dtype=torch.bfloat16, device="cpu")
    ref16 = hf_model(path, torch.bfloat16, "sdpa")
    idx = torch.tensor([chat(smol["tok"], "What is the capital of France?")])
    logits16 = ours16(idx)
    check("SmolLM2 bf16 vs transformers bf16", logits16, ref16(idx).logits, BF16_TOL)
    check("SmolLM2 bf16 vs fp32", logits16, smol["ours"](idx), BF16_FP32_TOL)


@pytest.mark.slow
def test_smollm2_chat_template(smol):
    assert (smol["path"] / "chat_template.jinja").exists()  # this template comes from the .jinja file
    assert_same_template_ids(smol["path"])
    assert smol["tok"].stop_ids == [smol["hf_tok"].convert_tokens_to_ids("<|im_end|>")]


@pytest.mark.slow
def test_smollm2_cli(smol):
    out = run_cli(smol["path"], "What is the capital of France?", 24)
    assert out.startswith("LlamaForCausalLM: 30 layers, 134.5M parameters") and "Paris" in out
