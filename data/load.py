"""
Datasets: GSM8K, the SimpleRL MATH training set and the MATH evaluation suite, from the Hub or a local file.

    load_dataset("gsm8k", split="test")                        # the Hub (openai/gsm8k, config main), parquet
    load_dataset("math500", path="../shared/data/math500/test.jsonl")   # a named set from a local file
    load_dataset("my_rows.jsonl")                              # any local .jsonl / .json / .parquet file
    load_dataset("gsm8k", style="boxed")                       # every example asks for, and is graded from, a box
    load_suite("math", path="../shared/data")                  # the paper's seven MATH benchmarks, one folder each

Every example is a dict: id, dataset, split, question, gold (a string), grader ("gsm8k" | "math"), style (the
prompt style, see data/prompts.py), solution (the reference solution or None; `reference_solution(ex)`).

Choices, each marked *ref* (what the dataset's own evaluation does) or *ours*:
1. GSM8K gold = the number after the last `####` of `answer`, commas removed (*ref*).
2. Each MATH-style set has its own gold rule (*ref*, see ../shared/data/README.md): MATH500 / SimpleRL, GAOKAO 2023
   and CollegeMath use `answer` (the `$...$` delimiters removed, as SimpleRL's parser does for the last two);
   Minerva has no answer field, so the gold is the last \\boxed{} of `solution`; OlympiadBench's `final_answer` is a
   list with one string of `$...$` parts, so the gold is that string without the `$` ("$69$,$84$" -> "69,84");
   AIME answers keep their leading zeros ("025") and AMC answers are floats (27.0 -> "27") -- the grader compares
   plain numbers as numbers.
3. Field names differ between mirrors of the same set (*ours*): the question is the first of `problem`, `question`;
   the gold the first of `answer`, `final_answer`, `gt_answer`, `ground_truth`, else the last \\boxed{} of
   `solution`. A row whose answer field is empty (2 of MATH train, 2 of GAOKAO 2023) is skipped with a note.
   The Hub ids below could not be downloaded from this offline machine; openai/gsm8k, HuggingFaceH4/MATH-500 and
   the GAOKAO / CollegeMath folders were checked on their dataset cards. If one moved, download the file yourself
   and pass it with --data.
4. Every row is checked when loading (*ours*): a malformed line (with its line number), a row without a question or
   a gold, an unknown name are a ValueError before any model loads. Downloads fail fast when offline
   (HF_HUB_OFFLINE is respected, and an unreachable Hub is detected with one short connection attempt instead of
   huggingface_hub's retries).
5. `limit` keeps the first N rows in file order, so a limited run is a prefix of the full run (*ours*).
6. `style` is stamped into every example (*ours*), so the prompt (data/prompts.py) and the graders that depend on
   the format (data/graders.py) always read the same style; None keeps each set's default: "gsm8k" for GSM8K,
   "qwen-boxed" for MATH-style sets (*official*: the paper's MATH prompt, SimpleRL's qwen-boxed).
7. Training's response length is a property of the task (*official*: 3,072 tokens in the paper's MATH scripts, 4,096
   in its 8-GPU GSM8K script and train.py's default; its 1-4 GPU GSM8K examples use 1,024), so an evaluation can
   default to the length the model was trained to answer in.
8. The MATH suite is the paper's seven MATH benchmarks (*paper*; the SimpleRL harness's names): MATH500, Minerva,
   OlympiadBench, AIME24, AMC23, GAOKAO 2023 (en), CollegeMath. A local copy is one folder per benchmark, named as
   here, each holding test.jsonl (like ../shared/data).
"""

import json
import os
import re
import sys
from dataclasses import dataclass

from data.graders import extract_boxed, to_number
from data.prompts import check_style


@dataclass(frozen=True)
class Source:
    repo: str  # Hub dataset id
    files: dict  # split -> file inside the repo
    grader: str  # "gsm8k" | "math"
    style: str  # default prompt style (data/prompts.py)
    eval_set: str | None = None  # the set a model trained on this one is evaluated on by default


DATASETS = {
    "gsm8k": Source(
        "openai/gsm8k",
        {"train": "main/train-00000-of-00001.parquet", "test": "main/test-00000-of-00001.parquet"},
        "gsm8k",
        "gsm8k",
        eval_set="gsm8k",
    ),
    "math_train": Source(  # MATH levels 3-5, SimpleRL-Zoo's "hard" training set
        "hkust-nlp/SimpleRL-Zoo-Data",
        {"train": "simplelr_qwen_level3to5/train.parquet"},
        "math",
        "qwen-boxed",
        eval_set="math500",
    ),
    "math500": Source("HuggingFaceH4/MATH-500", {"test": "test.jsonl"}, "math", "qwen-boxed"),
    "minerva_math": Source("math-ai/minervamath", {"test": "test.jsonl"}, "math", "qwen-boxed"),
    "olympiadbench": Source("math-ai/olympiadbench", {"test": "test.jsonl"}, "math", "qwen-boxed"),
    "aime24": Source("math-ai/aime24", {"test": "test-00000-of-00001.parquet"}, "math", "qwen-boxed"),
    "amc23": Source("math-ai/amc23", {"test": "test-00000-of-00001.parquet"}, "math", "qwen-boxed"),
    # HuggingFaceTB/math_tasks mirrors the Qwen2.5-Math evaluation data (SimpleRL's copy too): its card's file tree
    # lists data/gaokao2023en/ and data/college_math/; the file name test.jsonl is that of its sibling folders, not
    # seen itself. Alternatives: MARIO-Math-Reasoning/Gaokao2023-Math-En (Gaokao2023-Math-En.jsonl, 140 kB, the
    # size of our local copy), qq8933/College_Math_Test (college-math-test.jsonl, 1.19 MB, likewise).
    "gaokao2023en": Source("HuggingFaceTB/math_tasks", {"test": "data/gaokao2023en/test.jsonl"}, "math", "qwen-boxed"),
    "college_math": Source("HuggingFaceTB/math_tasks", {"test": "data/college_math/test.jsonl"}, "math", "qwen-boxed"),
}
SUITES = {  # choice 8, in the order of the official harness's benchmark list (official: eval_math_nodes.sh)
    "math": ("math500", "minerva_math", "gaokao2023en", "olympiadbench", "college_math", "aime24", "amc23"),
}
RESPONSE_TOKENS = {"gsm8k": 4096, "math": 3072}  # grader -> training's max response length (choice 7)
QUESTION_FIELDS = ("problem", "question")
GOLD_FIELDS = ("answer", "final_answer", "gt_answer", "ground_truth")
EXTENSIONS = (".jsonl", ".json", ".parquet")


# -----------------------------------------------------------------------------
# reading files


def read_rows(path: str) -> list[tuple[int, dict]]:
    """(line number or row number, row dict) for each row of a .jsonl / .json / .parquet file."""
    if not os.path.isfile(path):
        raise ValueError(f"data file {path!r} does not exist: pass an existing .jsonl, .json or .parquet file")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:
            raise ValueError(f"{path} is not a readable parquet file ({type(e).__name__}: {e})") from None
        return list(enumerate(rows, 1))
    if ext == ".json":
        try:
            rows = json.load(open(path, encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {e.lineno} is not valid JSON: {e.msg}") from None
        if not isinstance(rows, list):
            raise ValueError(f"{path} must hold a JSON list of objects (one per example), not a {type(rows).__name__}")
        return list(enumerate(rows, 1))
    if ext == ".jsonl":
        out = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue  # blank lines (a trailing newline) are not rows
                try:
                    out.append((n, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path} line {n} is not valid JSON ({e.msg}): {line[:80]!r}") from None
        return out
    raise ValueError(f"data file {path!r} has an unknown extension: expected one of {', '.join(EXTENSIONS)}")


def hub_file(name: str, split: str, revision: str | None = None) -> str:
    """The local copy of `name`/`split` at `revision` (default: main), downloaded or from the local Hub cache when
    offline; model.snapshot_sha(path) is the commit it came from. Fails fast, saying what to do (model.hub_download)."""
    from model import hub_download

    src = DATASETS[name]
    fname = src.files[split]
    then = f"pass --data DIR/{fname} (or a copy you have, e.g. ../shared/data/{name}/{split}.jsonl)"
    return hub_download(src.repo, revision, filename=fname, repo_type="dataset", then=then)[0]


# -----------------------------------------------------------------------------
# gold answers (choice 2)


def gsm8k_gold(row: dict) -> str | None:
    answer = row.get("answer")
    if not isinstance(answer, str) or "####" not in answer:
        return None
    n = to_number(answer.rsplit("####", 1)[1])
    if n is None:
        return None
    return str(n.numerator) if n.denominator == 1 else str(float(n))


def math_gold(row: dict) -> str | None:
    for k in GOLD_FIELDS:
        v = row.get(k)
        if isinstance(v, list):  # OlympiadBench: ["$69$,$84$"]
            v = v[0] if len(v) == 1 else ",".join(map(str, v))
        if isinstance(v, bool) or v is None:
            continue
        if isinstance(v, float):  # AMC: 27.0 -> "27"
            v = str(int(v)) if v.is_integer() else repr(v)
        v = re.sub(r"(?<!\\)\$", "", str(v)).strip()  # math delimiters go; an escaped dollar sign "\$36" stays
        if v:
            return v
    solution = row.get("solution")
    if isinstance(solution, list):  # OlympiadBench keeps a list of solutions
        solution = solution[-1] if solution else None
    return extract_boxed(solution) if isinstance(solution, str) else None


def solution_text(row: dict, grader: str) -> str | None:
    """The reference solution (for SFT baselines): GSM8K's answer without its <<48/2=24>> calculator notes,
    or MATH's `solution`; None when the row has none."""
    if grader == "gsm8k":
        return re.sub(r"<<[^<>]*>>", "", row["answer"])
    sol = row.get("solution")
    if isinstance(sol, list):
        sol = sol[0] if sol else None
    return sol if isinstance(sol, str) and sol.strip() else None


def reference_solution(example: dict) -> str:
    """The example's worked solution, ending in its answer in the format its prompt style asks for."""
    if not example.get("solution"):
        raise ValueError(f"example {example.get('id')} has no reference solution (its file has no solution field)")
    return example["solution"]


def looks_like_gsm8k(rows) -> bool:
    return bool(rows) and all(isinstance(r, dict) and "####" in str(r.get("answer", "")) for _, r in rows[:20])


# -----------------------------------------------------------------------------
# the public loader


def check_limit(limit):
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")


def resolve(name_or_path: str, split: str, path: str | None) -> tuple[str | None, str]:
    """(dataset name or None, local file) for a name, a name + path, a file, or a folder holding {split}.jsonl."""
    name = name_or_path if name_or_path in DATASETS else None
    if name is None and path is None:
        path = name_or_path
        if not os.path.exists(path):
            raise ValueError(
                f"unknown dataset {name_or_path!r}: use one of {', '.join(DATASETS)} or a path to a "
                f".jsonl/.json/.parquet file"
            )
    if name is not None and path is None:
        if split not in DATASETS[name].files:
            raise ValueError(f"dataset {name!r} has no split {split!r}: it has {', '.join(DATASETS[name].files)}")
        return name, hub_file(name, split)
    if os.path.isdir(path):  # a folder like ../shared/data/gsm8k: take {split}.jsonl / .parquet inside it
        for ext in EXTENSIONS:
            if os.path.isfile(os.path.join(path, split + ext)):
                return name, os.path.join(path, split + ext)
        raise ValueError(f"folder {path!r} has no {split}.jsonl, {split}.json or {split}.parquet")
    return name, path


def with_style(examples: list, style: str | None) -> list:
    """The examples with their prompt style replaced (choice 6); None leaves them as they are."""
    return examples if style is None else [{**ex, "style": check_style(style)} for ex in examples]


def load_dataset(
    name_or_path: str, split: str = "test", limit: int | None = None, path: str | None = None, style: str | None = None
) -> list:
    """The examples of a named dataset (from the Hub, or from `path`) or of a local file, checked row by row; `style`
    (a data/prompts.py style) is stamped into every example, so prompting and grading follow it (choice 6)."""
    check_limit(limit)
    if style is not None:
        check_style(style)  # before any download
    name, file = resolve(name_or_path, split, path)
    rows = read_rows(file)
    if name is not None:
        grader, default_style = DATASETS[name].grader, DATASETS[name].style
    else:  # an unnamed file: GSM8K if its answers carry `####`, else MATH-style
        grader = "gsm8k" if looks_like_gsm8k(rows) else "math"
        default_style = "gsm8k" if grader == "gsm8k" else "qwen-boxed"
        stem = os.path.splitext(os.path.basename(file))[0]  # ../shared/data/math500/test.jsonl -> "math500"
        name = os.path.basename(os.path.dirname(os.path.abspath(file))) if stem in ("train", "test") else stem
        split = stem if stem in ("train", "test") else split
    examples, skipped = [], []
    for n, row in rows:
        where = f"{file} row {n}" if file.endswith(".parquet") else f"{file} line {n}"
        if not isinstance(row, dict):
            raise ValueError(f"{where} is a {type(row).__name__}, not an object with a question and an answer")
        question = next((row[k] for k in QUESTION_FIELDS if isinstance(row.get(k), str) and row[k].strip()), None)
        gold = gsm8k_gold(row) if grader == "gsm8k" else math_gold(row)
        if question is not None and gold is None and grader == "math" and any(k in row for k in GOLD_FIELDS):
            skipped.append(n)  # an answer field that is empty (2 rows of MATH train): nothing to grade against
            continue
        if question is None or gold is None:
            need = (
                "'question' and an 'answer' ending in '#### N'"
                if grader == "gsm8k"
                else f"one of {QUESTION_FIELDS} and one of {GOLD_FIELDS} (or a 'solution' with a \\boxed{{}} answer)"
            )
            raise ValueError(f"{where} has fields {sorted(row)}; a {name} row needs {need}")
        examples.append(
            dict(
                id=f"{name}-{split}-{len(examples)}",
                dataset=name,
                split=split,
                question=question,
                gold=gold,
                grader=grader,
                style=style or default_style,
                solution=solution_text(row, grader),
            )
        )
    if skipped:
        print(f"{file}: skipped {len(skipped)} rows with an empty answer (lines {skipped[:10]})", file=sys.stderr)
    if not examples:
        raise ValueError(f"{file} holds no examples")
    return examples[:limit] if limit is not None else examples


def load_suite(suite: str, path: str | None = None, limit: int | None = None, style: str | None = None) -> dict:
    """{benchmark: examples} for a suite (choice 8), from the Hub or from `path`, a folder with one subfolder per
    benchmark; every benchmark is checked before any model loads."""
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}: expected one of {', '.join(SUITES)}")
    if path is not None and not os.path.isdir(path):
        raise ValueError(f"--data for a suite must be a folder holding one subfolder per benchmark, got {path!r}")
    out = {}
    for name in SUITES[suite]:
        sub = None if path is None else os.path.join(path, name)
        if sub is not None and not os.path.isdir(sub):
            raise ValueError(f"{path!r} has no folder {name!r}: a suite folder holds {', '.join(SUITES[suite])}")
        out[name] = load_dataset(name, split="test", limit=limit, path=sub, style=style)
    return out


def default_eval_set(train_name: str) -> tuple[str, str]:
    """(dataset, split) to evaluate a model trained on `train_name` on: math_train -> math500, gsm8k -> gsm8k test;
    anything else (e.g. a local file) -> its own test split."""
    src = DATASETS.get(train_name)
    return (src.eval_set if src is not None and src.eval_set else train_name), "test"


def response_tokens(examples) -> int:
    """Training's response length for these examples' task (choice 7): 4,096 for GSM8K, 3,072 for MATH-style sets."""
    return max((RESPONSE_TOKENS[ex.get("grader", "math")] for ex in examples), default=max(RESPONSE_TOKENS.values()))
