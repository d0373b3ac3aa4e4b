"""Verifiers that turn responses into rewards: math answers and sandboxed code tests.

- ``verify_math(response, ground_truth) -> bool``: final-answer equivalence (math_verify).
- ``run_untrusted(code, ...) -> SandboxResult``: run a Python script in the sandbox.
- ``verify_code(response, tests) -> CodeVerdict``: run a response's function on test cases.
"""

from gopd_core.verify.code import CaseResult, CodeVerdict, extract_code, verify_code, verify_code_batch
from gopd_core.verify.math_answers import extract_answer, verify_math
from gopd_core.verify.sandbox import SandboxResult, SandboxSetupError, isolation_mode, run_untrusted

__all__ = [
    "CaseResult",
    "CodeVerdict",
    "SandboxResult",
    "SandboxSetupError",
    "extract_answer",
    "extract_code",
    "isolation_mode",
    "run_untrusted",
    "verify_code",
    "verify_code_batch",
    "verify_math",
]
