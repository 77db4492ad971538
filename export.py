"""
Files out: adapter files, the base-weight fingerprint they carry, merged and PEFT-LoRA exports, and parameter
counts from a config alone. Nothing here is needed to understand the adapter (tinylora.py); everything here
consumes its one form, ΔW = U M Vᵀ from each module's `lowrank()`.

    python export.py --model Qwen/Qwen2.5-7B-Instruct --u 1 --tie 16     # (or python tinylora.py …): 13

Choices:
1. An adapter file is safetensors: the trained tensors in the storage dtype (fp32 / bf16 / fp16) plus metadata:
   the settings, the base model id, a fingerprint of the base weights and a sha256 of the tensors (*ours*).
2. The fingerprint is the shapes of every target and 8 values from 3 of them, compared loosely, so the same
   weights read in bf16, fp16 or fp32 pass and other weights fail with a sentence, not a wrong model (*ours*).
3. The PEFT export is a plain rank-r LoRA (lora_B = U M, lora_A = Vᵀ, α = r): exact for every method (*ours*).
4. The merged export writes W + ΔW in the model's dtype; in bf16 a tiny ΔW may partly round away (*ours*).
5. Config-only counts fall back to a built-in table of the paper's models when the Hub cannot be reached (*ours*).
"""

import argparse
import hashlib
import json
import os
import shutil

import torch
import torch.nn as nn

from model import linear_shapes
from tinylora import ADAPTER_LAYERS, DTYPES, METHODS, ORDERS, TARGETS, Adapter, attach, groups, module_names

FORMAT = "tinylora-adapter/1"


# -----------------------------------------------------------------------------
# adapter files


def checksum(tensors: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].contiguous().view(torch.uint8).numpy())  # the buffer itself: no copy of a full model
    return h.hexdigest()


def save_adapter(adapter: Adapter, path: str, dtype: str = "fp32", **meta) -> int:
    """Write the adapter as safetensors; returns the file size in bytes. Extra keyword args go to metadata."""
    from safetensors.torch import save_file

    if dtype not in DTYPES:
        raise ValueError(f"unknown storage dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    tensors = {k: t.detach().to("cpu", DTYPES[dtype]).contiguous() for k, t in adapter.tensors().items()}
    header = {k: json.dumps(v) for k, v in adapter.settings.items()}
    header.update(
        format=FORMAT,
        dtype=json.dumps(dtype),
        base=json.dumps(getattr(adapter.model, "name_or_path", None)),
        fingerprint=json.dumps(adapter.fingerprint),
        num_params=json.dumps(adapter.num_params()),
        sha256=json.dumps(checksum(tensors)),
        meta=json.dumps(meta, default=str),
    )
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata=header)
    os.replace(tmp, path)  # never leave a half-written adapter under the real name
    return os.path.getsize(path)


def read_adapter(path: str) -> tuple[dict, dict]:
    """(settings + metadata, tensors) of an adapter file; a damaged or foreign file is a ValueError."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise ValueError(f"no adapter file at {path}")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors reports truncation / bad headers with its own error types
        raise ValueError(f"{path} is not a readable adapter file (corrupt or truncated?): {e}") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a tinylora adapter file (format {meta.get('format')!r}, want {FORMAT!r})")
    info = {k: json.loads(v) for k, v in meta.items() if k != "format"}
    if checksum(tensors) != info["sha256"]:
        raise ValueError(f"{path} is corrupt: its tensors do not match the checksum written with them")
    return info, tensors


def load_adapter(path: str, model) -> Adapter:
    """Attach the adapter stored at `path` to a fresh base `model` and fill in its trained values."""
    info, tensors = read_adapter(path)
    names = module_names(model.cfg.num_hidden_layers, info["targets"])
    check_fingerprint(info["fingerprint"], model, names, path)  # before the SVDs, which take a while
    keys = ("method", "r", "u", "tie", "order", "targets", "variant", "seed", "alpha", "svd")
    settings = {k: info[k] for k in keys}
    if settings["method"] == "loraxs":
        settings["u"] = 1  # attach derives u = r² itself
    adapter = attach(model, **settings)
    want = adapter.tensors()
    if want.keys() != tensors.keys() or any(want[k].shape != tensors[k].shape for k in want):
        raise ValueError(f"{path} holds tensors that do not fit the adapter its settings describe")
    with torch.no_grad():
        for k, t in want.items():
            t.copy_(tensors[k].to(t.dtype))
    adapter.stored = info  # the file's metadata (base id, dtype, user meta) for the caller to show
    return adapter


def fingerprint(model, names: list[str]) -> dict:
    """A cheap, dtype-robust identity of the base weights: shapes of every target + 8 values from 3 of them."""
    shapes = [list(model.get_submodule(n).weight.shape) for n in names]
    probes = {}
    for name in dict.fromkeys([names[0], names[len(names) // 2], names[-1]]):
        w = model.get_submodule(name).weight.detach().flatten()
        idx = [(w.numel() - 1) * i // 7 for i in range(8)]  # exact integers (fp32 cannot count a 7B matrix's entries)
        probes[name] = w[torch.tensor(idx, device=w.device)].float().cpu().tolist()
    return {"shapes": hashlib.sha256(json.dumps(shapes).encode()).hexdigest()[:16], "probes": probes}


def check_fingerprint(saved: dict, model, names: list[str], where: str):
    got = fingerprint(model, names)
    same = saved["shapes"] == got["shapes"] and saved["probes"].keys() == got["probes"].keys()
    if same:  # values compared loosely: the same weights read in bf16, fp16 or fp32 must all pass
        for k, a in saved["probes"].items():
            same &= torch.allclose(torch.tensor(a), torch.tensor(got["probes"][k]), rtol=1e-2, atol=1e-3)
    if not same:
        raise ValueError(
            f"{where} was trained on different base weights than this model's (shapes or probed values differ). "
            "Load the adapter onto the base model it was trained on (its id is in the file's 'base' metadata)."
        )


# -----------------------------------------------------------------------------
# merging and export


def delta_weight(module):
    U, M, V = module.lowrank()
    return U @ M @ V.T  # (d_out, d_in) fp32


def merged_weight(module):
    return (module.weight.float() + delta_weight(module)).to(module.weight.dtype)


@torch.no_grad()
def merge(model, adapter: Adapter | None = None):
    """Fold every adapter into its weight, in place: the adapter modules become plain nn.Linears holding W'."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, ADAPTER_LAYERS):
            lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, device="meta")
            lin.weight = nn.Parameter(merged_weight(mod) if mod.enabled else mod.weight.detach().clone(), False)
            lin.bias = mod.bias
            model.set_submodule(name, lin)
    return model


TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "generation_config.json", "vocab.json", "merges.txt", "tokenizer.model",
)  # fmt: skip


def _is_tied_head(model, name):
    return name == "lm_head.weight" and getattr(getattr(model, "cfg", None), "tie_word_embeddings", False)


@torch.no_grad()
def export_merged(model, path: str, source: str | None = None, dtype: torch.dtype | None = None) -> str:
    """Write W' as a plain Hugging Face checkpoint folder (config, model.safetensors, tokenizer files).

    `source` is the base checkpoint (folder or Hub id) whose config and tokenizer are copied; by default
    the one the model was loaded from. Note: in bf16, W + ΔW is rounded to bf16, so a tiny ΔW may partly
    vanish; the unmerged adapter keeps the update exact (this is the sampler/trainer mismatch TIS corrects).
    """
    from safetensors.torch import save_file

    from model import resolve

    source = source or getattr(model, "name_or_path", None)
    if source is None:
        raise ValueError("export_merged needs source=the base checkpoint folder (for config.json and tokenizer)")
    src = resolve(source)
    adapted = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, ADAPTER_LAYERS)}
    sd = {}
    for k, t in model.state_dict().items():
        if _is_tied_head(model, k):
            continue  # transformers re-ties lm_head to the embedding
        t = merged_weight(adapted[k]) if k in adapted and adapted[k].enabled else t
        sd[k] = t.to(dtype or t.dtype).contiguous().cpu()
    os.makedirs(path, exist_ok=True)
    save_file(sd, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(os.path.join(src, "config.json"), os.path.join(path, "config.json"))
    for f in TOKENIZER_FILES:
        if os.path.exists(os.path.join(src, f)):
            shutil.copy(os.path.join(src, f), os.path.join(path, f))
    return path


@torch.no_grad()
def export_peft_lora(adapter: Adapter, path: str, base: str | None = None) -> str:
    """Write the update as a standard rank-r PEFT LoRA adapter: lora_B = U M, lora_A = Vᵀ, lora_alpha = r (scale 1).

    ΔW = U M Vᵀ has rank ≤ r, so this is exact (up to fp32 rounding), whichever method produced it.
    """
    from safetensors.torch import save_file

    if adapter.settings["method"] == "full":
        raise ValueError("method='full' has no low-rank update to export; use export_merged")
    sd = {}
    for name, mod in adapter.modules:
        U, M, V = mod.lowrank()
        sd[f"base_model.model.{name}.lora_A.weight"] = V.T.contiguous().cpu()  # (r, d_in)
        sd[f"base_model.model.{name}.lora_B.weight"] = (U @ M).contiguous().cpu()  # (d_out, r)
    r = adapter.settings["r"]
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": r, "lora_dropout": 0.0,
        "target_modules": adapter.settings["targets"], "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "use_rslora": False, "init_lora_weights": True,
        "base_model_name_or_path": base or getattr(adapter.model, "name_or_path", None),
    }  # fmt: skip
    os.makedirs(path, exist_ok=True)
    save_file(sd, os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return path


# -----------------------------------------------------------------------------
# parameter counts from a config alone

# The numbers we need from the paper's models' config.json, for when the Hub cannot be reached.
_QWEN = {"architectures": ["Qwen2ForCausalLM"], "vocab_size": 151936, "num_key_value_heads": 2}
BUILTIN_CONFIGS = {
    "Qwen/Qwen2.5-0.5B-Instruct": {**_QWEN, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                                   "num_attention_heads": 14, "tie_word_embeddings": True},
    "Qwen/Qwen2.5-1.5B-Instruct": {**_QWEN, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                                   "num_attention_heads": 12, "tie_word_embeddings": True},
    "Qwen/Qwen2.5-3B-Instruct": {**_QWEN, "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
                                 "num_attention_heads": 16, "tie_word_embeddings": True},
    "Qwen/Qwen2.5-7B-Instruct": {**_QWEN, "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
                                 "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                                 "tie_word_embeddings": False},
    "meta-llama/Meta-Llama-3-8B-Instruct": {"architectures": ["LlamaForCausalLM"], "vocab_size": 128256,
                                            "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                                            "num_attention_heads": 32, "num_key_value_heads": 8,
                                            "tie_word_embeddings": False},
}  # fmt: skip
BUILTIN_CONFIGS["meta-llama/Llama-3.1-8B-Instruct"] = BUILTIN_CONFIGS["meta-llama/Meta-Llama-3-8B-Instruct"]


def read_config(name_or_path):
    """(Config, where it came from) for a Config, a config dict, a local folder, or a Hub id (config.json only)."""
    from model import Config

    if isinstance(name_or_path, Config):
        return name_or_path, "given"
    if isinstance(name_or_path, dict):
        return Config.from_dict(name_or_path), "given"
    if os.path.isdir(name_or_path):
        with open(os.path.join(name_or_path, "config.json")) as f:
            return Config.from_dict(json.load(f)), name_or_path
    try:
        from huggingface_hub import hf_hub_download

        from model import hub_reachable

        offline = not hub_reachable()  # else huggingface_hub retries for ~30 s before giving up
        with open(hf_hub_download(name_or_path, "config.json", local_files_only=offline)) as f:
            return Config.from_dict(json.load(f)), f"the Hub's {name_or_path}/config.json"
    except Exception as e:
        if name_or_path in BUILTIN_CONFIGS:
            return Config.from_dict(BUILTIN_CONFIGS[name_or_path]), (
                f"the built-in table (the Hub could not be reached: {type(e).__name__})"
            )
        raise ValueError(
            f"cannot read a config for {name_or_path!r}: not a local folder, the Hub failed ({type(e).__name__}), "
            f"and it is not one of the built-in models ({', '.join(BUILTIN_CONFIGS)})"
        ) from None


def count_params(config_or_path, method="tinylora", r=2, u=1, tie=1, targets=TARGETS, order="tiled") -> int:
    """Trainable parameters implied by the settings, from the config alone (no weights)."""
    cfg = read_config(config_or_path)[0]
    names = module_names(cfg.num_hidden_layers, tuple(targets))
    if method in ("tinylora", "loraxs"):
        if min(r, u, tie) < 1:
            raise ValueError(f"r, u and tie must be positive (got r={r}, u={u}, tie={tie})")
        n_types = len(names) // cfg.num_hidden_layers
        n_groups = max(groups(cfg.num_hidden_layers, n_types, tie, order)) + 1  # the groups attach() builds
        return n_groups * (r * r if method == "loraxs" else u)
    shape = linear_shapes(cfg)
    if method == "lora":
        return sum(r * sum(shape[n.rsplit(".", 1)[1]]) for n in names)
    if method == "full":  # the network itself, built on the meta device (no memory): every bias and norm counted
        from model import Transformer

        with torch.device("meta"):
            return sum(p.numel() for p in Transformer(cfg).parameters())  # a tied head is the embedding: once
    raise ValueError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")


def main(argv=None):
    p = argparse.ArgumentParser(description="Trainable parameters and update size implied by adapter settings.")
    p.add_argument("--model", default="Qwen/Qwen2.5-7B-Instruct", help="Hub id, local folder, or built-in name")
    p.add_argument("--method", default="tinylora", choices=METHODS)
    p.add_argument("--r", type=int, default=2, help="rank of the frozen SVD (LoRA: its rank)")
    p.add_argument("--u", type=int, default=1, help="size of each trainable vector v")
    p.add_argument("--tie", type=int, default=1, help="modules sharing one v")
    p.add_argument("--order", default="tiled", choices=ORDERS, help="which modules share a v (tinylora.py)")
    p.add_argument("--targets", default=",".join(TARGETS), help="comma-separated projections to adapt")
    args = p.parse_args(argv)
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    try:
        cfg, where = read_config(args.model)
        n_mod = len(module_names(cfg.num_hidden_layers, targets))
        n = count_params(cfg, args.method, args.r, args.u, args.tie, targets, args.order)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"config: {where}")
    print(f"{args.model}: {cfg.num_hidden_layers} layers x {len(targets)} targets = {n_mod} adapted modules")
    settings = f"{args.method}, r={args.r}, u={args.u}, tie={args.tie}, order={args.order}"
    print(f"{n:,} trainable parameter{'s' * (n != 1)} ({settings})")
    print("update size: " + ", ".join(f"{n * t.itemsize:,} bytes in {k}" for k, t in DTYPES.items()))


if __name__ == "__main__":
    main()
