"""
dev/sweep.py: a 2-point grid on the tiny random checkpoint through real train.py processes (runs, skips finished runs,
resumes a run stopped at an earlier step), and its aggregation and data generator on hand-written inputs.
Run: python -m pytest -q tests/test_sweep.py
"""

import json
import re
import sys
from pathlib import Path

import pytest
from conftest import write_addition_data

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "dev"))
import sweep  # noqa: E402

FLAGS = {  # the smallest run train.py allows: 1 step of 2 prompts x G 2, 2 new tokens, 2 evaluation questions
    "device": "cpu", "G": 2, "prompts-per-step": 2, "epochs": 3, "max-steps": 1, "max-new-tokens": 2,
    "temperature": 1.0, "reward": "flexible", "prompt-style": "gsm8k", "eval-limit": 2, "eval-every": 0,
    "save-every": 1, "micro-batch": 8, "mini-batches": 1, "mu": 1, "kl": 0.0, "max-prompt-tokens": 0,
}  # fmt: skip


def tiny_grid(ckpt, data, **changes):
    grid = {"model": str(ckpt), "data": str(data), "flags": dict(FLAGS), "algos": ["grpo", "sft"]}
    grid |= {"sizes": [{"method": "tinylora", "u": 1, "tie": 14}], "lrs": {"tinylora": [0.05]}, "seeds": [0]}
    grid["flags"] |= changes.pop("flags", {})
    return grid | changes


def run_sweep(tmp, name, grid, out, monkeypatch):
    """sweep.main on a grid written to a JSON file; returns the train.py commands it launched."""
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(grid))
    calls, launch = [], sweep.launch

    def counting(cmd, run_dir):
        calls.append(cmd)
        return launch(cmd, run_dir)

    monkeypatch.setattr(sweep, "launch", counting)
    sweep.main(["--grid-json", str(path), "--out", str(out)])
    return calls


def metrics(run_dir):
    return [json.loads(line) for line in open(run_dir / "metrics.jsonl")]


@pytest.fixture(scope="module")
def swept(make_checkpoint, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    ckpt, data = make_checkpoint("qwen2"), write_addition_data(tmp / "data", n_train=24, n_test=4)
    out = tmp / "out"
    with pytest.MonkeyPatch.context() as mp:
        calls = run_sweep(tmp, "grid", tiny_grid(ckpt, data), out, mp)
    return tmp, ckpt, data, out, calls


def test_sweep_runs_each_point_and_writes_table_and_figure(swept):
    tmp, ckpt, data, out, calls = swept
    assert len(calls) == 2 and all("--resume" not in c for c in calls)
    rows = [json.loads(line) for line in open(out / "results.jsonl")]
    assert [r["algo"] for r in rows] == ["grpo", "sft"]
    assert all(r["done"] for r in rows), [open(out / "runs" / r["name"] / "train.log").read()[-2000:] for r in rows]
    for r in rows:
        # 2 layers x 7 modules all sharing one v of length 1: one fp32 number
        assert (r["params"], r["bytes"], r["method"], r["lr"], r["seed"]) == (1, 4, "tinylora", 0.05, 0)
        for p in ("base", "final"):
            assert r[f"{p}_n"] == 2
            assert r[f"{p}_accuracy_lo"] <= r[f"{p}_accuracy"] <= r[f"{p}_accuracy_hi"]
            assert {f"{p}_strict", f"{p}_flexible"} <= r.keys()  # GSM8K-style graders: every kind reported
        assert r["cpu_s"] > 0 and r["invocations"] == 1 and r["loss_first"] is not None
    assert rows[0]["reward_first"] is not None and rows[1]["reward_first"] is None  # SFT has no reward
    md = (out / "results.md").read_text()
    assert all(r["name"] in md for r in rows) and "| base acc | final acc | flips +/− (p) |" in md
    for r in rows:  # the paired counts agree with the two evaluations' accuracies on the same n questions
        assert r["flip_b"] - r["flip_c"] == round((r["final_accuracy"] - r["base_accuracy"]) * r["final_n"])
        assert 0 < r["flip_p"] <= 1 and r["final_mean_tokens"] <= 2 and 0 <= r["final_truncated"] <= 1
        assert r["final_seen"] >= r["final_flexible"]  # a sum graded right is a sum written
    assert (out / "figure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rerun_starts_no_train_process(swept, monkeypatch):
    tmp, ckpt, data, out, _ = swept
    before = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/metrics.jsonl")}
    monkeypatch.setattr(sweep, "known_flags", lambda: pytest.fail("train.py --help was run for a finished sweep"))
    assert run_sweep(tmp, "grid", tiny_grid(ckpt, data), out, monkeypatch) == []
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/metrics.jsonl")} == before and len(before) == 2


def test_run_stopped_at_an_earlier_step_is_resumed_not_restarted(swept, monkeypatch):
    # the grid now asks for 2 steps: the grpo run's state.pt at step 1 is what a kill after that checkpoint leaves
    tmp, ckpt, data, out, _ = swept
    run_dir = out / "runs" / "grpo-tinylora-u1-tie14-lr0.05-s0"
    old = metrics(run_dir)
    grid = tiny_grid(ckpt, data, algos=["grpo"], flags={"max-steps": 2})
    calls = run_sweep(tmp, "grid2", grid, out, monkeypatch)
    assert len(calls) == 1 and calls[0][2:4] == ["--resume", str(run_dir)]
    new = metrics(run_dir)
    assert new[: len(old)] == old  # the first step and its evaluations are kept, not run again
    assert [r["event"] for r in new].count("start") == 1
    assert [r["step"] for r in new if r["event"] == "eval"] == [0, 1, 2]
    (row,) = [json.loads(line) for line in open(out / "results.jsonl")]
    assert row["done"] and row["steps"] == 2 and row["last_step"] == 2 and row["invocations"] == 2


def test_state_of_a_run_folder(tmp_path):
    assert sweep.state(str(tmp_path / "none"), 3) == "new"
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"event": "eval", "step": 0}) + "\n")
    assert sweep.state(str(tmp_path), 3) == "new"  # killed before its first checkpoint: nothing to resume
    (tmp_path / "state.pt").write_bytes(b"")
    assert sweep.state(str(tmp_path), 3) == "resume"
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"event": "step", "step": 3}) + "\n")
    assert sweep.state(str(tmp_path), 3) == "resume"  # a step line is not the final evaluation
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"event": "eval", "step": 3}) + "\n")
    assert sweep.state(str(tmp_path), 3) == "done"


def row(algo, size, lr, seed, acc, done=True, nbytes=4):
    r = {"algo": algo, "size": size, "method": size.split("-")[0], "lr": lr, "seed": seed, "params": nbytes // 4}
    return r | {"bytes": nbytes, "final_accuracy": acc, "done": done}


def test_best_lr_by_mean_over_seeds_with_min_max_spread():
    rows = [
        row("grpo", "tinylora-u1", 1e-3, 0, 0.20), row("grpo", "tinylora-u1", 1e-3, 1, 0.60),  # mean 0.40
        row("grpo", "tinylora-u1", 1e-2, 0, 0.45), row("grpo", "tinylora-u1", 1e-2, 1, 0.50),  # mean 0.475: best
        row("grpo", "tinylora-u1", 1e-2, 2, 0.99, done=False),  # unfinished: not counted
        row("sft", "tinylora-u1", 1e-3, 0, 0.10), row("sft", "tinylora-u1", 1e-2, 0, 0.10),  # a tie: smaller lr
        row("grpo", "lora-r1", 1e-4, 0, 0.7, nbytes=400), row("grpo", "lora-r1", 1e-4, 1, 0.5, nbytes=400),
    ]  # fmt: skip
    best = sweep.best_lr(sweep.aggregate(rows))
    assert [(g["algo"], g["size"], g["lr"]) for g in best] == [
        ("grpo", "tinylora-u1", 1e-2), ("grpo", "lora-r1", 1e-4), ("sft", "tinylora-u1", 1e-3)
    ]  # fmt: skip
    g = best[0]
    assert (g["mean"], g["min"], g["max"], g["seeds"]) == (pytest.approx(0.475), 0.45, 0.50, [0, 1])
    assert (best[1]["mean"], best[1]["min"], best[1]["max"]) == (pytest.approx(0.6), 0.5, 0.7)
    assert sweep.first_last([0.0, 1.0, float("nan"), 2.0, 4.0], 2) == (0.5, 3.0)  # NaN (an SFT step) skipped


def test_mcnemar_exact_p_values():
    # textbook values: with b + c = n flips, p = 2 * P(Bin(n, 1/2) <= min(b, c)), at most 1
    assert sweep.mcnemar_p(0, 5) == 2 / 32 and sweep.mcnemar_p(5, 0) == 2 / 32
    assert sweep.mcnemar_p(1, 9) == pytest.approx(2 * (1 + 10) / 1024)
    assert sweep.mcnemar_p(3, 3) == 1.0 and sweep.mcnemar_p(0, 0) == 1.0
    assert sweep.mcnemar_p(20, 40) == pytest.approx(0.0134893, abs=1e-7)  # scipy.stats.binomtest(20, 60).pvalue


def test_flips_pair_the_same_questions(tmp_path):
    def write(step, correct, **kinds):  # kinds: e.g. flexible={"a": True, ...}, a grade beside `correct`
        (tmp_path / "eval").mkdir(exist_ok=True)
        with open(tmp_path / "eval" / f"step{step:06d}.jsonl", "w") as f:
            for i, c in correct.items():
                r = {"id": i, "correct": c, "gold": "12", "response": f"{i} 3 + 9 = 12, #### 1"}
                f.write(json.dumps(r | {k: v[i] for k, v in kinds.items()}) + "\n")

    write(0, {"a": False, "b": False, "c": True, "d": True, "e": False})
    write(3, {"e": True, "a": True, "b": False, "c": False, "d": True})  # another order: matched by id
    got = sweep.flips(str(tmp_path), 3)
    assert got == {"flip_b": 2, "flip_c": 1, "flip_p": 1.0, "base_seen": 1.0, "final_seen": 1.0}
    # graded as the accuracy is: the run's reward kind where the records carry it, else their `correct`
    write(0, {"a": False, "b": False}, flexible={"a": False, "b": True})
    write(3, {"a": False, "b": False}, flexible={"a": True, "b": True})
    assert sweep.flips(str(tmp_path), 3, "flexible")["flip_b"] == 1
    assert sweep.flips(str(tmp_path), 3, "strict")["flip_b"] == 0  # the records have no strict: `correct`
    write(3, {"a": True})
    with pytest.raises(ValueError, match="not on the same questions"):
        sweep.flips(str(tmp_path), 3)
    assert sweep.flips(str(tmp_path), 7)["flip_p"] is None  # no evaluation at that step


def test_gold_seen_matches_whole_numbers_only():
    assert sweep.gold_seen({"gold": "12", "response": "3 + 9 = 12. The answer is 1"})  # graded wrong, yet written
    assert not sweep.gold_seen({"gold": "12", "response": "112 and 120 and 1.2"})
    assert sweep.gold_seen({"gold": "1080", "response": "so 1,080 apples"})  # read as the flexible grader reads
    assert not sweep.gold_seen({"gold": "7", "response": "no digits"})
    assert not sweep.gold_seen({"gold": None, "response": "7"})


def test_make_data_is_the_additions_of_results_md(tmp_path):
    import data

    sweep.make_data(str(tmp_path))
    splits = {s: [json.loads(line) for line in open(tmp_path / f"{s}.jsonl")] for s in ("train", "test")}
    assert (len(splits["train"]), len(splits["test"])) == (228, 96)
    qs = [r["question"] for rs in splits.values() for r in rs]
    assert len(set(qs)) == 324
    for r in splits["train"] + splits["test"]:
        a, b = map(int, re.findall(r"\d+", r["question"]))
        assert 1 <= a <= 9 and 1 <= b <= 9 and r["answer"] == f"{a + b}\n#### {a + b}"
    ex = data.load_dataset(str(tmp_path), split="train")[0]  # read as GSM8K, with a reference for SFT
    assert data.reference_solution(ex) == f"{ex['gold']}\n#### {ex['gold']}" and ex["grader"] == "gsm8k"


def test_grid_names_and_commands_pass_every_setting():
    pts = sweep.points(sweep.GRIDS["smollm2-add"])
    names = [sweep.run_name(p) for p in pts]
    assert len(names) == len(set(names)) == 7 * 2 * 2 * 2  # sizes x algos x lrs x seeds
    known = set(sweep.ADD_FLAGS) | {"model", "data", "eval-data", "method", "u", "tie", "r", "algo", "lr", "seed"}
    cmd = sweep.train_command(sweep.GRIDS["smollm2-add"], pts[0], "RUN", "DATA", known | {"out"})
    for k, v in sweep.ADD_FLAGS.items():
        i = cmd.index(f"--{k}")
        assert float(cmd[i + 1]) == v if isinstance(v, (int, float)) else cmd[i + 1] == v
    cmd = sweep.train_command(sweep.GRIDS["smollm2-add"], pts[0], "RUN", "DATA", (known | {"out"}) - {"mu"})
    assert "--mu" not in cmd  # an optional flag this train.py lacks is left out
    with pytest.raises(SystemExit, match="--reward"):
        sweep.train_command(sweep.GRIDS["smollm2-add"], pts[0], "RUN", "DATA", (known | {"out"}) - {"reward"})
