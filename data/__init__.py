"""
The data layer: datasets, prompts, answer extraction and grading. It never touches the model.

    examples = load_dataset("gsm8k", split="train")          # data/load.py: Hub or local file, checked rows
    messages = build_messages(examples[0])                   # data/prompts.py: the user turn, per prompt style
    ids = tok.apply_chat_template(messages)                  # model.py renders the model's own chat template
    r = reward(examples[0], response, kind="strict")         # data/graders.py: 1.0 / 0.0
    g = grade(examples[0], response)                         # correct, strict, flexible, pred_strict, pred_flexible

Each file opens with its numbered list of choices; data/graders.py lists the grading decisions and the known
false positives of math-verify that it guards against.
"""

from data.graders import KINDS, extract_boxed, extract_flexible, extract_strict, grade, grade_many, reward
from data.load import DATASETS, load_dataset, reference_solution
from data.prompts import STYLES, build_messages

__all__ = [
    "DATASETS",
    "KINDS",
    "STYLES",
    "build_messages",
    "extract_boxed",
    "extract_flexible",
    "extract_strict",
    "grade",
    "grade_many",
    "load_dataset",
    "reference_solution",
    "reward",
]
