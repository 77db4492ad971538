"""
Real-width random checkpoints: the exact configs of the models this project is for, with the layer count cut.

    write_realsize(folder, "qwen2.5-7b", num_layers=2)   # config.json, generation_config.json, tokenizer,
                                                          # model-0000k-of-0000n.safetensors + index (bf16)

Written with safetensors directly (no transformers), sharded the way the Hub ships them, so tests go through the
public loading code at the widths where size-dependent arithmetic (indices, offsets, fp32 counters) can break.
The tokenizer is conftest's 384-token BPE; the embedding keeps the real vocabulary rows (ids < 384 are used).
The token ids in the configs are the small tokenizer's, not the real models' (they must name real tokens).

`realsize` (session fixture) is a factory: realsize("qwen2.5-7b") -> folder, built on first use, cached for the
session, deleted at its end (each 2-layer checkpoint is ~3 GB on disk). dev/rehearse.py builds the full depth.
"""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

# config.json of each model as the Hub ships it (fields model.py reads, plus the ones that must be refused if wrong)
QWEN25_7B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu", "hidden_size": 3584,
    "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
    "max_position_embeddings": 32768, "max_window_layers": 28, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
    "sliding_window": 131072, "use_sliding_window": False, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "vocab_size": 152064,
}  # fmt: skip
LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "attention_bias": False, "mlp_bias": False,
    "rope_theta": 500000.0, "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192, "rope_type": "llama3"}, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "vocab_size": 128256,
}  # fmt: skip
QWEN3_8B = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_act": "silu", "hidden_size": 4096,
    "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 128, "max_position_embeddings": 40960, "max_window_layers": 36, "rms_norm_eps": 1e-6,
    "rope_theta": 1000000, "rope_scaling": None, "sliding_window": None, "use_sliding_window": False,
    "attention_bias": False, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 151936,
}  # fmt: skip
CONFIGS = {"qwen2.5-7b": QWEN25_7B, "llama3.1-8b": LLAMA31_8B, "qwen3-8b": QWEN3_8B}
HUB_IDS = {"qwen2.5-7b": "Qwen/Qwen2.5-7B-Instruct", "llama3.1-8b": "meta-llama/Llama-3.1-8B-Instruct",
           "qwen3-8b": "Qwen/Qwen3-8B"}  # fmt: skip
STD = 0.02  # weight init (HF's initializer_range): keeps a random 4k-wide network's activations O(1)


def head_dim(cfg: dict) -> int:
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def tensor_shapes(cfg: dict) -> list[tuple[str, tuple]]:
    """(checkpoint key, shape) of every tensor, in the order the Hub's checkpoints list them."""
    C, I, V, D = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], head_dim(cfg)
    Hd, Kd = cfg["num_attention_heads"] * D, cfg["num_key_value_heads"] * D
    qwen2, qwen3 = cfg["architectures"][0] == "Qwen2ForCausalLM", cfg["architectures"][0] == "Qwen3ForCausalLM"
    out = [("model.embed_tokens.weight", (V, C))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        out += [(f"{p}.input_layernorm.weight", (C,))]
        for name, shape in (("q_proj", (Hd, C)), ("k_proj", (Kd, C)), ("v_proj", (Kd, C))):
            out += [(f"{p}.self_attn.{name}.weight", shape)] + [(f"{p}.self_attn.{name}.bias", shape[:1])] * qwen2
        out += [(f"{p}.self_attn.o_proj.weight", (C, Hd))]
        out += [(f"{p}.self_attn.q_norm.weight", (D,)), (f"{p}.self_attn.k_norm.weight", (D,))] * qwen3
        out += [(f"{p}.post_attention_layernorm.weight", (C,))]
        out += [(f"{p}.mlp.gate_proj.weight", (I, C)), (f"{p}.mlp.up_proj.weight", (I, C))]
        out += [(f"{p}.mlp.down_proj.weight", (C, I))]
    out += [("model.norm.weight", (C,))]
    return out + [("lm_head.weight", (V, C))] * (not cfg.get("tie_word_embeddings", False))


SPIKES = (6.0, 4.0, 3.0, 2.5)  # planted top singular values of each projection, in units of the noise's edge


def random_tensor(key: str, shape: tuple, dtype, device, g) -> torch.Tensor:
    """Norm weights ~ N(1, 0.1) (a misplaced one shows), everything else ~ N(0, STD); each block projection also
    gets a few planted directions (W += A diag(s) Bᵀ). Real weights have dominant singular directions; a pure
    Gaussian matrix has a flat top spectrum (σ1 ≈ σ2 ≈ STD (√m + √n)), whose top-r subspace is ill-defined and
    takes the Krylov SVD ~40 s per 7B-width matrix instead of well under one."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if "norm" in key:
        return t.normal_(1.0, 0.1, generator=g)
    t.normal_(0.0, STD, generator=g)
    if key.endswith("_proj.weight"):
        m, n = shape
        s = torch.tensor(SPIKES, device=device) * STD * (m**0.5 + n**0.5)  # (k,)
        A = torch.randn(m, len(SPIKES), device=device, generator=g) / m**0.5  # (m, k), ~unit columns
        B = torch.randn(n, len(SPIKES), device=device, generator=g) / n**0.5  # (n, k)
        t.copy_((t.float() + (A * s) @ B.T).to(dtype))  # (m, n)
    return t


def random_state(cfg: dict, dtype=torch.bfloat16, device="cpu", seed: int = 0):
    """Yield (key, random tensor) for every checkpoint tensor, one at a time (so a writer holds one shard)."""
    g = torch.Generator(device=device).manual_seed(seed)
    for key, shape in tensor_shapes(cfg):
        yield key, random_tensor(key, shape, dtype, device, g)


def model_config(family: str, num_layers: int | None, tok) -> dict:
    """The Hub config with the layer count cut and the token ids of our small tokenizer."""
    cfg = dict(CONFIGS[family])
    if num_layers is not None:
        cfg["num_hidden_layers"] = num_layers
        if "max_window_layers" in cfg:
            cfg["max_window_layers"] = num_layers
    im_end, eot = tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")
    cfg.update(bos_token_id=eot, eos_token_id=im_end)  # Qwen's layout: eos = <|im_end|>, bos = <|endoftext|>
    return cfg


def write_realsize(path: Path, family: str = "qwen2.5-7b", num_layers: int | None = 2, seed: int = 0,
                   shard_bytes: int = 2**30, dtype=torch.bfloat16) -> Path:  # fmt: skip
    """Write a random checkpoint of `family` (full depth with num_layers=None) into `path`, sharded."""
    from conftest import build_tokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(path)
    cfg = model_config(family, num_layers, tok)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    gen = {
        "bos_token_id": cfg["bos_token_id"],
        "eos_token_id": [cfg["eos_token_id"], cfg["bos_token_id"]],
        "pad_token_id": cfg["bos_token_id"],
        "do_sample": True,
        "temperature": 0.7,
        "top_p": 0.8,
        "top_k": 20,
    }
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2))
    # shards in checkpoint order, each at most shard_bytes (a single tensor larger than that gets its own)
    shards, cur, cur_bytes, total = [], {}, 0, 0
    for key, t in random_state(cfg, dtype, "cpu", seed):
        n = t.numel() * t.element_size()
        if cur and cur_bytes + n > shard_bytes:
            shards.append(_write_shard(path, len(shards), cur))
            cur, cur_bytes = {}, 0
        cur[key], cur_bytes, total = t, cur_bytes + n, total + n
    shards.append(_write_shard(path, len(shards), cur))
    # the Hub's names say how many shards there are: rename once the count is known
    weight_map = {}
    for i, (tmp, keys) in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        os.replace(tmp, path / name)
        weight_map |= {k: name for k in keys}
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return path


def _write_shard(path, i, tensors):
    from safetensors.torch import save_file

    tmp = path / f"shard-{i}.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    return tmp, list(tensors)


@pytest.fixture(scope="session")
def realsize(tmp_path_factory):
    """Factory: realsize("qwen2.5-7b") -> a 2-layer real-width checkpoint folder, built once per session."""
    made = {}

    def make(family: str = "qwen2.5-7b") -> Path:
        if family not in made:
            made[family] = write_realsize(tmp_path_factory.mktemp(family), family, num_layers=2)
        return made[family]

    yield make
    for folder in made.values():  # ~3 GB each; pytest would keep the last three sessions' tmp dirs otherwise
        shutil.rmtree(folder, ignore_errors=True)
