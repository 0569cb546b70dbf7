"""Verifiers: grade a decoded completion against a row's reference answer, as a score in [0, 1].

A verifier is any callable ``(completion, answer, row) -> float`` (``row`` is the source row, so a
verifier may read other fields, e.g. a list of accepted answers). The classes here are the usual
ones, chosen in YAML as ``data.init_args.verifier: {class_path: lit_opd.rollout.verifiers.MathVerify}``;
with no verifier set, the prompt source's own ``verify`` grades (a task's checker, else
:class:`ExactMatch`).
"""

from __future__ import annotations

import abc
import re
import threading
from collections.abc import Callable
from typing import Literal

from lit_opd.errors import MissingExtra, SettingError

#: Any callable that grades ``(completion, answer, row)``; a bool counts as 0.0 / 1.0.
VerifierFn = Callable[[str, "str | None", dict], float]

LAST_NUMBER = r"-?\d[\d,]*(?:\.\d+)?"
BOXED = r"\\boxed\{([^{}]*)\}"  # one level of braces: \boxed{\frac{1}{2}} needs MathVerify


class Verifier(abc.ABC):
    """Base class of the verifiers: ``verifier(completion, answer, row) -> score in [0, 1]``."""

    @abc.abstractmethod
    def __call__(self, completion: str, answer: str | None, row: dict) -> float:
        """The completion's score: 1.0 right, 0.0 wrong (or no answer to compare with)."""


class ExactMatch(Verifier):
    """1.0 when the completion equals the answer after stripping surrounding whitespace."""

    def __call__(self, completion: str, answer: str | None, row: dict) -> float:  # noqa: ARG002
        return float(answer is not None and completion.strip() == answer.strip())


class RegexMatch(Verifier):
    """Extract from the completion with ``pattern``, then compare with the answer (stripped).

    Args:
        pattern: a regular expression; the default finds numbers (``-12``, ``1,024``, ``3.5``).
            ``RegexMatch(pattern=r"\\\\boxed\\{([^{}]*)\\}", group=1)`` takes a ``\\boxed{...}`` answer.
        group: which group of the match is the answer (0: the whole match).
        occurrence: "last" (the final answer of a worked solution) or "first" match.
        extract_answer: also extract from the reference answer when the pattern matches it (e.g. a
            GSM8K solution ending in ``#### 72``); otherwise the whole answer is compared.
        ignore: characters removed from both sides before comparing (default: thousands commas).
    """

    def __init__(
        self, pattern: str = LAST_NUMBER, group: int = 0, occurrence: Literal["last", "first"] = "last",
        extract_answer: bool = True, ignore: str = ",",
    ) -> None:
        try:
            self.regex = re.compile(pattern)
        except re.error as err:
            raise SettingError(f"RegexMatch.pattern={pattern!r} is not a valid regular expression "
                             f"({err})") from None
        if not 0 <= group <= self.regex.groups:
            raise SettingError(f"RegexMatch.group={group} but the pattern has {self.regex.groups} group(s); "
                             f"use 0 (the whole match) to {self.regex.groups}")
        if occurrence not in ("last", "first"):
            raise SettingError(f"RegexMatch.occurrence={occurrence!r}: use 'last' or 'first'")
        self.group, self.occurrence, self.extract_answer = group, occurrence, extract_answer
        self.ignore = str.maketrans("", "", ignore)

    def extract(self, text: str) -> str | None:
        """The chosen match's group, or None when the pattern does not match."""
        matches = list(self.regex.finditer(text))
        if not matches:
            return None
        found = matches[-1] if self.occurrence == "last" else matches[0]
        return found.group(self.group)

    def __call__(self, completion: str, answer: str | None, row: dict) -> float:  # noqa: ARG002
        predicted = self.extract(completion)
        if answer is None or predicted is None:
            return 0.0
        gold = (self.extract(answer) if self.extract_answer else None) or answer
        return float(predicted.translate(self.ignore).strip() == gold.translate(self.ignore).strip())


class MathVerify(Verifier):
    """Mathematical equivalence by Hugging Face's ``math-verify`` (``pip install 'lit_opd[math]'``):
    the answer and the completion are parsed (LaTeX, ``\\boxed{}``, plain expressions) and compared
    symbolically, so ``1/2``, ``0.5`` and ``\\frac{1}{2}`` agree.

    Args:
        float_rounding: decimal places numbers are rounded to before comparing.
        timeout_seconds: limit on each parse / comparison (enforced in the main thread only: the
            package's timeout uses ``signal.alarm``).
    """

    def __init__(self, float_rounding: int = 6, timeout_seconds: int = 5) -> None:
        try:
            import math_verify
        except ImportError:
            raise MissingExtra("MathVerify needs the math-verify package: pip install "
                              "'lit_opd[math]'") from None
        self._parse, self._verify = math_verify.parse, math_verify.verify
        self.float_rounding, self.timeout_seconds = float_rounding, timeout_seconds

    def __call__(self, completion: str, answer: str | None, row: dict) -> float:  # noqa: ARG002
        if answer is None:
            return 0.0
        timeout = self.timeout_seconds if threading.current_thread() is threading.main_thread() else None
        gold = self._parse(answer, parsing_timeout=timeout)
        predicted = self._parse(completion, parsing_timeout=timeout)
        if not gold or not predicted:
            return 0.0
        same = self._verify(gold, predicted, float_rounding=self.float_rounding, timeout_seconds=timeout)
        return float(same)


def checked_score(verifier: VerifierFn, completion: str, answer: str | None, row: dict) -> float:
    """``verifier``'s score as a float, refused in one line when it is not a number in [0, 1]."""
    score = verifier(completion, answer, row)
    try:
        value = float(score)
    except (TypeError, ValueError):
        value = float("nan")
    if not 0.0 <= value <= 1.0:
        raise SettingError(f"RolloutDataModule.verifier={verifier_name(verifier)} returned {score!r}; a "
                         "verifier must return a number in [0, 1] (or a bool)")
    return value


def verifier_name(verifier: object) -> str:
    return getattr(verifier, "__qualname__", None) or type(verifier).__name__


def check_verifier(verifier: object) -> None:
    """A verifier setting must be callable (a :class:`Verifier` or any function) or None."""
    if verifier is not None and not callable(verifier):
        raise SettingError(f"RolloutDataModule.verifier={verifier!r} is not callable; give a Verifier (e.g. "
                         "{class_path: lit_opd.rollout.verifiers.MathVerify}) or a function "
                         "(completion, answer, row) -> float")
