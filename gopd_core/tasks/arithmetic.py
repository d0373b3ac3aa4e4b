"""The `math` domain: multi-step integer arithmetic with a short worked answer.

A problem is a left-deep chain over single digits, e.g. ((7+5)*3)-4, shown with the fewest
parentheses standard precedence needs: "Compute (7+5)*3-4." The demonstration evaluates one step
per line and boxes the result:

    7+5=12
    12*3=36
    36-4=32
    \\boxed{32}

Every intermediate value stays within [0, MAX_VALUE], so answers are short for char-level models.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

OPERATORS = ("+", "-", "*")
APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
MAX_VALUE = 20
OPERATION_COUNTS = (2, 2, 3)  # two operations twice as often as three


@dataclass(frozen=True)
class ArithmeticProblem:
    """One problem: the operands (n+1 digits) and operators (n) of a left-deep chain."""

    operands: tuple[int, ...]
    operators: tuple[str, ...]

    @property
    def expression(self) -> str:
        return render_expression(self.operands, self.operators)

    @property
    def steps(self) -> list[tuple[int, str, int, int]]:
        """(left, operator, right, result) for each operation, in evaluation order."""
        steps, value = [], self.operands[0]
        for operator, right in zip(self.operators, self.operands[1:]):
            result = APPLY[operator](value, right)
            steps.append((value, operator, right, result))
            value = result
        return steps

    @property
    def answer(self) -> int:
        return self.steps[-1][3]


def render_expression(operands: tuple[int, ...], operators: tuple[str, ...]) -> str:
    """Infix text of the left-deep chain; parenthesise the left side where precedence needs it."""
    text = str(operands[0])
    previous = None
    for operator, right in zip(operators, operands[1:]):
        if operator == "*" and previous in ("+", "-"):
            text = f"({text})"
        text = f"{text}{operator}{right}"
        previous = operator
    return text


def sample_problem(rng: random.Random) -> ArithmeticProblem:
    """Draw a problem whose intermediate values all stay within [0, MAX_VALUE] (rejection sampling)."""
    while True:
        n_operations = rng.choice(OPERATION_COUNTS)
        problem = ArithmeticProblem(
            operands=tuple(rng.randint(1, 9) for _ in range(n_operations + 1)),
            operators=tuple(rng.choice(OPERATORS) for _ in range(n_operations)),
        )
        if all(0 <= step[3] <= MAX_VALUE for step in problem.steps):
            return problem


def prompt_text(problem: ArithmeticProblem) -> str:
    return f"Compute {problem.expression}."


def demonstration(problem: ArithmeticProblem) -> str:
    """The worked answer: one `a<op>b=c` line per step, then the boxed result."""
    lines = [f"{left}{operator}{right}={result}" for left, operator, right, result in problem.steps]
    return "\n".join([*lines, f"\\boxed{{{problem.answer}}}"])


def make_example(rng: random.Random) -> dict:
    """Prompt text, ground truth (the integer as text), and demonstration of one fresh problem."""
    problem = sample_problem(rng)
    return {
        "prompt": prompt_text(problem),
        "ground_truth": str(problem.answer),
        "demonstration": demonstration(problem),
        "key": problem.expression,
    }
