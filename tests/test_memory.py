"""
memory.py's plan against measurement: the activation formula against the storages autograd keeps for one real-width
block of each family, and the whole plan (weights + one training micro-batch) against the peak memory of a fresh
process training the 2-layer real-width Qwen2.5-7B (tests/realsize.py) on CPU. Also the choices and sentences.
Run: python -m pytest -q tests/test_memory.py

Measures: saved-tensor hooks (torch.autograd.graph.saved_tensors_hooks) count the unique storages autograd keeps,
weights excluded: exact, and what the activation formula predicts. Peak memory is the training pass's peak RSS
(VmHWM, reset after loading) minus the RSS before the weights load, in a fresh process with glibc's mmap threshold
pinned at 64 KiB, so every large tensor is its own mapping and is returned to the kernel when freed: RSS then
follows live tensors, not the allocator's cache (tracemalloc does not see torch's allocations).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from realsize import CONFIGS

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent


def fake_usv(W, r):
    """Random orthonormal factors in place of the SVD: what autograd keeps does not depend on their values."""
    g = torch.Generator().manual_seed(W.shape[0] * 7 + W.shape[1])
    U = torch.linalg.qr(torch.randn(W.shape[0], r, generator=g))[0]
    V = torch.linalg.qr(torch.randn(W.shape[1], r, generator=g))[0]
    return U, torch.linspace(2.0, 1.0, r), V


def saved_bytes(fn, exclude=()):
    """Run fn() under saved-tensor hooks; bytes of the unique storages autograd keeps, minus those in `exclude`."""
    seen = {}
    skip = {t.untyped_storage().data_ptr() for t in exclude}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def adapted_block(family, dtype):
    """One real-width block with TinyLoRA (u=1, r=2) on its 7 linears, random weights, nothing trainable but v."""
    import model as M
    import tinylora

    d = dict(CONFIGS[family], num_hidden_layers=1)
    cfg = M.Config.from_dict(d)
    with torch.device("meta"):
        blk = M.Block(cfg)
    blk = blk.to_empty(device="cpu").to(dtype)
    g = torch.Generator().manual_seed(0)
    for p in blk.parameters():
        p.requires_grad_(False)
        p.data.normal_(0, 0.02, generator=g)
    v = torch.zeros(1, requires_grad=True)
    for parent, names in M.SIBLINGS:
        for n in names:
            lin = getattr(getattr(blk, parent), n)
            mod = tinylora.TinyLoRALinear(lin, 2, torch.randn(1, 2, 2, generator=g), v, USV=fake_usv(lin.weight, 2))
            setattr(getattr(blk, parent), n, mod)
    return cfg, blk


@pytest.mark.parametrize(
    "family, dtype",
    [
        ("qwen2.5-7b", "bfloat16"),
        ("qwen2.5-7b", "float32"),
        ("llama3.1-8b", "bfloat16"),
        ("qwen3-8b", "bfloat16"),
    ],  # fmt: skip
)
def test_block_activations_formula(family, dtype):
    """memory.activation_bytes_per_token_layer == what autograd keeps for a block whose input needs grad (any block
    but the first), per token, at two lengths and two batch sizes (no T x T term in the causal layout)."""
    import memory
    import model as M

    dt = getattr(torch, dtype)
    cfg, blk = adapted_block(family, dt)
    want = memory.activation_bytes_per_token_layer(cfg, memory.DTYPE_BYTES[dtype])
    inv = M.rope_inv_freq(cfg)
    for B, T in ((1, 128), (2, 96)):
        x = torch.randn(B, T, cfg.hidden_size, dtype=dt).requires_grad_(True)
        freqs = torch.arange(T).float()[None, :, None] * inv  # (1, T, D/2)
        emb = torch.cat((freqs, freqs), -1)[:, None]  # (1, 1, T, D)
        cos, sin = emb.cos().to(dt), emb.sin().to(dt)
        # x stays counted: in fp32 the first RMSNorm keeps the block input itself (in bf16, only its fp32 copy)
        run = lambda x=x, cos=cos, sin=sin: blk(x, cos, sin, None)  # noqa: E731
        got, _ = saved_bytes(run, exclude=[cos, sin, *blk.parameters(), *blk.buffers()])
        per_token = got / (B * T)
        assert abs(per_token - want) <= 0.01 * want, f"{family} {dtype} B={B} T={T}: {per_token:.0f} vs {want}"


# -----------------------------------------------------------------------------
# the whole plan against a fresh process training one micro-batch of the 2-layer real-width model


def rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) * 1024


def reset_peak_rss():
    """Linux: writing 5 to /proc/self/clear_refs resets the peak RSS (VmHWM) to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss() -> int | None:
    with open("/proc/self/status") as f:
        return next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:")), None)


def measure_micro_batch(folder: str, rows: int, prompt: int, completion: int) -> dict:
    """In a fresh process: RSS before loading, after loading + attaching, and at the peak of one forward + backward
    of `rows` rows of prompt + completion tokens through grpo.token_logprobs; saved-tensor bytes of that pass."""
    import resource

    sys.path.insert(0, str(ROOT))  # a fresh process: no conftest put the repository on the path
    import grpo
    import tinylora
    from model import load_model

    torch.manual_seed(0)
    r0 = rss()
    net = load_model(folder, dtype=torch.bfloat16, device="cpu")
    tinylora.top_svds = lambda ws, r, *a, **k: [fake_usv(W, r) for W in ws]  # the SVD's values change no memory
    adapter = tinylora.attach(net, u=1, tie=14)
    with torch.no_grad():  # touch every weight page: load_model leaves same-dtype tensors mapped from the files,
        for t in net.parameters():  # and a forward reads only the embedding rows it looks up
            t.sum()
    r1 = rss()
    reset_peak_rss()  # the peak of the training pass alone, not of loading (a shard in flight) or attaching
    W = prompt + completion
    ids = torch.randint(0, 384, (rows, W))
    cmask = torch.zeros(rows, W, dtype=torch.bool)
    cmask[:, prompt:] = True
    weights = [*net.parameters(), *net.buffers()]
    saved, logp = saved_bytes(lambda: grpo.token_logprobs(net, ids, cmask, prompt), exclude=weights)
    logp.sum().backward()
    peak = peak_rss() or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert adapter.params[0].grad is not None
    return {"rss0": r0, "rss_loaded": r1, "peak": peak, "saved": saved}


@pytest.mark.slow
def test_plan_matches_a_measured_micro_batch(realsize):
    """One micro-batch of 1 row x (512 prompt + 512 completion) tokens on the 2-layer real-width Qwen2.5-7B in bf16:
    the plan's weights, its saved activations, and its training peak each within 20% of the measurement."""
    import memory

    folder = str(realsize("qwen2.5-7b"))
    rows, prompt, completion = 1, 512, 512
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    code = (f"import json, test_memory as t; print('RESULT', json.dumps(t.measure_micro_batch({folder!r}, {rows}, "
            f"{prompt}, {completion})))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], cwd=HERE, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    m = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT"))[7:])
    p = memory.plan(folder, dtype="bfloat16", prompts_per_call=1, G=rows, max_prompt_tokens=prompt,
                    max_new_tokens=completion, micro_batch=rows, device="cpu", u=1, tie=14)  # fmt: skip
    weights = p.get("weights") + p.get("adapter factors")
    # one chunk (512 <= chunk tokens) is not recomputed, so its fp32 logits are kept for backward: 4 V a token
    saved = p.get("activations") + p.get("final hidden") + completion * rows * p.settings["vocab_size"] * 4
    trained = p.training  # weights + activations + lm_head chunk + gradients + optimizer
    got_w, got_peak = m["rss_loaded"] - m["rss0"], m["peak"] - m["rss0"]
    print(f"\nplan vs measured (MiB): weights {weights / 2**20:.0f} vs {got_w / 2**20:.0f}; saved activations "
          f"{saved / 2**20:.0f} vs {m['saved'] / 2**20:.0f}; training peak {trained / 2**20:.0f} vs "
          f"{got_peak / 2**20:.0f} (peak above the loaded weights: plan {(trained - weights) / 2**20:.0f}, "
          f"measured {(m['peak'] - m['rss_loaded']) / 2**20:.0f})")  # fmt: skip
    assert abs(got_w - weights) <= 0.2 * weights
    assert abs(m["saved"] - saved) <= 0.2 * saved
    assert abs(got_peak - trained) <= 0.2 * trained
    above = m["peak"] - m["rss_loaded"]  # the part that is not weights, measured the same way
    assert abs(above - (trained - weights)) <= 0.2 * (trained - weights)


# -----------------------------------------------------------------------------
# the plan's arithmetic and its advice (no weights)


def test_kv_cache_and_weights_of_the_paper_run():
    """PERF.md's arithmetic: 57,344 bytes of KV per token per row (2 x 28 x 4 x 128 x 2), 256 rows x 4,608 slots;
    7.62B parameters in bf16."""
    import memory

    p = memory.plan("Qwen/Qwen2.5-7B-Instruct", prompts_per_call=64, G=4, max_prompt_tokens=512, max_new_tokens=4096)
    assert p.get("KV cache") == 2 * 28 * 4 * 128 * 2 * 256 * 4608
    import export

    assert p.get("weights") == 2 * export.count_params("Qwen/Qwen2.5-7B-Instruct", "full")
    assert p.sampling > p.get("weights") + p.get("KV cache")


def test_checkpointing_and_micro_batch_scale_the_activations():
    import memory

    kw = dict(prompts_per_call=64, G=4, max_prompt_tokens=512, max_new_tokens=4096)
    one = memory.plan("Qwen/Qwen2.5-7B-Instruct", micro_batch=1, **kw).get("activations")
    four = memory.plan("Qwen/Qwen2.5-7B-Instruct", micro_batch=4, **kw).get("activations")
    ck = memory.plan("Qwen/Qwen2.5-7B-Instruct", micro_batch=4, grad_checkpointing=True, **kw).get("activations")
    assert four == 4 * one
    assert ck < four / 10  # 28 block inputs of 3584 values + one block, against 28 blocks' worth
    tok = memory.plan("Qwen/Qwen2.5-7B-Instruct", micro_batch_tokens=4 * 4608 + 100, **kw)
    assert tok.settings["micro_batch_rows"] == 4 and tok.get("activations") == four


def test_choose_and_advice_on_an_h200():
    import memory

    h200 = memory.GPUS["h200"]
    p, msg = memory.choose("Qwen/Qwen2.5-7B-Instruct", free=h200, **memory.RECIPES["gsm8k"])
    assert msg is None and p.peak <= h200
    bigger = memory.plan("Qwen/Qwen2.5-7B-Instruct", micro_batch_tokens=2 * p.settings["micro_batch_tokens"],
                         grad_checkpointing=p.settings["grad_checkpointing"], **memory.RECIPES["gsm8k"])  # fmt: skip
    assert bigger.peak > h200 or bigger.settings["micro_batch_rows"] == p.settings["micro_batch_rows"]
    # fixed settings that do not fit: the sentence names the flag to change, and its advice fits
    kw = dict(memory.RECIPES["gsm8k"])
    p16 = memory.plan("Qwen/Qwen2.5-7B-Instruct", micro_batch=16, **kw)
    assert p16.peak > h200
    msg = memory.advice("Qwen/Qwen2.5-7B-Instruct", p16, h200, **kw)
    assert "--micro-batch-tokens" in msg
    n = int(msg.split("--micro-batch-tokens ")[1].split()[0])
    assert memory.plan("Qwen/Qwen2.5-7B-Instruct", micro_batch_tokens=n, **kw).peak <= h200
    # MATH's 256 prompts x 8 in one sampling call cannot fit: the advice is --sample-batch
    p, msg = memory.choose("Qwen/Qwen2.5-7B-Instruct", free=h200, **{**memory.RECIPES["math"], "prompts_per_call": 256})
    assert msg is not None and "--sample-batch" in msg
    K = int(msg.split("--sample-batch ")[1].split()[0])
    assert K == memory.RECIPES["math"]["prompts_per_call"]  # what --recipe math sets
    kw = {**memory.RECIPES["math"], "prompts_per_call": K}
    p, msg = memory.choose("Qwen/Qwen2.5-7B-Instruct", free=h200, **kw)
    assert msg is None and p.peak <= h200


def test_cli_prints_the_table(capsys):
    import memory

    memory.main(["--model", "Qwen/Qwen2.5-7B-Instruct", "--recipe", "gsm8k", "--gpu", "h200"])
    out = capsys.readouterr().out
    assert "KV cache" in out and "PEAK" in out and "fits" in out and "chosen: --micro-batch-tokens" in out


def test_rehearsal_dry_run():
    """dev/rehearse.py's CUDA path (library calls on random in-memory weights), at a tiny size on CPU: it must not
    fail on a typo before it meets a GPU."""
    sys.path.insert(0, str(ROOT / "dev"))
    import rehearse

    out = rehearse.main(["--device", "cpu", "--in-memory", "--tiny"])
    assert out["modules"] == 14 and out["trainable"] == 1  # --u 1 --tie 7L: one v shared by every module
    assert out["tokens_sampled"] == out["rows"] * 8  # no stop ids: every row runs to max_new_tokens
    assert out["grad"] > 0 and out["plan_peak"] > 0


def test_plan_for_run_reads_train_args():
    """The hook train.py calls before loading: its own argparse namespace, fixed settings -> the advice sentence."""
    import argparse

    import memory

    args = argparse.Namespace(device="cuda", dtype=None, method="tinylora", r=2, u=1, tie=196, G=4,
                              max_new_tokens=4096, chunk=4096, top_k=0, top_p=1.0, sample_batch=0,
                              prompts_per_step=64, micro_batch=16, grad_checkpointing=False)  # fmt: skip
    cfg = memory.read_config("Qwen/Qwen2.5-7B-Instruct")
    p, msg = memory.plan_for_run(cfg, args, max_prompt_tokens=512, free=memory.GPUS["h200"])
    assert p.settings["rows"] == 256 and p.settings["micro_batch_rows"] == 16 and p.dtype == "bfloat16"
    assert msg is not None and "--micro-batch-tokens" in msg and "--grad-checkpointing" in msg
    args.micro_batch_tokens, args.grad_checkpointing = "auto", "auto"
    p, msg = memory.plan_for_run(cfg, args, max_prompt_tokens=512, free=memory.GPUS["h200"])
    assert msg is None and p.peak <= memory.GPUS["h200"]


def test_recipe_tables_agree_with_train():
    """memory.py plans the runs train.py's --recipe makes: the two tables must not drift apart."""
    import memory
    import train

    for name, plan in memory.RECIPES.items():
        run = train.RECIPES[name]
        assert plan["G"] == run["G"] and plan["max_prompt_tokens"] == run["max_prompt_tokens"]
        assert plan["prompts_per_call"] == (run["sample_batch"] or run["prompts_per_step"])
    assert memory.RECIPES["gsm8k"]["max_new_tokens"] == 4096 and memory.RECIPES["math"]["max_new_tokens"] == 3072
