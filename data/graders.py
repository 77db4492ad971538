"""
Answer extraction and grading: the whole learning signal of RLVR, so every choice is written down here.

    reward(example, response) = 1.0 if the response's final answer equals the gold answer else 0.0

Two graders. GSM8K golds are integers, so GSM8K answers are compared as exact rational numbers. MATH-style golds
are LaTeX, so the last \\boxed{...} is compared by Hugging Face's math-verify (sympy), run in a child process
under a time limit.

Choices, each marked *ref* (what a common reference scorer does), *official* (what the paper's training code, a verl
fork, does) or *ours*:
1. GSM8K *strict*: the number right after a `####` marker, anywhere in the response (*ref*: lm-eval's strict-match).
   When there are several markers we take the LAST one, the answer the model ended on (*ours*; lm-eval takes the
   first). We do not clip the search to the end of the response (*ours*). Between the marker and the number we allow
   spaces, `$`, `\\$`, `**`, `\\(`, `\\boxed{`; anything else (e.g. "#### The answer is 5") is no strict answer.
1b. GSM8K *official*: the paper's reward exactly as its code scores it (*official*: verl/utils/reward_score/gsm8k.py,
   method "strict", score 1, format_score 0): only the last 300 characters of the response are searched; in them,
   every `#### ` (one space) followed by a run of digits, `.` and `,` (optionally after `-`) is a candidate; the LAST
   one is taken, its commas removed, and compared as a STRING with the gold (commas removed). So "#### 18." or
   "#### 18.00" score 0 for gold 18, "####18" and "#### $18" are no answer, and a marker more than 300 characters
   before the end is not seen. A wrong answer and no answer both score 0. Under a boxed prompt style (choice 4) the
   same window and comparison read the last \\boxed{} in the window, whose content must be such a run (*ours*).
2. GSM8K *flexible*: the last number anywhere in the response (*ref*: lm-eval's flexible-extract). A `\\boxed{18}`
   with no `####` scores under flexible only.
3. Numbers are normalised before comparing (*ours*): thousands commas ("1,080"), a leading `$`, a trailing ".",
   "18.00" = "18", "−5" (unicode minus) = "-5"; then compared as exact fractions, never as floats. A minus sign
   counts only when it does not follow a digit, letter or ")" ("10-5" ends in 5, not -5).
4. If the prompt asked for \\boxed{} (style "boxed" or "qwen-boxed", data/prompts.py BOXED), GSM8K *strict* and
   *official* read the last \\boxed{} instead of `####`, and its content must be a single number (*ours*: a grader
   that depends on the format reads the format the prompt asked for; flexible does not depend on it).
5. MATH: the LAST `\\boxed{...}` or `\\fbox{...}` (nested braces matched; `\\boxed 5` without braces also read)
   (*ref*: Qwen2.5-Math / SimpleRL). An unterminated last `\\boxed{` (a truncated response) is no answer; we do
   not fall back to an earlier box (*ours*).
6. MATH equivalence is math-verify's `verify(gold, pred)`, gold first (*ref*), after two fast paths (*ours*): plain
   decimal numbers on both sides are compared as exact fractions ("025" = "25", AMC's "27.0" = "27"), and equal
   strings are equal. Scientific "4.5e33" is rewritten "4.5\\times10^{33}" on both sides, because math-verify reads
   the `e` as Euler's number.
7. Time limit (*ours*): math-verify's own timeouts use signal.alarm, which only works in the main thread, so they
   are disabled (parsing_timeout=None, timeout_seconds=None) and each comparison runs in a long-lived child process
   (`python data/verify_worker.py`) that is killed and restarted when it runs past VERIFY_TIMEOUT_S. Cost: ~1 s to
   start a worker (imports sympy), one pipe round trip per comparison, and a restart after each timeout; a timed-out
   comparison scores 0. Works from any thread; up to MAX_WORKERS children grade in parallel (`grade_many`).
   Results are cached per (gold, pred) string pair, since GRPO groups repeat answers.
8. Known math-verify false positives we guard against (*ours*; probed with math-verify 0.9.0):
   - Ordered pairs lose their order when the answer is a bare list: gold "(3,-2)" accepts "-2, 3" (read as the
     set {-2, 3}). Guard: when the gold is bracketed ("(a,b)", "[a,b)") and the answer is an unbracketed comma list,
     the answer is wrapped in parentheses before parsing, so order (and open/closed ends) count.
   - "4.5e33" is parsed as 4.5·e·33 (see 6), which can make wrong answers equal. Guard: the rewrite in 6.
   Known leniencies we keep (documented, not guarded): a percent sign is optional on either side (gold "5" accepts
   "5\\%", gold "18\\%" accepts "18", gold "0.5" accepts "50\\%"); "x = 5" equals "5"; a one-element set "\\{2\\}"
   equals "2"; numbers are equal after rounding to 6 decimals ("1.6" = "1.6000001", "\\pi" = "3.14159265");
   "\\text{(C)}" equals "c". Probed and NOT a problem in 0.9.0: a bare number that equals one element of a set or
   an end of an interval ("1" vs "\\{1,2\\}", "1" vs "(0,1]") is rejected; tests pin that down.
9. Model output never raises: anything unparsable scores 0 with pred None (*ours*).
"""

import atexit
import json
import os
import queue
import re
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from functools import lru_cache

from data.prompts import BOXED

STARTUP_TIMEOUT_S = 120.0  # importing sympy on a loaded machine
VERIFY_TIMEOUT_S = 5.0  # per math-verify comparison (math-verify's own default is 5 s per call)
MAX_WORKERS = min(8, os.cpu_count() or 1)  # parallel math-verify children for grade_many
KINDS = ("strict", "flexible", "official")  # the GSM8K graders --reward can name

# -----------------------------------------------------------------------------
# numbers (GSM8K)

MINUS = "-\u2212"  # ASCII hyphen-minus and the unicode minus sign
# thousands groups must be exact ("1,080"), so "1,2" is two numbers; no nested quantifiers: linear time on any input
NUMBER = rf"[{MINUS}]?(?:\d{{1,3}}(?:,\d{{3}})+|\d+)(?:\.\d+)?"
STRICT_RE = re.compile(rf"####[ \t]*(?:\\\(|\\\$|\$|\*\*|\\boxed\{{)*[ \t]*({NUMBER})")
FLEXIBLE_RE = re.compile(rf"(?<![\w)\d.])({NUMBER})")  # a sign after a digit/letter/")" is an operator, not a sign
MAX_DIGITS = 1000  # longer "numbers" are junk (and Python refuses int() past 4300 digits): never equal to a gold
PLAIN_NUMBER_RE = re.compile(r"-?\d+(?:\.\d+)?")  # the fast path of the MATH grader
OFFICIAL_WINDOW = 300  # characters at the end of a response the official scorer searches (choice 1b)
OFFICIAL_RE = re.compile(r"#### (-?[0-9.,]+)")  # official: verl/utils/reward_score/gsm8k.py, method "strict"
OFFICIAL_RUN_RE = re.compile(r"-?[0-9.,]+")  # the same run of characters, as the whole content of a box


def to_number(text) -> Fraction | None:
    """'1,080' / '$18' / '18.' / '18.00' / '−5' -> an exact Fraction; None if it is not a single number."""
    if text is None:
        return None
    s = str(text).strip().replace("\u2212", "-").replace(",", "").replace("\\$", "").replace("$", "")
    s = s.replace("\\!", "").replace("{", "").replace("}", "").strip().rstrip(".").strip()
    if len(s) > MAX_DIGITS or not re.fullmatch(r"-?\d+(?:\.\d+)?", s):
        return None
    return Fraction(s)


def extract_strict(response: str) -> str | None:
    """The number after the LAST `####` marker (choice 1), as written."""
    last = None
    for m in STRICT_RE.finditer(response if isinstance(response, str) else ""):
        last = m.group(1)
    return last


def extract_flexible(response: str) -> str | None:
    """The last number anywhere in the response (choice 2), as written."""
    last = None
    for m in FLEXIBLE_RE.finditer(response if isinstance(response, str) else ""):
        last = m.group(1)
    return last


def extract_official(response: str, style: str = "gsm8k") -> str | None:
    """The official scorer's answer (choice 1b): the last `#### N` in the last 300 characters, commas removed; under a
    boxed style the last \\boxed{} in that window, if its whole content is such a number."""
    window = (response if isinstance(response, str) else "")[-OFFICIAL_WINDOW:]
    if style in BOXED:
        box = extract_boxed(window)
        found = [box] if box is not None and OFFICIAL_RUN_RE.fullmatch(box) else []
    else:
        found = OFFICIAL_RE.findall(window)
    return found[-1].replace(",", "") if found else None


# -----------------------------------------------------------------------------
# \boxed{...} (MATH)

BOX_COMMANDS = ("\\boxed", "\\fbox")


def extract_boxed(response: str) -> str | None:
    """Content of the last \\boxed{...} / \\fbox{...} (nested braces matched), or of `\\boxed 5`; None if absent,
    empty or unterminated. One backward search and one forward scan: linear time in the response length."""
    response = response if isinstance(response, str) else ""
    start, cmd = max((response.rfind(c), c) for c in BOX_COMMANDS)
    if start < 0:
        return None
    i = start + len(cmd)
    if response.startswith("{", i):
        depth, j = 0, i
        while j < len(response):
            ch = response[j]
            if ch == "\\":  # an escaped character (\{, \}, \\) never opens or closes the box
                j += 2
                continue
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    content = response[i + 1 : j].strip()
                    return content or None
            j += 1
        return None  # unterminated: a truncated response has no final answer (choice 5)
    m = re.match(r"[ \t]+([^\s$]+)", response[i:])  # `\boxed 5`: the next token (a letter right after is another cmd)
    if m is None:
        return None
    return m.group(1).rstrip(".") or None


# -----------------------------------------------------------------------------
# math-verify in child processes, with a time limit that works from any thread (choice 7)


class VerifyWorker:
    """One `python data/verify_worker.py` child: JSON lines [gold, pred] in, true/false out."""

    def __init__(self):
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "verify_worker.py")
        self.proc = subprocess.Popen(
            [sys.executable, "-u", script],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            bufsize=1,
        )
        self.replies = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()  # a reader thread lets us wait with a timeout
        try:  # a child that cannot start would silently score every MATH answer 0: fail loudly instead
            ready = self.replies.get(timeout=STARTUP_TIMEOUT_S)
        except queue.Empty:
            ready = None
        if ready != "ready\n":
            self.kill()
            raise RuntimeError(
                f"the math-verify child process ({script}) did not start; check `python -c 'import math_verify'` "
                "works in this environment (pip install math-verify)"
            )

    def _read(self):
        for line in self.proc.stdout:
            self.replies.put(line)
        self.replies.put(None)  # EOF: the child died or was killed

    def check(self, gold: str, pred: str, timeout: float) -> bool | None:
        """True/False, or None if the child ran out of time or died (the caller then discards this worker)."""
        try:
            self.proc.stdin.write(json.dumps([gold, pred]) + "\n")
            self.proc.stdin.flush()
            line = self.replies.get(timeout=timeout)
        except (OSError, queue.Empty, ValueError):
            line = None
        if line is None:
            return None
        return line.strip() == "true"

    def kill(self):
        self.proc.kill()
        self.proc.wait()


_idle: "queue.LifoQueue[VerifyWorker]" = queue.LifoQueue()
_spawned = 0
_spawn_lock = threading.Lock()
_owner = os.getpid()


def _take_worker() -> VerifyWorker:
    global _spawned, _idle, _owner
    if os.getpid() != _owner:  # a forked process (e.g. a DataLoader worker) must not share its parent's pipes
        _idle, _spawned, _owner = queue.LifoQueue(), 0, os.getpid()
    try:
        return _idle.get_nowait()
    except queue.Empty:
        pass
    with _spawn_lock:
        spawn = _spawned < MAX_WORKERS
        _spawned += spawn
    if spawn:
        try:
            return VerifyWorker()
        except Exception:
            with _spawn_lock:
                _spawned -= 1
            raise
    return _idle.get()  # all busy: wait for one


def _verify_in_worker(gold: str, pred: str) -> bool:
    global _spawned
    worker = _take_worker()
    result = worker.check(gold, pred, VERIFY_TIMEOUT_S)
    if result is None:  # timed out or died: kill it (a thread could not be stopped; a process can)
        worker.kill()
        with _spawn_lock:
            _spawned -= 1
        return False
    _idle.put(worker)
    return result


@atexit.register
def shutdown_workers():
    global _spawned
    while True:
        try:
            _idle.get_nowait().kill()
        except queue.Empty:
            break
    _spawned = 0


def latex_number(s: str) -> str:
    """'4.5e33' -> '4.5\\times10^{33}': math-verify would read the e as Euler's number (choice 6)."""
    m = re.fullmatch(r"\s*(-?\d+(?:\.\d+)?)\s*[eE]\s*([+-]?\d+)\s*", s)
    return f"{m.group(1)}\\times10^{{{int(m.group(2))}}}" if m else s


def guard_order(gold: str, pred: str) -> str:
    """Wrap an unbracketed comma list in parentheses when the gold is bracketed, so order counts (choice 8)."""
    g, p = gold.strip(), pred.strip()
    bracketed = lambda s: s[:1] in "([" or s.startswith(("\\left(", "\\left["))  # noqa: E731
    if bracketed(g) and g[-1:] in ")]" and "," in p and not bracketed(p) and not p.startswith("\\{"):
        return f"({p})"
    return pred


@lru_cache(maxsize=1 << 16)
def math_equal(gold: str, pred: str) -> bool:
    """Is the boxed answer `pred` equivalent to the LaTeX gold? Never raises."""
    gold, pred = gold.strip().rstrip(".").strip(), pred.strip().rstrip(".").strip()  # "7 hours." ends a sentence
    if not gold or not pred:
        return False
    if PLAIN_NUMBER_RE.fullmatch(gold) and PLAIN_NUMBER_RE.fullmatch(pred):  # fast path: exact rationals
        return to_number(gold) is not None and to_number(gold) == to_number(pred)
    if gold == pred:
        return True
    gold, pred = latex_number(gold), latex_number(pred)
    return _verify_in_worker(gold, guard_order(gold, pred))


# -----------------------------------------------------------------------------
# the public graders


def gsm8k_grade(gold: str, response: str, style: str = "gsm8k") -> dict:
    response = response if isinstance(response, str) else ""
    g = to_number(gold)
    pred_strict = extract_boxed(response) if style in BOXED else extract_strict(response)
    pred_flexible = extract_flexible(response)
    pred_official = extract_official(response, style)
    strict = g is not None and to_number(pred_strict) == g
    flexible = g is not None and to_number(pred_flexible) == g
    official = pred_official is not None and pred_official == str(gold).strip().replace(",", "")  # strings (1b)
    return dict(
        correct=strict,
        strict=strict,
        flexible=flexible,
        official=official,
        pred_strict=pred_strict,
        pred_flexible=pred_flexible,
        pred_official=pred_official,
    )


def math_grade(gold: str, response: str) -> dict:
    pred = extract_boxed(response if isinstance(response, str) else "")
    return dict(correct=pred is not None and math_equal(str(gold), pred), pred=pred)


def grade(example, response: str, gold: str | None = None) -> dict:
    """Grade one response. `example` is a dict from `data.load_dataset` (uses its grader, gold and style), or a
    grader name ("gsm8k" / "math") with `gold=` given. GSM8K -> correct (= strict), strict, flexible, official,
    pred_strict, pred_flexible, pred_official; MATH -> correct, pred."""
    if isinstance(example, str):
        grader, style = example, "gsm8k"
        if gold is None:
            raise ValueError("grade(name, response) needs gold=...: the gold answer to compare against")
    else:
        grader, style = example.get("grader", "math"), example.get("style", "gsm8k")
        gold = example["gold"] if gold is None else gold
    if grader == "gsm8k":
        return gsm8k_grade(gold, response, style)
    if grader == "math":
        return math_grade(gold, response)
    raise ValueError(f"unknown grader {grader!r}: expected 'gsm8k' or 'math'")


def reward(example, response: str, kind: str = "strict") -> float:
    """1.0 / 0.0 by the named grader: GSM8K "strict" (default), "flexible" or "official" (the paper's code's
    reward, choice 1b); MATH always uses the boxed grader, whatever `kind` says."""
    if kind not in KINDS:
        raise ValueError(f"unknown reward kind {kind!r}: expected one of {KINDS}")
    g = grade(example, response)
    return float(g[kind] if kind in g else g["correct"])


def grade_many(examples, responses, threads: int | None = None) -> list[dict]:
    """grade() over many (example, response) pairs, with up to MAX_WORKERS math-verify children in parallel."""
    examples, responses = list(examples), list(responses)
    assert len(examples) == len(responses), (len(examples), len(responses))
    if not any(isinstance(e, dict) and e.get("grader") == "math" for e in examples):
        return [grade(e, r) for e, r in zip(examples, responses)]  # pure Python graders: no threads needed
    with ThreadPoolExecutor(threads or MAX_WORKERS) as pool:
        return list(pool.map(grade, examples, responses))
