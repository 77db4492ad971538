"""
Files out: adapter files, the base-weight fingerprint they carry, merged and PEFT-LoRA exports, and parameter
counts from a config alone. Nothing here is needed to understand the adapter (tinylora.py); everything here
consumes its one form, ΔW = U M Vᵀ from each module's `lowrank()`.

    python export.py runs/one --peft out/one-lora                  # a LoRA that PEFT, vLLM and lm-eval load
    python export.py runs/one --merged out/one-merged --dtype bf16  # W + ΔW as a plain checkpoint
    python export.py runs/one --peft out/one-lora --push-to-hub you/qwen7b-tinylora-gsm8k
    python export.py --model Qwen/Qwen2.5-7B-Instruct --u 1 --tie 16   # (or python tinylora.py …): 13 parameters

Choices:
1. An adapter file is safetensors: the trained tensors in the storage dtype (fp32 / bf16 / fp16) plus metadata:
   the settings, the base model id and commit, a fingerprint of the base weights, a sha256 of the tensors (*ours*).
2. The fingerprint is the shapes of every target and 8 values from 3 of them, compared loosely, so the same
   weights read in bf16, fp16 or fp32 pass and other weights fail with a sentence, not a wrong model (*ours*).
3. The PEFT export is a plain rank-r LoRA (lora_B = U M, lora_A = Vᵀ, α = r): exact for every method, since ΔW has
   rank ≤ r, and loadable where PEFT's own TinyLoRA type is not (vLLM serves only LoRA) (*ours*).
4. The merged export writes W + ΔW summed in fp32 and rounded once to the output dtype; in bf16 a tiny ΔW may partly
   round away (*ours*). It is sharded past 5 GB, huggingface_hub's default (transformers 5 writes 50 GB) (*ours*).
5. Config-only counts fall back to a built-in table of the paper's models when the Hub cannot be reached (*ours*).
6. An adapter is named by a file, a run folder (its adapter.safetensors) or a Hub repo (user/repo, or
   user/repo/path/file.safetensors), downloaded through model.py's Hub helpers; the fingerprint check follows (*ours*).
7. An export names its base by Hub id, never a local path: a folder in the Hub cache gives its id and commit; any
   other folder keeps its path, with a warning (*ours*). The PEFT folder carries the tinylora file beside it.
8. vLLM's rules for a LoRA folder are read from its loader (vllm 0.33.0: lora/peft_helper.py, lora_model.py,
   lora/utils.py, config/lora.py) and checked on every export, so a folder that vLLM would refuse is never written.
"""

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import warnings

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
        source=json.dumps(getattr(adapter.model, "source", None)),  # {"id", "revision", "sha"} from model.py
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


ADAPTER_FILE = "adapter.safetensors"  # what train.py writes in a run folder and export puts beside the PEFT files


def hub_adapter(spec: str) -> tuple[str, str] | None:
    """(repo id, file in it) when `spec` reads as a Hub reference: user/repo or user/repo/path/to/file.safetensors."""
    if spec.startswith((".", "/", "~")) or os.path.exists(spec):
        return None
    parts = spec.split("/")
    if len(parts) == 2 and all(parts):
        return spec, ADAPTER_FILE
    if len(parts) > 2 and all(parts) and spec.endswith(".safetensors"):
        return "/".join(parts[:2]), "/".join(parts[2:])
    return None


def find_adapter(spec: str, revision: str | None = None) -> str:
    """The local adapter file `spec` names: a file, a run folder, or a Hub repo (downloaded; choice 6)."""
    spec = os.path.expanduser(spec)
    if os.path.isdir(spec):
        spec = os.path.join(spec, ADAPTER_FILE)  # a run folder
    if os.path.isfile(spec):
        return spec
    hub = hub_adapter(spec)
    if hub is None:
        raise ValueError(f"no adapter file at {spec} (give a file, a run folder, or a Hub repo like user/repo)")
    from hub import HubError, hub_download  # offline: the local Hub cache; a failure says what to do

    try:
        return hub_download(hub[0], revision, filename=hub[1], then=f"pass --adapter DIR/{hub[1]}")[0]
    except HubError as e:  # a mistyped local path reads as a Hub id too: say both
        raise HubError(f"{spec} is not a local file or folder, and as a Hub repo: {e}") from None


def load_adapter(path: str, model) -> Adapter:
    """Attach the adapter stored at `path` (a file, run folder or Hub repo) to a fresh base `model`, trained values
    filled in."""
    path = find_adapter(path)
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


@contextlib.contextmanager
def stored_precision(adapter, v_dtype: str):
    """The trained tensors rounded to their storage dtype inside the block, then restored exactly (train.py choice
    12): an evaluation sees the update a user of the saved file gets; training continues from the fp32 values."""
    dt, full = DTYPES[v_dtype], adapter.settings["method"] == "full"  # full: evaluates its 16-bit weights
    kept = [(t, t.detach().clone()) for t in adapter.params if t.dtype != dt and dt != torch.float32 and not full]
    with torch.no_grad():
        for t, _ in kept:
            t.copy_(t.to(dt))
    try:
        yield
    finally:
        with torch.no_grad():
            for t, x in kept:
                t.copy_(x)


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
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
    "generation_config.json", "vocab.json", "merges.txt", "tokenizer.model",
)  # fmt: skip
SHARD_BYTES = 5 * 10**9  # choice 4: huggingface_hub's default max_shard_size ("5GB" = 5·10⁹ bytes)


def _is_tied_head(model, name):
    return name == "lm_head.weight" and getattr(getattr(model, "cfg", None), "tie_word_embeddings", False)


def plan_shards(sizes: dict, max_bytes: int) -> list[list[str]]:
    """Keys in checkpoint order cut into runs of at most max_bytes (a tensor larger than that gets a shard alone)."""
    shards, size = [[]], 0
    for k, n in sizes.items():
        if shards[-1] and size + n > max_bytes:
            shards, size = shards + [[]], 0
        shards[-1].append(k)
        size += n
    return shards


def merged_layout(model, dtype: torch.dtype, max_bytes: int = SHARD_BYTES) -> tuple[dict, dict]:
    """({key: bytes}, {file: [keys]}) of the merged checkpoint, from shapes alone: one model.safetensors, or
    model-0000i-of-0000n.safetensors shards (choice 4). A tied lm_head is left out: transformers re-ties it."""
    sizes = {k: t.numel() * dtype.itemsize for k, t in model.state_dict().items() if not _is_tied_head(model, k)}
    shards = plan_shards(sizes, max_bytes)
    if len(shards) == 1:
        return sizes, {"model.safetensors": shards[0]}
    return sizes, {f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors": keys for i, keys in enumerate(shards)}


@torch.no_grad()
def export_merged(
    model, path: str, source: str | None = None, dtype: torch.dtype | None = None, max_shard_bytes: int = SHARD_BYTES
) -> str:
    """Write W' as a plain Hugging Face checkpoint folder: config.json stating the dtype written, model.safetensors
    (or shards + model.safetensors.index.json past max_shard_bytes), tokenizer files, generation config, chat template.

    `source` is the base checkpoint (folder or Hub id) whose config and tokenizer are copied; by default the one the
    model was loaded from. `dtype` defaults to the model's. One shard is in memory at a time (choice 4).
    """
    from safetensors.torch import save_file

    from hub import resolve

    source = source or getattr(model, "name_or_path", None)
    if source is None:
        raise ValueError("export_merged needs source=the base checkpoint folder (for config.json and tokenizer)")
    src = resolve(source)
    adapted = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, ADAPTER_LAYERS)}
    params = model.state_dict()
    dtype = dtype or model.model.embed_tokens.weight.dtype
    sizes, layout = merged_layout(model, dtype, max_shard_bytes)
    os.makedirs(path, exist_ok=True)
    for f in os.listdir(path):  # an earlier export's weights must not be read beside this one's
        if re.fullmatch(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?", f):
            os.remove(os.path.join(path, f))
    for file, keys in layout.items():
        sd = {}
        for k in keys:
            t = params[k]
            if k in adapted and adapted[k].enabled:
                t = t.float() + delta_weight(adapted[k])  # (d_out, d_in) in fp32, rounded once below
            sd[k] = t.to(dtype).contiguous().cpu()
        save_file(sd, os.path.join(path, file), metadata={"format": "pt"})
    if len(layout) > 1:
        weight_map = {k: file for file, keys in layout.items() for k in keys}
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    config["dtype"] = config["torch_dtype"] = str(dtype).removeprefix("torch.")  # transformers ≥ 5 / older read
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    for f in TOKENIZER_FILES:
        if os.path.exists(os.path.join(src, f)):
            shutil.copy(os.path.join(src, f), os.path.join(path, f))
    return path


def hub_id_of(base: str) -> tuple[str, str | None, str | None]:
    """(Hub id, commit or None, warning or None) for a base model given as a Hub id or a local folder (choice 7)."""
    from hub import is_hub_id, snapshot_sha

    if is_hub_id(base):
        return base, None, None
    parts = os.path.abspath(base).split(os.sep)
    for i in range(len(parts) - 2):  # a folder of the Hub cache: …/models--org--name/snapshots/<commit>
        if parts[i].startswith("models--") and parts[i + 1] == "snapshots":
            return parts[i].removeprefix("models--").replace("--", "/"), snapshot_sha(base), None  # ids have no "--"
    config = os.path.join(base, "config.json")
    name = json.load(open(config)).get("_name_or_path") if os.path.isfile(config) else None
    if name and is_hub_id(name):  # transformers < 5 saved the id a checkpoint was loaded from
        return name, None, None
    return (
        base,
        None,
        (
            f"base model {base} is a local folder with no Hub id in its config.json: base_model_name_or_path keeps the "
            "path; set it (adapter_config.json and README.md) to the base's Hub id before sharing the adapter"
        ),
    )


@torch.no_grad()
def export_peft_lora(
    adapter: Adapter, path: str, base: str | None = None, revision: str | None = None,
    adapter_file: str | None = None, repo_id: str | None = None, dtype: str = "fp32",
) -> str:  # fmt: skip
    """Write the update as a standard rank-r PEFT LoRA folder: lora_B = U M, lora_A = Vᵀ, lora_alpha = r (scale 1),
    adapter_config.json, a model card (README.md) and, when given, the tinylora file as adapter.safetensors.

    ΔW = U M Vᵀ has rank ≤ r, so this is exact (up to fp32 rounding), whichever method produced it. `base` (default:
    the model's) becomes base_model_name_or_path as a Hub id (choice 7); `repo_id` is named in the card. `dtype` is
    the adapter file's storage dtype: the export uses the trained tensors rounded to it, as that file holds them.
    """
    from safetensors.torch import save_file

    if adapter.settings["method"] == "full":
        raise ValueError("method='full' has no low-rank update to export as LoRA; use export_merged (--merged)")
    base_id, sha, warning = hub_id_of(base or adapter.model.name_or_path)
    if warning:
        warnings.warn(warning, stacklevel=3)  # the caller's line (torch.no_grad wraps this function)
    source = getattr(adapter.model, "source", None) or {}  # model.py's {"id", "revision", "sha"}
    revision = revision or sha or (source.get("sha") if source.get("id") == base_id else None)
    trained = [t.detach().clone() for t in adapter.params]
    sd = {}
    try:
        for t in adapter.params:
            t.copy_(t.to(DTYPES[dtype]))  # the values the adapter file stores (a no-op for one read from it)
        for name, mod in adapter.modules:
            U, M, V = mod.lowrank()
            sd[f"base_model.model.{name}.lora_A.weight"] = V.T.contiguous().cpu()  # (r, d_in)
            sd[f"base_model.model.{name}.lora_B.weight"] = (U @ M).contiguous().cpu()  # (d_out, r)
    finally:
        for t, saved in zip(adapter.params, trained):
            t.copy_(saved)  # the caller's adapter is left as it was
    r = adapter.settings["r"]
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_id, "revision": revision,
        "r": r, "lora_alpha": r, "target_modules": adapter.settings["targets"], "bias": "none", "lora_dropout": 0.0,
        "fan_in_fan_out": False, "modules_to_save": None, "use_rslora": False, "use_dora": False, "lora_bias": False,
        "init_lora_weights": True, "inference_mode": True,
    }  # fmt: skip
    os.makedirs(path, exist_ok=True)
    save_file(sd, os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    if adapter_file and os.path.abspath(adapter_file) != os.path.abspath(os.path.join(path, ADAPTER_FILE)):
        shutil.copy(adapter_file, os.path.join(path, ADAPTER_FILE))  # `eval.py --adapter REPO` reads it
    with open(os.path.join(path, "README.md"), "w") as f:
        f.write(model_card(adapter, config, repo_id, has_file=os.path.isfile(os.path.join(path, ADAPTER_FILE))))
    problems = vllm_lora_problems(path)
    assert not problems, f"the PEFT export breaks vLLM's LoRA rules: {problems}"
    return path


def model_card(adapter: Adapter, config: dict, repo_id: str | None = None, has_file: bool = False) -> str:
    """README.md of the PEFT folder: Hub metadata, what the adapter is, how to load it."""
    s, n, base = adapter.settings, adapter.num_params(), config["base_model_name_or_path"]
    where = repo_id or "THIS_FOLDER"
    n_lora = sum(m.r * (m.in_features + m.out_features) for _, m in adapter.modules)
    keys = ("method", "r", "u", "tie", "order", "variant", "seed", "alpha")
    settings = ", ".join(f"{k}={s[k]}" for k in keys if s[k] is not None)
    step = (getattr(adapter, "stored", None) or {}).get("meta", {}).get("step")
    ours = f"\nWith tinylora: `python eval.py --model {base} --adapter {where} --dataset gsm8k`.\n" if has_file else ""
    return f"""---
base_model: {base}
library_name: peft
tags:
- tinylora
- lora
---

# TinyLoRA adapter for {base}

{n:,} trained parameter{"s" * (n != 1)} ({settings}{f", step {step}" if step else ""}), trained with tinylora
(a from-scratch reproduction of *Learning to Reason in 13 Parameters*), adapting {len(adapter.modules)} linear layers
({", ".join(s["targets"])}).

Exported as an exact rank-{s["r"]} LoRA: each adapted weight's update ΔW = U M Vᵀ has rank ≤ {s["r"]}, so
`lora_B = U M`, `lora_A = Vᵀ` (lora_alpha = r = {s["r"]}, scale 1) reproduce it exactly. The LoRA tensors hold
{n_lora:,} numbers, all determined by the {n:,} trained one{"s" * (n != 1)}.
{"`adapter.safetensors` is the tinylora file itself (the trained numbers, seed and settings)." if has_file else ""}

## Use

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM

model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{base}"), "{where}")
```

```bash
vllm serve {base} --enable-lora --lora-modules tinylora={where} --max-lora-rank {vllm_max_lora_rank(s["r"])}
lm_eval --model hf --model_args pretrained={base},peft={where} --tasks gsm8k
```
{ours}"""


# -----------------------------------------------------------------------------
# vLLM's rules for a LoRA folder (choice 8), and pushing a folder to the Hub

VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the only values --max-lora-rank takes (config/lora.py)
VLLM_UNSUPPORTED = {  # adapter_config.json fields vLLM refuses when set (peft_helper.py, _validate_features)
    "use_dora": "DoRA", "lora_bias": "LoRA bias (lora_bias)", "alora_invocation_tokens": "Activated LoRA (aLoRA)",
    "layer_replication": "layer_replication", "use_bdlora": "block-diagonal LoRA", "use_qalora": "QALoRA",
}  # fmt: skip
VLLM_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")  # string inits it accepts; True / False are fine
VLLM_TARGETS = TARGETS  # Llama / Qwen2 / Qwen3 expand qkv_proj and gate_up_proj to these (packed_modules_mapping)


def vllm_max_lora_rank(r: int) -> int | None:
    """The smallest --max-lora-rank that admits rank r (None: above what vLLM takes)."""
    return next((m for m in VLLM_MAX_LORA_RANKS if m >= r), None)


def vllm_lora_problems(folder: str, max_lora_rank: int | None = None) -> list[str]:
    """Why vLLM's LoRA loader would refuse `folder` (empty: it loads): config fields, rank, tensor names and shapes."""
    from safetensors import safe_open

    cfg_path, weights = os.path.join(folder, "adapter_config.json"), os.path.join(folder, "adapter_model.safetensors")
    if not os.path.isfile(cfg_path):
        return [f"no adapter_config.json in {folder}"]
    with open(cfg_path) as f:
        cfg = json.load(f)
    problems = []
    if cfg.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type {cfg['peft_type']!r}: vLLM serves LoRA adapters only")
    missing = [k for k in ("r", "lora_alpha", "target_modules") if k not in cfg]
    problems += [f"adapter_config.json lacks {', '.join(missing)}"] if missing else []
    ranks = [cfg.get("r"), *(cfg.get("rank_pattern") or {}).values()]
    limit = max_lora_rank or VLLM_MAX_LORA_RANKS[-1]
    if max_lora_rank is not None and max_lora_rank not in VLLM_MAX_LORA_RANKS:
        problems.append(f"--max-lora-rank {max_lora_rank} is not one of {VLLM_MAX_LORA_RANKS}")
    if not all(isinstance(x, int) and x > 0 for x in ranks):
        problems.append(f"ranks {ranks} are not all positive integers")
    elif max(ranks) > limit:
        problems.append(f"LoRA rank {max(ranks)} is greater than max_lora_rank {limit}")
    if cfg.get("bias", "none") != "none":
        problems.append(f"bias {cfg['bias']!r}: vLLM supports no adapter bias (bias must be 'none')")
    extra = [m for m in cfg.get("modules_to_save") or [] if m not in ("classifier", "score")]
    problems += [f"modules_to_save {extra}: vLLM allows only classifier / score heads"] if extra else []
    problems += [f"{what} is not supported by vLLM ({k})" for k, what in VLLM_UNSUPPORTED.items() if cfg.get(k)]
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in VLLM_INITS:
        problems.append(f"init_lora_weights={init!r} changes the base weights; vLLM refuses it")
    targets = cfg.get("target_modules") or []
    bad = [t for t in ([targets] if isinstance(targets, str) else targets) if t not in VLLM_TARGETS]
    problems += [f"target_modules {bad}: not among the linears vLLM adapts ({', '.join(VLLM_TARGETS)})"] if bad else []
    if not os.path.isfile(weights):
        return problems + [f"no adapter_model.safetensors in {folder}"]
    pairs = {}
    with safe_open(weights, framework="pt") as f:
        for k in f.keys():
            m = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])\.weight", k)
            if m is None:
                problems.append(f"tensor {k}: vLLM reads only base_model.model.<module>.lora_A.weight / lora_B.weight")
            elif m[1].rsplit(".", 1)[-1] not in VLLM_TARGETS:
                problems.append(f"tensor {k}: {m[1]} is not a linear vLLM adapts ({', '.join(VLLM_TARGETS)})")
            else:
                pairs.setdefault(m[1], {})[m[2]] = tuple(f.get_slice(k).get_shape())
    for mod, ab in pairs.items():
        if ab.keys() != {"A", "B"}:
            problems.append(f"{mod} has lora_{''.join(ab)} but not both lora_A and lora_B")
        elif len(ab["A"]) != 2 or len(ab["B"]) != 2 or ab["A"][0] != ab["B"][1] or ab["A"][0] != cfg.get("r"):
            problems.append(f"{mod}: lora_A {ab['A']} and lora_B {ab['B']} do not make a rank-{cfg.get('r')} pair")
    return problems


LOGIN = "log in with `hf auth login` or set HF_TOKEN, using a token with write access (https://huggingface.co/settings/tokens)"


def check_push(repo_id: str, folder: str, token: str | None = None):
    """SystemExit with what to do when a push cannot work now (offline, not logged in): before any slow work."""
    import huggingface_hub

    import hub

    later = f"Push it later with `hf upload {repo_id} {folder}`."
    why = hub.hub_unreachable()
    if why:
        raise SystemExit(f"cannot push to {repo_id}: {why}. {later}")
    if token is None and huggingface_hub.get_token() is None:  # else the Hub answers 401 after the request
        raise SystemExit(f"cannot push to {repo_id}: not logged in to the Hugging Face Hub; {LOGIN}. {later}")


def push_to_hub(folder: str, repo_id: str, private: bool | None = None, token: str | None = None) -> str:
    """Upload `folder` to the Hub model repo `repo_id` (created if missing); returns its URL."""
    import huggingface_hub
    from huggingface_hub import errors

    import hub

    check_push(repo_id, folder, token)
    later, login = f"Push it later with `hf upload {repo_id} {folder}`.", LOGIN
    api = huggingface_hub.HfApi(endpoint=hub.hub_endpoint(), token=token)
    try:
        api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model",
                          commit_message="TinyLoRA adapter, exported as an exact rank-r LoRA")  # fmt: skip
    except errors.LocalTokenNotFoundError:
        raise SystemExit(f"cannot push to {repo_id}: not logged in to the Hugging Face Hub; {login}. {later}") from None
    except errors.HfHubHTTPError as e:
        status = getattr(e.response, "status_code", None)
        if status == 401:
            raise SystemExit(f"the Hub refused the token (HTTP 401: invalid or expired): {login}. {later}") from None
        if status == 403:
            raise SystemExit(
                f"the token may not write to {repo_id} (HTTP 403): use a token with write access, and a namespace "
                f"you own or belong to (your user name or one of your organisations). {later}"
            ) from None
        raise SystemExit(f"pushing to {repo_id} failed ({type(e).__name__}: {e}). {later}") from None
    return f"{hub.hub_endpoint()}/{repo_id}"


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

        from hub import hub_reachable

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


# -----------------------------------------------------------------------------
# the command line: export an adapter (given one), else count parameters from a config


def parse_size(s: str) -> int:
    """'5GB', '200MB', '64KB' (powers of 10, as the Hub counts) or a number of bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)?\s*", s.upper())
    if m is None:
        raise argparse.ArgumentTypeError(f"{s!r} is not a size like 5GB, 200MB or 1000000")
    return int(float(m[1]) * {None: 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[m[2]])


def base_of(file: str, info: dict, model: str | None, revision: str | None) -> tuple[str, str | None]:
    """(base model, revision) for an adapter file: --model as given, else its run's args.json, else its metadata
    (pinned to the commit it was trained on when that is known)."""
    if model:
        return model, revision
    from hub import is_hub_id

    args_path = os.path.join(os.path.dirname(os.path.abspath(file)), "args.json")
    run = {}
    if os.path.isfile(args_path):
        with open(args_path) as f:
            run = json.load(f)
    base = run.get("model") or (info.get("meta") or {}).get("model") or info.get("base")
    if not base:
        raise SystemExit(f"{file} does not say which base model it was trained on: pass --model ID_OR_FOLDER")
    source = info.get("source") or {}
    pinned = source.get("sha") if source.get("id") == base and is_hub_id(base) else None
    return base, revision or pinned


def export_command(args):
    import hub
    import model as M

    # 1) everything that can be wrong, before the base model loads
    if not (args.peft or args.merged):
        raise SystemExit("nothing to write: give --peft DIR and/or --merged DIR")
    if args.push_to_hub and not args.peft:
        raise SystemExit("--push-to-hub uploads the PEFT folder: give --peft DIR too")
    try:
        file = find_adapter(args.adapter)
        info, _ = read_adapter(file)
    except ValueError as e:
        raise SystemExit(f"export.py: {e}") from None
    if args.push_to_hub:
        check_push(args.push_to_hub, args.peft)
    if args.peft and info["method"] == "full":
        raise SystemExit("a method='full' run changed every weight: there is no LoRA to export; use --merged DIR")
    base, revision = base_of(file, info, args.model, args.revision)
    # 2) the base model (in its checkpoint's own dtype: the weights the adapter was trained on), then the adapter
    path = hub.resolve(base, revision)
    with open(os.path.join(path, "config.json")) as f:
        stored = json.load(f)
    dtype = getattr(torch, stored.get("dtype") or stored.get("torch_dtype") or "float32")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = M.load_model(base, dtype=dtype, device=device, revision=revision)
    adapter = load_adapter(file, model)  # the fingerprint check: another base is an error, not a wrong model
    print(f"{file}: {adapter.num_params():,} trained parameters ({info['method']}, r={adapter.r}) on {base}")
    # 3) the outputs
    if args.peft:
        kw = dict(adapter_file=file, repo_id=args.push_to_hub, dtype=info["dtype"])
        export_peft_lora(adapter, args.peft, base, revision, **kw)
        base_id, rank = hub_id_of(base)[0], vllm_max_lora_rank(adapter.r)
        print(f"PEFT LoRA -> {args.peft}  (vLLM: vllm serve {base_id} --enable-lora "
              f"--lora-modules tinylora={args.peft} --max-lora-rank {rank})")  # fmt: skip
    if args.merged:
        out_dtype = DTYPES[args.dtype] if args.dtype else dtype
        export_merged(model, args.merged, source=path, dtype=out_dtype, max_shard_bytes=args.max_shard_size)
        print(f"merged checkpoint ({str(out_dtype).removeprefix('torch.')}) -> {args.merged}")
    if args.push_to_hub:
        print(f"pushed {args.peft} -> {push_to_hub(args.peft, args.push_to_hub, private=args.private)}")


COUNT_FLAGS = ("method", "r", "u", "tie", "order", "targets")


def main(argv=None):
    p = argparse.ArgumentParser(
        description="Export an adapter (PEFT LoRA folder, merged checkpoint, Hub upload), or, without one, the "
        "trainable parameters and update size that adapter settings imply."
    )
    p.add_argument("adapter", nargs="?", help="run folder, adapter file, or Hub repo (user/repo[/path/file])")
    p.add_argument("--model", default=None, help="base model: Hub id or folder (export: default the adapter's own; "
                   "counts: default Qwen/Qwen2.5-7B-Instruct, or a built-in name)")  # fmt: skip
    p.add_argument("--revision", default=None, help="the base model's branch, tag or commit (with --model)")
    # export
    p.add_argument("--peft", metavar="DIR", help="write a PEFT LoRA folder (PEFT, vLLM --enable-lora, lm-eval)")
    p.add_argument("--merged", metavar="DIR", help="write W + ΔW as a plain Hugging Face checkpoint")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="merged weights' dtype (default: the base's)")
    p.add_argument("--max-shard-size", type=parse_size, default=SHARD_BYTES, help="merged shard size (default 5GB)")
    p.add_argument("--push-to-hub", metavar="ID", default=None, help="upload the PEFT folder to this Hub repo")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    p.add_argument("--device", default=None, help="where to load the base for export (default cuda if present)")
    # counts
    p.add_argument("--method", default="tinylora", choices=METHODS)
    p.add_argument("--r", type=int, default=2, help="rank of the frozen SVD (LoRA: its rank)")
    p.add_argument("--u", type=int, default=1, help="size of each trainable vector v")
    p.add_argument("--tie", type=int, default=1, help="modules sharing one v")
    p.add_argument("--order", default="tiled", choices=ORDERS, help="which modules share a v (tinylora.py)")
    p.add_argument("--targets", default=",".join(TARGETS), help="comma-separated projections to adapt")
    args = p.parse_args(argv)
    if args.adapter:
        if any(getattr(args, k) != p.get_default(k) for k in COUNT_FLAGS):
            p.error(f"--{', --'.join(COUNT_FLAGS)} are for counts; an adapter file carries its own settings")
        return export_command(args)
    args.model = args.model or "Qwen/Qwen2.5-7B-Instruct"
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
