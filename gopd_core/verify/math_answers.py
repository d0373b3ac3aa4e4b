"""Final answers of math responses: extract one, and check it against the ground truth.

``verify_math(response, ground_truth)``:
1. Extract the response's final answer (``extract_answer``): the last ``\\boxed{...}`` (nested braces
   allowed), else the last "answer is X" / "Answer: X", else the last number in the text.
2. Fast path: if both sides are plain numbers (integers, decimals or a/b fractions), compare them
   exactly as fractions, so "42" equals "42.0" and "0.5" equals "1/2" without sympy.
3. Otherwise ask ``math_verify`` (sympy-based) whether the two expressions are equivalent. Its
   signal-based timeouts only work on the main thread, so other threads run it without a timeout
   and rely on the answer length cap instead.
Any failure on garbage input counts as "not equal": ``verify_math`` never raises.
"""

from __future__ import annotations

import re
import threading
from fractions import Fraction

MATH_VERIFY_TIMEOUT_S = 2
MAX_ANSWER_CHARS = 1000  # longer answers skip math_verify (parse time grows fast with length)
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*")
_ANSWER_PHRASE = re.compile(r"(?:answer\s+is|answer\s*:)\s*(.+)", re.IGNORECASE)
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")
_PLAIN_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:/\d+)?")
_TRIM_CHARS = " \t\n$*`"


def _closing_braces(text: str) -> dict[int, int]:
    """Map the index of every balanced "{" in ``text`` to the index of its "}" (one pass)."""
    open_indices: list[int] = []
    closing: dict[int, int] = {}
    for index, char in enumerate(text):
        if char == "{":
            open_indices.append(index)
        elif char == "}" and open_indices:
            closing[open_indices.pop()] = index
    return closing


def _last_boxed(text: str) -> str | None:
    """Content of the last well-formed ``\\boxed{...}`` (or ``\\boxed X``) in ``text``."""
    matches = list(_BOXED.finditer(text))
    closing = _closing_braces(text) if matches else {}
    for match in reversed(matches):
        start = match.end()
        if start < len(text) and text[start] == "{":
            content = text[start + 1 : closing[start]] if start in closing else None
        else:
            tokens = text[start : start + 200].split(maxsplit=1)
            content = tokens[0].strip("$") if tokens else None
        if content is not None and content.strip():
            return content.strip()
    return None


def _clean(answer: str) -> str:
    """Trim whitespace, markdown emphasis, dollar signs and a trailing period from an answer."""
    answer = answer.strip(_TRIM_CHARS)
    if answer.endswith("."):
        answer = answer[:-1].strip(_TRIM_CHARS)
    if answer.startswith("\\(") and answer.endswith("\\)"):
        answer = answer[2:-2].strip()
    return answer


def extract_answer(text: str) -> str | None:
    """The final answer stated in ``text``, or None if there is none.

    Preference order: last ``\\boxed{...}``; else the text after the last "answer is" /
    "Answer:" up to the end of its line; else the last number (thousands commas removed).
    """
    if not isinstance(text, str):
        return None
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    phrases = _ANSWER_PHRASE.findall(text)
    if phrases:
        answer = _clean(phrases[-1])
        if answer:
            return answer
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


def _as_fraction(answer: str) -> Fraction | None:
    """``answer`` as an exact number if it is a plain integer, decimal or a/b fraction."""
    compact = answer.replace(" ", "").replace(",", "").strip("$")
    if not _PLAIN_NUMBER.fullmatch(compact):
        return None
    try:
        return Fraction(compact)
    except (ValueError, ZeroDivisionError):
        return None


def numbers_equal(answer: str, ground_truth: str) -> bool:
    """True if both are plain numbers with the same exact value ("42" and "42.0", "1/2" and ".5")."""
    left, right = _as_fraction(answer), _as_fraction(ground_truth)
    return left is not None and right is not None and left == right


def _math_verify_equal(answer: str, ground_truth: str) -> bool:
    """Symbolic equivalence via math_verify; timeouts only where signals work (main thread)."""
    from math_verify import parse, verify  # imported lazily: sympy takes about a second to import

    on_main_thread = threading.current_thread() is threading.main_thread()
    timeout_s = MATH_VERIFY_TIMEOUT_S if on_main_thread else None
    gold = parse(f"\\boxed{{{ground_truth}}}", parsing_timeout=timeout_s)
    prediction = parse(f"\\boxed{{{answer}}}", parsing_timeout=timeout_s)
    if not gold or not prediction:
        return False
    return bool(verify(gold, prediction, timeout_seconds=timeout_s))


def verify_math(response: str, ground_truth: str) -> bool:
    """True if the final answer of ``response`` is mathematically equal to ``ground_truth``.

    ``ground_truth`` may be bare ("42", "\\frac{1}{2}") or boxed. Never raises: garbage in gives
    False.
    """
    try:
        if not isinstance(response, str) or not isinstance(ground_truth, str):
            return False
        answer = extract_answer(response)
        gold = _last_boxed(ground_truth) or _clean(ground_truth)
        if answer is None or not gold:
            return False
        if numbers_equal(answer, gold) or answer == gold:
            return True
        if len(answer) > MAX_ANSWER_CHARS or len(gold) > MAX_ANSWER_CHARS:
            return False
        return _math_verify_equal(answer, gold)
    except Exception:  # noqa: BLE001 - a verifier must turn any failure into "not verified"
        return False
