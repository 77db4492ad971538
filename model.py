"""
One-file Llama-3 / Qwen2 / Qwen2.5 / Qwen3 decoder that loads real Hugging Face checkpoints.

    h = x + Attn(RMSNorm(x));  y = h + MLP(RMSNorm(h));  MLP(x) = down(silu(gate(x)) * up(x))

Module attribute names equal the checkpoint keys (`model.layers.3.self_attn.q_proj.weight`), so loading
is a strict dict copy: no renaming, no fused qkv, no weight permutation (RoPE is the half-split form).

Choices, each marked *ref* (what the reference implementation, transformers, does) or *ours*:
1. RMSNorm and the RoPE angles are computed in fp32 and cast back to the activation dtype (*ref*).
2. Attention in layouts PyTorch's fused CUDA kernels take (*ours*; attention.py): causal with no mask when no
   padding precedes a real token (training rows), GQA folded into the query axis for decode; no math fallback.
3. Positions are per row: the i-th real token of a row has position i, whatever the padding (*ref*).
4. Unsupported features (another architecture, a rope type other than default/llama3, sliding-window
   attention) raise a ValueError that names them, never a silent default (*ours*).
5. Nothing here knows about adapters: q/k/v/o/gate/up/down are plain `nn.Linear`s that `tinylora.py`
   replaces with modules exposing the same `forward(x)`.

KV-cache contract (what `sample.py` uses):
    cache = model.new_cache(batch_size, max_len)     # KVCache: k, v of shape (L, B, Hkv, max_len, D)
    logits = model(idx, pos, cache=cache, start=s, key_mask=km)
  writes the keys/values of the T new tokens `idx` (B, T) into cache slots [s, s+T) and attends over
  slots [0, S) only, S = key_mask.shape[1] (never the whole buffer). `key_mask` (B, S) bool marks which
  slots hold real tokens (False for left padding), the T new ones included; `pos` (B, T) are the RoPE
  positions of the new tokens. Cache rows may be reordered or copied freely between calls (`cache.k[:, rows]`),
  e.g. to fan a prefilled prompt out to its G samples.
  - `start` an int: S = s+T, the live length (slicing; the host knows s).
  - `start` a 0-dim long tensor on the device (CUDA-graph decode): the new keys/values are written with
    `index_copy_` at slots start..start+T-1 and S is a static length the caller picks (a bucket), with
    key_mask False on slots not yet written; no host sync anywhere on this path.

Letters: B batch, T new tokens, S attended slots, C channels (hidden_size), H heads, Hkv kv heads,
D head_dim, L layers, V vocab.
"""

import argparse
import json
import math
import os
from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from attention import attend, fused_only
from hub import resolve, source_record

ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
ROPE_TYPES = ("default", "llama3")


# -----------------------------------------------------------------------------
# config


@dataclass
class Config:
    architecture: str = "LlamaForCausalLM"  # one of ARCHITECTURES
    vocab_size: int = 32000
    hidden_size: int = 512  # C
    intermediate_size: int = 1024  # MLP width
    num_hidden_layers: int = 2  # L
    num_attention_heads: int = 8  # H
    num_key_value_heads: int = 8  # Hkv (grouped-query attention when < H)
    head_dim: int = 0  # D; 0 means hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # None, or {"rope_type": "llama3", "factor": ..., ...}
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False  # lm_head shares the embedding matrix
    attention_bias: bool = False  # bias on q/k/v (Qwen2 always has it)
    mlp_bias: bool = False  # bias on gate/up/down (Llama option)
    qk_norm: bool = False  # RMSNorm over D on q and k before RoPE (Qwen3)
    eos_token_id: list = field(default_factory=list)  # stop ids from config.json (+ generation_config.json)
    bos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.head_dim == 0:
            self.head_dim = self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        """Read a Hugging Face config.json (either the Hub's spelling or what transformers >= 5 writes)."""
        arch = (d.get("architectures") or ["?"])[0]
        if arch not in ARCHITECTURES:
            raise ValueError(f"unsupported architecture {arch!r}: model.py implements {', '.join(ARCHITECTURES)}")
        if d.get("use_sliding_window") or "sliding_attention" in (d.get("layer_types") or []):
            raise ValueError(
                "sliding-window attention is not implemented; use a checkpoint with use_sliding_window=false"
            )
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {d['hidden_act']!r}: only silu is implemented")
        # RoPE: the Hub writes rope_theta + rope_scaling; transformers >= 5 writes rope_parameters (theta inside)
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"unsupported rope type {rope_type!r}: model.py implements {', '.join(ROPE_TYPES)}")
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError("partial rotary embeddings (partial_rotary_factor != 1) are not implemented")
        eos = d.get("eos_token_id")
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known and v is not None}
        kw.update(
            architecture=arch,
            rope_theta=float(theta),
            rope_scaling=rope if rope_type == "llama3" else None,
            attention_bias=arch == "Qwen2ForCausalLM" or bool(d.get("attention_bias", False)),
            qk_norm=arch == "Qwen3ForCausalLM",
            eos_token_id=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
            head_dim=d.get("head_dim") or 0,
        )
        return cls(**kw)


def rope_inv_freq(cfg: Config) -> torch.Tensor:
    """Inverse frequencies (D/2,) in fp32, with Llama-3.1's frequency-dependent scaling when configured."""
    D = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D))
    if cfg.rope_scaling is None:
        return inv_freq
    # llama3: long wavelengths are slowed by `factor`, short ones kept, the band between interpolated
    s = cfg.rope_scaling
    factor, lo, hi = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_len = s.get("original_max_position_embeddings", cfg.max_position_embeddings)
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
    return torch.where(medium, smoothed, scaled)


# -----------------------------------------------------------------------------
# a block's linears, described once: adapters target them, counts and memory plans read their shapes, the CPU
# sampler fuses each sibling group (linears that read the same input). A family with other names edits only this.

SIBLINGS = (  # (parent module, linears reading the same input), in checkpoint order
    ("self_attn", ("q_proj", "k_proj", "v_proj")),
    ("self_attn", ("o_proj",)),
    ("mlp", ("gate_proj", "up_proj")),
    ("mlp", ("down_proj",)),
)
LINEARS = tuple(n for _, names in SIBLINGS for n in names)  # q, k, v, o, gate, up, down
PARENT = {n: parent for parent, names in SIBLINGS for n in names}


def linear_path(layer: int, name: str) -> str:
    """The module path (= checkpoint key prefix) of a block linear: model.layers.3.self_attn.q_proj."""
    return f"model.layers.{layer}.{PARENT[name]}.{name}"


def linear_shapes(cfg: "Config") -> dict:
    """(d_out, d_in) of each block linear, from the config alone."""
    C, I = cfg.hidden_size, cfg.intermediate_size
    Hd, Kd = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    return {"q_proj": (Hd, C), "k_proj": (Kd, C), "v_proj": (Kd, C), "o_proj": (C, Hd),
            "gate_proj": (I, C), "up_proj": (I, C), "down_proj": (C, I)}  # fmt: skip


# -----------------------------------------------------------------------------
# the network


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate(x, cos, sin):
    """Half-split RoPE: pairs (x[i], x[i + D/2]) rotate together, as the HF checkpoints expect."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        C, H, Hkv, D = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.H, self.Hkv, self.D = H, Hkv, D
        self.q_proj = nn.Linear(C, H * D, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(C, Hkv * D, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(C, Hkv * D, bias=cfg.attention_bias)
        # Qwen2 biases q/k/v only; Llama's and Qwen3's attention_bias covers o_proj too (*ref*)
        self.o_proj = nn.Linear(H * D, C, bias=cfg.attention_bias and cfg.architecture != "Qwen2ForCausalLM")
        if cfg.qk_norm:
            self.q_norm = RMSNorm(D, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(D, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, kv=None, start=0):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.H, self.D)  # (B, T, H, D)
        k = self.k_proj(x).view(B, T, self.Hkv, self.D)  # (B, T, Hkv, D)
        v = self.v_proj(x).view(B, T, self.Hkv, self.D).transpose(1, 2)  # (B, Hkv, T, D)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q = rotate(q.transpose(1, 2), cos, sin)  # (B, H, T, D)
        k = rotate(k.transpose(1, 2), cos, sin)  # (B, Hkv, T, D)
        if kv is not None:  # write the new keys/values into the cache, attend over slots [0, S) only
            k_cache, v_cache = kv
            S = start + T if mask is None else mask.shape[-1]
            if isinstance(start, torch.Tensor):  # static length: no host sync, CUDA-graph safe
                slots = start + torch.arange(T, device=start.device)  # (T,)
                k_cache.index_copy_(2, slots, k)
                v_cache.index_copy_(2, slots, v)
            else:
                k_cache[:, :, start : start + T] = k
                v_cache[:, :, start : start + T] = v
            k, v = k_cache[:, :, :S], v_cache[:, :, :S]  # (B, Hkv, S, D)
        y = attend(q, k, v, mask)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.H * self.D))


class MLP(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        C, I = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(C, I, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(C, I, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(I, C, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, kv=None, start=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv, start)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """The `model.` prefix of the checkpoint keys."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


@dataclass
class KVCache:
    k: torch.Tensor  # (L, B, Hkv, max_len, D)
    v: torch.Tensor  # (L, B, Hkv, max_len, D)


class Transformer(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        c, w = self.cfg, self.model.embed_tokens.weight
        shape = (c.num_hidden_layers, batch_size, c.num_key_value_heads, max_len, c.head_dim)
        return KVCache(
            torch.zeros(shape, dtype=w.dtype, device=w.device), torch.zeros(shape, dtype=w.dtype, device=w.device)
        )

    def forward(self, idx, pos=None, attention_mask=None, cache=None, start=0, key_mask=None, hidden_only=False):
        """Logits (B, T, V) for tokens idx (B, T); with hidden_only, the final-norm hidden states (B, T, C).

        Without a cache: `attention_mask` (B, T) marks real tokens (1) and padding (0), left or right; the
        positions default to the running count of real tokens. Without an attention_mask every row is causal
        over all T columns with positions 0..T-1 (no mask: the flash kernel's layout, choice 2), which is also
        exact for the real tokens of right-padded rows, whose padding comes after them all (grpo.pack's layout).
        With a cache: see the module docstring.
        """
        B, T = idx.shape
        dev = idx.device
        if cache is None:
            key_mask = None if attention_mask is None else attention_mask.bool()
        elif key_mask is None:
            assert not isinstance(start, torch.Tensor), "a tensor start needs a key_mask of the static length"
            if start > 0:  # an unpadded prefill (start 0) stays causal with no mask
                key_mask = torch.ones(B, start + T, dtype=torch.bool, device=dev)
        if key_mask is None:  # causal, no mask (choice 2)
            mask = None
            if pos is None:
                pos = torch.arange(T, device=dev).expand(B, T)
        else:
            S = key_mask.shape[1]
            q_slot = (start + torch.arange(T, device=dev))[:, None]  # (T, 1): the slots of the new tokens
            if pos is None:  # i-th real token of a row has position i (choice 3)
                pos = (key_mask.long().cumsum(-1) - 1).clamp(min=0).gather(1, q_slot.T.expand(B, T))  # (B, T)
            # mask (B, 1, T, S): a query at slot start+t sees real keys at slots <= its own, and itself (choice 2)
            k_slot = torch.arange(S, device=dev)[None, :]  # (1, S)
            mask = ((key_mask[:, None, :] & (k_slot <= q_slot)) | (k_slot == q_slot))[:, None]
        # RoPE angles in fp32 (choice 1)
        freqs = pos.float()[..., None] * self.inv_freq.float()  # (B, T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, D)
        x = self.model.embed_tokens(idx)  # (B, T, C)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        with fused_only(x.device):
            for i, layer in enumerate(self.model.layers):
                kv = None if cache is None else (cache.k[i], cache.v[i])
                x = layer(x, cos, sin, mask, kv, start)
        x = self.model.norm(x)
        return x if hidden_only else self.lm_head(x)


# -----------------------------------------------------------------------------
# loading: a local folder, or a Hub id at a revision (hub.py: reachability, downloads, what a failure says)


def load_config(path: str) -> Config:
    with open(os.path.join(path, "config.json")) as f:
        d = json.load(f)
    cfg = Config.from_dict(d)
    gen = os.path.join(path, "generation_config.json")
    if os.path.exists(gen):  # generation_config.json may add stop ids (a list for the Qwen instruct models)
        with open(gen) as f:
            eos = json.load(f).get("eos_token_id")
        for e in [] if eos is None else ([eos] if isinstance(eos, int) else eos):
            if e not in cfg.eos_token_id:
                cfg.eos_token_id.append(e)
    return cfg


def load_model(
    name_or_path: str, dtype: torch.dtype | None = None, device: str | None = None, revision: str | None = None
) -> Transformer:
    """Build the network on the meta device, then fill it shard by shard from safetensors (strict)."""
    from safetensors import safe_open

    path = resolve(name_or_path, revision)
    cfg = load_config(path)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32)
    with torch.device("meta"):
        model = Transformer(cfg)
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(path, "model.safetensors")):
        shards = ["model.safetensors"]
    else:
        raise ValueError(f"no model.safetensors or model.safetensors.index.json in {path}")
    expected = {k for k in model.state_dict() if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    seen, unexpected = set(), []
    for shard in shards:  # one shard in memory at a time
        sd = {}
        with safe_open(os.path.join(path, shard), framework="pt") as f:
            for k in f.keys():
                if cfg.tie_word_embeddings and k == "lm_head.weight":
                    continue  # some tied checkpoints carry a redundant copy; the embedding is the weight
                if k not in expected:
                    unexpected.append(k)
                    continue
                sd[k] = f.get_tensor(k).to(device=device, dtype=dtype)
        model.load_state_dict(sd, strict=False, assign=True)
        seen |= sd.keys()
    missing = sorted(expected - seen)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not match {cfg.architecture}: missing {missing}, unexpected {unexpected}"
        )
    if cfg.tie_word_embeddings:  # assign=True replaced the embedding Parameter; re-tie the head to it
        model.lm_head.weight = model.model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(cfg).to(device)
    model.name_or_path = name_or_path
    model.source = source_record(name_or_path, revision, path)  # {"id", "revision", "sha"}: for args.json, adapters
    return model.eval()


# -----------------------------------------------------------------------------
# a newcomer's first check: python model.py --model PATH_OR_ID --prompt "..."


@torch.no_grad()
def greedy(model: Transformer, ids: list[int], max_new_tokens: int, stop_ids=()) -> list[int]:
    """Greedy decoding of one prompt through the KV cache (the batched sampler is sample.py)."""
    dev = model.inv_freq.device
    cache = model.new_cache(1, len(ids) + max_new_tokens)
    logits = model(torch.tensor([ids], device=dev), cache=cache, start=0)
    out = []
    for t in range(max_new_tokens):
        nxt = int(logits[0, -1].argmax())
        out.append(nxt)
        if nxt in stop_ids:
            break
        logits = model(torch.tensor([[nxt]], device=dev), cache=cache, start=len(ids) + t)
    return out


if __name__ == "__main__":
    from tokenizer import Tokenizer

    p = argparse.ArgumentParser(description="Load a checkpoint and print a greedy completion.")
    p.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct", help="local folder or Hub id")
    p.add_argument("--prompt", default="What is 7 times 8?")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--device", default=None)
    args = p.parse_args()
    model, tok = load_model(args.model, device=args.device), Tokenizer(args.model)
    n = sum(p.numel() for p in model.parameters())
    print(f"{model.cfg.architecture}: {model.cfg.num_hidden_layers} layers, {n / 1e6:.1f}M parameters")
    ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}])
    print(tok.decode(greedy(model, ids, args.max_new_tokens, tok.stop_ids)))
