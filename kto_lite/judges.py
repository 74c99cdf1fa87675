"""Judges: a program that says whether a completion is desirable, turning samples into KTO rows.

A judge is called `judge(prompt, completion, row) -> bool`, where `prompt` is the prompt as the data
file gives it (text or chat messages), `completion` the sampled text and `row` the prompt file's row
(a dict that holds the reference answer, if any). `make_judge(spec)` builds one from a short spec:

    exact                  the completion, stripped, equals the reference answer, stripped
    contains               the reference answer (stripped) occurs in the completion
    regex:PATTERN          re.search(PATTERN, completion); "{reference}" in PATTERN stands for the
                           reference answer, escaped (regex:^{reference}\\.?$)
    number                 the completion's last number equals the reference's last number
                           ("#### 1,234" and "1234.0" both give 1234)
    python:MODULE:FUNC     a function of yours: FUNC(prompt, completion, row) or FUNC(prompt, completion)
    python:FILE.py:FUNC    returning a bool, or a number compared with `threshold` (label: value >= threshold)

The reference answer is the row's `reference_column`, by default the first of REFERENCE_COLUMNS that
the row has. A judge that raises on a row labels nothing for that row: `apply_judge` returns the
reason instead, so that callers record which row failed and why and go on with the others.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Any

from kto_lite.errors import UsageError

REFERENCE_COLUMNS = ("answer", "reference", "target", "solution")
BUILTIN = ("exact", "contains", "regex:PATTERN", "number", "python:MODULE:FUNCTION", "python:FILE.py:FUNCTION")
# A number as people write it: sign, thousands separators, decimals ("-1,234.5", "42", ".5").
# A sign counts only where it cannot be a minus between two terms ("10-5" ends in 5, not -5).
_NUMBER = re.compile(r"(?:(?<![\w.])[-+])?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)?(?:\.\d+)?")


class JudgeSpecError(UsageError):
    """A judge spec that cannot be built (unknown name, bad pattern, missing function): exit 2."""


class JudgeError(ValueError):
    """A judge could not label one row (no reference answer, a score without a threshold, ...)."""


@dataclass
class Judge:
    """A callable judge, with what it needs from the rows. Build one with `make_judge`."""

    spec: str
    check: Callable[[Any, str, dict], bool]  # (prompt, completion, row) -> label
    needs_reference: bool
    reference_column: str | None = None  # None: the first of REFERENCE_COLUMNS present in a row

    def __call__(self, prompt: Any, completion: str, row: dict) -> bool:
        return self.check(prompt, completion, row)

    def reference(self, row: dict) -> str:
        """The row's reference answer, as text. JudgeError when the row has none."""
        names = [self.reference_column] if self.reference_column else list(REFERENCE_COLUMNS)
        for name in names:
            if name in row and row[name] is not None:
                value = row[name]
                return value if isinstance(value, str) else _plain(value)
        wanted = f"column {self.reference_column!r}" if self.reference_column else \
            f"any of the columns {', '.join(REFERENCE_COLUMNS)}"
        raise JudgeError(f"judge {self.spec!r} needs a reference answer, and the row has no {wanted} "
                         f"(its columns: {', '.join(row) or 'none'})")

    def check_columns(self, columns: list[str], source: str) -> None:
        """Refuse early (JudgeSpecError) when the judge needs a reference answer no row can have."""
        if not self.needs_reference:
            return
        names = [self.reference_column] if self.reference_column else list(REFERENCE_COLUMNS)
        if not any(name in columns for name in names):
            hint = "name the column with --reference_column" if not self.reference_column else \
                "check the column name"
            raise JudgeSpecError(
                f"{source}: judge {self.spec!r} compares against a reference answer, but the file has no "
                f"column {' or '.join(repr(n) for n in names)} (its columns: {', '.join(columns)}); {hint}")


def make_judge(spec: str, *, reference_column: str | None = None, threshold: float | None = None) -> Judge:
    """A judge from a spec (module docstring). JudgeSpecError for a spec that cannot work."""
    spec = (spec or "").strip()
    name, _, argument = spec.partition(":")
    if threshold is not None and name != "python":
        raise JudgeSpecError(f"a threshold applies to python judges that return a score, not to {spec!r}")
    if name == "python":
        return Judge(spec, _python_judge(argument, spec, threshold), needs_reference=False,
                     reference_column=reference_column)
    if name == "regex":
        return _regex_judge(argument, spec, reference_column)
    checks = {"exact": _exact, "contains": _contains, "number": _same_number}
    if name not in checks or argument:
        raise JudgeSpecError(f"unknown judge {spec!r}; accepted: {', '.join(BUILTIN)}")
    judge = Judge(spec, lambda p, c, r: False, needs_reference=True, reference_column=reference_column)
    compare = checks[name]
    judge.check = lambda prompt, completion, row: compare(completion, judge.reference(row))
    return judge


def apply_judge(judge: Callable, prompt: Any, completion: str, row: dict) -> tuple[bool | None, str | None]:
    """(label, None), or (None, reason) when the judge raised: the row is then left unlabeled."""
    try:
        return bool(judge(prompt, completion, row)), None
    except Exception as e:  # noqa: BLE001 - a user's judge may raise anything; the row is skipped, not the run
        return None, f"{type(e).__name__}: {e}" if not isinstance(e, JudgeError) else str(e)


# --------------------------------------------------------------------------- the built-in comparisons


def _exact(completion: str, reference: str) -> bool:
    return completion.strip() == reference.strip()


def _contains(completion: str, reference: str) -> bool:
    reference = reference.strip()
    if not reference:
        raise JudgeError("the reference answer is empty")
    return reference in completion


def last_number(text: str) -> float | None:
    """The last number written in `text` ("... so 1,234.5 apples" -> 1234.5), None if there is none."""
    found = [m.group() for m in _NUMBER.finditer(text) if any(ch.isdigit() for ch in m.group())]
    return float(found[-1].replace(",", "")) if found else None


def _same_number(completion: str, reference: str) -> bool:
    expected = last_number(reference)
    if expected is None:
        raise JudgeError(f"the reference answer {reference!r} has no number")
    got = last_number(completion)
    return got is not None and math.isclose(got, expected, rel_tol=1e-9, abs_tol=1e-9)


def _regex_judge(pattern: str, spec: str, reference_column: str | None) -> Judge:
    if not pattern:
        raise JudgeSpecError("regex judge without a pattern; write it as regex:PATTERN")
    uses_reference = "{reference}" in pattern
    try:  # check the pattern once, with a harmless stand-in for the reference
        re.compile(pattern.replace("{reference}", "x"))
    except re.error as e:
        raise JudgeSpecError(f"judge {spec!r}: not a valid regular expression ({e})") from None
    judge = Judge(spec, lambda p, c, r: False, needs_reference=uses_reference, reference_column=reference_column)
    compiled = None if uses_reference else re.compile(pattern)

    def check(prompt, completion: str, row: dict) -> bool:
        regex = compiled or re.compile(pattern.replace("{reference}", re.escape(judge.reference(row).strip())))
        return regex.search(completion) is not None

    judge.check = check
    return judge


# --------------------------------------------------------------------------- python:TARGET:FUNCTION


def _python_judge(argument: str, spec: str, threshold: float | None) -> Callable:
    target, _, function = argument.rpartition(":")  # rpartition: a Windows path keeps its "C:"
    if not target or not function:
        raise JudgeSpecError(f"judge {spec!r}: write python:module:function or python:path/to/file.py:function")
    module = _load_module(target, spec)
    fn = getattr(module, function, None)
    if not callable(fn):
        raise JudgeSpecError(f"judge {spec!r}: {target} has no function {function!r}")
    takes_row = _takes_row(fn, spec)

    def check(prompt, completion: str, row: dict) -> bool:
        value = fn(prompt, completion, row) if takes_row else fn(prompt, completion)
        if hasattr(value, "item") and not isinstance(value, (str, bytes)):
            value = value.item()  # numpy / torch scalars
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)):
            if threshold is None:
                raise JudgeError(f"{function} returned the score {value!r}; give a threshold "
                                 "(--judge_threshold) to turn scores into labels (score >= threshold)")
            if math.isnan(value):
                raise JudgeError(f"{function} returned NaN")
            return value >= threshold
        raise JudgeError(f"{function} returned {type(value).__name__} {value!r}, not a bool or a number")

    return check


def _load_module(target: str, spec: str):
    path = Path(target)
    if target.endswith(".py") or "/" in target or "\\" in target:
        if not path.is_file():
            raise JudgeSpecError(f"judge {spec!r}: no such file {target}")
        name = f"kto_lite_judge_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:
            raise JudgeSpecError(f"judge {spec!r}: importing {target} failed: {type(e).__name__}: {e}") from e
        return module
    if "" not in sys.path and str(Path.cwd()) not in sys.path:  # `python -m` has it; scripts may not
        sys.path.insert(0, str(Path.cwd()))
    try:
        return importlib.import_module(target)
    except ImportError as e:
        raise JudgeSpecError(f"judge {spec!r}: cannot import module {target!r} ({e})") from e
    except Exception as e:
        raise JudgeSpecError(f"judge {spec!r}: importing {target} failed: {type(e).__name__}: {e}") from e


def _takes_row(fn: Callable, spec: str) -> bool:
    """True for fn(prompt, completion, row), False for fn(prompt, completion); refuse other shapes."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: assume the documented 3 arguments
        return True
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if any(p.kind == p.VAR_POSITIONAL for p in parameters) or len(positional) >= 3:
        return True
    if len(positional) == 2:
        return False
    raise JudgeSpecError(f"judge {spec!r}: the function must take (prompt, completion, row) "
                         f"or (prompt, completion), not {len(positional)} argument(s)")


def _plain(value: Any) -> str:
    """A non-text reference (42, 3.5, True) as text; integral floats without ".0"."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


# --------------------------------------------------------------------------- judged success and its interval
# The interval: the samples of one prompt are not independent (an easy prompt is answered right n
# times), so a plain binomial interval over n * prompts samples would be too narrow. We use the Wilson
# score interval at an effective sample size n_eff = p(1-p) / Var(p), where Var(p) is the between-prompt
# (cluster) variance of the accuracy, i.e. the sample count divided by Kish's design effect (Korn and
# Graubard, 1998). Wilson rather than the normal interval because it stays inside [0, 1] and behaves
# near 0 and 1; a design effect rather than a cluster bootstrap because it needs no random resampling
# (the same numbers always give the same interval) and is exact to state. n_eff is capped at the number
# of samples, so the interval is never narrower than if the samples were independent.

CONFIDENCE = 0.95
INTERVAL = "Wilson score interval at the design-effect sample size (prompts as clusters), 95%"


def wilson_interval(successes: float, n: float, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval for a proportion successes / n (n may be an effective, non-integer size)."""
    if n <= 0:
        raise ValueError("the interval needs at least one sample")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def clustered_interval(per_prompt: list[tuple[int, int]], confidence: float = CONFIDENCE
                       ) -> tuple[float, float, float]:
    """(low, high, n_eff) from (correct, judged) per prompt; see the comment above."""
    per_prompt = [(y, m) for y, m in per_prompt if m > 0]
    total = sum(m for _, m in per_prompt)
    p = sum(y for y, _ in per_prompt) / total
    n_eff = float(total)
    clusters = len(per_prompt)
    if clusters > 1 and 0 < p < 1:
        # ratio-estimator variance of p over clusters: P/(P-1) * sum (y_i - p m_i)^2 / (sum m_i)^2
        variance = clusters / (clusters - 1) * sum((y - p * m) ** 2 for y, m in per_prompt) / total**2
        if variance > 0:
            n_eff = min(n_eff, p * (1 - p) / variance)
    low, high = wilson_interval(p * n_eff, n_eff, confidence)
    return low, high, n_eff
