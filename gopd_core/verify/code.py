"""Check a code response against input/output test cases, all cases in one sandbox run.

``verify_code(response, tests)``:
1. Extract the Python source (the last fenced block that defines the entry point, else the last
   fenced block, else the whole response if it defines the entry point) and reject syntax errors
   on the host, without starting a sandbox.
2. Build one harness script: it reads the test inputs (never the expected outputs) as JSON from
   stdin, executes the solution, calls the entry point on each input under a per-case wall-clock
   alarm, and prints one marker-prefixed JSON line per case with what it returned or raised.
3. Run the harness with ``run_untrusted`` and compare each returned value with the expected output
   here on the host (JSON round-trip, floats to 1e-9 relative). Because the expected outputs never
   enter the sandbox, printing fake result lines cannot make a wrong solution pass.
"""

from __future__ import annotations

import ast
import json
import math
import re
import secrets
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from gopd_core.verify.sandbox import SandboxResult, run_untrusted

FLOAT_REL_TOL = 1e-9
_FENCED_BLOCK = re.compile(r"```[ \t]*([\w+-]*)[ \t]*\n(.*?)```", re.DOTALL)
_DETAIL_CHARS = 300

_HARNESS = """
import json as _json
import signal as _signal
import sys as _sys

_MARKER = {marker!r}
_CASES = _json.loads(_sys.stdin.read())
_OUT = _sys.stdout


class _CaseTimeout(BaseException):
    pass


def _emit(record):
    _OUT.write("\\n" + _MARKER + _json.dumps(record) + "\\n")
    _OUT.flush()


def _on_alarm(signum, frame):
    raise _CaseTimeout()


def _describe(exc):
    return (type(exc).__name__ + ": " + str(exc))[:{detail_chars}]


_namespace = {{"__name__": "__solution__"}}
try:
    exec(compile({source!r}, "<solution>", "exec"), _namespace)
except BaseException as _exc:
    _emit({{"fatal": "runtime_error", "error": _describe(_exc)}})
    raise SystemExit(0)
_function = _namespace.get({entry_point!r})
if not callable(_function):
    _emit({{"fatal": "missing_function", "error": "no callable named " + {entry_point!r}}})
    raise SystemExit(0)
_signal.signal(_signal.SIGALRM, _on_alarm)
for _index, _args in enumerate(_CASES):
    try:
        _signal.setitimer(_signal.ITIMER_REAL, {case_seconds!r})
        try:
            _value = _function(*_args) if isinstance(_args, list) else _function(_args)
        finally:
            _signal.setitimer(_signal.ITIMER_REAL, 0)
        try:
            _emit({{"i": _index, "status": "returned", "value": _value}})
        except (TypeError, ValueError, RecursionError) as _exc:
            _emit({{"i": _index, "status": "unserializable", "error": repr(_value)[:{detail_chars}]}})
    except _CaseTimeout:
        _emit({{"i": _index, "status": "timeout", "error": "over {case_seconds!r} s"}})
    except BaseException as _exc:
        _emit({{"i": _index, "status": "raised", "error": _describe(_exc)}})
"""


@dataclass(frozen=True)
class CaseResult:
    """One test case: ``reason`` is "passed", "wrong_answer", "runtime_error", "timeout" or "not_run"."""

    passed: bool
    reason: str
    detail: str


@dataclass(frozen=True)
class CodeVerdict:
    """Verdict on one response. ``passed`` means every case passed.

    ``reason`` is "passed", "no_code", "syntax_error", "missing_function", "runtime_error",
    "wrong_answer", "timeout", or the sandbox's reason when the run hit a limit (e.g.
    "output_limit", "memory_limit"). ``sandbox`` is None when no sandbox was started.
    """

    passed: bool
    reason: str
    cases: tuple[CaseResult, ...]
    sandbox: SandboxResult | None


def extract_code(response: str, entry_point: str = "f") -> str | None:
    """The Python source in ``response`` (see module docstring, step 1), or None."""
    defines = re.compile(rf"^\s*(?:async\s+)?def\s+{re.escape(entry_point)}\s*\(", re.MULTILINE)
    blocks = [
        body
        for language, body in _FENCED_BLOCK.findall(response)
        if language.lower() in ("", "python", "py", "python3")
    ]
    defining = [block for block in blocks if defines.search(block)]
    if defining:
        return defining[-1]
    if blocks:
        return blocks[-1]
    return response if defines.search(response) else None


def build_harness(source: str, entry_point: str, case_seconds: float, marker: str) -> str:
    """The harness script of step 2 (source embedded as a string literal)."""
    return _HARNESS.format(
        marker=marker,
        source=source,
        entry_point=entry_point,
        case_seconds=case_seconds,
        detail_chars=_DETAIL_CHARS,
    )


def outputs_match(actual: object, expected: object) -> bool:
    """JSON-value equality with floats compared to ``FLOAT_REL_TOL`` (bools are not numbers)."""
    if isinstance(actual, bool) or isinstance(expected, bool):
        return actual is expected
    if isinstance(actual, (int, float)) and isinstance(expected, (int, float)):
        if isinstance(actual, int) and isinstance(expected, int):
            return actual == expected
        return math.isclose(actual, expected, rel_tol=FLOAT_REL_TOL, abs_tol=FLOAT_REL_TOL)
    if isinstance(actual, list) and isinstance(expected, list):
        return len(actual) == len(expected) and all(map(outputs_match, actual, expected))
    if isinstance(actual, dict) and isinstance(expected, dict):
        return actual.keys() == expected.keys() and all(outputs_match(actual[k], expected[k]) for k in actual)
    return type(actual) is type(expected) and actual == expected


def parse_records(stdout: str, marker: str) -> tuple[dict[int, dict], dict | None]:
    """Per-case records (last one wins) and the fatal record, if any, from the harness output."""
    records: dict[int, dict] = {}
    fatal = None
    for line in stdout.split("\n"):  # not splitlines(): it splits on the marker's \x1e too
        if not line.startswith(marker):
            continue
        try:
            record = json.loads(line[len(marker) :])
        except ValueError:
            continue
        if not isinstance(record, dict):
            continue
        if "fatal" in record:
            fatal = record
        elif isinstance(record.get("i"), int):
            records[record["i"]] = record
    return records, fatal


def judge_case(record: dict | None, expected: object) -> CaseResult:
    """Compare one harness record with the expected output."""
    if record is None:
        return CaseResult(False, "not_run", "no result reported")
    status = record.get("status")
    if status == "returned":
        value = record.get("value")
        if outputs_match(value, expected):
            return CaseResult(True, "passed", "")
        return CaseResult(False, "wrong_answer", f"got {json.dumps(value)[:_DETAIL_CHARS]}")
    reason = "timeout" if status == "timeout" else "runtime_error"
    return CaseResult(False, reason, str(record.get("error", ""))[:_DETAIL_CHARS])


def _overall_reason(cases: tuple[CaseResult, ...], fatal: dict | None, sandbox: SandboxResult) -> str:
    if fatal is not None:
        return str(fatal["fatal"])
    if all(case.passed for case in cases):
        return "passed"
    if any(case.reason == "not_run" for case in cases):
        # Results missing: a sandbox limit cut the run short, or the code killed the harness.
        return "runtime_error" if sandbox.ok else sandbox.reason
    return next(case.reason for case in cases if not case.passed)


def _syntax_error(source: str) -> str | None:
    try:
        ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        return f"{type(exc).__name__}: {exc}"[:_DETAIL_CHARS]
    return None


def verify_code(
    response: str,
    tests: list[dict],
    *,
    entry_point: str = "f",
    case_seconds: float = 2.0,
    cpu_seconds: float = 10,
    wall_seconds: float = 15,
    memory_mb: int = 512,
    max_output_bytes: int = 1 << 20,
) -> CodeVerdict:
    """Run the function ``entry_point`` defined in ``response`` on every test case.

    ``tests``: ``[{"input": [arg, ...], "output": expected}, ...]`` with JSON values; a non-list
    input is passed as the single argument. ``case_seconds`` is the wall-clock limit per case;
    the other limits apply to the one sandbox run holding all cases.
    """
    if not tests:
        raise ValueError("verify_code needs at least one test case; an empty list would pass anything")
    source = extract_code(response, entry_point) if isinstance(response, str) else None
    if source is None:
        return CodeVerdict(False, "no_code", (), None)
    error = _syntax_error(source)
    if error is not None:
        not_run = tuple(CaseResult(False, "not_run", error) for _ in tests)
        return CodeVerdict(False, "syntax_error", not_run, None)
    marker = f"\x1egopd-{secrets.token_hex(8)}:"
    sandbox = run_untrusted(
        build_harness(source, entry_point, case_seconds, marker),
        stdin=json.dumps([case["input"] for case in tests]),
        cpu_seconds=cpu_seconds,
        wall_seconds=wall_seconds,
        memory_mb=memory_mb,
        max_output_bytes=max_output_bytes,
    )
    records, fatal = parse_records(sandbox.stdout, marker)
    if fatal is not None:
        detail = str(fatal.get("error", ""))[:_DETAIL_CHARS]
        cases = tuple(CaseResult(False, "not_run", detail) for _ in tests)
    else:
        cases = tuple(judge_case(records.get(index), case["output"]) for index, case in enumerate(tests))
    reason = _overall_reason(cases, fatal, sandbox)
    return CodeVerdict(reason == "passed", reason, cases, sandbox)


def verify_code_batch(
    responses: Sequence[str], tests_list: Sequence[list[dict]], max_workers: int = 2, **options: Any
) -> list[CodeVerdict]:
    """``verify_code`` over pairs, ``max_workers`` sandboxes at a time; results in input order.

    Responses whose extracted source and tests are identical share one sandbox run (samples of one
    prompt often repeat: rollouts of a small model repeat 3-4x on the code tasks), so the verdict
    object is shared among them. Sources that differ are always run separately.
    """
    if len(responses) != len(tests_list):
        raise ValueError(
            f"got {len(responses)} responses but {len(tests_list)} test lists; pass one per response"
        )
    entry_point = options.get("entry_point", "f")
    first_of: dict[tuple[str, str], int] = {}
    slot = []
    for index, (response, tests) in enumerate(zip(responses, tests_list)):
        source = extract_code(response, entry_point) if isinstance(response, str) else None
        key = ("" if source is None else source, json.dumps(tests, sort_keys=True))
        slot.append(first_of.setdefault(key, index))
    unique = sorted(set(slot))
    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        verdicts = dict(zip(unique, pool.map(
            lambda index: verify_code(responses[index], tests_list[index], **options), unique)))
    return [verdicts[index] for index in slot]
