"""
report.py: what --report-to writes, read back with each tool's own reader: TensorBoard event files through
tensorboard's EventAccumulator, a wandb offline run through its .wandb file (leveldb-log records of wandb's protobuf
schema). Needs `pip install tensorboard wandb` (requirements-test.txt); skips without them.

    python -m pytest -q tests/test_report.py
"""

import json
import struct
import sys

import pytest
import torch

from report import open_reporter

CONFIG = {"u": 1, "tie": 196, "lr": 2e-4, "model": "Qwen/Qwen2.5-7B-Instruct", "sources": {"model": {"sha": None}}}
ROWS = [  # metrics.jsonl step lines as train.py writes them: numbers, and things that are not
    {"event": "step", "step": s, "reward": r, "loss": -r / 2, "truncated": s == 2, "n_tokens": 100 * s,
     "grad_norm": torch.tensor(0.5 * s), "v": [0.1 * s], "samples": [{"question": "q", "completion": "c"}]}
    for s, r in ((1, 0.25), (2, 0.5), (3, 0.625))
]  # fmt: skip
NUMBERS = {"reward", "loss", "truncated", "n_tokens", "grad_norm"}


def expected(key: str) -> list:
    return [(row["step"], float(row[key])) for row in ROWS]


def tensorboard_scalars(folder) -> tuple[dict, str]:
    """{tag: [(step, value)]} and the config text, read by tensorboard itself."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    scalars = {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}
    text = acc.Tensors("config/text_summary")[-1].tensor_proto.string_val[0].decode()
    return scalars, text


def test_tensorboard_holds_the_scalars_and_the_config(tmp_path):
    pytest.importorskip("tensorboard")
    rep = open_reporter("tensorboard", str(tmp_path), CONFIG, "tinylora-u1-tie196")
    for row in ROWS:
        rep.log(row["step"], row)
    rep.log(3, {"event": "eval", "step": 3, "strict": 0.4, "n": 50, "name": "gsm8k"}, prefix="eval/")
    rep.close()
    scalars, text = tensorboard_scalars(tmp_path / "tensorboard")
    assert set(scalars) == NUMBERS | {"eval/strict", "eval/n"}  # no v, samples, event, step, strings
    for key in NUMBERS:
        assert scalars[key] == pytest.approx(expected(key)), key
    assert scalars["eval/strict"] == [(3, pytest.approx(0.4))]
    assert json.loads(text.split("```")[1]) == {"run_name": "tinylora-u1-tie196", **CONFIG}


def test_tensorboard_resume_replaces_the_steps_after_the_checkpoint(tmp_path):
    """A run that logged steps 1-3, crashed, and resumed from its checkpoint at step 1 shows each step once."""
    pytest.importorskip("tensorboard")
    rep = open_reporter("tensorboard", str(tmp_path), CONFIG, "r")
    for row in ROWS:
        rep.log(row["step"], row)
    rep.close()
    rep = open_reporter("tensorboard", str(tmp_path), CONFIG, "r", start_step=1)
    for row in ROWS[1:]:
        rep.log(row["step"], {"reward": row["reward"] + 1})
    rep.close()
    scalars, _ = tensorboard_scalars(tmp_path / "tensorboard")
    assert scalars["reward"] == pytest.approx([(1, 0.25), (2, 1.5), (3, 1.625)])


def wandb_records(path) -> list:
    """A .wandb file's records: a 7-byte header, then 32 KiB blocks of (crc, length, type) chunks (leveldb's log)."""
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    assert data[:4] == b":W&B", "not a wandb run file"
    pos, buf, out = 7, b"", []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or kind == 0:  # the rest of a block is padding
            pos += left
            continue
        buf, pos = buf + data[pos + 7 : pos + 7 + n], pos + 7 + n
        if kind in (1, 4):  # a whole record, or the last chunk of one
            out.append(wandb_internal_pb2.Record.FromString(buf))
            buf = b""
    return out


def test_wandb_offline_run_and_tensorboard_together(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    pytest.importorskip("tensorboard")
    for k, v in dict(
        WANDB_MODE="offline", WANDB_DIR=str(tmp_path / "wb"), WANDB_CONSOLE="off", WANDB_SILENT="true"
    ).items():
        monkeypatch.setenv(k, v)
    (tmp_path / "wb").mkdir()
    run_dir = tmp_path / "run"
    rep = open_reporter("wandb, tensorboard", str(run_dir), CONFIG, "tinylora-u1-tie196")
    for row in ROWS:
        rep.log(row["step"], row)
    rep.close()
    assert (run_dir / "tensorboard").is_dir()

    run_id = (run_dir / "wandb-id").read_text()
    (folder,) = (tmp_path / "wb" / "wandb").glob(f"offline-run-*-{run_id}")
    records = wandb_records(folder / f"run-{run_id}.wandb")
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    config = {u.key: json.loads(u.value_json) for u in run.config.update if u.key != "_wandb"}
    assert run.display_name == "tinylora-u1-tie196" and run.project == "tinylora" and config == CONFIG
    history = [
        {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    assert [h["_step"] for h in history] == [1, 2, 3]
    for key in NUMBERS:
        assert [(h["_step"], h[key]) for h in history] == pytest.approx(expected(key)), key
    assert not {"v", "samples", "event", "step"} & set(history[0])

    # resuming continues the same wandb run
    rep = open_reporter("wandb", str(run_dir), CONFIG, "tinylora-u1-tie196", start_step=3)
    rep.log(4, {"reward": 0.75})
    rep.close()
    assert (run_dir / "wandb-id").read_text() == run_id


@pytest.mark.parametrize("kind", ["wandb", "tensorboard"])
def test_missing_package_says_pip_install(tmp_path, monkeypatch, kind):
    monkeypatch.setitem(sys.modules, kind, None)  # import fails as if it were not installed
    with pytest.raises(SystemExit, match=f"pip install {kind}"):
        open_reporter(kind, str(tmp_path), CONFIG, "r")


def test_no_reporter_and_unknown_kinds(tmp_path):
    for kind in (None, "", "none"):
        rep = open_reporter(kind, str(tmp_path / "run"), CONFIG, "r")
        rep.log(1, ROWS[0])
        rep.close()
        assert rep.sinks == [] and not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="unknown mlflow; use wandb, tensorboard or both"):
        open_reporter("tensorboard,mlflow", str(tmp_path), CONFIG, "r")
