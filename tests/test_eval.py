"""
eval.py: Wilson intervals against published values, evaluate() with a scripted generator (exact accuracies and
records), bad input rejected before any model loads, and an end-to-end run on a tiny checkpoint whose greedy
responses must equal model.py's single-prompt greedy decoder.
Run: python -m pytest -q tests/test_eval.py   (CPU, no network)
"""

import json
from pathlib import Path

import pytest
import torch
from conftest import SUITE_FIXTURES

import data
import eval as ev

FIX = Path(__file__).parent / "fixtures"


# -----------------------------------------------------------------------------
# Wilson score interval


def test_wilson_matches_published_values():
    # Wilson (1927) / Newcombe (1998) Table I, 95%: 5/10 -> (0.2366, 0.7634); 0/10 -> (0, 0.2775); 81/263 -> ...
    lo, hi = ev.wilson(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    lo, hi = ev.wilson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = ev.wilson(10, 10)
    assert lo == pytest.approx(0.7225, abs=1e-4) and hi == 1.0
    lo, hi = ev.wilson(81, 263)  # Newcombe's example: 0.2553 to 0.3662
    assert lo == pytest.approx(0.2553, abs=1e-4) and hi == pytest.approx(0.3662, abs=1e-4)


# -----------------------------------------------------------------------------
# evaluate() with a scripted generator


class FakeTok:
    """Characters as token ids: enough to check that evaluate renders, batches, decodes and grades correctly."""

    stop_ids = [0]
    pad_id = 1

    def __init__(self):
        self.template_vars = []  # what each render received besides the messages

    def render(self, messages, add_generation_prompt=True, **template_vars):
        self.template_vars.append(template_vars)
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if i not in (0, 1))


def scripted(answers: dict, calls: list):
    """A generate() that answers each prompt from `answers` (keyed by a question substring)."""
    from sample import Rollouts

    def generate(model, prompts, *, G=1, max_new_tokens=256, temperature=1.0, stop_ids=(), pad_id=0, **kw):
        calls.append(dict(n=len(prompts), G=G, temperature=temperature, max_new_tokens=max_new_tokens, **kw))
        texts = []
        for p in prompts:
            text = "".join(map(chr, p))
            hits = [a for q, a in answers.items() if q in text]
            assert len(hits) == 1, (text, hits)  # each scripted key names exactly one question
            texts.append(hits[0])
        ids = [[ord(c) for c in t][:max_new_tokens] for t in texts]
        T = max(len(i) for i in ids) + 1
        tokens = torch.full((len(ids), T), pad_id)
        mask = torch.zeros(len(ids), T, dtype=torch.bool)
        finish = []
        for r, i in enumerate(ids):
            stop = len(i) < max_new_tokens
            row = i + ([stop_ids[0]] if stop else [])
            tokens[r, : len(row)] = torch.tensor(row)
            mask[r, : len(row)] = True
            finish.append("stop" if stop else "length")
        return Rollouts(
            prompts=[list(p) for p in prompts], tokens=tokens, mask=mask, logp=torch.zeros(tokens.shape), finish=finish
        )

    return generate


def test_evaluate_gsm8k_counts_and_records(tmp_path):
    examples = data.load_dataset("gsm8k", path=str(FIX / "gsm8k_mini.jsonl"))  # golds 7, 2080, -3
    answers = {
        "apples": "3 + 4 = 7\n#### 7",  # strict and flexible
        "pens": "2,000 + 80 = 2,080 pens",  # flexible only
        "temperature": "#### 3",  # wrong
    }
    calls = []
    out = tmp_path / "records.jsonl"
    res = ev.evaluate(
        None, FakeTok(), examples, batch_size=2, max_new_tokens=64, out_path=str(out), generate=scripted(answers, calls)
    )
    assert res["n"] == 3
    assert res["strict"] == pytest.approx(1 / 3) and res["flexible"] == pytest.approx(2 / 3)
    assert res["official"] == pytest.approx(1 / 3) and res["official_lo"] == pytest.approx(ev.wilson(1, 3)[0])
    assert res["accuracy"] == res["strict"]  # --reward strict (the default) names the headline number
    printed = ev.report(res, "gsm8k")
    assert all(k in printed for k in ("strict", "flexible", "official", "33.3%", "66.7%"))
    assert (res["strict_lo"], res["strict_hi"]) == pytest.approx(ev.wilson(1, 3))
    assert [c["n"] for c in calls] == [2, 1] and all(c["temperature"] == 0.0 and c["G"] == 1 for c in calls)
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in recs] == [e["id"] for e in examples]  # dataset order, whatever the batching order
    assert [r["strict"] for r in recs] == [True, False, False]
    assert [r["flexible"] for r in recs] == [True, True, False]
    assert [r["official"] for r in recs] == [True, False, False] and recs[0]["pred_official"] == "7"
    assert recs[0]["response"] == answers["apples"] and recs[0]["pred_strict"] == "7" and recs[0]["gold"] == "7"
    assert recs[0]["prompt"].startswith("<user>Ana has 3 apples") and recs[0]["finish"] == "stop"
    res = ev.evaluate(None, FakeTok(), examples, batch_size=8, max_new_tokens=64, reward="flexible",
                      generate=scripted(answers, []))  # fmt: skip
    assert res["accuracy"] == pytest.approx(2 / 3)
    res = ev.evaluate(None, FakeTok(), examples, batch_size=8, max_new_tokens=64, reward="official",
                      generate=scripted(answers, []))  # fmt: skip
    assert res["accuracy"] == pytest.approx(1 / 3)


def test_official_reward_differs_from_strict_on_a_long_check():
    """The official scorer sees only the last 300 characters: an answer followed by a long re-check scores 0 there."""
    examples = data.load_dataset("gsm8k", path=str(FIX / "gsm8k_mini.jsonl"), limit=1)  # gold 7
    answer = "3 + 4 = 7\n#### 7\n" + "Checking: three plus four is seven, as computed above. " * 8
    res = ev.evaluate(None, FakeTok(), examples, max_new_tokens=1000, generate=scripted({"apples": answer}, []),
                      progress=False)  # fmt: skip
    assert (res["strict"], res["flexible"], res["official"]) == (1.0, 1.0, 0.0)  # the check holds no other number


def test_max_new_tokens_defaults_to_the_training_response_length():
    gsm = data.load_dataset("gsm8k", path=str(FIX / "gsm8k_mini.jsonl"), limit=1)
    calls = []
    ev.evaluate(None, FakeTok(), gsm, generate=scripted({"apples": "#### 7"}, calls), progress=False)
    math = data.load_dataset("math500", path=str(FIX / "math_mini.jsonl"), limit=1)
    ev.evaluate(None, FakeTok(), math, generate=scripted({"lowest": "\\boxed{1/2}"}, calls), progress=False)
    assert [c["max_new_tokens"] for c in calls] == [4096, 3072]  # the paper's response lengths, not 512


def test_system_prompt_and_template_vars_reach_the_template():
    math = data.load_dataset("math500", path=str(FIX / "math_mini.jsonl"), limit=1)
    tok, seen = FakeTok(), []

    def gen(model, prompts, **kw):
        seen.append("".join(map(chr, prompts[0])))
        return scripted({"lowest": "\\boxed{1/2}"}, [])(model, prompts, **kw)

    ev.evaluate(None, tok, math, generate=gen, progress=False)
    assert seen[-1].startswith("<system>You are a helpful assistant.<user>")  # qwen-boxed's own system turn
    ev.evaluate(None, tok, math, system="Think in French.", template_vars={"enable_thinking": False},
                generate=gen, progress=False)  # fmt: skip
    assert seen[-1].startswith("<system>Think in French.<user>") and "helpful" not in seen[-1]
    assert tok.template_vars[-1] == {"enable_thinking": False}


def test_evaluate_math_and_truncation(tmp_path):
    examples = data.load_dataset("math500", path=str(FIX / "math_mini.jsonl"))  # 1/2, (2, 4), east
    answers = {"lowest terms": "\\boxed{\\dfrac12}", "point": "\\boxed{(4, 2)}", "sun": "x" * 100}
    res = ev.evaluate(None, FakeTok(), examples, batch_size=3, max_new_tokens=50, generate=scripted(answers, []))
    assert res["accuracy"] == pytest.approx(1 / 3) and "strict" not in res
    assert res["truncated"] == pytest.approx(1 / 3)  # the 100-character answer hit the 50-token limit


def test_evaluate_prompt_style_changes_prompt_and_grading():
    examples = data.load_dataset("gsm8k", path=str(FIX / "gsm8k_mini.jsonl"), limit=1)
    seen = []

    def gen(model, prompts, **kw):
        seen.append("".join(map(chr, prompts[0])))
        return scripted({"apples": "so \\boxed{7}"}, [])(model, prompts, **kw)

    res = ev.evaluate(None, FakeTok(), examples, batch_size=1, max_new_tokens=64, style="boxed", generate=gen)
    assert "\\boxed{}" in seen[0] and res["strict"] == 1.0  # boxed prompt -> strict reads the box
    boxed = data.load_dataset("gsm8k", path=str(FIX / "gsm8k_mini.jsonl"), limit=1, style="boxed")  # the loader's way
    res = ev.evaluate(None, FakeTok(), boxed, batch_size=1, max_new_tokens=64, generate=gen)
    assert "\\boxed{}" in seen[-1] and res["strict"] == 1.0 and res["official"] == 1.0


# -----------------------------------------------------------------------------
# the MATH suite: seven benchmarks, one table

SUITE_ANSWERS = {  # a scripted model: key (a substring of one question) -> its response; verdicts decided by hand
    "lowest terms": "\\boxed{\\frac12}",  # math500: right
    "point": "\\boxed{(2,4)}",  # right
    "sun rise": "\\boxed{\\text{west}}",  # wrong -> 2/3
    "erg/s": "\\boxed{4.5\\times10^{33}}",  # minerva: right
    "as a number": "\\boxed{6}",  # wrong -> 1/2
    "Find all pairs": "\\boxed{69, 84}",  # olympiad: right
    "ratio": "\\boxed{\\frac{1}{2}}",  # right -> 2/2
    "remainder": "\\boxed{25}",  # aime: right
    "100 + 4": "x" * 100,  # cut at the token limit: wrong -> 1/2, half truncated
    "20 + 7": "\\boxed{27}",  # amc: right
    "2 - 3": "\\boxed{-1}",  # right
    "1/2 + 1/4": "\\boxed{0.5}",  # wrong -> 2/3
    "M \\cap N": "I am not sure.",  # gaokao: wrong
    "angle C": "\\boxed{\\frac{\\pi}{3}}",  # right
    "80 written": "\\boxed{80}",  # right -> 2/3
    "Simplify": "\\boxed{10-4n}",  # college: right
    "Solve the system": "\\boxed{(45,2)}",  # wrong (one of two solutions)
    "ticket": "\\boxed{\\$4}",  # right
    "7 - 10": "\\boxed{-3}",  # right -> 3/4
}
SUITE_RIGHT = {"math500": (2, 3), "minerva_math": (1, 2), "olympiadbench": (2, 2), "aime24": (1, 2),
               "amc23": (2, 3), "gaokao2023en": (2, 3), "college_math": (3, 4)}  # fmt: skip


def suite_folder(tmp_path) -> Path:
    for name, file in SUITE_FIXTURES.items():
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "test.jsonl").write_text((FIX / file).read_text())
    return tmp_path


def test_evaluate_suite_table(tmp_path):
    suite = data.load_suite("math", path=str(suite_folder(tmp_path / "data")))
    calls = []
    res = ev.evaluate_suite(None, FakeTok(), suite, out_dir=str(tmp_path / "out"), max_new_tokens=50,
                            generate=scripted(SUITE_ANSWERS, calls), progress=False)  # fmt: skip
    for name, (k, n) in SUITE_RIGHT.items():
        assert (res[name]["n"], res[name]["accuracy"]) == (n, pytest.approx(k / n)), name
        assert (res[name]["accuracy_lo"], res[name]["accuracy_hi"]) == pytest.approx(ev.wilson(k, n))
        assert len((tmp_path / "out" / f"{name}.jsonl").read_text().splitlines()) == n
    assert res["aime24"]["truncated"] == 0.5 and res["math500"]["truncated"] == 0.0
    K, N = sum(k for k, _ in SUITE_RIGHT.values()), sum(n for _, n in SUITE_RIGHT.values())
    assert (K, N) == (13, 19)
    assert res["weighted"]["accuracy"] == pytest.approx(13 / 19)
    assert (res["weighted"]["accuracy_lo"], res["weighted"]["accuracy_hi"]) == pytest.approx(ev.wilson(13, 19))
    assert res["weighted"]["truncated"] == pytest.approx(1 / 19)
    assert res["unweighted"]["accuracy"] == pytest.approx(sum(k / n for k, n in SUITE_RIGHT.values()) / 7)
    table = ev.suite_table(res, "math suite")
    rows = table.splitlines()
    assert rows[0] == "math suite" and "accuracy" in rows[1]
    for name, (k, n) in SUITE_RIGHT.items():
        row = next(r for r in rows if r.startswith(name + " "))
        lo, hi = ev.wilson(k, n)
        assert f"{100 * k / n:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]" in row and f" {n} " in row
    assert "68.4%" in next(r for r in rows if r.startswith("weighted avg"))  # 13/19
    assert next(r for r in rows if r.startswith("aime24")).split()[-2] == "50.0%"  # truncated column
    assert any(r.startswith("unweighted avg") and "7 sets" in r for r in rows)
    assert all(c["temperature"] == 0.0 and c["max_new_tokens"] == 50 for c in calls)


def test_official_sampling_flag():
    args = ev.parse_args(["--model", "m", "--suite", "math", "--sampling", "official"])
    assert (args.temperature, args.top_p, args.max_new_tokens) == (1.0, 0.95, 16000)  # the paper's eval_sweep.py
    args = ev.parse_args(["--model", "m", "--suite", "math", "--sampling", "official", "--max-new-tokens", "64"])
    assert args.max_new_tokens == 64
    args = ev.parse_args(["--model", "m", "--dataset", "gsm8k"])
    assert (args.temperature, args.top_p, args.max_new_tokens, args.sampling) == (0.0, 1.0, None, "greedy")
    assert args.enable_thinking is None and args.system_prompt is None
    args = ev.parse_args(["--model", "m", "--dataset", "gsm8k", "--no-enable-thinking", "--system-prompt", "Hi."])
    assert args.enable_thinking is False and args.system_prompt == "Hi."
    calls = []
    ex = data.load_dataset("gsm8k", path=str(FIX / "gsm8k_mini.jsonl"), limit=1)
    gen = scripted({"apples": "#### 7"}, calls)
    ev.evaluate(None, FakeTok(), ex, temperature=1.0, top_p=0.95, seed=0, generate=gen, progress=False)
    assert calls[0]["top_p"] == 0.95 and calls[0]["temperature"] == 1.0


# -----------------------------------------------------------------------------
# the command line: bad input fails before any model loads


def run_main(argv, capsys):
    with pytest.raises(SystemExit) as e:
        ev.main(argv)
    return str(e.value.code) + capsys.readouterr().err


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--dataset", "gsm9k"], "unknown dataset 'gsm9k'"),
        (["--dataset", "gsm8k", "--data", "/nonexistent.jsonl"], "does not exist"),
        (["--dataset", "gsm8k", "--data", "BAD_LINE"], "line 2 is not valid JSON"),
        (["--dataset", "gsm8k", "--data", "NO_ANSWER"], "line 1 has fields"),
        (["--dataset", "gsm8k", "--data", str(FIX / "gsm8k_mini.jsonl"), "--limit", "0"], "--limit"),
        (["--dataset", "gsm8k", "--data", str(FIX / "gsm8k_mini.jsonl"), "--limit", "ten"], "--limit"),
        (["--dataset", "gsm8k", "--data", str(FIX / "gsm8k_mini.jsonl"), "--adapter", "/no/adapter"], "adapter"),
        (["--dataset", "gsm8k", "--data", str(FIX / "gsm8k_mini.jsonl"), "--temperature", "-1"], "temperature"),
        (["--dataset", "gsm8k", "--data", str(FIX / "gsm8k_mini.jsonl"), "--top-p", "0"], "top-p"),
        (["--dataset", "gsm8k", "--data", str(FIX / "gsm8k_mini.jsonl"), "--prompt", "fancy"], "invalid choice"),
        (["--suite", "math", "--data", "/nonexistent"], "must be a folder"),
        (["--suite", "math", "--data", str(FIX)], "has no folder 'math500'"),
        (["--suite", "physics"], "invalid choice"),
        (["--suite", "math", "--dataset", "gsm8k"], "not allowed with"),
        ([], "one of the arguments --dataset --suite is required"),
    ],
)
def test_cli_bad_input_before_model_load(extra, message, tmp_path, capsys, monkeypatch):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "#### 1"}\n{"question": \n')
    noans = tmp_path / "noans.jsonl"
    noans.write_text('{"question": "q"}\n')
    extra = [{"BAD_LINE": str(bad), "NO_ANSWER": str(noans)}.get(a, a) for a in extra]

    def no_model(*a, **k):
        raise AssertionError("the model must not load on bad input")

    import model

    monkeypatch.setattr(model, "load_model", no_model)
    out = run_main(["--model", str(tmp_path / "no-model")] + extra, capsys)
    assert message in out


# -----------------------------------------------------------------------------
# end to end on a tiny checkpoint


def test_end_to_end_suite(make_checkpoint, tmp_path, capsys):
    """--suite math through the real loader, chat template, sampler and graders: one table with seven rows."""
    ckpt = str(make_checkpoint("qwen2"))
    root = suite_folder(tmp_path / "data")
    argv = ["--model", ckpt, "--suite", "math", "--data", str(root), "--limit", "1", "--max-new-tokens", "3"]
    argv += ["--out", str(tmp_path / "out"), "--device", "cpu", "--system-prompt", "Be terse.", "--batch-size", "1"]
    res = ev.main(argv + ["--no-enable-thinking"])
    printed = capsys.readouterr().out
    assert all(any(r.startswith(name + " ") for r in printed.splitlines()) for name in SUITE_FIXTURES)
    assert "weighted avg" in printed and "unweighted avg" in printed
    assert res["weighted"]["n"] == 7 and all(res[name]["mean_tokens"] <= 3 for name in SUITE_FIXTURES)
    rec = json.loads((tmp_path / "out" / "college_math.jsonl").read_text().splitlines()[0])
    assert rec["prompt"].startswith("<|im_start|>system\nBe terse.<|im_end|>") and "\\boxed{}" in rec["prompt"]


def test_end_to_end_greedy_matches_model_greedy(make_checkpoint, tmp_path, capsys):
    """eval.py through sample.generate in batches == model.greedy one prompt at a time (an independent decoder)."""
    from model import greedy, load_model
    from tokenizer import Tokenizer

    ckpt = str(make_checkpoint("qwen2"))
    out = tmp_path / "eval.jsonl"
    argv = ["--model", ckpt, "--dataset", "gsm8k", "--data", str(FIX / "gsm8k_mini.jsonl"), "--limit", "3"]
    res = ev.main(argv + ["--batch-size", "2", "--max-new-tokens", "6", "--out", str(out), "--device", "cpu"])
    printed = capsys.readouterr().out
    assert "strict" in printed and "flexible" in printed and "%" in printed
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(recs) == 3 and res["n"] == 3
    assert res["strict"] == pytest.approx(sum(r["strict"] for r in recs) / 3)
    model, tok = load_model(ckpt, device="cpu"), Tokenizer(ckpt)
    examples = data.load_dataset("gsm8k", path=str(FIX / "gsm8k_mini.jsonl"), limit=3)
    for ex, r in zip(examples, recs):
        ids = tok.apply_chat_template(data.build_messages(ex))
        assert r["prompt"] == tok.render(data.build_messages(ex))
        assert r["response"] == tok.decode(greedy(model, ids, 6, tok.stop_ids))
        assert r["n_tokens"] <= 6


def test_end_to_end_with_adapter_file(make_checkpoint, tmp_path, capsys):
    """--adapter FILE gives the same responses as evaluating the adapted model in-process (tinylora contract)."""
    tinylora = pytest.importorskip("tinylora")
    from model import load_model
    from tokenizer import Tokenizer

    ckpt = str(make_checkpoint("qwen2"))
    model, tok = load_model(ckpt, device="cpu"), Tokenizer(ckpt)
    examples = data.load_dataset("gsm8k", path=str(FIX / "gsm8k_mini.jsonl"))
    ids = torch.tensor([tok.apply_chat_template(data.build_messages(examples[0]))])
    base_logits = model(ids)
    adapter = tinylora.attach(model, u=1, tie=1, seed=0)
    with torch.no_grad():
        for p in adapter.params:
            p.fill_(0.5)
    assert not torch.allclose(model(ids), base_logits)  # the adapter really changes the network
    path = str(tmp_path / "adapter.safetensors")
    adapter.save(path)
    want = tmp_path / "in_process.jsonl"
    ev.evaluate(model, tok, examples, batch_size=3, max_new_tokens=6, out_path=str(want), progress=False)
    got = tmp_path / "cli.jsonl"
    argv = ["--model", ckpt, "--adapter", path, "--dataset", "gsm8k", "--data", str(FIX / "gsm8k_mini.jsonl")]
    ev.main(argv + ["--batch-size", "3", "--max-new-tokens", "6", "--out", str(got), "--device", "cpu"])
    responses = lambda f: [json.loads(line)["response"] for line in f.read_text().splitlines()]  # noqa: E731
    assert responses(got) == responses(want)
