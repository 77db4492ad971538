"""
train.py under torchrun (CPU, gloo): two ranks give the same v as one process with the same global batch, and a
dead or hung rank stops the job with a clear error that --resume recovers from.
Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_dist.py   (~2-3 min on 2 CPU cores)

Each run goes through a small wrapper that registers a global optimizer-step hook: after every update it appends
the rank's trainable tensors to DUMP/rank{RANK}.jsonl, so the test watches every rank from outside train.py, and
it can make one rank die (SIGKILL) or hang at a chosen update.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import write_addition_data

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

WRAPPER = """
import json, os, signal, sys, time
sys.path.insert(0, {root!r})
from torch.optim.optimizer import register_optimizer_step_post_hook
import train

rank, updates = int(os.environ.get("RANK", 0)), 0

def after_step(opt, args, kwargs):
    global updates
    updates += 1
    v = [x for g in opt.param_groups for t in g["params"] for x in t.detach().flatten().tolist()]
    with open(os.path.join(os.environ["DUMP"], f"rank{{rank}}.jsonl"), "a") as f:
        f.write(json.dumps({{"pid": os.getpid(), "update": updates, "v": v}}) + "\\n")
    if os.environ.get("FAIL_RANK") == str(rank) and updates == int(os.environ["FAIL_AT"]):
        if os.environ["FAIL_HOW"] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(3600)  # hung: alive, but never reaches the next collective

register_optimizer_step_post_hook(after_step)
train.main(sys.argv[1:])
"""


def write_data(folder: Path) -> Path:
    return write_addition_data(folder, seed=1, n_train=16, n_test=5)


@pytest.fixture(scope="module")
def setup(make_checkpoint, tmp_path_factory):
    base = tmp_path_factory.mktemp("dist")
    wrapper = base / "wrapper.py"
    wrapper.write_text(WRAPPER.format(root=str(ROOT)))
    return {"ckpt": str(make_checkpoint("qwen2")), "data": str(write_data(base / "data")), "wrapper": str(wrapper)}


def train_argv(setup, out, *extra):
    # temperature 1 (the paper's), 4 prompts x G 4 per step, sampled 2 prompts per call: one call per rank with 2
    # ranks, two calls with 1, so both runs draw the same noise (train.py choice 9); --seed 1 gives a reward signal in
    # the first step (the tiny model answers few additions; with sample.py's counter-based draws seed 0 gives none);
    # --mini-batches 1: one update a step, so update k is step k
    return ["--device", "cpu", "--model", setup["ckpt"], "--data", setup["data"], "--out", str(out), "--G", "4",
            "--prompts-per-step", "4", "--sample-batch", "2", "--max-new-tokens", "16", "--temperature", "1.0",
            "--eval-limit", "3", "--eval-every", "0", "--micro-batch", "8", "--lr", "0.05", "--reward", "flexible",
            "--u", "2", "--tie", "7", "--max-steps", "4", "--save-every", "2", "--mini-batches", "1",
            "--dist-timeout", "20", "--seed", "1", *extra]  # fmt: skip


def launch(setup, dump, argv, nproc=None, fail=None, timeout=240):
    """python wrapper.py ARGV, or torchrun with nproc ranks; fail = (rank, update, "kill" | "hang")."""
    dump.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "DUMP": str(dump), "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    if fail:
        env |= {"FAIL_RANK": str(fail[0]), "FAIL_AT": str(fail[1]), "FAIL_HOW": fail[2]}
    cmd = [sys.executable, setup["wrapper"], *argv]
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *cmd[1:]]
    t = time.time()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return r, time.time() - t


def updates(dump, rank):
    return [json.loads(line) for line in open(dump / f"rank{rank}.jsonl")]


def step_records(out):
    return [r for r in map(json.loads, open(out / "metrics.jsonl")) if r.get("event") == "step"]


@pytest.fixture(scope="module")
def runs(setup, tmp_path_factory):
    """The same 4-step job in one process and on two gloo ranks."""
    base = tmp_path_factory.mktemp("runs")
    one = base / "one"
    r1, _ = launch(setup, one / "dump", train_argv(setup, one / "run"))
    assert r1.returncode == 0, r1.stderr[-3000:]
    two = base / "two"
    r2, _ = launch(setup, two / "dump", train_argv(setup, two / "run"), nproc=2)
    assert r2.returncode == 0, r2.stderr[-3000:]
    return one, two


def test_two_ranks_match_each_other_and_one_process(runs):
    one, two = runs
    single, rank0, rank1 = updates(one / "dump", 0), updates(two / "dump", 0), updates(two / "dump", 1)
    assert [u["update"] for u in single] == [u["update"] for u in rank0] == [u["update"] for u in rank1] == [1, 2, 3, 4]
    assert rank0[0]["pid"] != rank1[0]["pid"]  # really two processes
    for a, b, c in zip(single, rank0, rank1):
        assert a["v"] == pytest.approx(b["v"], rel=1e-5, abs=1e-6), a["update"]  # = one process, within fp32
        assert b["v"] == c["v"], b["update"]  # the ranks agree bit for bit after every update
    assert max(abs(x) for x in single[-1]["v"]) > 1e-3, "v never moved: the comparison would be vacuous"
    # the logged metrics are the global batch's, so they agree too (sums over ranks, not rank 0's share)
    s1, s2 = step_records(one / "run"), step_records(two / "run")
    for a, b in zip(s1, s2):
        assert a["samples"] == b["samples"] and a["n_tokens"] == b["n_tokens"]  # the same draws (choice 9)
        for k in ("reward", "length", "zero_var", "loss", "grad_norm"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), (a["step"], k)
    assert s1[0]["n_tokens"] > 16  # the count covers all 16 completions (each has at least one token)
    # the sharded evaluation gathers every example once, in the dataset's order
    e1, e2 = ([json.loads(x) for x in open(d / "run" / "eval" / "step000004.jsonl")] for d in (one, two))
    assert [r["id"] for r in e1] == [r["id"] for r in e2] and len(e2) == 3
    assert [r["response"] for r in e1] == [r["response"] for r in e2]
    checkpoint = torch.load(two / "run" / "state.pt", weights_only=False)
    assert torch.cat([t.flatten() for t in checkpoint["params"]]).tolist() == rank0[-1]["v"]


def test_killed_rank_stops_the_job_and_resume_continues(setup, runs, tmp_path):
    _, two = runs
    out, dump = tmp_path / "run", tmp_path / "dump"
    # rank 1 dies (SIGKILL) right after update 3: the checkpoint of step 2 is the last one
    r, took = launch(setup, dump, train_argv(setup, out), nproc=2, fail=(1, 3, "kill"))
    assert r.returncode != 0 and took < 120
    assert "SIGKILL" in r.stderr or "Signal 9" in r.stderr, r.stderr[-3000:]
    assert torch.load(out / "state.pt", weights_only=False)["step"] == 2
    # resume on two ranks: both load the step-2 checkpoint, run steps 3 and 4, and end where the unbroken run did
    r, _ = launch(setup, tmp_path / "dump2", ["--resume", str(out)], nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed {out} at step 2/4" in r.stdout
    assert [x["step"] for x in step_records(out)] == [1, 2, 3, 4]
    done, ref = updates(tmp_path / "dump2", 1), updates(two / "dump", 1)
    assert [u["v"] for u in done] == [u["v"] for u in ref[2:]]


def test_hung_rank_times_out_with_a_clear_error(setup, tmp_path):
    out = tmp_path / "run"
    r, took = launch(
        setup, tmp_path / "dump", train_argv(setup, out, "--dist-timeout", "5"), nproc=2, fail=(1, 1, "hang")
    )
    assert r.returncode != 0
    assert took < 90  # the 5 s timeout, not the hour rank 1 sleeps
    err = r.stderr
    assert "rank 0:" in err and "failed" in err and "--dist-timeout" in err and "--resume RUN_DIR" in err, err[-3000:]


def test_prompts_must_split_evenly_over_ranks(setup, tmp_path):
    argv = train_argv(setup, tmp_path / "run", "--prompts-per-step", "3", "--sample-batch", "0")
    r, _ = launch(setup, tmp_path / "dump", argv, nproc=2)
    assert r.returncode != 0 and "--prompts-per-step 3 does not split evenly over 2 ranks" in r.stderr
    assert not (tmp_path / "dump").joinpath("rank0.jsonl").exists()  # stopped before any training


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_torchrun_without_a_gpu_explains_instead_of_crashing(setup, tmp_path):
    argv = [a for a in train_argv(setup, tmp_path / "run") if a not in ("--device", "cpu")]  # GPU by default
    r, _ = launch(setup, tmp_path / "dump", argv, nproc=2)
    assert r.returncode != 0 and "No CUDA GPU found" in r.stderr and "--device cpu" in r.stderr, r.stderr[-2000:]


def test_mini_batches_two_ranks_match_one_process(setup, tmp_path):
    """--mini-batches 2 --mu 2 (four updates a step, pi_old fixed before the first): mini-batch k is the same set
    of prompts on one process and on two ranks, so every update agrees too."""
    # 8 prompts, 4 a rank; seed 1 gives the first mini-batch a reward signal, so a split that differed between one
    # process and two ranks (e.g. contiguous halves of each rank's share) would show at the first update
    extra = ("--prompts-per-step", "8", "--mini-batches", "2", "--mu", "2", "--max-steps", "2", "--seed", "1")
    r1, _ = launch(setup, tmp_path / "one", train_argv(setup, tmp_path / "run1", *extra))
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2, _ = launch(setup, tmp_path / "two", train_argv(setup, tmp_path / "run2", *extra), nproc=2)
    assert r2.returncode == 0, r2.stderr[-3000:]
    single, rank0, rank1 = (updates(tmp_path / d, r) for d, r in (("one", 0), ("two", 0), ("two", 1)))
    assert [u["update"] for u in single] == [u["update"] for u in rank0] == list(range(1, 9))
    for a, b, c in zip(single, rank0, rank1):
        assert a["v"] == pytest.approx(b["v"], rel=1e-5, abs=1e-6), a["update"]
        assert b["v"] == c["v"], b["update"]
    assert any(x != 0 for x in single[0]["v"]), "the first mini-batch had no signal: the test would not bite"
