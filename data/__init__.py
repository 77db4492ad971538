"""
The data layer: datasets, prompts, answer extraction and grading. It never touches the model.

    examples = load_dataset("gsm8k", split="train")          # data/load.py: Hub or local file, checked rows
    examples = load_dataset("gsm8k", style="boxed")          # the style is stamped in: prompt and graders follow it
    messages = build_messages(examples[0])                   # data/prompts.py: the turns, per prompt style
    ids = tok.apply_chat_template(messages)                  # model.py renders the model's own chat template
    r = reward(examples[0], response, kind="official")       # data/graders.py: 1.0 / 0.0
    g = grade(examples[0], response)                         # correct, strict, flexible, official, pred_*
    suite = load_suite("math", path="../shared/data")        # {benchmark: examples} for the seven MATH sets

Each file opens with its numbered list of choices; data/graders.py lists the grading decisions and the known
false positives of math-verify that it guards against.
"""

from data.graders import (
    KINDS,
    extract_boxed,
    extract_flexible,
    extract_official,
    extract_strict,
    grade,
    grade_many,
    reward,
)
from data.load import (
    DATASETS,
    SUITES,
    default_eval_set,
    load_dataset,
    load_suite,
    reference_solution,
    response_tokens,
    with_style,
)
from data.prompts import BOXED, STYLES, SYSTEMS, build_messages

__all__ = [
    "BOXED",
    "DATASETS",
    "KINDS",
    "STYLES",
    "SUITES",
    "SYSTEMS",
    "build_messages",
    "default_eval_set",
    "extract_boxed",
    "extract_flexible",
    "extract_official",
    "extract_strict",
    "grade",
    "grade_many",
    "load_dataset",
    "load_suite",
    "reference_solution",
    "response_tokens",
    "reward",
    "with_style",
]
