"""
train.py end to end on a tiny random checkpoint: every method and algo, kill-and-resume, and every bad value.
Run: python -m pytest -q tests/test_train.py
"""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import write_addition_data

ROOT = Path(__file__).resolve().parents[1]
TIMING = ("t_sample", "t_grade", "t_train", "t_step", "tok_per_s", "t_eval")


def write_data(folder: Path) -> Path:
    return write_addition_data(folder, seed=0, n_train=24, n_test=6)


@pytest.fixture(scope="module")
def tiny(make_checkpoint, tmp_path_factory):
    return str(make_checkpoint("qwen2")), str(write_data(tmp_path_factory.mktemp("adddata")))


def base_args(tiny, out, *extra, adapter=("--u", 2, "--tie", 7)):
    ckpt, data = tiny
    return ["--device", "cpu", "--model", ckpt, "--data", data, "--out", str(out), "--G", "4",
            "--prompts-per-step", "4", "--max-new-tokens", "8", "--eval-limit", "4", "--eval-every", "0",
            "--micro-batch", "8", "--lr", "0.05", "--reward", "flexible", "--temperature", "1.5",
            *adapter, *extra]  # fmt: skip


def run(argv):
    import train

    train.main([str(a) for a in argv])


def records(run_dir, event="step"):
    out = []
    for line in open(os.path.join(run_dir, "metrics.jsonl")):
        r = json.loads(line)
        if r.get("event") == event:
            out.append({k: v for k, v in r.items() if k not in TIMING})
    return out


def trained_params(run_dir):
    return torch.load(os.path.join(run_dir, "state.pt"), weights_only=False)["params"]


# -----------------------------------------------------------------------------
# every method and algo


def lora_count(cfg, r):
    """LoRA: r * (d_in + d_out) per adapted linear, from the config (the paper's formula)."""
    C, I, D = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    shapes = [(C, H * D), (C, Hkv * D), (C, Hkv * D), (H * D, C), (C, I), (C, I), (I, C)]
    return cfg.num_hidden_layers * sum(r * (a + b) for a, b in shapes)


@pytest.mark.parametrize(
    "method, algo",
    [
        ("tinylora", "grpo"),
        ("loraxs", "grpo"),
        ("lora", "grpo"),
        ("full", "grpo"),
        ("tinylora", "sft"),
        ("lora", "sft"),
    ],
)
def test_every_method_and_algo(tiny, tmp_path, capsys, method, algo):
    from model import load_config

    cfg = load_config(tiny[0])  # 2 layers -> 14 modules
    out = tmp_path / "run"
    adapter = ("--u", 2, "--tie", 7) if method == "tinylora" else ()
    run(base_args(tiny, out, "--method", method, "--algo", algo, "--max-steps", 2, adapter=adapter))
    text = capsys.readouterr().out
    n = int(text.split("TRAINABLE PARAMETERS:")[1].split()[0].replace(",", ""))
    want = {"tinylora": math.ceil(14 / 7) * 2, "loraxs": 14 * 2 * 2, "lora": lora_count(cfg, 2)}.get(method)
    if want is not None:  # independent counts: ceil(modules / tie) * u, r^2 per module, r (d_in + d_out)
        assert n == want
    else:  # full: every weight of the adapted linears is trainable, so more than LoRA could have
        assert n > lora_count(cfg, 2)
    steps = records(out)
    assert [r["step"] for r in steps] == [1, 2]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in steps)
    assert [r["step"] for r in records(out, "eval")] == [0, 2]
    assert (out / "adapter.safetensors").exists() and (out / "state.pt").exists()
    assert sum(p.numel() for p in trained_params(out)) == n
    if algo == "sft":  # the reference solutions always give a gradient
        assert any(p.abs().sum() > 0 for p in trained_params(out))
    else:
        assert "samples" in steps[0] and steps[0]["samples"][0]["completion"] is not None


def test_start_record_and_plot(tiny, tmp_path):
    out = tmp_path / "run"
    run(base_args(tiny, out, "--max-steps", 3, "--eval-every", 2))
    head = json.loads(open(out / "metrics.jsonl").readline())
    assert head["event"] == "start" and head["trainable"] == 4 and head["update_bytes"] == 16
    assert head["args"]["u"] == 2 and len(head["git"]) >= 7
    assert [r["step"] for r in records(out, "eval")] == [0, 2, 3]
    r = subprocess.run([sys.executable, "plot.py", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    png = out / "plot.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


# -----------------------------------------------------------------------------
# kill and resume: the resumed run matches the uninterrupted one


def same_runs(a, b):
    ra, rb = records(a), records(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(ra, rb):
        assert x == y, (x["step"], {k: (x[k], y.get(k)) for k in x if x[k] != y.get(k)})
    eb = {r["step"]: r for r in records(b, "eval")}  # b may add an evaluation where an earlier leg ended
    assert all(eb.get(r["step"]) == r for r in records(a, "eval"))
    for p, q in zip(trained_params(a), trained_params(b)):
        assert torch.equal(p, q)


@pytest.fixture(scope="module")
def reference_run(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    run(base_args(tiny, out, "--max-steps", 6, "--save-every", 2, "--eval-every", 3))
    params = trained_params(out)
    assert any(p.abs().sum() > 0 for p in params), "the reference run did not learn anything: the test would be weak"
    return out


def test_resume_after_max_steps_matches_uninterrupted(tiny, tmp_path, reference_run):
    out = tmp_path / "run"
    run(base_args(tiny, out, "--max-steps", 4, "--save-every", 2, "--eval-every", 3))
    run(["--resume", out, "--max-steps", 6])
    same_runs(reference_run, out)


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_matches_uninterrupted(tiny, tmp_path, reference_run):
    out = tmp_path / "run"
    argv = [sys.executable, "train.py"] + [
        str(a) for a in base_args(tiny, out, "--max-steps", 6, "--save-every", 2, "--eval-every", 3)
    ]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        st = out / "state.pt"
        if st.exists() and torch.load(st, weights_only=False)["step"] >= 2:
            break
        time.sleep(0.2)
    killed = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert killed, "the run finished before it could be killed"
    step = torch.load(out / "state.pt", weights_only=False)["step"]
    assert 2 <= step < 6
    r = subprocess.run([sys.executable, "train.py", "--resume", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resumed {out} at step {step}" in r.stdout
    same_runs(reference_run, out)


def test_resume_refuses_a_different_config(tiny, tmp_path):
    out = tmp_path / "run"
    run(base_args(tiny, out, "--max-steps", 1))
    with pytest.raises(SystemExit, match=r"--lr 0.1 \(the run has 0.05\)"):
        run(["--resume", out, "--lr", 0.1])
    with pytest.raises(SystemExit, match="already holds a run"):
        run(base_args(tiny, out, "--max-steps", 1))


# -----------------------------------------------------------------------------
# bad values: a clear message before any model loads


@pytest.fixture
def no_model_load(monkeypatch):
    import model

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the bad value was reported")

    monkeypatch.setattr(model, "load_model", refuse)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--u", 0], "--u must be a positive integer"),
        (["--u", -3], "--u must be a positive integer"),
        (["--tie", 0], "--tie must be a positive integer"),
        (["--tie", 15], "--tie 15 is larger than the 14 adaptable modules"),
        (["--r", 0], "--r must be a positive integer"),
        (["--G", 1], "--G must be at least 2"),
        (["--data", "no_such_dataset"], "unknown dataset 'no_such_dataset'"),
        (["--model", "/no/such/folder"], "no such folder"),
        (["--out", "/proc/version/run"], "cannot write there"),
    ],
)
def test_bad_values_fail_before_the_model_loads(tiny, tmp_path, no_model_load, extra, message):
    with pytest.raises(SystemExit, match=message):
        run(base_args(tiny, tmp_path / "run", *extra))


def test_unknown_method_is_an_argparse_error(tiny, tmp_path, capsys, no_model_load):
    with pytest.raises(SystemExit):
        run(base_args(tiny, tmp_path / "run", "--method", "dora"))
    assert "invalid choice: 'dora'" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_no_gpu_fails_fast_with_instructions(no_model_load):
    t = time.time()
    with pytest.raises(SystemExit, match="No CUDA GPU found") as e:
        run(["--u", 1, "--tie", 196])
    assert "--device cpu" in str(e.value) and "--model DIR" in str(e.value) and "--data" in str(e.value)
    assert time.time() - t < 10


def test_offline_hub_model_fails_fast(tmp_path, no_model_load, monkeypatch):
    import train

    monkeypatch.setattr(train, "hub_reachable", lambda timeout=3.0: False)  # as on a machine without internet
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # train.py sets it; restore it afterwards
    t = time.time()
    with pytest.raises(SystemExit, match="cannot fetch it from the Hub") as e:
        run(["--device", "cpu", "--u", 1, "--tie", 196, "--out", tmp_path / "run"])
    assert "--model DIR" in str(e.value) and "--device cpu" in str(e.value)
    assert time.time() - t < 30


def test_off_policy_kl_and_other_loss_flags(tiny, tmp_path):
    """mu = 2 updates per batch (explicit pi_old), the k3 KL, seq-mean, Dr. GRPO, checkpointing, bf16 storage."""
    out = tmp_path / "run"
    flags = ["--mu", 2, "--kl", 0.1, "--agg", "seq-mean", "--no-std", "--grad-checkpointing", "--v-dtype", "bf16"]
    flags += ["--variant", "paper"]  # v starts at 0 (verl: at the official v₀ ~ 1e-5), so KL is 0 before a signal
    run(base_args(tiny, out, "--max-steps", 4, "--eval-limit", 1, *flags))
    steps = records(out)
    assert len(steps) == 4 and all(math.isfinite(r["loss"]) and r["kl"] >= 0 for r in steps)
    # v moves at the first step whose rewards differ within a group (its second update sees the moved v) and keeps
    # moving under Adam after it; before it the policy is the base model exactly
    first = next((i for i, r in enumerate(steps) if r["zero_var"] < 1), None)
    assert first is not None, "no step had a reward signal: the test cannot see v move"
    assert all(r["kl"] == 0 for r in steps[:first]) and all(r["kl"] > 0 for r in steps[first:])
    head = json.loads(open(out / "metrics.jsonl").readline())
    assert head["update_bytes"] == 4 * 2  # 4 parameters stored in bf16
