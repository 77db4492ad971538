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

    def render(self, messages, add_generation_prompt=True):
        return "<user>" + messages[-1]["content"] + "<assistant>"

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if i not in (0, 1))


def scripted(answers: dict, calls: list):
    """A generate() that answers each prompt from `answers` (keyed by a question substring)."""
    from sample import Rollouts

    def generate(model, prompts, *, G=1, max_new_tokens=256, temperature=1.0, stop_ids=(), pad_id=0, **kw):
        calls.append(dict(n=len(prompts), G=G, temperature=temperature, max_new_tokens=max_new_tokens))
        texts = []
        for p in prompts:
            text = "".join(map(chr, p))
            texts.append(next(a for q, a in answers.items() if q in text))
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
    assert res["accuracy"] == res["strict"]  # --reward strict (the default) names the headline number
    assert (res["strict_lo"], res["strict_hi"]) == pytest.approx(ev.wilson(1, 3))
    assert [c["n"] for c in calls] == [2, 1] and all(c["temperature"] == 0.0 and c["G"] == 1 for c in calls)
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in recs] == [e["id"] for e in examples]  # dataset order, whatever the batching order
    assert [r["strict"] for r in recs] == [True, False, False]
    assert [r["flexible"] for r in recs] == [True, True, False]
    assert recs[0]["response"] == answers["apples"] and recs[0]["pred_strict"] == "7" and recs[0]["gold"] == "7"
    assert recs[0]["prompt"].startswith("<user>Ana has 3 apples") and recs[0]["finish"] == "stop"
    res = ev.evaluate(None, FakeTok(), examples, batch_size=8, max_new_tokens=64, reward="flexible",
                      generate=scripted(answers, []))  # fmt: skip
    assert res["accuracy"] == pytest.approx(2 / 3)


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


def test_end_to_end_greedy_matches_model_greedy(make_checkpoint, tmp_path, capsys):
    """eval.py through sample.generate in batches == model.greedy one prompt at a time (an independent decoder)."""
    from model import Tokenizer, greedy, load_model

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
    from model import Tokenizer, load_model

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
