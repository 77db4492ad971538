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
from types import SimpleNamespace

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
    # --seed 1: the tiny model answers ~1.5% of samples right, and the tests below need a reward signal in their first
    # 4-6 steps; with sample.py's counter-based draws seed 0 gives none there
    return ["--device", "cpu", "--model", ckpt, "--data", data, "--out", str(out), "--G", "4",
            "--prompts-per-step", "4", "--max-new-tokens", "8", "--eval-limit", "4", "--eval-every", "0",
            "--micro-batch", "8", "--lr", "0.05", "--reward", "flexible", "--temperature", "1.5", "--seed", "1",
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
    assert (out / "peft" / "adapter_config.json").exists() == (method != "full")  # the PEFT copy, where there is one
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


LONGER = ("--max-new-tokens", 16)  # 8 random tokens rarely hold the answer: no reward, no gradient, a weak test


@pytest.fixture(scope="module")
def reference_run(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    run(base_args(tiny, out, "--max-steps", 6, "--save-every", 2, "--eval-every", 3, *LONGER))
    params = trained_params(out)
    assert any(p.abs().sum() > 0 for p in params), "the reference run did not learn anything: the test would be weak"
    return out


def test_resume_after_max_steps_matches_uninterrupted(tiny, tmp_path, reference_run):
    out = tmp_path / "run"
    run(base_args(tiny, out, "--max-steps", 4, "--save-every", 2, "--eval-every", 3, *LONGER))
    run(["--resume", out, "--max-steps", 6])
    same_runs(reference_run, out)


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_matches_uninterrupted(tiny, tmp_path, reference_run):
    out = tmp_path / "run"
    argv = [sys.executable, "train.py"] + [
        str(a) for a in base_args(tiny, out, "--max-steps", 6, "--save-every", 2, "--eval-every", 3, *LONGER)
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
        (["--mini-batches", 0], "--mini-batches must be a positive integer"),
        (["--mini-batches", 3], "--mini-batches 3 must divide the 4 prompts of a step"),
        (["--data", "no_such_dataset"], "unknown dataset 'no_such_dataset'"),
        (["--model", "/no/such/folder"], "no such folder"),
        (["--out", "/proc/version/run"], "cannot write there"),
        (["--report-to", "mlflow"], "--report-to mlflow: use wandb, tensorboard or both"),
        (["--warmup", 1], r"--warmup in \[0, 1\)"),
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
    import hub

    monkeypatch.setattr(hub, "hub_unreachable", lambda timeout=3.0: "no network")  # as on a machine without internet
    t = time.time()
    with pytest.raises(SystemExit, match="could not download 'Qwen/Qwen2.5-7B-Instruct/config.json': no network") as e:
        run(["--device", "cpu", "--u", 1, "--tie", 196, "--out", tmp_path / "run"])
    assert "--model DIR" in str(e.value) and "--device cpu" in str(e.value)
    assert time.time() - t < 30


def test_off_policy_kl_and_other_loss_flags(tiny, tmp_path):
    """mu = 2 updates per batch (explicit pi_old), the k3 KL, seq-mean, Dr. GRPO, checkpointing, bf16 storage."""
    out = tmp_path / "run"
    flags = ["--mu", 2, "--kl", 0.1, "--agg", "seq-mean", "--no-std", "--grad-checkpointing", "--v-dtype", "bf16"]
    flags += ["--variant", "paper"]  # v starts at 0 (verl: at the official v₀ ~ 1e-5), so KL is 0 before a signal
    run(base_args(tiny, out, "--max-steps", 4, "--eval-limit", 1, *flags, *LONGER))
    steps = records(out)
    assert len(steps) == 4 and all(math.isfinite(r["loss"]) and r["kl"] >= 0 for r in steps)
    # v moves at the first step whose rewards differ within a group (its second update sees the moved v) and keeps
    # moving under Adam after it; before it the policy is the base model exactly
    first = next((i for i, r in enumerate(steps) if r["zero_var"] < 1), None)
    assert first is not None, "no step had a reward signal: the test cannot see v move"
    assert all(r["kl"] == 0 for r in steps[:first]) and all(r["kl"] > 0 for r in steps[first:])
    head = json.loads(open(out / "metrics.jsonl").readline())
    assert head["update_bytes"] == 4 * 2  # 4 parameters stored in bf16


# -----------------------------------------------------------------------------
# the update schedule: --mini-batches K of whole groups, each used --mu times, pi_old fixed before the first


def schedule_setup(tiny, *flags):
    """A tiny model with a 2-parameter TinyLoRA, 8 toy rollouts (4 prompts x G 2) with a sampler that is a bit off,
    random advantages, and train.py's args for them."""
    from test_grpo import plain_logprobs, toy_rollouts

    import tinylora
    import train
    from model import load_model

    model = load_model(tiny[0], dtype=torch.float32)
    adapter = tinylora.attach(model, r=2, u=2, tie=14, seed=0)
    prompts, tokens, mask = toy_rollouts(model.cfg.vocab_size, seed=7, N=8)
    with torch.no_grad():
        s_lp = plain_logprobs(model, prompts, tokens, mask) + 0.1 * torch.randn(tokens.shape)
    ro = SimpleNamespace(prompts=prompts, tokens=tokens, mask=mask, logp=s_lp)
    adv = torch.randn(8, generator=torch.Generator().manual_seed(3))
    args = train.parse_args(
        [str(a) for a in ("--G", 2, "--prompts-per-step", 4, "--micro-batch", 3, "--micro-batch-tokens", 0, *flags)]
    )
    return model, adapter, ro, adv, args


def record_backward_calls(monkeypatch):
    import grpo

    calls, real = [], grpo.grpo_backward

    def spy(model, adapter, prompts, tokens, mask, adv, sampler_logp, **kw):
        calls.append({"prompts": prompts, "tokens": tokens, "old": kw["old_logp"], "n_tokens": kw["n_tokens"]})
        return real(model, adapter, prompts, tokens, mask, adv, sampler_logp, **kw)

    monkeypatch.setattr(grpo, "grpo_backward", spy)
    return calls


def test_one_mini_batch_one_update_is_the_plain_on_policy_backward(tiny, monkeypatch):
    """K = 1, mu = 1 (the MATH recipe's) is one grpo_backward over all rows, on-policy, normalised by the batch's
    counts: bit for bit the gradient of calling grpo.py directly."""
    import grpo
    import train

    model, adapter, ro, adv, args = schedule_setup(tiny, "--mini-batches", 1, "--eps-high", 0.2)
    updates, stats = train.grpo_updates(args, model, adapter, ro, adv, pad_id=0)
    assert len(updates) == 1
    updates[0]()
    got = [t.grad.clone() for t in adapter.params]
    for t in adapter.params:
        t.grad = None
    want_stats = grpo.grpo_backward(
        model, adapter, ro.prompts, ro.tokens, ro.mask, adv, ro.logp, pad_id=0, micro_batch=3,
        n_tokens=int(ro.mask.sum()), n_seqs=8, norm=args.max_new_tokens,
    )  # fmt: skip
    assert all(torch.equal(g, t.grad) for g, t in zip(got, adapter.params))
    assert any(g.abs().sum() > 0 for g in got)
    assert stats == [want_stats]


@pytest.mark.parametrize("mu", [1, 2])
def test_every_update_of_a_step_uses_the_pre_update_policy_as_pi_old(tiny, monkeypatch, mu):
    """K = 2 mini-batches: the second one's pi_old is the policy before the first update, not after it."""
    from test_grpo import plain_logprobs

    import train

    model, adapter, ro, adv, args = schedule_setup(tiny, "--mini-batches", 2, "--mu", mu)
    with torch.no_grad():
        before = plain_logprobs(model, ro.prompts, ro.tokens, ro.mask)  # the independent reference
    calls = record_backward_calls(monkeypatch)
    updates, _ = train.grpo_updates(args, model, adapter, ro, adv, pad_id=0)
    assert len(updates) == 2 * mu
    opt = torch.optim.Adam(adapter.params, lr=0.5)
    after_first = None
    for i, backward in enumerate(updates):
        opt.zero_grad()
        backward()
        opt.step()
        if i == 0:
            with torch.no_grad():
                after_first = plain_logprobs(model, ro.prompts, ro.tokens, ro.mask)
    halves = [[0, 1, 4, 5], [2, 3, 6, 7]]  # whole groups of G = 2: prompts 0, 2 | prompts 1, 3
    assert [c["prompts"] for c in calls] == [[ro.prompts[i] for i in h] for h in halves for _ in range(mu)]
    for c, h in zip(calls, [h for h in halves for _ in range(mu)]):
        assert torch.allclose(c["old"], before[h], atol=1e-5)
        assert c["n_tokens"] == int(ro.mask[h].sum())  # each update is normalised by its own mini-batch
    # the first update moved the policy: had pi_old been recomputed, the second mini-batch would see this
    second = halves[1]
    assert (after_first[second] - before[second]).abs().max() > 1e-3
    assert not torch.allclose(calls[mu]["old"], after_first[second], atol=1e-4)


def test_mini_batches_and_mu_end_to_end(tiny, tmp_path):
    """--mini-batches 2 --mu 2 through train.main: four optimiser steps a step, a finite log, v moves."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    counted = []
    handle = register_optimizer_step_post_hook(lambda opt, a, k: counted.append(1))
    try:
        out = tmp_path / "run"
        run(base_args(tiny, out, "--max-steps", 3, "--mini-batches", 2, "--mu", 2, "--eval-limit", 1))
    finally:
        handle.remove()
    steps = records(out)
    assert len(counted) == 3 * 4 and len(steps) == 3
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in steps)


# -----------------------------------------------------------------------------
# micro-batches by token budget, long prompts, evaluation off, the terminal header


def test_micro_batch_tokens_give_the_same_training(tiny, tmp_path):
    """SFT (always a gradient) with micro-batches of <= 40 padded tokens (each ~73-token row alone) instead of one
    micro-batch of all 4 rows: the same v, within fp32."""
    a, b = tmp_path / "rows", tmp_path / "tokens"
    run(base_args(tiny, a, "--algo", "sft", "--max-steps", 2, "--no-eval"))
    run(
        base_args(
            tiny, b, "--algo", "sft", "--max-steps", 2, "--no-eval", "--micro-batch", 0, "--micro-batch-tokens", 40
        )
    )
    pa, pb = trained_params(a), trained_params(b)
    assert any(p.abs().sum() > 0 for p in pa)
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(pa, pb))
    ra, rb = records(a), records(b)
    assert [r["loss"] for r in ra] == pytest.approx([r["loss"] for r in rb], rel=1e-5)


def test_max_prompt_tokens_drops_long_prompts_and_no_eval(tiny, tmp_path, capsys):
    import data
    from tokenizer import Tokenizer

    ckpt, short = tiny
    folder = tmp_path / "data"
    folder.mkdir()
    long_q = "How many apples does each student get if the teacher shares them equally between the children? " * 3
    rows = [json.loads(x) for x in open(Path(short) / "train.jsonl")]
    rows += [{"question": long_q + f"What is {i} plus 1?", "answer": f"#### {i + 1}"} for i in range(8)]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "test.jsonl").write_text(open(Path(short) / "test.jsonl").read())
    tok = Tokenizer(ckpt)
    n_tokens = [len(tok.apply_chat_template(data.build_messages({"question": r["question"]}))) for r in rows]
    limit = max(n_tokens[:24])
    assert min(n_tokens[24:]) > limit  # the 8 long prompts are the only ones over the limit
    out = tmp_path / "run"
    argv = base_args((ckpt, str(folder)), out, "--epochs", 0.5, "--max-prompt-tokens", limit, "--no-eval")
    run(argv)
    text = capsys.readouterr().out
    assert f"--max-prompt-tokens {limit}: dropped 8 of 32 training prompts" in text
    head = json.loads(open(out / "metrics.jsonl").readline())
    assert head["steps"] == 3  # floor(0.5 x 24 / 4), not floor(0.5 x 32 / 4)
    assert all(len(s["question"]) < len(long_q) for r in records(out) for s in r["samples"])
    assert records(out, "eval") == [] and not (out / "eval").exists()  # --no-eval: none at all
    # the terminal gets a short header; the settings go to the run folder
    assert f"every setting in {out / 'args.json'}" in text and '"eval_batch_size"' not in text
    assert json.load(open(out / "args.json"))["max_prompt_tokens"] == limit
    with pytest.raises(SystemExit, match=r"training set \(0 examples after --max-prompt-tokens\)"):
        run(base_args((ckpt, str(folder)), tmp_path / "run2", "--max-prompt-tokens", 1))


def test_mini_batches_are_whole_groups_and_the_same_on_any_number_of_ranks():
    import train

    assert train.mini_batch_rows(4, 2, 2) == [[0, 1, 4, 5], [2, 3, 6, 7]]  # prompts 0, 2 | 1, 3, G = 2 rows each
    assert train.mini_batch_rows(3, 4, 1) == [list(range(12))]  # K = 1: every row, in order
    B, G, K = 16, 4, 4
    one = [{i // G for i in rows} for rows in train.mini_batch_rows(B, G, K)]  # prompts of each mini-batch
    for N in (2, 4):  # rank r holds prompts [r B/N, (r+1) B/N) (train.py choice 9)
        S = B // N
        ranks = [[{r * S + i // G for i in rows} for rows in train.mini_batch_rows(S, G, K)] for r in range(N)]
        assert [set().union(*(ranks[r][k] for r in range(N))) for k in range(K)] == one


# -----------------------------------------------------------------------------
# recipes, the warm-up, the evaluation set, v at its storage precision, what a run leaves behind


def test_recipes_set_defaults_and_explicit_flags_win(capsys):
    import train

    g = train.parse_args([])
    assert (g.recipe, g.model, g.data, g.G, g.prompts_per_step, g.lr, g.warmup) == (
        "gsm8k", "Qwen/Qwen2.5-7B-Instruct", "gsm8k", 4, 64, 1e-5, 0.05,
    )  # fmt: skip
    assert (g.mini_batches, g.mu, g.eps_low, g.eps_high, g.kl, g.entropy_coef, g.tis_cap) == (2, 1, 0.2, 0.4, 0, 0, 2)
    assert (g.weight_decay, g.max_prompt_tokens, g.reward, g.epochs, g.temperature) == (0.01, 512, "official", 3, 1)
    m = train.parse_args(["--recipe", "math"])
    assert (m.data, m.G, m.prompts_per_step, m.kl, m.entropy_coef, m.mini_batches, m.eps_high) == (
        "math_train", 8, 256, 0.001, 0.001, 1, 0.2,
    )  # fmt: skip
    assert (m.max_prompt_tokens, m.prompt_style, m.lr, m.warmup) == (1024, "qwen-boxed", 5e-7, 0.0)
    assert m.max_new_tokens is None  # the task's: data.response_tokens, once the data is loaded
    o = train.parse_args(["--recipe", "math", "--G", "3", "--kl", "0", "--lr", "1e-3"])
    assert (o.G, o.kl, o.lr, o.prompts_per_step) == (3, 0.0, 1e-3, 256)
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    text = capsys.readouterr().out
    table = text[text.index("recipes (--recipe") :]
    assert "--entropy-coef" in table and "0.001" in table and "Qwen/Qwen2.5-Math-7B" in table


def test_lr_warmup_from_zero_counted_in_batches(tiny, tmp_path):
    import train

    # official: W = int(0.05 x 348) = 17 batches for GSM8K; lr(b) = lr b / W below W, from 0
    assert [train.lr_at(b, 1e-5, 17) for b in (0, 1, 16, 17, 300)] == pytest.approx(
        [0, 1e-5 / 17, 16e-5 / 17, 1e-5, 1e-5]
    )
    assert train.lr_at(0, 1e-5, 0) == 1e-5  # no warm-up: constant
    # 24 prompts / 4 = 6 batches an epoch x 3 epochs = 18; --warmup 0.5 -> W = 9, whatever --max-steps says
    out = tmp_path / "run"
    run(base_args(tiny, out, "--warmup", 0.5, "--max-steps", 3, "--no-eval", "--variant", "paper", *LONGER))
    steps = records(out)
    assert [r["lr"] for r in steps] == pytest.approx([0, 0.05 / 9, 0.1 / 9])
    assert steps[0]["v"] == [0.0] * 4  # lr 0: the first batch's two updates leave v at its start, 0


def test_eval_set_is_the_sibling_test_file_or_a_refusal(tiny, tmp_path, no_model_load):
    ckpt, folder = tiny
    with pytest.raises(AssertionError, match="the model was loaded"):  # got past every check: test.jsonl was found
        run(base_args(tiny, tmp_path / "a", "--data", Path(folder) / "train.jsonl"))
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "mine.jsonl").write_text((Path(folder) / "train.jsonl").read_text())
    with pytest.raises(SystemExit, match=r"evaluate on its own training file\. Add --eval-data FILE"):
        run(base_args(tiny, tmp_path / "b", "--data", alone / "mine.jsonl"))
    with pytest.raises(AssertionError, match="the model was loaded"):  # --eval-data or --no-eval settle it
        run(base_args(tiny, tmp_path / "c", "--data", alone / "mine.jsonl", "--no-eval"))


def test_sibling_test_file_is_what_the_run_evaluates(tiny, tmp_path):
    ckpt, folder = tiny
    out = tmp_path / "run"
    run(base_args(tiny, out, "--data", Path(folder) / "train.jsonl", "--max-steps", 1, "--eval-limit", 6))
    ids = [json.loads(line)["id"] for line in open(out / "eval" / "step000000.jsonl")]
    questions = [json.loads(line)["question"] for line in open(Path(folder) / "test.jsonl")]
    assert len(ids) == len(questions) == 6 and all("-test-" in i for i in ids)
    args = json.load(open(out / "args.json"))
    assert args["recipe"] == "gsm8k" and args["max_new_tokens"] == 8
    assert args["sources"]["model"] == {"id": ckpt, "revision": None, "sha": None}  # a local folder has no commit
    assert args["sources"]["data"]["id"] == str(Path(folder) / "train.jsonl")
    from export import read_adapter

    meta, _ = read_adapter(str(out / "adapter.safetensors"))
    assert "sources" in json.dumps(meta) and "gsm8k" in json.dumps(meta)


def test_evaluation_sees_v_rounded_to_storage_and_training_keeps_fp32(tiny, tmp_path, monkeypatch):
    import eval as evaluation
    import tinylora

    seen, real = [], evaluation.evaluate

    def spy(model, *a, **kw):
        mods = [m for m in model.modules() if isinstance(m, tinylora.TinyLoRALinear)]
        seen.append(torch.stack([m.v.detach().clone() for m in mods[:: len(mods) // 2]]))  # one module per group
        return real(model, *a, **kw)

    monkeypatch.setattr(evaluation, "evaluate", spy)
    runs = {}
    for dt in ("fp32", "bf16"):
        seen.clear()
        out = tmp_path / dt
        run(base_args(tiny, out, "--v-dtype", dt, "--max-steps", 3, "--eval-every", 1, "--eval-limit", 1, *LONGER))
        runs[dt] = (list(seen), trained_params(out), records(out))
    (e32, p32, r32), (e16, p16, r16) = runs["fp32"], runs["bf16"]
    assert [r["v"] for r in r32] == [r["v"] for r in r16]  # training is the same: it never saw the rounding
    assert all(torch.equal(a, b) for a, b in zip(p32, p16))
    assert any(a.abs().sum() > 0 for a in p32), "v never moved: the test would be weak"
    for a, b in zip(e32, e16):  # at each evaluation: bf16 storage saw the fp32 v rounded, fp32 saw it as is
        assert torch.equal(b, a.to(torch.bfloat16).float())
    assert any(not torch.equal(a, b) for a, b in zip(e32, e16)), "rounding changed nothing: the test would be weak"


def test_math_recipe_end_to_end_with_entropy_kl_and_its_system_turn(tiny, tmp_path):
    ckpt, _ = tiny
    folder = tmp_path / "math"
    folder.mkdir()
    for split, n in (("train", 8), ("test", 2)):
        rows = [{"problem": f"What is {i} plus 1?", "answer": str(i + 1)} for i in range(n)]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    run(["--recipe", "math", "--device", "cpu", "--model", ckpt, "--data", folder, "--out", out, "--G", 4,
         "--prompts-per-step", 4, "--max-new-tokens", 8, "--max-steps", 1, "--eval-every", 0, "--tie", 7])  # fmt: skip
    (step,) = records(out)
    assert step["entropy"] > 0 and step["kl"] == 0 and step["lr"] == 5e-7  # v = 0 at step 1: the base model
    prompt = json.loads(open(out / "eval" / "step000000.jsonl").readline())["prompt"]
    assert "system\nYou are a helpful assistant." in prompt and "\\boxed{}" in prompt
    args = json.load(open(out / "args.json"))
    assert (args["recipe"], args["G"], args["entropy_coef"], args["kl"], args["mini_batches"]) == (
        "math",
        4,
        1e-3,
        1e-3,
        1,
    )


def test_memory_plan_before_the_weights_and_a_refusal_when_it_cannot_fit(tiny, tmp_path, no_model_load, monkeypatch):
    import memory

    with pytest.raises(AssertionError, match="the model was loaded"):
        run(base_args(tiny, tmp_path / "a"))
    monkeypatch.setattr(memory, "free_memory", lambda device="cuda": 2**20)  # 1 MiB free: nothing fits
    with pytest.raises(SystemExit, match=r"memory: .*needs .* GiB .* but 0\.0 GiB are free") as e:
        run(base_args(tiny, tmp_path / "b"))
    assert "--" in str(e.value).split("free")[-1] or "more memory" in str(e.value)  # names what to change


def test_memory_plan_is_printed_and_auto_settings_are_recorded(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    run(base_args(tiny, out, "--max-steps", 1, "--no-eval"))
    text = capsys.readouterr().out
    assert text.index("memory plan:") < text.index("TRAINABLE PARAMETERS")  # printed before the weights load
    args = json.load(open(out / "args.json"))
    assert isinstance(args["micro_batch_tokens"], int) and args["micro_batch_tokens"] > 0  # auto, chosen
    assert args["grad_checkpointing"] is False  # a tiny model fits without recomputation


def test_system_prompt_and_enable_thinking_reach_every_prompt(tiny, tmp_path, monkeypatch):
    import tokenizer

    calls, real = [], tokenizer.Tokenizer.render

    def spy(self, messages, add_generation_prompt=True, **template_vars):
        calls.append((messages, template_vars))
        return real(self, messages, add_generation_prompt, **template_vars)

    monkeypatch.setattr(tokenizer.Tokenizer, "render", spy)
    out = tmp_path / "run"
    run(base_args(tiny, out, "--system-prompt", "Be brief.", "--enable-thinking", "--max-steps", 1, "--eval-limit", 2))
    assert len(calls) >= 24 + 2  # every training prompt (length filter, the step) and every evaluation prompt
    assert all(
        m[0] == {"role": "system", "content": "Be brief."} and kw == {"enable_thinking": True} for m, kw in calls
    )
    prompt = json.loads(open(out / "eval" / "step000000.jsonl").readline())["prompt"]
    assert prompt.startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_report_to_tensorboard_gets_the_steps_and_evaluations(tiny, tmp_path):
    pytest.importorskip("tensorboard")
    from test_report import tensorboard_scalars

    out = tmp_path / "run"
    run(base_args(tiny, out, "--report-to", "tensorboard", "--max-steps", 2, "--eval-every", 1))
    scalars, config = tensorboard_scalars(out / "tensorboard")
    assert [s for s, _ in scalars["reward"]] == [1, 2] and [s for s, _ in scalars["lr"]] == [1, 2]
    assert [s for s, _ in scalars["eval/accuracy"]] == [0, 1, 2]
    assert [v for _, v in scalars["reward"]] == pytest.approx([r["reward"] for r in records(out)])
    assert '"recipe": "gsm8k"' in config
