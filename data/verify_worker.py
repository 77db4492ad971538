"""
A child process that answers math-verify questions: reads JSON lines [gold, pred], writes `true` / `false`.

data/graders.py starts it and kills it when one answer takes longer than its time limit, which is why math-verify's
own signal-based timeouts are off here (they only work in a main thread; a process can always be killed).
Run by path (`python data/verify_worker.py`), so it imports nothing from the project.
"""

import json
import logging
import sys
from functools import lru_cache

logging.disable(logging.WARNING)  # math-verify warns that its timeouts are off: we enforce ours from the parent

from math_verify import parse, verify  # noqa: E402


@lru_cache(maxsize=4096)
def parse_boxed(s: str):
    return parse("\\boxed{" + s + "}", parsing_timeout=None)  # the gold repeats across samples: parse once


def equal(gold: str, pred: str) -> bool:
    try:
        g, p = parse_boxed(gold), parse_boxed(pred)
        return bool(g) and bool(p) and bool(verify(g, p, timeout_seconds=None))  # gold first
    except Exception:  # model output never raises; an unparsable answer is wrong
        return False


def main():
    sys.stdout.write("ready\n")  # imports done: the parent starts its clock per question only now
    sys.stdout.flush()
    for line in sys.stdin:
        try:
            gold, pred = json.loads(line)
            ok = equal(str(gold), str(pred))
        except Exception:
            ok = False
        sys.stdout.write("true\n" if ok else "false\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
